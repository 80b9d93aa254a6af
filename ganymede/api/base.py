"""What every handler shares: settings, JSON in and out, strict request heads, authentication, write_error."""
import json
import logging
import math
import re
import time
from collections import Counter
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import timedelta

import tornado.web
from tornado import httputil
from tornado.ioloop import IOLoop

from .. import config, hours, paths
from ..archives import Limits
from ..errors import Busy, Conflict, Forbidden, HourError, NotFound, QuotaExceeded, StoreUnavailable
from ..stores import txlog

log = logging.getLogger("ganymede.api")

_TX_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_LENGTH = re.compile(r"[0-9]{1,18}")  # ASCII digits only: str.isdigit() also takes '²'
# Domain error -> (HTTP status, the reason shown; None: the error's own message). The only such table.
ERROR_STATUS = {NotFound: (404, None), Forbidden: (403, None), Conflict: (409, None), Busy: (503, None),
                QuotaExceeded: (507, None), StoreUnavailable: (503, "database unavailable; retry later")}


def limits_from_config(api):
    return Limits(max_member_bytes=api.max_member_mb << 20, max_total_bytes=api.max_total_mb << 20)


def _from(section, name, shift=0):
    """A default read from luigi.cfg when the settings are made: config.py holds the one default."""
    return field(default_factory=lambda: getattr(section(), name) << shift)


@dataclass
class ApiSettings:
    """What make_app needs; what is not given comes from [api], [mysql], [state], [extract] and [alerts]."""
    executor: Executor            # disk and MySQL work of requests runs here, never on the loop
    validator: object = None      # an uploads.Validator: completes' threads and processes; None: `executor`, inline
    mysql: object = field(default_factory=config.mysql)  # or any object with its fields
    state: paths.StateRoot = field(default_factory=lambda: paths.StateRoot(config.state().root))
    max_archive_bytes: int = _from(config.api, "max_archive_mb", 20)
    retention_hours: int = _from(config.api, "retention_hours")
    min_free_bytes: int = _from(config.api, "min_free_mb", 20)
    limits: Limits = field(default_factory=lambda: limits_from_config(config.api()))
    retry_after: int = _from(config.api, "retry_after")
    lock_wait: int = 30           # seconds a request waits for another one on the same transaction
    max_json_bytes: int = 64 << 10
    mysql_connections: int = _from(config.api, "mysql_connections")
    chunk_bytes: int = _from(config.api, "upload_chunk_kb", 10)
    completes_per_agent: int = _from(config.api, "completes_per_agent")
    agent_quota_bytes: int = _from(config.api, "agent_quota_mb", 20)
    auth_failures_per_minute: int = _from(config.api, "auth_failures_per_minute")
    deadline_minutes: int = _from(config.extract, "deadline_minutes")  # the status page's verdicts
    overdue_minutes: int = _from(config.alerts, "overdue_minutes")
    status_hours: int = _from(config.alerts, "status_hours")


class Traffic:
    """In flight per agent, and wrong tokens per address in a one-minute window (the event loop's alone, so no
    lock): past the limit every request from the address gets 429, so a right guess looks like a wrong one."""

    def __init__(self, auth_failures_per_minute):
        self.limit, self.failures = auth_failures_per_minute, {}  # address: (window start, wrong tokens)
        self.completes, self.uploading = Counter(), Counter()

    def auth_wait(self, address):
        start, count = self.failures.get(address, (0, 0))
        left = math.ceil(start + 60 - time.monotonic())
        return left if count >= self.limit and left > 0 else 0

    def auth_failed(self, address):
        now = time.monotonic()
        if len(self.failures) > 100_000:  # a scan from many addresses: forget the windows that ended
            self.failures = {a: v for a, v in self.failures.items() if now - v[0] < 60}
        start, count = self.failures.get(address, (now, 0))
        self.failures[address] = (start, count + 1) if now - start < 60 else (now, 1)


class ApiError(tornado.web.HTTPError):
    """An HTTP answer other than success: `error` is the reason shown, `extra` more JSON fields."""

    def __init__(self, status, error, retry_after=None, **extra):
        super().__init__(status, error.replace("%", "%%"))
        self.error, self.extra, self.retry_after = error, extra, retry_after


@tornado.web.stream_request_body
class BaseHandler(tornado.web.RequestHandler):
    """JSON in and out; bodies are streamed even here so none is buffered before its size is checked."""

    challenge = 'Bearer realm="ganymede"'  # WWW-Authenticate of a 401

    def initialize(self, api, pool, traffic, metrics):
        self.api, self.pool, self.traffic, self.metrics = api, pool, traffic, metrics
        self._body = bytearray()

    def on_finish(self):
        self.metrics.request(self, self.request.request_time())

    def set_default_headers(self):
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("Server", "ganymede-api")

    async def prepare(self):
        self.limit_body(self.api.max_json_bytes)

    def data_received(self, chunk):
        self._body += chunk

    def limit_body(self, limit, what="body"):
        """Refuse from Content-Length before reading (413), and have the server cut anything longer."""
        length = self.content_length()
        if length is not None and length > limit:
            raise ApiError(413, f"{what} of {length} bytes is over the limit of {limit}")
        self.request.connection.set_max_body_size(limit)
        return length

    def content_length(self):
        """The announced length; 400 for anything but one plain number, or for a length beside a
        Transfer-Encoding (two framings of one body is how requests are smuggled past a proxy)."""
        value = self.request.headers.get("Content-Length")
        if value is None:
            return None
        if "Transfer-Encoding" in self.request.headers:
            raise ApiError(400, "Content-Length and Transfer-Encoding together")
        if not _LENGTH.fullmatch(value):
            raise ApiError(400, "Content-Length is not one plain number")
        return int(value)

    def write_error(self, status, **kwargs):
        exc = kwargs.get("exc_info", (None, None, None))[1]
        mapped = next((v for cls, v in ERROR_STATUS.items() if isinstance(exc, cls)), None)
        if isinstance(exc, ApiError):
            status, body = exc.status_code, dict(exc.extra, error=exc.error)
        elif mapped:
            status, body = mapped[0], {"error": mapped[1] or str(exc)}
            if getattr(exc, "transaction_id", None):
                body["transaction_id"] = exc.transaction_id
        elif status >= 500 and not isinstance(exc, tornado.web.HTTPError):
            body = {"error": "internal error"}
        else:
            body = {"error": getattr(exc, "reason", None) or httputil.responses.get(status, "error")}
        body["status"] = status
        self.metrics.refused(status, body["error"])
        if status in (429, 503):
            self.set_header("Retry-After", str(getattr(exc, "retry_after", None) or self.api.retry_after))
        if status == 401:
            self.set_header("WWW-Authenticate", self.challenge)
        self.send_json(status, body)

    def log_exception(self, typ, value, tb):
        if isinstance(value, StoreUnavailable):
            log.warning("%s %s: %s", self.request.method, self.request.path, value)
        elif not isinstance(value, tuple(ERROR_STATUS)):  # the others are expected answers, not faults
            super().log_exception(typ, value, tb)

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

    def run(self, fn, *args, executor=None):
        return IOLoop.current().run_in_executor(executor or self.api.executor, fn, *args)

    async def db(self, fn, *args, executor=None):
        """fn(conn, *args) in the executor on a pooled connection."""
        def call():
            with self.pool.connection() as conn:
                return fn(conn, *args)
        return await self.run(call, executor=executor)

    def bearer(self):
        wait = self.traffic.auth_wait(self.request.remote_ip)
        if wait:
            raise ApiError(429, "too many failed authentications from this address; retry later", retry_after=wait)
        scheme, _, token = self.request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing bearer token")
        return token

    def refuse_token(self, reason):
        self.traffic.auth_failed(self.request.remote_ip)
        return ApiError(401, reason)

    async def authenticate_agent(self):
        """The calling agent's row (its canonical agent_id); 401 unknown or wrong token, 403 revoked."""
        token = self.bearer()
        agent_id = self.request.headers.get("X-Agent-Id")
        if not agent_id:
            raise ApiError(401, "missing X-Agent-Id header")
        agent = await self.db(txlog.authenticate, agent_id_arg(agent_id, "X-Agent-Id"), token, True)
        if agent is None:
            raise self.refuse_token("unknown agent or wrong token")
        return agent

    async def authenticate_admin(self, token=None, reason="not an admin token"):
        """`token` (default: the bearer's) must be a live admin token; 401 with `reason` otherwise."""
        token = self.bearer() if token is None else token
        if not token or not await self.db(txlog.authenticate_admin, token):
            raise self.refuse_token(reason)

    async def own_transaction(self, agent, transaction_id):
        """The transaction if it is this agent's; 404 otherwise (never tell whose it is)."""
        tx = await self.db(txlog.get_transaction, transaction_id)
        if tx is None or tx["agent_id"] != agent["agent_id"]:
            raise ApiError(404, "no such transaction")
        return tx


def agent_id_arg(value, name):
    try:
        return paths.check_id(value, "agent id")
    except ValueError:
        raise ApiError(400, f"malformed {name}") from None


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
