"""Failures leave a marker under the hour's state directory, so `ganymede status` sees a
failed hour without asking luigid; a later success of the same task removes it."""
import luigi

from .. import hours, markers
from .agent import state_root


def failure_marker(task):
    hour = getattr(task, "hour", None)
    if hour is None:
        return None
    return state_root().failure_marker(hour, task.task_id)


@luigi.Task.event_handler(luigi.Event.FAILURE)
def record_failure(task, exception):
    path = failure_marker(task)
    if path:
        markers.write_json(path, {"task": task.task_id, "at": hours.now(),
                                  "error": f"{type(exception).__name__}: {exception}"[:2000]})


@luigi.Task.event_handler(luigi.Event.SUCCESS)
def clear_failure(task):
    path = failure_marker(task)
    if path:
        markers.remove(path)
