"""The agent API through the real app on a real port, against the real MariaDB.

Each test gets a server (make_app + the same HTTPServer settings as
`ganymede-api`) in a thread with its own IOLoop, on genv's port and state
root, with a small archive limit so the upload-size cases stay cheap (the archive
cases, at production limits, are in test_hostile.py).
"""
import asyncio
import hashlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from types import SimpleNamespace

import pytest
from ganymede_agent.archive import sha256_file

from ganymede import config, hours
from ganymede.api import ApiSettings, make_app
from ganymede.api.main import make_server
from ganymede.paths import StateRoot
from ganymede.stores import txlog

import faultlib as F
from test_archives import BAD, archive, dataset_files, manifest_for

MAX_ARCHIVE = 4 << 20


class ApiServer:
    """The app on 127.0.0.1:port in a thread with its own event loop."""

    def __init__(self, settings, port, ssl_options=None):
        self.port, started = port, threading.Event()

        async def serve():
            app = make_app(settings)
            server = make_server(app, settings, idle_timeout=30, body_timeout=60, ssl_options=ssl_options)
            server.listen(port, "127.0.0.1")
            self.loop, self.stopping = asyncio.get_running_loop(), asyncio.Event()
            started.set()
            await self.stopping.wait()
            server.stop()
            await server.close_all_connections()
            app.pool.clear()

        self.thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
        self.thread.start()
        assert started.wait(10), "API server did not start"

    def stop(self):
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(10)


class Response(SimpleNamespace):
    pass


def request(port, method, path, body=None, headers=None, timeout=30):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
        assert resp.getheader("Content-Type", "").startswith("application/json"), raw
        return Response(status=resp.status, headers=resp, json=json.loads(raw))
    finally:
        conn.close()


def raw_request(port, head, body=b""):
    """Send exactly these bytes (a request head without Content-Length, say); return (status, json)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head.encode() + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1])


def _length(data):
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 1 << 30


class Agent:
    """One agent's side of the protocol."""

    def __init__(self, world, agent_id, token):
        self.world, self.agent_id, self.token = world, agent_id, token
        self.headers = {"Authorization": f"Bearer {token}", "X-Agent-Id": agent_id}

    def create(self, hour=None, replace=None, **fields):
        body = {"agent_id": self.agent_id, "hour": hours.format_hour(hour or self.world.hour)}
        if replace is not None:
            body["replace"] = replace
        body.update(fields)
        return self.world.call("POST", "/v1/transactions", json.dumps(body), self.headers)

    def upload(self, tx, data, sha256=None, **headers):
        sha256 = hashlib.sha256(data).hexdigest() if sha256 is None else sha256
        return self.world.call("PUT", f"/v1/transactions/{tx}/archive", data,
                               dict(self.headers, **{"X-Archive-SHA256": sha256}, **headers))

    def complete(self, tx):
        return self.world.call("POST", f"/v1/transactions/{tx}/complete", b"", self.headers)

    def get(self, tx):
        return self.world.call("GET", f"/v1/transactions/{tx}", None, self.headers)

    def archive(self, hour=None, **kwargs):
        hour = hour or self.world.hour
        path = self.world.tmp / f"{self.agent_id}-{uuid.uuid4().hex[:8]}.tar.gz"
        kwargs.setdefault("files", dataset_files(hour))
        return open(archive(path, agent_id=self.agent_id, hour=hour, **kwargs), "rb").read()

    def send(self, data, hour=None, replace=None):
        """The whole flow; returns (transaction id, complete response)."""
        created = self.create(hour, replace)
        assert created.status in (200, 201), created.json
        tx = created.json["transaction_id"]
        uploaded = self.upload(tx, data)
        assert uploaded.status == 200, uploaded.json
        return tx, self.complete(tx)


class World:
    def __init__(self, genv, settings, server, tmp):
        self.genv, self.settings, self.server, self.tmp = genv, settings, server, tmp
        self.port = server.port
        self.hour = hours.last_complete_hour()
        self.state = settings.state

    def call(self, method, path, body=None, headers=None):
        return request(self.port, method, path, body, headers)

    def agent(self, agent_id=None, geo="test"):
        agent_id = agent_id or f"agent-{uuid.uuid4().hex[:8]}"
        with self.genv.mysql() as conn:
            return Agent(self, agent_id, txlog.add_agent(conn, agent_id, geo))

    def admin_headers(self):
        with self.genv.mysql() as conn:
            return {"Authorization": f"Bearer {txlog.add_admin_token(conn, 'ops')}"}

    def events(self, tx):
        with self.genv.mysql() as conn:
            return [e["event"] for e in txlog.events(conn, tx)]

    def files(self, area):
        found = []
        for dirpath, _, names in os.walk(os.path.join(self.state.root, area)):
            found += [os.path.relpath(os.path.join(dirpath, n), self.state.root) for n in names]
        return sorted(found)


def api_settings(genv, **overrides):
    values = dict(mysql=SimpleNamespace(**config.mysql().param_kwargs), state=StateRoot(genv.root),
                  executor=ThreadPoolExecutor(8), max_archive_bytes=MAX_ARCHIVE, retention_hours=48,
                  min_free_bytes=1 << 20, retry_after=7, lock_wait=5)
    values.update(overrides)
    return ApiSettings(**values)


@pytest.fixture
def world(genv, tmp_path):
    settings = api_settings(genv)
    server = ApiServer(settings, genv.api_port)
    yield World(genv, settings, server, tmp_path)
    server.stop()
    settings.executor.shutdown()


# --- the happy path and its retries -------------------------------------------------

def test_create_upload_complete(world):
    agent = world.agent()
    created = agent.create()
    assert created.status == 201
    tx = created.json["transaction_id"]
    assert created.json == {"transaction_id": tx, "agent_id": agent.agent_id, "hour": hours.format_hour(world.hour),
                            "state": "created", "supersedes": None, "size": None, "sha256": None,
                            "upload_url": f"/v1/transactions/{tx}/archive",
                            "complete_url": f"/v1/transactions/{tx}/complete"}
    data = agent.archive(files=dataset_files(world.hour, n=4))
    uploaded = agent.upload(tx, data)
    assert uploaded.status == 200
    assert uploaded.json == {"transaction_id": tx, "state": "uploaded", "size": len(data),
                             "sha256": hashlib.sha256(data).hexdigest()}
    assert os.path.exists(world.state.incoming(tx))
    done = agent.complete(tx)
    assert done.status == 200, done.json
    assert done.json == {"transaction_id": tx, "state": "completed",
                         "rows": {"account_usage": 4, "api_requests": 4, "node_health": 4}}
    final = world.state.upload(world.hour, agent.agent_id, tx)
    assert sha256_file(final) == hashlib.sha256(data).hexdigest()
    assert world.files("incoming") == [] and world.files("quarantine") == []
    got = agent.get(tx)
    assert got.status == 200
    assert got.json["state"] == "completed" and got.json["size"] == len(data) and "archive_path" not in got.json
    assert [e["event"] for e in got.json["events"]] == ["created", "uploaded", "completed"]
    assert got.json["events"][2]["detail"]["rows"]["node_health"] == 4
    assert got.json["rows"] == done.json["rows"]
    assert world.events(tx) == ["created", "uploaded", "completed"]


def test_every_request_repeated_gets_the_same_answer(world):
    agent = world.agent()
    first, again = agent.create(), agent.create()
    assert (first.status, again.status) == (201, 200) and first.json == again.json
    tx, data = first.json["transaction_id"], agent.archive()
    up1, up2 = agent.upload(tx, data), agent.upload(tx, data)
    assert (up1.status, up2.status) == (200, 200) and up1.json == up2.json
    retried = agent.create()  # a retry after the upload tells the agent what already arrived
    assert retried.status == 200 and retried.json["state"] == "uploaded"
    assert retried.json["sha256"] == up1.json["sha256"] and retried.json["size"] == len(data)
    done1, done2 = agent.complete(tx), agent.complete(tx)
    assert (done1.status, done2.status) == (200, 200) and done1.json == done2.json
    assert world.events(tx) == ["created", "uploaded", "completed"]


def test_reupload_before_complete_replaces_the_archive(world):
    agent = world.agent()
    tx = agent.create().json["transaction_id"]
    assert agent.upload(tx, b"first try, not an archive").status == 200
    data = agent.archive()
    assert agent.upload(tx, data).json["sha256"] == hashlib.sha256(data).hexdigest()
    assert agent.complete(tx).status == 200
    assert world.events(tx) == ["created", "uploaded", "uploaded", "completed"]


def test_replacement_flow(world):
    agent = world.agent()
    old, done = agent.send(agent.archive())
    assert done.status == 200
    refused = agent.create()
    assert refused.status == 409
    assert refused.json["transaction_id"] == old and refused.json["status"] == 409
    replacement = agent.create(replace=True)
    assert replacement.status == 201 and replacement.json["supersedes"] == old
    new = replacement.json["transaction_id"]
    assert agent.create(replace=True).json["transaction_id"] == new  # a retry of the replacement
    assert agent.upload(new, agent.archive()).status == 200
    assert agent.complete(new).status == 200
    assert agent.get(old).json["state"] == "superseded"
    assert world.events(old) == ["created", "uploaded", "completed", "superseded"]
    assert agent.complete(old).status == 409
    assert len(world.files("upload")) == 2  # the old archive stays until the pipeline retires it


def test_upload_to_a_completed_transaction_is_refused(world):
    agent = world.agent()
    data = agent.archive()
    tx, _ = agent.send(data)
    resp = agent.upload(tx, data)
    assert resp.status == 409 and resp.json["state"] == "completed"
    assert world.events(tx) == ["created", "uploaded", "completed"]


def test_complete_before_upload_is_refused(world):
    agent = world.agent()
    tx = agent.create().json["transaction_id"]
    resp = agent.complete(tx)
    assert resp.status == 409 and "no uploaded archive" in resp.json["error"]
    assert world.events(tx) == ["created"]


# --- authentication and ownership ------------------------------------------------------

def _revoked(world, agent):
    with world.genv.mysql() as conn:
        txlog.revoke_agent(conn, agent.agent_id)


@pytest.mark.parametrize("headers, status", [
    ({"Authorization": None, "X-Agent-Id": None}, 401),
    ({"Authorization": None}, 401),
    ({"Authorization": "Bearer "}, 401),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, 401),
    ({"Authorization": "Bearer wrong-token"}, 401),
    ({"X-Agent-Id": None}, 401),
    ({"X-Agent-Id": "no-such-agent"}, 401),
    ({"X-Agent-Id": "../../etc"}, 400),
    ({"revoked": True}, 403),
])
def test_agent_authentication(world, headers, status):
    agent = world.agent()
    sent = dict(agent.headers)
    if headers.pop("revoked", False):
        _revoked(world, agent)
    for key, value in headers.items():
        if value is None:
            sent.pop(key)
        else:
            sent[key] = value
    body = json.dumps({"agent_id": sent.get("X-Agent-Id", agent.agent_id), "hour": hours.format_hour(world.hour)})
    resp = world.call("POST", "/v1/transactions", body, sent)
    assert resp.status == status and resp.json["status"] == status and resp.json["error"]
    if status == 401:
        assert resp.headers.getheader("WWW-Authenticate").startswith("Bearer")
    with world.genv.mysql() as conn, conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM transactions")
        assert cur.fetchone()[0] == 0


def test_body_agent_must_be_the_authenticated_one(world):
    agent, other = world.agent(), world.agent()
    resp = agent.create(agent_id=other.agent_id)
    assert resp.status == 403


def test_agent_sees_and_touches_only_its_own_transactions(world):
    owner, intruder = world.agent(), world.agent()
    data = owner.archive()
    tx = owner.create().json["transaction_id"]
    assert intruder.get(tx).status == 404
    assert intruder.upload(tx, data).status == 404
    assert intruder.complete(tx).status == 404
    assert intruder.get(str(uuid.uuid4())).json == {"error": "no such transaction", "status": 404}
    assert world.events(tx) == ["created"]
    assert world.files("incoming") == []


def test_revoked_agent_is_refused_midway(world):
    agent = world.agent()
    tx = agent.create().json["transaction_id"]
    _revoked(world, agent)
    assert agent.upload(tx, agent.archive()).status == 403
    assert agent.complete(tx).status == 403
    assert agent.get(tx).status == 403


def test_admin_reads_any_transaction_and_the_roster(world):
    """Agents registered just now are expected from the current hour on, so the roster is the current hour's."""
    a, b = world.agent("geo-a1"), world.agent("geo-b1")
    world.agent("geo-c1")  # registered, sends nothing
    admin = world.admin_headers()
    hour = world.hour = hours.floor_hour(hours.now())
    tx_a, _ = a.send(a.archive())
    tx_b = b.create().json["transaction_id"]
    got = world.call("GET", f"/v1/transactions/{tx_a}", None, admin)
    assert got.status == 200 and got.json["archive_path"] == world.state.upload(hour, "geo-a1", tx_a)
    assert [e["event"] for e in got.json["events"]] == ["created", "uploaded", "completed"]
    roster = world.call("GET", f"/v1/hours/{hours.format_hour(hour)}/roster", None, admin)
    assert roster.status == 200
    body = roster.json
    assert body["hour"] == hours.format_hour(hour)
    assert set(body["expected"]) >= {"geo-a1", "geo-b1", "geo-c1"}
    assert body["agents"]["geo-a1"]["state"] == "completed"
    assert body["agents"]["geo-b1"]["state"] == "created"
    assert body["agents"]["geo-b1"]["transactions"][0]["transaction_id"] == tx_b
    assert body["agents"]["geo-c1"] == {"expected": True, "state": "missing", "transactions": []}
    assert sorted(body["missing"]) == ["geo-b1", "geo-c1"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer not-admin"}, "agent"])
def test_roster_needs_the_admin_token(world, headers):
    if headers == "agent":
        headers = {"Authorization": world.agent().headers["Authorization"]}
    resp = world.call("GET", f"/v1/hours/{hours.format_hour(world.hour)}/roster", None, headers)
    assert resp.status == 401


def test_roster_hour_must_parse(world):
    resp = world.call("GET", "/v1/hours/yesterday/roster", None, world.admin_headers())
    assert resp.status == 400 and "not a UTC hour" in resp.json["error"]


# --- bad input: ids, hours, bodies, routes -----------------------------------------------

def _hour_text(delta_hours):
    return hours.format_hour(hours.floor_hour(hours.now()) + timedelta(hours=delta_hours))


@pytest.mark.parametrize("body, status, reason", [
    ({"hour": "2026-13-01T00"}, 400, "not a UTC hour"),
    ({"hour": "2026-11-30T05:30"}, 400, "not on the hour"),
    ({"hour": 2026113005}, 400, "hour must be a string"),
    ({"hour": None}, 400, "hour must be a string"),
    ({"hour": "future", "_delta": 1}, 422, "in the future"),
    ({"hour": "old", "_delta": -49}, 422, "older than the retention"),
    ({"replace": "yes"}, 400, "replace must be true or false"),
    ({"agent_id": 7}, 400, "agent_id missing or not a string"),
    ({"agent_id": "../x"}, 400, "malformed agent_id"),
])
def test_create_refuses_bad_input(world, body, status, reason):
    agent = world.agent()
    sent = {"agent_id": agent.agent_id, "hour": hours.format_hour(world.hour)}
    if "_delta" in body:
        body = dict(body, hour=_hour_text(body.pop("_delta")))
    sent.update(body)
    resp = world.call("POST", "/v1/transactions", json.dumps(sent), agent.headers)
    assert (resp.status, resp.json["status"]) == (status, status)
    assert reason in resp.json["error"]


@pytest.mark.parametrize("delta", [0, -48])
def test_current_hour_and_oldest_retained_hour_are_accepted(world, delta):
    agent = world.agent()
    assert world.call("POST", "/v1/transactions", json.dumps({"agent_id": agent.agent_id, "hour": _hour_text(delta)}),
                      agent.headers).status == 201


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b"\xff\xfe", b""])
def test_create_refuses_a_body_that_is_not_a_json_object(world, body):
    agent = world.agent()
    assert world.call("POST", "/v1/transactions", body, agent.headers).status == 400


def test_json_body_over_the_limit_gets_413_before_it_is_read(world):
    agent = world.agent()
    head = (f"POST /v1/transactions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {agent.token}\r\n"
            f"X-Agent-Id: {agent.agent_id}\r\nContent-Length: {1 << 20}\r\n")
    status, body = raw_request(world.port, head)
    assert status == 413 and body["status"] == 413


@pytest.mark.parametrize("method, suffix", [("GET", ""), ("PUT", "/archive"), ("POST", "/complete")])
@pytest.mark.parametrize("bad_id", ["not-a-uuid", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "1234", "0" * 36])
def test_malformed_transaction_ids(world, method, suffix, bad_id):
    agent = world.agent()
    resp = world.call(method, f"/v1/transactions/{bad_id}{suffix}", b"x" if method == "PUT" else None,
                      dict(agent.headers, **{"X-Archive-SHA256": "0" * 64}))
    assert resp.status == 400 and resp.json == {"error": "malformed transaction id", "status": 400}


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/", 404), ("GET", "/v2/transactions", 404), ("POST", "/v1/transactions/x/y/z", 404),
    ("GET", "/v1/transactions", 405), ("DELETE", "/v1/transactions", 405),
])
def test_unknown_routes_and_methods_answer_json(world, method, path, status):
    resp = world.call(method, path)
    assert resp.status == status and resp.json["status"] == status and resp.json["error"]


# --- upload rules -------------------------------------------------------------------------

@pytest.fixture
def open_tx(world):
    agent = world.agent()
    return agent, agent.create().json["transaction_id"]


def test_upload_needs_content_length(world, open_tx):
    agent, tx = open_tx
    head = (f"PUT /v1/transactions/{tx}/archive HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {agent.token}\r\n"
            f"X-Agent-Id: {agent.agent_id}\r\nX-Archive-SHA256: {'0' * 64}\r\nTransfer-Encoding: chunked\r\n")
    status, body = raw_request(world.port, head, b"5\r\nhello\r\n0\r\n\r\n")
    assert status == 411 and body["status"] == 411
    assert world.files("incoming") == []


@pytest.mark.parametrize("sha256", [None, "", "abc", "g" * 64, "0" * 63])
def test_upload_needs_a_sha256(world, open_tx, sha256):
    agent, tx = open_tx
    headers = dict(agent.headers)
    if sha256 is not None:
        headers["X-Archive-SHA256"] = sha256
    resp = world.call("PUT", f"/v1/transactions/{tx}/archive", b"data", headers)
    assert resp.status == 400 and "X-Archive-SHA256" in resp.json["error"]


def test_upload_over_the_limit_gets_413_from_content_length_before_reading(world, open_tx):
    agent, tx = open_tx
    head = (f"PUT /v1/transactions/{tx}/archive HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {agent.token}\r\n"
            f"X-Agent-Id: {agent.agent_id}\r\nX-Archive-SHA256: {'0' * 64}\r\n"
            f"Content-Length: {MAX_ARCHIVE + 1}\r\nExpect: 100-continue\r\n")
    status, body = raw_request(world.port, head)  # no body sent: the answer comes from the head alone
    assert status == 413 and "over the limit" in body["error"]
    assert world.events(tx) == ["created"] and world.files("incoming") == []


def test_upload_at_the_limit_is_accepted(world, open_tx):
    agent, tx = open_tx
    assert agent.upload(tx, os.urandom(MAX_ARCHIVE)).status == 200


def test_checksum_mismatch_removes_the_part_and_changes_nothing(world, open_tx):
    agent, tx = open_tx
    data = agent.archive()
    resp = agent.upload(tx, data, sha256=hashlib.sha256(b"other").hexdigest())
    assert resp.status == 422 and resp.json["received_sha256"] == hashlib.sha256(data).hexdigest()
    assert world.files("incoming") == []
    assert world.events(tx) == ["created"]
    assert agent.get(tx).json["state"] == "created"
    assert agent.upload(tx, data).status == 200  # and the agent can simply try again


def test_checksum_mismatch_keeps_an_earlier_good_upload(world, open_tx):
    agent, tx = open_tx
    data = agent.archive()
    assert agent.upload(tx, data).status == 200
    assert agent.upload(tx, b"garbage", sha256="0" * 64).status == 422
    assert world.files("incoming") == [os.path.relpath(world.state.incoming(tx), world.state.root)]
    assert agent.complete(tx).status == 200


def test_upload_refused_when_the_disk_is_near_its_floor(genv, tmp_path):
    settings = api_settings(genv, min_free_bytes=1 << 60)
    server = ApiServer(settings, genv.api_port)
    try:
        world = World(genv, settings, server, tmp_path)
        agent = world.agent()
        tx = agent.create().json["transaction_id"]
        resp = agent.upload(tx, b"x" * 1000)
        assert resp.status == 507 and world.files("incoming") == []
        health = world.call("GET", "/healthz")
        assert health.status == 503 and health.json["checks"]["disk"]["ok"] is False
        assert health.json["checks"]["mysql"]["ok"] is True
    finally:
        server.stop()


def test_client_disconnect_mid_upload_leaves_nothing(world, open_tx):
    agent, tx = open_tx
    head = (f"PUT /v1/transactions/{tx}/archive HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {agent.token}\r\n"
            f"X-Agent-Id: {agent.agent_id}\r\nX-Archive-SHA256: {'0' * 64}\r\nContent-Length: 1000000\r\n\r\n")
    with socket.create_connection(("127.0.0.1", world.port)) as s:
        s.sendall(head.encode() + b"x" * 300000)
        deadline = time.time() + 10
        while not [f for f in world.files("incoming") if f.endswith(".tmp")] and time.time() < deadline:
            time.sleep(0.02)
    deadline = time.time() + 10
    while world.files("incoming") and time.time() < deadline:
        time.sleep(0.05)
    assert world.files("incoming") == []
    assert world.events(tx) == ["created"]


# --- invalid archives: failed + quarantined -------------------------------------------------

INVALID = {
    "not gzip": (lambda world, agent: b"plain text, not an archive", "not a gzip'd tar archive"),
    "wrong agent in manifest": (lambda world, agent: agent.archive(
        manifest=manifest_for("geo-someone-else", world.hour, dataset_files(world.hour))),
        "not the transaction's agent"),
    "wrong hour in manifest": (lambda world, agent: agent.archive(
        manifest=manifest_for(agent.agent_id, world.hour - timedelta(hours=1), dataset_files(world.hour))),
        "not the transaction's hour"),
}
INVALID.update({name: ((lambda kw: lambda world, agent: agent.archive(**_rehour(kw, world.hour)))(kwargs), reason)
                for name, (kwargs, reason) in BAD.items()
                if name in ("symlink", "hardlink", "char device", "fifo", "absolute path", "dot-dot path",
                            "unknown dataset", "missing dataset", "negative value", "bad utf-8", "header mismatch")})


def _rehour(kwargs, hour):
    """BAD's cases are built for a fixed hour; move their files to the test's hour."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("agent_id", "hour")}
    if "files" in kwargs:
        files = dict(kwargs["files"])
        if "node_health" in files and b"2026-11-30T05:" in files["node_health"]:
            files["node_health"] = dataset_files(hour)["node_health"]
        kwargs["files"] = files
    return kwargs


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_archive_fails_the_transaction_and_is_quarantined(world, case):
    build, reason = INVALID[case]
    agent = world.agent()
    tx = agent.create().json["transaction_id"]
    data = build(world, agent)
    assert agent.upload(tx, data).status == 200
    resp = agent.complete(tx)
    assert resp.status == 422, resp.json
    assert resp.json["state"] == "failed" and reason in resp.json["error"] and resp.json["status"] == 422
    held = world.state.quarantine(world.hour, agent.agent_id, tx)
    assert open(held, "rb").read() == data
    record = json.load(open(held[: -len(".tar.gz")] + ".reason.json"))
    assert record["reason"] == resp.json["error"] and record["transaction_id"] == tx
    assert world.files("incoming") == [] and world.files("upload") == []
    got = agent.get(tx).json
    assert got["state"] == "failed" and got["error"] == resp.json["error"]
    assert world.events(tx) == ["created", "uploaded", "failed"]
    assert agent.complete(tx).json == resp.json  # asked again: the same answer, nothing changes
    assert world.events(tx) == ["created", "uploaded", "failed"]
    assert agent.create().status == 201  # the agent may start over for the hour


def test_server_copy_that_no_longer_matches_asks_for_a_new_upload(world, open_tx):
    agent, tx = open_tx
    data = agent.archive()
    assert agent.upload(tx, data).status == 200
    with open(world.state.incoming(tx), "r+b") as f:  # the disk lost the tail
        f.truncate(len(data) // 2)
    resp = agent.complete(tx)
    assert resp.status == 409 and "upload it again" in resp.json["error"]
    assert agent.get(tx).json["state"] == "uploaded" and world.files("quarantine") == []
    assert agent.upload(tx, data).status == 200
    assert agent.complete(tx).status == 200


def test_complete_finishes_a_move_interrupted_before_the_log_update(world, open_tx):
    agent, tx = open_tx
    data = agent.archive()
    agent.upload(tx, data)
    final = world.state.upload(world.hour, agent.agent_id, tx)
    os.makedirs(os.path.dirname(final))
    os.replace(world.state.incoming(tx), final)  # as if the process died right after the move
    resp = agent.complete(tx)
    assert resp.status == 200 and resp.json["rows"]["account_usage"] == 3
    assert sha256_file(final) == hashlib.sha256(data).hexdigest()


# --- MySQL down ---------------------------------------------------------------------------

def test_mysql_down_gives_503_and_recovers_by_itself(world, open_tx):
    agent, tx = open_tx
    data = agent.archive()
    real_port = world.settings.mysql.port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        world.settings.mysql.port = s.getsockname()[1]  # nothing listens there once s closes
    try:
        for resp in (agent.create(), agent.upload(tx, data), agent.complete(tx), agent.get(tx),
                     world.call("GET", f"/v1/hours/{hours.format_hour(world.hour)}/roster", None,
                                {"Authorization": "Bearer x"})):
            assert resp.status == 503, resp.json
            assert resp.json == {"error": "database unavailable; retry later", "status": 503}
            assert resp.headers.getheader("Retry-After") == "7"
        health = world.call("GET", "/healthz")
        assert health.status == 503 and health.json["checks"]["mysql"] == {"ok": False, "detail": "unreachable"}
        assert health.json["checks"]["state_root"]["ok"] is True
    finally:
        world.settings.mysql.port = real_port
    assert world.files("incoming") == []
    assert world.call("GET", "/healthz").status == 200
    assert agent.upload(tx, data).status == 200
    assert agent.complete(tx).status == 200


@pytest.fixture
def proxied(genv, tmp_path):
    """A world whose API reaches MySQL through a proxy the test can cut: (world, proxy)."""
    proxy = F.TcpProxy(("127.0.0.1", 3306))
    settings = api_settings(genv)
    settings.mysql.port = proxy.port
    server = ApiServer(settings, genv.api_port)
    yield World(genv, settings, server, tmp_path), proxy
    server.stop()
    proxy.close()
    settings.executor.shutdown()


def test_mysql_dying_under_pooled_connections_gives_503_then_recovers(proxied):
    world, proxy = proxied
    agent = world.agent()
    tx = agent.create().json["transaction_id"]  # leaves warm connections in the pool
    assert agent.get(tx).status == 200
    proxy.down()
    for resp in (agent.get(tx), agent.create(), agent.upload(tx, agent.archive()), world.call("GET", "/healthz")):
        assert resp.status == 503 and resp.headers.getheader("Retry-After") == "7"
    proxy.up()
    data = agent.archive()
    assert agent.get(tx).status == 200
    assert agent.upload(tx, data).status == 200
    assert agent.complete(tx).status == 200
    assert world.call("GET", "/healthz").status == 200


def test_mysql_lost_after_the_body_leaves_no_temp_file(proxied):
    world, proxy = proxied
    agent = world.agent()
    tx, data = agent.create().json["transaction_id"], agent.archive()
    head = (f"PUT /v1/transactions/{tx}/archive HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {agent.token}\r\n"
            f"X-Agent-Id: {agent.agent_id}\r\nX-Archive-SHA256: {hashlib.sha256(data).hexdigest()}\r\n"
            f"Content-Length: {len(data)}\r\n\r\n")
    exchange = F.RawExchange(world.port)
    exchange.send(head.encode())
    F.wait_for(lambda: world.files("incoming"), what="the upload's temp file")  # authenticated and checked
    proxy.down()
    exchange.send(data)
    assert exchange.reply()[0] == 503
    exchange.close()
    assert world.files("incoming") == []
    proxy.up()
    assert world.events(tx) == ["created"]


def test_complete_while_another_request_holds_the_transaction(world, open_tx):
    agent, tx = open_tx
    agent.upload(tx, agent.archive())
    world.settings.lock_wait = 1
    with world.genv.mysql() as conn, conn.cursor() as cur:
        cur.execute("SELECT GET_LOCK(%s, 0)", (f"ganymede-tx-{tx}",))
        busy = agent.complete(tx)
        assert busy.status == 503 and "retry" in busy.json["error"]
        assert busy.headers.getheader("Retry-After") == "7"
        cur.execute("SELECT RELEASE_LOCK(%s)", (f"ganymede-tx-{tx}",))
    assert agent.complete(tx).status == 200


def test_healthz(world):
    resp = world.call("GET", "/healthz")
    assert resp.status == 200
    assert resp.json["ok"] is True
    assert {name: check["ok"] for name, check in resp.json["checks"].items()} == {
        "mysql": True, "state_root": True, "disk": True}


# --- concurrency ------------------------------------------------------------------------------

def test_twenty_agents_upload_at_once(world):
    agents = [world.agent(f"geo-{i:02d}") for i in range(20)]
    archives_ = {a.agent_id: a.archive(files=dataset_files(world.hour, n=200)) for a in agents}
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda a: a.send(archives_[a.agent_id]), agents))
    for agent, (tx, resp) in zip(agents, results):
        assert resp.status == 200, resp.json
        assert resp.json["rows"] == {"account_usage": 200, "api_requests": 200, "node_health": 200}
        assert sha256_file(world.state.upload(world.hour, agent.agent_id, tx)) == \
            hashlib.sha256(archives_[agent.agent_id]).hexdigest()
    assert len(world.files("upload")) == 20 and world.files("incoming") == []


def test_concurrent_retries_of_one_agent_agree(world):
    agent = world.agent()
    with ThreadPoolExecutor(8) as pool:
        created = list(pool.map(lambda _: agent.create(), range(8)))
    assert sorted(r.status for r in created) == [200] * 7 + [201]
    assert len({r.json["transaction_id"] for r in created}) == 1
    tx, data = created[0].json["transaction_id"], agent.archive()
    with ThreadPoolExecutor(4) as pool:
        assert {r.status for r in pool.map(lambda _: agent.upload(tx, data), range(4))} == {200}
    with ThreadPoolExecutor(4) as pool:
        done = list(pool.map(lambda _: agent.complete(tx), range(4)))
    done += [agent.complete(tx) for r in done if r.status == 429]  # beyond completes_per_agent: retry later
    assert {r.status for r in done} >= {200} and {r.status for r in done} <= {200, 429}
    assert len({json.dumps(r.json) for r in done if r.status == 200}) == 1
    assert world.events(tx).count("completed") == 1


# --- the ganymede-api command -----------------------------------------------------------------

def _wait_for(port, scheme="http", context=None, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
            kwargs = {"context": context} if context else {}
            conn = cls("127.0.0.1", port, timeout=5, **kwargs)
            conn.request("GET", "/healthz")
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        except ssl.SSLError:
            raise
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"ganymede-api did not answer on port {port}")


def _command():
    return os.path.join(os.path.dirname(sys.executable), "ganymede-api")


def test_ganymede_api_command_serves_and_stops_on_sigterm(genv):
    proc = subprocess.Popen([_command(), "--config", genv.config_path], env=genv.subprocess_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        status, body = _wait_for(genv.api_port)
        assert status == 200 and body["ok"] is True
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=20)[0].decode()
    assert proc.returncode == 0, out
    assert "listening on http://127.0.0.1" in out


def test_ganymede_api_command_with_tls(genv, tmp_path):
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    os.chmod(key, 0o600)
    genv.write_config(api={"tls_cert": cert, "tls_key": key})
    proc = subprocess.Popen([_command(), "--config", genv.config_path], env=genv.subprocess_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        context = ssl.create_default_context(cafile=cert)
        status, body = _wait_for(genv.api_port, "https", context)
        assert status == 200 and body["ok"] is True
        with pytest.raises(ssl.SSLError):  # an untrusting client refuses the self-signed certificate
            _wait_for(genv.api_port, "https", ssl.create_default_context(), timeout=2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0


def test_ganymede_api_command_refuses_a_world_readable_tls_key(genv, tmp_path):
    key = tmp_path / "key.pem"
    key.write_text("not really a key")
    key.chmod(0o644)
    genv.write_config(api={"tls_cert": str(tmp_path / "cert.pem"), "tls_key": str(key)})
    proc = subprocess.run([_command(), "--config", genv.config_path], env=genv.subprocess_env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "readable by everyone" in proc.stderr


@pytest.mark.parametrize("api, message", [
    ({"tls_cert": "/nonexistent/cert.pem"}, "tls_cert and tls_key go together"),
    ({"tls_cert": "/nonexistent/cert.pem", "tls_key": "/nonexistent/key.pem"}, "cannot load TLS certificate"),
])
def test_ganymede_api_command_refuses_bad_tls_settings(genv, api, message):
    genv.write_config(api=api)
    proc = subprocess.run([_command(), "--config", genv.config_path], env=genv.subprocess_env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and message in proc.stderr
