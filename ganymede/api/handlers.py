"""The agent API's routes: transactions, the roster, /healthz and /metrics here; archives in `uploads`."""
import os
import tempfile

import tornado.web
from prometheus_client import CONTENT_TYPE_LATEST

from .. import hours
from ..errors import StoreUnavailable
from ..stores import mysql, txlog
from ..stores.pool import MySQLPool
from .base import ApiError, BaseHandler, Traffic, agent_id_arg, hour_arg, log, transaction_id_arg
from .metrics import ApiMetrics
from .status_page import StatusPageHandler
from .uploads import ArchiveHandler, CompleteHandler, completed_rows, free_bytes

_STATES = ("created", "uploaded", "completed", "failed", "superseded")


def _jsonable(value):
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if hasattr(value, "strftime") else value


def _urls(transaction_id):
    return {"upload_url": f"/v1/transactions/{transaction_id}/archive",
            "complete_url": f"/v1/transactions/{transaction_id}/complete"}


def _created_body(tx):
    """The protocol's fields, plus size and sha256 so a retrying agent can tell its upload already arrived."""
    return dict({k: tx[k] for k in ("transaction_id", "agent_id", "state", "supersedes", "size", "sha256")},
                hour=hours.format_hour(tx["hour"]), **_urls(tx["transaction_id"]))


def _transaction_body(tx, events, admin):
    body = {k: _jsonable(v) for k, v in tx.items() if admin or k != "archive_path"}
    body["hour"] = hours.format_hour(tx["hour"])
    body["events"] = [dict(e, at=_jsonable(e["at"])) for e in events]
    return dict(body, rows=completed_rows(events), **_urls(tx["transaction_id"]))


def _roster(conn, hour):
    expected = txlog.expected_agents(conn, hour)
    agents = {a: {"expected": True, "state": "missing", "transactions": []} for a in expected}
    for tx in sorted(txlog.hour_transactions(conn, hour, states=_STATES), key=lambda t: t["created_at"]):
        entry = agents.setdefault(tx["agent_id"], {"expected": False, "state": "missing", "transactions": []})
        entry["transactions"].append({k: _jsonable(tx[k]) for k in (
            "transaction_id", "state", "supersedes", "size", "error", "created_at", "completed_at")})
    for entry in agents.values():
        states = [t["state"] for t in entry["transactions"]]
        entry["state"] = "completed" if "completed" in states else (states[-1] if states else "missing")
    return {"hour": hours.format_hour(hour), "expected": expected,
            "missing": [a for a in expected if agents[a]["state"] != "completed"], "agents": dict(sorted(agents.items()))}


def _health_checks(api, pool):
    """MySQL's schema, a writable state root and enough free disk."""
    found = {"mysql": {"ok": True}, "state_root": {"ok": True}}
    try:
        with pool.connection() as conn:
            mysql.check_schema(conn)
    except StoreUnavailable as exc:
        log.warning("healthz: %s", exc)
        found["mysql"] = {"ok": False, "detail": "unreachable"}
    except Exception as exc:  # SchemaError and anything else MySQL says: report, never 500
        found["mysql"] = {"ok": False, "detail": str(exc)[:200]}
    try:
        directory = os.path.dirname(api.state.incoming("healthz"))
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory) as probe:
            probe.write(b"ok")
    except OSError as exc:
        found["state_root"] = {"ok": False, "detail": f"not writable: {exc.strerror}"}
    try:
        free = free_bytes(api.state.root)
        found["disk"] = {"ok": free >= api.min_free_bytes, "free_mb": free >> 20,
                         "min_free_mb": api.min_free_bytes >> 20}
    except OSError as exc:
        found["disk"] = {"ok": False, "detail": exc.strerror}
    return found


class HealthHandler(BaseHandler):
    async def get(self):
        found = await self.run(_health_checks, self.api, self.pool)
        failed = sorted(name for name, check in found.items() if not check["ok"])
        if failed:
            raise ApiError(503, f"unhealthy: {', '.join(failed)}", ok=False, checks=found)
        self.send_json(200, {"ok": True, "checks": found})


class TransactionsHandler(BaseHandler):
    async def post(self):
        agent = await self.authenticate_agent()
        body = self.json_body()
        agent_id = body.get("agent_id")
        if not isinstance(agent_id, str):
            raise ApiError(400, "agent_id missing or not a string")
        if agent_id_arg(agent_id, "agent_id") != self.request.headers["X-Agent-Id"]:
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
        agent = await self.authenticate_agent() if "X-Agent-Id" in self.request.headers else None
        if agent is None:  # an admin sees any transaction
            await self.authenticate_admin()

        def read(conn):
            tx = txlog.get_transaction(conn, transaction_id)
            return tx, (txlog.events(conn, transaction_id) if tx else [])
        tx, events = await self.db(read)
        if tx is None or (agent is not None and tx["agent_id"] != agent["agent_id"]):
            raise ApiError(404, "no such transaction")
        self.send_json(200, _transaction_body(tx, events, admin=agent is None))


class RosterHandler(BaseHandler):
    async def get(self, hour):
        hour = hour_arg(hour)
        await self.authenticate_admin()
        self.send_json(200, await self.db(_roster, hour))


class MetricsHandler(BaseHandler):
    """Prometheus' scrape: an admin token, except on [api] metrics_address (a private network, main.serve)."""

    async def get(self):
        if not self.settings.get("open_metrics"):
            await self.authenticate_admin()
        open_transactions = await self.db(txlog.open_count)
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(await self.run(self.metrics.exposition, open_transactions, self.api.state.root))


class NotFoundHandler(BaseHandler):
    async def prepare(self):
        await super().prepare()  # the head is checked first, as on every route
        raise ApiError(404, "no such endpoint")


def make_app(api):
    """The Application for an ApiSettings; `app.pool.clear()` closes its connections. `app.metrics_app` serves
    /metrics alone, without credentials, sharing its metrics and pool: for [api] metrics_address."""
    pool = MySQLPool(api.mysql, api.mysql_connections)
    args = {"api": api, "pool": pool, "traffic": Traffic(api.auth_failures_per_minute), "metrics": ApiMetrics()}
    app = tornado.web.Application([
        (r"/healthz", HealthHandler, args),
        (r"/v1/transactions", TransactionsHandler, args),
        (r"/v1/transactions/([^/]+)", TransactionHandler, args),
        (r"/v1/transactions/([^/]+)/archive", ArchiveHandler, args),
        (r"/v1/transactions/([^/]+)/complete", CompleteHandler, args),
        (r"/v1/hours/([^/]+)/roster", RosterHandler, args),
        (r"/status", StatusPageHandler, args),
        (r"/metrics", MetricsHandler, args),
    ], default_handler_class=NotFoundHandler, default_handler_args=args, serve_traceback=False)
    app.pool = pool
    app.metrics_app = tornado.web.Application(
        [(r"/metrics", MetricsHandler, args)], default_handler_class=NotFoundHandler, default_handler_args=args,
        serve_traceback=False, open_metrics=True)
    return app
