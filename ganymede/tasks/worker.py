"""Stages 1 and 2, per transaction: archive -> MySQL staging -> MongoDB; rerunnable (staging clears first,
loading upserts by `_id`). Bad data (DataError) isolates the transaction, not the hour (docs/operations.md)."""
import hashlib
import itertools
import json
import os
import tarfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing

import luigi

from ganymede_agent.archive import ArchiveError

from .. import archives, config, datasets, hours, markers
from ..datasets import RangeError, RowError
from ..errors import DataError, GanymedeError
from ..stores import mongo, mysql, staging, txlog
from .agent import AgentArchive, TransactionTask, state_root, unless_complete


def staging_rows(dataset, rows, hour, name):
    """A CSV member's rows, header first -> `[record, value, …]`; a bad header or row is a DataError."""
    record = 0
    try:
        header = next(rows, None)
        if header is None:
            raise RowError("empty file: no header row")
        dataset.check_header(header)
        for record, values in enumerate(rows, 1):
            if not dataset.fits_staging(values):
                dataset.parse_row(values, hour)  # raises: what does not fit never parses
            yield [record, *values]
    except RowError as exc:
        raise DataError(f"{name}: {f'record {record}: ' if record else ''}{exc}") from None


def stage_archive(conn, archive_path, transaction_id, hour, work_path):
    """An archive's datasets into staging, each rewritten at `work_path` as CSV by the reader the API validated
    it with (MySQL never reads the agent's bytes); returns (manifest, {dataset: rows staged})."""
    clear_staging(conn, transaction_id)
    os.makedirs(os.path.dirname(work_path), exist_ok=True)
    counts, manifest = {}, None
    try:
        with open(archive_path, "rb") as raw:
            for name, entry, member in archives.read_archive(raw):
                if member is None:
                    manifest = entry
                    continue
                dataset = datasets.get(name)
                with open(work_path, "w", encoding="utf-8", newline="") as out:
                    rows = archives.csv_rows(member, name=entry["file"])
                    staging.write_csv(out, staging_rows(dataset, rows, hour, entry["file"]))
                member.verify()
                counts[name] = staging.load_csv(conn, dataset, work_path, transaction_id)
                if counts[name] != entry["rows"]:
                    raise DataError(f"{entry['file']}: {counts[name]} rows, the manifest says {entry['rows']}")
    except (ArchiveError, RowError, tarfile.TarError, EOFError, zlib.error) as exc:  # the last: a damaged member
        raise DataError(f"the archive does not read back: {exc}") from None
    finally:
        if os.path.exists(work_path):
            os.unlink(work_path)
    return manifest, counts


def isolate(conn, archive, reason):
    """Set a transaction with bad data aside: staging emptied, archive quarantined, the log's state failed."""
    reason = reason[:2000]  # a bad header is quoted in it, and a line may be long
    clear_staging(conn, archive.transaction_id)
    held = archive.quarantine_path()
    # the archive moves before the log changes: the other order, cut by a crash, could leave a failed
    # transaction's archive in upload/, holding the hour's backup
    if archive.path() != held:
        archives.quarantine(archive.path(), held, reason, {"transaction_id": archive.transaction_id,
                                                           "agent_id": archive.agent_id, "by": "worker"})
    txlog.mark_isolated(conn, archive.transaction_id, reason, {"quarantine": held})
    return {"isolated": reason, "quarantine": held}


def parse_batch(dataset, batch, hour):
    """Staged rows `[record, value, …]` -> (typed rows, rejects); a bad row is a reject with its reason, and
    `"range": true` when a well-formed value was out of range (what the value_ranges quality check counts)."""
    rows, rejects = [], []
    for staged in batch:
        try:
            rows.append(dataset.parse_row(staged[1:], hour))
        except RowError as exc:
            rejects.append({"dataset": dataset.name, "reason": str(exc), "row": staged[1:], "record": int(staged[0]),
                            **({"range": True} if isinstance(exc, RangeError) else {})})
    return rows, rejects


def summarized(dataset, docs):
    """Documents in group order -> the same with their group's summary fields, one group held at a time
    (by `_id`: a key repeated in the transaction is one document, the last row winning)."""
    for _, group in itertools.groupby(docs, dataset.group_of):
        yield from dataset.with_summary(list({doc["_id"]: doc for doc in group}.values()))


def unique_batches(docs, size):
    """Lists of at most `size` documents, each `_id` once per list (the later row wins); written one after the
    other, so the end state never depends on the order a server applies an unordered bulk write in."""
    batch = {}
    for doc in docs:
        batch[doc["_id"]] = doc
        if len(batch) >= size:
            yield list(batch.values())
            batch = {}
    if batch:
        yield list(batch.values())


def staged_documents(conn, dataset, staged, hour, batch_size, tally, rejects_out):
    """The staged rows of one dataset as documents, streamed; rejects to `rejects_out`, counts to `tally`."""
    for batch in staging.iter_batches(conn, dataset, staged["transaction_id"], batch_size):
        rows, rejects = parse_batch(dataset, batch, hour)
        for reject in rejects:
            rejects_out.write(json.dumps(reject, sort_keys=True) + "\n")
        tally["loaded"] += len(rows)
        tally["rejected"] += len(rejects)
        yield from dataset.documents(rows, staged["agent_id"], staged["geo"], hour, staged["transaction_id"])


def write_batch(db, dataset, agent_id, hour, docs):
    """Add the previous-hour fields (one `_id $in` read of the hour before), then upsert the batch."""
    collection = db[dataset.name]
    if dataset.previous_fields:
        ids = [dataset.previous_id(agent_id, hour, doc) for doc in docs]
        dataset.with_previous(docs, ids, mongo.find_by_ids(collection, ids, dataset.previous_fields))
    return mongo.replace_many(collection, docs)


def load_staged(conn, db, staged, hour, batch_size, rejects_out):
    """A transaction's staged rows into MongoDB, one thread writing each batch while this one transforms the
    next; staging is cleared once every row is read, while the last write finishes (a crash then restages)."""
    counts, pending = {}, None
    hour = hours.floor_hour(hour)
    with ThreadPoolExecutor(1, thread_name_prefix="mongo-write") as writer:
        for dataset in datasets.CATALOG.values():
            tally = counts[dataset.name] = {"loaded": 0, "rejected": 0}
            docs = staged_documents(conn, dataset, staged, hour, batch_size, tally, rejects_out)
            if dataset.group_by:
                docs = summarized(dataset, docs)
            for batch in unique_batches(docs, batch_size):
                if pending:
                    pending.result()
                pending = writer.submit(write_batch, db, dataset, staged["agent_id"], hour, batch)
        clear_staging(conn, staged["transaction_id"])
        if pending:
            pending.result()
    return counts


def clear_staging(conn, transaction_id):
    staging.clear(conn, datasets.CATALOG.values(), transaction_id)


def retire_replaced(db, tx):
    """After a replacement loads, nothing of an older transaction for the same agent and hour remains."""
    return mongo.delete_agent_hour(db, datasets.CATALOG, tx["hour"], tx["agent_id"], tx["transaction_id"], keep=True)


def finish_load(conn, db, tx, counts):
    """A replacement retires what it supersedes (only a replacement can find any); then the `loaded` event."""
    retired = retire_replaced(db, tx) if tx["supersedes"] else {}
    txlog.append_event_once(conn, tx["transaction_id"], "loaded", {"counts": counts, "retired": retired})
    return {"counts": counts, "retired": retired}


def load_transaction(conn, db, staged, archive_path, work_path, batch_size, rejects_out):
    """The load of one staged transaction; returns what its marker records. Only a completed transaction
    loads: a superseded one's documents would overwrite its replacement's (a manual rerun of the old id)."""
    transaction_id = staged["transaction_id"]
    tx = txlog.get_transaction(conn, transaction_id)
    if tx is None:
        raise GanymedeError(f"no transaction {transaction_id} in the transaction log")
    if tx["state"] != "completed":
        counts = {name: {"loaded": 0, "rejected": 0} for name in datasets.CATALOG}
        clear_staging(conn, transaction_id)
        txlog.append_event_once(conn, transaction_id, "loaded", {"counts": counts, "skipped": tx["state"]})
        return {"counts": counts, "retired": {}, "skipped": tx["state"]}
    found = staging.counts(conn, datasets.CATALOG.values(), transaction_id)
    if sum(found.values()) != sum(staged["staged"].values()):  # a load crashed after clearing staging: restage
        stage_archive(conn, archive_path, transaction_id, tx["hour"], work_path)
    counts = load_staged(conn, db, staged, tx["hour"], batch_size, rejects_out)
    return finish_load(conn, db, tx, counts)


def load_resource(agent_id, hour):
    """The luigid resource (capacity 1) of an agent's hour: a replacement's load waits for its predecessor's."""
    return f"ganymede-load:{agent_id}:{hours.compact(hour)}"


class StageTransaction(TransactionTask):
    """The archive's rows in MySQL staging, tagged with the transaction; or the transaction isolated."""

    def output(self):
        return self.marker("staged")

    def requires(self):
        return self.clone(AgentArchive)

    @unless_complete
    def run(self):
        archive = self.requires()
        with closing(mysql.connect(config.mysql())) as conn:
            try:
                manifest, counts = stage_archive(conn, archive.path(), self.transaction_id, self.hour,
                                                 self.work_path())
            except DataError as exc:
                result = isolate(conn, archive, str(exc))
            else:
                txlog.append_event_once(conn, self.transaction_id, "staged", {"rows": counts})
                result = {"geo": manifest["geo"], "staged": counts}
        markers.write_json(self.output().path, dict(result, transaction_id=self.transaction_id,
                                                    agent_id=self.agent_id, hour=hours.format_hour(self.hour)))


class LoadTransaction(TransactionTask):
    """The transaction's documents in MongoDB, one collection per dataset; rejects beside the marker."""

    @property
    def resources(self):
        return {load_resource(self.agent_id, self.hour): 1}

    def output(self):
        return self.marker("loaded")

    def requires(self):
        return self.clone(StageTransaction)

    @unless_complete
    def run(self):
        stage = self.requires()  # built once: a task instance costs about a millisecond, a tiny load ~20
        staged = markers.read_json(stage.output().path)
        if "isolated" in staged:
            result = {k: staged[k] for k in ("isolated", "quarantine")}
        else:
            result = self.load(staged, stage.requires())
        markers.write_json(self.output().path, dict(result, transaction_id=self.transaction_id,
                                                    agent_id=self.agent_id))

    def load(self, staged, archive):
        mongo_cfg = config.mongodb()
        client, db = mongo.connect(mongo_cfg)
        with closing(client), closing(mysql.connect(config.mysql())) as conn:
            try:
                with markers.open_atomic(self.rejects_path(), text=True) as rejects:
                    result = load_transaction(conn, db, staged, archive.path(), self.work_path(),
                                              mongo_cfg.batch_size, rejects)
            except DataError as exc:  # restaging what a crash cleared can meet it too
                return isolate(conn, archive, str(exc))
        return dict(result, rejects_file=os.path.basename(self.rejects_path()))

    def rejects_path(self):
        return rejects_path(self.root, self.hour, self.agent_id, self.transaction_id)


def rejects_path(root, hour, agent_id, transaction_id):
    return root.transaction_marker(hour, agent_id, transaction_id, "rejects")[: -len(".json")] + ".jsonl"


def batches(transactions, count):
    """`transactions` (log rows) -> about `count` lists of (agent, transaction), whole agents in each, an
    agent's oldest first: they load one after the other, as one LoadTransaction resource would make them."""
    rows = sorted(transactions, key=lambda t: (t["agent_id"], t["completed_at"], t["transaction_id"]))
    size, out = -(-len(rows) // max(count, 1)), []
    for _, agents_rows in itertools.groupby(rows, key=lambda t: t["agent_id"]):
        if not out or len(out[-1]) >= size:
            out.append([])
        out[-1].extend((t["agent_id"], t["transaction_id"]) for t in agents_rows)
    return out


def run_in_turn(task):
    """Run a task inside another one as a Luigi worker would, with its events (metrics, failure marker)."""
    if task.complete():
        return
    task.trigger_event(luigi.Event.START, task)
    started = time.time()
    try:
        task.run()
    except Exception as exc:
        task.trigger_event(luigi.Event.FAILURE, task, exc)
        raise
    task.trigger_event(luigi.Event.PROCESSING_TIME, task, time.time() - started)
    task.trigger_event(luigi.Event.SUCCESS, task)


class LoadBatch(luigi.Task):
    """Transactions staged and loaded in turn by their own tasks (docs/scaling.md); the archives are not
    dependencies: a completed transaction's archive is in place before the log says completed."""
    hour = luigi.DateHourParameter(description="The transactions' UTC hour")
    members = luigi.Parameter(description="First and last agent, how many transactions, digest of the list")
    transactions = luigi.ListParameter(visibility=luigi.parameter.ParameterVisibility.HIDDEN,
                                       description="[agent, transaction] pairs in the order they load")

    @classmethod
    def of(cls, hour, pairs):
        digest = hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:12]
        return cls(hour=hour, members=f"{pairs[0][0]}..{pairs[-1][0]} x{len(pairs)} #{digest}",
                   transactions=[list(p) for p in pairs])

    @property
    def resources(self):
        return {load_resource(agent, self.hour): 1 for agent, _ in self.transactions}

    def output(self):
        """The members' load markers, named without building their tasks: Luigi keeps every task instance it
        builds, and the scheduling process of a 10,000-transaction hour would hold 10,000 more."""
        root = state_root()
        return [markers.DurableTarget(root.transaction_marker(self.hour, agent, tx, "loaded"))
                for agent, tx in self.transactions]

    def run(self):
        failed = []
        for agent, tx in self.transactions:
            load = LoadTransaction(transaction_id=tx, hour=self.hour, agent_id=agent)
            try:
                run_in_turn(load.requires())
                run_in_turn(load)
            except Exception as exc:  # the batch's other transactions still load; the task fails below
                failed.append(f"{tx}: {type(exc).__name__}: {exc}")
        if failed:
            raise GanymedeError(f"{len(failed)} of {len(self.transactions)} transactions failed: "
                                + "; ".join(failed)[:2000])


def load_tasks(hour, transactions):
    """The tasks that load `transactions` (log rows): one LoadTransaction each, or LoadBatch tasks past the limit."""
    limit = config.extract().load_tasks
    if len(transactions) <= limit:
        return [LoadTransaction(transaction_id=t["transaction_id"], hour=hour, agent_id=t["agent_id"])
                for t in transactions]
    return [LoadBatch.of(hour, pairs) for pairs in batches(transactions, limit)]
