"""incoming/ housekeeping (see docs/operations.md). An upload's temp file is flocked by its process until
renamed or removed, so one nobody holds is a dead process's: it goes at start at once, later after a minute's
grace (another process may not have locked the file it just opened yet)."""
import contextlib
import fcntl
import logging
import os
import time

from ..errors import Busy
from ..paths import check_id
from ..stores import txlog

log = logging.getLogger("ganymede.api")

TEMP_GRACE = 60  # seconds


def incoming_dir(state):
    return os.path.dirname(state.incoming("x"))


def sweep_temp_files(state, older_than):
    """Remove the upload temp files no process holds, not written to for `older_than` seconds; returns how many."""
    cutoff = time.time() - older_than
    return sum(_remove_unlocked(e.path) for e in os.scandir(incoming_dir(state))
               if e.name.endswith(".tmp") and e.is_file() and e.stat().st_mtime <= cutoff)


def _remove_unlocked(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.remove(path)
            return True
        finally:
            os.close(fd)
    except (FileNotFoundError, BlockingIOError):  # gone meanwhile, or an upload in progress
        return False


def sweep_parts(conn, state):
    """Remove the .part files of transactions no longer open; returns (removed, unknown ids). Each goes under
    its transaction's lock, taken without waiting, if still not open then: an upload finishing or a completion
    moving the file is never raced (a busy transaction is left for the next sweep)."""
    parts = {}
    for entry in os.scandir(incoming_dir(state)):
        if entry.name.endswith(".part") and entry.is_file():
            with contextlib.suppress(ValueError):  # not a name the API writes
                parts[check_id(entry.name[:-5], "transaction id")] = entry.path
    if not parts:
        return 0, []
    conn.rollback()  # read the log as committed now, not as an older snapshot of this connection saw it
    known = txlog.states(conn, parts)
    removed = 0
    for transaction_id, path in sorted(parts.items()):
        if transaction_id not in known or known[transaction_id] in txlog.OPEN_STATES:
            continue
        try:
            with txlog.transaction_lock(conn, transaction_id, 0):
                tx = txlog.get_transaction(conn, transaction_id)
                conn.commit()
                if tx is not None and tx["state"] not in txlog.OPEN_STATES and _remove(path):
                    removed += 1
                    log.info("removed %s: transaction %s is %s", os.path.basename(path), transaction_id, tx["state"])
        except Busy:
            continue  # another request holds it: next sweep
    return removed, sorted(set(parts) - set(known))


def sweep(pool, state, temp_older_than=TEMP_GRACE):
    """One round of both sweeps, logged, never raising: (temp files removed, .part files removed), None for a
    sweep that could not run."""
    temps = parts = None
    try:
        temps = sweep_temp_files(state, temp_older_than)
        if temps:
            log.info("removed %d stale upload temp files", temps)
    except OSError as exc:
        log.error("sweeping upload temp files: %s", exc)
    try:
        with pool.connection() as conn:
            parts, unknown = sweep_parts(conn, state)
        if unknown:
            log.warning("%d uploaded archives in %s belong to no transaction in the log (left alone): %s",
                        len(unknown), incoming_dir(state), ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else ""))
    except Exception as exc:  # MySQL away, a disk error: the next round tries again
        log.warning("sweeping uploaded archives of finished transactions: %s", exc)
    return temps, parts


def _remove(path):
    try:
        os.remove(path)
        return True
    except FileNotFoundError:
        return False
