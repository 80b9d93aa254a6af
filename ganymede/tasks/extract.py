"""Stage 3: the hour's Glassbeam extract, once every expected agent is loaded or the deadline passed. Round 0
holds what completed by then; a late arrival goes into a supplementary round (no row in two files of an hour).

Luigi calls requires() when it schedules a task and again just before run(), and fails the task if the second
answer holds something not done: requires() names only what cannot change in between (round 0's on-time loads,
the deadline, the previous round); what completes meanwhile is loaded by dynamic dependencies of run()."""
import glob
import gzip
import hashlib
import io
import json
import os
from collections import Counter
from contextlib import closing
from datetime import datetime, timedelta
from functools import cached_property
from typing import NamedTuple

import luigi

from .. import config, datasets, hours, markers, quality
from ..delivery import deliver
from ..errors import GanymedeError, QualityError
from ..stores import mongo, mysql, txlog
from ..stores import quality as quality_store
from .agent import state_root, unless_complete
from .worker import LoadTransaction, load_tasks, rejects_path


def _json_default(value):
    if isinstance(value, datetime):
        return hours.utc(value).isoformat(timespec="seconds") + "Z"
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# Canonical JSON: sorted keys, no spaces, datetimes as UTC "…Z" to the second.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=_json_default)


def extract_lines(db, hour, transaction_ids, select_in_query=True):
    """(dataset, document, line) of the given transactions, datasets by name, documents by `_id`. Round 0 reads
    the whole hour and drops strays here rather than send a large `$in`."""
    wanted = set(transaction_ids)
    for name in sorted(datasets.CATALOG):
        for doc in mongo.hour_documents(db[name], hour, transaction_ids if select_in_query else None):
            if doc["transaction_id"] in wanted:
                doc["dataset"] = name
                yield name, doc, _ENCODER.encode(doc)


class _HashingFile:
    def __init__(self, raw):
        self.raw, self.sha256, self.size = raw, hashlib.sha256(), 0

    def write(self, data):
        self.sha256.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def flush(self):
        self.raw.flush()


def write_extract(path, lines):
    """Stream JSON lines into a gzip file with a fixed header (no name, no time): same data, same bytes."""
    by_dataset, by_agent = dict.fromkeys(sorted(datasets.CATALOG), 0), Counter()
    with markers.open_atomic(path) as raw:
        sink = _HashingFile(raw)
        # lines reach gzip in 64 KiB blocks, not one zlib call each (the bytes do not depend on the size)
        with gzip.GzipFile(filename="", mode="wb", fileobj=sink, mtime=0, compresslevel=6) as gz, \
                io.BufferedWriter(gz, 1 << 16) as out:
            for name, doc, line in lines:
                out.write(line.encode("utf-8") + b"\n")
                by_dataset[name] += 1
                by_agent[doc["agent_id"]] += 1
    return sink.sha256.hexdigest(), sink.size, by_dataset, dict(sorted(by_agent.items()))


def round_manifests(hour):
    """{round: manifest} of every extract round of the hour on disk (a manifest names its round)."""
    manifests = (markers.read_json(path) for path in glob.glob(state_root().extract_manifests_glob(hour)))
    return {m["round"]: m for m in manifests}


def covered_transactions(manifests):
    """Transactions some round holds or has declared superseded."""
    return {tx for m in manifests for tx in m["transactions"] + m["superseded"]}


def pending_archives(hour):
    """{transaction id: agent id} of archives still in upload/ for the hour: one directory walk."""
    return {os.path.basename(p)[: -len(".tar.gz")]: os.path.basename(os.path.dirname(p))
            for p in glob.glob(state_root().hour_uploads_glob(hour))}


def current_round(hour, completed=None):
    """The round the hour needs now: the newest, or a new one when upload/ holds archives no round covers
    (with `completed`, the log's completed transaction ids: only archives of those)."""
    manifests = round_manifests(hour)
    if not manifests:
        return 0
    uncovered = pending_archives(hour).keys() - covered_transactions(manifests.values())
    if completed is not None:
        uncovered &= set(completed)
    return max(manifests) + (1 if uncovered else 0)


def hour_log(hour):
    """(agents expected for the hour, its completed and superseded transactions): one read of the log."""
    with closing(mysql.connect(config.mysql())) as conn:
        return txlog.expected_agents(conn, hour), txlog.hour_transactions(conn, hour, ("completed", "superseded"))


def round0_cutoff(expected, rows, deadline):
    """(cutoff, needs the deadline): when the last expected agent first completed (superseded or not), else
    the deadline (also for an hour nobody is expected for: whoever sends for it by then is in its extract)."""
    newest_first = sorted(rows, key=lambda t: t["completed_at"], reverse=True)
    first = {t["agent_id"]: t["completed_at"] for t in newest_first}  # each agent's oldest value stays
    if expected and first.keys() >= set(expected):
        last = max(first[a] for a in expected)
        if last <= deadline:
            return last, False
    return deadline, True


class RoundPlan(NamedTuple):
    transactions: list  # completed transactions no other round holds: what the round holds when it runs
    early: list  # of those, the ones round 0 requires (loaded while it waits): the same set at any later time
    needs_deadline: bool  # round 0 waits for ExtractTimeout
    waiting: list  # (agent, transaction) in upload/ not completed in the log: a supplementary round waits
    expected: list  # agents expected for the hour
    superseded: list  # the hour's superseded transactions


def plan_round(round_, expected, rows, others, pending, deadline):
    """What a round holds and waits for: `rows` are the hour's completed and superseded transactions, `others`
    the other rounds' manifests, `pending` {transaction: agent} in upload/."""
    covered = covered_transactions(others)
    superseded = sorted(t["transaction_id"] for t in rows if t["state"] == "superseded")
    free = [t for t in rows if t["state"] == "completed" and t["transaction_id"] not in covered]
    if round_ == 0:
        cutoff, needs_deadline = round0_cutoff(expected, rows, deadline)
        return RoundPlan(free, [t for t in free if t["completed_at"] <= cutoff], needs_deadline, [], expected,
                         superseded)
    known = {t["transaction_id"] for t in rows}
    waiting = [] if free else [(agent, tx) for tx, agent in sorted(pending.items())
                               if tx not in covered and tx not in known]
    return RoundPlan(free, [], False, waiting, expected, superseded)


def load_facts(root, hour, transactions):
    """{agent: {dataset: {"loaded", "rejected", "out_of_range"}}} from the load markers and rejects files."""
    facts = {}
    for t in transactions:
        agent = facts.setdefault(t["agent_id"], {n: {"loaded": 0, "rejected": 0, "out_of_range": 0}
                                                 for n in datasets.CATALOG})
        loaded = markers.read_json(root.transaction_marker(hour, t["agent_id"], t["transaction_id"], "loaded"))
        for name, counts in loaded.get("counts", {}).items():
            agent[name]["loaded"] += counts["loaded"]
            agent[name]["rejected"] += counts["rejected"]
        rejects = rejects_path(root, hour, t["agent_id"], t["transaction_id"])
        if os.path.exists(rejects):
            with open(rejects, encoding="utf-8") as lines:
                for reject in map(json.loads, lines):
                    agent[reject["dataset"]]["out_of_range"] += bool(reject.get("range"))
    return facts


def check_quality(conn, db, hour, round_, transactions, expected):
    """The round's quality results: each agent's checks per dataset, and in round 0 the expected agents that sent
    nothing (a later round says the agent arrived after all). Stored in MySQL; returned for the manifest."""
    facts = load_facts(state_root(), hour, transactions)
    agents = sorted(facts)
    trailing = max(d.quality.trailing_hours for d in datasets.CATALOG.values())
    history = quality_store.trailing_counts(conn, hour, trailing, agents)
    previous = hours.floor_hour(hour) - timedelta(hours=1)
    results = []
    for name, dataset in sorted(datasets.CATALOG.items()):
        key = dataset.quality.watch_key
        now = mongo.key_values(db[name], hour, key, agents) if key and agents else {}
        before = mongo.key_values(db[name], previous, key, agents) if key and agents else {}
        for agent in agents:
            counts = facts[agent][name]
            results += quality.evaluate(dataset, agent, counts, counts["out_of_range"],
                                        history.get((agent, name), [])[-dataset.quality.trailing_hours:],
                                        now.get(agent, ()), before.get(agent) or None)
    if round_ == 0:
        results += [quality.sent_nothing(a) for a in sorted(set(expected) - set(agents))]
    else:
        results += [quality.Result(a, quality.ALL_DATASETS, quality.SENT_NOTHING, True, 1,
                                   "a transaction for the hour", f"arrived after the deadline (round {round_})")
                    for a in agents if a in expected]
    quality_store.save_results(conn, hour, round_, results)
    return results


class ExtractDeadline(luigi.ExternalTask):
    """Done once the hour's deadline has passed: until then the extract waits (missing data, not failure)."""
    hour = luigi.DateHourParameter(description="The UTC hour")

    def complete(self):
        return hours.now() >= hours.deadline(self.hour, config.extract().deadline_minutes)


class ExtractTimeout(luigi.Task):
    """Written once the deadline has passed; records which expected agents had not completed when it was."""
    hour = luigi.DateHourParameter(description="The UTC hour")

    def output(self):
        return luigi.LocalTarget(state_root().hour_marker(self.hour, "timeout"))

    def requires(self):
        return ExtractDeadline(hour=self.hour)

    def run(self):
        expected, rows = hour_log(self.hour)
        markers.write_json(self.output().path, {
            "hour": hours.format_hour(self.hour), "written_at": hours.now(),
            "deadline": hours.deadline(self.hour, config.extract().deadline_minutes),
            "missing_agents": sorted(set(expected) - {t["agent_id"] for t in rows})})


class TransactionCompletion(luigi.ExternalTask):
    """An archive in upload/ the log does not list as completed yet (the API moves it, then marks it): never
    complete within a run, which ends with missing data; the next run reads the log again."""
    hour = luigi.DateHourParameter(description="The transaction's UTC hour")
    agent_id = luigi.Parameter(description="The agent whose directory holds the archive")
    transaction_id = luigi.Parameter(description="Transaction UUID (the archive's name)")

    def complete(self):
        return False


class GlassbeamExtract(luigi.Task):
    """One gzip'd JSON Lines file per hour and round, with a manifest, delivered to the outbox (and HTTPS)."""
    hour = luigi.DateHourParameter(description="The UTC hour")
    round = luigi.IntParameter(default=0, description="0: the hour's extract; N>0: the Nth supplementary extract")

    def output(self):
        return luigi.LocalTarget(state_root().extract_manifest(self.hour, self.round))

    def requires(self):
        plan = self.scheduled_plan
        if self.round == 0:
            timeout = [ExtractTimeout(hour=self.hour)] if plan.needs_deadline else []
            return load_tasks(self.hour, plan.early) + timeout
        return [GlassbeamExtract(hour=self.hour, round=self.round - 1)] + [
            TransactionCompletion(hour=self.hour, agent_id=agent, transaction_id=tx) for agent, tx in plan.waiting]

    def plan(self):
        expected, rows = hour_log(self.hour)
        others = [m for r, m in round_manifests(self.hour).items() if r != self.round]
        return plan_round(self.round, expected, rows, others, pending_archives(self.hour) if self.round else {},
                          hours.deadline(self.hour, config.extract().deadline_minutes))

    scheduled_plan = cached_property(plan)  # requires()'s: read once per task instance, however often Luigi asks

    @unless_complete
    def run(self):
        plan = self.plan()
        # dynamic: the ones not loaded yet are loaded (only those go back to the scheduler), then run() again
        yield load_tasks(self.hour, [t for t in plan.transactions if not LoadTransaction(
            transaction_id=t["transaction_id"], hour=self.hour, agent_id=t["agent_id"]).complete()])
        client, db = mongo.connect(config.mongodb())
        with closing(client):
            with closing(mysql.connect(config.mysql())) as conn:
                # a load may have isolated its transaction meanwhile
                states = txlog.states(conn, [t["transaction_id"] for t in plan.transactions])
                transactions = [t for t in plan.transactions if states.get(t["transaction_id"]) != "failed"]
                if self.round and not transactions:
                    raise GanymedeError(f"extract round {self.round} of {hours.format_hour(self.hour)}: no completed "
                                        "transaction that another round does not hold; an empty supplementary is "
                                        "not written")
                results = check_quality(conn, db, self.hour, self.round, transactions, plan.expected)
            blocking = [r.line() for r in quality.failed(results) if r.blocking]
            if blocking:
                raise QualityError(f"{hours.format_hour(self.hour)}: blocking quality check failed: "
                                   f"{'; '.join(blocking)}")
            tx_ids = sorted(t["transaction_id"] for t in transactions)
            path = state_root().extract(self.hour, self.round)
            lines = extract_lines(db, self.hour, tx_ids, select_in_query=self.round > 0)
            sha256, size, by_dataset, by_agent = write_extract(path, lines)
        cfg = config.extract()
        # an hour without agent data sends the vendor nothing (status: no data), unless the contract wants a file
        outbox = cfg.outbox or os.path.join(state_root().root, "outbox")
        delivery = deliver(path, sha256, self.hour, self.round, cfg, outbox) if tx_ids or cfg.deliver_empty else None
        markers.write_json(self.output().path, {
            "hour": hours.format_hour(self.hour), "round": self.round, "file": os.path.basename(path),
            "sha256": sha256, "bytes": size, "counts": by_dataset, "agents": by_agent,
            "transactions": tx_ids, "superseded": sorted(set(plan.superseded) - set(tx_ids)),
            "missing_agents": sorted(set(plan.expected) - {t["agent_id"] for t in transactions}) if self.round == 0
            else [],
            "completed_by": max((t["completed_at"] for t in transactions), default=None),
            "after_deadline": hours.now() >= hours.deadline(self.hour, cfg.deadline_minutes),
            "delivered_to": delivery and delivery["outbox"], "delivery": delivery,
            "quality": [r.as_dict() for r in results],
        })
