"""The archive format, written here once; the server reads it (ganymede.archives).

A gzip'd ustar file: `manifest.json` first, then one `<dataset>.csv` per
dataset (UTF-8, header row, '\\n' line ends, minimal quoting plus quotes around
any field holding a '\\r'; SQL NULL is an empty field, see docs/agent.md).
Everything that could vary between two builds of the same rows is pinned
(member order, times, owners, modes, gzip header, compression level), so the
same rows give byte-identical archives.
"""
import csv
import gzip
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from datetime import datetime, timezone
from itertools import islice

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_DATASET_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_BATCH = 5000  # rows rendered as CSV at a time


class ArchiveError(Exception):
    """An archive that must not be accepted; `member` names the offending file."""

    def __init__(self, message, member=None):
        super().__init__(message if member is None else f"{member}: {message}")
        self.member = member


def _csv_text(rows):
    """Rows as CSV text. The csv module quotes a field holding '\\n' but not one holding only '\\r',
    which a reader would then take for a line end: such rows are written with every field quoted."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    if "\r" not in out.getvalue():
        return out.getvalue()
    out = io.StringIO()
    minimal, quoted = (csv.writer(out, lineterminator="\n", quoting=q) for q in (csv.QUOTE_MINIMAL, csv.QUOTE_ALL))
    for row in rows:
        (quoted if any(isinstance(v, str) and "\r" in v for v in row) else minimal).writerow(row)
    return out.getvalue()


def write_csv(path, header, rows):
    """Stream rows (None as an empty field) into a CSV file at `path`; returns (row_count, sha256 hex, size)."""
    count, rows = 0, iter(rows)
    with open(path, "w", encoding="utf-8", newline="") as out:
        out.write(_csv_text([header]))
        while batch := list(islice(rows, _BATCH)):
            count += len(batch)
            out.write(_csv_text(batch))
    return count, sha256_file(path), os.path.getsize(path)


def _tarinfo(name, size, mtime):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def build_archive(dest, manifest_fields, datasets, workdir=None, compresslevel=1):
    """Stream (name, header, rows) datasets via `workdir` into an archive at `dest`; returns the manifest."""
    workdir = workdir or os.path.dirname(os.path.abspath(dest))
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir, prefix=".build-") as tmp:
        entries = {}
        for name, header, rows in datasets:
            if not _DATASET_NAME.match(name):
                raise ArchiveError(f"invalid dataset name {name!r}")
            count, digest, size = write_csv(os.path.join(tmp, name + ".csv"), header, rows)
            entries[name] = {"file": name + ".csv", "rows": count, "sha256": digest, "bytes": size}
        manifest = dict(manifest_fields, format=FORMAT_VERSION, datasets=dict(sorted(entries.items())))
        manifest_bytes = json.dumps(manifest, sort_keys=True, indent=1).encode() + b"\n"
        mtime = _hour_epoch(manifest["hour"])
        part = dest + ".tmp"
        with open(part, "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", compresslevel=compresslevel, fileobj=raw, mtime=0) as gz, \
                    tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                tar.addfile(_tarinfo(MANIFEST_NAME, len(manifest_bytes), mtime), io.BytesIO(manifest_bytes))
                for entry in manifest["datasets"].values():
                    with open(os.path.join(tmp, entry["file"]), "rb") as csv_file:
                        tar.addfile(_tarinfo(entry["file"], entry["bytes"], mtime), csv_file)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(part, dest)
        fsync_path(os.path.dirname(os.path.abspath(dest)))
    return manifest


def _hour_epoch(hour_text):
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
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def validate_manifest(manifest):
    """The manifest's own shape; the server checks agent and hour against its transaction."""
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if type(found) is not int or found != FORMAT_VERSION:  # not True, not 1.0: they equal 1
        raise ArchiveError(f"unsupported manifest format {found!r}", MANIFEST_NAME)
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
            if type(entry.get(field)) is not int or entry[field] < 0:  # bool is an int, but not a count
                raise ArchiveError(f"dataset {name!r}: invalid {field!r}", MANIFEST_NAME)
        if not isinstance(entry.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
            raise ArchiveError(f"dataset {name!r}: invalid 'sha256'", MANIFEST_NAME)
    return manifest
