"""Server-side checks of an uploaded archive, and where it goes afterwards.

The format itself (and its refusal of links, devices, odd paths and oversize
members) lives in `ganymede_agent.archive`; here the archive is checked
against what the server knows: the transaction's agent and hour, the dataset
catalog, and every row parsed as the pipeline will parse it. An archive that
passes is installed under upload/, one that does not is quarantined with the
reason beside it. Plain functions over paths; the API runs them off its loop.
"""
import csv
import hashlib
import io
import json
import os
import tarfile
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone

from ganymede_agent.archive import MANIFEST_NAME, ArchiveError, validate_manifest

from . import files, hours
from .markers import write_json
from .datasets import CATALOG, RowError

_CHUNK = 1 << 20


class _HashingReader:
    """A read-only file wrapper that hashes every byte the reader takes."""

    def __init__(self, raw):
        self.raw, self.sha256, self.size = raw, hashlib.sha256(), 0

    def read(self, n=-1):
        data = self.raw.read(n)
        self.sha256.update(data)
        self.size += len(data)
        return data

    def drain(self):
        for data in iter(lambda: self.read(_CHUNK), b""):
            pass
        return self.sha256.hexdigest()


# --- reading an archive stream -------------------------------------------------

@dataclass(frozen=True)
class Limits:
    """What a reader accepts; the server sets these from its config."""
    max_member_bytes: int = 2 << 30
    max_total_bytes: int = 8 << 30
    max_manifest_bytes: int = 1 << 20
    max_members: int = 64
    max_line_bytes: int = 64 << 10


class _CheckedMember(io.RawIOBase):
    """Reads one tar member, hashing as it goes; `verify()` checks it against the manifest."""

    def __init__(self, raw, entry, name):
        self.raw, self.entry, self.name = raw, entry, name
        self.sha256, self.size = hashlib.sha256(), 0

    def readable(self):
        return True

    def readinto(self, buffer):
        data = self.raw.read(len(buffer))
        self.sha256.update(data)
        self.size += len(data)
        buffer[: len(data)] = data
        return len(data)

    def drain(self):
        """Read what the consumer left (it may have closed its wrapper around us)."""
        for data in iter(lambda: self.raw.read(_CHUNK), b""):
            self.sha256.update(data)
            self.size += len(data)

    def verify(self):
        self.drain()
        if self.size != self.entry["bytes"]:
            raise ArchiveError(f"size {self.size} != manifest {self.entry['bytes']}", self.name)
        if self.sha256.hexdigest() != self.entry["sha256"]:
            raise ArchiveError("sha256 does not match the manifest", self.name)


def read_archive(fileobj, limits=Limits()):
    """Stream an archive: yields ('manifest', manifest, None) then (name, entry, member) per dataset.

    The caller reads each member (a binary stream) before asking for the next
    and calls `member.verify()` to check size and sha256; unread members are
    verified here. Raises ArchiveError for anything malformed or unsafe.
    """
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r|gz")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ArchiveError(f"not a gzip'd tar archive ({exc})") from None
    manifest, seen, total = None, set(), 0
    try:
        with tar:
            for count, info in enumerate(tar, 1):
                name = info.name
                if count > limits.max_members:
                    raise ArchiveError(f"more than {limits.max_members} members")
                _check_member(info)
                total += info.size
                if info.size > limits.max_member_bytes or total > limits.max_total_bytes:
                    raise ArchiveError("member or archive larger than the configured limit", name)
                if manifest is None:
                    manifest = _read_manifest(tar, info, limits)
                    yield MANIFEST_NAME, manifest, None
                    continue
                dataset = name[: -len(".csv")] if name.endswith(".csv") else None
                if dataset not in manifest["datasets"]:
                    raise ArchiveError("not announced in the manifest", name)
                if dataset in seen:
                    raise ArchiveError("appears twice", name)
                seen.add(dataset)
                member = _CheckedMember(tar.extractfile(info), manifest["datasets"][dataset], name)
                yield dataset, manifest["datasets"][dataset], member
                member.verify()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise ArchiveError(f"corrupt archive ({exc})") from None
    if manifest is None:
        raise ArchiveError("empty archive: no manifest")
    missing = set(manifest["datasets"]) - seen
    if missing:
        raise ArchiveError(f"datasets in the manifest but not in the archive: {sorted(missing)}")


def _check_member(info):
    name = info.name
    if not info.isreg():
        raise ArchiveError("not a regular file (links, devices, FIFOs and directories are refused)", name)
    if name.startswith("/") or "\\" in name or "/" in name or name in ("", ".", "..") or "\x00" in name:
        raise ArchiveError("member path must be a plain file name", name)


def _read_manifest(tar, info, limits):
    if info.name != MANIFEST_NAME:
        raise ArchiveError(f"first member must be {MANIFEST_NAME}", info.name)
    if info.size > limits.max_manifest_bytes:
        raise ArchiveError("manifest too large", MANIFEST_NAME)
    try:
        manifest = json.loads(tar.extractfile(info).read().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ArchiveError(f"manifest is not JSON or nested too deeply ({type(exc).__name__})", MANIFEST_NAME) from None
    return validate_manifest(manifest)


def _lf_lines(text, name):
    """The format ends lines with '\n' alone; a '\r' anywhere would not survive LOAD DATA unchanged."""
    for line in text:
        if "\r" in line:
            raise ArchiveError("carriage return in the CSV (lines must end with \\n only)", name)
        yield line


def csv_rows(member, limits=Limits(), name=None):
    """Rows of a CSV member (header included), strict UTF-8, bounded line length."""
    text = io.TextIOWrapper(io.BufferedReader(member, _CHUNK), encoding="utf-8", errors="strict", newline="")
    try:
        for row in csv.reader(_lf_lines(text, name), strict=True):
            if sum(map(len, row)) > limits.max_line_bytes:
                raise ArchiveError(f"a line longer than {limits.max_line_bytes} bytes", name)
            yield row
    except UnicodeDecodeError as exc:
        raise ArchiveError(f"invalid UTF-8 ({exc.reason} at byte {exc.start})", name) from None
    except csv.Error as exc:
        raise ArchiveError(f"CSV does not parse ({exc})", name) from None


# --- checks against what the server knows ----------------------------------------

def validate(fileobj, agent_id, geo, hour, limits=Limits(), catalog=CATALOG):
    """Check a whole archive stream; returns {dataset: row count} or raises ArchiveError.

    On top of the format's own checks: the manifest names this agent, its registered geo and the hour,
    its datasets are exactly the catalog's, every header is the catalog's and
    every row parses (Dataset.parse_row) and row counts match the manifest.
    """
    hour = hours.floor_hour(hour)
    counts = {}
    try:
        for name, entry, member in read_archive(fileobj, limits):
            if member is None:
                _check_manifest(entry, agent_id, geo, hour, catalog)
                continue
            counts[name] = _check_rows(catalog[name], entry, member, hour, limits)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        # raised while *we* read a member, outside read_archive's own guard
        raise ArchiveError(f"corrupt archive ({exc})") from None
    return counts


def _check_manifest(manifest, agent_id, geo, hour, catalog):
    if manifest["agent_id"] != agent_id:
        raise ArchiveError(f"agent_id {manifest['agent_id']!r} is not the transaction's agent {agent_id!r}",
                           "manifest.json")
    if manifest["geo"] != geo:  # it reaches every document and extract line: only the registered value may
        raise ArchiveError(f"geo {manifest['geo'][:80]!r} is not the agent's registered geo {geo!r}", "manifest.json")
    if manifest["hour"] != hours.format_hour(hour):
        raise ArchiveError(f"hour {manifest['hour']!r} is not the transaction's hour {hours.format_hour(hour)!r}",
                           "manifest.json")
    unknown = sorted(set(manifest["datasets"]) - set(catalog))
    if unknown:
        raise ArchiveError(f"unknown datasets {unknown}", "manifest.json")
    missing = sorted(set(catalog) - set(manifest["datasets"]))
    if missing:
        raise ArchiveError(f"missing datasets {missing}", "manifest.json")


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
    """Validate the archive at `path`: returns (counts, sha256 of the file's bytes).

    An ArchiveError raised here carries `file_sha256` too, so the caller can
    tell an agent's bad archive from a server copy that no longer matches
    what was uploaded.
    """
    with open(path, "rb") as raw:
        reader = _HashingReader(raw)
        try:
            counts = validate(reader, agent_id, geo, hour, limits, catalog)
        except ArchiveError as exc:
            exc.file_sha256 = reader.drain()
            raise
        return counts, reader.drain()


def reason_path(quarantine_path):
    """quarantine/…/<tx>.tar.gz -> quarantine/…/<tx>.reason.json"""
    base = quarantine_path[: -len(".tar.gz")] if quarantine_path.endswith(".tar.gz") else quarantine_path
    return base + ".reason.json"


def install(src, dest):
    """Move a verified archive to its final path atomically and durably (same filesystem)."""
    return files.move_durably(src, dest)


def quarantine(src, dest, reason, detail=None):
    """Keep a rejected archive at `dest` with `<tx>.reason.json` beside it; returns the reason file's path.

    The reason is written first, so an archive in quarantine always has one.
    """
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    why = reason_path(dest)
    record = dict(detail or {}, reason=reason,
                  quarantined_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
    write_json(why, record)
    files.move_durably(src, dest)
    return why


def read_reason(quarantine_path):
    with open(reason_path(quarantine_path)) as f:
        return json.load(f)


