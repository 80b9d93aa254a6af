"""The same hour on several hosts through one luigid, proven on test hosts made of network namespaces.

Hosts (tests/hostlib.py): `stores` (MariaDB through a TCP forwarder to its
unix socket, the MongoDB test server, moto S3), `sched` (luigid, with
deploy/luigid.cfg), `api-1` and `api-2` (ganymede-api), `worker-1` and
`worker-2` (the cron command `luigi --module ganymede.tasks HourlyBackup`),
`geo` (the agents). Every service is reached across the veth network, never
through loopback; the state root is one directory all hosts see.

The end state of the hour is compared with a one-host run of the same input:
the transaction log and archives the agents delivered are copied into a
world of its own on this machine's loopback services and run there with a
local scheduler (faultlib.fingerprint: MongoDB content, extract bytes, bucket
objects and checksums, file locations, transaction states).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import timedelta

import pytest

import faultlib as F
import hostlib
from conftest import GanymedeEnv, drop_world, require_port
from ganymede import config, generator, hours, paths
from ganymede.stores import mysql

pytestmark = pytest.mark.slow

HOSTS = {"stores": 2, "sched": 3, "api-1": 11, "api-2": 12, "worker-1": 21, "worker-2": 22, "geo": 31}
AGENTS = [f"geo-{n}" for n in range(1, 7)]
HOUR = hours.last_complete_hour() - timedelta(hours=3)
KILL_HOUR = HOUR - timedelta(hours=24)  # its hour before holds nothing in either world
# Agents deliver before the hour's deadline, as in production: its loads are then static dependencies, which
# luigid hands to either host (late arrivals are dynamic ones, run by the host whose extract yields them).
SETTINGS = {"extract": {"deadline_minutes": str(50 * 60)}}
CRON_HOUR = HOUR - timedelta(hours=12)
API_PORT, LUIGID_PORT = 8750, 8082
# luigid gives a dead worker's tasks back after worker_disconnect_delay (60 s in deploy/luigid.cfg);
# shortened here so the test waits less: what is proven is that they come back to the other host.
DISCONNECT_DELAY = 15
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def need_root():
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare"):
        pytest.fail("test_multihost makes network namespaces: run it as root with iproute2 and util-linux "
                    "(`ip`, `unshare`) installed", pytrace=False)


class Cluster:
    """The hosts, their services and one Ganymede world (`env`) spread over them."""

    def __init__(self, net, base):
        self.net, self.base = net, base
        (base / "multi").mkdir()
        self.env = GanymedeEnv(base / "multi")  # names, root and ~/.s3curl; its config is rewritten per host
        self.logs = base / "logs"
        self.logs.mkdir()
        self.geo_dbs = []

    def at(self, host):
        return self.net.addresses[host]

    def host_config(self, host):
        """The luigi.cfg of one host: every service at its host's address on the veth network."""
        stores = self.at("stores")
        settings = json.loads(json.dumps(self.env.settings))
        settings["mysql"].update(host=stores, port="3306")
        settings["mongodb"]["uri"] = f"mongodb://{stores}:27017/"
        settings["s3"]["endpoint_url"] = f"http://{stores}:9000"
        # Luigi's pid lock (one identical command line per host) lives in /tmp/luigi, host-local on real hosts;
        # these hosts share /tmp, so each gets a directory of its own
        settings["core"].update(scheduler_host=self.at("sched"), scheduler_port=str(LUIGID_PORT),
                                lock_pid_dir=str(self.base / f"pids-{host}"))
        settings["api"] = {"host": self.at(host), "port": str(API_PORT)}
        settings["state"]["log_file"] = str(self.logs / f"{host}-ganymede.log")  # logs stay on their host
        settings["retcode"] = {k: str(v) for k, v in F.RETCODES.items()}
        path = self.base / f"luigi-{host}.cfg"
        with open(path, "w") as f:
            for section, values in settings.items():
                f.write(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()) + "\n")
        return str(path)

    def host_env(self, host):
        return dict(os.environ, LUIGI_CONFIG_PATH=self.host_config(host), HOME=str(self.env.home))

    def start(self, host, name, argv, env=None):
        return self.net.popen(host, argv, self.logs / f"{host}-{name}.log", env=env or self.host_env(host),
                              cwd=str(self.base))

    def start_services(self):
        stores = self.at("stores")
        self.start("stores", "mysql-forwarder", [sys.executable, os.path.join(REPO, "tests", "hostlib.py"),
                                                 "forward", stores, "3306", mysql_socket()])
        self.start("stores", "mongodb", [sys.executable, os.path.join(REPO, "scripts", "nx_launcher.py"),
                                         "--data-dir", "memory", "--host", stores, "-p", "27017",
                                         "--pid-file", str(self.base / "nx.pid"),
                                         "--log-file", str(self.logs / "nx.log")])
        self.start("stores", "s3", [f"{BIN}/moto_server", "-H", stores, "-p", "9000"])
        luigid_dir = self.base / "luigid"
        luigid_dir.mkdir()
        with open(os.path.join(REPO, "deploy", "luigid.cfg")) as f:
            text = f.read().replace("/var/lib/ganymede/luigid", str(luigid_dir))
        text = re.sub(r"(?m)^worker_disconnect_delay = .*$", f"worker_disconnect_delay = {DISCONNECT_DELAY}", text)
        (luigid_dir / "luigid.cfg").write_text(text)
        self.start("sched", "luigid", [f"{BIN}/luigid", "--address", self.at("sched"), "--port", str(LUIGID_PORT),
                                       "--logdir", str(luigid_dir), "--state-path", str(luigid_dir / "state.pickle")],
                   env=dict(os.environ, LUIGI_CONFIG_PATH=str(luigid_dir / "luigid.cfg")))
        for host, port in (("stores", 3306), ("stores", 27017), ("stores", 9000), ("sched", LUIGID_PORT)):
            assert hostlib.wait_for_port(self.net, host, port), f"nothing listens on {host}:{port}: see {self.logs}"
        for api in ("api-1", "api-2"):
            self.start(api, "ganymede-api", [f"{BIN}/ganymede-api"])
        for api in ("api-1", "api-2"):
            assert hostlib.wait_for_port(self.net, api, API_PORT), f"{api} did not listen: see {self.logs}"

    def register_agents(self):
        self.tokens = {}
        for n, agent_id in enumerate(AGENTS):
            self.tokens[agent_id] = F.register_agent(self.env, agent_id, geo=agent_id, since=KILL_HOUR)
            name = f"{self.env.mysql_database}_{agent_id.replace('-', '_')}"
            self.geo_dbs.append(name)
            generator.create_database(name).close()

    def deliver(self, hour):
        """Every agent collects the hour on the geo host and sends it, alternately to api-1 and api-2."""
        procs = []
        for n, agent_id in enumerate(AGENTS):
            geo_db = self.geo_dbs[n]
            with generator.connect(geo_db) as conn:
                generator.generate_hour(conn, hour, accounts=20, nodes=2, seed=n)
            api = ("api-1", "api-2")[n % 2]
            cfg = generator.write_agent_config(
                str(self.base / f"agent-{agent_id}.cfg"), api_url=f"http://{self.at(api)}:{API_PORT}",
                agent_id=agent_id, token=self.tokens[agent_id], geo=agent_id, database=geo_db,
                spool_dir=str(self.base / "spool" / agent_id), db_host=self.at("stores"))
            procs.append((agent_id, self.start("geo", f"agent-{agent_id}",
                                               [f"{BIN}/ganymede-agent", "--config", cfg, "--hour",
                                                hours.format_hour(hour)])))
        for agent_id, proc in procs:
            assert proc.wait(120) == 0, f"agent {agent_id} failed: see {self.logs}/geo-agent-{agent_id}.log"

    def worker(self, host, hour, name, wrapper=()):
        """The cron command on a worker host (optionally under faultlib's wrapper)."""
        argv = [*wrapper, "--module", "ganymede.tasks", "HourlyBackup", "--hour", hours.format_hour(hour),
                "--workers", "2"]
        return self.start(host, name, argv if wrapper else [f"{BIN}/luigi", *argv])

    def fingerprint(self, hour):
        """faultlib.fingerprint of this world, taken from the geo host (the services are only there)."""
        world = self.base / "world.json"
        world.write_text(json.dumps({"root": self.env.root, "settings": self.env.settings,
                                     "mongo_database": self.env.mongo_database,
                                     "mysql_database": self.env.mysql_database}))
        stores = self.at("stores")
        env = dict(os.environ, GANYMEDE_TEST_MYSQL=f"{stores}:3306", GANYMEDE_TEST_MONGO_URI=f"mongodb://{stores}:27017/",
                   GANYMEDE_S3_ENDPOINT=f"http://{stores}:9000")
        out = self.net.run("geo", [sys.executable, os.path.join(REPO, "tests", "hostlib.py"), "fingerprint",
                                   str(world), hours.format_hour(hour)], env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout)

    def log(self, host, name):
        return (self.logs / f"{host}-{name}.log").read_text(errors="replace")


def mysql_socket():
    for path in ("/run/mysqld/mysqld.sock", "/var/run/mysqld/mysqld.sock", "/tmp/mysql.sock"):
        if os.path.exists(path):
            return path
    pytest.fail("MariaDB's unix socket was not found (start it with: make services)", pytrace=False)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    need_root()
    require_port("127.0.0.1", 3306, "MariaDB")
    require_port("127.0.0.1", 27017, "MongoDB test server (nx-27017)")  # the one-host reference run
    net = hostlib.Network()
    base = tmp_path_factory.mktemp("multihost")
    reference = None
    try:
        net.create(HOSTS)
        c = Cluster(net, base)
        c.env.write_config(**SETTINGS)
        mysql.upgrade(config.mysql())
        c.register_agents()
        c.start_services()
        reference = F.new_world(base / "one-host", state={"log_file": str(base / "one-host.log")}, **SETTINGS)
        c.reference = reference
        yield c
    finally:
        problems = net.destroy()  # first: every process of every host, then the namespaces
        if reference is not None:
            F.drop_world(reference)
        if "c" in locals():
            drop_world(c.env)
            for name in c.geo_dbs:
                generator.drop_database(name)
        assert problems == [], problems


def one_host_run(cluster, hour, argv=None):
    """The same input (transaction log rows and archives of the hour) run on one host: its fingerprint."""
    multi, ref = cluster.env, cluster.reference
    with F.sql(ref) as conn, conn.cursor() as cur:
        cur.execute(f"INSERT IGNORE INTO agents SELECT * FROM `{multi.mysql_database}`.agents")
        cur.execute(f"INSERT INTO transactions SELECT * FROM `{multi.mysql_database}`.transactions WHERE hour = %s",
                    (hour,))
        cur.execute("UPDATE transactions SET archive_path = REPLACE(archive_path, %s, %s) WHERE hour = %s",
                    (multi.root, ref.root, hour))
        cur.execute("SELECT column_name FROM information_schema.columns WHERE table_schema = DATABASE() "
                    "AND table_name = 'transaction_events' AND column_name <> 'event_id' ORDER BY ordinal_position")
        cols = ", ".join(f"e.`{c}`" for (c,) in cur.fetchall())
        cur.execute(f"INSERT INTO transaction_events ({cols.replace('e.', '')}) SELECT {cols} "
                    f"FROM `{multi.mysql_database}`.transaction_events e JOIN `{multi.mysql_database}`.transactions t "
                    f"USING (transaction_id) WHERE t.hour = %s", (hour,))
    src = paths.StateRoot(multi.root).hour_uploads(hour)
    shutil.copytree(src, paths.StateRoot(ref.root).hour_uploads(hour))
    done = F.run(argv or F.luigi_command(hours.format_hour(hour), "--workers", "2"), ref.subprocess_env)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"fingerprint": json.loads(json.dumps(F.fingerprint(ref, hour), default=str)),
            "problems": F.consistency_problems(ref, hour)}


def assert_same_end_state(mine, reference):
    assert mine["problems"] == [], mine["problems"]
    for part in reference["fingerprint"]:
        assert mine["fingerprint"][part] == reference["fingerprint"][part], f"{part} differs from the one-host run"


def tasks_run(log_text):
    found = re.search(r"\* (\d+) ran successfully", log_text)
    return int(found.group(1)) if found else 0


@pytest.mark.timeout(600)
def test_two_worker_hosts_run_one_hour_through_luigid_and_end_as_one_host(cluster):
    cluster.deliver(HOUR)
    with F.sql(cluster.env) as conn, conn.cursor() as cur:  # the alternation: each API completed its agents'
        cur.execute("SELECT agent_id, transaction_id FROM transactions WHERE hour = %s", (HOUR,))
        for agent_id, tx in cur.fetchall():
            api = ("api-1", "api-2")[AGENTS.index(agent_id) % 2]
            assert f"POST /v1/transactions/{tx}/complete ({cluster.at('geo')})" in cluster.log(api, "ganymede-api")
    reference = one_host_run(cluster, HOUR)

    runs = {host: cluster.worker(host, HOUR, "hour") for host in ("worker-1", "worker-2")}
    codes = {host: proc.wait(300) for host, proc in runs.items()}
    # A host whose remaining tasks the other ran exits 25 (Luigi: "not granted run permission"), or 10 when the
    # other still runs them as it ends; nothing failed, and the hour is closed (the backup marker is compared).
    assert set(codes.values()) <= {0, 10, 25}, codes
    for host in runs:  # both hosts did part of the hour
        assert tasks_run(cluster.log(host, "hour")) >= 1, cluster.log(host, "hour")[-3000:]
    assert_same_end_state(cluster.fingerprint(HOUR), reference)


@pytest.mark.timeout(600)
def test_a_worker_host_killed_mid_hour_the_other_finishes_it(cluster):
    cluster.deliver(KILL_HOUR)
    reference = one_host_run(cluster, KILL_HOUR)

    # worker-1 freezes inside its first staging (second dataset of a transaction), holding tasks RUNNING
    wrapper = [sys.executable, os.path.join(REPO, "tests", "faultlib.py"), "--patch",
               "ganymede.stores.staging:load_csv", "--nth", "2", "--action", "stop", "luigi"]
    first = cluster.worker("worker-1", KILL_HOUR, "killed", wrapper)
    F.wait_for(lambda: any(stopped(pid) for pid in cluster.net.pids("worker-1")), timeout=120,
               what="worker-1 frozen mid-staging")
    second = cluster.worker("worker-2", KILL_HOUR, "survivor")
    time.sleep(3)  # both hosts on the hour at once
    killed = cluster.net.kill_host("worker-1")
    assert killed and first.poll() is not None
    assert not os.path.exists(paths.StateRoot(cluster.env.root).hour_marker(KILL_HOUR, "backup"))

    # cron's next runs on worker-2: luigid gives worker-1's tasks back once it has been silent for
    # worker_disconnect_delay, and worker-2 finishes the hour
    code = second.wait(300)
    deadline = time.monotonic() + DISCONNECT_DELAY + 240
    attempt = 0
    while code != 0 and time.monotonic() < deadline:
        time.sleep(5)
        attempt += 1
        code = cluster.worker("worker-2", KILL_HOUR, f"rerun-{attempt}").wait(300)
    assert code == 0, cluster.log("worker-2", f"rerun-{attempt}" if attempt else "survivor")[-3000:]
    frozen = set(re.findall(r"running   (StageTransaction\(transaction_id=[^)]*\))", cluster.log("worker-1", "killed")))
    survivor = "".join(cluster.log("worker-2", n) for n in ["survivor"] + [f"rerun-{i}" for i in range(1, attempt + 1)])
    assert frozen and all(f"done      {task}" in survivor for task in frozen), frozen  # taken over by worker-2
    assert_same_end_state(cluster.fingerprint(KILL_HOUR), reference)


@pytest.mark.timeout(600)
def test_the_cron_command_on_both_worker_hosts_shares_the_hour(cluster):
    """`ganymede-hourly-backup` holds the hour's lock shared when it goes through luigid: both hosts work."""
    cluster.deliver(CRON_HOUR)
    cron = [f"{BIN}/ganymede-hourly-backup", "--hour", hours.format_hour(CRON_HOUR), "--workers", "2"]
    reference = one_host_run(cluster, CRON_HOUR, cron + ["--local-scheduler"])
    runs = {host: cluster.start(host, "cron", cron) for host in ("worker-1", "worker-2")}
    codes = {host: proc.wait(300) for host, proc in runs.items()}
    # a run that ends while the other host still runs the hour says so (10); the one that ends last closes it
    assert set(codes.values()) <= {0, 10} and 0 in codes.values(), codes
    for host in runs:  # both hosts ran tasks of the hour
        assert re.search(r"Worker\(.*host=%s.*\) done " % host, cluster.log(host, "ganymede"))
    assert_same_end_state(cluster.fingerprint(CRON_HOUR), reference)


def stopped(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return False
