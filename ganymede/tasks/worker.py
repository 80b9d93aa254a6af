"""Stages 1 and 2, per transaction: archive -> MySQL staging -> MongoDB.

StageTransaction replaces `ganymede_worker.sh TXID`, LoadTransaction
replaces `ganymede_worker_etl.py --transactionid=TXID`. Both can be rerun at
any point: staging clears the transaction's rows first, loading upserts
documents by deterministic `_id`.
"""
import json
import os
import shutil
import tempfile
from contextlib import closing

from ganymede_agent.archive import read_archive

from .. import config, datasets, markers
from ..datasets import RowError
from ..stores import mongo, mysql, staging, txlog
from .agent import AgentArchive, TransactionTask, state_root


# --- plain functions -----------------------------------------------------------

def stage_archive(conn, archive_path, transaction_id, workdir):
    """Load every dataset of an archive into staging; returns (manifest, {dataset: rows staged}).

    Each CSV member streams to a temporary file (LOAD DATA LOCAL needs a
    file), is checked against the manifest's sha256, then loaded.
    """
    os.makedirs(workdir, exist_ok=True)
    for dataset in datasets.CATALOG.values():
        staging.clear(conn, dataset, transaction_id)
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
                raise RowError(f"transaction {transaction_id}: {name} staged {counts[name]} rows, "
                               f"manifest says {entry['rows']}")
    return manifest, counts


def transform_batch(dataset, rows, agent_id, geo, hour, transaction_id):
    """Raw staged rows -> (documents, rejects); a bad row is a reject with its reason, never a stop."""
    docs, rejects = [], []
    for values in rows:
        try:
            row = dataset.parse_row(values, hour)
        except RowError as exc:
            rejects.append({"dataset": dataset.name, "row": list(values), "reason": str(exc)})
            continue
        docs.append(dataset.to_document(row, agent_id, geo, hour, transaction_id))
    return docs, rejects


def load_staged(conn, db, transaction_id, agent_id, geo, hour, batch_size, rejects_out):
    """Transform a transaction's staged rows into MongoDB; rejects go to `rejects_out` as JSON lines.

    Returns {dataset: {"loaded": n, "rejected": m}}.
    """
    mongo.ensure_indexes(db, datasets.CATALOG)
    counts = {}
    for dataset in datasets.CATALOG.values():
        loaded = rejected = 0
        for batch in staging.iter_batches(conn, dataset, transaction_id, batch_size):
            docs, rejects = transform_batch(dataset, batch, agent_id, geo, hour, transaction_id)
            loaded += mongo.replace_many(db[dataset.name], docs)
            rejected += len(rejects)
            for reject in rejects:
                rejects_out.write(json.dumps(reject, sort_keys=True) + "\n")
        counts[dataset.name] = {"loaded": loaded, "rejected": rejected}
    return counts


def retire_replaced(db, agent_id, hour, transaction_id):
    """After a replacement loads, nothing of an older transaction for the same agent and hour remains."""
    return {name: db[name].delete_many({"hour": hour, "agent_id": agent_id,
                                        "transaction_id": {"$ne": transaction_id}}).deleted_count
            for name in datasets.CATALOG}


def restage_if_incomplete(conn, staged, archive_path, workdir):
    """A load that crashed after clearing staging finds fewer rows than were staged: stage them again."""
    transaction_id = staged["transaction_id"]
    present = sum(staging.count(conn, d, transaction_id) for d in datasets.CATALOG.values())
    if present != sum(staged["staged"].values()):
        stage_archive(conn, archive_path, transaction_id, workdir)


def finish_load(conn, db, transaction_id, agent_id, hour, counts):
    """Retire what a replacement supersedes, log `loaded`, free the staging rows."""
    tx = txlog.get_transaction(conn, transaction_id)
    retired = retire_replaced(db, agent_id, hour, transaction_id) if tx and tx["state"] == "completed" else {}
    txlog.append_event(conn, transaction_id, "loaded", {"counts": counts, "retired": retired})
    for dataset in datasets.CATALOG.values():
        staging.clear(conn, dataset, transaction_id)
    return {"transaction_id": transaction_id, "agent_id": agent_id, "counts": counts, "retired": retired}


# --- tasks ---------------------------------------------------------------------

class StageTransaction(TransactionTask):
    """The archive's rows in MySQL staging, tagged with the transaction."""

    def output(self):
        return self.marker("staged")

    def requires(self):
        return AgentArchive(**self.tx_params())

    def run(self):
        with closing(mysql.connect(config.mysql())) as conn:
            manifest, counts = stage_archive(conn, self.requires().path(), self.transaction_id, state_root().tmp())
            txlog.append_event(conn, self.transaction_id, "staged", {"rows": counts})
        markers.write_json(self.output().path, {"transaction_id": self.transaction_id, "agent_id": self.agent_id,
                                                "geo": manifest["geo"], "hour": manifest["hour"], "staged": counts})


class LoadTransaction(TransactionTask):
    """The transaction's documents in MongoDB, one collection per dataset; rejects beside the marker."""

    def output(self):
        return self.marker("loaded")

    def requires(self):
        return StageTransaction(**self.tx_params())

    def run(self):
        staged = markers.read_json(self.input().path)
        archive = self.requires().requires().path()
        client, db = mongo.connect(config.mongodb())
        with closing(client), closing(mysql.connect(config.mysql())) as conn:
            restage_if_incomplete(conn, staged, archive, state_root().tmp())
            with markers.AtomicText(self.rejects_path()) as out:
                counts = load_staged(conn, db, self.transaction_id, self.agent_id, staged["geo"], self.hour,
                                     config.mongodb().batch_size, out)
            result = finish_load(conn, db, self.transaction_id, self.agent_id, self.hour, counts)
        markers.write_json(self.output().path, dict(result, rejects_file=os.path.basename(self.rejects_path())))

    def rejects_path(self):
        return self.marker("rejects").path[: -len(".json")] + ".jsonl"
