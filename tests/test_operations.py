"""Operating it: RangeHourly backfills, luigid's graph/history/metrics (the crontab lines: test_cron.py)."""
import json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from datetime import timedelta

import luigi
import pytest
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
