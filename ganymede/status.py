"""Where each hour stands, from the markers on disk and two queries of the transaction log.

One line per hour: expected and arrived agents, staged, loaded, extract,
backup, and a verdict:

- `closed`: backed up, nothing pending;
- `no data`: done (extract and backup) but no agent sent anything, so nothing
  went to the vendor; it alerts when agents were expected;
- `waiting`: before the hour's deadline;
- `open`: past the deadline, not closed yet;
- `overdue`: not closed [alerts] overdue_minutes after the deadline (alerts);
- `failed`: a task of the hour failed (alerts; the reason is in `--hour H`);
- `idle`: no agent was expected and none sent anything: nothing to run.

A failed data-quality check (ganymede.quality) does not change the verdict:
the line says `quality N failed` and the hour alerts, one line per check.

`hour_detail` adds, for one hour, the failures with their reasons, the
expected and missing agents by name and every transaction with where its
archive is now. The CLI prints both; the API renders the same rows.
"""
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
    missing_agents: list = field(default_factory=list)
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

    def agents_text(self):
        text = f"{len(self.arrived_expected)}/{len(self.expected)}"
        return text + (f" +{len(self.unexpected)}" if self.unexpected else "")

    def extract_text(self):
        return self.extract + (f" +{self.supplementary} suppl." if self.supplementary else "")

    def line(self):
        failed = f"  FAILED: {', '.join(self.failures)}" if self.failures else ""
        bad_tx = f"  failed transactions: {len(self.failed_transactions)}" if self.failed_transactions else ""
        bad_quality = f"  quality {len(self.quality_failures)} failed" if self.quality_failures else ""
        return (f"{hours.format_hour(self.hour)}  {self.verdict:<8}  agents {self.agents_text():<7}"
                f"  staged {self.staged}/{self.transactions:<3}  loaded {self.loaded}/{self.transactions:<3}"
                f"  extract {self.extract_text():<24}  backup {self.backup}{failed}{bad_tx}{bad_quality}")

    def needs_attention(self):
        """What `ganymede alerts` reports: a failure, an overdue hour, expected agents that sent nothing, a failed
        quality check."""
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
    """One hour's status from its transactions (dicts with transaction_id, agent_id, state), its files and its
    failed quality checks."""
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
        status.missing_agents = first.get("missing_agents", [])
        # the agents the extract waited for, not those added later with an earlier --since
        status.expected = sorted(set(first.get("agents", {})) & set(expected) | set(status.missing_agents)) \
            if "agents" in first else status.expected
        if not first.get("transactions") and len(rounds) == 1:
            status.extract = "no data"
        else:
            status.extract = "after deadline" if status.missing_agents else "on time"
        status.supplementary = len(rounds) - 1
    status.unexpected = [a for a in arrived if a not in status.expected]
    ok = {t["agent_id"] for t in live}
    status.failed_transactions = [t for t in transactions if t["state"] == "failed" and t["agent_id"] not in ok]
    pending = glob.glob(root.hour_uploads_glob(hour))
    if os.path.exists(root.hour_marker(hour, "backup")):
        status.backup = "done" if not pending else "reopened (late arrival)"
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
    """Status of every hour first..last, newest first; three queries in all (one more per hour with a failed
    transaction, for its reason)."""
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


def archive_location(root, hour, transaction):
    """Where the transaction's archive is now (upload/, archives/ or quarantine/), or None."""
    try:
        candidates = [where(hour, transaction["agent_id"], transaction["transaction_id"])
                      for where in (root.upload, root.archived, root.quarantine)]
    except ValueError:  # an id that cannot name a path has no archive
        return None
    return next((p for p in candidates if os.path.exists(p)), None)


def hour_transactions(conn, root, hour):
    """Every transaction of the hour with its agent, state, reason (failed ones) and archive as found on disk."""
    from .stores import txlog
    rows = txlog.hour_transactions(conn, hour, ALL_STATES)
    for t in rows:
        t["location"] = archive_location(root, hour, t)
    return sorted(rows, key=lambda t: (t["agent_id"], t["created_at"]))


def graph_task_id(hour):
    """luigid's id of the hour's HourlyBackup (the graph's root), computed as Luigi names tasks."""
    return luigi.task.task_id_str("HourlyBackup", {"hour": hours.format_hour(hour)})


def graph_url(scheduler_url, hour):
    """The hour's dependency graph in luigid's visualiser."""
    return f"{scheduler_url.rstrip('/')}/static/visualiser/index.html#tab=graph&taskId={graph_task_id(hour)}"


def transaction_line(root, t):
    where = os.path.relpath(t["location"], root.root) if t.get("location") else "(no archive)"
    reason = f"  {' '.join(str(t['error']).split())}" if t["state"] == "failed" and t.get("error") else ""
    return f"{t['transaction_id']}  {t['agent_id']:<20}  {t['state']:<10}  {where}{reason}"


def quality_lines(results):
    """One line per quality result: agent, dataset, check, observed vs expected."""
    return [f"  quality {'ok' if r.passed else 'FAILED'}: {r.line()}" for r in results]


def hour_detail(row, transactions, root, graph=None, quality=None):
    """The lines under an hour's status line: agents by name, failures with reasons, transactions, and the quality
    results given (default: the failed ones)."""
    lines = [f"  agents expected: {', '.join(row.expected) or '(none)'}",
             f"  agents missing:  {', '.join(a for a in row.expected if a not in row.arrived) or '(none)'}"]
    if row.unexpected:
        lines.append(f"  agents not expected that sent data: {', '.join(row.unexpected)}")
    lines += [f"  failed: {family}: {reason}" for family, reason in sorted(row.reasons.items())]
    lines += quality_lines(row.quality_failures if quality is None else quality)
    lines.append(f"  transactions ({len(transactions)}):")
    lines += [f"    {transaction_line(root, t)}" for t in transactions]
    if graph:
        lines.append(f"  graph: {graph}")
    return lines
