"""`ganymede demo`: its names belong to its directory, it clears what it made, it reuses no stranger's process."""
import os
import re
import signal
import socket
import subprocess
import sys

import boto3
import pymongo
import pytest

from ganymede import demo
from conftest import MONGO_URI, S3_ENDPOINT, drop_buckets

BIN = os.path.dirname(sys.executable)


def test_every_name_comes_from_the_directory(tmp_path):
    one, two = demo.names(str(tmp_path / "a")), demo.names(str(tmp_path / "b"))
    assert one["db"] != two["db"] and one["bucket_prefix"] != two["bucket_prefix"]
    assert demo.names(str(tmp_path / "a")) == one
    assert demo.geo_db(str(tmp_path / "a"), "eu-west") == one["db"] + "_geo_eu_west"


def test_a_process_already_on_the_api_port_is_refused(tmp_path):
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        port = stranger.getsockname()[1]
        with pytest.raises(SystemExit, match=f"port {port} is taken by a process this run did not start"):
            demo.start_api(dict(os.environ), str(tmp_path / "api.log"), port)


@pytest.mark.slow
def test_the_demo_runs_twice_in_its_own_world(tmp_path, mongo_up, s3_up):
    env = {k: v for k, v in os.environ.items() if k != "LUIGI_CONFIG_PATH"}
    base = tmp_path / "demo"
    try:
        for _ in range(2):
            first_luigid = (base / "luigid.pid").read_text().strip() if (base / "luigid.pid").exists() else None
            run = subprocess.run([f"{BIN}/ganymede", "demo", "--dir", str(base), "--agents", "2"], env=env, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
            assert "done, hour closed (exit 0" in run.stdout
            assert f"Bucket {demo.names(str(base))['bucket_prefix']}" in run.stdout
            assert "agents 2/2" in run.stdout  # the second run started from nothing again
            # it ends with the hour's quality checks (3 per agent and dataset, one more on node_health) and metrics
            assert "Quality checks of the hour (20, 0 failed;" in run.stdout
            assert re.search(r"/metrics \(admin token\): 2 uploads, [1-9][0-9]* bytes\n", run.stdout), run.stdout
            assert "ganymede.prom" in run.stdout.splitlines()[-2]
            if first_luigid:
                assert not os.path.exists(f"/proc/{first_luigid}")  # the previous run's luigid was stopped
        last_luigid = (base / "luigid.pid").read_text().strip()
        stop = subprocess.run([f"{BIN}/ganymede", "demo", "--dir", str(base), "--stop"], env=env, timeout=60)
        assert stop.returncode == 0 and not os.path.exists(f"/proc/{last_luigid}")
        assert not (base / "luigid.pid").exists()
    finally:
        if (base / "luigid.pid").exists():
            os.kill(int((base / "luigid.pid").read_text()), signal.SIGTERM)
        from ganymede import generator
        named = demo.names(str(base))
        with generator.connect() as conn, conn.cursor() as cur:
            for name in [named["db"]] + [demo.geo_db(str(base), g) for g in demo.GEOS]:
                cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        pymongo.MongoClient(MONGO_URI, serverSelectionTimeoutMS=2000).drop_database(named["db"])
        drop_buckets(named["bucket_prefix"], boto3.client("s3", endpoint_url=S3_ENDPOINT, region_name="us-east-1",
                                                          aws_access_key_id="demo-access-key",
                                                          aws_secret_access_key="demo-secret-key"))
