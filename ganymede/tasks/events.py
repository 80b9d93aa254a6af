"""Luigi event handlers: a failure leaves a marker in the hour's state directory (`ganymede status` sees it
without luigid) until the task succeeds; every run's outcome, duration and facts go to the metrics textfile."""
import calendar
from datetime import timedelta

import luigi

from .. import config, hours, markers, textfile
from .agent import state_root


def failure_marker(task):
    hour = getattr(task, "hour", None)
    return None if hour is None else state_root().failure_marker(hour, task.task_id)


def textfile_path():
    return config.metrics().textfile or state_root().metrics_textfile()


@luigi.Task.event_handler(luigi.Event.FAILURE)
def record_failure(task, exception):
    path = failure_marker(task)
    if path:
        markers.write_json(path, {"task": task.task_id, "at": hours.now(),
                                  "error": f"{type(exception).__name__}: {exception}"[:2000]})
    textfile.update(textfile_path(), inc=[("ganymede_task_runs", {"family": task.task_family, "outcome": "failure"}, 1)])


@luigi.Task.event_handler(luigi.Event.SUCCESS)
def clear_failure(task):
    path = failure_marker(task)
    if path:
        markers.remove(path)


@luigi.Task.event_handler(luigi.Event.PROCESSING_TIME)
def record_run(task, seconds):
    """A successful run (Luigi reports the time just before SUCCESS): its outcome, duration and what it did."""
    inc, set_ = FACTS.get(task.task_family, lambda task: ([], []))(task)
    textfile.update(textfile_path(), set_=set_, inc=[
        ("ganymede_task_runs", {"family": task.task_family, "outcome": "success"}, 1),
        ("ganymede_task_seconds", {"family": task.task_family}, seconds), *inc])


def load_facts(task):
    counts = markers.read_json(task.output().path).get("counts", {})
    return [("ganymede_rows", {"dataset": name, "outcome": outcome}, c[outcome])
            for name, c in sorted(counts.items()) for outcome in ("loaded", "rejected")], []


def extract_facts(task):
    manifest = markers.read_json(task.output().path)
    inc = []
    for r in manifest.get("quality", []):
        labels = {"dataset": r["dataset"], "check": r["check"]}
        inc += [("ganymede_quality_checks", labels, 1), ("ganymede_quality_failures", labels, 0 if r["passed"] else 1)]
    set_ = [("ganymede_hour_missing_agents", {}, len(manifest.get("missing_agents", [])))] if task.round == 0 else []
    return inc, set_


def backup_facts(task):
    end = hours.floor_hour(task.hour) + timedelta(hours=1)
    lag = (hours.now() - end).total_seconds()
    return [], [("ganymede_hour_lag_seconds", {}, lag),
                ("ganymede_last_closed_hour_timestamp_seconds", {}, calendar.timegm(task.hour.timetuple())),
                ("ganymede_hour_deadline_seconds", {}, config.extract().deadline_minutes * 60)]


FACTS = {"LoadTransaction": load_facts, "GlassbeamExtract": extract_facts, "HourlyBackup": backup_facts}
