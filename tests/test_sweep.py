"""incoming/ housekeeping (ganymede.api.sweep) against the real MariaDB, and in the running ganymede-api."""
import fcntl
import glob
import logging
import os
import signal
import subprocess
import time
from datetime import datetime, timedelta
from types import SimpleNamespace

import pytest

import faultlib as F
from ganymede import config, hours
from ganymede.api import sweep
from ganymede.stores.pool import MySQLPool
from ganymede.paths import StateRoot
from ganymede.stores import txlog

from conftest import build_test_archive, completed_transaction, sample_rows
from test_api import _command, _wait_for

HOUR = datetime(2026, 11, 30, 4)


def _incoming(state, name, age=0):
    path = os.path.join(sweep.incoming_dir(state), name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"archive bytes")
    if age:
        os.utime(path, (time.time() - age, time.time() - age))
    return path


def _agent(conn, agent_id):
    with conn.cursor() as cur:
        cur.execute("INSERT INTO agents (agent_id, geo, token_hash, active, created_at) VALUES (%s, 'geo', %s, 1, %s)",
                    (agent_id, "0" * 64, datetime(2025, 1, 1)))
    conn.commit()


def _open_tx(conn, agent_id, hour=HOUR):
    return txlog.create_transaction(conn, agent_id, hour)[0]["transaction_id"]


@pytest.fixture
def world(genv):
    state = StateRoot(genv.root)
    with genv.mysql() as conn:
        _agent(conn, "agent-a")
        _agent(conn, "agent-b")
        yield genv, state, conn


def test_stale_upload_temp_files_are_swept(tmp_path):
    state = StateRoot(str(tmp_path))
    old = _incoming(state, "a.part.1.tmp", age=7200)
    fresh = _incoming(state, "b.part.2.tmp")
    part = _incoming(state, "c.part", age=7200)
    assert sweep.sweep_temp_files(state, 3600) == 1
    assert not os.path.exists(old) and os.path.exists(fresh) and os.path.exists(part)


def test_parts_of_failed_and_completed_transactions_go_open_and_unknown_ones_stay(world):
    genv, state, conn = world
    failed = _open_tx(conn, "agent-a")
    failed_part = _incoming(state, f"{failed}.part")
    txlog.mark_uploaded(conn, failed, 13, "0" * 64)
    txlog.mark_failed(conn, failed, "the archive was refused")
    waiting = _open_tx(conn, "agent-b")
    waiting_part = _incoming(state, f"{waiting}.part")
    done = completed_transaction(genv, "agent-c", HOUR)["transaction_id"]
    stray_part = _incoming(state, f"{done}.part")  # a completed archive lives in upload/
    unknown_part = _incoming(state, "4f1c2d6e-0000-4000-8000-000000000000.part")
    odd = _incoming(state, "not an id.part")

    removed, unknown = sweep.sweep_parts(conn, state)

    assert removed == 2
    assert not os.path.exists(failed_part) and not os.path.exists(stray_part)
    assert os.path.exists(waiting_part) and os.path.exists(unknown_part) and os.path.exists(odd)
    assert unknown == ["4f1c2d6e-0000-4000-8000-000000000000"]
    assert txlog.get_transaction(conn, waiting)["state"] == "created"  # the sweep changes no state
    assert sweep.sweep_parts(conn, state) == (0, unknown)


def test_a_transaction_another_request_holds_is_left_for_the_next_sweep(world):
    genv, state, conn = world
    failed = _open_tx(conn, "agent-a")
    part = _incoming(state, f"{failed}.part")
    txlog.mark_failed(conn, failed, "refused")
    with genv.mysql() as other, txlog.transaction_lock(other, failed, 0):
        assert sweep.sweep_parts(conn, state) == (0, [])
        assert os.path.exists(part)
    assert sweep.sweep_parts(conn, state) == (1, [])
    assert not os.path.exists(part)


def test_a_sweep_with_mysql_away_logs_and_changes_nothing(world, caplog):
    genv, state, conn = world
    failed = _open_tx(conn, "agent-a")
    part = _incoming(state, f"{failed}.part")
    txlog.mark_failed(conn, failed, "refused")
    cfg = config.mysql()
    away = MySQLPool(SimpleNamespace(**dict(cfg.param_kwargs, port=1, connect_timeout=2)), 1)
    with caplog.at_level(logging.WARNING, logger="ganymede.api"):
        assert sweep.sweep(away, state, 3600) == (0, None)
    assert os.path.exists(part)
    assert "sweeping uploaded archives" in caplog.text


def test_ganymede_api_sweeps_at_start(world):
    genv, state, conn = world
    abandoned = _open_tx(conn, "agent-a")
    part = _incoming(state, f"{abandoned}.part")
    txlog.mark_failed(conn, abandoned, "abandoned for a newer request")
    waiting = _incoming(state, f"{_open_tx(conn, 'agent-b')}.part")
    dead_temp = _incoming(state, f"{abandoned}.part.abc.tmp", age=7 * 3600)
    proc = subprocess.Popen([_command(), "--config", genv.config_path], env=genv.subprocess_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert _wait_for(genv.api_port)[0] == 200
        deadline = time.time() + 20
        while (os.path.exists(part) or os.path.exists(dead_temp)) and time.time() < deadline:
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=20)[0].decode()
    assert proc.returncode == 0, out
    assert not os.path.exists(part) and not os.path.exists(dead_temp), out
    assert os.path.exists(waiting)
    assert f"transaction {abandoned} is failed" in out


def test_sweep_minutes_below_one_is_refused(genv):
    genv.write_config(api={"sweep_minutes": 0})
    proc = subprocess.run([_command(), "--config", genv.config_path], env=genv.subprocess_env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "sweep_minutes" in proc.stderr and "Traceback" not in proc.stderr


def _children(pid):
    return {int(c) for task in os.listdir(f"/proc/{pid}/task")
            for c in open(f"/proc/{pid}/task/{task}/children").read().split()}


def _running(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_killed_apis_upload_temp_is_swept_when_it_restarts(genv, tmp_path):
    """kill -9 of ganymede-api mid-upload leaves the temp file; the restarted API removes it before it listens,
    while a temp file another live process holds (flock) stays. Its validation processes exit with it."""
    api = F.ApiProcess(genv, tmp_path / "api.log").start()
    state = StateRoot(genv.root)
    held = _incoming(state, "4f1c2d6e-0000-4000-8000-000000000000.part.live.tmp")
    hour = hours.last_complete_hour()
    try:
        token = F.register_agent(genv, "agent-k")
        earlier = hour - timedelta(hours=1)
        done = F.create_transaction(api.port, "agent-k", token, hours.format_hour(earlier))
        archive = tmp_path / "a.tar.gz"
        build_test_archive(str(archive), "agent-k", "geo-test", earlier, sample_rows(earlier))
        data = archive.read_bytes()
        assert F.upload(api.port, "agent-k", token, done.json["transaction_id"], data).status == 200
        assert F.complete(api.port, "agent-k", token, done.json["transaction_id"]).status == 200
        validators = _children(api.proc.pid)
        assert validators  # the spawn workers (and multiprocessing's resource tracker)
        tx = F.create_transaction(api.port, "agent-k", token, hours.format_hour(hour))
        tx = tx.json["transaction_id"]
        exchange = F.RawExchange(api.port)
        exchange.send(F.upload_head(tx, "agent-k", token, 4 << 20, "0" * 64))
        exchange.send(os.urandom(1 << 20))  # more than one write batch: the temp file is on disk
        pattern = os.path.join(sweep.incoming_dir(state), f"{tx}.part.*.tmp")
        temps = F.wait_for(lambda: glob.glob(pattern), what="the upload's temp file")
        with open(held, "rb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            api.kill()
            exchange.close()
            assert all(os.path.exists(t) for t in temps)  # what a killed API leaves behind
            F.wait_for(lambda: not any(map(_running, validators)), what="the validation processes to exit")
            api.start()
            assert not any(os.path.exists(t) for t in temps), api.log()
            assert os.path.exists(held)
        assert "removed 1 stale upload temp files" in api.log()
    finally:
        api.stop()
