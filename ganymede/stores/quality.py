"""The quality_results table: one result per (hour, agent, dataset, check) of ganymede.quality, a rerun
replacing it. Its row counts are also the history the next hours' row_count check compares with.
"""
from datetime import timedelta

from .. import hours
from ..quality import Result
from .mysql import committing, marks, select

_COLUMNS = "agent_id, dataset, check_name, passed, observed, expected, detail, blocking"


def save_results(conn, hour, round_, results):
    """Store (replace) the hour's results; one commit."""
    with committing(conn) as cur:
        cur.executemany(
            "REPLACE INTO quality_results (hour, agent_id, dataset, check_name, round, passed, blocking, observed, "
            "expected, detail, checked_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, UTC_TIMESTAMP(6))",
            [(hours.floor_hour(hour), r.agent_id, r.dataset, r.check, round_, r.passed, r.blocking, r.observed,
              r.expected[:255], r.detail[:1024]) for r in results])


def trailing_counts(conn, hour, trailing_hours, agent_ids):
    """{(agent, dataset): [rows sent in each earlier hour]} over the `trailing_hours` before `hour`: one query."""
    if not agent_ids:
        return {}
    hour = hours.floor_hour(hour)
    history = {}
    for agent_id, dataset, observed in select(
            conn, f"SELECT agent_id, dataset, observed FROM quality_results WHERE check_name = 'row_count' "
            f"AND agent_id IN ({marks(agent_ids)}) AND hour >= %s AND hour < %s ORDER BY hour",
            (*agent_ids, hour - timedelta(hours=trailing_hours), hour), commit=True):
        history.setdefault((agent_id, dataset), []).append(observed)
    return history


def _result(row):
    agent_id, dataset, check, passed, observed, expected, detail, blocking = row
    return Result(agent_id, dataset, check, bool(passed), observed, expected, detail, bool(blocking))


def hour_results(conn, hour):
    """Every result of the hour, failures first."""
    rows = select(conn, f"SELECT {_COLUMNS} FROM quality_results WHERE hour = %s "
                  "ORDER BY passed, agent_id, dataset, check_name", (hours.floor_hour(hour),), commit=True)
    return [_result(r) for r in rows]


def failures_between(conn, first, last):
    """{hour: [failed results]} of the hours first..last: one query."""
    by_hour = {}
    for row in select(conn, f"SELECT hour, {_COLUMNS} FROM quality_results WHERE passed = 0 AND hour BETWEEN %s "
                      "AND %s ORDER BY hour, agent_id, dataset, check_name",
                      (hours.floor_hour(first), hours.floor_hour(last)), commit=True):
        by_hour.setdefault(row[0], []).append(_result(row[1:]))
    return by_hour
