"""Small JSON files that say a step is done, written atomically.

A marker is the output of a task: it appears at its final path complete or
not at all (written to a temporary file in the same directory, fsync'd,
renamed), so a crash never leaves a half-written marker that looks done.
"""
import json
import os
import tempfile



def write_json(path, data):
    write_bytes(path, json.dumps(data, sort_keys=True, indent=1, default=str).encode() + b"\n")


def write_bytes(path, data):
    with AtomicFile(path) as f:
        f.write(data)


def read_json(path):
    with open(path, "rb") as f:
        return json.load(f)


class AtomicFile:
    """A file written to a temporary name and renamed into place only if the block succeeds."""

    mode = "wb"

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=".tmp-")
        self.file = os.fdopen(fd, self.mode, **({"encoding": "utf-8"} if "b" not in self.mode else {}))
        return self.file

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.file.flush()
                os.fsync(self.file.fileno())
                self.file.close()
                os.replace(self.tmp, self.path)
                return False
        except BaseException:
            self._discard()
            raise
        self._discard()
        return False

    def _discard(self):
        """Close and remove the temporary file; closing may fail again (a full disk), removing does not."""
        try:
            self.file.close()
        except OSError:
            pass
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


class AtomicText(AtomicFile):
    mode = "w"
