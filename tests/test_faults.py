"""Faults, injected: kill -9 of the pipeline at every step, the API and MySQL and S3 and the
disk failing under it, the agent killed at every step of delivery.

The pipeline is always the real command line (`luigi --module ganymede.tasks
HourlyBackup --hour H --local-scheduler`); to die at an exact point it runs
under tests/faultlib.py, a wrapper that monkeypatches one function to SIGKILL
its own process at the Nth call (fault injection, test only). After each fault
the very same command is run again, and the end state must equal that of an
undisturbed run of the same data in another world: MongoDB content, extract
bytes, the bucket's objects and checksums, where every file is, every
transaction's state, and nothing left in staging.
"""
import errno
import hashlib
import json
import os
import secrets
import subprocess
import threading
from contextlib import closing
from datetime import datetime, timedelta

import luigi
import pytest

import faultlib as F
from conftest import build_test_archive, drop_buckets, require_port, sample_rows
from ganymede import generator, hours
from ganymede.paths import StateRoot
from ganymede.stores import txlog
from ganymede.tasks import LoadTransaction
from ganymede_agent import cli, spool
from ganymede_agent.client import Api, RetryBudget

pytestmark = pytest.mark.slow

HOUR = datetime(2026, 11, 30, 5)
HOUR_TEXT = hours.format_hour(HOUR)
TXS = (("agent-a", "00000000-0000-4000-8000-00000000000a"), ("agent-b", "00000000-0000-4000-8000-00000000000b"))
SETTINGS = {"mongodb": {"batch_size": 2}, "retcode": F.RETCODES}  # small batches: a load has many writes to die in
PREVIOUS_TX = ("agent-a", "00000000-0000-4000-8000-0000000000a0")


def seed(env):
    """The hour's two transactions, after agent-a's previous hour is loaded (its growth comes from MongoDB)."""
    before = HOUR - timedelta(hours=1)
    rows = sample_rows(before, agent_tag="agent-a")
    for row in rows["account_usage"]:
        row[1] //= 3
    previous = F.fixed_transaction(env, *PREVIOUS_TX[:1], before, PREVIOUS_TX[1], rows=rows)
    result = luigi.build([LoadTransaction(transaction_id=previous["transaction_id"], hour=before,
                                          agent_id=previous["agent_id"])], local_scheduler=True, detailed_summary=True)
    assert result.status.name == "SUCCESS", result.summary_text
    for agent_id, tx in TXS:
        F.fixed_transaction(env, agent_id, HOUR, tx)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """The fingerprint of the hour run once, undisturbed, in a world of its own with the same data."""
    require_port("127.0.0.1", 3306, "MariaDB")
    require_port("127.0.0.1", 27017, "MongoDB test server (nx-27017)")
    require_port("127.0.0.1", int(F.S3_ENDPOINT.rsplit(":", 1)[1]), "S3 test server (moto)")
    env = F.new_world(tmp_path_factory.mktemp("baseline"), **SETTINGS)
    try:
        seed(env)
        result = F.run(F.luigi_command(HOUR_TEXT), env.subprocess_env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert F.consistency_problems(env, HOUR) == []
        growth = {d["agent_id"]: d["bytes_stored_growth"] for d in F.mongo_db(env)["account_usage"].find({"hour": HOUR})}
        assert growth["agent-a"] > 0 and growth["agent-b"] is None  # a's previous hour is loaded, b's is not
        yield F.fingerprint(env, HOUR)
    finally:
        F.drop_world(env)


@pytest.fixture
def world(genv, s3_up, mongo_up):
    genv.write_config(**SETTINGS)
    seed(genv)
    yield genv
    drop_buckets(genv.bucket_prefix)


def assert_same_end_state(env, baseline):
    mine = F.fingerprint(env, HOUR)
    for part in baseline:  # one assertion per part, so a failure names what differs
        assert mine[part] == baseline[part], f"{part} differs from the undisturbed run"
    assert F.consistency_problems(env, HOUR) == []


# (id, what is interrupted, function patched, nth matching call, --match, --after)
KILL_POINTS = [
    ("stage-first-dataset", "staging, before the first LOAD DATA",
     "ganymede.stores.staging:load_csv", 1, None, False),
    ("stage-mid", "staging, one dataset committed, the next not",
     "ganymede.stores.staging:load_csv", 2, None, False),
    ("staged-before-event", "staging done, before its `staged` event",
     "ganymede.stores.txlog:append_event_once", 1, "'staged'", False),
    ("staged-before-marker", "staged and logged, before the staged marker",
     "ganymede.markers:write_json", 1, ".staged.json", False),
    ("mongo-mid-load", "MongoDB load, mid-transaction (4th bulk write of 9)",
     "ganymede.stores.mongo:replace_many", 4, None, False),
    ("load-previous-read-not-written", "load: a batch's previous-hour values read from MongoDB, the batch not "
     "written", "ganymede.stores.mongo:find_by_ids", 2, None, True),
    ("load-staging-cleared", "load: staging cleared while the last MongoDB writes are in flight",
     "ganymede.tasks.worker:clear_staging", 1, None, True),
    ("loaded-before-event", "MongoDB loaded, before the `loaded` event",
     "ganymede.tasks.worker:finish_load", 1, None, False),
    ("loaded-before-marker", "between load and marker: event logged, no loaded marker",
     "ganymede.markers:write_json", 1, ".loaded.json", False),
    ("extract-mid-write", "during the extract write (gzip half written)",
     "ganymede.tasks.extract:_HashingFile.write", 3, None, False),
    ("extract-written-not-renamed", "extract written and fsync'd, not renamed into place",
     "ganymede.markers:_DurableFile.move_to_final_destination", 1, ".jsonl.gz", False),
    ("extract-before-delivery", "extract written, before delivery to the outbox",
     "ganymede.tasks.extract:deliver", 1, None, False),
    ("extract-mid-outbox-copy", "during the outbox copy (copied, not renamed into place)",
     "ganymede.files:move_durably", 1, "state/outbox/", False),
    ("extract-before-marker", "extract delivered, before its manifest (the task's marker)",
     "ganymede.markers:write_json", 1, ".manifest.json", False),
    ("dump-mid-write", "during the schema dump (written, not renamed)",
     "ganymede.markers:_DurableFile.move_to_final_destination", 1, "ganymede.sql.gz", False),
    ("upload-unverified", "during the backup upload: 3rd object sent, not yet verified",
     "ganymede.stores.s3:S3Store._upload", 3, None, True),
    ("upload-between-objects", "during the backup upload: 4 objects sent (none verified yet), the 5th not",
     "ganymede.stores.s3:S3Store._upload", 5, None, False),
    ("upload-mid-verification", "every object sent, their verification under way",
     "ganymede.stores.s3:S3Store._verified", 2, None, False),
    ("upload-before-bucket-manifest", "every object verified, before MANIFEST.json",
     "ganymede.stores.s3:S3Store.put_verified", 1, "MANIFEST.json", False),
    ("after-upload-before-move", "after upload and before the move (events logged)",
     "ganymede.tasks.backup:move_archives", 1, None, False),
    ("mid-backed-up-events", "after upload: one `backed_up` event logged of two",
     "ganymede.stores.txlog:append_event_once", 2, "'backed_up'", False),
    ("mid-move", "during the move: one archive moved to archives/, one still in upload/",
     "ganymede.files:move_durably", 2, None, False),
    ("moved-before-marker", "everything verified, before the backup marker (written before the move)",
     "ganymede.markers:write_json", 1, "backup.json", False),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("point", KILL_POINTS, ids=[p[0] for p in KILL_POINTS])
def test_kill_9_then_the_same_command_ends_as_an_undisturbed_run(world, baseline, point):
    _, what, patch, nth, match, after = point
    crashed = F.run(F.faulty_command(patch, nth, match, after, args=F.luigi_args(HOUR_TEXT)), world.subprocess_env)
    assert crashed.returncode == F.SIGKILLED, (
        f"the run was not killed {what} (exit {crashed.returncode}): the fault point was never reached\n"
        + crashed.stderr[-3000:])
    root = StateRoot(world.root)
    # the hour is not closed: no backup marker, or (the marker is written just before the move) archives
    # still waiting in upload/
    assert not os.path.exists(root.hour_marker(HOUR, "backup")) or F.tree(root.hour_uploads(HOUR))

    again = F.run(F.luigi_command(HOUR_TEXT), world.subprocess_env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_end_state(world, baseline)
    nothing = F.run(F.luigi_command(HOUR_TEXT), world.subprocess_env)  # and then there is nothing left to do
    assert nothing.returncode == 0, nothing.stderr[-2000:]
    assert "Did not run any tasks" in nothing.stdout + nothing.stderr


# --- the same, for a run that delivers a late arrival and a replacement ---------------------

LATE_TXS = (("agent-a", "00000000-0000-4000-8000-00000000000c"), ("agent-c", "00000000-0000-4000-8000-00000000000d"))


def seed_late(env):
    """After the hour closed: agent-a replaces its hour with other rows, agent-c arrives late."""
    replacement = sample_rows(HOUR, 3, agent_tag="agent-a-v2")  # other keys: some of a's documents must go
    F.fixed_transaction(env, "agent-a", HOUR, LATE_TXS[0][1], rows=replacement, replace=True)
    F.fixed_transaction(env, "agent-c", HOUR, LATE_TXS[1][1])


@pytest.fixture(scope="module")
def late_baseline(tmp_path_factory):
    """The hour closed, then its late arrival and replacement delivered, all undisturbed."""
    env = F.new_world(tmp_path_factory.mktemp("late-baseline"), **SETTINGS)
    try:
        seed(env)
        assert F.run(F.luigi_command(HOUR_TEXT), env.subprocess_env).returncode == 0
        seed_late(env)
        result = F.run(F.luigi_command(HOUR_TEXT), env.subprocess_env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert F.consistency_problems(env, HOUR) == []
        fingerprint = F.fingerprint(env, HOUR)
        assert len([p for p in fingerprint["extracts"] if p.endswith("-s1.jsonl.gz")]) == 2  # extracts/, outbox/
        yield fingerprint
    finally:
        F.drop_world(env)


LATE_KILL_POINTS = [
    ("late-stage-mid", "staging a late transaction, one dataset committed",
     "ganymede.stores.staging:load_csv", 2, None, False),
    ("replacement-retired-before-marker", "replacement loaded and the replaced documents deleted, no marker",
     "ganymede.tasks.worker:retire_replaced", 1, None, True),
    ("supplementary-mid-write", "during the supplementary extract's write",
     "ganymede.tasks.extract:_HashingFile.write", 3, None, False),
    ("supplementary-before-marker", "supplementary extract delivered, before its manifest",
     "ganymede.markers:write_json", 1, "-s1.manifest.json", False),
    ("supplementary-dump", "during the supplementary round's schema dump",
     "ganymede.markers:_DurableFile.move_to_final_destination", 1, "ganymede-s1.sql.gz", False),
    ("late-upload-mid", "during the upload of the late objects",
     "ganymede.stores.s3:S3Store._upload", 2, None, False),
    ("late-mid-move", "during the move of the late archives",
     "ganymede.files:move_durably", 2, None, False),
    ("late-before-marker", "late archives moved, before the backup marker",
     "ganymede.markers:write_json", 1, "backup.json", False),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("point", LATE_KILL_POINTS, ids=[p[0] for p in LATE_KILL_POINTS])
def test_kill_9_while_delivering_a_late_arrival_and_a_replacement(world, late_baseline, point):
    _, what, patch, nth, match, after = point
    assert F.run(F.luigi_command(HOUR_TEXT), world.subprocess_env).returncode == 0  # the hour closes
    seed_late(world)
    crashed = F.run(F.faulty_command(patch, nth, match, after, args=F.luigi_args(HOUR_TEXT)), world.subprocess_env)
    assert crashed.returncode == F.SIGKILLED, f"not killed {what} (exit {crashed.returncode})\n{crashed.stderr[-3000:]}"
    again = F.run(F.luigi_command(HOUR_TEXT), world.subprocess_env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_end_state(world, late_baseline)
    states = F.fingerprint(world, HOUR)["transaction_states"]
    assert states[TXS[0][1]] == "superseded" and states[LATE_TXS[0][1]] == "completed"


@pytest.mark.timeout(60)
def test_a_crash_mid_outbox_copy_leaves_no_partial_file_in_the_vendors_outbox(world):
    """The outbox is the vendor's pickup directory: a half-copied extract must not stay there."""
    crashed = F.run(F.faulty_command("ganymede.files:move_durably", 1, "state/outbox/",
                                     args=F.luigi_args(HOUR_TEXT)), world.subprocess_env)
    assert crashed.returncode == F.SIGKILLED, crashed.stderr[-2000:]
    assert F.run(F.luigi_command(HOUR_TEXT), world.subprocess_env).returncode == 0
    outbox = os.path.join(world.root, "outbox")
    assert sorted(os.listdir(outbox)) == [f"ganymede-{hours.compact(HOUR)}.jsonl.gz"], (
        "a partial copy from the killed run is still in the vendor's outbox")


# --- S3 down during the backup, then up ------------------------------------------------

@pytest.mark.timeout(120)
def test_s3_down_mid_backup_fails_clearly_then_up_completes(world, baseline, tmp_path):
    flag = str(tmp_path / "s3-is-down")
    proxy = F.TcpProxy(("127.0.0.1", int(F.S3_ENDPOINT.rsplit(":", 1)[1])), flag=flag)
    try:
        world.write_config(s3={"endpoint_url": f"http://127.0.0.1:{proxy.port}"})
        # fault injection: when the 3rd object is about to go up, the S3 server "dies" (the proxy cuts it off)
        run = F.run(F.faulty_command("ganymede.stores.s3:S3Store._upload", 3, action=f"touch:{flag}",
                                     args=F.luigi_args(HOUR_TEXT)), world.subprocess_env, timeout=170)
        assert os.path.exists(flag), "the fault point was never reached"
        assert run.returncode == F.RETCODES["task_failed"], run.stderr[-3000:]
        root = StateRoot(world.root)
        assert not os.path.exists(root.hour_marker(HOUR, "backup"))
        assert F.tree(os.path.join(world.root, "archives")) == []  # nothing moved before the bucket was verified
        (failure,) = [json.load(open(os.path.join(d, n))) for d, _, names in os.walk(world.root) for n in names
                      if os.sep + "failures" + os.sep in os.path.join(d, n)]
        assert "HourlyBackup" in failure["task"]
        assert f"S3 endpoint http://127.0.0.1:{proxy.port}" in failure["error"] and "Traceback" not in failure["error"]

        os.unlink(flag)  # S3 is back
        again = F.run(F.luigi_command(HOUR_TEXT), world.subprocess_env)
        assert again.returncode == 0, again.stderr[-3000:]
        assert_same_end_state(world, baseline)
    finally:
        proxy.close()


# --- the API: killed mid-upload, MySQL gone, disk full -----------------------------------

def recent(n):
    return hours.format_hour(hours.last_complete_hour() - timedelta(hours=n))


@pytest.fixture
def geo_db(genv):
    name = f"{genv.mysql_database}_geo"
    conn = generator.create_database(name)
    yield conn
    conn.close()
    generator.drop_database(name)


def agent_config(genv, tmp_path, api_url, agent_id="geo-fault-1", **settings):
    with closing(genv.mysql()) as conn:
        token = txlog.add_agent(conn, agent_id, "fault-geo")
    values = dict(api_url=api_url, agent_id=agent_id, token=token, geo="fault-geo",
                  database=f"{genv.mysql_database}_geo", spool_dir=str(tmp_path / "spool"),
                  retry_budget_seconds=20, retry_base_seconds=0.05, retry_cap_seconds=0.5,
                  request_timeout_seconds=20)
    values.update(settings)
    return generator.write_agent_config(str(tmp_path / "agent.cfg"), **values), token


def agent_transactions(genv, agent_id):
    with closing(genv.mysql()) as conn, conn.cursor() as cur:
        cur.execute("SELECT transaction_id, hour, state, sha256, completed_at FROM transactions WHERE agent_id = %s "
                    "ORDER BY created_at", (agent_id,))
        return [dict(zip(("transaction_id", "hour", "state", "sha256", "completed_at"), r)) for r in cur.fetchall()]


@pytest.mark.timeout(120)
def test_api_killed_mid_upload_accepts_nothing_and_the_agents_retry_completes(genv, geo_db, tmp_path):
    hour = recent(2)
    generator.generate_hour(geo_db, hour, accounts=3000, endpoints=4, nodes=4, seed=7)
    api = F.ApiProcess(genv, tmp_path / "api.log").start()
    try:
        cfg, token = agent_config(genv, tmp_path, api.url)
        created = F.create_transaction(api.port, "geo-fault-1", token, hour)
        assert created.status == 201, created
        tx = created.json["transaction_id"]
        # the agent's first attempt: 1.5 MB of a 2 MB upload arrive, then the API process dies
        exchange = F.RawExchange(api.port)
        exchange.send(F.upload_head(tx, "geo-fault-1", token, 2 << 20, "0" * 64))
        exchange.send(os.urandom(3 << 19))
        incoming = os.path.join(genv.root, "incoming")
        F.wait_for(lambda: any(os.path.getsize(os.path.join(incoming, n)) >= 512 << 10 for n in os.listdir(incoming)),
                   what="the upload to reach the disk")
        api.kill()
        exchange.close()
        assert [n for n in os.listdir(incoming) if n.endswith(".part")] == []  # nothing became the upload
        assert [t["state"] for t in agent_transactions(genv, "geo-fault-1")] == ["created"]

        api.start()
        result = subprocess.run([f"{F.BIN}/ganymede-agent", "--config", cfg, "--hour", hour],
                                capture_output=True, text=True, timeout=90)
        assert result.returncode == cli.EXIT_OK, result.stderr
        (done,) = agent_transactions(genv, "geo-fault-1")
        assert (done["transaction_id"], done["state"]) == (tx, "completed")  # the same transaction, resumed
        final = StateRoot(genv.root).upload(hours.parse_hour(hour), "geo-fault-1", tx)
        assert F.sha256_file(final) == done["sha256"]
        assert [n for n in os.listdir(incoming) if n.endswith(".part")] == []
        assert F.tree(os.path.join(genv.root, "quarantine")) == []
        assert "Traceback" not in api.log()
    finally:
        api.stop()


@pytest.mark.timeout(60)
def test_api_with_mysql_unreachable_answers_503_with_retry_after_never_500(genv, tmp_path):
    """A second API pointed at a closed MySQL port (the shared MariaDB itself is never stopped)."""
    token = F.register_agent(genv, "geo-nodb")
    closed = F.free_port()
    settings = {section: dict(values) for section, values in genv.settings.items()}
    settings["mysql"]["port"] = str(closed)
    settings["api"].update(port=str(F.free_port()), retry_after="9")
    cfg = tmp_path / "nodb.cfg"
    cfg.write_text("".join(f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()) + "\n"
                           for s, values in settings.items()))
    api = F.ApiProcess(genv, tmp_path / "api-nodb.log", port=int(settings["api"]["port"])).start(str(cfg))
    try:
        tx = "11111111-2222-4333-8444-555555555555"
        headers = F.agent_headers("geo-nodb", token)
        calls = [
            ("POST", "/v1/transactions", json.dumps({"agent_id": "geo-nodb", "hour": recent(1)}), headers),
            ("PUT", f"/v1/transactions/{tx}/archive", b"x" * 100, dict(headers, **{"X-Archive-SHA256": "0" * 64})),
            ("POST", f"/v1/transactions/{tx}/complete", b"", headers),
            ("GET", f"/v1/transactions/{tx}", None, headers),
            ("GET", f"/v1/hours/{recent(1)}/roster", None, {"Authorization": "Bearer whatever"}),
            ("GET", "/healthz", None, {}),
        ]
        for method, path, body, hdrs in calls:
            reply = F.call(api.port, method, path, body, hdrs)
            assert reply.status == 503, (method, path, reply)
            assert reply.headers.get("retry-after") == "9", (method, path, reply.headers)
            assert reply.json["status"] == 503 and reply.json["error"]
        health = F.healthz(api.port).json
        assert health["checks"]["mysql"] == {"ok": False, "detail": "unreachable"}
        assert F.call(api.port, "GET", "/nowhere").status == 404  # what needs no database still answers
        assert "Traceback" not in api.log()
    finally:
        api.stop()


@pytest.mark.timeout(120)
def test_mysql_restarted_while_20_agents_upload(genv, tmp_path):
    """MySQL (behind a proxy: the shared MariaDB is never stopped) goes away twice while 20 agents
    deliver: before their uploads and before their completes. The agents' own retry logic carries
    them through; every request gets an answer other than 500; every hour arrives exactly once."""
    proxy = F.TcpProxy(("127.0.0.1", 3306))
    settings = {section: dict(values) for section, values in genv.settings.items()}
    settings["mysql"]["port"] = str(proxy.port)
    settings["api"]["retry_after"] = "1"
    cfg = tmp_path / "proxied.cfg"
    cfg.write_text("".join(f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()) + "\n"
                           for s, values in settings.items()))
    api = F.ApiProcess(genv, tmp_path / "api.log").start(str(cfg))
    n, hour = 20, recent(1)
    agents = [(f"geo-{i:02d}", F.register_agent(genv, f"geo-{i:02d}")) for i in range(n)]
    gates = {"PUT": threading.Barrier(n + 1, timeout=60), "complete": threading.Barrier(n + 1, timeout=60)}
    statuses, results, lock = [], {}, threading.Lock()

    class Recording(Api):
        first = None

        def call(self, method, path, *args, **kwargs):
            step = "PUT" if method == "PUT" else "complete" if path.endswith("/complete") else None
            if step and self.first != step:  # every agent reaches the step before MySQL goes away
                self.first = step
                gates[step].wait()
            return super().call(method, path, *args, **kwargs)

        def _once(self, *args, **kwargs):
            response = super()._once(*args, **kwargs)
            with lock:
                statuses.append(response.status)
            return response

    def deliver(agent_id, token):
        path = str(tmp_path / f"{agent_id}.tar.gz")
        build_test_archive(path, agent_id, "geo-test", hours.parse_hour(hour), sample_rows(hours.parse_hour(hour), 50))
        api_client = Recording(api.url, agent_id, token, 20, RetryBudget(60, 0.1, 1.0))
        try:
            results[agent_id] = (api_client.deliver(hour, path, F.sha256_file(path)), F.sha256_file(path))
        except Exception as exc:  # noqa: BLE001 - recorded and asserted below
            results[agent_id] = exc

    threads = [threading.Thread(target=deliver, args=a) for a in agents]
    try:
        for t in threads:
            t.start()
        for step in ("PUT", "complete"):
            gates[step].wait()
            seen = len(statuses)
            proxy.down()  # MySQL stops: pooled connections break, new ones are refused
            F.wait_for(lambda: 503 in statuses[seen:], 60, what="an agent answered 503 while MySQL is down")
            proxy.up()
        for t in threads:
            t.join(90)
    finally:
        api.stop()
        proxy.close()
    failed = {a: r for a, r in results.items() if isinstance(r, Exception)}
    assert not failed and len(results) == n, failed
    assert 500 not in statuses and 503 in statuses, sorted(set(statuses))
    assert set(statuses) <= {200, 201, 503}, sorted(set(statuses))
    root = StateRoot(genv.root)
    with closing(genv.mysql()) as conn, conn.cursor() as cur:
        cur.execute("SELECT agent_id, state, sha256, transaction_id FROM transactions")
        rows = cur.fetchall()
    assert sorted((a, s) for a, s, _, _ in rows) == [(a, "completed") for a, _ in agents]
    for agent_id, state, sha, tx in rows:
        delivered, sent_sha = results[agent_id]
        assert delivered.transaction_id == tx and sha == sent_sha
        assert F.sha256_file(root.upload(hours.parse_hour(hour), agent_id, tx)) == sha
    assert [p for p in F.tree(os.path.join(genv.root, "incoming"))] == []
    assert "Traceback" not in api.log()


@pytest.fixture
def small_disk(genv):
    """The API's state root on a 2 MB tmpfs (we are root); unmounted afterwards."""
    os.makedirs(genv.root, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", genv.root],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"cannot mount a tmpfs (this test runs as root): {mounted.stderr}"
    yield genv.root
    subprocess.run(["umount", genv.root], capture_output=True)
    if os.path.ismount(genv.root):
        subprocess.run(["umount", "-l", genv.root], capture_output=True)


def big_archive(tmp_path, agent_id, hour, kib):
    """A valid archive of about `kib` KiB that gzip cannot shrink much (random account ids)."""
    rows = sample_rows(hour, 1, agent_tag=agent_id)
    rows["account_usage"] = [["a" + secrets.token_urlsafe(75), 1, 1, 1, 1, 1] for _ in range(kib * 1024 // 82)]
    path = str(tmp_path / f"{agent_id}.tar.gz")
    build_test_archive(path, agent_id, "geo-test", hour, rows)
    return open(path, "rb").read()


@pytest.mark.timeout(90)
def test_disk_full_during_an_upload_gives_507_accepts_nothing_then_recovers(genv, small_disk, tmp_path):
    genv.write_config(api={"min_free_mb": 0})  # let uploads start, so the disk fills *during* one
    api = F.ApiProcess(genv, tmp_path / "api.log").start()
    hour_text = recent(1)
    hour = hours.parse_hour(hour_text)
    try:
        first, second = (("geo-disk-a", F.register_agent(genv, "geo-disk-a")),
                         ("geo-disk-b", F.register_agent(genv, "geo-disk-b")))
        data = {a: big_archive(tmp_path, a, hour, 1200) for a, _ in (first, second)}
        assert all(1 << 20 < len(d) < 3 << 19 for d in data.values()), [len(d) for d in data.values()]
        txs = {a: F.create_transaction(api.port, a, t, hour_text).json["transaction_id"] for a, t in (first, second)}
        # both uploads pass the free-space check (1.2 MB each, 2 MB free), then fill the disk between them
        exchanges = {}
        for agent_id, token in (first, second):
            exchanges[agent_id] = F.RawExchange(api.port)
            d = data[agent_id]
            exchanges[agent_id].send(F.upload_head(txs[agent_id], agent_id, token, len(d),
                                                   hashlib.sha256(d).hexdigest()))
        incoming = os.path.join(genv.root, "incoming")
        F.wait_for(lambda: os.path.isdir(incoming) and all(any(n.startswith(tx) for n in os.listdir(incoming))
                                                          for tx in txs.values()),
                   what="both uploads past the free-space check (their temporary files opened)")
        answers = {}
        for agent_id, _ in (first, second):
            exchange, d = exchanges[agent_id], data[agent_id]
            for i in range(0, len(d), 64 << 10):
                if not exchange.send(d[i:i + (64 << 10)]):
                    break
            answers[agent_id] = exchange.reply()
            exchange.close()
        assert answers["geo-disk-a"][0] == 200, answers
        status, body = answers["geo-disk-b"]
        assert status == 507, answers
        assert body == {"error": "cannot store the upload on the server; retry later", "status": 507}
        states = {a: [t["state"] for t in agent_transactions(genv, a)] for a in txs}
        assert states == {"geo-disk-a": ["uploaded"], "geo-disk-b": ["created"]}
        F.wait_for(lambda: sorted(os.listdir(incoming)) == [f"{txs['geo-disk-a']}.part"],
                   what="the failed upload's temp file removed, the good one completed to its .part")
        assert F.complete(api.port, first[0], first[1], txs["geo-disk-a"]).status == 200

        # an upload the disk cannot hold at all is refused before a byte is written
        huge = big_archive(tmp_path, "geo-disk-b", hour, 3000)
        refused = F.upload(api.port, second[0], second[1], txs["geo-disk-b"], huge)
        assert refused.status == 507 and refused.json["error"] == "not enough free disk on the server; retry later"
        assert F.complete(api.port, second[0], second[1], txs["geo-disk-b"]).status == 409  # nothing to complete

        subprocess.run(["mount", "-o", "remount,size=8m", small_disk], check=True)  # space again
        assert F.upload(api.port, second[0], second[1], txs["geo-disk-b"], data["geo-disk-b"]).status == 200
        assert F.complete(api.port, second[0], second[1], txs["geo-disk-b"]).status == 200
        root = StateRoot(genv.root)
        for agent_id, tx in txs.items():
            (t,) = agent_transactions(genv, agent_id)
            assert t["state"] == "completed"
            assert F.sha256_file(root.upload(hour, agent_id, tx)) == hashlib.sha256(data[agent_id]).hexdigest()
        assert os.listdir(incoming) == [] and F.tree(os.path.join(genv.root, "quarantine")) == []
        assert "Traceback" not in api.log()
    finally:
        api.stop()


def fill(directory):
    """Write a filler file until the filesystem has not one byte left; returns its path."""
    path = os.path.join(directory, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return path


@pytest.mark.timeout(90)
def test_disk_full_when_completing_gives_a_clean_error_and_recovers(genv, small_disk, tmp_path):
    """The disk fills between upload and complete: completing a valid archive only renames it; refusing
    an invalid one must write its reason to quarantine/, and may not turn a full disk into a 500."""
    genv.write_config(api={"min_free_mb": 0})
    api = F.ApiProcess(genv, tmp_path / "api.log").start()
    hour_text = recent(1)
    hour = hours.parse_hour(hour_text)
    try:
        good, bad = (("geo-full-ok", F.register_agent(genv, "geo-full-ok")),
                     ("geo-full-bad", F.register_agent(genv, "geo-full-bad")))
        rows = sample_rows(hour, 5, agent_tag="x")
        data = {}
        for agent_id, _ in (good, bad):
            path = str(tmp_path / f"{agent_id}.tar.gz")
            if agent_id == bad[0]:
                rows["account_usage"][2][1] = -1  # negative bytes_stored: the archive is refused at complete
            build_test_archive(path, agent_id, "geo-test", hour, rows)
            data[agent_id] = open(path, "rb").read()
        txs = {a: F.create_transaction(api.port, a, t, hour_text).json["transaction_id"] for a, t in (good, bad)}
        for agent_id, token in (good, bad):
            assert F.upload(api.port, agent_id, token, txs[agent_id], data[agent_id]).status == 200
        filler = fill(small_disk)

        done = F.complete(api.port, good[0], good[1], txs[good[0]])
        assert done.status in (200, 507), done
        refused = F.complete(api.port, bad[0], bad[1], txs[bad[0]])
        assert refused.status in (503, 507), f"a full disk while quarantining answered {refused}"
        assert refused.json["status"] == refused.status and refused.json["error"]
        assert [t["state"] for t in agent_transactions(genv, bad[0])] == ["uploaded"]  # nothing half-done
        assert F.tree(os.path.join(genv.root, "quarantine")) == []
        assert "Traceback" not in api.log()

        os.unlink(filler)  # space again: the agents' retries finish the job
        if done.status != 200:
            assert F.complete(api.port, good[0], good[1], txs[good[0]]).status == 200
        refused = F.complete(api.port, bad[0], bad[1], txs[bad[0]])
        assert refused.status == 422 and "bytes_stored: negative" in refused.json["error"]
        held = StateRoot(genv.root).quarantine(hour, bad[0], txs[bad[0]])
        assert sorted(F.tree(os.path.join(genv.root, "quarantine"))) == sorted(
            os.path.relpath(p, os.path.join(genv.root, "quarantine")) for p in (
                held, held[: -len(".tar.gz")] + ".reason.json"))  # and no temp file left beside them
        assert [t["state"] for t in agent_transactions(genv, good[0])] == ["completed"]
        assert os.listdir(os.path.join(genv.root, "incoming")) == []
    finally:
        api.stop()


# --- the agent killed at each step of delivery ---------------------------------------------

# (id, the step, function patched, nth matching call, --match, --after); the run sends two hours
# and dies at the step of the second one, so one hour is already delivered when it dies.
AGENT_POINTS = [
    ("mid-build", "building the second hour's archive", "ganymede_agent.archive:write_csv", 5, None, False),
    ("built-before-delivery", "both hours built and spooled, before delivering",
     "ganymede_agent.cli:Run.deliver", 1, None, False),
    ("before-create", "before creating the second hour's transaction",
     "ganymede_agent.client:Api.call", 2, "'/v1/transactions'", False),
    ("created-before-upload", "transaction created, before the upload",
     "ganymede_agent.client:Api.call", 2, "'/v1/transactions'", True),
    ("mid-upload", "mid-upload: the first 8 KiB of the archive sent",
     "http.client:HTTPConnection.send", 2, "b'\\x1f\\x8b", True),
    ("uploaded-before-complete", "uploaded, before asking to complete",
     "ganymede_agent.client:Api.call", 2, "/complete", False),
    ("completed-before-spool-removal", "completed on the server, the answer in hand, before leaving the spool",
     "ganymede_agent.spool:Spool.remove", 2, None, False),
    ("removed-before-state", "removed from the spool, before the state is updated",
     "ganymede_agent.spool:Spool.count", 2, "'delivered'", False),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("point", AGENT_POINTS, ids=[p[0] for p in AGENT_POINTS])
def test_agent_killed_at_each_step_of_delivery_delivers_every_hour_once(genv, geo_db, tmp_path, point):
    _, step, patch, nth, match, after = point
    first, second = recent(3), recent(2)
    for i, hour in enumerate((first, second)):
        generator.generate_hour(geo_db, hour, accounts=300, endpoints=2, nodes=2, seed=i)
    api = F.ApiProcess(genv, tmp_path / "api.log").start()
    try:
        cfg, _ = agent_config(genv, tmp_path, api.url)
        args = ["--config", cfg, "--backfill", first, second]
        killed = subprocess.run(F.faulty_command(patch, nth, match, after, target="agent", args=args),
                                capture_output=True, text=True, timeout=90)
        assert killed.returncode == F.SIGKILLED, f"not killed {step}: exit {killed.returncode}\n{killed.stderr}"
        again = subprocess.run([f"{F.BIN}/ganymede-agent", *args], capture_output=True, text=True, timeout=90)
        assert again.returncode == cli.EXIT_OK, again.stderr
    finally:
        api.stop()
    txs = agent_transactions(genv, "geo-fault-1")
    assert [(hours.format_hour(t["hour"]), t["state"]) for t in txs] == [(first, "completed"), (second, "completed")]
    spool_dir = str(tmp_path / "spool")
    assert [n for n in os.listdir(spool_dir) if n.endswith(".tar.gz")] == []
    assert os.listdir(os.path.join(spool_dir, "rejected")) == []
    root = StateRoot(genv.root)
    for t in txs:
        assert F.sha256_file(root.upload(t["hour"], "geo-fault-1", t["transaction_id"])) == t["sha256"]


@pytest.mark.timeout(150)
def test_api_unreachable_for_hours_then_every_spooled_hour_is_delivered_once_in_order(genv, geo_db, tmp_path):
    spooled, latest = [recent(n) for n in range(7, 1, -1)], recent(1)  # six hours, oldest first; then the next
    for i, hour in enumerate(spooled + [latest]):
        generator.generate_hour(geo_db, hour, accounts=40, endpoints=1, nodes=1, seed=i)
    api = F.ApiProcess(genv, tmp_path / "api.log")
    cfg, _ = agent_config(genv, tmp_path, api.url, retry_budget_seconds=0.3)
    for hour in spooled:  # hourly cron runs while nothing answers at the API's address
        kept = subprocess.run([f"{F.BIN}/ganymede-agent", "--config", cfg, "--hour", hour],
                              capture_output=True, text=True, timeout=60)
        assert kept.returncode == cli.EXIT_KEPT and "API unavailable" in kept.stderr, kept.stderr
    spool_dir = str(tmp_path / "spool")
    assert sorted(n for n in os.listdir(spool_dir) if n.endswith(".tar.gz")) == [
        f"{spool.hour_key(h)}.tar.gz" for h in spooled]
    api.start()
    try:
        # the first run after the outage dies half-way through the catch-up (after the 3rd hour completed)
        killed = subprocess.run(F.faulty_command("ganymede_agent.spool:Spool.remove", 3, target="agent",
                                                 args=["--config", cfg, "--hour", latest]),
                                capture_output=True, text=True, timeout=90)
        assert killed.returncode == F.SIGKILLED, killed.stderr
        again = subprocess.run([f"{F.BIN}/ganymede-agent", "--config", cfg, "--hour", latest],
                               capture_output=True, text=True, timeout=90)
        assert again.returncode == cli.EXIT_OK, again.stderr
    finally:
        api.stop()
    txs = agent_transactions(genv, "geo-fault-1")
    assert all(t["state"] == "completed" for t in txs), txs
    by_completion = sorted(txs, key=lambda t: t["completed_at"])
    assert [hours.format_hour(t["hour"]) for t in by_completion] == spooled + [latest]  # each once, in order
    assert [n for n in os.listdir(spool_dir) if n.endswith(".tar.gz")] == []
