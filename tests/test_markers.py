"""Task outputs written through DurableTarget: whole or absent, and what a killed writer left is swept."""
import fcntl
import os

import pytest

from ganymede import markers


def names(directory):
    return sorted(os.listdir(directory))


def test_a_write_appears_whole_and_an_error_leaves_nothing(tmp_path):
    path = str(tmp_path / "state" / "a.json")
    markers.write_json(path, {"n": 1})
    with pytest.raises(RuntimeError), markers.open_atomic(path) as f:
        f.write(b"half")
        raise RuntimeError("disk said no")
    assert markers.read_json(path) == {"n": 1} and names(tmp_path / "state") == ["a.json"]


def test_the_next_write_of_a_file_removes_what_a_dead_run_left_of_it_only(tmp_path):
    path = str(tmp_path / "a.json")
    dead = tmp_path / ".tmp-a.json-000000001"  # a run killed mid-write: its lock died with it
    dead.write_bytes(b"half")
    running = tmp_path / ".tmp-a.json-000000002"  # a live writer's (on any host): it holds the flock
    running.write_bytes(b"half")
    other = tmp_path / ".tmp-b.json-000000003"  # another file's: its own next write sweeps it
    other.write_bytes(b"half")
    with open(running, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        markers.write_json(path, {"n": 2})
    assert names(tmp_path) == [".tmp-a.json-000000002", ".tmp-b.json-000000003", "a.json"]


def test_a_writer_holds_its_temporary_until_the_rename(tmp_path):
    path = str(tmp_path / "a.json")
    with markers.open_atomic(path) as f:
        f.write(b"{}")
        (tmp,) = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
        markers.remove_temporaries(path)  # as another host's next write would
        assert tmp.exists()
    assert names(tmp_path) == ["a.json"]


def test_remove_takes_the_marker_and_its_leftovers(tmp_path):
    path = str(tmp_path / "f.json")
    markers.write_json(path, {})
    (tmp_path / ".tmp-f.json-000000001").write_bytes(b"")
    markers.remove(path)
    markers.remove(path)  # already gone: fine
    assert names(tmp_path) == []
