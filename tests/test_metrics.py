"""Prometheus metrics: ganymede-api's /metrics after an hour's uploads, and the pipeline's textfile."""
import calendar
import http.client
import os
import subprocess
import sys
import time
import urllib.request
from datetime import timedelta

import luigi
from prometheus_client.parser import text_string_to_metric_families

from ganymede import hours, textfile
from ganymede.api.metrics import reason_label
from ganymede.paths import StateRoot
from ganymede.tasks import HourlyBackup
from conftest import completed_transaction, free_port, sample_rows
from test_api import world  # noqa: F401  (the fixture: the real app on a real port)

BIN = os.path.dirname(sys.executable)


def scrape(port, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/metrics", headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8")
    finally:
        conn.close()


def samples(text):
    """{(sample name, frozenset of labels): value} as prometheus_client's parser reads the exposition."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_uploads_bytes_latency_refusals_and_open_transactions(world):  # noqa: F811
    agent = world.agent()
    data = agent.archive()
    tx, done = agent.send(data)
    assert done.status == 200
    agent.create(hour=world.hour.replace(year=world.hour.year - 1))  # 422: older than the retention
    left_open = world.agent()
    assert left_open.create().status == 201
    assert world.call("GET", "/v1/hours/2026-11-30T05/roster", None, {"Authorization": "Bearer nope"}).status == 401

    status, _ = scrape(world.port)
    assert status == 401
    status, text = scrape(world.port, world.admin_headers())
    assert status == 200
    got = samples(text)
    who = frozenset({("agent", agent.agent_id)})
    assert got[("ganymede_api_uploads_total", who)] == 1
    assert got[("ganymede_api_upload_bytes_total", who)] == len(data)
    assert got[("ganymede_api_request_seconds_count", frozenset({("endpoint", "Archive"), ("method", "PUT")}))] == 1
    assert got[("ganymede_api_request_seconds_count", frozenset({("endpoint", "Complete"), ("method", "POST")}))] == 1
    assert got[("ganymede_api_refusals_total", frozenset({("reason", "401 not an admin token")}))] == 1
    assert got[("ganymede_api_refusals_total", frozenset({("reason", "401 missing bearer token")}))] == 1
    assert got[("ganymede_api_refusals_total",
                frozenset({("reason", "422 hour N is older than the retention of N hours")}))] == 1
    assert got[("ganymede_api_open_transactions", frozenset())] == 1
    assert got[("ganymede_api_disk_free_bytes", frozenset())] > 0


def test_refusal_reasons_hold_no_request_data():
    assert reason_label(400, "count: not an integer: '1.5e999999'") == "400 count: not an integer: N"
    assert reason_label(404, "no such transaction 0b7c4b1e-5a7d-4b8e-9d0c-2f1e3d4c5b6a") == "404 no such transaction N"
    assert len(reason_label(400, "x" * 1000)) == 100


def test_metrics_address_serves_metrics_without_credentials(genv):
    port = free_port()
    genv.write_config(api={"metrics_address": f"127.0.0.1:{port}"})
    log_path = genv.root + "-api.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([f"{BIN}/ganymede-api"], env=genv.subprocess_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(150):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{genv.api_port}/healthz", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, open(log_path).read()
                time.sleep(0.1)
        status, text = scrape(port)
        assert status == 200 and ("ganymede_api_open_transactions", frozenset()) in samples(text)
        assert scrape(genv.api_port)[0] == 401  # the API's own address still wants the admin token
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_bad_metrics_address_is_one_line(genv):
    genv.write_config(api={"metrics_address": "nowhere"})
    result = subprocess.run([f"{BIN}/ganymede-api"], env=genv.subprocess_env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and "metrics_address must be host:port" in result.stderr
    assert "Traceback" not in result.stderr


def test_textfile_updates_add_up_and_parse():
    import tempfile
    path = os.path.join(tempfile.mkdtemp(), "m", "ganymede.prom")
    labels = {"family": "X", "outcome": "success"}
    textfile.update(path, inc=[("ganymede_task_runs", labels, 1)], set_=[("ganymede_hour_lag_seconds", {}, 5)])
    textfile.update(path, inc=[("ganymede_task_runs", labels, 2)], set_=[("ganymede_hour_lag_seconds", {}, 7)])
    got = samples(open(path).read())
    assert got[("ganymede_task_runs_total", frozenset(labels.items()))] == 3
    assert got[("ganymede_hour_lag_seconds", frozenset())] == 7


def test_the_pipeline_textfile_after_an_hour(genv, mongo_up, s3_up):
    hour = hours.last_complete_hour() - timedelta(hours=3)
    for agent in ("agent-a", "agent-b"):
        completed_transaction(genv, agent, hour, rows=sample_rows(hour, n=6, agent_tag=agent))
    assert luigi.build([HourlyBackup(hour=hour)], local_scheduler=True)
    text = open(StateRoot(genv.root).metrics_textfile()).read()
    got = samples(text)
    ok = lambda family: frozenset({("family", family), ("outcome", "success")})  # noqa: E731
    assert got[("ganymede_task_runs_total", ok("LoadTransaction"))] == 2
    assert got[("ganymede_task_runs_total", ok("HourlyBackup"))] == 1
    assert got[("ganymede_task_seconds_total", frozenset({("family", "GlassbeamExtract")}))] > 0
    assert got[("ganymede_rows_total", frozenset({("dataset", "node_health"), ("outcome", "loaded")}))] == 12
    assert got[("ganymede_rows_total", frozenset({("dataset", "node_health"), ("outcome", "rejected")}))] == 0
    row_count = frozenset({("dataset", "account_usage"), ("check", "row_count")})
    assert got[("ganymede_quality_checks_total", row_count)] == 2
    assert got[("ganymede_quality_failures_total", row_count)] == 0
    assert got[("ganymede_last_closed_hour_timestamp_seconds", frozenset())] == calendar.timegm(hour.timetuple())
    assert got[("ganymede_hour_lag_seconds", frozenset())] > 3 * 3600
    assert got[("ganymede_hour_missing_agents", frozenset())] == 0
