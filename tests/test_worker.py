"""StageTransaction and LoadTransaction against the real MariaDB and MongoDB test server."""
import json
import os
from datetime import datetime

import luigi

from ganymede import datasets
from ganymede.stores import staging, txlog
from ganymede.tasks import LoadTransaction, StageTransaction
from conftest import completed_transaction, sample_rows

HOUR = datetime(2026, 11, 30, 5)


def run(*tasks):
    result = luigi.build(list(tasks), local_scheduler=True, detailed_summary=True)
    assert result.status.name == "SUCCESS", result.summary_text
    return result


def load_task(tx):
    return LoadTransaction(transaction_id=tx["transaction_id"], hour=tx["hour"], agent_id=tx["agent_id"])


def all_documents(db):
    return {name: sorted(db[name].find(), key=lambda d: d["_id"]) for name in datasets.CATALOG}


def test_stage_and_load_give_exact_documents(genv, mongo_up):
    tx = completed_transaction(genv, "agent-1", HOUR)
    run(load_task(tx))
    db = genv.mongo()
    docs = all_documents(db)
    assert {k: len(v) for k, v in docs.items()} == {"account_usage": 5, "api_requests": 5, "node_health": 5}
    node = docs["node_health"][0]
    assert node["_id"] == "agent-1|2026113005|node-agent-1-000|20261130T050000"
    assert node["disk_used_pct"] == 0.0 and node["hour"] == HOUR and node["geo"] == "geo-test"
    api = next(d for d in docs["api_requests"] if d["status"] == 503)
    assert api["is_error"] is True
    with genv.mysql() as conn:
        events = [e["event"] for e in txlog.events(conn, tx["transaction_id"])]
        assert events[-2:] == ["staged", "loaded"]
        assert sum(staging.count(conn, d, tx["transaction_id"]) for d in datasets.CATALOG.values()) == 0


def test_rerun_from_scratch_gives_identical_documents(genv, mongo_up):
    tx = completed_transaction(genv, "agent-1", HOUR)
    run(load_task(tx))
    db = genv.mongo()
    before = all_documents(db)
    task = load_task(tx)
    os.unlink(task.output().path)
    os.unlink(task.requires().output().path)
    run(load_task(tx))
    assert all_documents(db) == before


def test_bad_rows_are_rejected_with_reasons_while_good_rows_load(genv, mongo_up):
    rows = sample_rows(HOUR, n=3)
    rows["account_usage"].append(["acct-bad", -5, 1, 1, 1, 1])
    rows["node_health"].append(["node-x", "2026-11-30T07:00:00", 10, 5, 0.1, 0])
    tx = completed_transaction(genv, "agent-1", HOUR, rows=rows)
    run(load_task(tx))
    marker = json.load(open(load_task(tx).output().path))
    assert marker["counts"]["account_usage"] == {"loaded": 3, "rejected": 1}
    assert marker["counts"]["node_health"] == {"loaded": 3, "rejected": 1}
    rejects = [json.loads(line) for line in open(os.path.join(os.path.dirname(load_task(tx).output().path),
                                                               marker["rejects_file"]))]
    assert sorted(r["reason"] for r in rejects) == ["bytes_stored: negative",
                                                    "sampled_at: 2026-11-30T07:00:00 is outside the hour"]


def test_replacement_removes_what_it_does_not_overwrite(genv, mongo_up):
    first = completed_transaction(genv, "agent-1", HOUR, rows=sample_rows(HOUR, n=5))
    run(load_task(first))
    second = completed_transaction(genv, "agent-1", HOUR, rows=sample_rows(HOUR, n=2), replace=True)
    run(load_task(second))
    docs = all_documents(genv.mongo())
    assert {k: len(v) for k, v in docs.items()} == {"account_usage": 2, "api_requests": 2, "node_health": 2}
    assert {d["transaction_id"] for v in docs.values() for d in v} == {second["transaction_id"]}


def test_empty_transaction_loads_nothing_and_completes(genv, mongo_up):
    tx = completed_transaction(genv, "agent-1", HOUR, rows={})
    run(load_task(tx))
    marker = json.load(open(load_task(tx).output().path))
    assert all(c == {"loaded": 0, "rejected": 0} for c in marker["counts"].values())


def test_load_after_staging_was_cleared_restages(genv, mongo_up):
    """A load that crashed after clearing staging (marker not written) reloads everything on rerun."""
    tx = completed_transaction(genv, "agent-1", HOUR)
    run(StageTransaction(transaction_id=tx["transaction_id"], hour=HOUR, agent_id="agent-1"))
    with genv.mysql() as conn:
        for d in datasets.CATALOG.values():
            staging.clear(conn, d, tx["transaction_id"])
    run(load_task(tx))
    assert genv.mongo()["account_usage"].count_documents({}) == 5
