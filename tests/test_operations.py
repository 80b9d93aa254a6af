"""Operating it: RangeHourly catch-up, luigid's graph/history/metrics, and the crontab lines."""
import json
import os
import re
import shlex
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from datetime import timedelta

import luigi
import pytest
from luigi.cmdline_parser import CmdlineParser
from luigi.tools.range import RangeHourly

from ganymede import hours
from ganymede.paths import StateRoot
from ganymede.tasks import HourlyBackup
from conftest import completed_transaction, free_port

BIN = os.path.dirname(sys.executable)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_range_hourly_over_48_hours_reruns_only_the_3_failed(genv, mongo_up, s3_up):
    last = hours.last_complete_hour() - timedelta(days=3)
    all_hours = list(hours.hours_between(last - timedelta(hours=47), last))
    failed = {all_hours[5], all_hours[20], all_hours[41]}
    for h in all_hours:
        completed_transaction(genv, "agent-a", h, rows={"account_usage": [["acct-1", 1, 1, 1, 1, 1]]})
    assert luigi.build([HourlyBackup(hour=h) for h in all_hours if h not in failed], local_scheduler=True, workers=2)
    endpoint = genv.settings["s3"]["endpoint_url"]
    genv.write_config(s3={"endpoint_url": "http://127.0.0.1:9"})  # nothing listens there: these backups fail
    assert not luigi.build([HourlyBackup(hour=h) for h in failed], local_scheduler=True)
    genv.write_config(s3={"endpoint_url": endpoint})
    root = StateRoot(genv.root)
    assert [h for h in all_hours if not os.path.exists(root.hour_marker(h, "backup"))] == sorted(failed)
    before = {h: os.path.getmtime(root.hour_marker(h, "backup")) for h in all_hours if h not in failed}

    result = luigi.build([RangeHourly(of=HourlyBackup, start=all_hours[0], stop=last + timedelta(hours=1))],
                         local_scheduler=True, detailed_summary=True)

    assert result.status.name == "SUCCESS", result.summary_text
    assert "3 HourlyBackup" in result.summary_text
    assert all(os.path.exists(root.hour_marker(h, "backup")) for h in all_hours)
    assert {h: os.path.getmtime(root.hour_marker(h, "backup")) for h in before} == before


@pytest.fixture
def luigid(tmp_path):
    """A luigid with deploy/luigid.cfg (paths moved into tmp_path): history, metrics, remove_delay."""
    cfg = open(os.path.join(REPO, "deploy", "luigid.cfg")).read()
    cfg = cfg.replace("/var/lib/ganymede/luigid", str(tmp_path / "luigid"))
    os.makedirs(tmp_path / "luigid")
    (tmp_path / "luigid.cfg").write_text(cfg)
    port = free_port()
    proc = subprocess.Popen([f"{BIN}/luigid", "--address", "127.0.0.1", "--port", str(port),
                             "--logdir", str(tmp_path / "luigid"), "--state-path", str(tmp_path / "luigid" / "state")],
                            env=dict(os.environ, LUIGI_CONFIG_PATH=str(tmp_path / "luigid.cfg")), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "luigid.err", "wb"))
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/task_list?data={{}}", timeout=1)
            break
        except OSError:
            assert proc.poll() is None, (tmp_path / "luigid.err").read_text()
            time.sleep(0.1)
    yield port, tmp_path / "luigid"
    proc.terminate()
    proc.wait(10)


def luigid_api(port, method, **data):
    query = urllib.parse.urlencode({"data": json.dumps(data)})
    return json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/{method}?{query}", timeout=5))["response"]


def test_luigid_shows_the_hour_graph_and_records_history(genv, luigid, mongo_up, s3_up):
    port, state = luigid
    hour = hours.last_complete_hour() - timedelta(days=2, hours=7)
    tx = completed_transaction(genv, "agent-a", hour)
    run = subprocess.run([f"{BIN}/luigi", "--module", "ganymede.tasks", "HourlyBackup", "--hour",
                          hours.format_hour(hour), "--scheduler-host", "127.0.0.1", "--scheduler-port", str(port)],
                         env=genv.subprocess_env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    top = HourlyBackup(hour=hour).task_id
    graph = luigid_api(port, "dep_graph", task_id=top, include_done=True)
    families = {t["name"] for t in graph.values()}
    # completed long after its deadline, the hour's extract also went through ExtractTimeout
    assert families == {"AgentArchive", "StageTransaction", "LoadTransaction", "ExtractDeadline", "ExtractTimeout",
                        "GlassbeamExtract", "DumpSchema", "HourlyBackup"}
    assert all(t["status"] == "DONE" for t in graph.values())
    assert any(t["params"].get("transaction_id") == tx["transaction_id"] for t in graph.values())
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "luigi_task_done_total" in metrics or "luigi_task" in metrics
    with sqlite3.connect(state / "task-history.db") as db:
        names = {r[0] for r in db.execute("SELECT name FROM tasks")}
    assert "HourlyBackup" in names


def crontab_entries(path):
    for line in open(path):
        line = line.strip()
        if not line or line.startswith("#") or re.match(r"^[A-Z_]+=", line):
            continue
        yield line.split(None, 5)


FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\d+(-\d+)?))*$")


@pytest.mark.parametrize("crontab", ["ganymede.crontab", "stats.crontab"])
def test_crontab_lines_parse_and_their_commands_exist(crontab, genv):
    entries = list(crontab_entries(os.path.join(REPO, "cron", crontab)))
    assert entries
    for *fields, command in entries:
        assert len(fields) == 5 and all(FIELD.match(f) for f in fields), fields
        if crontab == "stats.crontab" and fields and command.split()[0] == "stats":
            command = command.split(None, 1)[1]
        expanded = expand_date(command.replace("\\%", "%"))
        argv = shlex.split(expanded.split(">>")[0])
        assert os.path.exists(os.path.join(BIN, argv[0])), f"{argv[0]} is not installed"
        if argv[0] == "luigi":
            with CmdlineParser.global_instance(argv[3:] if argv[1] == "--module" else argv[1:]) as parser:
                task = parser.get_task_obj()
            assert task.task_family in ("HourlyBackup", "RangeHourly")
        else:
            subprocess.run([os.path.join(BIN, argv[0]), "--help"], check=True, capture_output=True)


def expand_date(command):
    """Run each $(date …) of a crontab line as the shell would, in UTC."""
    return re.sub(r"\$\((date [^)]*)\)",
                  lambda m: subprocess.run(m.group(1), shell=True, capture_output=True, text=True,
                                           env=dict(os.environ, TZ="UTC"), check=True).stdout.strip(), command)


def test_crontab_hour_is_the_last_complete_utc_hour():
    line = next(c for *_, c in crontab_entries(os.path.join(REPO, "cron", "ganymede.crontab")) if "HourlyBackup" in c
                and "RangeHourly" not in c)
    hour = re.search(r"--hour (\S+)", expand_date(line.replace("\\%", "%"))).group(1)
    assert hours.parse_hour(hour) in (hours.last_complete_hour(), hours.last_complete_hour() - timedelta(hours=1))
