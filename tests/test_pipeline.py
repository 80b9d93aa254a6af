"""The walking skeleton end to end: two GEO agents -> API -> the whole HourlyBackup graph, on real services."""
import gzip
import json
import os
import subprocess
import sys
from contextlib import closing
from datetime import timedelta

import boto3
import luigi
import pytest

from ganymede import config, datasets, generator, hours
from ganymede.paths import StateRoot
from ganymede.stores import mysql, txlog
from ganymede.stores.s3 import bucket_name
from ganymede.tasks import HourlyBackup
from conftest import S3_ENDPOINT

BIN = os.path.dirname(sys.executable)
AGENTS = (("agent-eu", "eu-west"), ("agent-us", "us-east"))


@pytest.fixture
def geo_databases(genv):
    names = [f"{genv.mysql_database}_geo{n}" for n in range(len(AGENTS))]
    yield names
    for name in names:
        generator.drop_database(name)


def run_agents(genv, api_url, geo_databases, hour, tmp_path):
    for (agent_id, geo), database in zip(AGENTS, geo_databases):
        with closing(mysql.connect(config.mysql())) as conn:
            token = txlog.add_agent(conn, agent_id, geo, expected_from=hour)
        with closing(generator.create_database(database)) as conn:
            generator.generate_hour(conn, hour, accounts=20, endpoints=3, nodes=2, seed=len(agent_id))
        cfg = generator.write_agent_config(str(tmp_path / f"{agent_id}.cfg"), api_url=api_url, agent_id=agent_id,
                                           token=token, geo=geo, database=database,
                                           spool_dir=str(tmp_path / "spool" / agent_id))
        subprocess.run([f"{BIN}/ganymede-agent", "--config", cfg, "--hour", hours.format_hour(hour)],
                       env=genv.subprocess_env, check=True, timeout=120)


def test_one_hour_end_to_end_then_nothing_to_do(genv, api_server, geo_databases, tmp_path, mongo_up, s3_up):
    hour = hours.last_complete_hour() - timedelta(hours=2)
    run_agents(genv, api_server, geo_databases, hour, tmp_path)

    result = luigi.build([HourlyBackup(hour=hour)], local_scheduler=True, detailed_summary=True)
    assert result.status.name == "SUCCESS", result.summary_text

    root = StateRoot(genv.root)
    with genv.mysql() as conn:
        txs = txlog.hour_transactions(conn, hour)
    assert sorted(t["agent_id"] for t in txs) == ["agent-eu", "agent-us"]

    db = genv.mongo()
    expected = {"account_usage": 2 * 20, "api_requests": None, "node_health": 2 * 2 * 60}
    for name in datasets.CATALOG:
        count = db[name].count_documents({"hour": hour})
        assert count > 0 and (expected[name] is None or count == expected[name]), (name, count)
    assert db["account_usage"].count_documents({"agent_id": "agent-eu"}) == 20

    with gzip.open(root.extract(hour)) as f:
        lines = [json.loads(line) for line in f]
    manifest = json.load(open(root.extract_manifest(hour)))
    assert len(lines) == sum(db[n].count_documents({"hour": hour}) for n in datasets.CATALOG)
    assert sum(manifest["counts"].values()) == len(lines) and manifest["missing_agents"] == []
    assert sorted(manifest["agents"]) == ["agent-eu", "agent-us"]

    s3 = boto3.client("s3", endpoint_url=S3_ENDPOINT, aws_access_key_id="testing",
                      aws_secret_access_key="testing-secret", region_name="us-east-1")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket_name(config.s3().bucket_template, hour))["Contents"]}
    assert {"MANIFEST.json", "mysql/ganymede.sql.gz", f"extracts/ganymede-{hours.compact(hour)}.jsonl.gz"} <= keys
    for t in txs:
        assert f"archives/{t['agent_id']}/{t['transaction_id']}.tar.gz" in keys
        assert not os.path.exists(root.upload(hour, t["agent_id"], t["transaction_id"]))
        assert os.path.exists(root.archived(hour, t["agent_id"], t["transaction_id"]))

    snapshot = tree_mtimes(genv.root)
    again = subprocess.run([f"{BIN}/luigi", "--module", "ganymede.tasks", "HourlyBackup", "--hour",
                            hours.format_hour(hour), "--local-scheduler"], env=genv.subprocess_env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "Did not run any tasks" in again.stderr + again.stdout
    assert tree_mtimes(genv.root) == snapshot


def tree_mtimes(root):
    return {os.path.join(d, p): os.path.getmtime(os.path.join(d, p)) for d, _, files in os.walk(root) for p in files}
