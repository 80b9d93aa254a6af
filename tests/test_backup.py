"""HourlyBackup: dump, extract, archives into the hour's bucket, verified, then archives moved.

Failures (S3 down, wrong secret, a foreign bucket, a .s3curl others can read,
a crash half-way through the uploads) must leave every archive in upload/ and
no marker, and the same command must then complete.
"""
import gzip
import json
import os
import subprocess
import sys
from datetime import datetime

import boto3
import botocore.config
import luigi
import pytest

from ganymede import config, hours
from ganymede.paths import StateRoot
from ganymede.stores import s3, txlog
from ganymede.stores.s3 import bucket_name, sha256_file
from ganymede.tasks import HourlyBackup
from ganymede.tasks.backup import backup_hour
from conftest import S3_ENDPOINT, completed_transaction, drop_buckets, free_port
from test_s3_store import auth_server  # noqa: F401  (fixture: a second moto server with authentication on)

HOUR = datetime(2026, 11, 30, 5)
BIN = os.path.dirname(sys.executable)
RETCODES = {"already_running": 10, "missing_data": 20, "not_run": 25, "task_failed": 30,
            "scheduling_error": 35, "unhandled_exception": 40}


def build(task):
    return luigi.build([task], local_scheduler=True, detailed_summary=True)


def s3_client(endpoint=S3_ENDPOINT, key_id="testing", secret="testing-secret", account=None):
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key_id, aws_secret_access_key=secret,
                          region_name="us-east-1",
                          config=botocore.config.Config(s3={"addressing_style": "path"},
                                                        request_checksum_calculation="when_required",
                                                        response_checksum_validation="when_required"))
    if account:  # moto keeps one world per account id; this header picks another account
        client.meta.events.register(
            "before-sign.s3.*", lambda request, **_: request.headers.__setitem__("x-moto-account-id", account))
    return client


@pytest.fixture
def clean_buckets(genv, s3_up):
    """Drops every bucket this test made on the shared S3 test server."""
    yield
    drop_buckets(genv.bucket_prefix, s3_client())


@pytest.fixture
def failures():
    """(task, exception) of every task that fails in this test, through Luigi's own FAILURE event."""
    seen = []

    def record(task, exception):
        seen.append((task, exception))

    luigi.Task.event_handler(luigi.Event.FAILURE)(record)
    yield seen
    luigi.Task._event_callbacks[luigi.Task][luigi.Event.FAILURE].discard(record)


def bucket_keys(client=None, hour=HOUR):
    name = bucket_name(config.s3().bucket_template, hour)
    pages = (client or s3_client()).get_paginator("list_objects_v2").paginate(Bucket=name)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def archive_places(genv, txs, hour=HOUR):
    """For each transaction: 'upload', 'archives', or 'both' / 'none' (never acceptable)."""
    root = StateRoot(genv.root)
    places = {}
    for t in txs:
        up = os.path.exists(root.upload(hour, t["agent_id"], t["transaction_id"]))
        done = os.path.exists(root.archived(hour, t["agent_id"], t["transaction_id"]))
        places[t["transaction_id"]] = {(True, False): "upload", (False, True): "archives"}.get((up, done),
                                                                                            "both" if up else "none")
    return places


def assert_nothing_moved(genv, txs):
    assert set(archive_places(genv, txs).values()) == {"upload"}
    assert not os.path.exists(StateRoot(genv.root).hour_marker(HOUR, "backup"))


def failure_message(failures):
    assert [type(t).__name__ for t, _ in failures] == ["HourlyBackup"], failures
    return str(failures[0][1])


# --- the happy path and idempotence ------------------------------------------

def test_hourly_backup_uploads_verifies_and_moves(genv, mongo_up, clean_buckets):
    txs = [completed_transaction(genv, agent, HOUR) for agent in ("agent-a", "agent-b")]
    result = build(HourlyBackup(hour=HOUR))
    assert result.status.name == "SUCCESS", result.summary_text
    root = StateRoot(genv.root)
    keys = bucket_keys()
    assert set(keys) == {"MANIFEST.json", "mysql/ganymede.sql.gz", "extracts/ganymede-2026113005.jsonl.gz",
                         "extracts/ganymede-2026113005.manifest.json"} | {
        f"archives/{t['agent_id']}/{t['transaction_id']}.tar.gz" for t in txs}
    assert set(archive_places(genv, txs).values()) == {"archives"}
    with gzip.open(root.extract(HOUR)) as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == 30 and {l["agent_id"] for l in lines} == {"agent-a", "agent-b"}
    with gzip.open(root.backup_dump(HOUR)) as f:
        dump = f.read()
    assert b"CREATE TABLE `transactions`" in dump and b"INSERT INTO `transactions`" in dump
    with genv.mysql() as conn:
        assert "backed_up" in [e["event"] for e in txlog.events(conn, txs[0]["transaction_id"])]
    marker = json.load(open(root.hour_marker(HOUR, "backup")))
    assert {o["action"] for o in marker["objects"]} == {"uploaded"}
    manifest = json.load(open(os.path.join(os.path.dirname(root.hour_marker(HOUR, "backup")), "MANIFEST.json")))
    local = {o["key"]: o for o in marker["objects"]}
    assert {o["key"] for o in manifest["objects"]} == set(keys) - {"MANIFEST.json"}
    for obj in manifest["objects"]:
        assert keys[obj["key"]] == obj["size"] == local[obj["key"]]["size"]


def test_second_run_does_nothing(genv, mongo_up, clean_buckets):
    completed_transaction(genv, "agent-a", HOUR)
    assert build(HourlyBackup(hour=HOUR)).status.name == "SUCCESS"
    marker = StateRoot(genv.root).hour_marker(HOUR, "backup")
    mtime = os.path.getmtime(marker)
    objects = bucket_keys()
    result = build(HourlyBackup(hour=HOUR))
    assert result.status.name == "SUCCESS"
    assert "Did not run any tasks" in result.summary_text
    assert os.path.getmtime(marker) == mtime and bucket_keys() == objects


def test_a_fresh_hour_costs_one_request_per_object_plus_five(genv, clean_buckets, tmp_path, monkeypatch):
    """Bucket, one listing (what is there, MANIFEST.json included), the objects, one listing that verifies
    them, MANIFEST.json and its verifying listing; a second run uploads nothing."""
    plan = {f"archives/agent-a/{i}.tar.gz": str(tmp_path / f"a{i}") for i in range(3)}
    for i, path in enumerate(plan.values()):
        with open(path, "wb") as f:
            f.write(os.urandom(1000 + i))
    calls = []
    real_connect = s3.connect

    def connect(cfg):
        store = real_connect(cfg)
        store.client.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
        return store

    monkeypatch.setattr(s3, "connect", connect)
    bucket = bucket_name(config.s3().bucket_template, HOUR)
    manifest = str(tmp_path / "MANIFEST.json")
    listing = backup_hour(config.s3(), bucket, plan, manifest)
    assert calls == (["CreateBucket", "ListObjectsV2"] + ["PutObject"] * 3
                     + ["ListObjectsV2", "PutObject", "ListObjectsV2"])
    assert [o["action"] for o in listing] == ["uploaded"] * 4
    assert set(bucket_keys()) == set(plan) | {"MANIFEST.json"}
    assert json.load(open(manifest))["objects"] == [{k: o[k] for k in ("key", "size", "sha256")}
                                                    for o in listing[:-1]]

    calls.clear()
    again = backup_hour(config.s3(), bucket, plan, manifest)
    assert calls == ["CreateBucket", "ListObjectsV2"]
    assert [o["action"] for o in again] == ["skipped"] * 4


def test_rerun_without_marker_uploads_nothing(genv, mongo_up, clean_buckets):
    """Every object already verified in the bucket is skipped: zero uploads."""
    txs = [completed_transaction(genv, agent, HOUR) for agent in ("agent-a", "agent-b")]
    assert build(HourlyBackup(hour=HOUR)).status.name == "SUCCESS"
    marker = StateRoot(genv.root).hour_marker(HOUR, "backup")
    os.unlink(marker)
    assert build(HourlyBackup(hour=HOUR)).status.name == "SUCCESS"
    listing = json.load(open(marker))
    assert {o["action"] for o in listing["objects"]} == {"skipped"}
    assert listing["archives"] == sorted(StateRoot(genv.root).archived(HOUR, t["agent_id"], t["transaction_id"])
                                         for t in txs)
    assert set(archive_places(genv, txs).values()) == {"archives"}


def test_odd_bucket_template_gives_a_valid_name_and_an_existing_bucket_of_ours_is_used(genv, mongo_up,
                                                                                     clean_buckets):
    genv.write_config(s3={"bucket_template": genv.bucket_prefix.upper() + "Stats_Backups.{yyyymmddhh}"})
    name = bucket_name(config.s3().bucket_template, HOUR)
    assert name == f"{genv.bucket_prefix}stats-backups-2026113005"
    s3_client().create_bucket(Bucket=name)  # made beforehand, by us
    completed_transaction(genv, "agent-a", HOUR)
    assert build(HourlyBackup(hour=HOUR)).status.name == "SUCCESS"
    assert json.load(open(StateRoot(genv.root).hour_marker(HOUR, "backup")))["bucket"] == name
    assert len(bucket_keys()) == 5


# --- a crash half-way through the uploads --------------------------------------

# Failure injection, test only: this wrapper runs the real `luigi` command line
# with S3Store._upload monkeypatched so that the process dies (os._exit: no
# cleanup, no exception handling, as with kill -9) when it is about to send
# object number K+1, i.e. after K objects were sent and none yet verified.
CRASH_WRAPPER = """\
import os, sys
import luigi.cmdline
from ganymede.stores import s3

K = int(sys.argv[1])
real_upload = s3.S3Store._upload
done = []

def upload_then_crash(self, bucket, key, local):
    if len(done) == K:
        os._exit(137)
    done.append(key)
    return real_upload(self, bucket, key, local)

s3.S3Store._upload = upload_then_crash
luigi.cmdline.luigi_run(sys.argv[2:])
"""


def test_crash_after_half_the_uploads_resumes_without_reuploading(genv, mongo_up, clean_buckets, tmp_path):
    txs = [completed_transaction(genv, agent, HOUR) for agent in ("agent-a", "agent-b", "agent-c")]
    wrapper = tmp_path / "crash_after_k_uploads.py"
    wrapper.write_text(CRASH_WRAPPER)
    genv.write_config(s3={"max_concurrency": 1})  # one upload at a time, so "after K objects" is exact
    k = 3
    crashed = subprocess.run([sys.executable, str(wrapper), str(k), "--module", "ganymede.tasks", "HourlyBackup",
                              "--hour", hours.format_hour(HOUR), "--local-scheduler"],
                             env=genv.subprocess_env, capture_output=True, timeout=240)
    assert crashed.returncode == 137, crashed.stderr.decode()[-3000:]
    assert len(bucket_keys()) == k
    assert_nothing_moved(genv, txs)

    result = build(HourlyBackup(hour=HOUR))
    assert result.status.name == "SUCCESS", result.summary_text
    root = StateRoot(genv.root)
    listing = json.load(open(root.hour_marker(HOUR, "backup")))["objects"]
    assert [o["action"] for o in listing] == ["skipped"] * k + ["uploaded"] * (len(listing) - k)
    assert len(listing) == 3 + 3 + 1  # 3 archives, dump + extract + its manifest, MANIFEST.json
    keys = bucket_keys()
    assert set(keys) == {o["key"] for o in listing}
    assert set(archive_places(genv, txs).values()) == {"archives"}
    s3 = s3_client()
    for obj in listing:  # what is in the bucket is what the marker says, byte for byte
        head = s3.head_object(Bucket=bucket_name(config.s3().bucket_template, HOUR), Key=obj["key"])
        assert head["ContentLength"] == obj["size"] and head["Metadata"]["sha256"] == obj["sha256"]
    for t in txs:
        assert sha256_file(root.archived(HOUR, t["agent_id"], t["transaction_id"])) == t["sha256"]


# --- S3 failures: clear message, nothing moved, the rerun completes ------------

def test_s3_down_fails_clearly_moves_nothing_and_rerun_completes(genv, mongo_up, clean_buckets, failures):
    txs = [completed_transaction(genv, "agent-a", HOUR)]
    closed = f"http://127.0.0.1:{free_port()}"
    genv.write_config(s3={"endpoint_url": closed})
    result = build(HourlyBackup(hour=HOUR))
    assert result.status.name == "FAILED"
    assert f"S3 endpoint {closed} unreachable while creating bucket" in failure_message(failures)
    assert_nothing_moved(genv, txs)

    genv.write_config(s3={"endpoint_url": S3_ENDPOINT})
    assert build(HourlyBackup(hour=HOUR)).status.name == "SUCCESS"
    assert set(archive_places(genv, txs).values()) == {"archives"}


def test_s3_down_exits_with_task_failed_from_the_command_line(genv, mongo_up, clean_buckets):
    completed_transaction(genv, "agent-a", HOUR)
    genv.write_config(s3={"endpoint_url": f"http://127.0.0.1:{free_port()}"}, retcode=RETCODES)
    run = subprocess.run([f"{BIN}/ganymede-hourly-backup", "--hour", hours.format_hour(HOUR), "--local-scheduler"],
                         env=genv.subprocess_env, capture_output=True, timeout=240)
    assert run.returncode == RETCODES["task_failed"], run.stderr.decode()[-3000:]


def test_wrong_secret_fails_clearly_then_fixing_only_s3curl_completes(genv, mongo_up, auth_server, failures):
    url, creds = auth_server
    txs = [completed_transaction(genv, "agent-a", HOUR)]
    wrong = "wrong-secret-wrong-secret-wrong-secret00"

    def write_s3curl(secret):
        with open(genv.s3curl_path, "w") as f:
            f.write(f"%awsSecretAccessKeys = (\n  ganymede => {{ id => '{creds.id}', key => '{secret}' }},\n);\n")

    write_s3curl(wrong)
    genv.write_config(s3={"endpoint_url": url})
    assert build(HourlyBackup(hour=HOUR)).status.name == "FAILED"
    message = failure_message(failures)
    assert "rejected the credentials of profile 'ganymede' (SignatureDoesNotMatch)" in message
    assert genv.s3curl_path in message and wrong not in message and creds.key not in message
    assert_nothing_moved(genv, txs)

    write_s3curl(creds.key)  # switching accounts = editing .s3curl only
    try:
        assert build(HourlyBackup(hour=HOUR)).status.name == "SUCCESS"
        assert set(archive_places(genv, txs).values()) == {"archives"}
        assert len(bucket_keys(s3_client(url, creds.id, creds.key))) == 5
    finally:
        drop_buckets(genv.bucket_prefix, s3_client(url, creds.id, creds.key))


def test_bucket_owned_by_someone_else_fails_clearly(genv, mongo_up, clean_buckets, failures):
    txs = [completed_transaction(genv, "agent-a", HOUR)]
    foreign = s3_client(account="111111111111")
    name = bucket_name(config.s3().bucket_template, HOUR)
    foreign.create_bucket(Bucket=name)
    try:
        assert build(HourlyBackup(hour=HOUR)).status.name == "FAILED"
        assert f"bucket {name} already exists" in failure_message(failures)
        assert "belongs to another account" in failure_message(failures)
        assert_nothing_moved(genv, txs)
        assert foreign.list_objects_v2(Bucket=name).get("KeyCount", 0) == 0
    finally:
        drop_buckets(genv.bucket_prefix, foreign)


def test_s3curl_readable_by_others_is_refused(genv, mongo_up, clean_buckets, failures):
    txs = [completed_transaction(genv, "agent-a", HOUR)]
    os.chmod(genv.s3curl_path, 0o644)
    assert build(HourlyBackup(hour=HOUR)).status.name == "FAILED"
    assert f"run chmod 600 {genv.s3curl_path}" in failure_message(failures)
    assert_nothing_moved(genv, txs)
    os.chmod(genv.s3curl_path, 0o600)
    assert build(HourlyBackup(hour=HOUR)).status.name == "SUCCESS"


def test_missing_profile_is_refused(genv, mongo_up, clean_buckets, failures):
    txs = [completed_transaction(genv, "agent-a", HOUR)]
    genv.write_config(s3={"profile": "backups"})
    assert build(HourlyBackup(hour=HOUR)).status.name == "FAILED"
    assert "profile 'backups' not found" in failure_message(failures)
    assert_nothing_moved(genv, txs)


# --- the command ----------------------------------------------------------------

def test_ganymede_hourly_backup_command(genv, mongo_up, clean_buckets):
    txs = [completed_transaction(genv, "agent-a", HOUR)]
    genv.write_config(retcode=RETCODES)
    run = subprocess.run([f"{BIN}/ganymede-hourly-backup", "--hour", hours.format_hour(HOUR), "--local-scheduler"],
                         env=genv.subprocess_env, capture_output=True, timeout=240)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    assert set(archive_places(genv, txs).values()) == {"archives"}

    genv.write_config(extract={"deadline_minutes": 0})  # agent-a sent nothing for the last hour: do not wait
    before = hours.last_complete_hour()
    run = subprocess.run([f"{BIN}/ganymede-hourly-backup", "--local-scheduler"],
                         env=genv.subprocess_env, capture_output=True, timeout=240)
    after = hours.last_complete_hour()
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    root = StateRoot(genv.root)
    done = [h for h in {before, after} if os.path.exists(root.hour_marker(h, "backup"))]
    assert len(done) == 1
    assert json.load(open(root.extract_manifest(done[0])))["missing_agents"] == ["agent-a"]


@pytest.mark.parametrize("args, message", [
    (["--hour", "2026-11-30 05"], "not a UTC hour"),
    (["--hour", "2026-11-30T05:30"], "not on the hour"),
    (["--hour", "2999-01-01T00"], "has not ended yet"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--bogus"], "unrecognized arguments"),
])
def test_ganymede_hourly_backup_bad_arguments(genv, args, message):
    run = subprocess.run([f"{BIN}/ganymede-hourly-backup", *args, "--local-scheduler"],
                         env=genv.subprocess_env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert message in run.stderr and len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr
