"""Every line of cron/*.crontab, executed as cron executes it, against the test services.

Cron gives a command an environment of its own (HOME, LOGNAME, SHELL=/bin/sh,
PATH=/usr/bin:/bin, then the crontab's assignments), runs it with $SHELL -c,
turns an unescaped `%` into a newline (what follows is stdin) and `\\%` into
`%`. The production paths of the crontabs (/opt/…/venv/bin, /etc/ganymede,
/var/log/…) are mapped onto this test's world; nothing else is changed.
"""
import os
import re
import sys
from datetime import timedelta

import luigi
import pytest

from ganymede import generator, hours
from ganymede.paths import StateRoot
from ganymede.stores import txlog
from ganymede.tasks import HourlyBackup
from conftest import completed_transaction
from test_operations import luigid  # noqa: F401  (a luigid with deploy/luigid.cfg)

import subprocess

BIN = os.path.dirname(sys.executable)
CRON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cron")
LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (\S+) (.+): (.+) \(exit (\d+), \d+\.\d s\)$")


def crontab(name):
    """(environment assignments, [(five time fields, command)]) of one crontab file."""
    assignments, entries = {}, []
    for line in open(os.path.join(CRON, name)):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"^([A-Z_]+)=(.*)$", line)
        if match:
            assignments[match.group(1)] = match.group(2)
        else:
            *fields, command = line.split(None, 5)
            entries.append((fields, command))
    return assignments, entries


def cron_command(command):
    """Cron's `%` rules: (the command for the shell, its stdin)."""
    parts = re.split(r"(?<!\\)%", command)
    return parts[0].replace("\\%", "%"), "\n".join(p.replace("\\%", "%") for p in parts[1:])


def run_cron_line(name, match, world, tmp_path):
    """Run the crontab line of `name` whose command contains `match`, as cron would; returns the result."""
    assignments, entries = crontab(name)
    (command,) = [c for _, c in entries if match in c]
    mapping = {"/opt/ganymede/venv/bin": BIN, "/opt/ganymede-agent/bin": BIN,
               "/var/log/ganymede-agent": str(tmp_path / "log-agent"), "/var/log/ganymede": str(tmp_path / "log"),
               "/etc/ganymede/luigi.cfg": world.config_path, "/etc/ganymede/agent.cfg": str(tmp_path / "agent.cfg")}
    env = {"HOME": str(world.home), "LOGNAME": "ganymede", "SHELL": "/bin/sh", "PATH": "/usr/bin:/bin",
           "TZ": "Asia/Kolkata"}  # a machine zone that is not UTC: every hour the commands pick must still be UTC
    for key, value in assignments.items():
        for old, new in mapping.items():
            value = value.replace(old, new)
        env[key] = value
    if "PYTHONPATH" in os.environ:  # the code under test when it is not the installed one (a worktree)
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    for old, new in mapping.items():
        command = command.replace(old, new)
    os.makedirs(tmp_path / "log", exist_ok=True)
    os.makedirs(tmp_path / "log-agent", exist_ok=True)
    shell_command, stdin = cron_command(command)
    return subprocess.run([env["SHELL"], "-c", shell_command], input=stdin, env=env, cwd=world.home,
                          capture_output=True, text=True, timeout=600)


def log_lines(path):
    return open(path).read().splitlines()


@pytest.fixture
def world(genv, luigid, mongo_up, s3_up):  # noqa: F811
    genv.write_config(core={"scheduler_host": "127.0.0.1", "scheduler_port": luigid[0]},
                      extract={"deadline_minutes": 0})
    return genv


def test_cron_percent_rules():
    assert cron_command(r"date +\%H") == ("date +%H", "")
    assert cron_command(r"cat %one%two \%") == ("cat ", "one\ntwo %")


def test_every_crontab_line_is_tested_here():
    """A new crontab line needs its own run below."""
    commands = [c for name in ("ganymede.crontab", "stats.crontab") for _, c in crontab(name)[1]]
    assert len(commands) == 4
    assert sum("ganymede-hourly-backup --workers" in c for c in commands) == 1
    assert sum("--catch-up 48" in c for c in commands) == 1
    assert sum("ganymede alerts" in c for c in commands) == 1
    assert sum(c.startswith("ganymede-agent") for c in commands) == 1


def test_hourly_line_closes_the_last_complete_hour(world, tmp_path):
    hour = hours.last_complete_hour()
    completed_transaction(world, "agent-a", hour)
    result = run_cron_line("ganymede.crontab", "--workers 2 >> /var/log/ganymede/hourly.log", world, tmp_path)
    assert result.returncode == 0, log_lines(tmp_path / "log" / "hourly.log")
    assert os.path.exists(StateRoot(world.root).hour_marker(hour, "backup"))
    (line,) = log_lines(tmp_path / "log" / "hourly.log")
    assert LINE.match(line).groups() == ("ganymede-hourly-backup", f"hour {hours.format_hour(hour)}",
                                         "done, hour closed", "0"), line
    details = open(os.path.join(world.root, "log", "ganymede.log")).read()
    assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ luigi-interface\[\d+\] INFO: ", details, re.M)


@pytest.mark.slow
def test_catch_up_line_runs_exactly_the_missing_closed_hours(world, tmp_path):
    last = hours.last_complete_hour()
    done, sent, silent, newest = (last - timedelta(hours=h) for h in (3, 2, 1, 0))
    current = last + timedelta(hours=1)
    with world.mysql() as conn:
        txlog.add_agent(conn, "agent-a", "geo-a", expected_from=done)  # earlier hours expect nobody: idle
    for h in (done, sent, newest, current):
        completed_transaction(world, "agent-a", h)
    assert luigi.build([HourlyBackup(hour=done)], local_scheduler=True)
    root = StateRoot(world.root)
    before = os.path.getmtime(root.hour_marker(done, "backup"))

    result = run_cron_line("ganymede.crontab", "--catch-up 48", world, tmp_path)

    (line,) = log_lines(tmp_path / "log" / "catchup.log")
    assert result.returncode == 0, line
    prog, what, words, code = LINE.match(line).groups()
    assert (prog, what, code) == ("ganymede-hourly-backup", "catch-up 48 h", "0")
    assert [w.split()[0] for w in words.split("; ")] == [hours.format_hour(h) for h in (sent, silent, newest)]
    assert all(os.path.exists(root.hour_marker(h, "backup")) for h in (sent, silent, newest))
    assert os.path.getmtime(root.hour_marker(done, "backup")) == before
    assert not os.path.exists(root.hour_state(current))
    assert not os.path.exists(root.hour_state(done - timedelta(hours=1)))  # idle: nothing run
    again = run_cron_line("ganymede.crontab", "--catch-up 48", world, tmp_path)
    assert again.returncode == 0 and log_lines(tmp_path / "log" / "catchup.log")[-1].split(": ", 1)[1].startswith(
        "nothing to run")


def test_alerts_line_reports_an_overdue_hour(world, tmp_path):
    hour = hours.last_complete_hour() - timedelta(hours=5)
    with world.mysql() as conn:
        txlog.add_agent(conn, "agent-a", "geo-a", expected_from=hour)
    result = run_cron_line("ganymede.crontab", "ganymede alerts", world, tmp_path)
    out = log_lines(tmp_path / "log" / "alerts.log")
    assert result.returncode == 3, out
    # overdue: the 5 hours from `hour` on that ended more than [alerts] overdue_minutes (60) past their deadline
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ganymede alerts: 5 hour\(s\) need attention \(exit 3\)$", out[0])
    assert any(line.startswith(f"{hours.format_hour(hour)}  overdue") for line in out)
    assert "  agents missing:  agent-a" in out


def test_stats_line_sends_the_last_complete_hour(genv, api_server, tmp_path):
    hour = hours.last_complete_hour()
    database = f"gtest_geo_{genv.tag}"
    with genv.mysql() as conn:
        token = txlog.add_agent(conn, "geo-1", "eu-west", expected_from=hour)
    try:
        with generator.create_database(database) as conn:
            generator.generate_hour(conn, hour, accounts=20, seed=1)
        generator.write_agent_config(tmp_path / "agent.cfg", api_url=api_server, agent_id="geo-1", token=token,
                                     geo="eu-west", database=database, spool_dir=str(tmp_path / "spool"))
        result = run_cron_line("stats.crontab", "ganymede-agent", genv, tmp_path)
    finally:
        generator.drop_database(database)
    assert result.returncode == 0, open(tmp_path / "log-agent" / "agent.log").read()[-2000:]
    with genv.mysql() as conn:
        (tx,) = txlog.hour_transactions(conn, hour)
    assert tx["agent_id"] == "geo-1"
