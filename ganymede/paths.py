"""The state-root layout in one place: hour-stamped paths (…/YYYY/MM/DD/HH/…) so a range of hours is checked by
paths alone."""
import glob
import os
import re
from functools import partialmethod

from . import hours

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_id(value, what="id"):
    """Agent ids and transaction ids become path parts: allow nothing that can escape."""
    if not isinstance(value, str) or not _SAFE_ID.match(value) or ".." in value:
        raise ValueError(f"invalid {what}: {value!r}")
    return value


def hour_dir(hour):
    return hours.floor_hour(hour).strftime("%Y/%m/%d/%H")


class StateRoot:
    """Paths and glob patterns under one state root; nothing here touches the disk."""

    def __init__(self, root):
        self.root = os.path.abspath(os.path.expanduser(root))

    def _join(self, *parts):
        return os.path.join(self.root, *parts)

    def incoming(self, transaction_id):
        return self._join("incoming", check_id(transaction_id, "transaction id") + ".part")

    def _archive(self, area, hour, agent_id, transaction_id):
        return self._join(area, hour_dir(hour), check_id(agent_id, "agent id"),
                          check_id(transaction_id, "transaction id") + ".tar.gz")

    upload = partialmethod(_archive, "upload")
    archived = partialmethod(_archive, "archives")
    quarantine = partialmethod(_archive, "quarantine")

    def transaction_marker(self, hour, agent_id, transaction_id, stage):
        return self._join("state", hour_dir(hour), check_id(agent_id, "agent id"),
                          f"{check_id(transaction_id, 'transaction id')}.{stage}.json")

    def hour_state(self, hour):
        return self._join("state", hour_dir(hour))

    def hour_marker(self, hour, stage):
        return os.path.join(self.hour_state(hour), f"{stage}.json")

    def failure_marker(self, hour, task_id):
        """A task of the hour failed (removed when it later succeeds)."""
        return os.path.join(self.hour_state(hour), "failures", f"{task_id}.json")

    def failure_markers_glob(self, hour):
        return os.path.join(glob.escape(self.hour_state(hour)), "failures", "*.json")

    def extract(self, hour, part=0):
        """extracts/YYYY/MM/DD/ganymede-YYYYMMDDHH.jsonl.gz; part N>0 is the Nth supplementary extract."""
        name = f"ganymede-{hours.compact(hour)}{'' if part == 0 else f'-s{part}'}.jsonl.gz"
        return self._join("extracts", os.path.dirname(hour_dir(hour)), name)

    def extract_manifest(self, hour, part=0):
        return self.extract(hour, part)[: -len(".jsonl.gz")] + ".manifest.json"

    def extract_manifests_glob(self, hour):
        return glob.escape(self.extract_manifest(hour)[: -len(".manifest.json")]) + "*.manifest.json"

    def backup_dump(self, hour, part=0):
        return self._join("backup", hour_dir(hour), "ganymede.sql.gz" if part == 0 else f"ganymede-s{part}.sql.gz")

    def hour_uploads(self, hour):
        return self._join("upload", hour_dir(hour))

    def hour_uploads_glob(self, hour):
        return os.path.join(glob.escape(self.hour_uploads(hour)), "*", "*.tar.gz")

    def hour_lock(self, hour):
        """Held (flock) by the run that works on the hour."""
        return self._join("locks", hour_dir(hour) + ".lock")

    def hour_work_dirs(self, hour):
        """The directories only the hour's own runs write into (a crash's .tmp-* files there are the hour's)."""
        return [self.hour_state(hour), os.path.dirname(self.backup_dump(hour))]

    def day_extracts(self, hour):
        return os.path.dirname(self.extract(hour))

    def metrics_textfile(self):
        return self._join("metrics", "ganymede.prom")

    def tmp(self):
        return self._join("tmp")
