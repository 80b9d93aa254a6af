"""Server-side checks of an uploaded archive, and where it goes afterwards.

The format itself (and its refusal of links, devices, odd paths and oversize
members) lives in `ganymede_agent.archive`; here the archive is checked
against what the server knows: the transaction's agent and hour, the dataset
catalog, and every row parsed as the pipeline will parse it. An archive that
passes is installed under upload/, one that does not is quarantined with the
reason beside it. Plain functions over paths; the API runs them off its loop.
"""
import hashlib
import json
import os
import tarfile
import zlib
from datetime import datetime, timezone

from ganymede_agent.archive import ArchiveError, Limits, csv_rows, fsync_path, read_archive

from . import hours
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
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    fsync_path(src)
    os.replace(src, dest)
    fsync_path(os.path.dirname(dest))
    fsync_path(os.path.dirname(src))
    return dest


def quarantine(src, dest, reason, detail=None):
    """Keep a rejected archive at `dest` with `<tx>.reason.json` beside it; returns the reason file's path.

    The reason is written first, so an archive in quarantine always has one.
    """
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    why = reason_path(dest)
    record = dict(detail or {}, reason=reason,
                  quarantined_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
    write_json(why, record)
    os.replace(src, dest)
    fsync_path(os.path.dirname(dest))
    fsync_path(os.path.dirname(src))
    return why


def read_reason(quarantine_path):
    with open(reason_path(quarantine_path)) as f:
        return json.load(f)


