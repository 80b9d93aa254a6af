"""One UTC hour's run, as cron and every manual command start it: lock, leftovers, logging, outcome."""
import fcntl
import glob
import json
import logging
import logging.config
import os
import socket
import time
import urllib.parse
import urllib.request
from contextlib import closing, suppress
from datetime import timedelta

import luigi.configuration
import luigi.interface
import luigi.retcodes

from . import config, hours, status
from .errors import ConfigError, GanymedeError
from .paths import StateRoot

# The one table of exit codes: every --help prints it; README.md and docs/operations.md hold the same rows
# (tests/test_docs.py compares them).
EXIT_CODES = (
    (0, "done, or nothing to do"),
    (1, "nothing ran: a config error (a missing file is named); "
        "for `ganymede` admin commands also a store unreachable"),
    (2, "bad usage: an unknown option or a bad value (an hour not ended yet, a transaction not completed)"),
    (3, "`ganymede alerts` found hours that need attention (listed, and mailed)"),
    (10, "already running: another run holds the hour (named), or luigid still counts a dead run's tasks"),
    (20, "waiting: expected agents missing before the deadline, or an archive not completed yet"),
    (25, "not run: luigid did not hand this run the hour's tasks (the line says why)"),
    (30, "a task failed: the line names the hour, the task and the reason"),
    (35, "scheduling error: luigid not answering, or the graph could not be built "
         "(e.g. MySQL unreachable; named)"),
    (40, "unhandled exception: the log file has the traceback"),
)
RETCODES = {"already_running": 10, "missing_data": 20, "not_run": 25, "task_failed": 30, "scheduling_error": 35,
            "unhandled_exception": 40}
PROBE = "probe (is the hour held?)"
LOG_FORMAT = "%(asctime)sZ %(name)s[%(process)d] %(levelname)s: %(message)s"

log = logging.getLogger("ganymede.runs")


def stamp():
    return f"{hours.now():%Y-%m-%dT%H:%M:%SZ}"


class HourLock:
    """flock on locks/…/HH.lock; the holder's pid, command and start time are written inside for the next one."""

    def __init__(self, root, hour):
        self.path = root.hour_lock(hour)
        self.file = None

    def acquire(self, command, shared=False):
        """Exclusive, or shared with other shared holders (runs through luigid); False if held otherwise."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.file = open(self.path, "a+")
        if not self.flock(fcntl.LOCK_SH if shared else fcntl.LOCK_EX):
            self.release()
            return False
        if not shared:  # one joining a run that holds it keeps that run's record (the hour's first run)
            self.file.truncate(0)
            self.file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                                        "since": stamp()}))
            self.file.flush()
        return True

    def flock(self, mode):
        """Non-blocking; a probe (held_by_someone) lets go at once, so it is waited for a little."""
        for _ in range(20):
            try:
                fcntl.flock(self.file.fileno(), mode | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if self.holder().get("command") != PROBE:
                    return False
                time.sleep(0.05)
        return False

    def holder(self):
        try:
            with open(self.path) as f:
                return json.loads(f.read() or "{}")
        except (OSError, ValueError):
            return {}

    def release(self):
        if self.file:
            self.file.close()
            self.file = None

    def held_by_someone(self):
        free = not os.path.exists(self.path) or self.acquire(PROBE)
        self.release()
        return not free


def remove_leftovers(root, hour):
    """Remove and return a crashed run's .tmp-* files (lock held); in the day's extract folder only if no hour
    of the day runs."""
    found = []
    for directory in root.hour_work_dirs(hour):
        found += glob.glob(os.path.join(glob.escape(directory), "**", ".tmp-*"), recursive=True)
    this = hours.floor_hour(hour)
    if not any(HourLock(root, this.replace(hour=h)).held_by_someone() for h in range(24) if h != this.hour):
        found += glob.glob(os.path.join(glob.escape(root.day_extracts(hour)), ".tmp-*"))
    for path in found:
        with suppress(FileNotFoundError):
            os.unlink(path)
    return found


def check_option_file():
    """A configured MySQL option file that is missing is named as such (not 'Access denied … password: NO')."""
    path = config.mysql().option_file
    if path and not os.path.isfile(os.path.expanduser(path)):
        raise ConfigError(f"[mysql] option_file {path} does not exist (it holds the MySQL password)")
    if path and not os.access(os.path.expanduser(path), os.R_OK):
        raise ConfigError(f"[mysql] option_file {path} is not readable by this user")


def scheduler_url():
    core = luigi.interface.core()
    return core.scheduler_url or f"http://{core.scheduler_host}:{core.scheduler_port}"


def luigid(method, **data):
    """One call of luigid's HTTP API (what its visualiser uses); OSError/ValueError when it does not answer."""
    query = urllib.parse.urlencode({"data": json.dumps(data)})
    with urllib.request.urlopen(f"{scheduler_url().rstrip('/')}/api/{method}?{query}", timeout=10) as response:
        return json.load(response)["response"]


def luigid_holders(hour):
    """Who luigid says runs the hour's tasks, or None. Asked after this run ended: a task still running is
    another worker's."""
    try:
        running = luigid("task_list", status="RUNNING", search=hours.format_hour(hour))
        workers = {w["name"]: w for w in luigid("worker_list")}
    except (OSError, ValueError, KeyError):
        return None
    names = sorted({t.get("worker_running") for t in running.values() if t.get("worker_running")})
    if not names:
        return None
    worker = workers.get(names[0], {})
    tasks = ", ".join(sorted(t["name"] for t in running.values()))
    where = f"pid {worker.get('pid')} on {worker.get('host')}"
    last = time.strftime("%H:%M:%SZ", time.gmtime(worker.get("last_active", time.time())))
    if worker.get("host") == socket.gethostname() and not pid_alive(worker.get("pid")):
        return (f"luigid still counts {tasks} as run by worker {names[0]}, whose process ({where}) is gone; "
                f"luigid gives its tasks back [scheduler] worker_disconnect_delay after its last contact at "
                f"{last}: rerun then")
    return f"luigid worker {names[0]} ({where}, last contact {last}) runs {tasks}"


def pid_alive(pid):
    try:
        os.kill(int(pid), 0)
    except PermissionError:  # someone else's process: it exists
        pass
    except (TypeError, ValueError, ProcessLookupError):
        return False
    return True


def setup_logging(verbose):
    """Details to the log file or per [core] logging_conf_file, to stderr with -v; [retcode] := RETCODES
    whatever the config says (Luigi's defaults are 0 for most outcomes)."""
    parser = luigi.configuration.get_config()
    conf_file = parser.get("core", "logging_conf_file", "")
    root_logger = logging.getLogger()
    if conf_file:
        if not os.path.isfile(conf_file):
            raise ConfigError(f"[core] logging_conf_file {conf_file} does not exist")
        logging.config.fileConfig(conf_file, disable_existing_loggers=False)
    else:
        path = config.state().log_file or os.path.join(StateRoot(config.state().root).root, "log", "ganymede.log")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            handler = logging.FileHandler(path)
        except OSError as exc:
            raise ConfigError(f"cannot write the log file {path} ([state] log_file): {exc.strerror or exc}") from None
        formatter = logging.Formatter(LOG_FORMAT, "%Y-%m-%dT%H:%M:%S")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
        root_logger.addHandler(handler)
        root_logger.setLevel(logging.INFO)
    if verbose:
        stream = logging.StreamHandler()
        stream.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        root_logger.addHandler(stream)
        root_logger.setLevel(logging.DEBUG)
    parser.read_dict({"core": {"no_configure_logging": "true"}, "retcode": RETCODES})
    return conf_file or path


BROKEN = []  # the reason of a scheduling error, which leaves no failure marker


@luigi.Task.event_handler(luigi.Event.BROKEN_TASK)
def _broken(task, exception):  # complete() or requires() raised
    BROKEN.append(f"{task.task_family}: {type(exception).__name__}: {' '.join(str(exception).split())}"[:500])


def luigi_run(task_args, workers=1, local_scheduler=False):
    """`luigi --module ganymede.tasks <task_args>` in this process -> Luigi's retcode. No Luigi pid lock: the
    hour's lock replaces it, and a catch-up runs several hours in one process."""
    argv = ["--module", "ganymede.tasks", *task_args, "--workers", str(workers), "--no-lock"]
    argv += ["--local-scheduler"] if local_scheduler else []
    BROKEN.clear()
    try:
        luigi.retcodes.run_with_retcodes(argv)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else 40
    return 0


def outcome(code, hour, local_scheduler):
    """(exit code, words) for a run that ended with Luigi's `code`. A run that found the hour's tasks run by
    another worker can end 20 or 25 (the tasks waiting on them did not run): luigid is asked, the truth is 10."""
    held = None if local_scheduler or code not in (10, 20, 25) else luigid_holders(hour)
    if held or code == 10:
        return 10, "already running: " + (held or "another worker runs its tasks")
    if code == 30:
        reasons = sorted(status.failure_reasons(StateRoot(config.state().root), hour).items())
        return 30, "failed: " + ("; ".join(f"{f}: {r}" for f, r in reasons) or "see the log file")
    if code == 35:
        return 35, "scheduling error: " + ("; ".join(dict.fromkeys(BROKEN)) or "see the log file")
    if code not in (0, 20, 25):
        return code, "unhandled exception (the traceback is in the log file)"
    try:
        (row,) = hours_rows(hour, hour)
    except GanymedeError as exc:
        if code != 25:
            return code, ("done" if code == 0 else "waiting") + f" (status unavailable: {exc})"
        row = None
    if code == 25 and (local_scheduler or not row or row.verdict != "closed"):
        return 25, ("not run: luigid did not hand this run the hour's tasks (a run of them finished seconds "
                    "ago: [scheduler] stable_done_cooldown_secs); rerun")
    if code == 20:
        deadline = hours.deadline(hour, config.extract().deadline_minutes)
        if row.not_arrived and hours.now() < deadline:
            return 20, f"waiting for {', '.join(row.not_arrived)} until the deadline {deadline:%H:%M}Z"
        return 20, "waiting: an archive in upload/ is not completed in the transaction log yet"
    # 0, or 25 of a closed hour (the tasks it was not given ran on another host)
    return 0, {"closed": "done, hour closed", "no data": "done, no agent data (nothing delivered)"}.get(
        row.verdict, f"done (hour {row.verdict}, backup {row.backup})")


def hours_rows(first, last, now=None):
    """status.hours_status with the configured store, state root and minutes."""
    from .stores import mysql
    with closing(mysql.connect(config.mysql())) as conn:
        return status.hours_status(conn, StateRoot(config.state().root), first, last,
                                   config.extract().deadline_minutes, config.alerts().overdue_minutes, now)


def run_hour(prog, hour, task_args, workers=1, local_scheduler=False):
    """One hour's run under its lock: (exit code, words). `task_args` is a list, or a function called once the
    lock is held (for a parameter read from the hour's files, such as the extract round)."""
    root = StateRoot(config.state().root)
    lock = HourLock(root, hour)
    command = f"{prog} --hour {hours.format_hour(hour)}"
    try:
        if lock.acquire(command):  # alone: a crashed run's leftovers go, then luigid runs share the hour
            removed = remove_leftovers(root, hour)
            if removed:
                log.info("removed %d file(s) a crashed run of %s left: %s", len(removed), hours.format_hour(hour),
                         ", ".join(removed))
            # exclusive -> shared is not atomic: a --local-scheduler run may take the hour in between
            joined = local_scheduler or lock.flock(fcntl.LOCK_SH)
        else:
            joined = not local_scheduler and lock.acquire(command, shared=True)
        if not joined:
            who = lock.holder()
            return 10, "already running: the hour is held by " + (
                f"pid {who.get('pid')} on {who.get('host')} ({who.get('command')}, since {who.get('since')})"
                if who else "another run")
        code = luigi_run(task_args() if callable(task_args) else task_args, workers, local_scheduler)
        return outcome(code, hour, local_scheduler)
    finally:
        lock.release()


def preflight(local_scheduler):
    """Nothing runs against a missing option file (exit 1) or a luigid that does not answer (35)."""
    check_option_file()
    if not local_scheduler:
        try:
            luigid("task_list", status="RUNNING", search="-")
        except (OSError, ValueError, KeyError) as exc:
            return 35, (f"luigid at {scheduler_url()} is not answering ({getattr(exc, 'reason', exc)}): "
                        "start it (systemctl start luigid)")
    return None


def catch_up_hours(window=None, first=None, last=None):
    """Hours past their deadline, not closed nor idle, oldest first: in the last `window`, or first..last."""
    now = hours.now()
    newest = hours.last_complete_hour(now - timedelta(minutes=max(0, config.extract().deadline_minutes)))
    first = first or hours.last_complete_hour(now) - timedelta(hours=window - 1)
    last = min(last or newest, newest)
    if last < first:
        return []
    return sorted(r.hour for r in hours_rows(first, last, now) if r.backup != "done" and r.verdict != "idle")
