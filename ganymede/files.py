"""Files on the state root: durable renames, hashing (the agent's own functions), files that must stay private."""
import os
import stat

from ganymede_agent.archive import fsync_path, sha256_file

__all__ = ["fsync_path", "move_durably", "read_private", "sha256_file"]


def move_durably(src, dst):
    """Rename within one filesystem; the file and both directories are fsync'd, so after a crash the file is
    in one place or the other, whole."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    fsync_path(src)
    os.replace(src, dst)
    for directory in {os.path.dirname(src), os.path.dirname(dst)}:
        fsync_path(directory)
    return dst


def read_private(path, error, missing_hint=""):
    """The bytes of a file only its owner may read, else `error(message)` (with `missing_hint` if there is no
    file). Opened without blocking, so a FIFO planted at the path cannot hang the caller."""
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
