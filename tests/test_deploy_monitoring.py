"""deploy/prometheus-rules.yml and deploy/grafana-dashboard.json: valid, and built only on metrics Ganymede exports.

promtool (Debian's `prometheus` package, installed by `make test`) checks the rules and runs their unit
tests; the YAML is also parsed and every metric name checked here.
"""
import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

from ganymede import textfile
from ganymede.api.metrics import ApiMetrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = os.path.join(REPO, "deploy", "prometheus-rules.yml")
DASHBOARD = os.path.join(REPO, "deploy", "grafana-dashboard.json")
BUILTIN = {"time", "increase", "rate", "sum", "by", "histogram_quantile", "le"}


def exported():
    names = {textfile.sample_name(n) for n in textfile.METRICS}
    for family in ApiMetrics().registry.collect():
        names |= {s.name for s in family.samples} | {family.name + suffix for suffix in ("_bucket", "_total")}
    return names


def metric_names(expr):
    return {w for w in re.findall(r"\b(ganymede_[a-z_]+)\b", expr)}


def test_rules_parse_and_use_exported_metrics():
    groups = yaml.safe_load(open(RULES))["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {"GanymedeHourNotClosed", "GanymedeQualityCheckFailed"}
    used = set().union(*(metric_names(r["expr"]) for r in rules))
    assert used and used <= exported()


def test_dashboard_panels_use_exported_metrics():
    dashboard = json.load(open(DASHBOARD))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = set().union(*map(metric_names, exprs))
    assert used <= exported()
    for wanted in ("ganymede_hour_lag_seconds", "ganymede_hour_missing_agents", "ganymede_rows_total",
                   "ganymede_quality_failures_total", "ganymede_api_request_seconds_bucket"):
        assert wanted in used


RULE_TESTS = """
rule_files: [%s]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: ganymede_last_closed_hour_timestamp_seconds
        values: 0x300
      - series: ganymede_hour_deadline_seconds
        values: 2700x300
      - series: 'ganymede_quality_failures_total{dataset="account_usage",check="row_count"}'
        values: 0x60 1x60
    alert_rule_test:
      - eval_time: 200m
        alertname: GanymedeHourNotClosed
        exp_alerts: []
      - eval_time: 220m
        alertname: GanymedeHourNotClosed
        exp_alerts:
          - exp_labels: {severity: page}
            exp_annotations:
              summary: "Ganymede: an hour is not closed by its deadline"
              description: "The hour after the last closed one is past its deadline and not backed up. Run `ganymede alerts`."
      - eval_time: 50m
        alertname: GanymedeQualityCheckFailed
        exp_alerts: []
      - eval_time: 70m
        alertname: GanymedeQualityCheckFailed
        exp_alerts:
          - exp_labels: {severity: ticket, dataset: account_usage, check: row_count}
            exp_annotations:
              summary: "Ganymede: row_count failed for account_usage"
              description: "A data-quality check failed in the last hour's extract. `ganymede alerts` names the agent, observed vs expected."
"""


def test_promtool_checks_the_rules_and_their_unit_tests(tmp_path):
    if not shutil.which("promtool"):
        pytest.fail("promtool is not installed: run make promtool (apt-get install prometheus)", pytrace=False)
    check = subprocess.run(["promtool", "check", "rules", RULES], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    (tmp_path / "rules_test.yml").write_text(RULE_TESTS % json.dumps(RULES))
    run = subprocess.run(["promtool", "test", "rules", str(tmp_path / "rules_test.yml")], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout + run.stderr
