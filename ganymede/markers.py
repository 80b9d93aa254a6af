"""Task outputs on the state root, written whole or not at all: `.tmp-<name>-<random>` beside the final path,
fsync'd and renamed durably (ganymede.files).

The writer flocks its temporary until the rename, so one a killed writer left is one nobody holds, and the
next write of the file removes it. No mtime is compared: on NFS shared by hosts it is the server's clock."""
import contextlib
import fcntl
import glob
import io
import json
import os
import random

import luigi.format
from luigi.local_target import atomic_file

from . import files


class _DurableFile(atomic_file):
    def __init__(self, path):
        super().__init__(path)
        self.lock_fd = os.open(self.tmp_path, os.O_RDONLY)  # its own open file: held past the writer's close
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)

    def generate_tmp_path(self, path):
        directory, name = os.path.split(path)
        return os.path.join(directory, f".tmp-{name}-{random.randrange(10 ** 9):09d}")

    def move_to_final_destination(self):
        try:
            files.move_durably(self.tmp_path, self.path)
        finally:
            os.close(self.lock_fd)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            return super().__exit__(exc_type, exc, tb)
        with contextlib.suppress(OSError):  # a full disk may refuse the last flush too
            io.BufferedWriter.close(self)  # closed without the move
        os.unlink(self.tmp_path)
        os.close(self.lock_fd)


class DurableTarget(luigi.LocalTarget):
    """A LocalTarget whose writes are fsync'd before and after the rename; binary unless given a format."""

    def __init__(self, path, format=luigi.format.Nop):
        super().__init__(path, format=format)

    def open(self, mode="r"):
        if "w" not in mode:
            return super().open(mode)
        self.makedirs()
        remove_temporaries(self.path)
        return self.format.pipe_writer(_DurableFile(self.path))


def remove_temporaries(path):
    """Remove the temporaries of `path` no writer holds (left by a dead one); a live writer's stay."""
    directory, name = os.path.split(path)
    for tmp in glob.glob(os.path.join(glob.escape(directory), glob.escape(f".tmp-{name}-") + "*")):
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(tmp)
        except (BlockingIOError, FileNotFoundError):
            pass  # being written, or gone already
        finally:
            os.close(fd)


def open_atomic(path, text=False):
    """A file object for writing `path` atomically (UTF-8 text with text=True); use it in a with block."""
    return DurableTarget(path, luigi.format.UTF8 if text else luigi.format.Nop).open("w")


def write_json(path, data):
    with open_atomic(path) as f:
        f.write(json.dumps(data, sort_keys=True, indent=1, default=str).encode() + b"\n")


def read_json(path):
    with open(path, "rb") as f:
        return json.load(f)


def remove(path):
    """Remove a marker (and any temporary a killed writer left of it); a missing one is fine."""
    remove_temporaries(path)
    if os.path.exists(path):
        os.unlink(path)
