"""The pipeline's Prometheus metrics, as a file for node_exporter's textfile collector.

Each cron-started run lives for minutes (nothing to scrape), and a Pushgateway would keep a dead run's values
as if current. So every Luigi event that changes a figure rewrites the file atomically under a lock:
concurrent runs add up and the collector never reads half a file. Counters only grow; gauges hold the latest.
"""
import fcntl
import os

import luigi
from prometheus_client.parser import text_string_to_metric_families

# name: (type, help); a counter's samples are written as <name>_total
METRICS = {
    "ganymede_task_runs": ("counter", "Task runs by family and outcome (success, failure)"),
    "ganymede_task_seconds": ("counter", "Seconds spent in successful task runs, by family"),
    "ganymede_rows": ("counter", "Rows loaded or rejected, by dataset and outcome"),
    "ganymede_quality_failures": ("counter", "Failed data-quality checks, by dataset and check"),
    "ganymede_quality_checks": ("counter", "Data-quality checks evaluated, by dataset and check"),
    "ganymede_hour_lag_seconds": ("gauge", "Seconds from the end of the last backed-up hour to its backup"),
    "ganymede_last_closed_hour_timestamp_seconds": ("gauge", "Start (Unix time) of the newest hour backed up"),
    "ganymede_hour_deadline_seconds": ("gauge", "Seconds after an hour ends that its extract waits for agents"),
    "ganymede_hour_missing_agents": ("gauge", "Expected agents missing from the newest hour's extract"),
}


def sample_name(name):
    return f"{name}_total" if METRICS[name][0] == "counter" else name


def read(text):
    """{(metric, labels as sorted tuple): value} from the file's text (unknown metrics are dropped)."""
    names = {sample_name(name): name for name in METRICS}
    return {(names[s.name], tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples if s.name in names}


def _escape(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(values):
    lines = []
    for name, (kind, help_) in METRICS.items():
        samples = sorted((labels, v) for (n, labels), v in values.items() if n == name)
        if not samples:
            continue
        sample = sample_name(name)
        lines += [f"# HELP {sample} {help_}", f"# TYPE {sample} {kind}"]
        for labels, value in samples:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(f"{sample}{{{text}}} {value!r}" if text else f"{sample} {value!r}")
    return "\n".join(lines) + "\n"


def update(path, inc=(), set_=()):
    """Add to counters and set gauges: each item (metric, {label: value}, number)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(path, encoding="utf-8") as f:
                values = read(f.read())
        except (FileNotFoundError, ValueError):
            values = {}
        for name, labels, value in inc:
            key = (name, tuple(sorted(labels.items())))
            values[key] = values.get(key, 0.0) + value
        for name, labels, value in set_:
            values[(name, tuple(sorted(labels.items())))] = float(value)
        # atomic (temp file + rename), not fsync'd: a figure lost in a crash is not worth a sync per task
        with luigi.LocalTarget(path, format=luigi.format.UTF8).open("w") as f:
            f.write(render(values))
