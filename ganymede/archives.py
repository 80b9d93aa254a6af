"""Server-side checks of an uploaded archive (docs/security.md), and where it goes afterwards.

The stream is read here, not by `tarfile`: tarfile holds a whole pax or GNU long-name header in memory before
any limit of ours can run (a ~1 MB upload of a pax header of hundreds of MB of zeros took the API to 3 GB),
and it never checks what follows the tar's end. Here gzip is inflated 1 MiB at a time, any header but a
regular file's is refused from its 512 bytes, and CSV lines are read with a bounded readline.
"""
import csv
import hashlib
import io
import json
import os
import re
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone

from ganymede_agent.archive import FORMAT_VERSION, MANIFEST_NAME, ArchiveError, validate_manifest

from . import files, hours
from .markers import read_json, write_json
from .datasets import CATALOG, RowError

_CHUNK = 1 << 20
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_MAX_PADDING = 1 << 20  # zeros accepted after the end-of-archive blocks (tar pads to its record size)
_MAX_REASON = 500  # characters of a refusal kept (a header row or a manifest key could be 64 KiB)
_USTAR_MAGIC = (b"ustar\x0000", b"ustar  \x00")  # POSIX, GNU
_NOT_REGULAR = {b"1": "hard link", b"2": "symbolic link", b"3": "character device", b"4": "block device",
                b"5": "directory", b"6": "FIFO"}
_EXTENSIONS = {b"x": "pax extended header", b"g": "pax global header", b"L": "GNU long name header",
               b"K": "GNU long link header", b"S": "GNU sparse file", b"7": "contiguous file"}


def printable(text):
    """Agent-supplied text fit for a log line or a JSON reason: control and other unprintable characters escaped."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


class _HashingReader:
    def __init__(self, raw):
        self.raw, self.sha256 = raw, hashlib.sha256()

    def read(self, n=-1):
        data = self.raw.read(n)
        self.sha256.update(data)
        return data

    def drain(self):
        for data in iter(lambda: self.read(_CHUNK), b""):
            pass
        return self.sha256.hexdigest()


@dataclass(frozen=True)
class Limits:
    """What a reader accepts; the API sets the sizes from [api], the defaults are [api]'s defaults."""
    max_member_bytes: int = 4 << 30
    max_total_bytes: int = 8 << 30
    max_manifest_bytes: int = 1 << 20
    max_members: int = 64
    max_line_bytes: int = 64 << 10


class _Gzip:
    """The inflated bytes of exactly one gzip member (CRC32 and ISIZE checked by zlib), _CHUNK at a time."""

    def __init__(self, raw):
        self.raw, self.inflater, self.seen = raw, zlib.decompressobj(16 + zlib.MAX_WBITS), 0
        self.buffer = memoryview(b"")

    def read(self, n):
        """Up to n bytes, b"" only at the end of the gzip member."""
        while not self.buffer and not self.inflater.eof:
            data = self.inflater.unconsumed_tail
            if not data:
                data = self.raw.read(_CHUNK)
                self.seen += len(data)
            if not data:
                raise ArchiveError("not a gzip'd tar archive (empty file)" if not self.seen
                                   else "truncated gzip stream (it ends before its CRC32 and length)")
            try:
                self.buffer = memoryview(self.inflater.decompress(data, _CHUNK))
            except zlib.error as exc:
                raise ArchiveError(_gzip_reason(str(exc), self.seen)) from None
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return bytes(data)

    def read_exact(self, n, name=None, truncated="truncated: the stream ends inside this member"):
        data = b""
        while len(data) < n:
            more = self.read(n - len(data))
            if not more:
                raise ArchiveError(truncated, name)
            data += more
        return data

    def finish(self):
        """After the tar's end: zero padding up to the end of the gzip member, then nothing."""
        padding = 0
        for data in iter(lambda: self.read(_CHUNK), b""):
            padding += len(data)
            if data.count(0) != len(data):
                raise ArchiveError("data after the tar's end-of-archive blocks")
            if padding > _MAX_PADDING:
                raise ArchiveError(f"more than {_MAX_PADDING} bytes of padding after the tar's end-of-archive blocks")
        if self.inflater.unused_data or self.raw.read(1):
            raise ArchiveError("data after the gzip stream (a second gzip member or trailing garbage)")


def _gzip_reason(zlib_message, seen):
    if "incorrect data check" in zlib_message:
        return "gzip CRC32 does not match the data (corrupt stream)"
    if "incorrect length check" in zlib_message:
        return "gzip length (ISIZE) does not match the data (corrupt stream)"
    if "header" in zlib_message or "compression method" in zlib_message or seen < 10:
        return f"not a gzip'd tar archive ({zlib_message.rpartition(': ')[2]})"
    return f"corrupt gzip stream ({zlib_message.rpartition(': ')[2]})"


class _CheckedMember(io.RawIOBase):
    """Reads one tar member's `size` bytes, hashing as it goes; `verify()` checks it against the manifest."""

    def __init__(self, stream, size, entry, name):
        self.stream, self.remaining, self.size, self.entry, self.name = stream, size, size, entry, name
        self.sha256 = hashlib.sha256()

    def readable(self):
        return True

    def readinto(self, buffer):
        data = self.stream.read_exact(min(len(buffer), self.remaining), self.name)
        self.remaining -= len(data)
        self.sha256.update(data)
        buffer[: len(data)] = data
        return len(data)

    def verify(self):
        buffer = bytearray(min(_CHUNK, self.remaining))  # what the consumer left (it may have closed its wrapper)
        while self.readinto(buffer):
            pass
        if self.size != self.entry["bytes"]:
            raise ArchiveError(f"size {self.size} != manifest {self.entry['bytes']}", self.name)
        if self.sha256.hexdigest() != self.entry["sha256"]:
            raise ArchiveError("sha256 does not match the manifest", self.name)


def read_archive(fileobj, limits=Limits()):
    """Yields ('manifest.json', manifest, None), then (dataset, entry, member) per member: read each member
    (a binary stream) before asking for the next. Ends after the whole gzip stream was checked."""
    stream = _Gzip(fileobj)
    manifest, seen, total, count = None, set(), 0, 0
    while (header := _read_header(stream)) is not None:
        name, size = header
        count += 1
        if count > limits.max_members:
            raise ArchiveError(f"more than {limits.max_members} members")
        total += size
        if size > limits.max_member_bytes or total > limits.max_total_bytes:
            raise ArchiveError("member or archive larger than the configured limit", name)
        if manifest is None:
            manifest = _read_manifest(stream, name, size, limits)
            yield MANIFEST_NAME, manifest, None
            continue
        dataset = name[: -len(".csv")] if name.endswith(".csv") else None
        if dataset not in manifest["datasets"]:
            raise ArchiveError("not announced in the manifest", name)
        if dataset in seen:
            raise ArchiveError("appears twice", name)
        seen.add(dataset)
        member = _CheckedMember(stream, size, manifest["datasets"][dataset], name)
        yield dataset, manifest["datasets"][dataset], member
        member.verify()
        _skip_padding(stream, size, name)
    if _read_block(stream) != _ZERO_BLOCK:
        raise ArchiveError("the tar's end-of-archive is one zero block, not two")
    stream.finish()
    if manifest is None:
        raise ArchiveError("empty archive: no manifest")
    if missing := set(manifest["datasets"]) - seen:
        raise ArchiveError(f"datasets in the manifest but not in the archive: {sorted(missing)}")


def _read_block(stream):
    return stream.read_exact(_BLOCK, truncated="truncated tar: the stream ends without the end-of-archive blocks")


def _read_header(stream):
    """The next member's (printable name, size), or None at the end; refuses all but regular files, from the header."""
    block = _read_block(stream)
    if block == _ZERO_BLOCK:
        return None
    if _number(block[148:156]) != sum(block[:148]) + 8 * ord(" ") + sum(block[156:]):
        raise ArchiveError("not a tar archive (a header's checksum does not match)")
    if block[257:265] not in _USTAR_MAGIC:
        raise ArchiveError("not a ustar archive (a header without the ustar magic)")
    name = _field(block[:100])
    if block[257:265] == _USTAR_MAGIC[0] and _field(block[345:500]):
        name = _field(block[345:500]) + b"/" + name
    name, kind = printable(name.decode("utf-8", "backslashreplace")), block[156:157]
    if kind in _NOT_REGULAR:
        raise ArchiveError(f"not a regular file (links, devices, FIFOs and directories are refused): "
                           f"a {_NOT_REGULAR[kind]}", name)
    if kind in _EXTENSIONS:
        raise ArchiveError(f"{_EXTENSIONS[kind]} (type {kind.decode()!r}) refused: archives are plain ustar", name)
    if kind not in (b"0", b"\0"):
        raise ArchiveError(f"member type {printable(kind.decode('latin-1'))!r} refused: only regular files", name)
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        raise ArchiveError("member path must be a plain file name", name)
    return name, _number(block[124:136], name)


def _field(data):
    return data.split(b"\0", 1)[0]


def _number(field, name=None):
    """A numeric header field: octal digits (NUL/space padded), or GNU base-256 for large sizes."""
    if field[0] == 0x80:
        return int.from_bytes(field[1:], "big")
    digits = field.strip(b" \0")
    if not re.fullmatch(rb"[0-7]*", digits):
        raise ArchiveError("not a tar archive (a header's numeric field is not octal)", name)
    return int(digits or b"0", 8)


def _skip_padding(stream, size, name):
    padding = stream.read_exact(-size % _BLOCK, name)
    if padding.count(0) != len(padding):
        raise ArchiveError("data hidden in the padding after this member", name)


def _read_manifest(stream, name, size, limits):
    if name != MANIFEST_NAME:
        raise ArchiveError(f"first member must be {MANIFEST_NAME}", name)
    if size > limits.max_manifest_bytes:
        raise ArchiveError(f"manifest larger than the configured limit ({limits.max_manifest_bytes} bytes)",
                           MANIFEST_NAME)
    data = stream.read_exact(size, MANIFEST_NAME)
    _skip_padding(stream, size, MANIFEST_NAME)
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ArchiveError(f"manifest is not JSON or nested too deeply ({type(exc).__name__})", MANIFEST_NAME) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:  # before a message quotes it
        raise ArchiveError(f"unsupported manifest format (this server reads format {FORMAT_VERSION})", MANIFEST_NAME)
    return validate_manifest(manifest)


def csv_rows(member, limits=Limits(), name=None):
    """Rows of a CSV member (header included): strict UTF-8, '\\n' line ends, records (lines, or several when
    a quoted field holds newlines) refused as soon as they pass max_line_bytes, never held whole."""
    raw, limit, record, number = io.BufferedReader(member, _CHUNK), limits.max_line_bytes, 0, 0

    def lines():
        nonlocal record, number
        while line := raw.readline(limit - record + 1):
            number += 1
            record += len(line)
            if record > limit:
                raise ArchiveError(f"line {number}: a line longer than {limit} bytes", name)
            if b"\r" in line:  # the format ends lines with '\n' alone: a '\r' would not survive LOAD DATA unchanged
                raise ArchiveError(f"line {number}: carriage return in the CSV (lines must end with \\n only)", name)
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ArchiveError(f"line {number}: invalid UTF-8 ({exc.reason} at byte {exc.start})", name) from None
            yield text

    try:
        for row in csv.reader(lines(), strict=True):
            record = 0
            yield row
    except csv.Error as exc:
        raise ArchiveError(f"line {number}: CSV does not parse ({exc})", name) from None


def validate(fileobj, agent_id, geo, hour, limits=Limits(), catalog=CATALOG):
    """Check a whole archive stream against the transaction and the catalog; returns {dataset: row count}."""
    hour = hours.floor_hour(hour)
    counts = {}
    for name, entry, member in read_archive(fileobj, limits):
        if member is None:
            _check_manifest(entry, agent_id, geo, hour, catalog)
            continue
        counts[name] = _check_rows(catalog[name], entry, member, hour, limits)
    return counts


def _check_manifest(manifest, agent_id, geo, hour, catalog):
    for key, expected, whose in (("agent_id", agent_id, "the transaction's agent"),
                                 ("geo", geo, "the agent's registered geo"),  # it reaches every document
                                 ("hour", hours.format_hour(hour), "the transaction's hour")):  # [:80]: no-op
        if manifest[key] != expected:
            raise ArchiveError(f"{key} {manifest[key][:80]!r} is not {whose} {expected!r}", MANIFEST_NAME)
    if unknown := sorted(set(manifest["datasets"]) - set(catalog)):
        raise ArchiveError(f"unknown datasets {unknown[:10]}", MANIFEST_NAME)
    if missing := sorted(set(catalog) - set(manifest["datasets"])):
        raise ArchiveError(f"missing datasets {missing}", MANIFEST_NAME)


def _check_rows(dataset, entry, member, hour, limits):
    name = entry["file"]
    rows = csv_rows(member, limits, name)
    header = next(rows, None)
    if header is None:
        raise ArchiveError("empty file: no header row", name)
    try:
        dataset.check_header(header)
    except RowError as exc:
        raise ArchiveError(str(exc), name) from None
    count = 0
    for count, values in enumerate(rows, 1):
        try:
            dataset.parse_row(values, hour)
        except RowError as exc:
            raise ArchiveError(f"row {count}: {exc}", name) from None
    if count != entry["rows"]:
        raise ArchiveError(f"{count} rows, manifest says {entry['rows']}", name)
    return count


def check_file(path, agent_id, geo, hour, limits=Limits(), catalog=CATALOG):
    """(counts, sha256 of the file's bytes); an ArchiveError carries `file_sha256` too, so the caller can tell
    an agent's bad archive from a server copy that no longer matches what was uploaded."""
    with open(path, "rb") as raw:
        reader = _HashingReader(raw)
        try:
            counts = validate(reader, agent_id, geo, hour, limits, catalog)
        except ArchiveError as exc:
            exc.args = (_fit_for_a_log(str(exc)),)
            exc.file_sha256 = reader.drain()
            raise exc from None
        return counts, reader.drain()


def _fit_for_a_log(message):
    """The refusal as it reaches the API log, the JSON reason and the transaction log: escaped and short."""
    message = printable(message)
    return message[:_MAX_REASON] + ("..." if len(message) > _MAX_REASON else "")


install = files.move_durably  # a verified archive to its final path, atomically and durably (same filesystem)


def reason_path(quarantine_path):
    return quarantine_path.removesuffix(".tar.gz") + ".reason.json"


def quarantine(src, dest, reason, detail=None):
    """Keep a rejected archive at `dest`, its `<tx>.reason.json` written first beside it; returns that path."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    why = reason_path(dest)
    record = dict(detail or {}, reason=reason,
                  quarantined_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
    write_json(why, record)
    files.move_durably(src, dest)
    return why


def read_reason(quarantine_path):
    return read_json(reason_path(quarantine_path))


