"""GlassbeamExtract: all agents or the deadline, waiting as missing data, late arrivals, deterministic files,
delivery to the outbox and over HTTPS. Against the real MariaDB, MongoDB test server and S3 test server;
the HTTPS receiver is a real TLS server on loopback with a throw-away certificate.
"""
import glob
import gzip
import hashlib
import http.server
import json
import os
import ssl
import subprocess
import sys
import threading
import uuid
from unittest import mock
from datetime import datetime, timedelta

import luigi
import pytest
from luigi.execution_summary import LuigiStatusCode
from luigi.task_register import Register

from ganymede import datasets
from ganymede.errors import ConfigError
from ganymede.paths import StateRoot
from ganymede.stores import txlog
from ganymede.tasks import GlassbeamExtract, HourlyBackup, LoadTransaction
from ganymede.delivery import https_target
from ganymede.tasks.extract import TransactionCompletion, current_round, plan_round, round0_cutoff
from conftest import build_test_archive, completed_transaction, sample_rows
from test_backup import RETCODES, archive_places, bucket_keys, clean_buckets, failures  # noqa: F401

HOUR = datetime(2026, 11, 30, 5)
BIN = os.path.dirname(sys.executable)
NEVER = 10 ** 7  # deadline_minutes that will not pass during the test


def build(*tasks):
    """One run, as cron starts it: a new process, so no task instance (and no plan it read) from a run before."""
    Register.clear_instance_cache()
    return luigi.build([type(t)(**t.param_kwargs) for t in tasks], local_scheduler=True, detailed_summary=True)


def register_agent(genv, agent_id, hour=HOUR):
    """An agent expected for `hour` (registered a year before) that has sent nothing."""
    with genv.mysql() as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO agents (agent_id, geo, token_hash, active, created_at) VALUES (%s, %s, %s, 1, %s)",
                    (agent_id, "geo-test", "0" * 64, hour.replace(year=hour.year - 1)))
        conn.commit()


def uploaded_not_completed(genv, agent_id, hour=HOUR):
    """The API's state between moving an archive into upload/ and marking its transaction completed."""
    from ganymede_agent.archive import sha256_file
    with genv.mysql() as conn:
        tx, _ = txlog.create_transaction(conn, agent_id, hour)
        path = StateRoot(genv.root).upload(hour, agent_id, tx["transaction_id"])
        manifest = build_test_archive(path, agent_id, "geo-test", hour, sample_rows(hour, agent_tag=agent_id))
        txlog.mark_uploaded(conn, tx["transaction_id"], os.path.getsize(path), sha256_file(path))
    return tx["transaction_id"], path, {k: v["rows"] for k, v in manifest["datasets"].items()}


def txlog_rows(genv, hour=HOUR):
    with genv.mysql() as conn:
        return txlog.hour_transactions(conn, hour)


def manifest(genv, round_=0, hour=HOUR):
    return json.load(open(StateRoot(genv.root).extract_manifest(hour, round_)))


def lines(genv, round_=0, hour=HOUR):
    with gzip.open(StateRoot(genv.root).extract(hour, round_)) as f:
        return [json.loads(line) for line in f]


def sha256_of(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# --- the round plan (pure) ---------------------------------------------------------

END = HOUR + timedelta(hours=1)
DEADLINE = END + timedelta(minutes=45)


def row(tx, agent, minutes_after_end, state="completed"):
    return {"transaction_id": tx, "agent_id": agent, "state": state,
            "completed_at": END + timedelta(minutes=minutes_after_end)}


@pytest.mark.parametrize("expected, rows, cutoff, needs_deadline", [
    pytest.param(["a", "b"], [row("t1", "a", 3), row("t2", "b", 9)], END + timedelta(minutes=9), False,
                 id="all in before the deadline: the last one's completion"),
    pytest.param(["a", "b"], [row("t1", "a", 3)], DEADLINE, True, id="one missing: the deadline"),
    pytest.param(["a", "b"], [row("t1", "a", 3), row("t2", "b", 50)], DEADLINE, True,
                 id="the last one after the deadline: the deadline"),
    pytest.param(["a"], [row("t1", "a", 20, "superseded"), row("t2", "a", 30)], END + timedelta(minutes=20), False,
                 id="a replaced transaction still counts as the agent's first completion"),
    pytest.param([], [row("t1", "x", 3)], DEADLINE, True, id="nobody expected: the deadline"),
])
def test_round0_cutoff(expected, rows, cutoff, needs_deadline):
    assert round0_cutoff(expected, rows, DEADLINE) == (cutoff, needs_deadline)


def test_round0_plan_requires_only_what_completed_by_its_cutoff():
    rows = [row("t1", "a", 3), row("t2", "b", 9), row("t3", "c", 10), row("t0", "b", 1, "superseded")]
    plan = plan_round(0, ["a", "b"], rows, [], {}, DEADLINE)
    assert [t["transaction_id"] for t in plan.transactions] == ["t1", "t2", "t3"]
    # b first completed with t0 (since replaced by t2): every agent was in at minute 3
    assert [t["transaction_id"] for t in plan.early] == ["t1"] and not plan.needs_deadline
    assert plan.superseded == ["t0"] and plan.waiting == []


def test_supplementary_plan_takes_what_no_round_holds_or_waits_for_completion():
    rounds = [{"transactions": ["t1"], "superseded": []}]
    rows = [row("t1", "a", 3), row("t2", "b", 90)]
    plan = plan_round(1, ["a", "b"], rows, rounds, {"t1": "a", "t2": "b"}, DEADLINE)
    assert [t["transaction_id"] for t in plan.transactions] == ["t2"] and plan.waiting == []
    rows = [row("t1", "a", 3)]
    plan = plan_round(1, ["a", "b"], rows, rounds, {"t1": "a", "t9": "b"}, DEADLINE)
    assert plan.transactions == [] and plan.waiting == [("b", "t9")]
    plan = plan_round(1, ["a"], rows, rounds, {"t1": "a"}, DEADLINE)
    assert plan.transactions == [] and plan.waiting == []


# --- all agents, or the deadline --------------------------------------------------

def test_all_agents_in_extract_without_waiting_for_the_deadline(genv, mongo_up):
    genv.write_config(extract={"deadline_minutes": NEVER})
    txs = [completed_transaction(genv, agent, HOUR) for agent in ("agent-a", "agent-b")]
    result = build(GlassbeamExtract(hour=HOUR))
    assert result.status == LuigiStatusCode.SUCCESS, result.summary_text
    m = manifest(genv)
    assert m["counts"] == {"account_usage": 10, "api_requests": 10, "node_health": 10}
    assert m["agents"] == {"agent-a": 15, "agent-b": 15}
    assert m["transactions"] == sorted(t["transaction_id"] for t in txs)
    assert m["missing_agents"] == [] and m["superseded"] == [] and m["after_deadline"] is False
    assert not os.path.exists(StateRoot(genv.root).hour_marker(HOUR, "timeout"))
    rows = lines(genv)
    assert [r["dataset"] for r in rows] == sorted(r["dataset"] for r in rows)
    for name in datasets.CATALOG:
        ids = [r["_id"] for r in rows if r["dataset"] == name]
        assert ids == sorted(ids)
    assert rows[0]["hour"] == "2026-11-30T05:00:00Z"
    extract = StateRoot(genv.root).extract(HOUR)
    assert m["sha256"] == sha256_of(extract) and m["bytes"] == os.path.getsize(extract)
    assert m["delivery"]["https"] is None
    assert sha256_of(m["delivery"]["outbox"]) == m["sha256"]
    assert m["delivery"]["outbox"] == os.path.join(genv.root, "outbox", "ganymede-2026113005.jsonl.gz")


def test_waiting_for_an_agent_is_missing_data_then_the_deadline_lets_it_go(genv, mongo_up):
    genv.write_config(extract={"deadline_minutes": NEVER}, retcode=RETCODES)
    completed_transaction(genv, "agent-a", HOUR)
    register_agent(genv, "agent-b")
    result = build(GlassbeamExtract(hour=HOUR))
    assert result.status == LuigiStatusCode.MISSING_EXT, result.summary_text
    assert result.scheduling_succeeded
    assert current_round(HOUR) == 0 and not os.path.exists(StateRoot(genv.root).extract(HOUR))
    a = txlog_rows(genv)[0]  # while the extract waits, what has arrived is already loaded
    assert LoadTransaction(transaction_id=a["transaction_id"], hour=HOUR, agent_id="agent-a").complete()
    for task in ("GlassbeamExtract", "HourlyBackup"):  # what cron sees: the missing-data exit code
        run = subprocess.run([f"{BIN}/luigi", "--module", "ganymede.tasks", task, "--hour", "2026-11-30T05",
                              "--local-scheduler"], env=genv.subprocess_env, capture_output=True, timeout=120)
        assert run.returncode == RETCODES["missing_data"], run.stderr.decode()[-3000:]

    genv.write_config(extract={"deadline_minutes": 45})
    result = build(GlassbeamExtract(hour=HOUR))
    assert result.status == LuigiStatusCode.SUCCESS, result.summary_text
    m = manifest(genv)
    assert m["missing_agents"] == ["agent-b"] and m["agents"] == {"agent-a": 15} and m["after_deadline"] is True
    timeout = json.load(open(StateRoot(genv.root).hour_marker(HOUR, "timeout")))
    assert timeout["missing_agents"] == ["agent-b"]


def test_revoked_and_later_agents_are_not_waited_for(genv, mongo_up):
    genv.write_config(extract={"deadline_minutes": NEVER})
    completed_transaction(genv, "agent-a", HOUR)
    register_agent(genv, "agent-new", hour=HOUR.replace(year=HOUR.year + 2))  # registered after the hour
    with genv.mysql() as conn, conn.cursor() as cur:
        register_agent(genv, "agent-old")
        cur.execute("UPDATE agents SET active = 0, revoked_at = %s WHERE agent_id = 'agent-old'",
                    (HOUR.replace(month=1),))
        conn.commit()
    assert build(GlassbeamExtract(hour=HOUR)).status == LuigiStatusCode.SUCCESS
    assert manifest(genv)["agents"] == {"agent-a": 15}


# --- late arrivals ---------------------------------------------------------------

def test_late_arrival_is_a_supplementary_round_backed_up_with_no_row_twice(genv, mongo_up, clean_buckets):
    a = completed_transaction(genv, "agent-a", HOUR)
    register_agent(genv, "agent-b")
    assert build(HourlyBackup(hour=HOUR)).status == LuigiStatusCode.SUCCESS
    assert manifest(genv)["missing_agents"] == ["agent-b"]
    assert HourlyBackup.bulk_complete([HOUR]) == [HOUR]

    b = completed_transaction(genv, "agent-b", HOUR)  # after the hour's extract and backup
    assert not HourlyBackup(hour=HOUR).complete() and HourlyBackup.bulk_complete([HOUR]) == []
    result = build(HourlyBackup(hour=HOUR))  # the same command again
    assert result.status == LuigiStatusCode.SUCCESS, result.summary_text
    first, second = manifest(genv, 0), manifest(genv, 1)
    assert first["transactions"] == [a["transaction_id"]] and second["transactions"] == [b["transaction_id"]]
    assert second["agents"] == {"agent-b": 15} and second["file"] == "ganymede-2026113005-s1.jsonl.gz"
    ids0, ids1 = [r["_id"] for r in lines(genv, 0)], [r["_id"] for r in lines(genv, 1)]
    assert len(ids0) == len(set(ids0)) == 15 and len(ids1) == len(set(ids1)) == 15
    assert not set(ids0) & set(ids1)
    root = StateRoot(genv.root)
    assert os.path.exists(root.archived(HOUR, "agent-b", b["transaction_id"]))
    assert not os.path.exists(root.upload(HOUR, "agent-b", b["transaction_id"]))
    keys = bucket_keys()
    assert {"extracts/ganymede-2026113005.jsonl.gz", "extracts/ganymede-2026113005-s1.jsonl.gz",
            "extracts/ganymede-2026113005-s1.manifest.json", "mysql/ganymede.sql.gz", "mysql/ganymede-s1.sql.gz",
            f"archives/agent-b/{b['transaction_id']}.tar.gz",
            f"archives/agent-a/{a['transaction_id']}.tar.gz"} <= set(keys)
    assert HourlyBackup.bulk_complete([HOUR]) == [HOUR]
    assert "Did not run any tasks" in build(HourlyBackup(hour=HOUR)).summary_text


def test_a_poisoned_transaction_is_isolated_the_hour_closes_and_its_resend_is_a_late_arrival(
        genv, mongo_up, clean_buckets):
    a = completed_transaction(genv, "agent-a", HOUR)
    b = completed_transaction(genv, "agent-b", HOUR)
    poisoned = sample_rows(HOUR, n=3, agent_tag="agent-c")
    poisoned["node_health"].append(["node-x", "2026-11-30T05:00:00", "10", "5", "1." + "0" * 51, "0"])  # 53 chars
    c = completed_transaction(genv, "agent-c", HOUR, rows=poisoned)  # as an API before this check let it in
    result = build(HourlyBackup(hour=HOUR))
    assert result.status == LuigiStatusCode.SUCCESS, result.summary_text  # on time, without agent-c
    m = manifest(genv)
    assert m["transactions"] == sorted([a["transaction_id"], b["transaction_id"]])
    assert m["missing_agents"] == ["agent-c"] and set(m["agents"]) == {"agent-a", "agent-b"}
    assert {r["agent_id"] for r in lines(genv)} == {"agent-a", "agent-b"}
    with genv.mysql() as conn:
        failed = txlog.get_transaction(conn, c["transaction_id"])
        with conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM stage_account_usage WHERE transaction_id = %s", (c["transaction_id"],))
            assert cur.fetchone()[0] == 0
    reason = "node_health.csv: record 4: load_1m: longer than 40 characters"
    assert failed["state"] == "failed" and reason in failed["error"]
    root = StateRoot(genv.root)
    held = root.quarantine(HOUR, "agent-c", c["transaction_id"])
    assert os.path.exists(held) and reason in json.load(open(held[: -len(".tar.gz")] + ".reason.json"))["reason"]
    assert f"archives/agent-c/{c['transaction_id']}.tar.gz" not in bucket_keys()
    assert HourlyBackup.bulk_complete([HOUR]) == [HOUR]

    resent = completed_transaction(genv, "agent-c", HOUR)  # the agent's corrected archive: a new transaction
    assert build(HourlyBackup(hour=HOUR)).status == LuigiStatusCode.SUCCESS
    assert manifest(genv, 1)["transactions"] == [resent["transaction_id"]]
    assert {r["agent_id"] for r in lines(genv, 1)} == {"agent-c"} and len(lines(genv, 1)) == 15
    assert f"archives/agent-c/{resent['transaction_id']}.tar.gz" in bucket_keys()


def test_replacement_after_the_extract_lists_what_it_supersedes(genv, mongo_up, clean_buckets):
    first = completed_transaction(genv, "agent-a", HOUR, rows=sample_rows(HOUR, n=5))
    assert build(HourlyBackup(hour=HOUR)).status == LuigiStatusCode.SUCCESS
    second = completed_transaction(genv, "agent-a", HOUR, rows=sample_rows(HOUR, n=2), replace=True)
    assert build(HourlyBackup(hour=HOUR)).status == LuigiStatusCode.SUCCESS
    m = manifest(genv, 1)
    assert m["transactions"] == [second["transaction_id"]] and m["superseded"] == [first["transaction_id"]]
    assert {r["transaction_id"] for r in lines(genv, 1)} == {second["transaction_id"]}
    assert current_round(HOUR) == 1


def test_archive_in_upload_before_its_completion_waits_instead_of_an_empty_round(genv, mongo_up, clean_buckets):
    """The API moves the archive into upload/, then marks the transaction completed: a run in between waits."""
    completed_transaction(genv, "agent-a", HOUR)
    register_agent(genv, "agent-b")
    assert build(HourlyBackup(hour=HOUR)).status == LuigiStatusCode.SUCCESS

    tx_id, path, counts = uploaded_not_completed(genv, "agent-b")
    assert current_round(HOUR) == 1
    result = build(HourlyBackup(hour=HOUR))
    assert result.status == LuigiStatusCode.MISSING_EXT, result.summary_text
    assert TransactionCompletion(hour=HOUR, agent_id="agent-b", transaction_id=tx_id) in \
        GlassbeamExtract(hour=HOUR, round=1).requires()
    root = StateRoot(genv.root)
    assert not os.path.exists(root.extract_manifest(HOUR, 1)) and not os.path.exists(root.extract(HOUR, 1))
    assert os.path.exists(path)

    with genv.mysql() as conn:
        txlog.mark_completed(conn, tx_id, path, counts)
    result = build(HourlyBackup(hour=HOUR))
    assert result.status == LuigiStatusCode.SUCCESS, result.summary_text
    assert manifest(genv, 1)["transactions"] == [tx_id]
    assert os.path.exists(root.archived(HOUR, "agent-b", tx_id)) and not os.path.exists(path)


def test_archive_not_completed_at_the_deadline_extract_goes_backup_waits(genv, mongo_up, clean_buckets):
    """Round 0 is written (the vendor gets the hour), but the backup waits for the pending transaction."""
    a = completed_transaction(genv, "agent-a", HOUR)
    register_agent(genv, "agent-b")
    tx_id, path, counts = uploaded_not_completed(genv, "agent-b")
    b = {"agent_id": "agent-b", "transaction_id": tx_id}
    result = build(HourlyBackup(hour=HOUR))
    assert result.status == LuigiStatusCode.MISSING_EXT, result.summary_text
    assert manifest(genv)["missing_agents"] == ["agent-b"]
    assert archive_places(genv, [a, b]) == {a["transaction_id"]: "upload", tx_id: "upload"}
    assert not os.path.exists(StateRoot(genv.root).hour_marker(HOUR, "backup"))
    with genv.mysql() as conn:
        txlog.mark_completed(conn, tx_id, path, counts)
    assert build(HourlyBackup(hour=HOUR)).status == LuigiStatusCode.SUCCESS
    assert manifest(genv, 1)["transactions"] == [tx_id] and HourlyBackup(hour=HOUR).complete()
    assert set(archive_places(genv, [a, b]).values()) == {"archives"}


@pytest.fixture
def on_success():
    """Run a function once when a task succeeds (Luigi's SUCCESS event): an arrival in the middle of a build."""
    hooks = []

    def hook(task):
        for when, then in list(hooks):
            if when(task):
                hooks.remove((when, then))
                then()

    luigi.Task.event_handler(luigi.Event.SUCCESS)(hook)
    yield lambda when, then: hooks.append((when, then))
    luigi.Task._event_callbacks[luigi.Task][luigi.Event.SUCCESS].discard(hook)


def test_transaction_completed_after_scheduling_is_loaded_by_the_extract_not_a_failure(genv, mongo_up, on_success):
    """Luigi checks requires() again before run(): a completion in between must not fail the extract."""
    a = completed_transaction(genv, "agent-a", HOUR)
    register_agent(genv, "agent-b")
    late = []
    on_success(lambda t: isinstance(t, LoadTransaction),
               lambda: late.append(completed_transaction(genv, "agent-b", HOUR)))
    result = build(GlassbeamExtract(hour=HOUR))
    assert result.status == LuigiStatusCode.SUCCESS, result.summary_text
    m = manifest(genv)
    assert m["transactions"] == sorted([a["transaction_id"], late[0]["transaction_id"]])
    assert m["agents"] == {"agent-a": 15, "agent-b": 15} and m["missing_agents"] == []


def test_late_arrival_during_the_backup_run_gets_its_round_in_the_same_run(genv, mongo_up, clean_buckets,
                                                                          on_success):
    completed_transaction(genv, "agent-a", HOUR)
    register_agent(genv, "agent-b")
    late = []
    on_success(lambda t: isinstance(t, GlassbeamExtract),
               lambda: late.append(completed_transaction(genv, "agent-b", HOUR)))
    result = build(HourlyBackup(hour=HOUR))
    assert result.status == LuigiStatusCode.SUCCESS, result.summary_text
    assert manifest(genv, 0)["missing_agents"] == ["agent-b"]
    assert manifest(genv, 1)["transactions"] == [late[0]["transaction_id"]]
    assert HourlyBackup(hour=HOUR).complete()
    assert "extracts/ganymede-2026113005-s1.jsonl.gz" in bucket_keys()


# --- same data, same bytes --------------------------------------------------------

GOLDEN_TXS = {"agent-a": "00000000-0000-4000-8000-00000000000a", "agent-b": "00000000-0000-4000-8000-00000000000b"}
GOLDEN_ROWS = {
    "agent-a": {"account_usage": [["acct-1", "1000", "4", "10", "20", "3"]],
                "api_requests": [["GET", "/v1/o", "200", "10", "4096", "1.5", "9.25"],
                                 ["GET", "/v1/o", "503", "2", "0", "3", "4"]],
                "node_health": [["node-1", "2026-11-30 05:01:00", "1000", "250", "0.5", "0"]]},
    "agent-b": {"account_usage": [["acct-2", "0", "0", "0", "0", "0"]]},
}
# What the vendor receives for that hour, written out by hand: datasets by name, documents by _id, keys sorted.
GOLDEN_LINES = [
    '{"_id":"agent-a|2026113005|acct-1","account_id":"acct-1","agent_id":"agent-a","avg_object_bytes":250.0,'
    '"bytes_in":10,"bytes_out":20,"bytes_stored":1000,"bytes_stored_growth":null,"dataset":"account_usage",'
    '"geo":"geo-test","hour":"2026-11-30T05:00:00Z","objects":4,"requests":3,'
    '"transaction_id":"00000000-0000-4000-8000-00000000000a"}',
    '{"_id":"agent-b|2026113005|acct-2","account_id":"acct-2","agent_id":"agent-b","avg_object_bytes":0.0,'
    '"bytes_in":0,"bytes_out":0,"bytes_stored":0,"bytes_stored_growth":null,"dataset":"account_usage",'
    '"geo":"geo-test","hour":"2026-11-30T05:00:00Z","objects":0,"requests":0,'
    '"transaction_id":"00000000-0000-4000-8000-00000000000b"}',
    '{"_id":"agent-a|2026113005|GET|/v1/o|200","agent_id":"agent-a","bytes":4096,"count":10,"dataset":"api_requests",'
    '"endpoint":"/v1/o","error_rate":0.166667,"geo":"geo-test","hour":"2026-11-30T05:00:00Z","is_error":false,'
    '"latency_p50_ms":1.5,"latency_p95_ms":9.25,"mean_bytes":409.6,"method":"GET","status":200,'
    '"transaction_id":"00000000-0000-4000-8000-00000000000a"}',
    '{"_id":"agent-a|2026113005|GET|/v1/o|503","agent_id":"agent-a","bytes":0,"count":2,"dataset":"api_requests",'
    '"endpoint":"/v1/o","error_rate":0.166667,"geo":"geo-test","hour":"2026-11-30T05:00:00Z","is_error":true,'
    '"latency_p50_ms":3.0,"latency_p95_ms":4.0,"mean_bytes":0.0,"method":"GET","status":503,'
    '"transaction_id":"00000000-0000-4000-8000-00000000000a"}',
    '{"_id":"agent-a|2026113005|node-1|20261130T050100","agent_id":"agent-a","dataset":"node_health",'
    '"disk_total_bytes":1000,"disk_used_bytes":250,"disk_used_pct":25.0,"errors":0,"geo":"geo-test",'
    '"hour":"2026-11-30T05:00:00Z","load_1m":0.5,"node_id":"node-1","sampled_at":"2026-11-30T05:01:00Z",'
    '"transaction_id":"00000000-0000-4000-8000-00000000000a"}',
]


def test_golden_extract_is_exactly_what_the_vendor_receives(genv, mongo_up):
    for agent_id, tx in GOLDEN_TXS.items():
        with mock.patch("uuid.uuid4", return_value=uuid.UUID(tx)):
            completed_transaction(genv, agent_id, HOUR, rows=GOLDEN_ROWS[agent_id])
    assert build(GlassbeamExtract(hour=HOUR)).status == LuigiStatusCode.SUCCESS
    root = StateRoot(genv.root)
    with open(root.extract(HOUR), "rb") as f:
        raw = f.read()
    assert raw[4:8] == b"\0\0\0\0"  # gzip header without a time, so the same hour gives the same bytes
    assert gzip.decompress(raw).decode() == "".join(line + "\n" for line in GOLDEN_LINES)
    m = manifest(genv)
    assert (m["counts"], m["agents"]) == ({"account_usage": 2, "api_requests": 2, "node_health": 1},
                                          {"agent-a": 4, "agent-b": 1})
    assert m["sha256"] == sha256_of(root.extract(HOUR)) == sha256_of(os.path.join(genv.root, "outbox", m["file"]))


def test_requires_reads_the_log_once_per_task_instance(genv, monkeypatch):
    """Luigi calls requires() several times per run (scheduling, before run(), summaries)."""
    from ganymede.stores import mysql
    completed_transaction(genv, "agent-a", HOUR)
    opened, connect = [], mysql.connect
    monkeypatch.setattr(mysql, "connect", lambda *a, **k: opened.append(a) or connect(*a, **k))
    task = GlassbeamExtract(hour=HOUR)
    assert [task.requires() for _ in range(3)][0] == task.requires() and len(opened) == 1


def test_db_upgrade_creates_the_indexes_the_pipeline_relies_on(genv, mongo_up):
    """Idempotently, after the MySQL migrations. The test server cannot explain() and lists only the first key
    of {hour: 1, _id: 1}: the full keys and the plan a real mongod gives are in docs/operations.md."""
    runs = [subprocess.run([os.path.join(BIN, "ganymede"), "db", "upgrade"], env=genv.subprocess_env,
                           capture_output=True, text=True, timeout=60) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr
    assert "account_usage: hour_1__id_1 hour_1_agent_id_1_transaction_id_1" in runs[1].stdout
    db = genv.mongo()
    for name in datasets.CATALOG:
        keys = [spec["key"] for spec in db[name].index_information().values()]
        extract_index = [("hour", 1), ("_id", 1)]
        if extract_index not in keys:  # the test server lists it by its first key only
            keys[keys.index([("hour", 1)])] = extract_index
        assert sorted(keys) == [[("_id", 1)], extract_index, [("hour", 1), ("agent_id", 1), ("transaction_id", 1)]]


def test_rebuild_from_scratch_is_byte_identical(genv, mongo_up):
    txs = [completed_transaction(genv, agent, HOUR) for agent in ("agent-b", "agent-a")]
    assert build(GlassbeamExtract(hour=HOUR)).status == LuigiStatusCode.SUCCESS
    root = StateRoot(genv.root)
    before = open(root.extract(HOUR), "rb").read()
    # Start over: MongoDB emptied, every marker and the file gone, loads in the other order.
    for name in datasets.CATALOG:
        genv.mongo()[name].drop()
    os.unlink(root.extract_manifest(HOUR))
    os.unlink(root.extract(HOUR))
    for t in reversed(txs):
        task = LoadTransaction(transaction_id=t["transaction_id"], hour=HOUR, agent_id=t["agent_id"])
        os.unlink(task.output().path)
        assert build(task).status == LuigiStatusCode.SUCCESS
    assert build(GlassbeamExtract(hour=HOUR)).status == LuigiStatusCode.SUCCESS
    assert open(root.extract(HOUR), "rb").read() == before
    assert manifest(genv)["sha256"] == hashlib.sha256(before).hexdigest()


# --- HTTPS delivery -----------------------------------------------------------------

class Receiver:
    """A TLS endpoint on loopback answering each POST with the next scripted status (then 200)."""

    def __init__(self, directory):
        self.cert, self.key = str(directory / "cert.pem"), str(directory / "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", self.key, "-out", self.cert], check=True, capture_output=True)
        self.script, self.requests = [], []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append({"path": self.path, "headers": dict(self.headers),
                                          "sha256": hashlib.sha256(body).hexdigest()})
                status = receiver.script.pop(0) if receiver.script else 200
                payload = json.dumps({"received": len(body)}).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}/v1/extracts?source=ganymede"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver(tmp_path):
    r = Receiver(tmp_path)
    yield r
    r.close()


@pytest.fixture
def token_file(genv):
    path = genv.home / "glassbeam.token"
    path.write_text("glassbeam-token-not-for-logs\n")
    os.chmod(path, 0o600)
    return str(path)


def test_https_delivery_retries_then_records_the_result(genv, mongo_up, receiver, token_file):
    genv.write_config(extract={"endpoint_url": receiver.url, "ca_file": receiver.cert, "token_file": token_file,
                               "attempts": 3, "retry_wait_seconds": 0})
    completed_transaction(genv, "agent-a", HOUR)
    receiver.script = [503]
    result = build(GlassbeamExtract(hour=HOUR))
    assert result.status == LuigiStatusCode.SUCCESS, result.summary_text
    m = manifest(genv)
    https = m["delivery"]["https"]
    assert https["status"] == 200 and https["attempts"] == 2 and https["response"] == f'{{"received": {m["bytes"]}}}'
    assert https["url"] == receiver.url.split("?")[0]
    assert [r["sha256"] for r in receiver.requests] == [m["sha256"]] * 2
    headers = receiver.requests[-1]["headers"]
    assert receiver.requests[-1]["path"] == "/v1/extracts?source=ganymede"
    assert headers["Authorization"] == "Bearer glassbeam-token-not-for-logs"
    assert headers["X-Ganymede-Sha256"] == m["sha256"] and headers["X-Ganymede-Hour"] == "2026-11-30T05"
    assert headers["Idempotency-Key"] == receiver.requests[0]["headers"]["Idempotency-Key"]
    assert headers["Content-Type"] == "application/gzip"
    assert "glassbeam-token" not in open(StateRoot(genv.root).extract_manifest(HOUR)).read()
    assert os.path.exists(m["delivery"]["outbox"])


def test_https_delivery_that_keeps_failing_fails_the_task_and_the_rerun_delivers(genv, mongo_up, receiver,
                                                                                 failures):
    genv.write_config(extract={"endpoint_url": receiver.url, "ca_file": receiver.cert,
                               "attempts": 2, "retry_wait_seconds": 0})
    completed_transaction(genv, "agent-a", HOUR)
    receiver.script = [500, 502]
    assert build(GlassbeamExtract(hour=HOUR)).status == LuigiStatusCode.FAILED
    assert [type(t).__name__ for t, _ in failures] == ["GlassbeamExtract"]
    assert "failed after 2 attempts: HTTP 502" in str(failures[0][1])
    assert not os.path.exists(StateRoot(genv.root).extract_manifest(HOUR))
    result = build(GlassbeamExtract(hour=HOUR))
    assert result.status == LuigiStatusCode.SUCCESS
    assert len({r["sha256"] for r in receiver.requests}) == 1  # the rebuilt file is the same file
    assert manifest(genv)["delivery"]["https"]["attempts"] == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 301])
def test_https_refusal_is_not_retried(genv, mongo_up, receiver, failures, status):
    genv.write_config(extract={"endpoint_url": receiver.url, "ca_file": receiver.cert,
                               "attempts": 4, "retry_wait_seconds": 0})
    completed_transaction(genv, "agent-a", HOUR)
    receiver.script = [status]
    assert build(GlassbeamExtract(hour=HOUR)).status == LuigiStatusCode.FAILED
    assert len(receiver.requests) == 1 and f"HTTP {status}" in str(failures[0][1])
    assert "not retried" in str(failures[0][1])


def test_https_endpoint_with_an_unknown_certificate_is_refused(genv, mongo_up, receiver, failures):
    genv.write_config(extract={"endpoint_url": receiver.url, "attempts": 3, "retry_wait_seconds": 0})
    completed_transaction(genv, "agent-a", HOUR)
    assert build(GlassbeamExtract(hour=HOUR)).status == LuigiStatusCode.FAILED
    assert "certificate was refused" in str(failures[0][1]) and "ca_file" in str(failures[0][1])
    assert receiver.requests == []


def test_token_file_others_can_read_is_refused(genv, mongo_up, receiver, token_file, failures):
    os.chmod(token_file, 0o640)
    genv.write_config(extract={"endpoint_url": receiver.url, "ca_file": receiver.cert, "token_file": token_file})
    completed_transaction(genv, "agent-a", HOUR)
    assert build(GlassbeamExtract(hour=HOUR)).status == LuigiStatusCode.FAILED
    message = str(failures[0][1])
    assert f"chmod 600 {token_file}" in message and "glassbeam-token" not in message
    assert receiver.requests == []


@pytest.mark.parametrize("url, message", [
    ("http://glassbeam.example.com/upload", "must be an https:// URL"),
    ("ftp://glassbeam.example.com/upload", "must be an https:// URL"),
    ("glassbeam.example.com/upload", "must be an https:// URL"),
    ("https://user:secret@glassbeam.example.com/upload", "must not carry credentials"),
])
def test_endpoint_url_must_be_https_without_credentials(url, message):
    with pytest.raises(ConfigError, match=message) as caught:
        https_target(url)
    assert "secret" not in str(caught.value)


def test_https_target_parts():
    assert https_target("https://gb.example.com:8443/in?k=v") == ("gb.example.com", 8443, "/in?k=v",
                                                                   "https://gb.example.com:8443/in")
    assert https_target("https://gb.example.com") == ("gb.example.com", 443, "/", "https://gb.example.com/")


# --- past luigid's wall: many transactions per task -------------------------------------------

@pytest.mark.parametrize("agents, count, expected", [
    pytest.param(["a", "b", "c", "d"], 2, [[("a", "t-a0"), ("b", "t-b1")], [("c", "t-c2"), ("d", "t-d3")]],
                 id="four agents in two"),
    pytest.param(["b", "a", "a", "c"], 2, [[("a", "t-a1"), ("a", "t-a2")], [("b", "t-b0"), ("c", "t-c3")]],
                 id="an agent's transactions stay together, oldest first"),
    pytest.param(["a", "b", "c"], 5, [[("a", "t-a0")], [("b", "t-b1")], [("c", "t-c2")]],
                 id="fewer transactions than tasks: one each"),
])
def test_batches_keep_whole_agents_in_order(agents, count, expected):
    from ganymede.tasks.worker import batches
    rows = [row(f"t-{a}{i}", a, i) for i, a in enumerate(agents)]
    assert batches(rows, count) == expected


def test_an_hour_past_load_tasks_loads_in_batches_to_the_same_extract(genv, mongo_up):
    """Five transactions, load_tasks = 2: the extract requires two LoadBatch tasks, not five loads; each transaction
    still has its markers and its log events, and the extract is byte for byte the one-task-per-transaction one."""
    from ganymede.tasks import LoadBatch
    genv.write_config(extract={"deadline_minutes": NEVER, "load_tasks": 2})
    txs = [completed_transaction(genv, agent, HOUR) for agent in ("agent-c", "agent-e", "agent-b", "agent-a",
                                                                   "agent-d")]
    Register.clear_instance_cache()
    required = GlassbeamExtract(hour=HOUR).requires()
    assert [type(t).__name__ for t in required] == ["LoadBatch", "LoadBatch"]
    assert [[agent for agent, _ in t.transactions] for t in required] == [["agent-a", "agent-b", "agent-c"],
                                                                          ["agent-d", "agent-e"]]
    assert required[0].members.startswith("agent-a..agent-c x3 #")
    assert build(GlassbeamExtract(hour=HOUR)).status == LuigiStatusCode.SUCCESS
    for t in txs:
        assert LoadTransaction(transaction_id=t["transaction_id"], hour=HOUR, agent_id=t["agent_id"]).complete()
    with genv.mysql() as conn:
        events = {t["transaction_id"]: [e["event"] for e in txlog.events(conn, t["transaction_id"])] for t in txs}
    assert all({"staged", "loaded"} <= set(e) for e in events.values()), events
    batched = open(StateRoot(genv.root).extract(HOUR), "rb").read()
    assert all(isinstance(t, LoadBatch) and t.complete() for t in required)

    # the same hour again with one task per transaction
    root = StateRoot(genv.root)
    for name in datasets.CATALOG:
        genv.mongo()[name].drop()
    os.unlink(root.extract_manifest(HOUR))
    for t in txs:
        for stage in ("staged", "loaded"):
            os.unlink(root.transaction_marker(HOUR, t["agent_id"], t["transaction_id"], stage))
    genv.write_config(extract={"load_tasks": 200})
    assert [type(t).__name__ for t in GlassbeamExtract(hour=HOUR).requires()] == ["LoadTransaction"] * 5
    assert build(GlassbeamExtract(hour=HOUR)).status == LuigiStatusCode.SUCCESS
    assert open(root.extract(HOUR), "rb").read() == batched


def test_a_failing_transaction_in_a_batch_does_not_stop_the_others(genv, mongo_up):
    """One transaction's archive vanished: the batch loads the others, fails naming it, and leaves its failure
    marker; once the archive is back the rerun loads only that one and clears the marker."""
    from ganymede.tasks import LoadBatch
    genv.write_config(extract={"deadline_minutes": NEVER, "load_tasks": 1})
    txs = [completed_transaction(genv, agent, HOUR) for agent in ("agent-a", "agent-b", "agent-c")]
    root = StateRoot(genv.root)
    gone = root.upload(HOUR, "agent-b", txs[1]["transaction_id"])
    os.rename(gone, gone + ".away")
    result = build(GlassbeamExtract(hour=HOUR))
    assert result.status == LuigiStatusCode.FAILED, result.summary_text
    loaded = [LoadTransaction(transaction_id=t["transaction_id"], hour=HOUR, agent_id=t["agent_id"]).complete()
              for t in txs]
    assert loaded == [True, False, True]
    failures = {json.load(open(p))["task"]: json.load(open(p))["error"] for p in glob.glob(root.failure_markers_glob(HOUR))}
    batch = next(v for k, v in failures.items() if k.startswith("LoadBatch"))
    assert batch.startswith("GanymedeError: 1 of 3 transactions failed: " + txs[1]["transaction_id"])
    assert any(k.startswith("StageTransaction") for k in failures)
    os.rename(gone + ".away", gone)
    assert build(GlassbeamExtract(hour=HOUR)).status == LuigiStatusCode.SUCCESS
    assert manifest(genv)["transactions"] == sorted(t["transaction_id"] for t in txs)
    assert not glob.glob(root.failure_markers_glob(HOUR))
    assert isinstance(GlassbeamExtract(hour=HOUR).requires()[0], LoadBatch)
