"""The archive format, written here once and read by the server.

An archive is a gzip'd ustar file: `manifest.json` first, then one CSV per
dataset (`<dataset>.csv`, UTF-8, header row, '\\n' line ends). Everything that
could vary between two builds of the same rows is pinned (member order, times,
owners, modes, the gzip header, the compression level and where the deflate
stream is flushed: every 1 MiB of CSV), so the same rows give byte-identical
archives. Each CSV is deflated in 1 MiB blocks by two threads while its rows
are read, and the gzip'd tar is then spliced from those pieces (raw deflate
ending in a full flush, crc32s combined): compression overlaps reading
instead of following it.
Reading streams member by member and refuses anything that is not a plain file
with a name the manifest announces.
"""
import csv
import hashlib
import io
import json
import os
import re
import struct
import tarfile
import tempfile
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_DATASET_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_CHUNK = 1 << 20
_BLOCK = 1 << 20  # CSV bytes deflated as one independent block (changing it changes every archive's bytes)
_DEFLATE_THREADS = 2  # modest: the agent shares its GEO server with that GEO's database


class ArchiveError(Exception):
    """An archive that must not be accepted; `member` names the offending file."""

    def __init__(self, message, member=None):
        super().__init__(message if member is None else f"{member}: {message}")
        self.member = member


class CsvChunks:
    """Rows already rendered as CSV: an iterable of (UTF-8 bytes of whole '\\n'-ended lines, row count)."""

    def __init__(self, chunks):
        self.chunks = chunks


class _Piece(io.RawIOBase):
    """A binary sink that hashes and counts what passes, while threads deflate it to `raw`.

    What is written is cut into blocks of exactly `_BLOCK` bytes (the last one
    shorter), each deflated on its own by one of `_DEFLATE_THREADS` threads
    and ending in a full flush, and written to `raw` in order: one raw deflate
    stream that can be spliced into the archive's gzip stream later, its crc32
    alongside. Block boundaries depend only on the bytes, never on how they
    arrived, so the same rows still give the same archive. zlib releases the
    GIL, so the blocks really are compressed side by side (level 1 deflate is
    the slowest step of a build, ~140 MB/s a core).
    """

    def __init__(self, raw, level):
        self.raw, self.level, self.sha256, self.size, self.crc = raw, level, hashlib.sha256(), 0, 0
        self._pending, self._blocks = bytearray(), deque()
        self._pool = ThreadPoolExecutor(_DEFLATE_THREADS, thread_name_prefix="deflate")

    def writable(self):
        return True

    def write(self, data):
        data = bytes(data)
        self.sha256.update(data)
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        self._pending += data
        if len(self._pending) >= _BLOCK:
            cut = len(self._pending) - len(self._pending) % _BLOCK
            with memoryview(self._pending) as view:  # one copy per block, not two
                blocks = [bytes(view[start:start + _BLOCK]) for start in range(0, cut, _BLOCK)]
            del self._pending[:cut]
            for block in blocks:
                self._submit(block)
        return len(data)

    def _submit(self, block):
        self._blocks.append(self._pool.submit(_deflate_block, block, self.level))
        while len(self._blocks) > 2 * _DEFLATE_THREADS:  # bounded: a few blocks in flight
            self.raw.write(self._blocks.popleft().result())

    def finish(self):
        try:
            if self._pending or not self.size:
                self._submit(bytes(self._pending))
                self._pending.clear()
            while self._blocks:
                self.raw.write(self._blocks.popleft().result())
        finally:
            for block in self._blocks:
                block.cancel()
            self._pool.shutdown(wait=True)


def _deflate_block(block, level):
    """One block as raw deflate ending byte-aligned (a full flush), independent of the blocks around it."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)


def write_csv(path, header, rows, level=1):
    """Stream rows into a deflated CSV piece at `path`; returns (row_count, sha256 hex, size, crc32)."""
    with open(path, "wb") as raw:
        sink = _Piece(raw, level)
        try:
            text = io.TextIOWrapper(io.BufferedWriter(sink, _CHUNK), encoding="utf-8", newline="")
            writer = csv.writer(text, lineterminator="\n")
            writer.writerow(header)
            count = 0
            if isinstance(rows, CsvChunks):
                text.flush()
                text.detach().flush()
                for data, n in rows.chunks:
                    sink.write(data)
                    count += n
            else:
                for count, row in enumerate(rows, 1):
                    writer.writerow(["" if v is None else v for v in row])
                text.flush()
                text.detach().flush()
        finally:
            sink.finish()
        return count, sink.sha256.hexdigest(), sink.size, sink.crc


def _tarinfo(name, size, mtime):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def build_archive(dest, manifest_fields, datasets, workdir=None, compresslevel=1):
    """Write an archive atomically at `dest` and return its manifest.

    `datasets` yields (name, header, rows); rows stream to temporary deflated
    CSV pieces in `workdir` (never memory), compressed by a second thread while
    they are written; the tar.gz is then spliced from those pieces.
    `manifest_fields` must hold agent_id, geo and hour ('YYYY-MM-DDTHH'); the
    member times are that hour's start, so the archive depends only on its content.
    """
    workdir = workdir or os.path.dirname(os.path.abspath(dest))
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir, prefix=".build-") as tmp:
        entries, pieces = {}, {}
        for name, header, rows in datasets:
            if not _DATASET_NAME.match(name):
                raise ArchiveError(f"invalid dataset name {name!r}")
            path = os.path.join(tmp, name + ".csv.z")
            count, digest, size, crc = write_csv(path, header, rows, compresslevel)
            entries[name] = {"file": name + ".csv", "rows": count, "sha256": digest, "bytes": size}
            pieces[name] = (path, crc)
        manifest = dict(manifest_fields, format=FORMAT_VERSION, datasets=dict(sorted(entries.items())))
        manifest_bytes = json.dumps(manifest, sort_keys=True, indent=1).encode() + b"\n"
        mtime = _hour_epoch(manifest["hour"])
        part = dest + ".tmp"
        with open(part, "wb") as raw:
            out = _GzipSplicer(raw, compresslevel)
            out.plain(_tarinfo(MANIFEST_NAME, len(manifest_bytes), mtime).tobuf(tarfile.USTAR_FORMAT)
                      + manifest_bytes + _pad(len(manifest_bytes)))
            for name, entry in manifest["datasets"].items():
                path, crc = pieces[name]
                out.plain(_tarinfo(entry["file"], entry["bytes"], mtime).tobuf(tarfile.USTAR_FORMAT))
                with open(path, "rb") as piece:
                    out.deflated(piece, crc, entry["bytes"])
                out.plain(_pad(entry["bytes"]))
            out.finish()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(part, dest)
        fsync_path(os.path.dirname(os.path.abspath(dest)))
    return manifest


def _pad(size):
    return b"\0" * (-size % tarfile.BLOCKSIZE)


class _GzipSplicer:
    """One gzip member made of raw deflate pieces, each ending byte-aligned (a full flush)."""

    def __init__(self, raw, level):
        self.raw, self.level, self.crc, self.size = raw, level, 0, 0
        xfl = 4 if level == 1 else 2 if level == 9 else 0
        raw.write(b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + bytes([xfl, 255]))

    def plain(self, data, final=False):
        compressor = zlib.compressobj(self.level, zlib.DEFLATED, -zlib.MAX_WBITS)
        self.raw.write(compressor.compress(data) + compressor.flush(zlib.Z_FINISH if final else zlib.Z_FULL_FLUSH))
        self.crc, self.size = zlib.crc32(data, self.crc), self.size + len(data)

    def deflated(self, piece, crc, size):
        for chunk in iter(lambda: piece.read(_CHUNK), b""):
            self.raw.write(chunk)
        self.crc, self.size = crc32_combine(self.crc, crc, size), self.size + size

    def finish(self):
        blocks = self.size + 2 * tarfile.BLOCKSIZE
        self.plain(b"\0" * (2 * tarfile.BLOCKSIZE + (-blocks % tarfile.RECORDSIZE)), final=True)
        self.raw.write(struct.pack("<II", self.crc, self.size & 0xFFFFFFFF))


def _gf2_times(matrix, vector):
    total, i = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[i]
        vector >>= 1
        i += 1
    return total


def _gf2_square(matrix):
    return [_gf2_times(matrix, row) for row in matrix]


def crc32_combine(crc1, crc2, len2):
    """crc32 of A+B from crc32(A), crc32(B) and len(B) (zlib's crc32_combine)."""
    if len2 <= 0:
        return crc1
    op = _gf2_square(_gf2_square([0xEDB88320] + [1 << n for n in range(31)]))  # appends 4 zero bits
    while len2:
        op = _gf2_square(op)  # appends 1, 2, 4, … zero bytes: one per bit of len2
        if len2 & 1:
            crc1 = _gf2_times(op, crc1)
        len2 >>= 1
    return crc1 ^ crc2


def _hour_epoch(hour_text):
    from datetime import datetime, timezone
    try:
        return int(datetime.strptime(hour_text, "%Y-%m-%dT%H").replace(tzinfo=timezone.utc).timestamp())
    except (TypeError, ValueError):
        raise ArchiveError(f"manifest hour is not YYYY-MM-DDTHH: {hour_text!r}") from None


def fsync_path(path):
    """fsync a file or a directory by name (a directory: so a rename in it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def validate_manifest(manifest):
    """The manifest's own shape; the server checks agent and hour against its transaction."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise ArchiveError(f"unsupported manifest format {manifest.get('format') if isinstance(manifest, dict) else None!r}",
                           MANIFEST_NAME)
    for field in ("agent_id", "geo", "hour"):
        if not isinstance(manifest.get(field), str):
            raise ArchiveError(f"missing or invalid {field!r}", MANIFEST_NAME)
    _hour_epoch(manifest["hour"])
    datasets = manifest.get("datasets")
    if not isinstance(datasets, dict):
        raise ArchiveError("missing 'datasets'", MANIFEST_NAME)
    for name, entry in datasets.items():
        if not _DATASET_NAME.match(name) or not isinstance(entry, dict) or entry.get("file") != name + ".csv":
            raise ArchiveError(f"invalid dataset entry {name!r}", MANIFEST_NAME)
        for field in ("rows", "bytes"):
            if not isinstance(entry.get(field), int) or isinstance(entry.get(field), bool) or entry[field] < 0:
                raise ArchiveError(f"dataset {name!r}: invalid {field!r}", MANIFEST_NAME)
        if not isinstance(entry.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
            raise ArchiveError(f"dataset {name!r}: invalid 'sha256'", MANIFEST_NAME)
    return manifest
