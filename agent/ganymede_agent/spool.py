"""The spool: archives waiting for the API (docs/agent.md); every write is fsynced and renamed into place."""
import fcntl
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from datetime import datetime, timezone

from .archive import fsync_path

log = logging.getLogger("ganymede_agent")

_ARCHIVE = re.compile(r"^(\d{10})\.tar\.gz$")
_HISTORY = 50  # dropped hours remembered in state.json


class SpoolLocked(Exception):
    """Another run holds the spool's lock."""


class SpoolError(Exception):
    """The spool cannot be used (wrong owner agent, unwritable directory)."""


def hour_key(hour):
    """'2026-11-30T05' -> '2026113005', the archive's file stem."""
    return hour.replace("-", "").replace("T", "")


class Spool:
    def __init__(self, directory, agent_id, max_bytes):
        self.dir = os.path.abspath(directory)
        self.rejected_dir = os.path.join(self.dir, "rejected")
        self.agent_id, self.max_bytes = agent_id, max_bytes
        self.state_path = os.path.join(self.dir, "state.json")

    @contextmanager
    def locked(self):
        """Hold the spool's lock for the block; SpoolLocked if another run has it."""
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            os.makedirs(self.rejected_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"cannot create spool directory {self.dir}: {exc.strerror}") from None
        path = os.path.join(self.dir, "lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SpoolError(f"cannot open {path}: {exc.strerror}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # flock's EWOULDBLOCK: another run holds it
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                raise SpoolLocked(f"another ganymede-agent run (pid {holder}) holds {path}") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            owner = self.read_state().get("agent_id")
            if owner and owner != self.agent_id:
                raise SpoolError(f"spool {self.dir} belongs to agent {owner!r}, not {self.agent_id!r}; "
                                 "give each agent id its own [spool] dir")
            if not owner:
                self.update_state(agent_id=self.agent_id)
            for name in os.listdir(self.dir):  # half-built archives of a crashed run: never delivered
                if name.startswith(".build-") and os.path.isdir(os.path.join(self.dir, name)):
                    shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)
                elif name.endswith(".tmp"):
                    os.unlink(os.path.join(self.dir, name))
            yield self
        finally:
            os.close(fd)  # closing releases the flock

    def path_for(self, hour):
        return os.path.join(self.dir, hour_key(hour) + ".tar.gz")

    def hours(self):
        """Spooled hours, oldest first."""
        keys = sorted(m.group(1) for m in map(_ARCHIVE.match, os.listdir(self.dir)) if m)
        return [f"{k[0:4]}-{k[4:6]}-{k[6:8]}T{k[8:10]}" for k in keys]

    def enforce_limit(self, keep):
        """Drop the oldest hours while the spool is over its limit, never `keep` (the hour just built)."""
        dropped = []
        sizes = {hour: os.path.getsize(self.path_for(hour)) for hour in self.hours()}
        total = sum(sizes.values())
        for hour, size in sizes.items():
            if total <= self.max_bytes:
                break
            if hour == keep:
                continue
            os.unlink(self.path_for(hour))
            total -= size
            dropped.append(hour)
            log.error("SPOOL FULL: dropped undelivered hour %s (%d bytes) from %s to stay under %d bytes; "
                      "that hour is lost unless re-collected with --hour %s", hour, size, self.dir,
                      self.max_bytes, hour)
        if dropped:
            state = self.read_state()
            history = (state.get("dropped_hours", []) + dropped)[-_HISTORY:]
            self.update_state(dropped=state.get("dropped", 0) + len(dropped), dropped_hours=history)
        return dropped

    def remove(self, hour):
        os.unlink(self.path_for(hour))
        fsync_path(self.dir)

    def reject(self, hour, reason):
        """Move an archive the API refused for good to rejected/, with the server's reason beside it."""
        key = hour_key(hour)
        _write_json(os.path.join(self.rejected_dir, key + ".reason.json"),
                    dict(reason, hour=hour, agent_id=self.agent_id, at=utc_now()))
        os.replace(self.path_for(hour), os.path.join(self.rejected_dir, key + ".tar.gz"))
        fsync_path(self.rejected_dir)
        fsync_path(self.dir)

    def read_state(self):
        try:
            with open(self.state_path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return {}
        except ValueError:
            log.error("state file %s is not JSON; starting a new one (counters reset)", self.state_path)
            return {}

    def update_state(self, **changes):
        _write_json(self.state_path, dict(self.read_state(), **changes))

    def count(self, counter):
        self.update_state(**{counter: self.read_state().get(counter, 0) + 1})


def utc_now():
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_json(path, data):
    part = f"{path}.{os.getpid()}.tmp"
    with open(part, "w", encoding="utf-8") as f:
        json.dump(data, f, sort_keys=True, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)
    fsync_path(os.path.dirname(path))
