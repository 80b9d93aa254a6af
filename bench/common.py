#!/usr/bin/env python3
"""Shared helpers of the end-to-end benchmarks (bench_busy_hour, bench_scheduling, bench_tools, run_all).

- `World`: one benchmark's isolated world, like tests/conftest.py's GanymedeEnv:
  its own MySQL database (and GEO databases), MongoDB database, bucket prefix,
  temporary state root and luigi.cfg; `cleanup()` removes all of it.
- `Luigid`: a luigid of our own on a free port with a temporary state path.
- `RssWatch`: peak RSS (VmHWM from /proc/<pid>/status) of processes and of
  their descendants, polled while they run; `wait_maxrss` adds the kernel's
  ru_maxrss of a child (the same high-water mark) when it is reaped.
- `deliver_hour`: N GEO databases filled by the generator, N agents
  registered, and N `ganymede-agent` runs uploading concurrently through a
  running `ganymede-api`.
- `run_graph`: the cron command (`luigi --module ganymede.tasks HourlyBackup
  --hour H`) run through this file's `probe` mode, which is luigi's own
  command line plus task START/SUCCESS handlers that log each task's times
  and peak RSS to a JSON-lines file.
- `record`: one line appended to BENCHMARKS.md (date, machine, command, figures).

    .venv/bin/python bench/common.py probe EVENTS.jsonl -- --module ganymede.tasks HourlyBackup --hour H
"""
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import closing
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MONGO_URI = os.environ.get("GANYMEDE_TEST_MONGO_URI", "mongodb://127.0.0.1:27017/")
S3_ENDPOINT = os.environ.get("GANYMEDE_S3_ENDPOINT", "http://127.0.0.1:9000")
S3_KEY_ID, S3_SECRET = "bench", "bench-secret"  # moto checks no credentials unless told to
BENCHMARKS_MD = os.path.join(ROOT, "BENCHMARKS.md")
HOW_TO_START = "start the services with: make services"


def bin_path(name):
    """A console script of the project's venv (the one running this file)."""
    return os.path.join(os.path.dirname(sys.executable), name)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bare_tornado_sink(port, directory, chunk_size=None):
    """The bare upload baseline (run in a child process): stream each PUT body to a file, nothing else; SIGTERM stops it."""
    import asyncio
    import tornado.web
    from tornado.httpserver import HTTPServer

    @tornado.web.stream_request_body
    class Sink(tornado.web.RequestHandler):
        def prepare(self):
            self.file = open(os.path.join(directory, uuid.uuid4().hex), "wb")

        def data_received(self, chunk):
            self.file.write(chunk)

        def put(self, *args):
            self.file.close()
            self.write({"ok": True})

    async def serve():
        server = HTTPServer(tornado.web.Application([(r"/.*", Sink)]), max_body_size=1 << 40,
                            **({"chunk_size": chunk_size} if chunk_size else {}))
        server.listen(port, "127.0.0.1")
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()

    asyncio.run(serve())


def require_services():
    for what, url in (("MariaDB", "tcp://127.0.0.1:3306"), ("MongoDB test server", MONGO_URI),
                      ("S3 test server", S3_ENDPOINT)):
        hostport = url.split("//", 1)[1].strip("/")
        host, port = hostport.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
        except OSError as exc:
            raise SystemExit(f"{what} on {host}:{port} is not answering ({exc}); {HOW_TO_START}")


def machine():
    return f"{platform.node()} ({os.cpu_count()} cpu)"


def now_utc():
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def record(command, figures, path=BENCHMARKS_MD):
    """Append one run's line to BENCHMARKS.md: date, machine, exact command, figures."""
    with open(path, "a") as f:
        f.write(f"- {now_utc()} · {machine()} · `{command}` · {figures}\n")


def command_line(script):
    return " ".join([".venv/bin/python", f"bench/{os.path.basename(script)}"] + sys.argv[1:])


# --- memory ------------------------------------------------------------------------

def vmhwm_mb(pid="self"):
    """Peak resident set size (VmHWM) of a live process in MB; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def descendants(pid):
    """Every live descendant of `pid` (via /proc/<pid>/task/<tid>/children)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            tids = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{current}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            found.extend(kids)
            todo.extend(kids)
    return found


def process_name(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


class RssWatch(threading.Thread):
    """Polls VmHWM of watched processes and their descendants; peaks per label (own / descendants by name)."""

    def __init__(self, interval=0.05):
        super().__init__(daemon=True)
        self.interval, self.stopping = interval, threading.Event()
        self.watched, self.own, self.children = {}, {}, {}
        self.lock = threading.Lock()

    def watch(self, pid, label):
        with self.lock:
            self.watched[pid] = label
            self.own.setdefault(label, 0.0)

    def sample(self):
        with self.lock:
            watched = dict(self.watched)
        for pid, label in watched.items():
            mb = vmhwm_mb(pid)
            if not mb and not os.path.exists(f"/proc/{pid}"):
                with self.lock:
                    self.watched.pop(pid, None)
                continue
            self.own[label] = max(self.own[label], mb)
            for kid in descendants(pid):
                name = process_name(kid)
                key = (label, name)
                self.children[key] = max(self.children.get(key, 0.0), vmhwm_mb(kid))

    def run(self):
        while not self.stopping.wait(self.interval):
            self.sample()

    def stop(self):
        self.stopping.set()
        self.join(5)

    def children_of(self, label):
        return {name: mb for (lab, name), mb in self.children.items() if lab == label}


def wait_maxrss(proc, usage_out=None):
    """Reap a Popen child with wait4: (returncode, ru_maxrss in MB: the peak of it and its reaped descendants).

    `usage_out`, a dict, receives the CPU seconds (user + system) of the child and its reaped descendants.
    """
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if usage_out is not None:
        usage_out["cpu_s"] = usage.ru_utime + usage.ru_stime
    return proc.returncode, usage.ru_maxrss / 1024


def machine_cpu():
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat; diff two calls for a phase."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(values) - idle) / tick, sum(values) / tick


def busy_cores(before, after):
    """Average cores busy between two machine_cpu() readings (all processes: ours, the servers, others')."""
    busy, total = after[0] - before[0], after[1] - before[1]
    return (os.cpu_count() or 1) * busy / total if total else 0.0


def cpu_seconds(pid):
    """User + system CPU seconds a live process has used so far (from /proc/<pid>/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def stop_process(proc, timeout=20):
    """SIGTERM one process we started (by its pid), SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# --- the isolated world ------------------------------------------------------------

class World:
    """One benchmark's names, paths and luigi.cfg; `activate()` points this process at them too."""

    def __init__(self, prefix="gbench", luigid_port=None, extra=None):
        self.tag = uuid.uuid4().hex[:10]
        self.base = tempfile.mkdtemp(prefix=f"{prefix}-{self.tag}-", dir=os.environ.get("BENCH_TMP"))
        self.root = os.path.join(self.base, "state")
        self.mysql_database = f"{prefix}_{self.tag}"
        self.mongo_database = f"{prefix}_{self.tag}"
        self.bucket_prefix = f"gb-{self.tag}-"
        self.geo_databases = []
        self.extra_databases = []
        self.home = os.path.join(self.base, "home")
        os.makedirs(self.home)
        self.s3curl_path = os.path.join(self.home, ".s3curl")
        fd = os.open(self.s3curl_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"%awsSecretAccessKeys = (\n  ganymede => {{ id => '{S3_KEY_ID}', key => '{S3_SECRET}' }},\n);\n")
        self.api_port = free_port()
        self.config_path = os.path.join(self.base, "luigi.cfg")
        self.settings = {
            "core": {"autoload_range": "true", "scheduler_host": "127.0.0.1",
                     "scheduler_port": str(luigid_port or 8082)},
            "retcode": {"already_running": "10", "missing_data": "20", "not_run": "25", "task_failed": "30",
                        "scheduling_error": "35", "unhandled_exception": "40"},
            "state": {"root": self.root},
            "mysql": {"host": "127.0.0.1", "port": "3306", "user": "root", "database": self.mysql_database,
                      "option_file": ""},
            "mongodb": {"uri": MONGO_URI, "database": self.mongo_database},
            "s3": {"endpoint_url": S3_ENDPOINT, "s3curl_path": self.s3curl_path, "profile": "ganymede",
                   "bucket_template": self.bucket_prefix + "{yyyymmddhh}"},
            "api": {"host": "127.0.0.1", "port": str(self.api_port)},
            # The benches use an hour a few hours back; a deadline a day after it keeps the graph in its on-time
            # shape (every agent in before the deadline: round 0 requires every load), as cron runs it at H+5 min.
            "extract": {"deadline_minutes": "1440"},
        }
        for section, values in (extra or {}).items():
            self.settings.setdefault(section, {}).update(values)
        self.write_config()

    def write_config(self):
        with open(self.config_path, "w") as f:
            for section, values in self.settings.items():
                f.write(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()) + "\n")

    def activate(self):
        """This process reads this world's luigi.cfg from now on (and its children inherit it)."""
        from luigi.configuration.cfg_parser import LuigiConfigParser
        from luigi.task_register import Register
        os.environ["LUIGI_CONFIG_PATH"] = self.config_path
        LuigiConfigParser._instance = None
        LuigiConfigParser._config_paths = [self.config_path]
        Register.clear_instance_cache()
        return self

    @property
    def env(self):
        return dict(os.environ, LUIGI_CONFIG_PATH=self.config_path, PYTHONPATH=os.pathsep.join(
            [ROOT, os.path.join(ROOT, "agent"), HERE] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))

    def upgrade(self):
        from ganymede import config
        from ganymede.stores import mysql
        mysql.upgrade(config.mysql())

    def mysql(self, database=None, autocommit=False):
        from ganymede import config
        from ganymede.stores import mysql
        return mysql.connect(config.mysql(), database=database, autocommit=autocommit)

    def mongo(self, database=None):
        import pymongo
        client = pymongo.MongoClient(MONGO_URI, serverSelectionTimeoutMS=5000)
        return client, client[database or self.mongo_database]

    def geo_database(self, index):
        name = f"{self.mysql_database}_geo{index:03d}"
        if name not in self.geo_databases:
            self.geo_databases.append(name)
        return name

    def extra_database(self, suffix):
        name = f"{self.mysql_database}_{suffix}"
        if name not in self.extra_databases:
            self.extra_databases.append(name)
        return name

    def bucket(self, suffix):
        return f"{self.bucket_prefix}{suffix}"

    def cleanup(self):
        """Drop everything this world made; report, never raise (the figures are already printed)."""
        import pymysql
        problems = []
        try:
            with closing(pymysql.connect(host="127.0.0.1", port=3306, user="root", autocommit=True)) as conn, \
                    conn.cursor() as cur:
                for name in [self.mysql_database] + self.geo_databases + self.extra_databases:
                    cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        except Exception as exc:
            problems.append(f"MySQL: {exc}")
        try:
            client, _ = self.mongo()
            with closing(client):
                for name in client.list_database_names():
                    if name.startswith(self.mongo_database):
                        client.drop_database(name)
        except Exception as exc:
            problems.append(f"MongoDB: {exc}")
        try:
            client = s3_client()
            for bucket in client.list_buckets().get("Buckets", []):
                if bucket["Name"].startswith(self.bucket_prefix):
                    delete_bucket(client, bucket["Name"])
        except Exception as exc:
            problems.append(f"S3: {exc}")
        shutil.rmtree(self.base, ignore_errors=True)
        for problem in problems:
            print(f"note: cleanup of {self.tag} incomplete: {problem}", file=sys.stderr)


def s3_client():
    """A plain boto3 client on the S3 test server (boto3's defaults, checksums only when required)."""
    import boto3
    import botocore.config
    return boto3.client("s3", endpoint_url=S3_ENDPOINT, aws_access_key_id=S3_KEY_ID,
                        aws_secret_access_key=S3_SECRET, region_name="us-east-1",
                        config=botocore.config.Config(request_checksum_calculation="when_required",
                                                      response_checksum_validation="when_required"))


def delete_bucket(client, name):
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=name):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
    client.delete_bucket(Bucket=name)


def bucket_keys(client, name):
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        keys.extend(o["Key"] for o in page.get("Contents", []))
    return sorted(keys)


# --- luigid and the API ------------------------------------------------------------

class Luigid:
    """A luigid of our own: free port, temporary state path and log dir; stopped by its pid."""

    def __init__(self, base):
        self.port = free_port()
        self.dir = os.path.join(base, "luigid")
        os.makedirs(self.dir, exist_ok=True)
        self.proc = None

    def start(self, env=None):
        import urllib.request  # here, not at the top: measured child processes import this module too
        log = open(os.path.join(self.dir, "luigid.out"), "ab")
        self.proc = subprocess.Popen(
            [bin_path("luigid"), "--address", "127.0.0.1", "--port", str(self.port),
             "--state-path", os.path.join(self.dir, "state.pickle"), "--logdir", self.dir],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        for _ in range(200):
            if self.proc.poll() is not None:
                raise SystemExit(f"luigid exited {self.proc.returncode}; see {self.dir}/luigid.out")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/graph", timeout=1).read()
                return self
            except OSError:
                time.sleep(0.1)
        stop_process(self.proc)
        raise SystemExit(f"luigid did not answer on port {self.port}")

    def stop(self):
        stop_process(self.proc)


def start_api(world, log_name="api.log"):
    """The world's ganymede-api, started as the demo starts its own: (process, base URL)."""
    from ganymede.demo import start_api as start
    return start(world.env, os.path.join(world.base, log_name), world.api_port)


# --- an hour delivered by N agents through the API -----------------------------------

def prepare_geos(world, hour, agents, rows):
    """N GEO databases of R rows each for `hour`, N agents registered (expected from `hour`), their configs.

    Returns [(agent_id, config path)]; the configs still need the API url (see `deliver_hour`).
    """
    from ganymede import generator
    from ganymede.stores import txlog
    prepared = []
    with closing(world.mysql()) as conn:
        for i in range(agents):
            agent_id, geo = f"bench-{i:03d}", f"geo-{i:03d}"
            token = txlog.add_agent(conn, agent_id, geo, expected_from=hour)
            with closing(generator.create_database(world.geo_database(i))) as geo_conn:
                generator.generate_hour(geo_conn, hour, rows=rows, seed=i)
            prepared.append({"agent_id": agent_id, "geo": geo, "token": token, "database": world.geo_database(i)})
    return prepared


def write_agent_configs(world, prepared, api_url):
    from ganymede import generator
    paths = []
    for p in prepared:
        directory = os.path.join(world.base, "agents")
        os.makedirs(directory, exist_ok=True)
        paths.append(generator.write_agent_config(
            os.path.join(directory, p["agent_id"] + ".cfg"), api_url=api_url, agent_id=p["agent_id"],
            token=p["token"], geo=p["geo"], database=p["database"],
            spool_dir=os.path.join(world.base, "spool", p["agent_id"]), retry_budget_seconds=120))
    return paths


def run_agents(world, configs, hour_text, watch=None):
    """Every agent at once (`ganymede-agent --config C --hour H`); returns (wall seconds, [per-agent results])."""
    started = time.perf_counter()
    procs = []
    for path in configs:
        log = open(path[: -len(".cfg")] + ".log", "wb")
        proc = subprocess.Popen([bin_path("ganymede-agent"), "--config", path, "--hour", hour_text],
                                env=world.env, stdout=log, stderr=subprocess.STDOUT)
        procs.append((proc, path, time.perf_counter()))
        if watch:
            watch.watch(proc.pid, "agent")
    results = []
    for proc, path, t0 in procs:
        usage = {}
        code, maxrss = wait_maxrss(proc, usage)
        results.append({"config": path, "code": code, "maxrss_mb": maxrss, "seconds": time.perf_counter() - t0,
                        "cpu_s": usage["cpu_s"]})
    wall = time.perf_counter() - started
    failed = [r for r in results if r["code"] != 0]
    if failed:
        with open(failed[0]["config"][: -len(".cfg")] + ".log", errors="replace") as f:
            tail = f.read()[-2000:]
        raise SystemExit(f"{len(failed)} agent(s) failed, first exit {failed[0]['code']}:\n{tail}")
    return wall, results


# --- the graph through luigid, with task timings ---------------------------------------

def run_graph(world, hour_text, workers, events_path, watch=None, label="luigi", extra_args=(), usage=None,
              profile=None, task_argv=None):
    """The cron command through luigid; returns (wall seconds, exit code, ru_maxrss MB); CPU seconds into `usage`.

    `task_argv` replaces `--module ganymede.tasks HourlyBackup --hour H` (a bare graph, say).
    `profile`: a path for cProfile's stats of the main luigi process (scheduling, completeness checks; the
    task processes it forks are not in it).
    """
    task_argv = list(task_argv or ["--module", "ganymede.tasks", "HourlyBackup", "--hour", hour_text])
    argv = [sys.executable] + (["-m", "cProfile", "-o", profile] if profile else []) + [
        os.path.abspath(__file__), "probe", events_path, "--", *task_argv,
        "--workers", str(workers), "--log-level", "WARNING", *extra_args]
    log_path = events_path + ".log"
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env=world.env, stdout=log, stderr=subprocess.STDOUT)
        if watch:
            watch.watch(proc.pid, label)
        code, maxrss = wait_maxrss(proc, usage)
    wall = time.perf_counter() - started
    if code != 0:
        with open(log_path, errors="replace") as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"the graph exited {code}:\n{tail}")
    return wall, code, maxrss


def read_events(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def task_stats(events):
    """Per task family: tasks, sum of run seconds, first start, last end, peak RSS; and the probe's start time."""
    begun, stats, process_start = {}, {}, None
    for e in events:
        if e["event"] == "process":
            process_start = e["t"]
            continue
        if e["event"] == "start":
            begun[e["task_id"]] = e["t"]
            continue
        if e["event"] not in ("success", "failure"):
            continue
        t0 = begun.pop(e["task_id"], e["t"])
        s = stats.setdefault(e["family"], {"tasks": 0, "seconds": 0.0, "first": t0, "last": e["t"], "rss_mb": 0.0,
                                           "failed": 0})
        s["tasks"] += 1
        s["failed"] += e["event"] == "failure"
        s["seconds"] += e["t"] - t0
        s["first"], s["last"] = min(s["first"], t0), max(s["last"], e["t"])
        s["rss_mb"] = max(s["rss_mb"], e.get("rss_mb", 0.0))
    return process_start, stats


def probe(events_path, luigi_argv):
    """luigi's command line, plus START/SUCCESS/FAILURE handlers logging times and VmHWM per task."""
    import luigi
    import luigi.cmdline

    lock = threading.Lock()

    def write(event, task=None, **extra):
        record_ = {"event": event, "t": time.time(), "pid": os.getpid(), **extra}
        if task is not None:
            record_.update(family=task.task_family, task_id=task.task_id, rss_mb=vmhwm_mb())
        line = (json.dumps(record_) + "\n").encode()
        with lock:
            fd = os.open(events_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

    for event, name in ((luigi.Event.START, "start"), (luigi.Event.SUCCESS, "success"),
                        (luigi.Event.FAILURE, "failure")):
        luigi.Task.event_handler(event)(lambda task, *args, _name=name: write(_name, task))
    write("process")
    try:
        luigi.cmdline.luigi_run(luigi_argv)
    finally:
        write("exit", main_rss_mb=vmhwm_mb())


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "probe" and sys.argv[3] == "--":
        probe(sys.argv[2], sys.argv[4:])
    else:
        raise SystemExit(__doc__)
