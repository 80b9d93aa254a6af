"""UTC hours and the state-root layout: pure functions."""
from datetime import datetime, timedelta, timezone

import pytest

from ganymede import hours
from ganymede.errors import HourError
from ganymede.paths import StateRoot, check_id


@pytest.mark.parametrize("text, expected", [
    ("2026-11-30T05", datetime(2026, 11, 30, 5)),
    ("2026-11-30T05:00", datetime(2026, 11, 30, 5)),
    ("2026-11-30T05:00:00Z", datetime(2026, 11, 30, 5)),
    (" 2015-09-13T09 ", datetime(2015, 9, 13, 9)),
])
def test_parse_hour(text, expected):
    assert hours.parse_hour(text) == expected


@pytest.mark.parametrize("text", ["2026-11-30", "2026-11-30T24", "2026-11-30T05:30", "yesterday", "", "2026-13-01T00"])
def test_parse_hour_refuses(text):
    with pytest.raises(HourError):
        hours.parse_hour(text)


def test_aware_times_fold_to_naive_utc():
    aware = datetime(2026, 11, 30, 7, 30, tzinfo=timezone(timedelta(hours=2)))
    assert hours.utc(aware) == datetime(2026, 11, 30, 5, 30)
    assert hours.floor_hour(aware) == datetime(2026, 11, 30, 5)


def test_windows_deadlines_and_ranges():
    h = datetime(2026, 11, 30, 23)
    assert hours.window(h) == (h, datetime(2026, 12, 1, 0))
    assert hours.deadline(h, 45) == datetime(2026, 12, 1, 0, 45)
    assert hours.last_complete_hour(datetime(2026, 12, 1, 0, 10)) == h
    assert list(hours.hours_between(h, h + timedelta(hours=2))) == [h, h + timedelta(hours=1), h + timedelta(hours=2)]
    assert hours.format_hour(h) == "2026-11-30T23" and hours.compact(h) == "2026113023"


def test_state_root_layout_is_hour_stamped(tmp_path):
    root = StateRoot(str(tmp_path))
    h = datetime(2026, 11, 30, 5)
    assert root.upload(h, "geo-1", "tx-1") == f"{tmp_path}/upload/2026/11/30/05/geo-1/tx-1.tar.gz"
    assert root.archived(h, "geo-1", "tx-1") == f"{tmp_path}/archives/2026/11/30/05/geo-1/tx-1.tar.gz"
    assert root.extract(h) == f"{tmp_path}/extracts/2026/11/30/ganymede-2026113005.jsonl.gz"
    assert root.extract(h, 2) == f"{tmp_path}/extracts/2026/11/30/ganymede-2026113005-s2.jsonl.gz"
    assert root.backup_dump(h) == f"{tmp_path}/backup/2026/11/30/05/ganymede.sql.gz"
    assert root.hour_marker(h, "backup") == f"{tmp_path}/state/2026/11/30/05/backup.json"


@pytest.mark.parametrize("value", ["../etc", "a/b", "/abs", "..", ".hidden", "", "x" * 65, "a\x00b", "a b", None])
def test_ids_that_could_escape_are_refused(value):
    with pytest.raises(ValueError):
        check_id(value)
