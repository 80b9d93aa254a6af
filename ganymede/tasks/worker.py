"""Stages 1 and 2, per transaction: archive -> MySQL staging -> MongoDB.

StageTransaction replaces `ganymede_worker.sh TXID`, LoadTransaction
replaces `ganymede_worker_etl.py --transactionid=TXID`. Both can be rerun at
any point: staging clears the transaction's rows first, loading upserts
documents by deterministic `_id`, so a run killed anywhere and run again ends
exactly where an undisturbed run would.
"""
import json
import os
import shutil
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from datetime import timedelta
from functools import partial

from ganymede_agent.archive import ArchiveError

from .. import config, datasets, hours, markers
from ..archives import read_archive
from ..datasets import RowError
from ..errors import TransactionError
from ..stores import mongo, mysql, previous, staging, txlog
from .agent import AgentArchive, TransactionTask


# --- staging ---------------------------------------------------------------------

def stage_archive(conn, archive_path, transaction_id, workdir):
    """Load every dataset of an archive into staging; returns (manifest, {dataset: rows staged}).

    Each CSV member streams to a temporary file (LOAD DATA LOCAL needs a
    file), is checked against the manifest's sha256, then loaded in one
    commit per dataset.
    """
    os.makedirs(workdir, exist_ok=True)
    staging.clear(conn, datasets.CATALOG.values(), transaction_id)
    counts, manifest = {}, None
    with open(archive_path, "rb") as raw, tempfile.TemporaryDirectory(dir=workdir, prefix="stage-") as tmp:
        for name, entry, member in read_archive(raw):
            if member is None:
                manifest = entry
                continue
            path = os.path.join(tmp, entry["file"])
            with open(path, "wb") as out:
                shutil.copyfileobj(member, out, 1 << 20)
            member.verify()
            counts[name] = staging.load_csv(conn, datasets.get(name), path, transaction_id)
            os.unlink(path)
            if counts[name] != entry["rows"]:
                raise ArchiveError(f"transaction {transaction_id}: staged {counts[name]} rows, "
                                   f"manifest says {entry['rows']}", entry["file"])
    return manifest, counts


def restage_if_incomplete(conn, staged, archive_path, workdir):
    """A load that crashed after clearing staging finds fewer rows than were staged: stage them again.

    Returns the staged extents (staging.extents) the load reads.
    """
    transaction_id = staged["transaction_id"]
    found = staging.extents(conn, datasets.CATALOG.values(), transaction_id)
    if sum(n for _, _, n in found.values()) != sum(staged["staged"].values()):
        stage_archive(conn, archive_path, transaction_id, workdir)
        found = staging.extents(conn, datasets.CATALOG.values(), transaction_id)
    return found


# --- transform -------------------------------------------------------------------

def parse_batch(dataset, batch, hour, first_row_id=None, with_previous=False):
    """Staged rows `[row_id, value, …]` -> (typed rows, rejects, previous); a bad row is a reject with its reason.

    With `with_previous` each staged row ends with its key's previous-hour
    values (see staging.iter_batches) and `previous` lists them, decoded, in
    the order of `rows`; otherwise it is None.
    """
    rows, rejects, known = [], [], [] if with_previous else None
    parse, n = dataset.parse_row, len(dataset.columns)
    width = n + 1 + with_previous
    for staged in batch:
        try:
            if len(staged) != width:
                raise RowError(f"a value holds the control character U+001F ({len(staged) - width + n} fields, "
                               f"expected {n})")
            rows.append(parse(staged[1:n + 1], hour))
        except RowError as exc:
            rejects.append({"dataset": dataset.name, "reason": str(exc), "row": staged[1:n + 1],
                            "record": int(staged[0]) - first_row_id + 1 if first_row_id is not None else None})
            continue
        if with_previous:
            known.append(previous.decode(staged[-1]))
    return rows, rejects, known


def summarized(dataset, docs):
    """Documents in group order -> the same documents with their group's summary fields.

    One group is held at a time (a dict by `_id`, so a key repeated inside
    the transaction is one document, the last row winning): memory is bounded
    by the largest group, not by the transaction.
    """
    group, members = None, {}
    for doc in docs:
        key = dataset.group_of(doc)
        if key != group:
            yield from dataset.with_summary(list(members.values()))
            group, members = key, {}
        members[doc["_id"]] = doc
    yield from dataset.with_summary(list(members.values()))


def unique_batches(docs, size):
    """Lists of at most `size` documents, each `_id` once per list (the later row wins).

    Batches are written one after the other, so a key repeated across
    batches also ends as its last row: the end state never depends on the
    order a server applies an unordered bulk write in.
    """
    batch = {}
    for doc in docs:
        batch[doc["_id"]] = doc
        if len(batch) >= size:
            yield list(batch.values())
            batch = {}
    if batch:
        yield list(batch.values())


# --- loading ---------------------------------------------------------------------

def staged_documents(conn, dataset, transaction_id, agent_id, geo, hour, batch_size, tally, rejects_out,
                     first=None, previous_of=None):
    """The documents of a transaction's staged rows of one dataset, streamed.

    With `previous_of` (agent_id, previous hour) the previous-hour fields come
    from MySQL with the rows; without, the dataset's previous-hour fields are
    still to add. Rejects go to `rejects_out` as JSON lines; `tally` counts
    loaded and rejected rows; `first` is the first row's row_id when
    rows are numbered without gaps (rejects then say their CSV record).
    """
    for batch in staging.iter_batches(conn, dataset, transaction_id, batch_size, previous_of):
        rows, rejects, known = parse_batch(dataset, batch, hour, first, with_previous=previous_of is not None)
        for reject in rejects:
            rejects_out.write(json.dumps(reject, sort_keys=True) + "\n")
        tally["loaded"] += len(rows)
        tally["rejected"] += len(rejects)
        docs = dataset.documents(rows, agent_id, geo, hour, transaction_id)
        yield from (docs if known is None else dataset.with_previous_values(docs, known))


def write_batch(db, agent_id, hour, keep, dataset, docs, lookup):
    """Upsert a batch; for a dataset with previous-hour fields, then hand it to `keep` (returns what keep does).

    With `lookup` the previous-hour fields are first added from MongoDB
    (one `_id $in` query): the previous hour was not in MySQL's cache.
    """
    collection = db[dataset.name]
    if dataset.previous_fields and lookup:
        ids = [dataset.previous_id(agent_id, hour, doc) for doc in docs]
        found = {d["_id"]: d for d in collection.find({"_id": {"$in": ids}}, dict.fromkeys(dataset.previous_fields, 1),
                                                      batch_size=len(ids))}
        dataset.with_previous(docs, ids, found)
    mongo.replace_many(collection, docs)
    return keep(dataset, docs) if dataset.previous_fields else None


def settle(written, kept, limit):
    """Wait for the oldest MongoDB writes until at most `limit` are pending, then the same for the MySQL keeps
    they handed over: batches in flight stay bounded, and all done with limit 0."""
    while len(written) > limit:
        keeping = written.popleft().result()
        if keeping is not None:
            kept.append(keeping)
    while len(kept) > limit:
        kept.popleft().result()


def load_staged(conn, cache_conn, db, transaction_id, agent_id, geo, hour, batch_size, rejects_out, extents):
    """Transform a transaction's staged rows into MongoDB; rejects go to `rejects_out` as JSON lines.

    One thread writes the batches to MongoDB, strictly one after the other,
    while this one reads and transforms the next; a third keeps each written
    batch's previous-hour values in MySQL (on `cache_conn`) for the next
    hour, after MongoDB has the batch. Previous-hour fields come from MySQL
    with the staged rows when it holds the previous hour, else from MongoDB.
    Staging is cleared once every row is read, while the last writes finish
    (a crash from then on restages: see `restage_if_incomplete`, which gives
    the `extents`). Returns {dataset: {"loaded": n, "rejected": m}}.
    """
    counts, written, kept = {}, deque(), deque()
    hour = hours.floor_hour(hour)
    previous_hour = hour - timedelta(hours=1)
    with ThreadPoolExecutor(1, thread_name_prefix="mongo-write") as writer, \
            ThreadPoolExecutor(1, thread_name_prefix="mysql-keep") as keeper:
        def keep(dataset, docs):
            return keeper.submit(previous.store, cache_conn, dataset, agent_id, hour, transaction_id, docs)
        write = partial(write_batch, db, agent_id, hour, keep)
        for dataset in datasets.CATALOG.values():
            tally = counts[dataset.name] = {"loaded": 0, "rejected": 0}
            cached = bool(dataset.previous_fields) and previous.has_hour(conn, dataset, agent_id, previous_hour)
            docs = staged_documents(conn, dataset, transaction_id, agent_id, geo, hour, batch_size, tally,
                                    rejects_out, staging.first_row_id(extents[dataset.name]),
                                    (agent_id, previous_hour) if cached else None)
            if dataset.group_by:
                docs = summarized(dataset, docs)
            for batch in unique_batches(docs, batch_size):
                settle(written, kept, 1)
                written.append(writer.submit(write, dataset, batch, lookup=not cached))
        clear_staging(conn, transaction_id)
        settle(written, kept, 0)
    return counts


def clear_staging(conn, transaction_id):
    staging.clear(conn, datasets.CATALOG.values(), transaction_id)


def retire_replaced(db, agent_id, hour, transaction_id):
    """After a replacement loads, nothing of an older transaction for the same agent and hour remains."""
    return {name: db[name].delete_many({"hour": hour, "agent_id": agent_id,
                                        "transaction_id": {"$ne": transaction_id}}).deleted_count
            for name in datasets.CATALOG}


def finish_load(conn, db, tx, counts):
    """A replacement retires what it supersedes (documents and kept values); old kept values go; then `loaded`.

    Only a replacement can find documents of another transaction for its
    agent and hour (a first transaction has nothing to retire), so only a
    replacement pays for the query.
    """
    retired = {}
    if tx["supersedes"]:
        retired = retire_replaced(db, tx["agent_id"], tx["hour"], tx["transaction_id"])
        previous.retire(conn, tx["agent_id"], tx["hour"], tx["transaction_id"])
    previous.prune(conn, tx["agent_id"], tx["hour"])
    txlog.append_event(conn, tx["transaction_id"], "loaded", {"counts": counts, "retired": retired})
    return {"transaction_id": tx["transaction_id"], "agent_id": tx["agent_id"], "counts": counts, "retired": retired}


def load_transaction(conn, cache_conn, db, staged, archive_path, workdir, batch_size, rejects_out):
    """The whole load of one staged transaction; returns what its marker records.

    Only a completed transaction loads: a superseded one's documents would
    overwrite its replacement's (say, a manual `ganymede-worker-etl` of the
    old transaction id).
    """
    transaction_id, agent_id = staged["transaction_id"], staged["agent_id"]
    tx = txlog.get_transaction(conn, transaction_id)
    if tx is None:
        raise TransactionError(f"no transaction {transaction_id} in the transaction log", 404, transaction_id)
    if tx["state"] != "completed":
        counts = {name: {"loaded": 0, "rejected": 0} for name in datasets.CATALOG}
        clear_staging(conn, transaction_id)
        txlog.append_event(conn, transaction_id, "loaded", {"counts": counts, "skipped": tx["state"]})
        return {"transaction_id": transaction_id, "agent_id": agent_id, "counts": counts, "retired": {},
                "skipped": tx["state"]}
    extents = restage_if_incomplete(conn, staged, archive_path, workdir)
    counts = load_staged(conn, cache_conn, db, transaction_id, agent_id, staged["geo"], tx["hour"], batch_size,
                         rejects_out, extents)
    return finish_load(conn, db, tx, counts)


# --- tasks ---------------------------------------------------------------------

class StageTransaction(TransactionTask):
    """The archive's rows in MySQL staging, tagged with the transaction."""

    def output(self):
        return self.marker("staged")

    def requires(self):
        return AgentArchive(**self.tx_params())

    def run(self):
        with closing(mysql.connect(config.mysql())) as conn:
            manifest, counts = stage_archive(conn, self.requires().path(), self.transaction_id, self.root.tmp())
            txlog.append_event(conn, self.transaction_id, "staged", {"rows": counts})
        markers.write_json(self.output().path, {"transaction_id": self.transaction_id, "agent_id": self.agent_id,
                                                "geo": manifest["geo"], "hour": manifest["hour"], "staged": counts})


class LoadTransaction(TransactionTask):
    """The transaction's documents in MongoDB, one collection per dataset; rejects beside the marker.

    Loads of one agent and hour never run at once under one scheduler
    (luigid in production): a resource of capacity 1, so a replacement
    cannot interleave its writes with those of the transaction it replaces.
    """

    @property
    def resources(self):
        return {f"ganymede-load:{self.agent_id}:{hours.compact(self.hour)}": 1}

    def output(self):
        return self.marker("loaded")

    def requires(self):
        return StageTransaction(**self.tx_params())

    def run(self):
        stage = self.requires()  # built once: a task instance costs about a millisecond, a tiny load ~20
        staged, mongo_cfg, mysql_cfg = markers.read_json(stage.output().path), config.mongodb(), config.mysql()
        client, db = mongo.connect(mongo_cfg)
        with closing(client), closing(mysql.connect(mysql_cfg)) as conn, \
                closing(mysql.connect(mysql_cfg)) as cache_conn, markers.AtomicText(self.rejects_path()) as rejects:
            result = load_transaction(conn, cache_conn, db, staged, stage.requires().path(), self.root.tmp(),
                                      mongo_cfg.batch_size, rejects)
        markers.write_json(self.output().path, dict(result, rejects_file=os.path.basename(self.rejects_path())))

    def rejects_path(self):
        return self.marker("rejects").path[: -len(".json")] + ".jsonl"
