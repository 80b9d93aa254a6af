"""The GEO agent: its pieces (config, spool, retries, reading, archives), then the
`ganymede-agent` command against the real API (`ganymede-api` subprocess) and a
real GEO database in MariaDB made by the generator.
"""
import ast
import csv
import glob
import gzip
import hashlib
import http.client
import http.server
import io
import json
import os
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
import uuid
from contextlib import closing
from datetime import timedelta
from types import SimpleNamespace

import pytest

from ganymede import generator, hours
from ganymede.stores import txlog
from ganymede_agent import archive, cli, collect, config, spool
from ganymede_agent.client import Api, RetryBudget, Unavailable, parse_retry_after

from conftest import free_port, require_port

BIN = os.path.dirname(sys.executable)
AGENT = os.path.join(BIN, "ganymede-agent")
AGENT_DIR = os.path.dirname(os.path.abspath(archive.__file__))


def recent(n):
    """The UTC hour n hours before the last complete one, as the command line writes it."""
    return hours.format_hour(hours.last_complete_hour() - timedelta(hours=n))


# --- fixtures and helpers ----------------------------------------------------------------

@pytest.fixture
def geo_db():
    """A GEO database of the demo schema, with a unique name; dropped afterwards."""
    require_port("127.0.0.1", 3306, "MariaDB")
    name = f"ggeo_{uuid.uuid4().hex[:10]}"
    conn = generator.create_database(name)
    yield SimpleNamespace(name=name, conn=conn)
    conn.close()
    generator.drop_database(name)


class ApiProcess:
    """`ganymede-api` as production runs it, on genv's port and state root."""

    def __init__(self, genv, log_path):
        self.genv, self.log_path, self.proc = genv, str(log_path), None
        self.url = f"http://127.0.0.1:{genv.api_port}"

    def start(self):
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([os.path.join(BIN, "ganymede-api")], env=self.genv.subprocess_env,
                                     stdout=log, stderr=subprocess.STDOUT)
        for _ in range(200):
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=1).read()
                return self
            except OSError:
                assert self.proc.poll() is None, open(self.log_path).read()
                time.sleep(0.05)
        raise AssertionError(f"ganymede-api did not answer on {self.url}: {open(self.log_path).read()}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def api(genv, tmp_path):
    server = ApiProcess(genv, tmp_path / "api.log")
    yield server
    server.stop()


class Agent:
    """One registered agent with its config, spool and GEO database."""

    def __init__(self, genv, geo_db, tmp_path, api_url, agent_id="geo-test-1", **settings):
        self.genv, self.geo_db, self.agent_id = genv, geo_db, agent_id
        with closing(genv.mysql()) as conn:
            self.token = txlog.add_agent(conn, agent_id, "test-geo")
        self.spool_dir = str(tmp_path / "spool")
        self.config_path = str(tmp_path / "agent.cfg")
        self.settings = dict(api_url=api_url, agent_id=agent_id, token=self.token, geo="test-geo",
                             database=geo_db.name, spool_dir=self.spool_dir, retry_budget_seconds=0.5,
                             retry_base_seconds=0.05, retry_cap_seconds=0.2, request_timeout_seconds=10)
        self.configure(**settings)

    def configure(self, **settings):
        self.settings.update(settings)
        generator.write_agent_config(self.config_path, **self.settings)

    def command(self, *args):
        return [AGENT, "--config", self.config_path, *args]

    def run(self, *args, timeout=120):
        result = subprocess.run(self.command(*args), capture_output=True, text=True, timeout=timeout)
        print(result.stdout, result.stderr)
        return result

    def popen(self, *args):
        return subprocess.Popen(self.command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def spooled(self):
        return sorted(n for n in os.listdir(self.spool_dir) if n.endswith(".tar.gz"))

    def state(self):
        with open(os.path.join(self.spool_dir, "state.json")) as f:
            return json.load(f)

    def transactions(self, hour=None):
        with closing(self.genv.mysql()) as conn, conn.cursor() as cur:
            cur.execute("SELECT transaction_id, hour, state, sha256, completed_at FROM transactions "
                        "WHERE agent_id = %s" + (" AND hour = %s" if hour else "") + " ORDER BY created_at",
                        (self.agent_id, hours.parse_hour(hour)) if hour else (self.agent_id,))
            return [dict(zip(("transaction_id", "hour", "state", "sha256", "completed_at"), r)) for r in cur.fetchall()]

    def completed_rows(self, transaction_id):
        with closing(self.genv.mysql()) as conn:
            events = txlog.events(conn, transaction_id)
        return [e["detail"]["rows"] for e in events if e["event"] == "completed"][0]


class StandIn:
    """A tiny HTTP server in front of the real API, standing in for the failures the
    real API cannot be made to produce on demand: 5xx, 429/503 with Retry-After, a
    reset connection, an answer lost after the work was done, a request held at a
    chosen moment. Whatever it is not told to break, it forwards to `upstream`.

    `plan(method, path_pattern, *actions)` queues actions for matching requests,
    one per request: ("status", code, headers), "reset", "forward_then_reset",
    "hold" (parks the request until `release()`, then drops it unanswered).
    """

    def __init__(self, upstream_port=None):
        self.upstream_port, self.plans, self.seen = upstream_port, [], []
        self.held, self.released = threading.Event(), threading.Event()
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle_one_request(self):
                self.close_connection = True
                try:
                    super().handle_one_request()
                except OSError:
                    pass

            def do_GET(self):
                stand_in.handle(self)

            do_POST = do_PUT = do_GET

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def plan(self, method, pattern, *actions):
        self.plans.append([method, re.compile(pattern), list(actions)])

    def release(self):
        self.released.set()

    def close(self):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()

    def handle(self, h):
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        action = "forward"
        for method, pattern, actions in self.plans:
            if method == h.command and pattern.search(h.path) and actions:
                action = actions.pop(0)
                break
        self.seen.append((h.command, h.path, action if isinstance(action, str) else action[1]))
        if action == "reset":
            return _reset(h.connection)
        if action == "hold":
            self.held.set()
            self.released.wait(60)
            return _reset(h.connection)
        if isinstance(action, tuple):
            _, status, headers = action
            return _answer(h, status, {"error": f"stand-in {status}", "status": status}, headers)
        status, headers, data = self.forward(h, body)
        if action == "forward_then_reset":
            return _reset(h.connection)
        h.send_response(status)
        for k, v in headers:
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def forward(self, h, body):
        if self.upstream_port is None:
            return 200, [("Content-Type", "application/json")], b'{"ok": true}'
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=30)
        try:
            keep = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "connection")}
            conn.request(h.command, h.path, body=body, headers=keep)
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        finally:
            conn.close()


def _answer(h, status, body, headers=None):
    data = json.dumps(body).encode()
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)


def _reset(sock):
    """Close with an RST: the client sees 'connection reset by peer'."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.fixture
def stand_in():
    servers = []

    def make(upstream_port=None):
        servers.append(StandIn(upstream_port))
        return servers[-1]
    yield make
    for server in servers:
        server.close()


def delivered_hours(stderr):
    return re.findall(r"hour (\S+) delivered", stderr)


# --- the agent imports nothing but the standard library and pymysql ---------------------------

def test_agent_imports_only_stdlib_and_pymysql():
    imported = set()
    for name in os.listdir(AGENT_DIR):
        if name.endswith(".py"):
            for node in ast.walk(ast.parse(open(os.path.join(AGENT_DIR, name)).read())):
                if isinstance(node, ast.Import):
                    imported.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    imported.add(node.module.split(".")[0])
    assert imported - set(sys.stdlib_module_names) == {"pymysql"}

    # and at run time, with the server's packages made unimportable
    code = f"""
import sys
sys.path.insert(0, {os.path.dirname(AGENT_DIR)!r})
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ganymede", "luigi", "tornado", "pymongo", "boto3", "botocore", "bson"):
            raise ImportError("the agent must not import " + name)
sys.meta_path.insert(0, Blocker())
import ganymede_agent.cli
sys.exit(ganymede_agent.cli.main(["--version"]))
"""
    result = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("ganymede-agent "), result.stderr


def test_the_agent_alone_installs_with_pymysql_as_its_only_dependency(tmp_path):
    """agent/setup.py: what a GEO server installs (`pip install ./agent`), the package and its command only."""
    import shutil
    source = tmp_path / "agent"
    shutil.copytree(os.path.dirname(AGENT_DIR), source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(target), str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    installed = {p.name for p in target.iterdir()}
    assert "ganymede_agent" in installed and "ganymede" not in installed
    assert (target / "ganymede_agent" / "agent.cfg.sample").exists()
    metadata = next(target.glob("ganymede_agent-*.dist-info")) / "METADATA"
    assert [line for line in metadata.read_text().splitlines() if line.startswith("Requires-Dist")] == \
        ["Requires-Dist: pymysql<2,>=1.1"]
    assert "ganymede-agent = ganymede_agent.cli:main" in (metadata.parent / "entry_points.txt").read_text()
    version = subprocess.run([str(target / "bin" / "ganymede-agent"), "--version"], capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=str(target)))
    assert version.returncode == 0 and version.stdout.startswith("ganymede-agent "), version.stderr


# --- config ------------------------------------------------------------------------------------

def write_cfg(path, text, mode=0o600):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return str(path)


GOOD = """[agent]
agent_id = geo-1
geo = g
[api]
url = http://127.0.0.1:1
token = secret
[database]
database = geo
[spool]
dir = /tmp/x
[datasets]
account_usage = SELECT a FROM t WHERE h >= %(start)s AND h < %(end)s;
"""


def test_config_loads_and_agent_id_overrides(tmp_path):
    cfg = config.load(write_cfg(tmp_path / "a.cfg", GOOD))
    assert (cfg.agent_id, cfg.api_url, cfg.database.port, cfg.retry.budget_seconds) == (
        "geo-1", "http://127.0.0.1:1", 3306, 300)
    assert cfg.datasets == {"account_usage": "SELECT a FROM t WHERE h >= %(start)s AND h < %(end)s"}
    assert "secret" not in repr(cfg)
    assert config.load(str(tmp_path / "a.cfg"), agent_id="other").agent_id == "other"


def test_config_of_the_removed_client_reader_still_loads_with_a_warning(tmp_path, caplog):
    path = write_cfg(tmp_path / "a.cfg", GOOD.replace("database = geo\n", "database = geo\nreader = auto\n"
                                                                            "client_path = /usr/bin/mariadb\n"))
    assert config.load(path).database.database == "geo"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "[database] reader, client_path ignored" in warning and "\n" not in warning


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o700])
def test_config_refused_unless_owner_only(tmp_path, mode):
    path = write_cfg(tmp_path / "a.cfg", GOOD, mode)
    with pytest.raises(config.ConfigError, match=f"mode {mode:04o}"):
        config.load(path)


@pytest.mark.parametrize("change, message", [
    (("token = secret\n", ""), r"\[api\] token is required"),
    (("url = http://127.0.0.1:1", "url = ftp://x"), "must be an http"),
    (("AND h < %(end)s;", ""), "must use %\\(start\\)s and %\\(end\\)s"),
    (("[spool]\ndir = /tmp/x\n", "[spool]\ndir = /tmp/x\nmax_mb = lots\n"), "must be a number"),
    (("agent_id = geo-1", "agent_id = bad id!"), "not a plain identifier"),
    (("account_usage =", "Account-Usage ="), "dataset name"),
])
def test_config_errors_are_one_line(tmp_path, change, message):
    path = write_cfg(tmp_path / "a.cfg", GOOD.replace(*change))
    with pytest.raises(config.ConfigError, match=message) as exc:
        config.load(path)
    assert "\n" not in str(exc.value)


def test_cli_refuses_a_readable_config_with_exit_2(tmp_path):
    path = write_cfg(tmp_path / "a.cfg", GOOD, 0o644)
    result = subprocess.run([AGENT, "--config", path], capture_output=True, text=True)
    assert result.returncode == cli.EXIT_USAGE
    assert result.stderr.count("\n") == 1 and "mode 0644" in result.stderr and "chmod 600" in result.stderr
    result = subprocess.run([AGENT, "--config", str(tmp_path / "missing.cfg")], capture_output=True, text=True)
    assert result.returncode == cli.EXIT_USAGE and "does not exist" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--hour", "2026-11-30"], "not a UTC hour"),
    (["--hour", "2999-01-01T00"], "not complete yet"),
    (["--backfill", "2026-11-30T05", "2026-11-30T01"], "is after TO"),
    (["--hour", "2026-11-30T05", "--backfill", "2026-11-30T01", "2026-11-30T02"], "not allowed with"),
])
def test_cli_usage_errors_exit_2(tmp_path, args, message):
    path = write_cfg(tmp_path / "a.cfg", GOOD)
    result = subprocess.run([AGENT, "--config", path, *args], capture_output=True, text=True)
    assert result.returncode == cli.EXIT_USAGE and message in result.stderr


def test_due_hours_catch_up_and_uncollected():
    now = hours.parse_hour("2026-11-30T10").replace(minute=7)
    assert cli.due_hours({}, 24, now) == ["2026-11-30T09"]
    assert cli.due_hours({"last_collected": "2026-11-30T06"}, 24, now) == ["2026-11-30T07", "2026-11-30T08",
                                                                            "2026-11-30T09"]
    assert cli.due_hours({"last_collected": "2026-11-29T00", "uncollected": ["2026-11-28T03"]}, 2, now) == [
        "2026-11-28T03", "2026-11-30T08", "2026-11-30T09"]
    assert cli.due_hours({"last_collected": "2026-11-30T09"}, 24, now) == []  # a second run in the hour: spool only


# --- spool ---------------------------------------------------------------------------------------

def spool_archive(sp, hour, size=1000):
    with open(sp.path_for(hour), "wb") as f:
        f.write(os.urandom(size))


def test_spool_lock_excludes_a_second_holder(tmp_path):
    sp = spool.Spool(str(tmp_path / "s"), "a1", 1 << 20)
    with sp.locked():
        with pytest.raises(spool.SpoolLocked, match=f"pid {os.getpid()}"):
            with spool.Spool(str(tmp_path / "s"), "a1", 1 << 20).locked():
                pass
    with sp.locked():
        pass
    assert stat.S_IMODE(os.stat(tmp_path / "s").st_mode) == 0o700


def test_spool_belongs_to_one_agent(tmp_path):
    with spool.Spool(str(tmp_path / "s"), "a1", 1 << 20).locked():
        pass
    with pytest.raises(spool.SpoolError, match="belongs to agent 'a1'"):
        with spool.Spool(str(tmp_path / "s"), "a2", 1 << 20).locked():
            pass


def test_spool_drops_oldest_over_the_limit_loudly(tmp_path, caplog):
    sp = spool.Spool(str(tmp_path / "s"), "a1", 2500)
    with sp.locked():
        for hour in ("2026-11-30T03", "2026-11-30T01", "2026-11-30T02", "2026-11-30T04"):
            spool_archive(sp, hour)
        assert sp.hours() == ["2026-11-30T01", "2026-11-30T02", "2026-11-30T03", "2026-11-30T04"]
        assert sp.enforce_limit(keep="2026-11-30T04") == ["2026-11-30T01", "2026-11-30T02"]
        assert sp.hours() == ["2026-11-30T03", "2026-11-30T04"]
        sp.max_bytes = 10
        assert sp.enforce_limit(keep="2026-11-30T04") == ["2026-11-30T03"]
        assert sp.hours() == ["2026-11-30T04"]  # the hour just built stays, whatever its size
    state = sp.read_state()
    assert state["dropped"] == 3 and state["dropped_hours"] == ["2026-11-30T01", "2026-11-30T02", "2026-11-30T03"]
    assert sum("SPOOL FULL" in r.message for r in caplog.records) == 3


def test_spool_reject_keeps_archive_and_reason(tmp_path):
    sp = spool.Spool(str(tmp_path / "s"), "a1", 1 << 20)
    with sp.locked():
        spool_archive(sp, "2026-11-30T05")
        sp.reject("2026-11-30T05", {"status": 422, "error": "bad row"})
        assert sp.hours() == []
    assert os.path.exists(tmp_path / "s" / "rejected" / "2026113005.tar.gz")
    reason = json.load(open(tmp_path / "s" / "rejected" / "2026113005.reason.json"))
    assert reason["status"] == 422 and reason["error"] == "bad row" and reason["hour"] == "2026-11-30T05"


def test_spool_removes_half_built_leftovers(tmp_path):
    sp = spool.Spool(str(tmp_path / "s"), "a1", 1 << 20)
    os.makedirs(tmp_path / "s" / ".build-abc")
    open(tmp_path / "s" / "2026113005.tar.gz.tmp", "w").close()
    with sp.locked():
        assert sorted(os.listdir(tmp_path / "s")) == ["lock", "rejected", "state.json"]


# --- retries, against a stand-in server ------------------------------------------------------------

class Recorder:
    """Stands in for the clock and sleep of a RetryBudget: records each delay and lets no real time pass."""

    def __init__(self):
        self.delays, self.now = [], 0.0

    def __call__(self, seconds):
        self.delays.append(seconds)
        self.now += seconds

    def clock(self):
        return self.now


def make_api(url, budget=5.0, sleep=None):
    sleep = sleep or Recorder()
    return Api(url, "a1", "tok", 5, RetryBudget(budget, 0.01, 0.05, clock=sleep.clock, sleep=sleep))


def test_transient_failures_are_retried_until_success(stand_in):
    server = stand_in()
    server.plan("POST", "^/v1/x$", ("status", 500, {}), ("status", 429, {"Retry-After": "2"}), "reset",
                ("status", 503, {"Retry-After": "1"}), ("status", 502, {}))
    sleep = Recorder()
    response = make_api(server.url, sleep=sleep).call("POST", "/v1/x", {"a": 1})
    assert response.status == 200 and response.body == {"ok": True}
    assert [s[2] for s in server.seen] == [500, 429, "reset", 503, 502, "forward"]
    assert sleep.delays[1] == 2.0 and sleep.delays[3] == 1.0  # Retry-After honoured
    assert all(0 <= d <= 0.05 for i, d in enumerate(sleep.delays) if i not in (1, 3))  # jitter under the cap


def test_retry_budget_runs_out(stand_in):
    server = stand_in()
    server.plan("GET", "/v1/x", *[("status", 503, {})] * 1000)
    sleep = Recorder()
    with pytest.raises(Unavailable, match="HTTP 503.*retry budget of 0.3s used up"):
        make_api(server.url, budget=0.3, sleep=sleep).call("GET", "/v1/x")
    assert len(sleep.delays) >= 6 and sum(sleep.delays) <= 0.3  # retried (delays <= 0.05 each) within the budget
    assert len(server.seen) == len(sleep.delays) + 1


def test_retry_after_beyond_the_budget_gives_up_at_once(stand_in):
    server = stand_in()
    server.plan("GET", "/v1/x", ("status", 429, {"Retry-After": "3600"}))
    sleep = Recorder()
    with pytest.raises(Unavailable):
        make_api(server.url, budget=5, sleep=sleep).call("GET", "/v1/x")
    assert sleep.delays == [] and len(server.seen) == 1


def test_connection_refused_is_transient():
    with pytest.raises(Unavailable, match="(?i)refused"):
        make_api(f"http://127.0.0.1:{free_port()}", budget=0.2).call("GET", "/v1/x")


def test_other_4xx_are_answered_not_retried(stand_in):
    server = stand_in()
    server.plan("GET", "/v1/x", ("status", 404, {}))
    assert make_api(server.url).call("GET", "/v1/x").status == 404
    assert len(server.seen) == 1


@pytest.mark.parametrize("attempt, expected", [(0, 1.0), (1, 2.0), (3, 8.0), (6, 60.0), (20, 60.0)])
def test_backoff_is_exponential_with_a_cap(attempt, expected):
    budget = RetryBudget(300, 1.0, 60.0, rng=lambda: 1.0)
    assert budget.delay(attempt) == expected
    assert RetryBudget(300, 1.0, 60.0, rng=lambda: 0.25).delay(attempt) == expected / 4  # full jitter


@pytest.mark.parametrize("value, expected", [
    ("7", 7.0), ("", None), (None, None), ("soon", None), ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0)])
def test_retry_after_parsing(value, expected):
    from datetime import datetime, timezone
    now = datetime(2015, 10, 21, 7, 28, 0, tzinfo=timezone.utc)
    assert parse_retry_after(value, now) == expected


# --- reading and archives --------------------------------------------------------------------------

# Every class of value as stored in the GEO database, and the exact CSV the archive must carry for it,
# both written out by hand: the csv module's quoting ('\r' rows fully quoted), SQL NULL as an empty field.
TEXTS = [  # (id, v TEXT, b VARBINARY)
    (1, "NULL", b"bin"), (2, "\\N", None), (3, "", None), (4, None, None), (5, "a\tb", None),
    (6, "a\nb", None), (7, "a\rb", None), (8, "a\r\nb", None), (9, "back\\slash", None),
    (10, 'say "hi"', None), (11, "it's", None), (12, "a,b", None), (13, "é ünïcode ✓ 😀", "é".encode()),
    (14, "  x  ", None), (15, '"', None),
]
TEXTS_CSV = ('id,v,b\n1,NULL,bin\n2,\\N,\n3,,\n4,,\n5,a\tb,\n6,"a\nb",\n"7","a\rb",""\n"8","a\r\nb",""\n'
             '9,back\\slash,\n10,"say ""hi""",\n11,it\'s,\n12,"a,b",\n13,é ünïcode ✓ 😀,é\n14,  x  ,\n15,"""",\n')
TEXTS_READ = [["id", "v", "b"], ["1", "NULL", "bin"], ["2", "\\N", ""], ["3", "", ""], ["4", "", ""],
              ["5", "a\tb", ""], ["6", "a\nb", ""], ["7", "a\rb", ""], ["8", "a\r\nb", ""], ["9", "back\\slash", ""],
              ["10", 'say "hi"', ""], ["11", "it's", ""], ["12", "a,b", ""], ["13", "é ünïcode ✓ 😀", "é"],
              ["14", "  x  ", ""], ["15", '"', ""]]
NUMS_READ = [
    ["id", "big", "neg", "d", "d2", "dec", "at", "at6", "ts"],
    ["1", "18446744073709551615", "-5", "0.1", "1e300", "12.500000", "2026-11-30T05:10:00",
     "2026-11-30T05:10:00.250000", "2026-11-30T05:00:00"],  # ts was written as 07:00 in a +02:00 session
    ["2", "0", "0", "-0.00000025", "123456789.125", "-0.000001", "2026-11-30T05:59:59", "", ""],
]
ANY_HOUR = "WHERE %(start)s IS NOT NULL AND %(end)s IS NOT NULL ORDER BY id"


def exact_tables(geo_db):
    with geo_db.conn.cursor() as cur:
        cur.execute("CREATE TABLE texts (id INT PRIMARY KEY, v TEXT NULL, b VARBINARY(20) NULL) DEFAULT CHARSET=utf8mb4")
        cur.executemany("INSERT INTO texts VALUES (%s, %s, %s)", TEXTS)
        cur.execute("CREATE TABLE nums (id INT PRIMARY KEY, big BIGINT UNSIGNED, neg INT, d DOUBLE, d2 DOUBLE, "
                    "`dec` DECIMAL(20,6), at DATETIME, at6 DATETIME(6) NULL, ts TIMESTAMP NULL)")
        cur.execute("SET time_zone = '+02:00'")
        cur.execute("INSERT INTO nums VALUES (1, 18446744073709551615, -5, 0.1, 1e300, 12.5, '2026-11-30 05:10:00', "
                    "'2026-11-30 05:10:00.25', '2026-11-30 07:00:00'), "
                    "(2, 0, 0, -2.5e-7, 123456789.125, -0.000001, '2026-11-30 05:59:59', NULL, NULL)")
        cur.execute("SET time_zone = '+00:00'")
    return {"texts": f"SELECT id, v, b FROM texts {ANY_HOUR}", "nums": f"SELECT * FROM nums {ANY_HOUR}"}


def build_with(geo_db, tmp_path, datasets, hour="2026-11-30T05", tag=""):
    source = collect.Source(config.Database(database=geo_db.name), datasets)
    dest = str(tmp_path / f"built{tag}.tar.gz")
    fields = {"agent_id": "a1", "geo": "g", "hour": hour, "agent_version": "test"}
    with closing(source.datasets(hour)) as datasets:
        return archive.build_archive(dest, fields, datasets, str(tmp_path)), dest


def members(path):
    """{name: bytes} of an archive, read with nothing but gzip and tarfile."""
    with gzip.open(path) as gz, tarfile.open(fileobj=gz, mode="r|") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def test_every_value_leaves_the_database_exactly_as_stored(geo_db, tmp_path):
    manifest, dest = build_with(geo_db, tmp_path, exact_tables(geo_db))
    data = members(dest)
    assert list(data) == ["manifest.json", "nums.csv", "texts.csv"]
    assert data["texts.csv"] == TEXTS_CSV.encode()
    read = {name: list(csv.reader(io.StringIO(data[name].decode("utf-8"), newline=""))) for name in data
            if name.endswith(".csv")}
    assert read == {"texts.csv": TEXTS_READ, "nums.csv": NUMS_READ}
    assert json.loads(data["manifest.json"])["datasets"]["texts"] == {
        "file": "texts.csv", "rows": 15, "bytes": len(TEXTS_CSV.encode()),
        "sha256": hashlib.sha256(TEXTS_CSV.encode()).hexdigest()}


def test_a_binary_value_that_is_not_text_stops_the_hour_naming_its_column(geo_db, tmp_path):
    with geo_db.conn.cursor() as cur:
        cur.execute("CREATE TABLE blobs (id INT PRIMARY KEY, raw VARBINARY(10))")
        cur.execute("INSERT INTO blobs VALUES (1, 'text'), (2, 0xfffe)")
    with pytest.raises(collect.CollectError, match=r"dataset 'blobs', column 'raw': .*not UTF-8.*HEX\(raw\)"):
        build_with(geo_db, tmp_path, {"blobs": f"SELECT id, raw FROM blobs {ANY_HOUR}"})
    assert os.listdir(tmp_path) == []  # no archive, no leftovers


def test_archive_metadata_is_fixed_and_the_same_rows_give_the_same_bytes(tmp_path):
    fields = {"agent_id": "a1", "geo": "g", "hour": "2026-11-30T05", "agent_version": "test"}
    rows = [["acct-1", "5"], ["acct-2", None]]
    built = []
    for n in range(2):
        dest = str(tmp_path / f"{n}.tar.gz")
        archive.build_archive(dest, fields, [("b", ["k", "v"], iter(rows)), ("a", ["x"], [])])
        built.append(open(dest, "rb").read())
    assert built[0] == built[1]
    assert built[0][:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x04\xff"  # no file name, time 0, level 1, OS unknown
    with tarfile.open(str(tmp_path / "0.tar.gz")) as tar:
        infos = tar.getmembers()
        assert [i.name for i in infos] == ["manifest.json", "a.csv", "b.csv"]
        assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode, i.type) for i in infos} == {
            (1796014800, 0, 0, "", "", 0o644, tarfile.REGTYPE)}  # 2026-11-30T05:00:00Z
        assert tar.extractfile("b.csv").read() == b"k,v\nacct-1,5\nacct-2,\n"
    assert sorted(os.listdir(tmp_path)) == ["0.tar.gz", "1.tar.gz"]  # no temporary file left


def test_same_rows_same_archive_bytes(tmp_path):
    require_port("127.0.0.1", 3306, "MariaDB")
    names = [f"ggeo_{uuid.uuid4().hex[:10]}" for _ in range(2)]
    try:
        for name in names:
            with closing(generator.create_database(name)) as conn:
                generator.generate_hour(conn, "2026-11-30T05", accounts=300, seed=7)
        built = []
        for n, name in enumerate(names):
            manifest, dest = build_with(SimpleNamespace(name=name), tmp_path, generator.sample_datasets(), tag=str(n))
            built.append(open(dest, "rb").read())
        assert built[0] == built[1]
        assert manifest["datasets"]["account_usage"]["rows"] == 300
        assert manifest["datasets"]["node_health"]["rows"] == 8 * 60
    finally:
        for name in names:
            generator.drop_database(name)


def test_collect_failure_names_the_dataset(geo_db):
    sql = f"SELECT id FROM missing_table {ANY_HOUR}"
    source = collect.Source(config.Database(database=geo_db.name), {"broken": sql})
    with pytest.raises(collect.CollectError, match="dataset 'broken':.*missing_table"):
        with closing(source.datasets("2026-11-30T05")) as datasets:
            list(datasets)
    source = collect.Source(config.Database(database=geo_db.name + "_missing"), {"x": sql})
    with pytest.raises(collect.CollectError, match="Unknown database"):
        with closing(source.datasets("2026-11-30T05")) as datasets:
            list(datasets)


# --- the command, against the real API ------------------------------------------------------------

def test_happy_path_delivers_the_hour(genv, api, geo_db, tmp_path):
    hour = recent(2)
    counts = generator.generate_hour(geo_db.conn, hour, accounts=50, endpoints=2, nodes=3, seed=1)
    agent = Agent(genv, geo_db, tmp_path, api.start().url)
    dry = agent.run("--hour", hour, "--dry-run")
    sha = re.search(r"sha256 ([0-9a-f]{64})", dry.stdout).group(1)
    result = agent.run("--hour", hour)
    assert result.returncode == cli.EXIT_OK, result.stderr
    assert delivered_hours(result.stderr) == [hour]
    assert result.stderr.count("\n") == 1  # one line per hour
    assert agent.spooled() == []
    (tx,) = agent.transactions(hour)
    assert tx["state"] == "completed" and tx["sha256"] == sha
    assert agent.completed_rows(tx["transaction_id"]) == {
        "account_usage": counts["account_usage_hourly"], "api_requests": counts["api_request_stats"],
        "node_health": counts["node_samples"]}
    state = agent.state()
    assert state["delivered"] == 1 and state["last_delivered"] == hour and state["last_run"]["exit"] == 0

    again = agent.run("--hour", hour)  # same rows again: the server already has this very archive
    assert again.returncode == cli.EXIT_OK and "already completed" in again.stderr
    assert len(agent.transactions(hour)) == 1


def test_an_account_named_NULL_arrives_as_NULL(genv, api, geo_db, tmp_path):
    hour = recent(2)
    generator.generate_hour(geo_db.conn, hour, accounts=3, endpoints=1, nodes=1, seed=1)
    with geo_db.conn.cursor() as cur:
        cur.execute("UPDATE account_usage_hourly SET account_id = 'NULL' WHERE account_id = 'acct-0000001'")
    agent = Agent(genv, geo_db, tmp_path, api.start().url)
    result = agent.run("--hour", hour)
    assert result.returncode == cli.EXIT_OK, result.stderr
    (tx,) = agent.transactions(hour)
    (path,) = glob.glob(os.path.join(genv.root, "upload", "**", tx["transaction_id"] + ".tar.gz"), recursive=True)
    rows = list(csv.reader(io.StringIO(members(path)["account_usage.csv"].decode(), newline="")))
    assert [r[0] for r in rows] == ["account_id", "acct-0000000", "acct-0000002", "NULL"]  # case-insensitive order


def test_api_down_then_up_delivers_spooled_hours_in_order(genv, api, geo_db, tmp_path):
    first, second, third = recent(5), recent(4), recent(3)
    for n, hour in enumerate((first, second, third)):
        generator.generate_hour(geo_db.conn, hour, accounts=20, endpoints=1, nodes=1, seed=n)
    agent = Agent(genv, geo_db, tmp_path, api.url)
    for hour in (second, first):
        result = agent.run("--hour", hour)
        assert result.returncode == cli.EXIT_KEPT
        assert "kept in the spool: API unavailable" in result.stderr
    assert agent.spooled() == [f"{spool.hour_key(h)}.tar.gz" for h in (first, second)]
    api.start()
    result = agent.run("--hour", third)
    assert result.returncode == cli.EXIT_OK, result.stderr
    assert delivered_hours(result.stderr) == [first, second, third]
    assert agent.spooled() == []
    txs = agent.transactions()
    assert [hours.format_hour(t["hour"]) for t in sorted(txs, key=lambda t: t["completed_at"])] == [first, second, third]
    assert all(t["state"] == "completed" for t in txs)


def test_5xx_resets_and_lost_answers_then_success(genv, api, geo_db, tmp_path, stand_in):
    hour = recent(2)
    generator.generate_hour(geo_db.conn, hour, accounts=30, endpoints=1, nodes=2, seed=3)
    server = stand_in(genv.api_port)
    server.plan("POST", "^/v1/transactions$", ("status", 503, {"Retry-After": "1"}), ("status", 500, {}),
                "forward_then_reset")
    server.plan("PUT", "/archive$", "reset", ("status", 502, {}))
    server.plan("POST", "/complete$", ("status", 429, {"Retry-After": "1"}), "forward_then_reset")
    agent = Agent(genv, geo_db, tmp_path, server.url, retry_budget_seconds=20)
    api.start()
    started = time.monotonic()
    result = agent.run("--hour", hour)
    assert result.returncode == cli.EXIT_OK, result.stderr
    assert time.monotonic() - started >= 2  # both Retry-After waits were honoured
    assert delivered_hours(result.stderr) == [hour]
    (tx,) = agent.transactions(hour)  # every retry landed on the same transaction
    assert tx["state"] == "completed"
    assert [s[2] for s in server.seen if s[0] == "POST" and s[1].endswith("/complete")] == [
        429, "forward_then_reset", "forward"]


def test_replace_sends_changed_rows_as_a_replacement_once(genv, api, geo_db, tmp_path):
    hour = recent(2)
    generator.generate_hour(geo_db.conn, hour, accounts=5, endpoints=1, nodes=1, seed=1)
    agent = Agent(genv, geo_db, tmp_path, api.start().url)
    assert agent.run("--hour", hour).returncode == cli.EXIT_OK
    generator.generate_hour(geo_db.conn, hour, accounts=7, endpoints=1, nodes=1, seed=2)
    without = agent.run("--hour", hour)  # changed rows without --replace: the server keeps the hour (409)
    assert without.returncode == cli.EXIT_REJECTED and "already completed" in without.stderr
    result = agent.run("--hour", hour, "--replace")
    assert result.returncode == cli.EXIT_OK, result.stderr
    first, second = agent.transactions(hour)
    assert (first["state"], second["state"]) == ("superseded", "completed")
    assert agent.completed_rows(second["transaction_id"])["account_usage"] == 7
    again = agent.run("--hour", hour, "--replace")  # the same replacement again: already there, nothing new
    assert again.returncode == cli.EXIT_OK and len(agent.transactions(hour)) == 2
    assert agent.state().get("replace") == []


def test_replace_needs_named_hours(tmp_path):
    result = subprocess.run([AGENT, "--config", str(tmp_path / "none.cfg"), "--replace"], capture_output=True,
                            text=True)
    assert result.returncode == cli.EXIT_USAGE and "--replace needs --hour or --backfill" in result.stderr


@pytest.mark.parametrize("case", ["too_old_for_the_api", "invalid_row"])
def test_a_4xx_moves_the_archive_to_rejected(genv, api, geo_db, tmp_path, case):
    if case == "too_old_for_the_api":  # the API keeps 14 days: POST /v1/transactions answers 422
        hour, call, error = recent(24 * 30), "POST /v1/transactions", "older than the retention"
        generator.generate_hour(geo_db.conn, hour, accounts=5, endpoints=1, nodes=1)
    else:  # a row the catalog refuses: POST …/complete answers 422
        hour, call, error = recent(2), "/complete", "disk_used_bytes"
        generator.generate_hour(geo_db.conn, hour, accounts=5, endpoints=1, nodes=1)
        with geo_db.conn.cursor() as cur:
            cur.execute("UPDATE node_samples SET disk_used_bytes = disk_total_bytes + 1 LIMIT 1")
    agent = Agent(genv, geo_db, tmp_path, api.start().url)
    other = recent(3)
    generator.generate_hour(geo_db.conn, other, accounts=5, endpoints=1, nodes=1)
    result = agent.run("--hour", hour)
    assert result.returncode == cli.EXIT_REJECTED, result.stderr
    assert f"hour {hour} REJECTED" in result.stderr
    key = spool.hour_key(hour)
    reason = json.load(open(os.path.join(agent.spool_dir, "rejected", f"{key}.reason.json")))
    assert reason["status"] == 422 and error in reason["error"] and call in reason["call"]
    assert os.path.exists(os.path.join(agent.spool_dir, "rejected", f"{key}.tar.gz"))
    assert agent.spooled() == [] and agent.state()["rejected"] == 1
    result = agent.run("--hour", other)  # the next hour is not held up by the rejected one
    assert result.returncode == cli.EXIT_OK and delivered_hours(result.stderr) == [other]


def test_refused_credentials_keep_the_spool(genv, api, geo_db, tmp_path):
    hour = recent(2)
    agent = Agent(genv, geo_db, tmp_path, api.start().url)
    agent.configure(token="wrong-token")
    result = agent.run("--hour", hour)
    assert result.returncode == cli.EXIT_AUTH and "refused this agent's credentials" in result.stderr
    assert agent.spooled() == [f"{spool.hour_key(hour)}.tar.gz"]
    assert not os.listdir(os.path.join(agent.spool_dir, "rejected"))


@pytest.mark.parametrize("answer", [("status", 404, {}), ("status", 301, {"Location": "https://elsewhere/"})])
def test_a_wrong_api_url_rejects_nothing(genv, geo_db, tmp_path, stand_in, answer):
    server = stand_in()
    server.plan("POST", "^/v1/transactions$", answer)
    agent = Agent(genv, geo_db, tmp_path, server.url)
    result = agent.run("--hour", recent(1))
    assert result.returncode == cli.EXIT_USAGE and re.search(r"fix \[api\] url|is \[api\] url", result.stderr)
    assert agent.spooled() == [f"{spool.hour_key(recent(1))}.tar.gz"]
    assert not os.listdir(os.path.join(agent.spool_dir, "rejected"))


def test_crash_between_upload_and_complete_delivers_once(genv, api, geo_db, tmp_path, stand_in):
    hour = recent(2)
    generator.generate_hour(geo_db.conn, hour, accounts=40, endpoints=1, nodes=2, seed=5)
    server = stand_in(genv.api_port)
    server.plan("POST", "/complete$", "hold")
    agent = Agent(genv, geo_db, tmp_path, server.url, retry_budget_seconds=30)
    api.start()
    proc = agent.popen("--hour", hour)
    assert server.held.wait(60), "the agent never asked to complete"
    proc.send_signal(signal.SIGKILL)  # the machine dies after the upload, before the API's answer
    proc.wait(10)
    server.release()
    (tx,) = agent.transactions(hour)
    assert tx["state"] == "uploaded"
    assert agent.spooled() == [f"{spool.hour_key(hour)}.tar.gz"]

    result = agent.run()  # the next cron run: same hour resumed, nothing sent twice
    assert result.returncode == cli.EXIT_OK, result.stderr
    assert hour in delivered_hours(result.stderr)
    done = agent.transactions(hour)
    assert [(t["transaction_id"], t["state"]) for t in done] == [(tx["transaction_id"], "completed")]


def test_empty_hour_still_sends_a_zero_row_archive(genv, api, geo_db, tmp_path):
    hour = recent(2)
    agent = Agent(genv, geo_db, tmp_path, api.start().url)
    result = agent.run("--hour", hour)
    assert result.returncode == cli.EXIT_OK, result.stderr
    (tx,) = agent.transactions(hour)
    assert tx["state"] == "completed"
    assert agent.completed_rows(tx["transaction_id"]) == {"account_usage": 0, "api_requests": 0, "node_health": 0}


def test_overlapping_runs_never_run_at_once(genv, api, geo_db, tmp_path, stand_in):
    hour = recent(2)
    server = stand_in(genv.api_port)
    server.plan("POST", "^/v1/transactions$", "hold")
    agent = Agent(genv, geo_db, tmp_path, server.url, retry_budget_seconds=30)
    api.start()
    first = agent.popen("--hour", hour)
    assert server.held.wait(60)
    second = agent.run("--hour", hour)
    assert second.returncode == cli.EXIT_LOCKED
    assert f"another ganymede-agent run (pid {first.pid})" in second.stderr
    server.release()  # the held request is dropped; the first run retries and finishes
    out, err = first.communicate(timeout=60)
    assert first.returncode == cli.EXIT_OK, err
    assert delivered_hours(err) == [hour] and len(agent.transactions(hour)) == 1


def test_dry_run_shows_and_changes_nothing(genv, api, geo_db, tmp_path):
    hour = recent(2)
    generator.generate_hour(geo_db.conn, hour, accounts=10, endpoints=1, nodes=1)
    agent = Agent(genv, geo_db, tmp_path, api.start().url)
    result = agent.run("--backfill", recent(3), hour, "--dry-run")
    assert result.returncode == cli.EXIT_OK, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"would send hour {recent(3)}")
    assert "account_usage=10, api_requests=65, node_health=60 rows" in lines[1]
    assert not os.path.exists(agent.spool_dir) and agent.transactions() == []


def test_default_run_catches_up_missed_hours_and_backfill(genv, geo_db, tmp_path):
    agent = Agent(genv, geo_db, tmp_path, f"http://127.0.0.1:{free_port()}")  # API down: hours stay spooled
    assert agent.run().returncode == cli.EXIT_KEPT
    assert agent.spooled() == [f"{spool.hour_key(recent(0))}.tar.gz"]
    state = agent.state()
    state["last_collected"] = recent(3)
    with open(os.path.join(agent.spool_dir, "state.json"), "w") as f:
        json.dump(state, f)
    assert agent.run().returncode == cli.EXIT_KEPT
    assert agent.spooled() == [f"{spool.hour_key(recent(n))}.tar.gz" for n in (2, 1, 0)]
    assert agent.run("--backfill", recent(6), recent(4)).returncode == cli.EXIT_KEPT
    assert len(agent.spooled()) == 6 and agent.state()["last_collected"] == recent(0)


def test_spool_limit_drops_the_oldest_with_a_counter(genv, geo_db, tmp_path):
    agent = Agent(genv, geo_db, tmp_path, f"http://127.0.0.1:{free_port()}", spool_max_mb=0.0001)
    result = agent.run("--backfill", recent(3), recent(1))
    assert result.returncode == cli.EXIT_KEPT
    assert agent.spooled() == [f"{spool.hour_key(recent(1))}.tar.gz"]
    assert result.stderr.count("SPOOL FULL") == 2
    assert agent.state()["dropped"] == 2 and agent.state()["dropped_hours"] == [recent(3), recent(2)]


def test_an_unreadable_spooled_archive_is_set_aside(genv, geo_db, tmp_path):
    agent = Agent(genv, geo_db, tmp_path, f"http://127.0.0.1:{free_port()}")  # API down: the hour stays spooled
    assert agent.run("--hour", recent(2)).returncode == cli.EXIT_KEPT
    with open(os.path.join(agent.spool_dir, f"{spool.hour_key(recent(2))}.tar.gz"), "wb") as f:
        f.write(b"not an archive any more")  # a damaged disk
    result = agent.run("--hour", recent(1))
    assert result.returncode == cli.EXIT_REJECTED and f"hour {recent(2)} REJECTED" in result.stderr
    assert sorted(os.listdir(os.path.join(agent.spool_dir, "rejected"))) == [
        f"{spool.hour_key(recent(2))}.reason.json", f"{spool.hour_key(recent(2))}.tar.gz"]
    assert agent.spooled() == [f"{spool.hour_key(recent(1))}.tar.gz"]  # the next hour is still delivered later


def test_an_hour_the_database_could_not_give_is_collected_next_run(genv, geo_db, tmp_path):
    agent = Agent(genv, geo_db, tmp_path, f"http://127.0.0.1:{free_port()}")
    agent.configure(database=geo_db.name + "_later")
    result = agent.run()
    assert result.returncode == cli.EXIT_KEPT and "not collected" in result.stderr
    assert agent.state()["uncollected"] == [recent(0)] and agent.spooled() == []
    try:
        generator.create_database(geo_db.name + "_later").close()
        assert agent.run().returncode == cli.EXIT_KEPT  # API still down, but the hour is now spooled
        assert agent.spooled() == [f"{spool.hour_key(recent(0))}.tar.gz"] and agent.state()["uncollected"] == []
    finally:
        generator.drop_database(geo_db.name + "_later")
