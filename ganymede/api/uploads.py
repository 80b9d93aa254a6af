"""An archive's way in: PUT streams it to incoming/ (within the agent's disk quota), POST …/complete
validates it and installs it in upload/ or quarantines it with the reason."""
import asyncio
import contextlib
import errno
import fcntl
import glob
import hashlib
import multiprocessing
import os
import re
import shutil
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import timedelta

from tornado.ioloop import IOLoop

from ganymede_agent.archive import ArchiveError

from .. import archives, hours
from ..errors import Busy, Conflict, NotFound, QuotaExceeded
from ..stores import txlog
from .base import ApiError, BaseHandler, log, transaction_id_arg

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class Validator:
    """`threads` run completes apart from the request threads; each validates in one of `workers` processes:
    in the API's own threads validation would hold the GIL the event loop needs."""

    def __init__(self, workers, threads):
        self.workers, self.lock = workers, threading.Lock()
        self.threads = ThreadPoolExecutor(threads, thread_name_prefix="ganymede-complete")
        self.processes = self._processes()

    def _processes(self):
        processes = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_exit_with, initargs=(os.getpid(),))
        for _ in range(self.workers):  # started (and this module imported) now, not by the first completes
            processes.submit(int)
        return processes

    def check_file(self, *args):
        processes = self.processes
        try:
            return processes.submit(archives.check_file, *args).result()
        except BrokenProcessPool:  # a worker died (killed for its memory, say): the next complete gets new ones
            with self.lock:
                if self.processes is processes:
                    self.processes = self._processes()
            raise Busy("the archive's validation was interrupted; retry later") from None

    def shutdown(self):
        self.threads.shutdown(wait=True, cancel_futures=True)
        self.processes.shutdown(wait=True, cancel_futures=True)


def _exit_with(parent):
    """In a validation process: exit once the API is gone (killed with -9, its workers would stay)."""
    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def _disk_full(exc):
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def free_bytes(path):
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def agent_usage(conn, api, agent_id, transaction_id):
    """Bytes the agent holds in quarantine/ and incoming/ (but this transaction's, which an upload replaces)."""
    ids = txlog.unfinished(conn, agent_id, hours.now() - timedelta(hours=api.retention_hours + 1)) - {transaction_id}
    root = glob.escape(api.state.root)
    held = glob.glob(os.path.join(root, "quarantine", "*", "*", "*", "*", agent_id, "*"))
    held += [p for p in glob.glob(os.path.join(root, "incoming", "*.part")) if os.path.basename(p)[:-5] in ids]
    return sum(map(_size, held))


def _size(path):
    try:
        return os.path.getsize(path)
    except FileNotFoundError:  # swept or completed meanwhile
        return 0


def _open_upload(path):
    """The temp file, locked while it is written: the sweep never removes a locked one."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    f = open(path, "wb")
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    return f


def _write(f, digest, chunk):
    digest.update(chunk)
    f.write(chunk)


def _close_and_remove(f, path):
    """Remove the temp file before closing it, so its lock covers it to the end."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    f.close()


def _finish_upload(conn, api, transaction_id, temp, size, sha256):
    with txlog.transaction_lock(conn, transaction_id, api.lock_wait):
        tx = txlog.mark_uploaded(conn, transaction_id, size, sha256)
        os.replace(temp, api.state.incoming(transaction_id))
    return tx


class ArchiveHandler(BaseHandler):
    """PUT the archive: streamed to a private temp file, hashed on the way, then made the transaction's .part."""

    file = writing = None
    reserved = 0

    async def prepare(self):
        self.io_lock = asyncio.Lock()
        self.transaction_id = transaction_id_arg(self.path_args[0])
        if self.request.method != "PUT":
            raise ApiError(405, "use PUT")
        agent = await self.authenticate_agent()
        length = self.limit_body(self.api.max_archive_bytes, "archive")
        if length is None:
            raise ApiError(411, "Content-Length is required (no chunked uploads)")
        announced = self.request.headers.get("X-Archive-SHA256", "").strip().lower()
        if not _SHA256.match(announced):
            raise ApiError(400, "X-Archive-SHA256 must be the archive's sha256 in hex")
        tx = await self.own_transaction(agent, self.transaction_id)
        if tx["state"] not in txlog.OPEN_STATES:
            raise ApiError(409, f"transaction is {tx['state']}; no more uploads", state=tx["state"],
                           transaction_id=self.transaction_id)
        self.agent_id = agent["agent_id"]
        used = await self.db(agent_usage, self.api, self.agent_id, self.transaction_id)
        used += self.traffic.uploading[self.agent_id]
        if used + length > self.api.agent_quota_bytes:
            raise QuotaExceeded(f"this agent holds {used >> 20} MB in incoming/ and quarantine/; {length >> 20} MB "
                                f"more is over its quota of {self.api.agent_quota_bytes >> 20} MB")
        if await self.run(free_bytes, self.api.state.root) - length < self.api.min_free_bytes:
            raise ApiError(507, "not enough free disk on the server; retry later")
        self.reserved = self.size = length
        self.traffic.uploading[self.agent_id] += length
        self.announced, self.digest = announced, hashlib.sha256()
        self.temp = f"{self.api.state.incoming(self.transaction_id)}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            self.file = await self.run(_open_upload, self.temp)
        except OSError as exc:
            raise self.cannot_store(exc) from None

    def cannot_store(self, exc):
        log.error("transaction %s: cannot store the upload: %s", self.transaction_id, exc)
        return ApiError(507 if _disk_full(exc) else 500, "cannot store the upload on the server; retry later")

    async def data_received(self, chunk):
        async with self.io_lock:  # Tornado reads no more than Content-Length, checked in prepare
            if self.file is not None and await self._written():
                self.writing = self.run(_write, self.file, self.digest, chunk)

    async def _written(self):
        """Wait for the chunk being written: one per upload, so the loop reads the next one from the socket
        while a thread hashes and writes this one, and memory per upload stays under two chunks. On a write
        error, answer now: the server closes the connection instead of reading the rest."""
        writing, self.writing = self.writing, None
        try:
            if writing is not None:
                await writing
            return True
        except OSError as exc:
            error = self.cannot_store(exc)
            await self._drop()
            self.send_error(error.status_code, exc_info=(type(error), error, None))
            return False

    async def _drop(self):
        f, self.file = self.file, None
        writing, self.writing = self.writing, None
        if writing is not None:
            with contextlib.suppress(OSError):
                await writing
        if f is not None:
            await self.run(_close_and_remove, f, self.temp)

    def on_connection_close(self):
        super().on_connection_close()  # ends the request's wait for a body that will not come
        self.release_reserved()
        IOLoop.current().add_callback(self._discard)

    def on_finish(self):
        self.release_reserved()
        super().on_finish()

    def release_reserved(self):
        if self.reserved:
            self.traffic.uploading -= Counter({self.agent_id: self.reserved})  # drops counts that reach 0
            self.reserved = 0

    async def _discard(self):
        async with self.io_lock:
            await self._drop()

    async def put(self, transaction_id):
        async with self.io_lock:
            if self.file is None or not await self._written():
                return
            f, self.file = self.file, None
        digest = self.digest.hexdigest()
        try:  # the temp file stays open, so locked, until it is renamed: no sweep races the rename
            if digest != self.announced:
                raise ApiError(422, "sha256 of the received bytes does not match X-Archive-SHA256",
                               received_sha256=digest, size=self.size)
            tx = await self.db(_finish_upload, self.api, self.transaction_id, self.temp, self.size, digest)
        finally:
            await self.run(_close_and_remove, f, self.temp)
        self.metrics.uploaded(tx["agent_id"], tx["size"])
        self.send_json(200, {"transaction_id": tx["transaction_id"], "state": tx["state"],
                             "size": tx["size"], "sha256": tx["sha256"]})


def complete(conn, api, agent_id, geo, transaction_id):
    """Validate and install (or quarantine) the uploaded archive: (rows, None) or (None, the refusal)."""
    with txlog.transaction_lock(conn, transaction_id, api.lock_wait):
        tx = txlog.get_transaction(conn, transaction_id)
        conn.commit()
        if tx is None or tx["agent_id"] != agent_id:
            raise NotFound("no such transaction")
        state = tx["state"]
        if state == "completed":
            return completed_rows(txlog.events(conn, transaction_id)), None
        if state == "failed":
            return None, tx["error"]
        if state == "superseded":
            raise Conflict(f"transaction {transaction_id} was completed and then superseded", transaction_id)
        if state != "uploaded":
            raise Conflict(f"transaction {transaction_id} has no uploaded archive yet", transaction_id)
        hour = tx["hour"]
        part = api.state.incoming(transaction_id)
        dest = api.state.upload(hour, agent_id, transaction_id)
        held = api.state.quarantine(hour, agent_id, transaction_id)
        # After a crash (or MySQL loss) between the file move and the log update, finish the move's bookkeeping.
        src = next((p for p in (part, dest) if os.path.exists(p)), None)
        if src is None:
            if os.path.exists(held):
                reason = archives.read_reason(held)["reason"]
                txlog.mark_failed(conn, transaction_id, reason, {"quarantine": held})
                return None, reason
            raise Conflict("the uploaded archive is missing on the server; upload it again", transaction_id)
        try:
            counts, digest = (api.validator or archives).check_file(src, agent_id, geo, hour, api.limits)
            error = None
        except ArchiveError as exc:
            counts, digest, error = None, exc.file_sha256, str(exc)
        if digest != tx["sha256"]:
            # Our copy is not what the agent sent (disk trouble, crash mid-write): not the agent's fault.
            if src == part:
                os.remove(part)
            raise Conflict("the archive on the server no longer matches the uploaded sha256; upload it again",
                           transaction_id)
        if error:
            log.warning("transaction %s: archive refused: %s", transaction_id, error)
            try:
                archives.quarantine(src, held, error, {
                    "transaction_id": transaction_id, "agent_id": agent_id, "hour": hours.format_hour(hour),
                    "sha256": digest, "size": tx["size"]})
            except OSError as exc:  # the transaction stays uploaded; the agent's retry refuses it again
                log.error("transaction %s: cannot quarantine: %s", transaction_id, exc)
                raise (QuotaExceeded if _disk_full(exc) else Busy)(
                    "cannot store the refusal on the server; retry later", transaction_id) from None
            txlog.mark_failed(conn, transaction_id, error, {"quarantine": held})
            return None, error
        if src != dest:
            archives.install(src, dest)
        txlog.mark_completed(conn, transaction_id, dest, counts)
        return counts, None


def completed_rows(events):
    """The row counts of a transaction's last completion (None if it never completed)."""
    completed = [e for e in events if e["event"] == "completed"]
    return (completed[-1]["detail"] or {}).get("rows") if completed else None


class CompleteHandler(BaseHandler):
    async def post(self, transaction_id):
        transaction_id = transaction_id_arg(transaction_id)
        agent = await self.authenticate_agent()
        agent_id, busy = agent["agent_id"], self.traffic.completes
        if busy[agent_id] >= self.api.completes_per_agent:
            raise ApiError(429, f"this agent already has {busy[agent_id]} completes being validated; retry later")
        busy[agent_id] += 1
        try:
            await self.own_transaction(agent, transaction_id)  # before the lock: never tell whose it is
            rows, error = await self.db(complete, self.api, agent_id, agent["geo"], transaction_id,
                                        executor=self.api.validator and self.api.validator.threads)
        finally:
            self.traffic.completes -= Counter({agent_id: 1})  # drops counts that reach 0
        if error is not None:
            raise ApiError(422, error, transaction_id=transaction_id, state="failed")
        self.send_json(200, {"transaction_id": transaction_id, "state": "completed", "rows": rows})
