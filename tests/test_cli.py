"""`ganymede` admin commands, run as an operator would, against the real MariaDB."""
import os
import subprocess
import sys

import pytest

from ganymede.stores import mysql, txlog

BIN = os.path.dirname(sys.executable)


def ganymede(genv, *args):
    return subprocess.run([f"{BIN}/ganymede", *args], env=genv.subprocess_env, capture_output=True, text=True,
                          timeout=60)


def test_db_upgrade_is_idempotent_and_recorded(genv):
    first = ganymede(genv, "db", "upgrade")
    assert first.returncode == 0 and "nothing to do" in first.stdout  # genv already migrated
    with genv.mysql() as conn:
        assert mysql.check_schema(conn) == mysql.LATEST
        with conn.cursor() as cur:
            cur.execute("SELECT version FROM schema_version ORDER BY version")
            assert [r[0] for r in cur.fetchall()] == [v for v, _, _ in mysql.MIGRATIONS]


def test_agents_add_list_revoke(genv):
    added = ganymede(genv, "agents", "add", "geo-eu-1", "--geo", "eu-west")
    assert added.returncode == 0
    token = added.stdout.strip().splitlines()[-1]
    assert len(token) >= 40
    with genv.mysql() as conn:
        assert txlog.authenticate(conn, "geo-eu-1", token)["geo"] == "eu-west"
        with conn.cursor() as cur:
            cur.execute("SELECT token_hash FROM agents WHERE agent_id = 'geo-eu-1'")
            assert cur.fetchone()[0] == txlog.hash_token(token) != token
    listed = ganymede(genv, "agents", "list")
    assert listed.returncode == 0 and "geo-eu-1" in listed.stdout and "active" in listed.stdout
    assert token not in listed.stdout
    revoked = ganymede(genv, "agents", "revoke", "geo-eu-1")
    assert revoked.returncode == 0
    assert "revoked" in ganymede(genv, "agents", "list").stdout
    with genv.mysql() as conn:
        assert txlog.authenticate(conn, "geo-eu-1", token) is None


@pytest.mark.parametrize("args, message", [
    (("agents", "revoke", "nobody"), "no agent 'nobody'"),
    (("agents", "add", "geo-x", "--geo", "g", "--since", "yesterday"), "not a UTC hour"),
    (("status", "--hour", "2026-11-30T25"), "not a UTC hour"),
])
def test_bad_input_is_one_line_and_non_zero(genv, args, message):
    result = ganymede(genv, *args)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_adding_an_agent_twice_is_refused(genv):
    assert ganymede(genv, "agents", "add", "geo-x", "--geo", "g").returncode == 0
    again = ganymede(genv, "agents", "add", "geo-x", "--geo", "g")
    assert again.returncode == 1 and "already exists" in again.stderr and "Traceback" not in again.stderr


def test_mysql_down_is_a_clear_one_line_error(genv):
    genv.write_config(mysql={"port": "9"})
    result = ganymede(genv, "agents", "list")
    assert result.returncode == 1 and "unreachable" in result.stderr and "Traceback" not in result.stderr


def test_admin_token_is_printed_once_and_works(genv):
    result = ganymede(genv, "admin-token", "ops")
    token = result.stdout.strip().splitlines()[-1]
    with genv.mysql() as conn:
        assert txlog.authenticate_admin(conn, token) and not txlog.authenticate_admin(conn, token + "x")


def test_transactions_of_an_hour_with_where_their_archives_are_now(genv, mongo_up, s3_up):
    import luigi
    from datetime import datetime
    from conftest import completed_transaction
    from ganymede.tasks import HourlyBackup
    hour = datetime(2026, 11, 30, 5)
    first = completed_transaction(genv, "agent-a", hour)
    assert luigi.build([HourlyBackup(hour=hour)], local_scheduler=True)  # moves the archive to archives/
    late = completed_transaction(genv, "agent-b", hour)
    result = ganymede(genv, "transactions", "--hour", "2026-11-30T05")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{first['transaction_id']}  agent-a               completed   "
        f"archives/2026/11/30/05/agent-a/{first['transaction_id']}.tar.gz",
        f"{late['transaction_id']}  agent-b               completed   "
        f"upload/2026/11/30/05/agent-b/{late['transaction_id']}.tar.gz"]
    empty = ganymede(genv, "transactions", "--hour", "2026-11-30T06")
    assert empty.returncode == 0 and empty.stdout == "no transaction for 2026-11-30T06\n"
