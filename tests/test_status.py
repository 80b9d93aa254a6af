"""`ganymede status` on a mix of closed, waiting, failed and overdue hours."""
import subprocess
import sys
import os
import re
from datetime import timedelta

import luigi

from ganymede import config, hours, status
from ganymede.paths import StateRoot
from ganymede.stores import txlog
from ganymede.tasks import HourlyBackup
from conftest import completed_transaction

BIN = os.path.dirname(sys.executable)


def test_status_lines_for_a_mix_of_hours(genv, mongo_up, s3_up):
    now_hour = hours.last_complete_hour()
    closed, failed, overdue, waiting = (now_hour - timedelta(hours=h) for h in (8, 7, 6, 0))
    for h in (closed, failed, waiting):
        completed_transaction(genv, "agent-a", h)
    completed_transaction(genv, "agent-b", closed)
    assert luigi.build([HourlyBackup(hour=closed)], local_scheduler=True)
    completed_transaction(genv, "agent-b", failed)
    endpoint = genv.settings["s3"]["endpoint_url"]
    genv.write_config(s3={"endpoint_url": "http://127.0.0.1:9"})  # nothing listens: the backup fails
    assert not luigi.build([HourlyBackup(hour=failed)], local_scheduler=True)
    genv.write_config(s3={"endpoint_url": endpoint})
    with genv.mysql() as conn:
        rows = {r.hour: r for r in status.hours_status(conn, StateRoot(genv.root), overdue - timedelta(hours=2),
                                                       waiting, deadline_minutes=120, overdue_minutes=60)}
    assert rows[closed].verdict == "closed" and rows[closed].backup == "done"
    assert (rows[closed].staged, rows[closed].loaded, rows[closed].extract) == (2, 2, "on time")
    assert rows[failed].verdict == "failed" and rows[failed].failures == ["HourlyBackup"]
    assert rows[failed].loaded == 2 and rows[failed].extract == "on time"
    assert rows[overdue].verdict == "overdue" and rows[overdue].arrived == []
    assert rows[overdue].expected == ["agent-a", "agent-b"]
    assert rows[waiting].verdict == "waiting" and rows[waiting].arrived == ["agent-a"]
    assert "127.0.0.1:9" in rows[failed].reasons["HourlyBackup"]
    assert re.split(r"\s{2,}", rows[closed].line()) == [hours.format_hour(closed), "closed", "agents 2/2", "staged 2/2",
                                                        "loaded 2/2", "extract on time", "backup done"]


def test_status_command_prints_one_line_per_hour(genv):
    genv.write_config(extract={"deadline_minutes": 120})  # the last hour is then before its deadline
    hour = hours.last_complete_hour()
    completed_transaction(genv, "agent-a", hour)
    out = subprocess.run([f"{BIN}/ganymede", "status", "--last", "3"], env=genv.subprocess_env,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == 3
    assert out[0].startswith(hours.format_hour(hour)) and "agents 1/1" in out[0] and "waiting" in out[0]


def test_status_rejects_a_bad_hour_in_one_line(genv):
    result = subprocess.run([f"{BIN}/ganymede", "status", "--hour", "2026-13-01T00"], env=genv.subprocess_env,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "not a UTC hour" in result.stderr


def test_agents_are_counted_as_the_extract_saw_them(genv, mongo_up, s3_up):
    """Agents added afterwards with an earlier --since do not reopen a closed hour; one nobody expected is +1."""
    hour = hours.last_complete_hour() - timedelta(hours=5)
    completed_transaction(genv, "agent-a", hour)
    with genv.mysql() as conn:
        txlog.add_agent(conn, "agent-x", "geo-x")  # expected only from now on, yet it sent the hour
    completed_transaction(genv, "agent-x", hour)
    assert luigi.build([HourlyBackup(hour=hour)], local_scheduler=True)
    with genv.mysql() as conn:
        txlog.add_agent(conn, "agent-late", "geo-l", expected_from=hour - timedelta(hours=1))
        (row,) = status.hours_status(conn, StateRoot(genv.root), hour, hour, 45, 60)
    assert (row.verdict, row.expected, row.unexpected) == ("closed", ["agent-a"], ["agent-x"])
    assert "agents 1/1 +1" in row.line()


def test_an_hour_without_data_delivers_nothing_and_says_no_data(genv, mongo_up, s3_up):
    hour = hours.last_complete_hour() - timedelta(hours=5)
    with genv.mysql() as conn:
        txlog.add_agent(conn, "agent-a", "geo-a", expected_from=hour)
    assert luigi.build([HourlyBackup(hour=hour)], local_scheduler=True)
    assert not os.path.exists(os.path.join(genv.root, "outbox"))
    with genv.mysql() as conn:
        (row,) = status.hours_status(conn, StateRoot(genv.root), hour, hour, 45, 60)
    assert (row.verdict, row.extract, row.backup) == ("no data", "no data", "done")
    assert row.needs_attention()  # agent-a was expected and sent nothing
    genv.write_config(extract={"deliver_empty": "true"})
    other = hour - timedelta(hours=1)
    assert luigi.build([HourlyBackup(hour=other)], local_scheduler=True)
    assert os.listdir(os.path.join(genv.root, "outbox")) == [f"ganymede-{hours.compact(other)}.jsonl.gz"]


def test_status_of_one_hour_names_agents_failures_and_transactions(genv, mongo_up, s3_up):
    hour = hours.last_complete_hour() - timedelta(hours=4)
    good = completed_transaction(genv, "agent-a", hour)
    bad = completed_transaction(genv, "agent-b", hour)
    with genv.mysql() as conn:
        txlog.add_agent(conn, "agent-c", "geo-c", expected_from=hour)
        with conn.cursor() as cur:  # what the load does with an archive it cannot load (tasks/worker.py)
            cur.execute("UPDATE transactions SET state = 'failed', error = 'dataset account_usage: bad row 3' "
                        "WHERE transaction_id = %s", (bad["transaction_id"],))
        conn.commit()
    root = StateRoot(genv.root)
    quarantined = root.quarantine(hour, "agent-b", bad["transaction_id"])
    os.makedirs(os.path.dirname(quarantined))
    os.rename(root.upload(hour, "agent-b", bad["transaction_id"]), quarantined)
    genv.write_config(s3={"endpoint_url": "http://127.0.0.1:9"})
    assert not luigi.build([HourlyBackup(hour=hour)], local_scheduler=True)
    run = subprocess.run([f"{BIN}/ganymede", "status", "--hour", hours.format_hour(hour)], env=genv.subprocess_env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert out.splitlines()[0].startswith(f"{hours.format_hour(hour)}  failed")
    assert "agents expected: agent-a, agent-b, agent-c" in out and "agents missing:  agent-b, agent-c" in out
    assert re.search(r"failed: HourlyBackup: .*127\.0\.0\.1:9", out)
    assert re.search(rf"{good['transaction_id']}\s+agent-a\s+completed\s+upload/", out)
    assert re.search(rf"{bad['transaction_id']}\s+agent-b\s+failed\s+quarantine/.*bad row 3", out)
    assert "taskId=" + HourlyBackup(hour=hour).task_id in out
    alerts = subprocess.run([f"{BIN}/ganymede", "alerts", "--last", "6"], env=genv.subprocess_env,
                            capture_output=True, text=True)
    assert alerts.returncode == 3 and "bad row 3" in alerts.stdout and "failed: HourlyBackup" in alerts.stdout


def test_last_zero_is_a_usage_error(genv):
    result = subprocess.run([f"{BIN}/ganymede", "status", "--last", "0"], env=genv.subprocess_env,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "at least 1" in result.stderr and len(result.stderr.splitlines()) == 1
