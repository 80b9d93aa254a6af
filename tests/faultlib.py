"""Helpers of the adversarial suite only (test_faults, test_hostile, test_load, test_secrets).

Two halves:

* run as a script, it is the FAULT-INJECTION wrapper: it starts the real
  `luigi` command line (or `ganymede-agent`) with one function monkeypatched
  so that its Nth matching call kills the process with SIGKILL (as `kill -9`
  would: no cleanup, no exception handling, no atexit), or touches a flag
  file that a test's TCP proxy takes as "this server just went down"::

      python tests/faultlib.py --patch ganymede.stores.staging:load_csv --nth 2 \\
          -- luigi --module ganymede.tasks HourlyBackup --hour 2026-11-30T05 --local-scheduler

  Production code is never changed: the patch lives only in that process.

* imported, it gives the tests worlds that live outside the function-scoped
  `genv` fixture (a module's shared API, a baseline run), the end-state
  fingerprint the fault tests compare, TCP proxies standing in for a dying
  MySQL or S3, a running `ganymede-api`, and raw HTTP clients.
"""
import argparse
import importlib
import os
import signal
import sys
import threading


# --- the fault-injection wrapper (script) ---------------------------------------------

def _resolve(spec):
    """'pkg.module:Class.attr' -> (owner object, attribute name)."""
    module_name, _, qualname = spec.partition(":")
    owner = importlib.import_module(module_name)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name


def _describe_call(args, kwargs):
    """Text a --match substring is looked for in: the arguments, and their `.path` if they have one."""
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    parts += [str(getattr(a, "path", "")) for a in args]
    return " ".join(parts)


def install_fault(spec, nth, match=None, after=False, action="kill"):
    """Patch `spec` so that its `nth` call (counting only calls matching `match`) triggers `action`.

    action: "kill" (SIGKILL this process), "stop" (SIGSTOP it) or "touch:PATH" (create PATH, then carry on).
    after: trigger once the call has returned instead of before it runs.
    """
    owner, name = _resolve(spec)
    real = getattr(owner, name)
    seen = [0]
    lock = threading.Lock()

    def trigger():
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "stop":  # frozen mid-call, as on a hung host; the test then kills it
            os.kill(os.getpid(), signal.SIGSTOP)
        elif action.startswith("touch:"):
            with open(action[len("touch:"):], "w") as flag:
                flag.write(f"{spec} call {nth}\n")
        else:
            raise SystemExit(f"faultlib: unknown action {action!r}")

    def patched(*args, **kwargs):
        fire = False
        if match is None or match in _describe_call(args, kwargs):
            with lock:
                seen[0] += 1
                fire = seen[0] == nth
        if fire and not after:
            trigger()
        result = real(*args, **kwargs)
        if fire and after:
            trigger()
        return result

    patched.__wrapped__ = real
    setattr(owner, name, patched)


def _inject_main(argv):
    parser = argparse.ArgumentParser(prog="faultlib.py", description="Run luigi or ganymede-agent with one fault.")
    parser.add_argument("--patch", required=True, help="module:qualname of the function to break")
    parser.add_argument("--nth", type=int, default=1, help="which matching call triggers the fault (1 = first)")
    parser.add_argument("--match", help="only calls whose arguments contain this text count")
    parser.add_argument("--after", action="store_true", help="trigger after the call returns")
    parser.add_argument("--action", default="kill", help="kill (SIGKILL), stop (SIGSTOP) or touch:PATH")
    parser.add_argument("target", choices=["luigi", "agent"])
    parser.add_argument("args", nargs=argparse.REMAINDER)
    opts = parser.parse_args(argv)
    install_fault(opts.patch, opts.nth, opts.match, opts.after, opts.action)
    if opts.target == "luigi":
        from luigi.retcodes import run_with_retcodes
        run_with_retcodes(opts.args)  # exits with the [retcode] of the run
    else:
        from ganymede_agent.cli import main
        sys.exit(main(opts.args))


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--" in argv:  # `... --nth 2 -- luigi --module ...`
        i = argv.index("--")
        argv = argv[:i] + argv[i + 1:]
    _inject_main(argv)


# --- everything below is for the tests (imported) ---------------------------------------

import base64  # noqa: E402
import gzip  # noqa: E402
import hashlib  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
import uuid  # noqa: E402
from unittest import mock  # noqa: E402

import boto3  # noqa: E402
import botocore.config  # noqa: E402
import pymongo  # noqa: E402
import pymysql  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)
S3_ENDPOINT = os.environ.get("GANYMEDE_S3_ENDPOINT", "http://127.0.0.1:9000")
MONGO_URI = os.environ.get("GANYMEDE_TEST_MONGO_URI", "mongodb://127.0.0.1:27017/")
MYSQL_HOST, MYSQL_PORT = os.environ.get("GANYMEDE_TEST_MYSQL", "127.0.0.1:3306").rsplit(":", 1)  # from a test host
# luigi.cfg [retcode] as the project ships it, so a run's exit code says what happened
RETCODES = {"already_running": 10, "missing_data": 20, "not_run": 25, "task_failed": 30,
            "scheduling_error": 35, "unhandled_exception": 40}
SIGKILLED = -signal.SIGKILL


def luigi_args(hour_text, *extra):
    """What cron runs, after `luigi`: the whole graph of one hour (with a local scheduler here)."""
    return ["--module", "ganymede.tasks", "HourlyBackup", "--hour", hour_text, "--local-scheduler", *extra]


def luigi_command(hour_text, *extra):
    return [f"{BIN}/luigi", *luigi_args(hour_text, *extra)]


def faulty_command(patch, nth=1, match=None, after=False, action="kill", target="luigi", args=()):
    """The command line of the fault-injection wrapper around `luigi` (or `ganymede-agent`)."""
    cmd = [sys.executable, os.path.join(HERE, "faultlib.py"), "--patch", patch, "--nth", str(nth)]
    if match:
        cmd += [f"--match={match}"]  # one argument, even when the text starts with '-'

    if after:
        cmd += ["--after"]
    cmd += ["--action", action, target]
    return cmd + list(args)


def run(cmd, env, timeout=180, log=None):
    """subprocess.run capturing output; appends it to `log` (a list) for the secrets scan."""
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if log is not None:
        log.append(result.stdout + result.stderr)
    return result


# --- worlds outside the genv fixture ---------------------------------------------------

def new_world(path, **overrides):
    """A GanymedeEnv (conftest) at `path` with a migrated schema; drop_world() removes it.

    The in-process luigi config follows the newest world, so helpers below take
    the world explicitly and never read the global config.
    """
    from conftest import GanymedeEnv
    from ganymede import config
    from ganymede.stores import mysql
    os.makedirs(path, exist_ok=True)
    env = GanymedeEnv(pathlib.Path(path))
    env.write_config(**overrides)
    mysql.upgrade(config.mysql())
    return env


def drop_world(env):
    from conftest import drop_world as drop
    drop(env)



def sql(env, autocommit=True):
    """A connection to the world's schema, from its own settings (not the global config)."""
    return pymysql.connect(host=MYSQL_HOST, port=int(MYSQL_PORT), user="root", database=env.mysql_database,
                           autocommit=autocommit, charset="utf8mb4")


def mongo_db(env):
    return pymongo.MongoClient(MONGO_URI, serverSelectionTimeoutMS=5000)[env.mongo_database]


def s3_client(endpoint=S3_ENDPOINT, key_id="testing", secret="testing-secret"):
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key_id, aws_secret_access_key=secret,
                        region_name="us-east-1",
                        config=botocore.config.Config(s3={"addressing_style": "path"},
                                                      request_checksum_calculation="when_required",
                                                      response_checksum_validation="when_required"))


def register_agent(env, agent_id, geo="geo-test", since=None):
    """Add an agent as `ganymede agents add` does; returns its token (shown once, stored hashed)."""
    from ganymede.stores import txlog
    with sql(env, autocommit=False) as conn:
        return txlog.add_agent(conn, agent_id, geo, expected_from=since)


def fixed_transaction(env, agent_id, hour, transaction_id, rows=None, geo="geo-test", replace=False):
    """conftest.completed_transaction with a chosen transaction id, so two worlds hold identical data.

    completed_transaction reads the in-process config, so this world's is made current first.
    """
    from conftest import completed_transaction
    env.write_config()
    with mock.patch("uuid.uuid4", return_value=uuid.UUID(transaction_id)):
        return completed_transaction(env, agent_id, hour, rows=rows, geo=geo, replace=replace)


# --- the end state of an hour --------------------------------------------------------

def tree(root):
    """Every file under `root`, relative, sorted."""
    found = []
    for dirpath, _, names in os.walk(root):
        found += [os.path.relpath(os.path.join(dirpath, n), root) for n in names]
    return sorted(found)


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _canonical(value):
    return json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))


def bucket_objects(env, hour, client=None):
    """{key: {size, sha256 (our metadata), checksum (the server's SHA-256)}} of the hour's bucket."""
    from ganymede.stores.s3 import bucket_name
    client = client or s3_client()
    name = bucket_name(env.settings["s3"]["bucket_template"], hour)
    objects = {}
    try:
        pages = list(client.get_paginator("list_objects_v2").paginate(Bucket=name))
    except client.exceptions.NoSuchBucket:
        return {}
    for page in pages:
        for obj in page.get("Contents", []):
            head = client.head_object(Bucket=name, Key=obj["Key"], ChecksumMode="ENABLED")
            objects[obj["Key"]] = {"size": head["ContentLength"], "sha256": head.get("Metadata", {}).get("sha256"),
                                   "checksum": head.get("ChecksumSHA256")}
    return objects


# Objects whose bytes carry wall-clock times (the schema dump, manifests with completion and
# delivery times): compared by key and by their match with the local file, not across worlds.
TIMED_KEYS = ("mysql/", "MANIFEST.json", ".manifest.json")


def fingerprint(env, hour):
    """What must be identical after a disturbed-then-rerun hour and an undisturbed one."""
    from ganymede import datasets
    from ganymede.paths import StateRoot
    root = StateRoot(env.root)
    db = mongo_db(env)
    mongo = {}
    for name in sorted(datasets.CATALOG):
        docs = list(db[name].find({}, sort=[("_id", 1)]))
        mongo[name] = (len(docs), hashlib.sha256(_canonical(docs).encode()).hexdigest())
    files = tree(env.root)  # temporaries included: a rerun must not leave what a killed run was writing
    markers = {}
    for p in files:
        if p.endswith((".staged.json", ".loaded.json")):
            marker = json.load(open(os.path.join(env.root, p)))
            marker.pop("retired", None)  # what that run deleted: a rerun after the deletion finds nothing to delete
            markers[p] = marker
        elif p.endswith(".jsonl") and p.startswith("state"):
            markers[p] = open(os.path.join(env.root, p)).read()  # rejects files
    extracts = {}
    for p in files:
        if p.startswith(("extracts" + os.sep, "outbox" + os.sep)) and p.endswith(".jsonl.gz"):
            extracts[p] = sha256_file(os.path.join(env.root, p))
        elif p.startswith("extracts" + os.sep) and p.endswith(".manifest.json"):
            manifest = json.load(open(os.path.join(env.root, p)))
            extracts[p] = {k: manifest[k] for k in ("hour", "round", "file", "sha256", "bytes", "counts", "agents",
                                                     "transactions", "superseded", "missing_agents")}
    backup = json.load(open(root.hour_marker(hour, "backup")))
    objects = bucket_objects(env, hour)
    with sql(env) as conn, conn.cursor() as cur:
        cur.execute("SELECT transaction_id, state FROM transactions ORDER BY transaction_id")
        states = dict(cur.fetchall())
        cur.execute("SELECT transaction_id, GROUP_CONCAT(event ORDER BY event) FROM transaction_events "
                    "GROUP BY transaction_id")  # every event: a step rerun after a crash logs it once
        events = dict(cur.fetchall())
        staged = 0
        for name in datasets.CATALOG.values():
            cur.execute(f"SELECT COUNT(*) FROM `{name.staging_table}`")
            staged += cur.fetchone()[0]
    return {
        "mongo": mongo,
        "extracts": extracts,  # every round's extract and its manifest (wall-clock fields left out), the outbox
        "files": files,
        "archives": {p: sha256_file(os.path.join(env.root, p)) for p in files if p.endswith(".tar.gz")},
        "markers": markers,
        "backup_marker": {"hour": backup["hour"], "rounds": backup["rounds"],
                          "keys": sorted(o["key"] for o in backup["objects"])},
        "bucket": {k: v for k, v in objects.items() if not any(t in k for t in TIMED_KEYS)},
        "bucket_keys": sorted(objects),
        "transaction_states": states,
        "transaction_events": events,
        "staging_rows": staged,
    }


def consistency_problems(env, hour):
    """What is wrong with an hour's end state on its own terms (empty list: nothing).

    Every bucket object matches, byte for byte (size, our sha256, the server's
    SHA-256), the local file it came from; MANIFEST.json lists exactly the
    other objects; no archive sits in both upload/ and archives/.
    """
    from ganymede.paths import StateRoot
    root = StateRoot(env.root)
    problems = []
    objects = bucket_objects(env, hour)
    state_dir = os.path.dirname(root.hour_marker(hour, "backup"))
    local_manifest = os.path.join(state_dir, "MANIFEST.json")
    listed = {o["key"]: o for o in json.load(open(local_manifest))["objects"]}
    if set(listed) != set(objects) - {"MANIFEST.json"}:
        problems.append(f"MANIFEST.json lists {sorted(listed)}, bucket holds {sorted(objects)}")
    for key, obj in objects.items():
        expected = sha256_file(local_manifest) if key == "MANIFEST.json" else listed.get(key, {}).get("sha256")
        if obj["sha256"] != expected:
            problems.append(f"{key}: sha256 metadata {obj['sha256']} != local {expected}")
        if obj["checksum"] != base64.b64encode(bytes.fromhex(obj["sha256"] or "00")).decode():
            problems.append(f"{key}: the server's SHA-256 does not match our sha256")
    for key, entry in listed.items():
        local = {"mysql": os.path.dirname(root.backup_dump(hour)),
                 "extracts": os.path.dirname(root.extract(hour))}.get(key.split("/", 1)[0])
        local = local and os.path.join(local, os.path.basename(key))
        if local and os.path.exists(local) and sha256_file(local) != entry["sha256"]:
            problems.append(f"{key}: local {local} differs from what the bucket holds")
    uploads = {p.split(os.sep, 1)[1] for p in tree(env.root) if p.startswith("upload" + os.sep)}
    archived = {p.split(os.sep, 1)[1] for p in tree(env.root) if p.startswith("archives" + os.sep)}
    if uploads & archived:
        problems.append(f"archives in both upload/ and archives/: {sorted(uploads & archived)}")
    return problems


# --- servers and proxies ---------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing answers on 127.0.0.1:{port}")


class ApiProcess:
    """`ganymede-api` as production runs it (a subprocess), logging to a file."""

    def __init__(self, env, log_path, port=None):
        self.env, self.log_path = env, str(log_path)
        self.port = port or env.api_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, config_path=None):
        log = open(self.log_path, "ab")
        args = [f"{BIN}/ganymede-api"] + (["--config", config_path] if config_path else [])
        env = dict(self.env.subprocess_env, **({"LUIGI_CONFIG_PATH": config_path} if config_path else {}))
        self.proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                assert self.proc.poll() is None, self.log()
                time.sleep(0.05)
        raise AssertionError(f"ganymede-api did not listen on {self.port}: {self.log()}")

    def kill(self):
        """kill -9: no shutdown, no cleanup."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()


class TcpProxy:
    """127.0.0.1:port -> target, for a server that dies and comes back without touching the real one.

    `down()` breaks every open connection and refuses new ones; `up()` accepts
    again. With `flag`, the proxy also goes down by itself as soon as that file
    exists (the fault wrapper's touch action) and comes back when it is removed.
    """

    def __init__(self, target, flag=None):
        self.target, self.flag = target, flag
        self.port = free_port()
        self.socks, self.lock = [], threading.Lock()
        self.listener, self.running, self.closed = None, False, False
        self.up()

    def is_down(self):
        return not self.running or (self.flag is not None and os.path.exists(self.flag))

    def up(self):
        self.running = True
        if self.listener is None:
            self.listener = socket.create_server(("127.0.0.1", self.port))
            self.listener.settimeout(0.05)
            threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener):
        while not self.closed:
            try:
                client, _ = listener.accept()
            except socket.timeout:
                if self.is_down():
                    self._cut()
                continue
            except OSError:
                return
            if self.is_down():
                client.close()  # a refused connection, as from a stopped server
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a, b):
        try:
            while data := a.recv(65536):
                if self.is_down():
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _cut(self):
        with self.lock:
            socks, self.socks = self.socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def down(self):
        self.running = False
        self._cut()

    def close(self):
        self.closed = True
        self.down()
        if self.listener:
            self.listener.close()


# --- HTTP clients ----------------------------------------------------------------------

class Reply:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.raw = status, headers, body
        try:
            self.json = json.loads(body) if body else None
        except ValueError:
            self.json = None

    def __repr__(self):
        return f"Reply({self.status}, {self.raw[:300]!r})"


def call(port, method, path, body=None, headers=None, timeout=30):
    """One request on a new connection (as the agent's urllib does); returns a Reply."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        try:
            conn.request(method, path, body=body, headers=headers or {})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early (a refusal) and closed before the body was all sent: read the answer
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def agent_headers(agent_id, token):
    return {"Authorization": f"Bearer {token}", "X-Agent-Id": agent_id}


class RawExchange:
    """A raw socket to the API whose replies are read by a thread as they arrive.

    A server that answers early (507, 413) and closes while we are still
    sending would make a later recv() see only the reset; reading all along
    keeps its answer.
    """

    def __init__(self, port, timeout=30):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.received, self.closed = bytearray(), threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        try:
            while data := self.sock.recv(65536):
                self.received += data
        except OSError:
            pass
        self.closed.set()

    def send(self, data):
        """Send; False if the server has already closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def reply(self, timeout=30):
        """(status, json) of the first response, waiting for it (or for the close)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            head, sep, body = bytes(self.received).partition(b"\r\n\r\n")
            if sep:
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), None)
                if length is not None and len(body) >= length:
                    return int(head.split(b" ", 2)[1]), json.loads(body[:length] or b"null")
            if self.closed.is_set():
                break
            time.sleep(0.01)
        return None, None

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def upload_head(transaction_id, agent_id, token, length, sha256):
    return (f"PUT /v1/transactions/{transaction_id}/archive HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {token}\r\nX-Agent-Id: {agent_id}\r\nContent-Length: {length}\r\n"
            f"X-Archive-SHA256: {sha256}\r\nContent-Type: application/octet-stream\r\n\r\n").encode()


def create_transaction(port, agent_id, token, hour_text, **fields):
    body = dict({"agent_id": agent_id, "hour": hour_text}, **fields)
    return call(port, "POST", "/v1/transactions", json.dumps(body), agent_headers(agent_id, token))


def upload(port, agent_id, token, transaction_id, data, sha256=None):
    headers = dict(agent_headers(agent_id, token), **{
        "X-Archive-SHA256": sha256 or hashlib.sha256(data).hexdigest()})
    return call(port, "PUT", f"/v1/transactions/{transaction_id}/archive", data, headers)


def complete(port, agent_id, token, transaction_id):
    return call(port, "POST", f"/v1/transactions/{transaction_id}/complete", b"", agent_headers(agent_id, token))


def healthz(port):
    return call(port, "GET", "/healthz", timeout=10)


def gunzip_text(path):
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read()


def wait_for(predicate, timeout=30, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def urlopen_ok(url, timeout=2):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except OSError:
        return None
