"""Where each hour stands, from the markers on disk and two queries of the transaction log.

One line per hour: expected and arrived agents, staged, loaded, extract,
backup, and a verdict (closed, waiting, open, overdue, failed, idle). The CLI
prints it; the API renders the same rows as a grid.
"""
import glob
import os
from dataclasses import dataclass, field
from datetime import timedelta

from . import hours, markers


@dataclass
class HourStatus:
    hour: object
    expected: list
    arrived: list
    transactions: int = 0
    staged: int = 0
    loaded: int = 0
    extract: str = "waiting"
    supplementary: int = 0
    missing_agents: list = field(default_factory=list)
    backup: str = "pending"
    failures: list = field(default_factory=list)
    verdict: str = "waiting"

    def line(self):
        extract = self.extract + (f" +{self.supplementary} suppl." if self.supplementary else "")
        failed = f"  FAILED: {', '.join(self.failures)}" if self.failures else ""
        return (f"{hours.format_hour(self.hour)}  {self.verdict:<8} agents {len(self.arrived)}/{len(self.expected)}"
                f"  staged {self.staged}/{self.transactions}  loaded {self.loaded}/{self.transactions}"
                f"  extract {extract:<22} backup {self.backup}{failed}")


def expected_at(windows, hour):
    start, end = hours.window(hour)
    return sorted(a for a, created, revoked in windows if created < end and (revoked is None or revoked >= start))


def hour_status(root, hour, expected, transactions, now, deadline_minutes, overdue_minutes):
    """One hour's status from its transactions (dicts with transaction_id, agent_id, state) and its files."""
    live = [t for t in transactions if t["state"] in ("completed", "superseded")]
    status = HourStatus(hour, expected, sorted({t["agent_id"] for t in live if t["state"] == "completed"}),
                        transactions=len(live))
    for t in live:
        marker = lambda stage: root.transaction_marker(hour, t["agent_id"], t["transaction_id"], stage)  # noqa: E731
        status.staged += os.path.exists(marker("staged"))
        status.loaded += os.path.exists(marker("loaded"))
    rounds = glob.glob(root.extract_manifests_glob(hour))
    if os.path.exists(root.extract_manifest(hour, 0)):
        first = markers.read_json(root.extract_manifest(hour, 0))
        status.extract = "after deadline" if first.get("missing_agents") else "on time"
        status.missing_agents = first.get("missing_agents", [])
        status.supplementary = len(rounds) - 1
    pending = glob.glob(root.hour_uploads_glob(hour))
    if os.path.exists(root.hour_marker(hour, "backup")):
        status.backup = "done" if not pending else "reopened (late arrival)"
    status.failures = sorted(os.path.basename(p)[: -len(".json")].split("_")[0]
                             for p in glob.glob(root.failure_markers_glob(hour)))
    deadline = hours.deadline(hour, deadline_minutes)
    if status.backup == "done":
        status.verdict = "closed"
    elif not expected and not transactions and status.extract == "waiting":
        status.verdict = "idle"  # no agent was registered for this hour: nothing to wait for
    elif status.failures:
        status.verdict = "failed"
    elif now < deadline:
        status.verdict = "waiting"
    elif now >= deadline + timedelta(minutes=overdue_minutes):
        status.verdict = "overdue"
    else:
        status.verdict = "open"
    return status


def hours_status(conn, root, first, last, deadline_minutes, overdue_minutes, now=None):
    """Status of every hour first..last, newest first; two queries in all."""
    from .stores import txlog
    now = now or hours.now()
    windows = txlog.agent_windows(conn)
    by_hour = {}
    for t in txlog.transactions_between(conn, first, last):
        by_hour.setdefault(t["hour"], []).append(t)
    return [hour_status(root, h, expected_at(windows, h), by_hour.get(h, []), now, deadline_minutes, overdue_minutes)
            for h in reversed(list(hours.hours_between(first, last)))]
