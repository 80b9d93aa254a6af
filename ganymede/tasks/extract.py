"""Stage 3: the hour's Glassbeam extract, once every expected agent is loaded or the deadline passed.

Round 0 is the hour's extract: it runs once every expected agent has
completed or the deadline has passed, and holds every transaction completed by
then. A transaction that completes after it (a late arrival) goes into a
supplementary round: its own file and manifest, holding only transactions no
other round holds, so no row is in two files of an hour. A supplementary round
is never empty: while the archives that opened it are not yet completed in the
log, it waits (missing data), it does not fail.

Luigi calls requires() when it schedules a task and again just before run(),
and fails the task if the second answer holds something not done. So
requires() only names what cannot change in between (round 0's on-time loads,
the deadline, the previous round); transactions that complete meanwhile are
loaded as dynamic dependencies yielded by run(), which decides the round's set.
"""
import glob
import gzip
import hashlib
import http.client
import json
import os
import shutil
import ssl
import time
from contextlib import closing
from datetime import datetime
from functools import cached_property
from typing import NamedTuple
from urllib.parse import urlsplit

import luigi

from .. import config, datasets, files, hours, markers
from ..errors import ConfigError, DeliveryError, GanymedeError
from ..stores import mongo, mysql, txlog
from .agent import state_root
from .worker import LoadTransaction

USER_AGENT = "ganymede-extract/1"
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
MAX_RETRY_WAIT_S = 300
WRITE_BLOCK = 1 << 16  # lines go to gzip in blocks of about this many bytes (the bytes do not depend on it)


# --- plain functions: the file -------------------------------------------------

def _json_default(value):
    if isinstance(value, datetime):
        return hours.utc(value).isoformat(timespec="seconds") + "Z"
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# Canonical JSON: sorted keys, no spaces, datetimes as UTC "…Z" to the second.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=_json_default)


def extract_lines(db, hour, transaction_ids, select_in_query=True):
    """(dataset, document, line) of the given transactions in a fixed order: datasets by name, documents by `_id`.

    Round 0 wants nearly all of the hour's documents, so it reads the hour
    (`select_in_query=False`) and drops strays here rather than send a large
    `$in`; a supplementary round holds few transactions and asks for just them.
    """
    wanted = set(transaction_ids)
    for name in sorted(datasets.CATALOG):
        for doc in mongo.hour_documents(db[name], hour, transaction_ids if select_in_query else None):
            if doc["transaction_id"] not in wanted:
                continue
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
    """Stream JSON lines into a gzip file with a fixed header (no name, no time): same data, same bytes.

    Returns (sha256, bytes, counts by dataset, counts by agent).
    """
    by_dataset, by_agent = {name: 0 for name in sorted(datasets.CATALOG)}, {}
    with markers.open_atomic(path) as raw:
        sink = _HashingFile(raw)
        with gzip.GzipFile(filename="", mode="wb", fileobj=sink, mtime=0, compresslevel=6) as gz:
            block, size = [], 0
            for name, doc, line in lines:
                block.append(line.encode("utf-8"))
                size += len(block[-1])
                if size >= WRITE_BLOCK:
                    gz.write(b"\n".join(block) + b"\n")
                    block, size = [], 0
                by_dataset[name] += 1
                by_agent[doc["agent_id"]] = by_agent.get(doc["agent_id"], 0) + 1
            if block:
                gz.write(b"\n".join(block) + b"\n")
    return sink.sha256.hexdigest(), sink.size, by_dataset, dict(sorted(by_agent.items()))


# --- plain functions: rounds ---------------------------------------------------

def round_manifests(hour):
    """{round: manifest} of every extract round of the hour on disk (a manifest names its round)."""
    manifests = (markers.read_json(path) for path in glob.glob(state_root().extract_manifests_glob(hour)))
    return {m["round"]: m for m in manifests}


def covered_transactions(manifests):
    """Transactions some round holds or has declared superseded."""
    covered = set()
    for manifest in manifests:
        covered.update(manifest["transactions"], manifest["superseded"])
    return covered


def pending_archives(hour):
    """{transaction id: agent id} of archives still in upload/ for the hour: one directory walk."""
    return {os.path.basename(p)[: -len(".tar.gz")]: os.path.basename(os.path.dirname(p))
            for p in glob.glob(state_root().hour_uploads_glob(hour))}


def uncovered_archives(hour, manifests=None):
    """{transaction id: agent id} of archives in upload/ that no round of the hour holds."""
    covered = covered_transactions((round_manifests(hour) if manifests is None else manifests).values())
    return {tx: agent for tx, agent in pending_archives(hour).items() if tx not in covered}


def current_round(hour, completed=None):
    """The round the hour needs now: the newest one, or a new one when upload/ holds archives no round covers.

    With `completed` (the log's completed transaction ids), only archives of
    completed transactions open a new round.
    """
    manifests = round_manifests(hour)
    if not manifests:
        return 0
    uncovered = set(uncovered_archives(hour, manifests))
    if completed is not None:
        uncovered &= set(completed)
    return max(manifests) + (1 if uncovered else 0)


def first_completions(rows):
    """{agent: when it first completed a transaction of the hour} from completed and superseded rows."""
    first = {}
    for t in rows:
        if t["agent_id"] not in first or t["completed_at"] < first[t["agent_id"]]:
            first[t["agent_id"]] = t["completed_at"]
    return first


def round0_cutoff(expected, rows, deadline):
    """(cutoff, needs the deadline): when the last expected agent first completed, else the deadline.

    An hour nobody is expected for waits for the deadline too: whoever sends
    for it by then is in its extract.
    """
    first = first_completions(rows)
    if expected and all(a in first for a in expected):
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
    """What a round holds and waits for; pure, from one read of the log and the files.

    `rows`: the hour's completed and superseded transactions; `others`: the
    manifests of the hour's other rounds; `pending`: {transaction: agent} in
    upload/. Round 0's `early` loads stop at its cutoff so that requires()
    answers the same at scheduling and at run time (Luigi checks both); what
    completed after the cutoff but before the round runs is loaded by run().
    """
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


# --- plain functions: delivery -------------------------------------------------

def copy_to_outbox(path, outbox):
    """Copy a file into the outbox atomically (the vendor's pickup directory); returns where.

    The partial copy has a fixed name (`.<file>.partial`), so the rerun after a
    crash mid-copy overwrites it instead of leaving a stray file for the vendor.
    """
    dest = os.path.join(outbox, os.path.basename(path))
    partial = os.path.join(outbox, f".{os.path.basename(path)}.partial")
    os.makedirs(outbox, exist_ok=True)
    shutil.copyfile(path, partial)
    return files.move_durably(partial, dest)  # fsyncs the copy before the rename


def read_token(path):
    """The bearer token in `path`, refused if group or others can read it (like .s3curl)."""
    token = files.read_private(path, lambda message: ConfigError(f"[extract] token_file {message}"))
    token = token.decode("utf-8", "replace").strip()
    if not token or any(c in token for c in "\r\n"):
        raise ConfigError(f"[extract] token_file {path} must hold one non-empty line")
    return token


def https_target(url):
    """(host, port, path, url fit for a log) of the delivery endpoint; only HTTPS, no credentials in it."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(f"[extract] endpoint_url must be an https:// URL, not {parts.scheme or 'no'} scheme")
    if parts.username or parts.password:
        raise ConfigError("[extract] endpoint_url must not carry credentials: put a bearer token in token_file")
    shown = f"https://{parts.netloc}{parts.path or '/'}"
    return parts.hostname, parts.port or 443, (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), shown


def _post_once(host, port, target, path, headers, timeout, context):
    """One streamed POST of the file; (status, reason, Retry-After, start of the body). No redirects."""
    conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context, blocksize=1 << 16)
    try:
        with open(path, "rb") as body:
            conn.request("POST", target, body=body, headers=headers)
            response = conn.getresponse()
            text = response.read(2048).decode("utf-8", "replace")
            return response.status, response.reason, response.getheader("Retry-After"), text
    finally:
        conn.close()


def _retry_wait(attempt, base, retry_after):
    if retry_after and retry_after.strip().isdigit():
        return min(int(retry_after), MAX_RETRY_WAIT_S)
    return min(base * 2 ** (attempt - 1), MAX_RETRY_WAIT_S)


def post_extract(path, sha256, hour, round_, cfg, sleep=time.sleep):
    """POST the file to cfg.endpoint_url, retrying what may pass (network errors, 408/429/5xx).

    Every attempt carries the same Idempotency-Key (file name and sha256), so
    a receiver can drop the copy a lost response made us send again. Returns
    the delivery record; raises DeliveryError once attempts are exhausted or
    the endpoint refuses for good (other 4xx, 3xx, a certificate it cannot prove).
    """
    host, port, target, shown = https_target(cfg.endpoint_url)
    if cfg.attempts < 1:
        raise ConfigError("[extract] attempts must be at least 1")
    name = os.path.basename(path)
    headers = {"Content-Type": "application/gzip", "Content-Length": str(os.path.getsize(path)),
               "Content-Disposition": f'attachment; filename="{name}"', "User-Agent": USER_AGENT,
               "Idempotency-Key": f"{name}:{sha256}", "X-Ganymede-Sha256": sha256,
               "X-Ganymede-Hour": hours.format_hour(hour), "X-Ganymede-Round": str(round_)}
    if cfg.token_file:
        headers["Authorization"] = f"Bearer {read_token(cfg.token_file)}"
    context = ssl.create_default_context(cafile=os.path.expanduser(cfg.ca_file) if cfg.ca_file else None)
    started, problem = time.monotonic(), None
    for attempt in range(1, cfg.attempts + 1):
        retry_after = None
        try:
            status, reason, retry_after, text = _post_once(host, port, target, path, headers,
                                                           cfg.timeout_seconds, context)
        except ssl.SSLCertVerificationError as exc:
            raise DeliveryError(f"delivery of {name} to {shown}: the server's certificate was refused "
                                f"({exc.verify_message}); set [extract] ca_file if it uses a private CA") from None
        except (OSError, http.client.HTTPException) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        else:
            if 200 <= status < 300:
                return {"url": shown, "status": status, "attempts": attempt, "at": hours.now(),
                        "seconds": round(time.monotonic() - started, 3), "response": text[:500]}
            problem = f"HTTP {status} {reason}: {text[:300]}".rstrip(": ")
            if status not in RETRY_STATUSES and status < 500:
                raise DeliveryError(f"delivery of {name} to {shown} refused ({problem}); not retried")
        if attempt < cfg.attempts:
            sleep(_retry_wait(attempt, cfg.retry_wait_seconds, retry_after))
    raise DeliveryError(f"delivery of {name} to {shown} failed after {cfg.attempts} attempts: {problem}")


def deliver(path, sha256, hour, round_, cfg):
    """Outbox copy always, then the HTTPS POST if an endpoint is configured; returns the delivery record."""
    outbox = cfg.outbox or os.path.join(state_root().root, "outbox")
    record = {"outbox": copy_to_outbox(path, outbox), "https": None}
    if cfg.endpoint_url:
        record["https"] = post_extract(path, sha256, hour, round_, cfg)
    return record


# --- tasks ---------------------------------------------------------------------

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
        deadline = hours.deadline(self.hour, config.extract().deadline_minutes)
        with closing(mysql.connect(config.mysql())) as conn:
            expected = txlog.expected_agents(conn, self.hour)
            first = first_completions(txlog.hour_transactions(conn, self.hour, ("completed", "superseded")))
        markers.write_json(self.output().path, {
            "hour": hours.format_hour(self.hour), "written_at": hours.now(), "deadline": deadline,
            "missing_agents": sorted(set(expected) - set(first))})


class TransactionCompletion(luigi.ExternalTask):
    """An archive in upload/ whose transaction the log does not list as completed yet.

    The API moves a verified archive into upload/ and then marks its
    transaction completed; a run between the two sees the file but not the
    completion (and after a crash there, the agent's retry completes it).
    HourlyBackup and a supplementary round require this only after their read
    of the log found the transaction not completed, so it is never complete
    within that run: the run ends with missing data and the next run reads the
    log again.
    """
    hour = luigi.DateHourParameter(description="The transaction's UTC hour")
    agent_id = luigi.Parameter(description="The agent whose directory holds the archive")
    transaction_id = luigi.Parameter(description="Transaction UUID (the archive's name)")

    def complete(self):
        return False


class GlassbeamExtract(luigi.Task):
    """One gzip'd JSON Lines file per hour and round, with a manifest, delivered to the outbox (and HTTPS).

    Round 0 requires the loads of its on-time transactions (they run while
    it still waits for agents); whatever completed after that is loaded as a
    dynamic dependency of run(), as are a supplementary round's late arrivals.
    """
    hour = luigi.DateHourParameter(description="The UTC hour")
    round = luigi.IntParameter(default=0, description="0: the hour's extract; N>0: the Nth supplementary extract")

    def output(self):
        return luigi.LocalTarget(state_root().extract_manifest(self.hour, self.round))

    def requires(self):
        plan = self.scheduled_plan
        if self.round == 0:
            timeout = [ExtractTimeout(hour=self.hour)] if plan.needs_deadline else []
            return [self.load(t) for t in plan.early] + timeout
        return [GlassbeamExtract(hour=self.hour, round=self.round - 1)] + [
            TransactionCompletion(hour=self.hour, agent_id=agent, transaction_id=tx) for agent, tx in plan.waiting]

    @cached_property
    def scheduled_plan(self):
        """The plan requires() names: read once per task instance, however often Luigi asks."""
        return self.plan()

    def plan(self):
        """plan_round for this round: one read of the log, the other rounds' manifests, one directory walk."""
        with closing(mysql.connect(config.mysql())) as conn:
            expected = txlog.expected_agents(conn, self.hour)
            rows = txlog.hour_transactions(conn, self.hour, ("completed", "superseded"))
        others = [m for r, m in round_manifests(self.hour).items() if r != self.round]
        return plan_round(self.round, expected, rows, others, pending_archives(self.hour) if self.round else {},
                          hours.deadline(self.hour, config.extract().deadline_minutes))

    def load(self, transaction):
        return LoadTransaction(transaction_id=transaction["transaction_id"], hour=self.hour,
                               agent_id=transaction["agent_id"])

    def run(self):
        if self.complete():  # handed out again as another host finished it: docs/scaling.md
            return
        plan = self.plan()
        # dynamic: the ones not loaded yet are loaded (only those go back to the scheduler), then run() again
        yield [load for load in map(self.load, plan.transactions) if not load.complete()]
        with closing(mysql.connect(config.mysql())) as conn:  # a load may have isolated its transaction meanwhile
            states = txlog.states(conn, [t["transaction_id"] for t in plan.transactions])
        transactions = [t for t in plan.transactions if states.get(t["transaction_id"]) != "failed"]
        if self.round and not transactions:
            raise GanymedeError(f"extract round {self.round} of {hours.format_hour(self.hour)}: no completed "
                                "transaction that another round does not hold; an empty supplementary is not written")
        tx_ids = sorted(t["transaction_id"] for t in transactions)
        path = state_root().extract(self.hour, self.round)
        client, db = mongo.connect(config.mongodb())
        with closing(client):
            lines = extract_lines(db, self.hour, tx_ids, select_in_query=self.round > 0)
            sha256, size, by_dataset, by_agent = write_extract(path, lines)
        cfg = config.extract()
        # an hour without agent data sends the vendor nothing (status: no data), unless the contract wants a file
        delivery = deliver(path, sha256, self.hour, self.round, cfg) if tx_ids or cfg.deliver_empty else None
        markers.write_json(self.output().path, {
            "hour": hours.format_hour(self.hour), "round": self.round, "file": os.path.basename(path),
            "sha256": sha256, "bytes": size, "counts": by_dataset, "agents": by_agent,
            "transactions": tx_ids, "superseded": sorted(set(plan.superseded) - set(tx_ids)),
            "missing_agents": sorted(set(plan.expected) - {t["agent_id"] for t in transactions}) if self.round == 0
            else [],
            "completed_by": max((t["completed_at"] for t in transactions), default=None),
            "after_deadline": hours.now() >= hours.deadline(self.hour, cfg.deadline_minutes),
            "delivered_to": delivery and delivery["outbox"], "delivery": delivery,
        })
