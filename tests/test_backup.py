"""HourlyBackup: dump, extract, archives into the hour's bucket, verified, then archives moved."""
import gzip
import json
import os
from datetime import datetime

import boto3
import luigi

from ganymede import config
from ganymede.paths import StateRoot
from ganymede.stores import txlog
from ganymede.stores.s3 import bucket_name
from ganymede.tasks import HourlyBackup
from conftest import S3_ENDPOINT, completed_transaction

HOUR = datetime(2026, 11, 30, 5)


def build(task):
    return luigi.build([task], local_scheduler=True, detailed_summary=True)


def bucket_listing(genv):
    s3 = boto3.client("s3", endpoint_url=S3_ENDPOINT, aws_access_key_id="testing",
                      aws_secret_access_key="testing-secret", region_name="us-east-1")
    name = bucket_name(config.s3().bucket_template, HOUR)
    return {o["Key"]: o["Size"] for o in s3.list_objects_v2(Bucket=name).get("Contents", [])}


def test_hourly_backup_uploads_verifies_and_moves(genv, mongo_up, s3_up):
    txs = [completed_transaction(genv, agent, HOUR) for agent in ("agent-a", "agent-b")]
    result = build(HourlyBackup(hour=HOUR))
    assert result.status.name == "SUCCESS", result.summary_text
    root = StateRoot(genv.root)
    keys = bucket_listing(genv)
    assert set(keys) == {"MANIFEST.json", "mysql/ganymede.sql.gz", "extracts/ganymede-2026113005.jsonl.gz",
                         "extracts/ganymede-2026113005.manifest.json"} | {
        f"archives/{t['agent_id']}/{t['transaction_id']}.tar.gz" for t in txs}
    for t in txs:
        assert not os.path.exists(root.upload(HOUR, t["agent_id"], t["transaction_id"]))
        assert os.path.exists(root.archived(HOUR, t["agent_id"], t["transaction_id"]))
    with gzip.open(root.extract(HOUR)) as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == 30 and {l["agent_id"] for l in lines} == {"agent-a", "agent-b"}
    with gzip.open(root.backup_dump(HOUR)) as f:
        assert b"CREATE TABLE `transactions`" in f.read()
    with genv.mysql() as conn:
        assert "backed_up" in [e["event"] for e in txlog.events(conn, txs[0]["transaction_id"])]


def test_second_run_does_nothing(genv, mongo_up, s3_up):
    completed_transaction(genv, "agent-a", HOUR)
    assert build(HourlyBackup(hour=HOUR)).status.name == "SUCCESS"
    marker = StateRoot(genv.root).hour_marker(HOUR, "backup")
    mtime = os.path.getmtime(marker)
    objects = bucket_listing(genv)
    result = build(HourlyBackup(hour=HOUR))
    assert result.status.name == "SUCCESS"
    assert "Did not run any tasks" in result.summary_text
    assert os.path.getmtime(marker) == mtime and bucket_listing(genv) == objects
