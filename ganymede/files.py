"""Files on the state root: durable renames, hashing, and files that must stay private.

Each of these exists once here; markers, archives, extracts, backups and the
credential readers use them.
"""
import hashlib
import os
import stat


def fsync_path(path):
    """fsync a file or a directory by name (a directory: so a rename in it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_durably(src, dst):
    """Rename within one filesystem, creating the destination directory; the file and both directories
    are fsync'd, so after a crash the file is in one place or the other, whole."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    fsync_path(src)
    os.replace(src, dst)
    for directory in {os.path.dirname(src), os.path.dirname(dst)}:
        fsync_path(directory)
    return dst


def sha256_file(path):
    """Hex SHA-256 of a file, streamed."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def read_private(path, error, missing_hint=""):
    """The bytes of a file only its owner may read; `error(message)` builds the exception raised otherwise
    (`missing_hint` is added to the message when the file does not exist).

    Opened without blocking, so a FIFO planted at the path cannot hang the caller.
    """
    path = os.path.expanduser(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise error(f"{path} does not exist{missing_hint}") from None
    except OSError as exc:
        raise error(f"cannot open {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path} is not a regular file")
        if info.st_mode & 0o077:
            raise error(f"{path} is accessible by group or others (mode {stat.S_IMODE(info.st_mode):04o}): "
                        f"run chmod 600 {path}")
        with open(fd, "rb", closefd=False) as handle:
            return handle.read()
    finally:
        os.close(fd)
