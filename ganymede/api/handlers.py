"""The agent API: transactions, streamed archive uploads, validation, roster, health.

Every handler gets its collaborators through `initialize(api=ApiSettings,
pool=MySQLPool)`: MySQL settings, state root, limits, the executor. The rules of the transaction
log live in `ganymede.stores.txlog` and archive checks in `ganymede.archives`;
handlers only authenticate, check input, and run that work off the event loop.
Every error leaves through `BaseHandler.write_error` as
`{"error": reason, "status": N}`.
"""
import asyncio
import errno
import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import threading
import uuid
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import pymysql
import tornado.web
from tornado import httputil
from tornado.ioloop import IOLoop

from ganymede_agent.archive import ArchiveError

from .. import archives, hours, paths
from ..archives import Limits
from ..errors import HourError, StoreUnavailable, TransactionError
from ..stores import mysql, txlog

log = logging.getLogger("ganymede.api")

_TX_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# What "MySQL is not there right now" looks like; answered 503 + Retry-After.
_DB_DOWN = (StoreUnavailable, pymysql.err.OperationalError, pymysql.err.InterfaceError)
_STATES = ("created", "uploaded", "completed", "failed", "superseded")
_MAX_BATCH_CHUNKS = 512  # under IOV_MAX (1024), even when a slow client sends tiny pieces


@dataclass
class ApiSettings:
    """What make_app needs; `main.settings_from_config()` builds it from luigi.cfg."""
    mysql: object                 # host, port, user, database, option_file, connect_timeout (a config.mysql)
    state: paths.StateRoot
    executor: Executor            # disk, validation and MySQL work run here, never on the loop
    max_archive_bytes: int = 512 << 20
    retention_hours: int = 24 * 14
    min_free_bytes: int = 1 << 30
    limits: Limits = field(default_factory=Limits)
    retry_after: int = 15         # seconds, sent with every 503
    lock_wait: int = 30           # seconds a request waits for another one on the same transaction
    max_json_bytes: int = 64 << 10
    mysql_connections: int = 16   # kept open for reuse (see MySQLPool)
    chunk_bytes: int = 512 << 10  # socket read size, and bytes gathered before one hand-off to a writer thread
    deadline_minutes: int = 45    # the status page's verdicts ([extract] and [alerts])
    overdue_minutes: int = 60
    status_hours: int = 24


class ApiError(tornado.web.HTTPError):
    """An HTTP answer other than success: `error` is the reason shown, `extra` more JSON fields."""

    def __init__(self, status, error, **extra):
        super().__init__(status, error.replace("%", "%%"))
        self.error, self.extra = error, extra


class MySQLPool:
    """A few MySQL connections kept for reuse across requests.

    Opening one costs ~20 ms of CPU (PyMySQL builds an SSL context each
    time), which under load is most of a request. A connection is pinged
    before reuse and rolled back after use (no snapshot or lock outlives a
    request); when MySQL goes away every idle connection is dropped, so the
    first request after it returns simply opens new ones.
    """

    def __init__(self, cfg, size=8):
        self.cfg, self.size = cfg, size
        self._idle = []
        self._lock = threading.Lock()

    def _key(self):
        return (self.cfg.host, self.cfg.port, self.cfg.user, self.cfg.database)

    @contextmanager
    def connection(self):
        conn = self._take()
        try:
            yield conn
        except _DB_DOWN:
            _close(conn)
            self.clear()
            raise
        except BaseException:
            self._give(conn)
            raise
        self._give(conn)

    def _take(self):
        key = self._key()
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = mysql.connect(self.cfg)
                conn.pool_key = key
                return conn
            try:
                if conn.pool_key != key:
                    raise pymysql.err.InterfaceError("settings changed")
                conn.ping(reconnect=False)
                return conn
            except pymysql.err.Error:
                _close(conn)

    def _give(self, conn):
        try:
            conn.rollback()
        except pymysql.err.Error:
            _close(conn)
            return
        with self._lock:
            if len(self._idle) < self.size:
                self._idle.append(conn)
                return
        _close(conn)

    def clear(self):
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            _close(conn)


# --- helpers run in the executor -------------------------------------------------

def _close(conn):
    try:
        conn.close()
    except pymysql.err.Error:
        pass


def _agent_check(conn, agent_id, token):
    """(agent row, None) when authenticated, else (None, 401 or 403).

    403 only when the token is right but the agent is revoked, so a stranger
    learns nothing about which agent ids exist.
    """
    agent = txlog.authenticate(conn, agent_id, token)
    if agent:
        return agent, None
    with conn.cursor() as cur:
        cur.execute("SELECT token_hash, active FROM agents WHERE agent_id = %s", (agent_id,))
        row = cur.fetchone()
    if row and not row[1] and hmac.compare_digest(row[0], txlog.hash_token(token)):
        return None, 403
    return None, 401


def _finish_upload(conn, api, transaction_id, temp, size, sha256):
    with txlog.transaction_lock(conn, transaction_id, api.lock_wait):
        tx = txlog.mark_uploaded(conn, transaction_id, size, sha256)
        os.replace(temp, api.state.incoming(transaction_id))
    return tx


def _complete(conn, api, agent_id, geo, transaction_id):
    """Validate and install (or quarantine) the uploaded archive: (status, body)."""
    with txlog.transaction_lock(conn, transaction_id, api.lock_wait):
        tx = txlog.get_transaction(conn, transaction_id)
        conn.commit()
        if tx is None or tx["agent_id"] != agent_id:
            raise TransactionError("no such transaction", status=404)
        state = tx["state"]
        if state == "completed":
            return 200, _completed_body(tx, _completed_rows(conn, transaction_id))
        if state == "failed":
            return 422, _failed_body(tx, tx["error"])
        if state == "superseded":
            raise TransactionError(f"transaction {transaction_id} was completed and then superseded", status=409,
                                   transaction_id=transaction_id)
        if state != "uploaded":
            raise TransactionError(f"transaction {transaction_id} has no uploaded archive yet", status=409,
                                   transaction_id=transaction_id)
        hour = tx["hour"]
        part = api.state.incoming(transaction_id)
        dest = api.state.upload(hour, agent_id, transaction_id)
        held = api.state.quarantine(hour, agent_id, transaction_id)
        # After a crash (or MySQL loss) between the file move and the log update, finish the move's bookkeeping.
        src = next((p for p in (part, dest) if os.path.exists(p)), None)
        if src is None:
            if os.path.exists(held):
                reason = archives.read_reason(held)["reason"]
                txlog.mark_failed(conn, transaction_id, reason, {"quarantine": held})
                return 422, _failed_body(tx, reason)
            raise TransactionError("the uploaded archive is missing on the server; upload it again", status=409,
                                   transaction_id=transaction_id)
        try:
            counts, digest = archives.check_file(src, agent_id, geo, hour, api.limits)
            error = None
        except ArchiveError as exc:
            counts, digest, error = None, exc.file_sha256, str(exc)
        if digest != tx["sha256"]:
            # Our copy is not what the agent sent (disk trouble, crash mid-write): not the agent's fault.
            if src == part:
                os.remove(part)
            raise TransactionError("the archive on the server no longer matches the uploaded sha256; upload it again",
                                   status=409, transaction_id=transaction_id)
        if error:
            log.warning("transaction %s: archive refused: %s", transaction_id, error)
            try:
                archives.quarantine(src, held, error, {
                    "transaction_id": transaction_id, "agent_id": agent_id, "hour": hours.format_hour(hour),
                    "sha256": digest, "size": tx["size"]})
            except OSError as exc:  # the transaction stays uploaded; the agent's retry refuses it again
                log.error("transaction %s: cannot quarantine: %s", transaction_id, exc)
                raise TransactionError("cannot store the refusal on the server; retry later",
                                       status=507 if exc.errno in (errno.ENOSPC, errno.EDQUOT) else 503,
                                       transaction_id=transaction_id) from None
            txlog.mark_failed(conn, transaction_id, error, {"quarantine": held})
            return 422, _failed_body(tx, error)
        if src != dest:
            archives.install(src, dest)
        txlog.mark_completed(conn, transaction_id, dest, counts)
        return 200, _completed_body(tx, counts)


def _completed_rows(conn, transaction_id):
    for event in reversed(txlog.events(conn, transaction_id)):
        if event["event"] == "completed":
            return (event["detail"] or {}).get("rows")
    return None


def _completed_body(tx, rows):
    return {"transaction_id": tx["transaction_id"], "state": "completed", "rows": rows}


def _failed_body(tx, reason):
    return {"transaction_id": tx["transaction_id"], "state": "failed", "error": reason}


def _roster(conn, hour):
    expected = txlog.expected_agents(conn, hour)
    txs = sorted(txlog.hour_transactions(conn, hour, states=_STATES), key=lambda t: t["created_at"])
    agents = {a: {"expected": True, "state": "missing", "transactions": []} for a in expected}
    for tx in txs:
        entry = agents.setdefault(tx["agent_id"], {"expected": False, "state": "missing", "transactions": []})
        entry["transactions"].append({k: _jsonable(tx[k]) for k in (
            "transaction_id", "state", "supersedes", "size", "error", "created_at", "completed_at")})
    for entry in agents.values():
        states = [t["state"] for t in entry["transactions"]]
        entry["state"] = "completed" if "completed" in states else (states[-1] if states else "missing")
    return {
        "hour": hours.format_hour(hour),
        "expected": expected,
        "missing": [a for a in expected if agents[a]["state"] != "completed"],
        "agents": dict(sorted(agents.items())),
    }


def _health(api, pool):
    checks = {}
    try:
        with pool.connection() as conn:
            mysql.check_schema(conn)
        checks["mysql"] = {"ok": True}
    except _DB_DOWN as exc:
        log.warning("healthz: MySQL: %s", exc)
        checks["mysql"] = {"ok": False, "detail": "unreachable"}
    except Exception as exc:  # SchemaError and anything else MySQL says: report, never 500
        checks["mysql"] = {"ok": False, "detail": str(exc)[:200]}
    try:
        directory = os.path.dirname(api.state.incoming("healthz"))
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".healthz-{uuid.uuid4().hex}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
        checks["state_root"] = {"ok": True}
    except OSError as exc:
        checks["state_root"] = {"ok": False, "detail": f"not writable: {exc.strerror}"}
    try:
        free = _free_bytes(api.state.root)
        checks["disk"] = {"ok": free >= api.min_free_bytes, "free_mb": free >> 20,
                          "min_free_mb": api.min_free_bytes >> 20}
    except OSError as exc:
        checks["disk"] = {"ok": False, "detail": exc.strerror}
    return checks


def _free_bytes(path):
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def _open_upload(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return open(path, "wb", buffering=0)


def _write_batch(f, digest, chunks):
    """Hash the chunks and write them with one writev (no joining copy)."""
    for chunk in chunks:
        digest.update(chunk)
    fd = f.fileno()
    while chunks:
        written = os.writev(fd, chunks[:_MAX_BATCH_CHUNKS])
        while chunks and written >= len(chunks[0]):
            written -= len(chunks[0])
            chunks = chunks[1:]
        if chunks and written:
            chunks = [memoryview(chunks[0])[written:]] + chunks[1:]


def _close_and_remove(f, path):
    try:
        f.close()
    finally:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# --- JSON shapes ----------------------------------------------------------------

def _jsonable(value):
    if hasattr(value, "strftime"):
        return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return value


def _urls(transaction_id):
    return {"upload_url": f"/v1/transactions/{transaction_id}/archive",
            "complete_url": f"/v1/transactions/{transaction_id}/complete"}


def _created_body(tx):
    """The protocol's fields, plus size and sha256 so a retrying agent can tell its upload already arrived."""
    return dict({"transaction_id": tx["transaction_id"], "agent_id": tx["agent_id"],
                 "hour": hours.format_hour(tx["hour"]), "state": tx["state"], "supersedes": tx["supersedes"],
                 "size": tx["size"], "sha256": tx["sha256"]},
                **_urls(tx["transaction_id"]))


def _transaction_body(tx, events, admin):
    body = {k: _jsonable(v) for k, v in tx.items() if admin or k != "archive_path"}
    body["hour"] = hours.format_hour(tx["hour"])
    body["events"] = [dict(e, at=_jsonable(e["at"])) for e in events]
    completed = [e for e in events if e["event"] == "completed"]
    body["rows"] = (completed[-1]["detail"] or {}).get("rows") if completed else None
    return dict(body, **_urls(tx["transaction_id"]))


# --- handlers -------------------------------------------------------------------

@tornado.web.stream_request_body
class BaseHandler(tornado.web.RequestHandler):
    """JSON in and out; bodies are streamed even here so none is buffered before its size is checked."""

    def initialize(self, api, pool):
        self.api, self.pool = api, pool
        self._body = bytearray()

    def set_default_headers(self):
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("Server", "ganymede-api")

    async def prepare(self):
        self.limit_body(self.api.max_json_bytes)

    def data_received(self, chunk):
        self._body += chunk

    def limit_body(self, limit):
        """Refuse from Content-Length before reading (413), and have the server cut anything longer."""
        length = self.content_length()
        if length is not None and length > limit:
            raise ApiError(413, f"body of {length} bytes is over the limit of {limit}")
        self.request.connection.set_max_body_size(limit)

    def content_length(self):
        value = self.request.headers.get("Content-Length")
        if value is None:
            return None
        if not value.isdigit():
            raise ApiError(400, "Content-Length is not a number")
        return int(value)

    def write_error(self, status_code, **kwargs):
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            body = dict(exc.extra, error=exc.error)
        elif status_code >= 500 and not isinstance(exc, tornado.web.HTTPError):
            body = {"error": "internal error"}
        else:
            body = {"error": self._reason or httputil.responses.get(status_code, "error")}
        body["status"] = status_code
        if status_code == 503:
            self.set_header("Retry-After", str(self.api.retry_after))
        if status_code == 401 and "WWW-Authenticate" not in self._headers:
            self.set_header("WWW-Authenticate", 'Bearer realm="ganymede"')
        self.finish(json.dumps(body, sort_keys=True) + "\n")

    def send_json(self, status, body):
        self.set_status(status)
        self.finish(json.dumps(body, sort_keys=True) + "\n")

    def json_body(self):
        try:
            body = json.loads(self._body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ApiError(400, "body is not JSON (or nested too deeply)") from None
        if not isinstance(body, dict):
            raise ApiError(400, "body is not a JSON object")
        return body

    # running work off the loop

    def run(self, fn, *args):
        return IOLoop.current().run_in_executor(self.api.executor, fn, *args)

    async def db(self, fn, *args):
        """fn(conn, *args) in the executor on a pooled connection; MySQL trouble becomes 503 + Retry-After."""
        def call():
            with self.pool.connection() as conn:
                return fn(conn, *args)
        try:
            return await self.run(call)
        except _DB_DOWN as exc:
            log.warning("%s %s: MySQL unavailable: %s", self.request.method, self.request.path, exc)
            raise ApiError(503, "database unavailable; retry later") from None
        except TransactionError as exc:
            extra = {"transaction_id": exc.transaction_id} if exc.transaction_id else {}
            raise ApiError(exc.status, str(exc), **extra) from None

    # authentication

    def bearer(self):
        scheme, _, token = self.request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing bearer token")
        return token

    async def authenticate_agent(self):
        """The calling agent's row (its canonical agent_id); 401 unknown or wrong token, 403 revoked."""
        token = self.bearer()
        agent_id = self.request.headers.get("X-Agent-Id")
        if not agent_id:
            raise ApiError(401, "missing X-Agent-Id header")
        try:
            paths.check_id(agent_id, "agent id")
        except ValueError:
            raise ApiError(400, "malformed X-Agent-Id") from None
        agent, status = await self.db(_agent_check, agent_id, token)
        if status == 403:
            raise ApiError(403, "agent is revoked")
        if agent is None:
            raise ApiError(401, "unknown agent or wrong token")
        return agent

    async def authenticate_admin(self):
        token = self.bearer()
        if not await self.db(txlog.authenticate_admin, token):
            raise ApiError(401, "not an admin token")

    async def authenticate_any(self):
        """An agent when X-Agent-Id is sent, else an admin: returns the agent row or None for admin."""
        if "X-Agent-Id" in self.request.headers:
            return await self.authenticate_agent()
        await self.authenticate_admin()
        return None

    async def own_transaction(self, agent, transaction_id):
        """The transaction if it is this agent's; 404 otherwise (never tell whose it is)."""
        tx = await self.db(txlog.get_transaction, transaction_id)
        if tx is None or tx["agent_id"] != agent["agent_id"]:
            raise ApiError(404, "no such transaction")
        return tx


def transaction_id_arg(value):
    value = value.lower()
    if not _TX_ID.match(value):
        raise ApiError(400, "malformed transaction id")
    return value


def hour_arg(value, api=None):
    """A UTC hour from the client: 400 if malformed; with `api`, 422 outside [now - retention, current hour]."""
    if not isinstance(value, str):
        raise ApiError(400, "hour must be a string like 2026-11-30T05")
    try:
        hour = hours.parse_hour(value)
    except HourError as exc:
        raise ApiError(400, str(exc)) from None
    if api is not None:
        current = hours.floor_hour(hours.now())
        if hour > current:
            raise ApiError(422, f"hour {hours.format_hour(hour)} is in the future")
        if hour < current - timedelta(hours=api.retention_hours):
            raise ApiError(422, f"hour {hours.format_hour(hour)} is older than the retention of "
                                f"{api.retention_hours} hours")
    return hour


class TransactionsHandler(BaseHandler):
    async def post(self):
        agent = await self.authenticate_agent()
        body = self.json_body()
        agent_id = body.get("agent_id")
        if not isinstance(agent_id, str):
            raise ApiError(400, "agent_id missing or not a string")
        try:
            paths.check_id(agent_id, "agent id")
        except ValueError:
            raise ApiError(400, "malformed agent_id") from None
        if agent_id != self.request.headers["X-Agent-Id"]:
            raise ApiError(403, "agent_id in the body is not the authenticated agent")
        hour = hour_arg(body.get("hour"), self.api)
        replace = body.get("replace", False)
        if not isinstance(replace, bool):
            raise ApiError(400, "replace must be true or false")
        tx, created = await self.db(txlog.create_transaction, agent["agent_id"], hour, replace)
        self.send_json(201 if created else 200, _created_body(tx))


class TransactionHandler(BaseHandler):
    async def get(self, transaction_id):
        transaction_id = transaction_id_arg(transaction_id)
        agent = await self.authenticate_any()

        def read(conn):
            tx = txlog.get_transaction(conn, transaction_id)
            return tx, (txlog.events(conn, transaction_id) if tx else [])
        tx, events = await self.db(read)
        if tx is None or (agent is not None and tx["agent_id"] != agent["agent_id"]):
            raise ApiError(404, "no such transaction")
        self.send_json(200, _transaction_body(tx, events, admin=agent is None))


@tornado.web.stream_request_body
class ArchiveHandler(BaseHandler):
    """PUT the archive: streamed to a private temp file, hashed on the way, then made the transaction's .part."""

    file = None

    async def prepare(self):
        self.io_lock = asyncio.Lock()
        self.transaction_id = transaction_id_arg(self.path_args[0])
        if self.request.method != "PUT":
            raise ApiError(405, "use PUT")
        agent = await self.authenticate_agent()
        length = self.content_length()
        if length is None or "Transfer-Encoding" in self.request.headers:
            raise ApiError(411, "Content-Length is required (no chunked uploads)")
        if length > self.api.max_archive_bytes:
            raise ApiError(413, f"archive of {length} bytes is over the limit of {self.api.max_archive_bytes}")
        announced = self.request.headers.get("X-Archive-SHA256", "").strip().lower()
        if not _SHA256.match(announced):
            raise ApiError(400, "X-Archive-SHA256 must be the archive's sha256 in hex")
        tx = await self.own_transaction(agent, self.transaction_id)
        if tx["state"] not in txlog.OPEN_STATES:
            raise ApiError(409, f"transaction is {tx['state']}; no more uploads", state=tx["state"],
                           transaction_id=self.transaction_id)
        free = await self.run(_free_bytes, self.api.state.root)
        if free - length < self.api.min_free_bytes:
            raise ApiError(507, "not enough free disk on the server; retry later")
        self.limit_body(self.api.max_archive_bytes)
        self.expected_length, self.announced = length, announced
        self.received, self.digest = 0, hashlib.sha256()
        self.batch, self.batched, self.writing = [], 0, None
        self.temp = f"{self.api.state.incoming(self.transaction_id)}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            self.file = await self.run(_open_upload, self.temp)
        except OSError as exc:
            log.error("transaction %s: cannot open %s: %s", self.transaction_id, self.temp, exc)
            raise ApiError(507 if exc.errno in (errno.ENOSPC, errno.EDQUOT) else 500,
                           "cannot store the upload on the server; retry later") from None

    async def data_received(self, chunk):
        async with self.io_lock:
            if self.file is None:
                return
            self.received += len(chunk)
            if self.received > self.api.max_archive_bytes:
                await self._abort(ApiError(413, f"archive is over the limit of {self.api.max_archive_bytes} bytes"))
                return
            self.batch.append(chunk)
            self.batched += len(chunk)
            if self.batched >= self.api.chunk_bytes or len(self.batch) >= _MAX_BATCH_CHUNKS:
                await self._flush()

    async def _flush(self):
        """Hand the gathered chunks to the executor, waiting only for the batch before them.

        One batch in flight per upload: the loop keeps reading the socket
        while a thread hashes and writes, and memory per upload stays under
        two batches.
        """
        try:
            if self.writing is not None:
                await self.writing
            batch, self.batch, self.batched = self.batch, [], 0
            self.writing = self.run(_write_batch, self.file, self.digest, batch) if batch else None
            return True
        except OSError as exc:
            log.error("transaction %s: cannot write upload: %s", self.transaction_id, exc)
            status = 507 if exc.errno in (errno.ENOSPC, errno.EDQUOT) else 500
            self.writing = None
            await self._abort(ApiError(status, "cannot store the upload on the server; retry later"))
            return False

    async def _drop(self):
        f, self.file = self.file, None
        writing, self.writing, self.batch = self.writing, None, []
        if writing is not None:
            try:
                await writing
            except OSError:
                pass
        if f is not None:
            await self.run(_close_and_remove, f, self.temp)

    async def _abort(self, error):
        """Drop the temp file and answer now; the server closes the connection instead of reading the rest."""
        await self._drop()
        self.send_error(error.status_code, exc_info=(type(error), error, None))

    def on_connection_close(self):
        if self.file is not None:
            IOLoop.current().add_callback(self._discard)

    async def _discard(self):
        async with self.io_lock:
            await self._drop()

    async def put(self, transaction_id):
        if self._finished:
            return
        async with self.io_lock:
            if self.file is None or not await self._flush() or not await self._flush():
                return  # the second flush waits for the last batch
            f, self.file = self.file, None
            await self.run(f.close)
        digest = self.digest.hexdigest()
        if self.received != self.expected_length or digest != self.announced:
            await self.run(_remove, self.temp)
            raise ApiError(422, "sha256 of the received bytes does not match X-Archive-SHA256",
                           received_sha256=digest, size=self.received)
        try:
            tx = await self.db(_finish_upload, self.api, self.transaction_id, self.temp, self.received, digest)
        finally:
            await self.run(_remove, self.temp)
        self.send_json(200, {"transaction_id": tx["transaction_id"], "state": tx["state"],
                             "size": tx["size"], "sha256": tx["sha256"]})


class CompleteHandler(BaseHandler):
    async def post(self, transaction_id):
        transaction_id = transaction_id_arg(transaction_id)
        agent = await self.authenticate_agent()
        await self.own_transaction(agent, transaction_id)
        status, body = await self.db(_complete, self.api, agent["agent_id"], agent["geo"], transaction_id)
        if status != 200:
            raise ApiError(status, body.pop("error"), **body)
        self.send_json(200, body)


class RosterHandler(BaseHandler):
    async def get(self, hour):
        hour = hour_arg(hour)
        await self.authenticate_admin()
        self.send_json(200, await self.db(_roster, hour))


class HealthHandler(BaseHandler):
    async def get(self):
        checks = await self.run(_health, self.api, self.pool)
        failed = sorted(name for name, check in checks.items() if not check["ok"])
        if failed:
            raise ApiError(503, f"unhealthy: {', '.join(failed)}", ok=False, checks=checks)
        self.send_json(200, {"ok": True, "checks": checks})


class NotFoundHandler(BaseHandler):
    async def prepare(self):
        raise ApiError(404, "no such endpoint")


def make_app(api):
    """The Application; `api` is an ApiSettings or a dict of its fields. `app.pool.clear()` closes its connections."""
    from .status_page import StatusPageHandler  # it builds on BaseHandler, defined here
    if isinstance(api, dict):
        api = ApiSettings(**api)
    pool = MySQLPool(api.mysql, api.mysql_connections)
    args = {"api": api, "pool": pool}
    app = tornado.web.Application([
        (r"/healthz", HealthHandler, args),
        (r"/v1/transactions", TransactionsHandler, args),
        (r"/v1/transactions/([^/]+)", TransactionHandler, args),
        (r"/v1/transactions/([^/]+)/archive", ArchiveHandler, args),
        (r"/v1/transactions/([^/]+)/complete", CompleteHandler, args),
        (r"/v1/hours/([^/]+)/roster", RosterHandler, args),
        (r"/status", StatusPageHandler, args),
    ], default_handler_class=NotFoundHandler, default_handler_args=args, serve_traceback=False)
    app.pool = pool
    return app
