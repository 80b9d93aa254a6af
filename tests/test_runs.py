"""A pipeline command's run, as an operator meets it: one config file, the hour's lock, exit codes that tell
the truth, one closing line with the reason, and what a crash leaves behind."""
import os
import re
import socket
import subprocess
import sys
from datetime import timedelta

import luigi.configuration
import pytest
from luigi.rpc import RemoteScheduler

from ganymede import configfile, hours
from ganymede.errors import ConfigError
from ganymede.paths import StateRoot
from ganymede.runs import HourLock
from ganymede.stores import txlog
from ganymede.tasks import HourlyBackup
from conftest import completed_transaction
from test_operations import luigid  # noqa: F401  (a luigid with deploy/luigid.cfg)

BIN = os.path.dirname(sys.executable)
LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (\S+) (.+?): (.+) \(exit (\d+), \d+\.\d s\)$")


def command(genv, *argv, env=None, cwd=None):
    return subprocess.run([f"{BIN}/{argv[0]}", *argv[1:]], env=env or genv.subprocess_env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def one_line(result):
    """The run's closing line: (prog, what, words, exit code); stdout holds nothing else."""
    (line,) = result.stdout.splitlines()
    match = LINE.match(line)
    assert match, line
    return match.group(1), match.group(2), match.group(3), int(match.group(4))


@pytest.fixture
def with_luigid(genv, luigid, mongo_up, s3_up):  # noqa: F811
    genv.write_config(core={"scheduler_host": "127.0.0.1", "scheduler_port": luigid[0]})
    return genv


# --- one config file -------------------------------------------------------------

def test_the_named_file_is_the_only_config_read(genv, tmp_path):
    cwd = tmp_path / "checkout"
    cwd.mkdir()
    (cwd / "luigi.cfg").write_text("[email]\nreceiver = ganymede-ops@example.net\n[core]\nscheduler_port = 1111\n")
    other = tmp_path / "other.cfg"
    other.write_text("[core]\nscheduler_host = 127.0.0.1\nscheduler_port = 2222\n")
    hour = "2026-11-30T05"
    by_option = command(genv, "ganymede", "--config", str(other), "graph", "--hour", hour, cwd=cwd)
    by_env = command(genv, "ganymede", "graph", "--hour", hour, cwd=cwd,
                     env=dict(genv.subprocess_env, LUIGI_CONFIG_PATH=str(other)))
    url = "http://127.0.0.1:2222/static/visualiser/index.html#tab=graph&taskId="
    assert by_option.stdout == by_env.stdout == url + HourlyBackup(hour=hours.parse_hour(hour)).task_id + "\n"
    configfile.use(str(other))
    parser = luigi.configuration.get_config()
    assert parser.sections() == ["core"] and not parser.has_option("email", "receiver")


def test_a_missing_config_file_is_named(genv, tmp_path):
    env = {k: v for k, v in genv.subprocess_env.items() if k != "LUIGI_CONFIG_PATH"}
    result = command(genv, "ganymede-hourly-backup", "--config", str(tmp_path / "nope.cfg"), env=env)
    assert result.returncode == 1 and f"config file {tmp_path / 'nope.cfg'} (--config) does not exist" in result.stdout
    assert configfile.chosen_path(environ={}) == ("/etc/ganymede/luigi.cfg", "the default")
    assert configfile.chosen_path(environ={"LUIGI_CONFIG_PATH": "/x.cfg"}) == ("/x.cfg", "LUIGI_CONFIG_PATH")
    with pytest.raises(ConfigError, match=r"y\.cfg \(--config\) does not exist$"):
        configfile.use(str(tmp_path / "y.cfg"))


def test_a_missing_mysql_option_file_is_named(genv, tmp_path):
    genv.write_config(mysql={"option_file": str(tmp_path / "my.cnf")})
    message = f"[mysql] option_file {tmp_path / 'my.cnf'} does not exist"
    run = command(genv, "ganymede-hourly-backup", "--hour", "2026-11-30T05", "--local-scheduler")
    assert run.returncode == 1 and message in one_line(run)[2]
    admin = command(genv, "ganymede", "agents", "list")
    assert admin.returncode == 1 and message in admin.stderr and "Traceback" not in admin.stderr


# --- exit codes and the closing line ------------------------------------------

def test_a_failed_run_ends_with_one_line_naming_the_task_and_reason(genv, mongo_up, s3_up):
    hour = hours.last_complete_hour() - timedelta(hours=6)
    completed_transaction(genv, "agent-a", hour)
    genv.write_config(s3={"endpoint_url": "http://127.0.0.1:9"})
    run = command(genv, "ganymede-hourly-backup", "--hour", hours.format_hour(hour), "--local-scheduler")
    prog, what, words, code = one_line(run)
    assert (run.returncode, code, prog, what) == (30, 30, "ganymede-hourly-backup", f"hour {hours.format_hour(hour)}")
    assert re.match(r"failed: HourlyBackup: \S+Error: .*127\.0\.0\.1:9", words), words
    assert run.stderr == ""
    assert "Traceback" in open(os.path.join(genv.root, "log", "ganymede.log")).read()
    verbose = command(genv, "ganymede-hourly-backup", "--hour", hours.format_hour(hour), "--local-scheduler", "-v")
    assert verbose.returncode == 30 and "Traceback" in verbose.stderr


@pytest.mark.parametrize("argv", [
    ("ganymede-hourly-backup", "--hour", "2026-11-30T25"),
    ("ganymede-hourly-backup", "--workers", "0"),
    ("ganymede-hourly-backup", "--no-such-option"),
    ("ganymede-worker",),
    ("ganymede-glassbeam-extract", "-y", "2026"),
    ("ganymede", "status", "--last", "-1"),
])
def test_argument_errors_exit_2_in_one_line(genv, argv):
    result = command(genv, *argv)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1 and result.stdout == "", result.stderr


def test_the_current_hour_is_refused_as_not_ended(genv):
    current = hours.floor_hour(hours.now())
    result = command(genv, "ganymede-hourly-backup", "--hour", hours.format_hour(current), "--local-scheduler")
    assert result.returncode == 2 and "has not ended yet" in result.stderr


@pytest.mark.parametrize("argv", [("ganymede", "--help"), ("ganymede-hourly-backup", "--help"),
                                  ("ganymede-worker", "--help"), ("ganymede-worker-etl", "--help"),
                                  ("ganymede-glassbeam-extract", "--help"), ("ganymede-api", "--help")])
def test_every_help_ends_with_the_exit_code_table(genv, argv):
    from ganymede.runs import EXIT_CODES
    result = command(genv, *argv)
    assert result.returncode == 0
    for code, text in EXIT_CODES:
        assert re.search(rf"^\s+{code}\s+{re.escape(text)}$", result.stdout, re.M), (code, result.stdout)


# --- the hour's lock: no task twice --------------------------------------------

def test_a_manual_run_during_a_cron_run_of_the_hour_exits_10_and_nothing_runs_twice(with_luigid):
    genv = with_luigid
    hour = hours.last_complete_hour() - timedelta(hours=6)
    tx = completed_transaction(genv, "agent-a", hour)
    root = StateRoot(genv.root)
    blocker = genv.mysql(autocommit=True)
    with blocker.cursor() as cur:  # the cron run will wait in StageTransaction's event write
        cur.execute("LOCK TABLES transaction_events WRITE")
    cron = subprocess.Popen([f"{BIN}/ganymede-hourly-backup", "--hour", hours.format_hour(hour)],
                            env=genv.subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        waiting_for_metadata_lock(genv)
        assert HourLock(root, hour).held_by_someone()
        held = f"already running: the hour is held by pid {cron.pid} "
        for argv, said in ((("ganymede-hourly-backup", "--hour", hours.format_hour(hour), "--local-scheduler"), held),
                           # through luigid, runs share the hour (other worker hosts): luigid keeps the task to one
                           (("ganymede-hourly-backup", "--hour", hours.format_hour(hour)),
                            "already running: luigid worker "),
                           (("ganymede-worker", tx["transaction_id"], "--local-scheduler"), held),
                           (("ganymede-glassbeam-extract", *hour_parts(hour), "--local-scheduler"), held)):
            manual = command(genv, *argv)
            words, code = one_line(manual)[2:]
            assert (manual.returncode, code) == (10, 10), manual.stdout
            assert words.startswith(said), words
    finally:
        with blocker.cursor() as cur:
            cur.execute("UNLOCK TABLES")
        blocker.close()
        out, err = cron.communicate(timeout=300)
    assert cron.returncode == 0, out + err[-3000:]
    with genv.mysql() as conn:
        events = [e["event"] for e in txlog.events(conn, tx["transaction_id"])]
    assert events.count("staged") == events.count("loaded") == events.count("backed_up") == 1, events


def hour_parts(hour):
    return ("-y", str(hour.year), "-m", str(hour.month), "-d", str(hour.day), "-h", str(hour.hour))


def waiting_for_metadata_lock(genv):
    """Until a session of the test's database waits on the table lock (bounded by the attempts, not by time)."""
    import time
    with genv.mysql(autocommit=True) as conn:
        for _ in range(600):
            with conn.cursor() as cur:
                cur.execute("SELECT COUNT(*) FROM information_schema.processlist WHERE db = %s AND state LIKE "
                            "'Waiting for table metadata lock%%'", (genv.mysql_database,))
                if cur.fetchone()[0]:
                    return
            time.sleep(0.1)
    pytest.fail("the cron-style run never reached its StageTransaction")


def test_a_rerun_right_after_a_run_does_its_work(with_luigid):
    genv = with_luigid
    genv.write_config(extract={"deadline_minutes": 0})
    hour = hours.last_complete_hour() - timedelta(hours=6)
    completed_transaction(genv, "agent-a", hour)
    first = command(genv, "ganymede-hourly-backup", "--hour", hours.format_hour(hour))
    assert first.returncode == 0, first.stdout
    completed_transaction(genv, "agent-b", hour)  # a late arrival reopens the hour
    rerun = command(genv, "ganymede-hourly-backup", "--hour", hours.format_hour(hour))
    assert (rerun.returncode, one_line(rerun)[2]) == (0, "done, hour closed"), rerun.stdout
    assert os.path.exists(StateRoot(genv.root).extract_manifest(hour, 1))


# --- after a crash -----------------------------------------------------------------

def test_after_a_crash_the_rerun_names_the_dead_worker(with_luigid, luigid):  # noqa: F811
    """luigid still counts a killed run's task as running: the rerun says whose, and that it is gone."""
    genv = with_luigid
    hour = hours.last_complete_hour() - timedelta(hours=6)
    completed_transaction(genv, "agent-a", hour)
    dead = subprocess.Popen(["true"])
    dead.wait()
    scheduler = RemoteScheduler(f"http://127.0.0.1:{luigid[0]}")
    scheduler.add_worker("crashed-run", [("host", socket.gethostname()), ("pid", dead.pid)])
    scheduler.add_task(worker="crashed-run", task_id=HourlyBackup(hour=hour).task_id, status="PENDING",
                       runnable=True, family="HourlyBackup", params={"hour": hours.format_hour(hour)})
    assert scheduler.get_work(worker="crashed-run")["task_id"] == HourlyBackup(hour=hour).task_id
    root = StateRoot(genv.root)
    leftovers = [os.path.join(root.hour_state(hour), ".tmp-abc123"),
                 os.path.join(os.path.dirname(root.backup_dump(hour)), ".tmp-def456"),
                 os.path.join(root.day_extracts(hour), ".tmp-0a1b2c")]
    for path in leftovers:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").close()

    rerun = command(genv, "ganymede-hourly-backup", "--hour", hours.format_hour(hour))

    words, code = one_line(rerun)[2:]
    assert rerun.returncode == code == 10
    assert re.match(rf"already running: luigid still counts HourlyBackup as run by worker crashed-run, whose "
                    rf"process \(pid {dead.pid} on {re.escape(socket.gethostname())}\) is gone; luigid gives its "
                    r"tasks back \[scheduler\] worker_disconnect_delay after its last contact at "
                    r"\d\d:\d\d:\d\dZ: rerun then", words), words
    assert not any(os.path.exists(p) for p in leftovers)


def test_a_scheduling_error_names_its_cause(genv, mongo_up):
    hour = hours.last_complete_hour() - timedelta(hours=6)
    completed_transaction(genv, "agent-a", hour)
    genv.write_config(mysql={"port": "9"})  # the graph's requires() cannot read the log
    run = command(genv, "ganymede-hourly-backup", "--hour", hours.format_hour(hour), "--local-scheduler")
    words, code = one_line(run)[2:]
    assert run.returncode == code == 35
    assert re.match(r"scheduling error: HourlyBackup: StoreUnavailable: .*unreachable", words), words


def test_the_hour_lock_names_its_holder_and_goes_with_it(tmp_path):
    from datetime import datetime
    from ganymede.runs import remove_leftovers
    root, hour = StateRoot(str(tmp_path)), datetime(2026, 11, 30, 5)
    shared = [HourLock(root, hour) for _ in range(2)]
    assert all(lock.acquire("a luigid run", shared=True) for lock in shared)  # runs on two worker hosts
    assert not HourLock(root, hour).acquire("a --local-scheduler run") and HourLock(root, hour).held_by_someone()
    for lock in shared:
        lock.release()
    first, second = HourLock(root, hour), HourLock(root, hour)
    assert first.acquire("cron run")
    assert not second.acquire("manual run") and second.holder()["pid"] == os.getpid()
    assert second.holder()["command"] == "cron run" and HourLock(root, hour).held_by_someone()
    sibling = HourLock(root, hour.replace(hour=6))
    assert sibling.acquire("the next hour's run")
    day_leftover = os.path.join(root.day_extracts(hour), ".tmp-x")
    os.makedirs(os.path.dirname(day_leftover))
    open(day_leftover, "wb").close()
    assert remove_leftovers(root, hour) == []  # the day's folder is shared with 06, which is running
    sibling.release()
    assert remove_leftovers(root, hour) == [day_leftover] and not os.path.exists(day_leftover)
    first.release()
    assert second.acquire("manual run") and not HourLock(root, hour.replace(hour=7)).held_by_someone()
    second.release()


def test_luigis_own_logging_config_is_honoured(genv, mongo_up, s3_up, tmp_path):
    """[core] logging_conf_file (Luigi's ini logging config) decides where the details go."""
    details = tmp_path / "details.log"
    conf = tmp_path / "logging.ini"
    conf.write_text(f"""[loggers]\nkeys=root\n[handlers]\nkeys=file\n[formatters]\nkeys=plain
[logger_root]\nlevel=INFO\nhandlers=file\n[handler_file]\nclass=FileHandler\nformatter=plain
args=('{details}',)\n[formatter_plain]\nformat=%(asctime)s %(name)s %(levelname)s %(message)s\n""")
    genv.write_config(core={"logging_conf_file": str(conf)})
    hour = hours.last_complete_hour() - timedelta(hours=6)
    run = command(genv, "ganymede-hourly-backup", "--hour", hours.format_hour(hour), "--local-scheduler")
    assert run.returncode == 0 and one_line(run)[2] == "done, no agent data (nothing delivered)", run.stdout
    assert "Luigi Execution Summary" in details.read_text()
    assert not os.path.exists(os.path.join(genv.root, "log"))


def test_a_run_killed_mid_hour_is_named_as_gone_by_the_rerun(with_luigid):
    """kill -9 of a cron-style run while its StageTransaction runs: the hour's lock goes with the process, luigid
    still counts the task as running, and the rerun's line says whose process is gone."""
    genv = with_luigid
    hour = hours.last_complete_hour() - timedelta(hours=6)
    completed_transaction(genv, "agent-a", hour)
    blocker = genv.mysql(autocommit=True)
    with blocker.cursor() as cur:
        cur.execute("LOCK TABLES transaction_events WRITE")
    try:
        cron = subprocess.Popen([f"{BIN}/ganymede-hourly-backup", "--hour", hours.format_hour(hour)],
                                env=genv.subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        waiting_for_metadata_lock(genv)
        cron.kill()
        cron.wait()
        rerun = command(genv, "ganymede-hourly-backup", "--hour", hours.format_hour(hour))
    finally:
        with blocker.cursor() as cur:
            cur.execute("UNLOCK TABLES")
        blocker.close()
    words, code = one_line(rerun)[2:]
    assert rerun.returncode == code == 10
    assert re.match(rf"already running: luigid still counts StageTransaction as run by worker .*pid={cron.pid}.*, "
                    rf"whose process \(pid {cron.pid} on .*\) is gone", words), words


def test_a_backfill_runs_the_hours_of_its_range_not_closed(genv, mongo_up, s3_up):
    genv.write_config(extract={"deadline_minutes": 0})
    first = hours.last_complete_hour() - timedelta(hours=30)
    closed, open_, outside = first, first + timedelta(hours=1), first + timedelta(hours=2)
    for h in (closed, open_, outside):
        completed_transaction(genv, "agent-a", h)
    done = command(genv, "ganymede-hourly-backup", "--hour", hours.format_hour(closed), "--local-scheduler")
    assert done.returncode == 0, done.stdout
    root = StateRoot(genv.root)
    before = os.path.getmtime(root.hour_marker(closed, "backup"))
    run = command(genv, "ganymede-hourly-backup", "--backfill", hours.format_hour(closed - timedelta(hours=1)),
                  hours.format_hour(open_), "--local-scheduler")
    prog, what, words, code = one_line(run)
    assert (run.returncode, code) == (0, 0), run.stdout
    assert what == f"backfill {hours.format_hour(closed - timedelta(hours=1))}..{hours.format_hour(open_)}"
    assert words == (f"{hours.format_hour(closed - timedelta(hours=1))} done, no agent data (nothing delivered) "
                     f"(exit 0); {hours.format_hour(open_)} done, hour closed (exit 0)")  # agent-a was expected then
    assert os.path.getmtime(root.hour_marker(closed, "backup")) == before
    assert not os.path.exists(root.hour_marker(outside, "backup"))
    backwards = command(genv, "ganymede-hourly-backup", "--backfill", hours.format_hour(open_),
                        hours.format_hour(closed))
    assert backwards.returncode == 2 and "FROM is after TO" in backwards.stderr
