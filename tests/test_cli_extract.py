"""`ganymede-glassbeam-extract`: the old script's options, run as a command against the real services."""
import argparse
import hashlib
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta

import pytest

from ganymede import hours
from ganymede.cli import _hour_from_parts
from ganymede.errors import GanymedeError
from ganymede.paths import StateRoot
from conftest import completed_transaction
from test_backup import RETCODES
from test_extract import register_agent

HOUR = datetime(2026, 9, 3, 9)
COMMAND = os.path.join(os.path.dirname(sys.executable), "ganymede-glassbeam-extract")


def extract(genv, *args, timeout=180):
    return subprocess.run([COMMAND, *args, "--local-scheduler"], env=genv.subprocess_env,
                          capture_output=True, text=True, timeout=timeout)


def parts(y=None, m=None, d=None, h=None):
    return argparse.Namespace(y=y, m=m, d=d, h=h)


def manifest_of(genv, hour=HOUR, round_=0):
    return json.load(open(StateRoot(genv.root).extract_manifest(hour, round_)))


@pytest.mark.parametrize("y, m, d, h", [
    ("2026", "9", "3", "9"), ("2026", "09", "03", "09"), ("2026", "009", "3", "09"), (" 2026", "9 ", "3", "9"),
])
def test_hour_from_old_options_with_or_without_leading_zeros(y, m, d, h):
    assert _hour_from_parts(parts(y, m, d, h)) == HOUR


def test_no_options_is_the_last_complete_utc_hour():
    before = hours.last_complete_hour()
    assert _hour_from_parts(parts()) in {before, hours.last_complete_hour()}


@pytest.mark.parametrize("given, message", [
    (parts("2026", "13", "3", "9"), "month must be in 1..12"),
    (parts("2026", "2", "30", "9"), "day is out of range"),
    (parts("2026", "9", "3", "24"), "hour must be in 0..23"),
    (parts("2026", "9", "3", "-1"), "-h '-1' is not a number"),
    (parts("2026", "9", "3", "9.5"), "-h '9.5' is not a number"),
    (parts("twenty", "9", "3", "9"), "-y 'twenty' is not a number"),
    (parts("2026", "9", "3", None), "give all of -y -m -d -h"),
    (parts("2999", "1", "1", "0"), "has not ended yet"),
])
def test_bad_hours_are_refused_with_a_reason(given, message):
    with pytest.raises(GanymedeError, match=message):
        _hour_from_parts(given)


def test_old_forms_build_the_same_hour(genv, mongo_up):
    genv.write_config(retcode=RETCODES)
    completed_transaction(genv, "agent-a", HOUR)
    run = extract(genv, "-y", "2026", "-m", "9", "-d", "3", "-h", "9")
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = StateRoot(genv.root).extract_manifest(HOUR)
    assert json.load(open(manifest))["agents"] == {"agent-a": 15}
    mtime = os.path.getmtime(manifest)
    run = extract(genv, "-y", "2026", "-m", "09", "-d", "03", "-h", "09")  # same hour: nothing to do
    assert run.returncode == 0, run.stderr[-3000:]
    assert os.path.getmtime(manifest) == mtime


def test_default_is_the_last_complete_hour(genv, mongo_up):
    genv.write_config(retcode=RETCODES, extract={"deadline_minutes": 0})
    before = hours.last_complete_hour()
    run = extract(genv)
    assert run.returncode == 0, run.stderr[-3000:]
    built = [h for h in {before, hours.last_complete_hour()}
             if os.path.exists(StateRoot(genv.root).extract_manifest(h))]
    assert len(built) == 1


def test_waiting_hour_exits_with_the_missing_data_code(genv, mongo_up):
    genv.write_config(retcode=RETCODES, extract={"deadline_minutes": 10 ** 7})
    completed_transaction(genv, "agent-a", HOUR)
    register_agent(genv, "agent-b", HOUR)
    run = extract(genv, "-y", "2026", "-m", "9", "-d", "3", "-h", "9")
    assert run.returncode == RETCODES["missing_data"], run.stderr[-3000:]
    assert not os.path.exists(StateRoot(genv.root).extract_manifest(HOUR))


def test_force_rebuild_gives_the_same_bytes_even_after_a_supplementary_round(genv, mongo_up):
    genv.write_config(retcode=RETCODES)
    a = completed_transaction(genv, "agent-a", HOUR)
    register_agent(genv, "agent-b", HOUR)
    hour_args = ["-y", "2026", "-m", "9", "-d", "3", "-h", "9"]
    assert extract(genv, *hour_args).returncode == 0
    first = manifest_of(genv)
    b = completed_transaction(genv, "agent-b", HOUR)  # late: the same command builds the supplementary round
    run = extract(genv, *hour_args)
    assert run.returncode == 0, run.stderr[-3000:]
    assert manifest_of(genv, round_=1)["transactions"] == [b["transaction_id"]]

    run = extract(genv, *hour_args, "--force")
    assert run.returncode == 0, run.stderr[-3000:]
    rebuilt = manifest_of(genv)
    assert rebuilt["sha256"] == first["sha256"] and rebuilt["transactions"] == [a["transaction_id"]]
    root = StateRoot(genv.root)
    with open(root.extract(HOUR), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == first["sha256"]
    set_aside = [p for p in os.listdir(os.path.dirname(root.extract_manifest(HOUR))) if ".replaced-" in p]
    assert len(set_aside) == 1


def test_help_still_works():
    run = subprocess.run([COMMAND, "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0
    for option in ("-y YYYY", "-m MM", "-d DD", "-h HH", "--force", "--local-scheduler"):
        assert option in run.stdout


@pytest.mark.parametrize("args, message", [
    (["-y", "2026", "-m", "13", "-d", "3", "-h", "9"], "not a UTC hour: month must be in 1..12"),
    (["-y", "2026", "-m", "9", "-d", "31", "-h", "9"], "day is out of range"),
    (["-y", "2026", "-m", "9", "-d", "3", "-h", "24"], "hour must be in 0..23"),
    (["-y", "2026", "-m", "9", "-d", "3", "-h", "x"], "-h 'x' is not a number"),
    (["-y", "2026", "-m", "9"], "give all of -y -m -d -h"),
    (["-y", "2999", "-m", "1", "-d", "1", "-h", "0"], "has not ended yet"),
    (["-y"], "expected one argument"),
    (["--hour", "2026-09-03T09"], "unrecognized arguments"),
])
def test_bad_values_one_line_error_no_traceback(genv, args, message):
    run = extract(genv, *args, timeout=60)
    assert run.returncode == 2
    assert message in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert run.stdout == ""


def test_hour_in_the_future_by_one_is_refused_at_the_boundary():
    now = hours.now()
    current = hours.floor_hour(now)
    with pytest.raises(GanymedeError, match="has not ended yet"):
        _hour_from_parts(parts(str(current.year), str(current.month), str(current.day), str(current.hour)))
    previous = current - timedelta(hours=1)
    assert _hour_from_parts(parts(str(previous.year), str(previous.month), str(previous.day),
                                  str(previous.hour))) == previous
