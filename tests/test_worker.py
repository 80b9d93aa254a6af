"""StageTransaction and LoadTransaction against the real MariaDB and MongoDB test server."""
import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import uuid
from datetime import datetime, timedelta, timezone

import luigi
import pytest
from ganymede_agent.archive import ArchiveError
from hypothesis import HealthCheck, event, example, given, settings, strategies as st

from ganymede import archives, datasets
from ganymede.datasets import RangeError, RowError
from ganymede.errors import DataError
from ganymede.paths import StateRoot
from ganymede.stores import staging, txlog
from ganymede.tasks import LoadTransaction, StageTransaction
from ganymede.tasks.worker import parse_batch, stage_archive, summarized, unique_batches
from conftest import completed_transaction, sample_rows

HOUR = datetime(2026, 11, 30, 5)
BIN = os.path.dirname(sys.executable)


def run(*tasks):
    result = luigi.build(list(tasks), local_scheduler=True, detailed_summary=True)
    assert result.status.name == "SUCCESS", result.summary_text
    return result


def load_task(tx):
    return LoadTransaction(transaction_id=tx["transaction_id"], hour=tx["hour"], agent_id=tx["agent_id"])


def stage_task(tx):
    return StageTransaction(transaction_id=tx["transaction_id"], hour=tx["hour"], agent_id=tx["agent_id"])


def all_documents(db):
    return {name: sorted(db[name].find(), key=lambda d: d["_id"]) for name in datasets.CATALOG}


def digest(db):
    """One hash of every document of every collection: equal end states, equal digests."""
    return hashlib.sha256(json.dumps(all_documents(db), sort_keys=True, default=str).encode()).hexdigest()


def marker(tx):
    return json.load(open(load_task(tx).output().path))


def rejects(tx):
    path = load_task(tx).rejects_path()
    return [json.loads(line) for line in open(path)]


def staged_rows(genv, tx):
    with genv.mysql() as conn:
        return sum(staging.counts(conn, datasets.CATALOG.values(), tx["transaction_id"]).values())


def forget(tx, *stages):
    """Remove the markers of the given stages ('staged', 'loaded') so Luigi runs them again."""
    for stage in stages:
        os.unlink((stage_task(tx) if stage == "staged" else load_task(tx)).marker(stage).path)


# --- stage and load ------------------------------------------------------------------

def test_stage_and_load_give_exact_documents(genv, mongo_up):
    tx = completed_transaction(genv, "agent-1", HOUR)
    run(load_task(tx))
    docs = all_documents(genv.mongo())
    assert {k: len(v) for k, v in docs.items()} == {"account_usage": 5, "api_requests": 5, "node_health": 5}
    common = {"agent_id": "agent-1", "geo": "geo-test", "hour": HOUR, "transaction_id": tx["transaction_id"]}
    assert docs["account_usage"][1] == dict(
        common, _id="agent-1|2026113005|acct-agent-1-0001", account_id="acct-agent-1-0001", bytes_stored=20000,
        objects=20, bytes_in=100, bytes_out=50, requests=3, avg_object_bytes=1000.0, bytes_stored_growth=None)
    assert docs["api_requests"][0] == dict(
        common, _id="agent-1|2026113005|GET|/v1/objects/0|503", method="GET", endpoint="/v1/objects/0", status=503,
        count=100, bytes=0, latency_p50_ms=1.5, latency_p95_ms=9.25, is_error=True, mean_bytes=0.0, error_rate=1.0)
    assert docs["node_health"][3] == dict(
        common, _id="agent-1|2026113005|node-agent-1-003|20261130T050300", node_id="node-agent-1-003",
        sampled_at=datetime(2026, 11, 30, 5, 3), disk_total_bytes=10 ** 12, disk_used_bytes=3 * 10 ** 11,
        load_1m=0.8, errors=0, disk_used_pct=30.0)
    assert marker(tx)["counts"] == {name: {"loaded": 5, "rejected": 0} for name in datasets.CATALOG}
    assert marker(tx)["retired"] == {} and rejects(tx) == []
    assert json.load(open(stage_task(tx).output().path))["staged"] == {name: 5 for name in datasets.CATALOG}
    with genv.mysql() as conn:
        events = txlog.events(conn, tx["transaction_id"])
    assert [e["event"] for e in events][-2:] == ["staged", "loaded"]
    assert events[-2]["detail"] == {"rows": {name: 5 for name in datasets.CATALOG}}
    assert staged_rows(genv, tx) == 0  # staged rows go once loaded: the archive stays the source


def test_a_stage_or_load_handed_out_again_after_another_host_finished_it_does_nothing(genv, mongo_up):
    """luigid may hand a just-finished task to a second host that checked it a moment before (multi-host)."""
    tx = completed_transaction(genv, "agent-1", HOUR)
    run(load_task(tx))
    before = {t: os.stat(t.output().path).st_mtime_ns for t in (stage_task(tx), load_task(tx))}
    for task in before:
        task.run()  # as the second host's worker would, straight after the first host's
    assert staged_rows(genv, tx) == 0  # a restage now would leave rows that no load clears
    assert {t: os.stat(t.output().path).st_mtime_ns for t in before} == before


def test_staging_holds_the_rows_as_sent_with_their_record_numbers(genv):
    tx = completed_transaction(genv, "agent-1", HOUR)
    run(stage_task(tx))
    with genv.mysql() as conn:
        batches = list(staging.iter_batches(conn, datasets.CATALOG["account_usage"], tx["transaction_id"], 2))
    assert [len(b) for b in batches] == [2, 2, 1]
    sent = sample_rows(HOUR, agent_tag="agent-1")["account_usage"]
    assert [row for b in batches for row in b] == [[str(i), *map(str, r)] for i, r in enumerate(sent, 1)]
    with genv.mysql() as conn:
        staging.clear(conn, [datasets.CATALOG["account_usage"]], tx["transaction_id"], chunk=2)
        left = staging.counts(conn, datasets.CATALOG.values(), tx["transaction_id"])
    assert left == {"account_usage": 0, "api_requests": 5, "node_health": 5}
    assert not os.listdir(os.path.join(genv.root, "tmp"))  # the re-rendered CSV is gone


# Values a GEO database can hold that a careless path alters: the word NULL, \N, quotes, commas, newlines,
# backslashes, tabs, spaces, non-ASCII. Those the catalog's grammar allows reach MongoDB exactly; the others
# are refused with the parser's reason (a reject), never changed into something else.
EXACT = ["NULL", "null", "N", "a b", "x=1", "a/b:c@d+e", "0", "_"]
REFUSED = {"\\N": "not a plain identifier", "": "account_id: empty", "a,b": "not a plain identifier",
           'say "hi"': "not a plain identifier", "two\nlines": "not a plain identifier",
           "back\\slash": "not a plain identifier", "tab\there": "not a plain identifier",
           "naïve": "not a plain identifier", " lead": "not a plain identifier", '"': "not a plain identifier",
           "NULL\r": "not a plain identifier"}


def test_exact_values_reach_mongodb_and_the_others_are_refused_unchanged(genv, mongo_up):
    rows = sample_rows(HOUR, n=0)
    values = EXACT + [v for v in REFUSED if "\r" not in v]  # a CR is refused by the reader: its own test below
    rows["account_usage"] = [[v, str(i), "1", "0", "0", "0"] for i, v in enumerate(values)]
    tx = completed_transaction(genv, "agent-1", HOUR, rows=rows)
    run(load_task(tx))
    stored = {d["bytes_stored"]: d["account_id"] for d in genv.mongo()["account_usage"].find()}
    assert stored == {i: v for i, v in enumerate(EXACT)}
    refused = {r["row"][0]: r["reason"] for r in rejects(tx)}
    assert {v: REFUSED[v] in why for v, why in refused.items()} == {v: True for v in values[len(EXACT):]}
    assert all(r["row"][1] == str(values.index(r["row"][0])) for r in rejects(tx))  # the row as sent, too


def test_loads_of_one_agent_and_hour_share_a_scheduler_resource():
    def task(tx, agent, hour):
        return LoadTransaction(transaction_id=tx, hour=hour, agent_id=agent)
    assert task("t1", "agent-1", HOUR).resources == task("t2", "agent-1", HOUR).resources == {
        "ganymede-load:agent-1:2026113005": 1}
    assert task("t1", "agent-1", HOUR).resources != task("t3", "agent-2", HOUR).resources
    assert task("t1", "agent-1", HOUR).resources != task("t4", "agent-1", HOUR + timedelta(hours=1)).resources


def test_error_rate_is_per_method_and_endpoint_over_the_transaction(genv, mongo_up):
    rows = sample_rows(HOUR, n=0)
    rows["api_requests"] = [
        ["GET", "/v1/a", "200", "90", "0", "1", "2"], ["PUT", "/v1/a", "500", "7", "0", "1", "2"],
        ["GET", "/v1/b", "200", "1", "0", "1", "2"], ["GET", "/v1/a", "503", "6", "0", "1", "2"],
        ["GET", "/v1/a", "404", "4", "0", "1", "2"], ["get", "/v1/a", "502", "3", "0", "1", "2"],
        ["GET", "/v1/a ", "500", "1", "0", "1", "2"],  # trailing space: another endpoint, not /v1/a
    ]
    tx = completed_transaction(genv, "agent-1", HOUR, rows=rows)
    run(load_task(tx))
    rates = {(d["method"], d["endpoint"], d["status"]): d["error_rate"] for d in genv.mongo()["api_requests"].find()}
    assert rates == {("GET", "/v1/a", 200): 0.06, ("GET", "/v1/a", 503): 0.06, ("GET", "/v1/a", 404): 0.06,
                     ("PUT", "/v1/a", 500): 1.0, ("GET", "/v1/b", 200): 0.0, ("get", "/v1/a", 502): 1.0,
                     ("GET", "/v1/a ", 500): 1.0}


def test_error_rate_counts_only_rows_that_load(genv, mongo_up):
    rows = sample_rows(HOUR, n=0)
    rows["api_requests"] = [["GET", "/v1/a", "200", "75", "0", "1", "2"], ["GET", "/v1/a", "500", "25", "0", "1", "2"],
                            ["GET", "/v1/a", "503", "900", "0", "5", "2"]]  # p95 < p50: rejected
    tx = completed_transaction(genv, "agent-1", HOUR, rows=rows)
    run(load_task(tx))
    assert {d["error_rate"] for d in genv.mongo()["api_requests"].find()} == {0.25}
    assert marker(tx)["counts"]["api_requests"] == {"loaded": 2, "rejected": 1}


def accounts_rows(*pairs):
    rows = sample_rows(HOUR, n=0)
    rows["account_usage"] = [[a, str(b), "1", "0", "0", "0"] for a, b in pairs]
    return rows


def growth_of(genv, hour):
    return {d["account_id"]: d["bytes_stored_growth"] for d in genv.mongo()["account_usage"].find({"hour": hour})}


def test_bytes_stored_growth_against_the_previous_hour_when_it_is_loaded(genv, mongo_up):
    before = HOUR - timedelta(hours=1)
    previous = completed_transaction(genv, "agent-1", before, rows=accounts_rows(("acct-a", 100), ("acct-b", 500)))
    other_agent = completed_transaction(genv, "agent-2", before, rows=accounts_rows(("acct-c", 1)))
    not_loaded = completed_transaction(genv, "agent-3", before, rows=accounts_rows(("acct-d", 1)))
    run(load_task(previous), load_task(other_agent), stage_task(not_loaded))
    tx = completed_transaction(genv, "agent-1", HOUR, rows=accounts_rows(("acct-a", 150), ("acct-b", 400),
                                                                         ("acct-c", 9)))
    tx3 = completed_transaction(genv, "agent-3", HOUR, rows=accounts_rows(("acct-d", 7)))
    run(load_task(tx), load_task(tx3))
    growth = {(d["agent_id"], d["account_id"]): d["bytes_stored_growth"]
              for d in genv.mongo()["account_usage"].find({"hour": HOUR})}
    assert growth == {("agent-1", "acct-a"): 50, ("agent-1", "acct-b"): -100,
                      ("agent-1", "acct-c"): None,   # acct-c's previous hour is agent-2's
                      ("agent-3", "acct-d"): None}   # staged, but that hour is not loaded


def test_growth_spans_write_batches_one_lookup_each(genv, mongo_up):
    """Previous-hour values are read per write batch (one `_id $in` each): every batch gets its own."""
    genv.write_config(mongodb={"batch_size": 2})
    before = HOUR - timedelta(hours=1)
    run(load_task(completed_transaction(genv, "agent-1", before,
                                        rows=accounts_rows(*[(f"acct-{i}", 10 * i) for i in range(5)]))))
    run(load_task(completed_transaction(genv, "agent-1", HOUR,
                                        rows=accounts_rows(*[(f"acct-{i}", 11 * i) for i in range(1, 6)]))))
    assert growth_of(genv, HOUR) == {"acct-1": 1, "acct-2": 2, "acct-3": 3, "acct-4": 4, "acct-5": None}


def test_growth_after_a_replacement_is_against_what_mongodb_holds(genv, mongo_up):
    before = HOUR - timedelta(hours=1)
    first = completed_transaction(genv, "agent-1", before, rows=accounts_rows(("acct-a", 100), ("acct-b", 500)))
    run(load_task(first))
    replacement = completed_transaction(genv, "agent-1", before, rows=accounts_rows(("acct-a", 120)),
                                        replace=True)
    run(load_task(replacement))
    tx = completed_transaction(genv, "agent-1", HOUR, rows=accounts_rows(("acct-a", 150), ("acct-b", 600)))
    run(load_task(tx))
    assert growth_of(genv, HOUR) == {"acct-a": 30, "acct-b": None}


# --- idempotence ------------------------------------------------------------------------

def test_rerun_from_scratch_gives_identical_documents(genv, mongo_up):
    tx = completed_transaction(genv, "agent-1", HOUR)
    run(load_task(tx))
    db = genv.mongo()
    before = digest(db)
    forget(tx, "loaded", "staged")
    run(load_task(tx))
    assert digest(db) == before
    assert sum(db[name].count_documents({}) for name in datasets.CATALOG) == 15


def test_rerun_with_outputs_in_place_does_nothing(genv, mongo_up):
    tx = completed_transaction(genv, "agent-1", HOUR)
    run(load_task(tx))
    with genv.mysql() as conn:
        events = len(txlog.events(conn, tx["transaction_id"]))
    result = run(load_task(tx))
    assert "ran successfully" not in result.summary_text and "1 complete ones" in result.summary_text
    with genv.mysql() as conn:
        assert len(txlog.events(conn, tx["transaction_id"])) == events


def test_load_after_staging_was_cleared_restages(genv, mongo_up):
    """A load that crashed after clearing staging (marker not written) reloads everything on rerun."""
    tx = completed_transaction(genv, "agent-1", HOUR)
    run(stage_task(tx))
    with genv.mysql() as conn:
        for d in datasets.CATALOG.values():
            staging.clear(conn, [d], tx["transaction_id"])
    run(load_task(tx))
    assert genv.mongo()["account_usage"].count_documents({}) == 5


def test_a_key_repeated_in_a_transaction_ends_as_its_last_row(genv, mongo_up):
    rows = sample_rows(HOUR, n=0)
    rows["account_usage"] = [["acct-a", "1", "1", "0", "0", "0"], ["acct-b", "5", "1", "0", "0", "0"],
                             ["acct-a", "2", "1", "0", "0", "0"], ["acct-a", "3", "1", "0", "0", "0"]]
    rows["api_requests"] = [["GET", "/v1/a", "200", "1", "0", "1", "2"], ["GET", "/v1/a", "200", "3", "0", "1", "2"],
                            ["GET", "/v1/a", "500", "1", "0", "1", "2"]]
    genv.write_config(mongodb={"batch_size": 2})  # the repeats fall in different write batches
    tx = completed_transaction(genv, "agent-1", HOUR, rows=rows)
    run(load_task(tx))
    db = genv.mongo()
    assert {d["account_id"]: d["bytes_stored"] for d in db["account_usage"].find()} == {"acct-a": 3, "acct-b": 5}
    assert {(d["status"], d["count"], d["error_rate"]) for d in db["api_requests"].find()} == {(200, 3, 0.25),
                                                                                            (500, 1, 0.25)}


# --- killed and rerun ---------------------------------------------------------------------

# The only fault injection in these tests: a wrapper that runs Luigi's own command line after
# replacing one store function with one that SIGKILLs the process once it has done its work for
# the first time. Nothing in ganymede knows about it.
KILLER = textwrap.dedent("""
    import os, signal, sys
    from ganymede.stores import {module}
    real = {module}.{function}
    def then_die(*args, **kwargs):
        result = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
        return result
    {module}.{function} = then_die
    from luigi.cmdline import luigi_run
    luigi_run(sys.argv[1:])
""")


def run_killed(genv, tmp_path, tx, task, module, function):
    script = tmp_path / f"kill-{uuid.uuid4().hex[:6]}.py"
    script.write_text(KILLER.format(module=module, function=function))
    proc = subprocess.run([sys.executable, str(script), "--module", "ganymede.tasks", task,
                           "--transaction-id", tx["transaction_id"], "--hour", "2026-11-30T05",
                           "--agent-id", tx["agent_id"], "--local-scheduler"],
                          env=genv.subprocess_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]


def loaded_world(genv):
    """A previous hour loaded (so growth is in play) and a transaction of several write batches."""
    genv.write_config(mongodb={"batch_size": 3})
    before = HOUR - timedelta(hours=1)
    previous = completed_transaction(genv, "agent-1", before, rows=sample_rows(before, n=6, agent_tag="agent-1"))
    run(load_task(previous))
    assert marker(previous)["counts"]["node_health"] == {"loaded": 6, "rejected": 0}
    rows = sample_rows(HOUR, n=10, agent_tag="agent-1")
    rows["account_usage"].append(["=bad", "1", "1", "1", "1", "1"])
    return completed_transaction(genv, "agent-1", HOUR, rows=rows)


def reset(genv, tx):
    """Back to before the transaction's stage and load (its previous hour stays loaded)."""
    for name in datasets.CATALOG:
        genv.mongo()[name].delete_many({"hour": HOUR})
    forget(tx, "loaded", "staged")
    os.unlink(load_task(tx).rejects_path())


@pytest.mark.slow
def test_a_load_killed_mid_way_and_rerun_ends_as_an_undisturbed_load(genv, mongo_up, tmp_path):
    tx = loaded_world(genv)
    run(load_task(tx))
    undisturbed, undisturbed_marker = digest(genv.mongo()), marker(tx)
    assert undisturbed_marker["counts"]["account_usage"] == {"loaded": 10, "rejected": 1}
    reset(genv, tx)

    run_killed(genv, tmp_path, tx, "LoadTransaction", "mongo", "replace_many")
    db = genv.mongo()
    assert 0 < db["account_usage"].count_documents({"hour": HOUR}) < 10  # killed after its first batch
    assert not os.path.exists(load_task(tx).output().path)
    assert not os.path.exists(load_task(tx).rejects_path())  # no half-written rejects file either
    run(load_task(tx))
    assert digest(db) == undisturbed
    assert marker(tx) == undisturbed_marker
    assert [r["reason"] for r in rejects(tx)] == ["account_id: not a plain identifier of at most 128 characters"]
    assert staged_rows(genv, tx) == 0


@pytest.mark.slow
def test_staging_killed_mid_way_and_rerun_ends_as_an_undisturbed_load(genv, mongo_up, tmp_path):
    tx = loaded_world(genv)
    run(load_task(tx))
    undisturbed = digest(genv.mongo())
    reset(genv, tx)

    run_killed(genv, tmp_path, tx, "StageTransaction", "staging", "load_csv")
    assert 0 < staged_rows(genv, tx) < 31  # the first dataset is staged and committed, the others not
    assert not os.path.exists(stage_task(tx).output().path)
    run(load_task(tx))
    assert digest(genv.mongo()) == undisturbed
    assert staged_rows(genv, tx) == 0
    with genv.mysql() as conn:
        assert [e["event"] for e in txlog.events(conn, tx["transaction_id"])].count("staged") == 1  # logged once


# --- rejects ----------------------------------------------------------------------------

def test_bad_rows_are_rejected_with_reasons_while_good_rows_load(genv, mongo_up):
    rows = sample_rows(HOUR, n=3)
    rows["account_usage"].insert(1, ["acct-bad", "-5", "1", "1", "1", "1"])
    rows["account_usage"].append(["+cmd|' /C calc'!A0", "1", "1", "1", "1", "1"])
    rows["api_requests"].append(["GET", "/v1/x", "200", "1.5", "1", "1", "2"])
    rows["node_health"].append(["node-x", "2026-11-30T07:00:00", "10", "5", "0.1", "0"])
    tx = completed_transaction(genv, "agent-1", HOUR, rows=rows)
    run(load_task(tx))
    assert marker(tx)["counts"] == {"account_usage": {"loaded": 3, "rejected": 2},
                                    "api_requests": {"loaded": 3, "rejected": 1},
                                    "node_health": {"loaded": 3, "rejected": 1}}
    assert sorted(rejects(tx), key=lambda r: (r["dataset"], r["record"])) == [
        {"dataset": "account_usage", "record": 2, "reason": "bytes_stored: negative", "range": True,
         "row": ["acct-bad", "-5", "1", "1", "1", "1"]},
        {"dataset": "account_usage", "record": 5,
         "reason": "account_id: not a plain identifier of at most 128 characters",
         "row": ["+cmd|' /C calc'!A0", "1", "1", "1", "1", "1"]},
        {"dataset": "api_requests", "record": 4, "reason": "count: not an integer: '1.5'",
         "row": ["GET", "/v1/x", "200", "1.5", "1", "1", "2"]},
        {"dataset": "node_health", "record": 4, "reason": "sampled_at: 2026-11-30T07:00:00 is outside the hour",
         "range": True, "row": ["node-x", "2026-11-30T07:00:00", "10", "5", "0.1", "0"]},
    ]
    db = genv.mongo()
    assert {name: db[name].count_documents({}) for name in datasets.CATALOG} == {name: 3 for name in datasets.CATALOG}


# --- replacement, empty ----------------------------------------------------------------------

def test_replacement_removes_what_it_does_not_overwrite(genv, mongo_up):
    first = completed_transaction(genv, "agent-1", HOUR, rows=sample_rows(HOUR, n=5))
    other = completed_transaction(genv, "agent-2", HOUR, rows=sample_rows(HOUR, n=4, agent_tag="b"))
    run(load_task(first), load_task(other))
    second = completed_transaction(genv, "agent-1", HOUR, rows=sample_rows(HOUR, n=2), replace=True)
    run(load_task(second))
    db = genv.mongo()
    mine = {name: list(db[name].find({"agent_id": "agent-1"})) for name in datasets.CATALOG}
    assert {k: len(v) for k, v in mine.items()} == {"account_usage": 2, "api_requests": 2, "node_health": 2}
    assert {d["transaction_id"] for v in mine.values() for d in v} == {second["transaction_id"]}
    assert marker(second)["retired"] == {name: 3 for name in datasets.CATALOG}
    assert {name: db[name].count_documents({"agent_id": "agent-2"}) for name in datasets.CATALOG} == {
        name: 4 for name in datasets.CATALOG}  # another agent's hour is untouched


def test_a_superseded_transaction_loads_nothing(genv, mongo_up):
    first = completed_transaction(genv, "agent-1", HOUR, rows=sample_rows(HOUR, n=5))
    second = completed_transaction(genv, "agent-1", HOUR, rows=sample_rows(HOUR, n=2), replace=True)
    run(load_task(second))
    before = digest(genv.mongo())
    run(load_task(first))  # e.g. `ganymede-worker-etl --transactionid=<first>` by hand
    assert digest(genv.mongo()) == before
    assert marker(first)["skipped"] == "superseded"
    assert staged_rows(genv, first) == 0


def test_empty_transaction_loads_nothing_and_completes(genv, mongo_up):
    tx = completed_transaction(genv, "agent-1", HOUR, rows={})
    run(load_task(tx))
    assert marker(tx)["counts"] == {name: {"loaded": 0, "rejected": 0} for name in datasets.CATALOG}
    assert json.load(open(stage_task(tx).output().path))["staged"] == {name: 0 for name in datasets.CATALOG}
    assert rejects(tx) == []
    assert sum(genv.mongo()[name].count_documents({}) for name in datasets.CATALOG) == 0


# --- isolation: bad data is set aside, a store that is down fails the task ------------------

def poisoned_rows(bad_row):
    rows = sample_rows(HOUR, n=3)
    rows["api_requests"].insert(1, bad_row)
    return rows


@pytest.mark.parametrize("bad_row, reason", [
    (["GET", "/v1/x", "200", "1", "1", "1." + "0" * 51, "9"],  # a 53-character float
     "api_requests.csv: record 2: latency_p50_ms: longer than 40 characters"),
    (["GET", "/v1/x", "200", "1", "1", "1", "2", "extra"], "api_requests.csv: record 2: 8 fields, expected 7"),
    (["GET", "/v1/x\x1f", "200", "1", "1", "1", "2"], "api_requests.csv: record 2: endpoint: not a plain identifier"),
])
def test_a_row_staging_cannot_hold_isolates_the_transaction(genv, mongo_up, bad_row, reason):
    tx = completed_transaction(genv, "agent-1", HOUR, rows=poisoned_rows(bad_row))
    upload = stage_task(tx).requires().path()
    run(load_task(tx))  # both tasks complete: the hour goes on
    held = StateRoot(genv.root).quarantine(HOUR, "agent-1", tx["transaction_id"])
    assert marker(tx) == {"transaction_id": tx["transaction_id"], "agent_id": "agent-1", "quarantine": held,
                          "isolated": marker(tx)["isolated"]}
    assert reason in marker(tx)["isolated"]
    assert json.load(open(stage_task(tx).output().path))["isolated"] == marker(tx)["isolated"]
    assert not os.path.exists(upload) and os.path.exists(held)
    assert reason in archives.read_reason(held)["reason"]
    with genv.mysql() as conn:
        logged = txlog.get_transaction(conn, tx["transaction_id"])
        events = txlog.events(conn, tx["transaction_id"])
    assert logged["state"] == "failed" and reason in logged["error"]
    assert [e["event"] for e in events] == ["created", "uploaded", "completed", "failed"]
    assert events[-1]["detail"]["quarantine"] == held
    assert staged_rows(genv, tx) == 0  # the datasets staged before the bad one are gone too
    assert sum(genv.mongo()[name].count_documents({}) for name in datasets.CATALOG) == 0


def test_an_archive_that_no_longer_reads_back_is_isolated(genv, mongo_up):
    tx = completed_transaction(genv, "agent-1", HOUR)
    path = stage_task(tx).requires().path()
    with open(path, "r+b") as f:  # damaged on the server's disk after the API verified it
        f.truncate(os.path.getsize(path) // 2)
    run(load_task(tx))
    assert "the archive does not read back" in marker(tx)["isolated"]
    with genv.mysql() as conn:
        assert txlog.get_transaction(conn, tx["transaction_id"])["state"] == "failed"


def test_isolation_interrupted_before_the_log_is_finished_by_the_rerun(genv, mongo_up):
    """The archive is in quarantine but the log still says completed: the rerun isolates it again, once."""
    tx = completed_transaction(genv, "agent-1", HOUR, rows=poisoned_rows(["GET", "/v1/x", "200", "1", "1", "1"]))
    with genv.mysql() as conn:
        try:
            stage_archive(conn, stage_task(tx).requires().path(), tx["transaction_id"], HOUR,
                          stage_task(tx).work_path())
        except DataError as exc:
            reason = str(exc)
    held = StateRoot(genv.root).quarantine(HOUR, "agent-1", tx["transaction_id"])
    archives.quarantine(stage_task(tx).requires().path(), held, reason)  # then the process died
    run(load_task(tx))
    with genv.mysql() as conn:
        assert txlog.get_transaction(conn, tx["transaction_id"])["state"] == "failed"
        assert [e["event"] for e in txlog.events(conn, tx["transaction_id"])].count("failed") == 1
    assert marker(tx)["isolated"] == reason and os.path.exists(held)


def test_mysql_unreachable_fails_the_task_and_the_rerun_stages(genv, mongo_up):
    tx = completed_transaction(genv, "agent-1", HOUR)
    port = genv.settings["mysql"]["port"]
    with socket.socket() as closed:  # a port nothing listens on: MySQL "down"
        closed.bind(("127.0.0.1", 0))
        genv.write_config(mysql={"port": closed.getsockname()[1]})
        result = luigi.build([load_task(tx)], local_scheduler=True, detailed_summary=True)
    assert result.status.name == "FAILED" and not os.path.exists(stage_task(tx).output().path)
    genv.write_config(mysql={"port": port})
    run(load_task(tx))
    assert marker(tx)["counts"]["account_usage"] == {"loaded": 5, "rejected": 0}
    assert os.path.exists(stage_task(tx).requires().output().path)  # still in upload/, not quarantined


# --- the manual commands -----------------------------------------------------------------

def command(genv, *argv):
    return subprocess.run([os.path.join(BIN, argv[0]), *argv[1:]], env=genv.subprocess_env,
                          capture_output=True, text=True, timeout=120)


def test_manual_worker_commands_stage_then_load(genv, mongo_up):
    tx = completed_transaction(genv, "agent-1", HOUR)
    staged = command(genv, "ganymede-worker", tx["transaction_id"], "--local-scheduler")
    assert staged.returncode == 0, staged.stderr[-2000:]
    assert os.path.exists(stage_task(tx).output().path) and not os.path.exists(load_task(tx).output().path)
    assert staged_rows(genv, tx) == 15
    loaded = command(genv, "ganymede-worker-etl", f"--transactionid={tx['transaction_id']}", "--local-scheduler")
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert marker(tx)["counts"] == {name: {"loaded": 5, "rejected": 0} for name in datasets.CATALOG}
    again = command(genv, "ganymede-worker-etl", f"--transactionid={tx['transaction_id']}", "--local-scheduler")
    assert again.returncode == 0 and marker(tx)["counts"]["account_usage"]["loaded"] == 5


@pytest.mark.parametrize("argv", [["ganymede-worker", "{tx}"], ["ganymede-worker-etl", "--transactionid={tx}"]])
def test_manual_commands_refuse_an_unknown_transaction(genv, argv):
    unknown = str(uuid.uuid4())
    result = command(genv, *[a.format(tx=unknown) for a in argv], "--local-scheduler")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"ganymede: no completed transaction {unknown!r}"]


# --- the plain functions of the load ----------------------------------------------------------

def test_parse_batch_numbers_rejects_by_their_csv_record():
    dataset = datasets.CATALOG["account_usage"]
    batch = [["1", "a", "1", "1", "1", "1", "1"], ["2", "b", "-1", "1", "1", "1", "1"],
             ["7", "c", "x", "1", "1", "1", "1"]]
    rows, bad = parse_batch(dataset, batch, HOUR)
    assert [r["account_id"] for r in rows] == ["a"]
    assert [(r["record"], r["reason"], r["row"][0]) for r in bad] == [
        (2, "bytes_stored: negative", "b"), (7, "bytes_stored: not an integer: 'x'", "c")]


def test_unique_batches_hold_each_id_once_and_keep_the_last():
    docs = [{"_id": i % 3, "n": i} for i in range(7)]
    assert list(unique_batches(iter(docs), 2)) == [[{"_id": 0, "n": 0}, {"_id": 1, "n": 1}],
                                                   [{"_id": 2, "n": 2}, {"_id": 0, "n": 3}],
                                                   [{"_id": 1, "n": 4}, {"_id": 2, "n": 5}],
                                                   [{"_id": 0, "n": 6}]]
    assert list(unique_batches(iter([]), 2)) == []


def test_summarized_holds_one_group_at_a_time():
    dataset = datasets.CATALOG["api_requests"]

    def doc(method, endpoint, status, count):
        return {"_id": f"{method}|{endpoint}|{status}", "method": method, "endpoint": endpoint, "status": status,
                "count": count}

    seen = []

    def stream():
        for d in [doc("GET", "/a", 200, 3), doc("GET", "/a", 500, 1), doc("GET", "/a", 500, 3),
                  doc("PUT", "/a", 200, 1)]:
            seen.append(d["_id"])
            yield d

    out = summarized(dataset, stream())
    first = next(out)
    assert seen == ["GET|/a|200", "GET|/a|500", "GET|/a|500", "PUT|/a|200"]  # the group ended at PUT
    assert first["error_rate"] == 0.5  # 500 counted once, as its last row (3): 3 / (3 + 3)
    assert [(d["_id"], d["error_rate"]) for d in out] == [("GET|/a|500", 0.5), ("PUT|/a|200", 0.0)]


# --- one grammar: what the parser accepts is staged and loaded exactly, what it refuses is refused --------

BASE = ["node-p", "2026-11-30T05:01:00", "1000", "250", "0.5", "0"]  # node_health holds all four kinds
NODE = datasets.CATALOG["node_health"]
ZONES = st.sampled_from([None, timezone.utc, timezone(timedelta(hours=2)), timezone(-timedelta(hours=3, minutes=30))])


def with_value(row, index, value):
    row = list(row)
    row[index] = value
    return row


def _text(max_size):
    return st.text(st.characters(codec="utf-8", exclude_characters="\r"), max_size=max_size)  # CR: its own test


def _datetimes():
    moments = st.builds(lambda d, zone: d.replace(tzinfo=zone), st.datetimes(HOUR - timedelta(hours=3),
                                                                             HOUR + timedelta(hours=3)), ZONES)
    return st.builds(lambda d, sep, spec: d.isoformat(sep=sep, timespec=spec), moments, st.sampled_from("T "),
                     st.sampled_from(["auto", "seconds", "milliseconds", "microseconds", "minutes", "hours"]))


def _value(kind, max_len):
    near_limit = st.integers(max_len - 2, max_len + 2)
    by_kind = {
        "str": [st.from_regex(r"[A-Za-z0-9_./:][A-Za-z0-9_.:/@+= -]*", fullmatch=True),
                near_limit.map(lambda n: "n" * n), st.sampled_from(["NULL", "\\N", "null", '"', "a,b", "a\nb"])],
        "int": [st.integers(-2 ** 64, 2 ** 64).map(str), st.from_regex(r"-?0*[0-9]{1,21}", fullmatch=True),
                near_limit.map(lambda n: "7" * n)],
        "float": [st.floats().map(repr), st.floats(width=32).map(str),
                  st.from_regex(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]{1,3})?", fullmatch=True),
                  near_limit.map(lambda n: "1." + "0" * (n - 2))],
        "datetime": [_datetimes(), near_limit.map(lambda n: "2026-11-30T05:01:00.123456+00:00".ljust(n, "0")[:n])],
    }
    return st.one_of(*by_kind[kind], _text(max_len + 2))


@st.composite
def one_value_row(draw):
    column = draw(st.sampled_from(NODE.columns))
    row = list(BASE)
    row[NODE.column_names.index(column.name)] = draw(_value(column.kind, column.max_len))
    return row


def _isolated(genv, tx):
    with genv.mysql() as conn:
        return txlog.get_transaction(conn, tx["transaction_id"])


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(row=one_value_row())
@example(row=with_value(BASE, 4, "1." + "0" * 51))  # the 53-character float staging could not hold
@example(row=with_value(BASE, 1, "2026-11-30T05:01:00.123456+00:00"))  # 32 characters: the limit
@example(row=with_value(BASE, 1, "2026-11-30T05:01:00.1234567+00:00"))  # 33 characters
@example(row=with_value(BASE, 0, "NULL"))  # LOAD DATA would read an unquoted NULL as SQL NULL
@example(row=with_value(BASE, 0, "\\N"))
@example(row=with_value(BASE, 2, "9223372036854775807"))
@example(row=with_value(BASE, 2, "-9223372036854775809"))
def test_the_parser_decides_what_is_staged_and_loaded(genv, mongo_up, row):
    agent_id = f"p-{uuid.uuid4().hex[:12]}"
    rows = sample_rows(HOUR, n=0)
    rows["node_health"] = [row]
    tx = completed_transaction(genv, agent_id, HOUR, rows=rows)
    with open(stage_task(tx).requires().path(), "rb") as f:
        try:
            archives.validate(f, agent_id, "geo-test", HOUR)
            validated = None
        except ArchiveError as exc:
            validated = str(exc)
    try:
        parsed, refused, out_of_range = NODE.parse_row(row, HOUR), None, {}
    except RowError as exc:
        parsed, refused, out_of_range = None, str(exc), {"range": True} if isinstance(exc, RangeError) else {}
    run(load_task(tx))
    docs = list(genv.mongo()["node_health"].find({"agent_id": agent_id}))
    event("accepted" if parsed is not None else "rejected" if NODE.fits_staging(row) else "isolated")
    if parsed is not None:  # accepted: staged, loaded, and MongoDB holds exactly the parsed values
        assert validated is None
        assert len(docs) == 1 and {k: docs[0][k] for k in parsed} == parsed
        assert all(isinstance(docs[0][k], type(v)) for k, v in parsed.items())  # an int64 comes back as Int64
        assert rejects(tx) == []
    elif NODE.fits_staging(row):  # refused by the parser, stageable: a reject with the parser's reason
        assert validated is not None and refused in validated
        assert docs == [] and rejects(tx) == [{"dataset": "node_health", "record": 1, "reason": refused, "row": row,
                                                **out_of_range}]
    else:  # refused, and staging could not hold it: the transaction is isolated with the parser's reason
        assert validated is not None and refused in validated
        assert docs == [] and refused in marker(tx)["isolated"]
        assert _isolated(genv, tx)["state"] == "failed" and refused in _isolated(genv, tx)["error"]
    assert staged_rows(genv, tx) == 0


def test_a_carriage_return_is_refused_by_the_reader_at_validation_and_at_staging(genv, mongo_up):
    rows = sample_rows(HOUR, n=0)
    rows["node_health"] = [with_value(BASE, 0, "node\r")]
    tx = completed_transaction(genv, "agent-1", HOUR, rows=rows)
    with open(stage_task(tx).requires().path(), "rb") as f, pytest.raises(ArchiveError, match="carriage return"):
        archives.validate(f, "agent-1", "geo-test", HOUR)
    run(load_task(tx))
    assert "carriage return" in marker(tx)["isolated"]
