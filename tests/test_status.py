"""`ganymede status` on a mix of closed, waiting, failed and overdue hours."""
import subprocess
import sys
import os
from datetime import timedelta

import luigi

from ganymede import config, hours, status
from ganymede.paths import StateRoot
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
    assert "agents 2/2  staged 2/2  loaded 2/2  extract on time" in rows[closed].line()


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
