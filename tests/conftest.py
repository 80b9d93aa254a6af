"""Shared fixtures: every test gets its own state root, MySQL database, MongoDB
database, bucket prefix and luigi.cfg, so tests pass in any order and in
parallel. Services are the real ones started by `make services`; a test that
cannot reach one fails and says how to start it.
"""
import os
import socket
import uuid

import luigi
import luigi.configuration
import pymongo
import pymysql
import pytest
from luigi.configuration.cfg_parser import LuigiConfigParser
from luigi.task_register import Register

from ganymede import config
from ganymede.stores import mysql

MONGO_URI = os.environ.get("GANYMEDE_TEST_MONGO_URI", "mongodb://127.0.0.1:27017/")
S3_ENDPOINT = os.environ.get("GANYMEDE_S3_ENDPOINT", "http://127.0.0.1:9000")
HOW_TO_START = "start the test services with: make services"


def require_port(host, port, what):
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        pytest.fail(f"{what} on {host}:{port} is not answering ({exc}); {HOW_TO_START}", pytrace=False)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GanymedeEnv:
    """One test's isolated world: names, paths and the luigi.cfg that points at them."""

    def __init__(self, tmp_path):
        tag = uuid.uuid4().hex[:10]
        self.tag = tag
        self.root = str(tmp_path / "state")
        self.mysql_database = f"gtest_{tag}"
        self.mongo_database = f"gtest_{tag}"
        self.bucket_prefix = f"gt-{tag}-"
        self.home = tmp_path / "home"
        self.home.mkdir()
        self.s3curl_path = str(self.home / ".s3curl")
        with open(self.s3curl_path, "w") as f:
            f.write("%awsSecretAccessKeys = (\n  ganymede => { id => 'testing', key => 'testing-secret' },\n);\n")
        os.chmod(self.s3curl_path, 0o600)
        self.api_port = free_port()
        self.config_path = str(tmp_path / "luigi.cfg")
        self.settings = {
            "state": {"root": self.root},
            "mysql": {"host": "127.0.0.1", "port": "3306", "user": "root", "database": self.mysql_database,
                      "option_file": ""},
            "mongodb": {"uri": MONGO_URI, "database": self.mongo_database},
            "s3": {"endpoint_url": S3_ENDPOINT, "s3curl_path": self.s3curl_path, "profile": "ganymede",
                   "bucket_template": self.bucket_prefix + "{yyyymmddhh}"},
            "api": {"host": "127.0.0.1", "port": str(self.api_port)},
            "extract": {"deadline_minutes": "45"},
            "core": {"autoload_range": "true"},
            "email": {"receiver": ""},  # the repo's luigi.cfg (read from the cwd by `luigi`) names one
        }
        self.write_config()

    def write_config(self, **overrides):
        """(Re)write luigi.cfg; overrides are {section: {key: value}}; the in-process config follows."""
        for section, values in overrides.items():
            self.settings.setdefault(section, {}).update({k: str(v) for k, v in values.items()})
        with open(self.config_path, "w") as f:
            for section, values in self.settings.items():
                f.write(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()) + "\n")
        LuigiConfigParser._instance = None
        LuigiConfigParser._config_paths = [self.config_path]
        Register.clear_instance_cache()

    @property
    def subprocess_env(self):
        """Environment for a command-line run against this test's world."""
        return dict(os.environ, LUIGI_CONFIG_PATH=self.config_path, HOME=str(self.home))

    def mysql(self, autocommit=False):
        return mysql.connect(config.mysql(), autocommit=autocommit)

    def mongo(self):
        client = pymongo.MongoClient(MONGO_URI, serverSelectionTimeoutMS=5000)
        return client[self.mongo_database]


def drop_buckets(prefix, client=None):
    """Remove this test's buckets from the S3 test server (it keeps everything in memory); `client` for
    buckets only other credentials or another endpoint can see."""
    import boto3
    import botocore.exceptions
    s3 = client or boto3.client("s3", endpoint_url=S3_ENDPOINT, aws_access_key_id="testing",
                                aws_secret_access_key="testing-secret", region_name="us-east-1")
    try:
        for bucket in s3.list_buckets().get("Buckets", []):
            if bucket["Name"].startswith(prefix):
                for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket["Name"]):
                    for obj in page.get("Contents", []):
                        s3.delete_object(Bucket=bucket["Name"], Key=obj["Key"])
                s3.delete_bucket(Bucket=bucket["Name"])
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
        pass  # the server is down (a test may have stopped it); nothing of ours is left to leak


@pytest.fixture
def genv(tmp_path, monkeypatch):
    """An isolated Ganymede world with a migrated MySQL schema; dropped afterwards."""
    require_port("127.0.0.1", 3306, "MariaDB")
    env = GanymedeEnv(tmp_path)
    monkeypatch.setenv("LUIGI_CONFIG_PATH", env.config_path)
    monkeypatch.setenv("HOME", str(env.home))
    mysql.upgrade(config.mysql())
    yield env
    drop_world(env)


def drop_world(env):
    """Drop a world's MySQL and MongoDB databases and buckets; the in-process config points nowhere again."""
    with pymysql.connect(host="127.0.0.1", port=3306, user="root", autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{env.mysql_database}`")
    try:
        pymongo.MongoClient(MONGO_URI, serverSelectionTimeoutMS=2000).drop_database(env.mongo_database)
    except pymongo.errors.PyMongoError:
        pass
    drop_buckets(env.bucket_prefix)
    LuigiConfigParser._instance = None
    LuigiConfigParser._config_paths = []
    Register.clear_instance_cache()


@pytest.fixture
def api_server(genv):
    """`ganymede-api` as a subprocess on genv.api_port; yields its base URL."""
    import subprocess
    import sys
    import time
    import urllib.request
    log_path = genv.root + "-api.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "ganymede-api")],
                                env=genv.subprocess_env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{genv.api_port}"
    for _ in range(150):
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1)
            break
        except OSError:
            assert proc.poll() is None, open(log_path).read()
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def mongo_up():
    require_port("127.0.0.1", int(MONGO_URI.rsplit(":", 1)[1].strip("/")), "MongoDB test server (nx-27017)")


@pytest.fixture
def s3_up():
    host, port = S3_ENDPOINT.split("//")[1].split(":")
    require_port(host, int(port), "S3 test server (moto)")


# --- building transactions without the API (for the pipeline's own tests) -------

def sample_rows(hour, n=5, agent_tag="a"):
    """Valid rows for every dataset of the catalog, `n` per dataset, deterministic."""
    from datetime import timedelta
    return {
        "account_usage": [[f"acct-{agent_tag}-{i:04d}", 10_000 * (i + 1), 10 * (i + 1), 100 * i, 50 * i, i * 3]
                          for i in range(n)],
        "api_requests": [["GET", f"/v1/objects/{i}", 200 if i % 4 else 503, 100 + i, 4096 * i, 1.5, 9.25]
                         for i in range(n)],
        "node_health": [[f"node-{agent_tag}-{i:03d}", (hour + timedelta(minutes=i % 60)).strftime("%Y-%m-%dT%H:%M:%S"),
                         10 ** 12, 10 ** 11 * (i % 10), 0.5 + i / 10, i % 3] for i in range(n)],
    }


def build_test_archive(path, agent_id, geo, hour, rows):
    from ganymede import datasets, hours
    from ganymede_agent.archive import build_archive
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return build_archive(path, {"agent_id": agent_id, "geo": geo, "hour": hours.format_hour(hour),
                                "agent_version": "test"},
                         [(name, datasets.CATALOG[name].column_names, rows.get(name, []))
                          for name in sorted(datasets.CATALOG)])


def completed_transaction(genv, agent_id, hour, rows=None, geo="geo-test", replace=False):
    """Register the agent if needed, then create, 'upload' and complete a transaction as the API would."""
    from ganymede.paths import StateRoot
    from ganymede.stores import txlog
    from ganymede_agent.archive import sha256_file
    rows = sample_rows(hour, agent_tag=agent_id) if rows is None else rows
    with genv.mysql() as conn:
        if not any(a["agent_id"] == agent_id for a in txlog.list_agents(conn)):
            with conn.cursor() as cur:
                cur.execute("INSERT INTO agents (agent_id, geo, token_hash, active, created_at) "
                            "VALUES (%s, %s, %s, 1, %s)", (agent_id, geo, "0" * 64, hour.replace(year=hour.year - 1)))
            conn.commit()
        tx, _ = txlog.create_transaction(conn, agent_id, hour, replace=replace)
        path = StateRoot(genv.root).upload(hour, agent_id, tx["transaction_id"])
        manifest = build_test_archive(path, agent_id, geo, hour, rows)
        txlog.mark_uploaded(conn, tx["transaction_id"], os.path.getsize(path), sha256_file(path))
        txlog.mark_completed(conn, tx["transaction_id"], path, {k: v["rows"] for k, v in manifest["datasets"].items()})
        return txlog.get_transaction(conn, tx["transaction_id"])
