"""Task outputs on the state root (markers, extracts, rejects, dumps), written atomically through Luigi's targets.

A file appears at its final path whole or not at all: DurableTarget writes
`.tmp-<name>-<random>` beside it, fsyncs it and renames it into place
durably (ganymede.files). A process killed mid-write leaves that temporary
behind; the next write of the same file removes the ones older than its own
process (Luigi never runs one task twice at once, so they belong to a dead run).
"""
import glob
import io
import json
import os
import random
import time

import luigi
import luigi.format
from luigi.local_target import atomic_file

from . import files

STARTED = time.time()


class _DurableFile(atomic_file):
    def generate_tmp_path(self, path):
        directory, name = os.path.split(path)
        return os.path.join(directory, f".tmp-{name}-{random.randrange(10 ** 9):09d}")

    def move_to_final_destination(self):
        files.move_durably(self.tmp_path, self.path)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            return super().__exit__(exc_type, exc, tb)
        try:
            io.BufferedWriter.close(self)  # closed without the move
        except OSError:
            pass  # a full disk may refuse the last flush too
        os.unlink(self.tmp_path)


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


def remove_temporaries(path, before=STARTED):
    """Remove the temporaries of `path` last written before `before` (default: this process's start)."""
    directory, name = os.path.split(path)
    for tmp in glob.glob(os.path.join(glob.escape(directory), glob.escape(f".tmp-{name}-") + "*")):
        try:
            if os.stat(tmp).st_mtime < before:
                os.unlink(tmp)
        except FileNotFoundError:
            pass


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
    remove_temporaries(path, before=time.time())
    if os.path.exists(path):
        os.unlink(path)
