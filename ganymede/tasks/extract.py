"""Stage 3: the hour's Glassbeam extract, once every expected agent is loaded or the deadline passed.

Round 0 is the hour's extract. A transaction that completes after it (a late
arrival) goes into a supplementary round: its own file and manifest, holding
only that round's transactions, so no row is in two files of an hour.
"""
import glob
import gzip
import hashlib
import json
import os
import shutil
from contextlib import closing
from datetime import datetime

import luigi

from .. import config, datasets, hours, markers
from ..stores import mongo, mysql, txlog
from .agent import state_root
from .worker import LoadTransaction


# --- plain functions -----------------------------------------------------------

def _json_default(value):
    if isinstance(value, datetime):
        return hours.utc(value).strftime("%Y-%m-%dT%H:%M:%SZ")
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def extract_lines(db, hour, transaction_ids):
    """(dataset, document, line) in a fixed order: datasets by name, documents by `_id`."""
    for name in sorted(datasets.CATALOG):
        for doc in mongo.hour_documents(db[name], hour, transaction_ids):
            doc = dict(doc, hour=hours.utc(doc["hour"]), dataset=name)
            yield name, doc, json.dumps(doc, sort_keys=True, separators=(",", ":"), default=_json_default)


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
    """Stream JSON lines into a gzip file with a fixed header (no name, no time): same data, same bytes.

    Returns (sha256, bytes, counts by dataset, counts by agent).
    """
    by_dataset, by_agent = {name: 0 for name in sorted(datasets.CATALOG)}, {}
    with markers.AtomicFile(path) as raw:
        sink = _HashingFile(raw)
        with gzip.GzipFile(filename="", mode="wb", fileobj=sink, mtime=0, compresslevel=6) as gz:
            for name, doc, line in lines:
                gz.write(line.encode("utf-8") + b"\n")
                by_dataset[name] += 1
                by_agent[doc["agent_id"]] = by_agent.get(doc["agent_id"], 0) + 1
    return sink.sha256.hexdigest(), sink.size, by_dataset, dict(sorted(by_agent.items()))


def earlier_rounds(hour, before):
    """Manifests of the hour's extract rounds < `before`, read from disk."""
    root = state_root()
    return [markers.read_json(root.extract_manifest(hour, r)) for r in range(before)
            if os.path.exists(root.extract_manifest(hour, r))]


def covered_transactions(manifests):
    covered = set()
    for manifest in manifests:
        covered.update(manifest["transactions"], manifest["superseded"])
    return covered


def extract_rounds(hour):
    """How many rounds of the hour's extract exist on disk."""
    return len(glob.glob(state_root().extract_manifest(hour, 0)[: -len(".manifest.json")] + "*.manifest.json"))


def deliver(path, outbox):
    """Copy a file into the outbox atomically (the vendor's pickup directory); returns where."""
    dest = os.path.join(outbox, os.path.basename(path))
    with open(path, "rb") as src, markers.AtomicFile(dest) as out:
        shutil.copyfileobj(src, out, 1 << 20)
    return dest


# --- tasks ---------------------------------------------------------------------

class ExtractDeadline(luigi.ExternalTask):
    """Done once the hour's deadline has passed: until then the extract waits (missing data, not failure)."""
    hour = luigi.DateHourParameter(description="The UTC hour")

    def complete(self):
        return hours.now() >= hours.deadline(self.hour, config.extract().deadline_minutes)


class ExtractTimeout(luigi.Task):
    """Written once the deadline has passed; records which expected agents had not completed."""
    hour = luigi.DateHourParameter(description="The UTC hour")

    def output(self):
        return luigi.LocalTarget(state_root().hour_marker(self.hour, "timeout"))

    def requires(self):
        return ExtractDeadline(hour=self.hour)

    def run(self):
        with closing(mysql.connect(config.mysql())) as conn:
            expected = txlog.expected_agents(conn, self.hour)
            arrived = {t["agent_id"] for t in txlog.hour_transactions(conn, self.hour)}
        markers.write_json(self.output().path, {
            "hour": hours.format_hour(self.hour), "written_at": hours.now(),
            "deadline": hours.deadline(self.hour, config.extract().deadline_minutes),
            "missing_agents": sorted(set(expected) - arrived)})


class GlassbeamExtract(luigi.Task):
    """One gzip'd JSON Lines file per hour and round, with a manifest, delivered to the outbox."""
    hour = luigi.DateHourParameter(description="The UTC hour")
    round = luigi.IntParameter(default=0, description="0: the hour's extract; N>0: the Nth supplementary extract")

    def output(self):
        return luigi.LocalTarget(state_root().extract_manifest(self.hour, self.round))

    def requires(self):
        with closing(mysql.connect(config.mysql())) as conn:
            expected = txlog.expected_agents(conn, self.hour)
            completed = txlog.hour_transactions(conn, self.hour)
        covered = covered_transactions(earlier_rounds(self.hour, self.round)) if self.round else set()
        loads = [LoadTransaction(transaction_id=t["transaction_id"], hour=self.hour, agent_id=t["agent_id"])
                 for t in completed if t["transaction_id"] not in covered]
        if self.round == 0 and set(expected) - {t["agent_id"] for t in completed}:
            return loads + [ExtractTimeout(hour=self.hour)]
        return loads

    def run(self):
        loads = [t for t in self.requires() if isinstance(t, LoadTransaction)]
        timeout = [t.output().path for t in self.requires() if isinstance(t, ExtractTimeout)]
        tx_ids = sorted(t.transaction_id for t in loads)
        client, db = mongo.connect(config.mongodb())
        with closing(client):
            path = state_root().extract(self.hour, self.round)
            sha256, size, by_dataset, by_agent = write_extract(path, extract_lines(db, self.hour, tx_ids))
        with closing(mysql.connect(config.mysql())) as conn:
            superseded = [t["transaction_id"] for t in txlog.hour_transactions(conn, self.hour, ("superseded",))]
        outbox = config.extract().outbox or os.path.join(state_root().root, "outbox")
        manifest = {
            "hour": hours.format_hour(self.hour), "round": self.round, "file": os.path.basename(path),
            "sha256": sha256, "bytes": size, "counts": by_dataset, "agents": by_agent,
            "transactions": tx_ids, "superseded": superseded,
            "missing_agents": markers.read_json(timeout[0])["missing_agents"] if timeout else [],
            "after_deadline": hours.now() >= hours.deadline(self.hour, config.extract().deadline_minutes),
            "delivered_to": deliver(path, outbox),
        }
        markers.write_json(self.output().path, manifest)
