"""Where each hour stands (the verdicts of docs/operations.md), from the markers on disk and the transaction
log: the rows `ganymede status` prints and the status page renders."""
import glob
import os
from dataclasses import dataclass, field
from datetime import timedelta

import luigi.task

from . import hours, markers

VERDICTS = ("closed", "no data", "waiting", "open", "overdue", "failed", "idle")
ALL_STATES = ("created", "uploaded", "completed", "superseded", "failed")


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
    unexpected: list = field(default_factory=list)
    backup: str = "pending"
    failures: list = field(default_factory=list)
    reasons: dict = field(default_factory=dict)
    failed_transactions: list = field(default_factory=list)
    quality_failures: list = field(default_factory=list)
    verdict: str = "waiting"

    @property
    def arrived_expected(self):
        return [a for a in self.arrived if a in self.expected]

    @property
    def not_arrived(self):
        return [a for a in self.expected if a not in self.arrived]

    def agents_text(self):
        text = f"{len(self.arrived_expected)}/{len(self.expected)}"
        return text + (f" +{len(self.unexpected)}" if self.unexpected else "")

    def line(self):
        failed = f"  FAILED: {', '.join(self.failures)}" if self.failures else ""
        bad_tx = f"  failed transactions: {len(self.failed_transactions)}" if self.failed_transactions else ""
        bad_quality = f"  quality {len(self.quality_failures)} failed" if self.quality_failures else ""
        extract = self.extract + (f" +{self.supplementary} suppl." if self.supplementary else "")
        return (f"{hours.format_hour(self.hour)}  {self.verdict:<8}  agents {self.agents_text():<7}"
                f"  staged {self.staged}/{self.transactions:<3}  loaded {self.loaded}/{self.transactions:<3}"
                f"  extract {extract:<24}  backup {self.backup}{failed}{bad_tx}{bad_quality}")

    def needs_attention(self):  # what `ganymede alerts` reports (a failed quality check is not a verdict)
        return (self.verdict in ("overdue", "failed") or bool(self.failed_transactions) or bool(self.quality_failures)
                or (self.verdict == "no data" and bool(self.expected)))


def expected_at(windows, hour):
    start, end = hours.window(hour)
    return sorted(a for a, created, revoked in windows if created < end and (revoked is None or revoked >= start))


def failure_reasons(root, hour):
    """{task family: 'error (at …)'} from the hour's failure markers (a task's later success removes its own)."""
    reasons = {}
    for path in sorted(glob.glob(root.failure_markers_glob(hour))):
        family = os.path.basename(path)[: -len(".json")].split("_")[0]
        try:
            marker = markers.read_json(path)
        except (OSError, ValueError):
            reasons.setdefault(family, "(failure marker unreadable)")
            continue
        error = " ".join(str(marker.get("error", "")).split())
        reasons[family] = f"{error} (at {marker.get('at', '?')})"
    return reasons


def hour_status(root, hour, expected, transactions, now, deadline_minutes, overdue_minutes, quality_failures=()):
    """One hour's status from its transactions (dicts), its files and its failed quality checks."""
    live = [t for t in transactions if t["state"] in ("completed", "superseded")]
    arrived = sorted({t["agent_id"] for t in live if t["state"] == "completed"})
    status = HourStatus(hour, list(expected), arrived, transactions=len(live),
                        quality_failures=list(quality_failures))
    for t in live:
        marker = lambda stage: root.transaction_marker(hour, t["agent_id"], t["transaction_id"], stage)  # noqa: E731
        status.staged += os.path.exists(marker("staged"))
        status.loaded += os.path.exists(marker("loaded"))
    rounds = glob.glob(root.extract_manifests_glob(hour))
    if os.path.exists(root.extract_manifest(hour, 0)):
        first = markers.read_json(root.extract_manifest(hour, 0))
        missing = first.get("missing_agents", [])
        if "agents" in first:  # those the extract waited for, not those added later with an earlier --since
            status.expected = sorted(set(first["agents"]) & set(expected) | set(missing))
        if not first.get("transactions") and len(rounds) == 1:
            status.extract = "no data"
        else:
            status.extract = "after deadline" if missing else "on time"
        status.supplementary = len(rounds) - 1
    status.unexpected = [a for a in arrived if a not in status.expected]
    ok = {t["agent_id"] for t in live}
    status.failed_transactions = [t for t in transactions if t["state"] == "failed" and t["agent_id"] not in ok]
    if os.path.exists(root.hour_marker(hour, "backup")):
        status.backup = "reopened (late arrival)" if glob.glob(root.hour_uploads_glob(hour)) else "done"
    status.reasons = failure_reasons(root, hour)
    status.failures = sorted(status.reasons)
    deadline = hours.deadline(hour, deadline_minutes)
    if status.backup == "done":
        status.verdict = "no data" if status.extract == "no data" else "closed"
    elif not expected and not transactions and status.extract == "waiting":
        status.verdict = "idle"
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
    """Every hour first..last, newest first: three queries (and one per hour with a failed transaction)."""
    from .stores import quality, txlog
    now = now or hours.now()
    windows = txlog.agent_windows(conn)
    by_hour = {}
    for t in txlog.transactions_between(conn, first, last):
        by_hour.setdefault(t["hour"], []).append(t)
    for hour, rows in by_hour.items():
        if any(t["state"] == "failed" for t in rows):
            by_hour[hour] = txlog.hour_transactions(conn, hour, ALL_STATES)
    failed_checks = quality.failures_between(conn, first, last)
    return [hour_status(root, h, expected_at(windows, h), by_hour.get(h, []), now, deadline_minutes, overdue_minutes,
                        failed_checks.get(h, ()))
            for h in reversed(list(hours.hours_between(first, last)))]


def hour_transactions(conn, root, hour):
    """The hour's transactions, with where each archive is now (upload/, archives/, quarantine/ or None)."""
    from .stores import txlog
    rows = txlog.hour_transactions(conn, hour, ALL_STATES)
    for t in rows:
        places = (where(hour, t["agent_id"], t["transaction_id"]) for where in (root.upload, root.archived,
                                                                                  root.quarantine))
        try:
            t["location"] = next((p for p in places if os.path.exists(p)), None)
        except ValueError:  # an id that cannot name a path has no archive
            t["location"] = None
    return sorted(rows, key=lambda t: (t["agent_id"], t["created_at"]))


def graph_url(scheduler_url, hour):
    """The hour's dependency graph (its root, HourlyBackup, named as Luigi names tasks) in luigid's visualiser."""
    task_id = luigi.task.task_id_str("HourlyBackup", {"hour": hours.format_hour(hour)})
    return f"{scheduler_url.rstrip('/')}/static/visualiser/index.html#tab=graph&taskId={task_id}"


def transaction_line(root, t):
    where = os.path.relpath(t["location"], root.root) if t.get("location") else "(no archive)"
    reason = f"  {' '.join(str(t['error']).split())}" if t["state"] == "failed" and t.get("error") else ""
    return f"{t['transaction_id']}  {t['agent_id']:<20}  {t['state']:<10}  {where}{reason}"


def quality_lines(results):
    return [f"  quality {'ok' if r.passed else 'FAILED'}: {r.line()}" for r in results]

