"""Data-quality checks: the pure evaluation, and an hour where one agent sent a tenth of its usual rows."""
import os
import subprocess
import sys
from datetime import timedelta

import luigi
import pytest

from ganymede import datasets, hours, markers, quality, status
from ganymede.api import status_page
from ganymede.paths import StateRoot
from ganymede.stores import quality as quality_store
from ganymede.tasks import GlassbeamExtract
from conftest import completed_transaction, sample_rows

BIN = os.path.dirname(sys.executable)
ACCOUNTS, NODES = datasets.CATALOG["account_usage"], datasets.CATALOG["node_health"]


def by_check(results):
    return {r.check: r for r in results}


@pytest.mark.parametrize("rows, history, passed", [
    (100, [100, 90, 110], True),
    (10, [100, 90, 110], False),  # a tenth of the median
    (400, [100, 90, 110], False),  # more than three times
    (34, [100, 100], True),
    (10, [100], True),  # too little history to judge
])
def test_row_count_against_the_trailing_median(rows, history, passed):
    results = quality.evaluate(ACCOUNTS, "a", {"loaded": rows, "rejected": 0}, 0, history, (), None)
    assert by_check(results)["row_count"].passed is passed


def test_rejected_share_ranges_and_disappeared_keys():
    results = by_check(quality.evaluate(NODES, "a", {"loaded": 90, "rejected": 10}, 2, [], {"n1"}, {"n1", "n2"}))
    assert not results["rejected_share"].passed and results["rejected_share"].observed == 0.1
    assert not results["value_ranges"].passed and results["value_ranges"].observed == 2
    assert not results["keys_disappeared"].passed and results["keys_disappeared"].detail == "n2"
    assert results["row_count"].passed
    assert "keys_disappeared" not in by_check(quality.evaluate(ACCOUNTS, "a", {"loaded": 1, "rejected": 0}, 0, [],
                                                               (), None))


def test_a_failure_reads_as_agent_dataset_check_observed_expected():
    (result,) = [r for r in quality.evaluate(ACCOUNTS, "agent-b", {"loaded": 5, "rejected": 0}, 0, [50, 50], (),
                                             None) if not r.passed]
    assert result.line() == "agent-b account_usage row_count: observed 5, expected 16.6667..150 (median 50 of 2 " \
                            "hours, factor 3)"
    assert quality.sent_nothing("agent-c").line() == "agent-c * sent_nothing: observed 0, expected a transaction " \
                                                     "for the hour"


def test_range_rules_raise_range_errors():
    with pytest.raises(datasets.RangeError):
        NODES.parse_row(["n1", "2026-11-30T05:01:00", "10", "11", "0.1", "0"], hours.parse_hour("2026-11-30T05"))
    with pytest.raises(datasets.RowError) as info:
        NODES.parse_row(["n1", "2026-11-30T05:01:00", "x", "11", "0.1", "0"], hours.parse_hour("2026-11-30T05"))
    assert not isinstance(info.value, datasets.RangeError)


def test_an_agent_cut_to_a_tenth_raises_exactly_that_check_and_alert(genv, mongo_up):
    """Three ordinary hours of two agents, then an hour where agent-b sends 10% of its accounts."""
    last = hours.last_complete_hour() - timedelta(hours=6)
    history, hour = [last - timedelta(hours=h) for h in (3, 2, 1)], last
    for h in history + [hour]:
        for agent in ("agent-a", "agent-b"):
            rows = sample_rows(h, n=40, agent_tag=agent)
            if h == hour and agent == "agent-b":
                rows["account_usage"] = rows["account_usage"][:4]
            completed_transaction(genv, agent, h, rows=rows)
        assert luigi.build([GlassbeamExtract(hour=h)], local_scheduler=True)

    with genv.mysql() as conn:
        results = quality_store.hour_results(conn, hour)
        assert [h for h in history if quality.failed(quality_store.hour_results(conn, h))] == []
    failed = quality.failed(results)
    assert [(r.agent_id, r.dataset, r.check, r.observed) for r in failed] == [
        ("agent-b", "account_usage", "row_count", 4)]
    assert len(results) == 2 * 3 * 3 + 2  # 3 checks per agent and dataset, keys_disappeared on node_health
    manifest = markers.read_json(StateRoot(genv.root).extract_manifest(hour, 0))
    assert [r for r in manifest["quality"] if not r["passed"]] == [failed[0].as_dict()]

    alerts = subprocess.run([f"{BIN}/ganymede", "alerts", "--last", "10"], env=genv.subprocess_env,
                            capture_output=True, text=True)
    assert alerts.returncode == 3, alerts.stderr
    lines = [line for line in alerts.stdout.splitlines() if "quality FAILED" in line]
    assert lines == [f"  quality FAILED: {failed[0].line()}"]
    assert "observed 4, expected 13.3333..120 (median 40 of 3 hours, factor 3)" in lines[0]

    shown = subprocess.run([f"{BIN}/ganymede", "status", "--hour", hours.format_hour(hour)],
                           env=genv.subprocess_env, capture_output=True, text=True, check=True).stdout
    assert "quality 1 failed" in shown.splitlines()[0]
    assert sum(line.startswith("  quality ok:") for line in shown.splitlines()) == len(results) - 1
    with genv.mysql() as conn:
        (row,) = status.hours_status(conn, StateRoot(genv.root), hour, hour, 45, 60)
    page = status_page.render_hour(row, [], StateRoot(genv.root), "http://graph", checks=results)
    assert "Quality checks (1 failed of 20)" in page
    assert "<td>FAILED</td><td>agent-b</td><td>account_usage</td><td>row_count</td><td>4</td>" in page


def test_a_blocking_check_stops_the_extract_and_an_agent_that_sent_nothing_is_reported(genv, mongo_up,
                                                                                       monkeypatch):
    hour = hours.last_complete_hour() - timedelta(hours=6)
    rows = sample_rows(hour, n=10, agent_tag="a")
    rows["node_health"][0][3] = str(2 * 10 ** 12)  # disk used > total: out of range
    completed_transaction(genv, "agent-a", hour, rows=rows)
    completed_transaction(genv, "agent-z", hour - timedelta(hours=1))  # registered, expected, silent this hour
    blocking = datasets.Dataset(**{**{f: getattr(NODES, f) for f in NODES.__dataclass_fields__
                                      if f != "column_names"},
                                   "quality": datasets.Quality(watch_key="node_id", blocking=("value_ranges",))})
    monkeypatch.setitem(datasets.CATALOG, "node_health", blocking)
    assert not luigi.build([GlassbeamExtract(hour=hour)], local_scheduler=True)
    assert not os.path.exists(StateRoot(genv.root).extract_manifest(hour, 0))
    with genv.mysql() as conn:
        failed = quality.failed(quality_store.hour_results(conn, hour))
    assert [(r.agent_id, r.dataset, r.check, r.observed, r.blocking) for r in failed] == [
        ("agent-a", "node_health", "rejected_share", 0.1, False),
        ("agent-a", "node_health", "value_ranges", 1, True),
        ("agent-z", "*", "sent_nothing", 0, False)]
