"""ganymede.archives: server-side validation of crafted archives, install and quarantine.

The helpers at the top build archives member by member (valid ones and every
kind of bad one); test_api.py imports them to send the same archives through
the API.
"""
import gzip
import hashlib
import io
import json
import os
import tarfile
from datetime import datetime

import pytest
from ganymede.archives import Limits
from ganymede_agent.archive import ArchiveError, sha256_file

from ganymede import archives, hours

HOUR = datetime(2026, 11, 30, 5)
AGENT = "geo-test-1"
HEADERS = {
    "account_usage": ["account_id", "bytes_stored", "objects", "bytes_in", "bytes_out", "requests"],
    "api_requests": ["method", "endpoint", "status", "count", "bytes", "latency_p50_ms", "latency_p95_ms"],
    "node_health": ["node_id", "sampled_at", "disk_total_bytes", "disk_used_bytes", "load_1m", "errors"],
}


def valid_rows(hour, n=3):
    """Rows every catalog rule accepts, for each dataset."""
    stamp = hours.floor_hour(hour)
    return {
        "account_usage": [[f"acct-{i:04d}", str(1000 * i), str(i), str(7 * i), str(3 * i), str(11 * i)]
                          for i in range(n)],
        "api_requests": [["GET", f"/v1/objects/{i}", "200", str(10 + i), str(1000 + i), "1.5", "3.25"]
                         for i in range(n)],
        "node_health": [[f"node-{i:02d}", stamp.replace(minute=i % 60).isoformat(), "1000000", str(1000 * (i % 1000)),
                         "0.5", "0"] for i in range(n)],
    }


def csv_bytes(header, rows):
    return "".join(",".join(r) + "\n" for r in [header] + rows).encode()


def dataset_files(hour, n=3, rows=None):
    """{dataset: CSV bytes} for a valid archive."""
    rows = rows or valid_rows(hour, n)
    return {name: csv_bytes(HEADERS[name], rows[name]) for name in HEADERS}


def manifest_for(agent_id, hour, files, **overrides):
    entries = {name: {"file": name + ".csv", "rows": max(0, data.count(b"\n") - 1),
                      "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
               for name, data in files.items()}
    manifest = {"format": 1, "agent_id": agent_id, "geo": "test", "hour": hours.format_hour(hour),
                "agent_version": "test", "datasets": entries}
    manifest.update(overrides)
    return manifest


def member(name, data=b"", kind=tarfile.REGTYPE, linkname="", size=None):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = kind, linkname, 0o644, 0
    info.size = len(data) if size is None else size
    return info, data


def write_tar_gz(path, members):
    """A gzip'd tar of exactly these (TarInfo, bytes) members, in order."""
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for info, data in members:
                tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return str(path)


def archive(path, agent_id=AGENT, hour=HOUR, files=None, manifest=None, extra=(), before=()):
    """A valid archive unless told otherwise: `files` replaces the CSVs, `manifest` the manifest,
    `extra` members go after the CSVs and `before` ones before the manifest."""
    files = dataset_files(hour) if files is None else files
    manifest = manifest_for(agent_id, hour, files) if manifest is None else manifest
    members = list(before) + [member("manifest.json", json.dumps(manifest).encode())]
    members += [member(name + ".csv", data) for name, data in files.items()] + list(extra)
    return write_tar_gz(path, members)


def check(path, agent_id=AGENT, hour=HOUR, limits=Limits(), geo="test"):
    return archives.check_file(str(path), agent_id, geo, hour, limits)


# --- valid archives -------------------------------------------------------------

def test_valid_archive_counts_rows_and_hashes_the_file(tmp_path):
    path = archive(tmp_path / "a.tar.gz", files=dataset_files(HOUR, n=5))
    counts, digest = check(path)
    assert counts == {"account_usage": 5, "api_requests": 5, "node_health": 5}
    assert digest == sha256_file(path)


def test_archive_built_by_the_agent_passes(tmp_path):
    from ganymede_agent.archive import build_archive
    rows = valid_rows(HOUR, 4)
    dest = str(tmp_path / "agent.tar.gz")
    build_archive(dest, {"agent_id": AGENT, "geo": "test", "hour": hours.format_hour(HOUR), "agent_version": "test"},
                  [(name, HEADERS[name], rows[name]) for name in HEADERS])
    assert check(dest)[0] == {"account_usage": 4, "api_requests": 4, "node_health": 4}


def test_a_large_archive_is_the_same_bytes_however_its_rows_arrive(tmp_path):
    """Rows as a list or a generator give one archive, byte for byte, that standard gzip and tar read back
    exactly."""
    from ganymede_agent.archive import build_archive
    hour_text = hours.format_hour(HOUR)
    rows = [[f"acct-{i:07d}", 10_000 + i, i % 977, 100 * i, 50 * i, i % 13] for i in range(200_000)]
    csv_bytes = "".join(",".join(map(str, r)) + "\n" for r in rows).encode()
    fields = {"agent_id": AGENT, "geo": "test", "hour": hour_text, "agent_version": "test"}

    built = []
    for n, source in enumerate((rows, iter(rows))):
        dest = str(tmp_path / f"a{n}.tar.gz")
        build_archive(dest, fields, [("account_usage", HEADERS["account_usage"], source),
                                     ("api_requests", HEADERS["api_requests"], []), ("node_health", HEADERS["node_health"], [])])
        built.append(open(dest, "rb").read())
    assert built[0] == built[1]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(built[0]))) as tar:
        member = tar.extractfile("account_usage.csv").read()
    assert member == (",".join(HEADERS["account_usage"]) + "\n").encode() + csv_bytes
    assert check(str(tmp_path / "a0.tar.gz"))[0] == {"account_usage": 200_000, "api_requests": 0, "node_health": 0}


def test_a_manifest_geo_other_than_the_registered_one_is_refused(tmp_path):
    with pytest.raises(ArchiveError, match="registered geo"):
        check(archive(tmp_path / "a.tar.gz"), geo="eu-west")


def test_carriage_returns_are_refused(tmp_path):
    files = dataset_files(HOUR)
    files["account_usage"] = files["account_usage"].replace(b"\n", b"\r\n")
    with pytest.raises(ArchiveError, match="carriage return"):
        check(archive(tmp_path / "a.tar.gz", files=files))


def test_empty_datasets_are_valid(tmp_path):
    path = archive(tmp_path / "a.tar.gz", files={name: csv_bytes(HEADERS[name], []) for name in HEADERS})
    assert check(path)[0] == {"account_usage": 0, "api_requests": 0, "node_health": 0}


# --- refused archives -----------------------------------------------------------

def _bad_row(dataset, index, value):
    rows = valid_rows(HOUR)
    rows[dataset][1][index] = value
    return dataset_files(HOUR, rows=rows)


def _files_with(name, data):
    files = dataset_files(HOUR)
    files[name] = data
    return files


BAD = {
    # member kinds and names that must never be accepted
    "symlink": (dict(extra=[member("evil.csv", kind=tarfile.SYMTYPE, linkname="/etc/passwd")]), "not a regular file"),
    "hardlink": (dict(extra=[member("evil.csv", kind=tarfile.LNKTYPE, linkname="manifest.json")]),
                 "not a regular file"),
    "char device": (dict(extra=[member("null.csv", kind=tarfile.CHRTYPE)]), "not a regular file"),
    "block device": (dict(extra=[member("sda.csv", kind=tarfile.BLKTYPE)]), "not a regular file"),
    "fifo": (dict(extra=[member("pipe.csv", kind=tarfile.FIFOTYPE)]), "not a regular file"),
    "directory": (dict(extra=[member("sub", kind=tarfile.DIRTYPE)]), "not a regular file"),
    "absolute path": (dict(extra=[member("/etc/cron.d/evil", b"x")]), "plain file name"),
    "dot-dot path": (dict(extra=[member("../../evil.csv", b"x")]), "plain file name"),
    "nested path": (dict(extra=[member("sub/evil.csv", b"x")]), "plain file name"),
    "link before manifest": (dict(before=[member("x", kind=tarfile.SYMTYPE, linkname="/")]), "not a regular file"),
    # the manifest against the transaction and the catalog
    "other agent": (dict(agent_id="geo-other"), "is not the transaction's agent"),
    "other hour": (dict(hour=datetime(2026, 11, 30, 4)), "is not the transaction's hour"),
    "unknown dataset": (dict(files=_files_with("secrets", b"a\n")), "unknown datasets ['secrets']"),
    "missing dataset": (dict(files={k: v for k, v in dataset_files(HOUR).items() if k != "node_health"}),
                        "missing datasets ['node_health']"),
    "member not in manifest": (dict(extra=[member("extra.csv", b"a\n")]), "not announced in the manifest"),
    "member twice": (dict(extra=[member("node_health.csv", dataset_files(HOUR)["node_health"])]), "appears twice"),
    # CSV contents
    "header mismatch": (dict(files=_files_with("account_usage", csv_bytes(["account", "bytes"], []))), "header"),
    "empty csv": (dict(files=_files_with("api_requests", b"")), "no header row"),
    "negative value": (dict(files=_bad_row("account_usage", 1, "-5")), "row 2: bytes_stored: negative"),
    "not an integer": (dict(files=_bad_row("api_requests", 3, "many")), "row 2: count: not an integer"),
    "formula injection": (dict(files=_bad_row("account_usage", 0, "=cmd()")), "not a plain identifier"),
    "sample outside the hour": (dict(files=_bad_row("node_health", 1, "2026-11-30T06:00:00")), "outside the hour"),
    "short row": (dict(files=_files_with("account_usage", csv_bytes(HEADERS["account_usage"], [["a", "1"]]))),
                  "2 fields, expected 6"),
    "bad utf-8": (dict(files=_files_with("account_usage", csv_bytes(HEADERS["account_usage"], [])
                                         + b"acct-\xff\xfe,1,1,1,1,1\n")), "invalid UTF-8"),
    "unterminated quote": (dict(files=_files_with("account_usage", csv_bytes(HEADERS["account_usage"], [])
                                                  + b'"acct,1,1,1,1,1\n')), "CSV does not parse"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_refused(tmp_path, case):
    kwargs, reason = BAD[case]
    agent_id, hour = kwargs.pop("agent_id", AGENT), kwargs.pop("hour", HOUR)
    files = kwargs.get("files")
    if agent_id != AGENT or hour != HOUR:
        kwargs["manifest"] = manifest_for(agent_id, hour, files or dataset_files(HOUR))
    path = archive(tmp_path / "a.tar.gz", **kwargs)
    with pytest.raises(ArchiveError) as err:
        check(path)
    assert reason in str(err.value)
    assert err.value.file_sha256 == sha256_file(path)


def test_row_count_must_match_the_manifest(tmp_path):
    files = dataset_files(HOUR)
    manifest = manifest_for(AGENT, HOUR, files)
    manifest["datasets"]["api_requests"]["rows"] = 7
    with pytest.raises(ArchiveError, match="api_requests.csv: 3 rows, manifest says 7"):
        check(archive(tmp_path / "a.tar.gz", files=files, manifest=manifest))


@pytest.mark.parametrize("found", [True, 1.0, "1", 2, None])
def test_only_the_integer_format_1_is_accepted(tmp_path, found):
    """True and 1.0 equal 1 in Python but are not the format the agent writes."""
    files = dataset_files(HOUR)
    manifest = manifest_for(AGENT, HOUR, files, format=found)
    with pytest.raises(ArchiveError, match="manifest.json: unsupported manifest format"):
        check(archive(tmp_path / "a.tar.gz", files=files, manifest=manifest))


def test_file_sha256_must_match_the_manifest(tmp_path):
    files = dataset_files(HOUR)
    manifest = manifest_for(AGENT, HOUR, files)
    files["account_usage"] = files["account_usage"].replace(b"acct-0001", b"acct-0009")  # same size, same rows
    with pytest.raises(ArchiveError, match="account_usage.csv: sha256 does not match the manifest"):
        check(archive(tmp_path / "a.tar.gz", files=files, manifest=manifest))


def test_gzip_bomb_refused_by_member_limit_before_inflating(tmp_path):
    """50 MB of zeros gzip to ~50 KB; the declared member size trips the limit before a byte is inflated."""
    bomb = member("node_health.csv", size=50 << 20)
    path = tmp_path / "bomb.tar.gz"
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb") as gz:
        files = dataset_files(HOUR)
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
            tar.addfile(*_as_file(member("manifest.json", json.dumps(manifest_for(AGENT, HOUR, files)).encode())))
            tar.addfile(bomb[0], io.BytesIO(bytes(50 << 20)))
    assert os.path.getsize(path) < 1 << 20
    with pytest.raises(ArchiveError, match="larger than the configured limit"):
        check(path, limits=Limits(max_member_bytes=1 << 20, max_total_bytes=4 << 20))


def test_total_uncompressed_size_limit(tmp_path):
    files = dataset_files(HOUR, n=2000)
    path = archive(tmp_path / "a.tar.gz", files=files)
    total = sum(map(len, files.values()))
    with pytest.raises(ArchiveError, match="larger than the configured limit"):
        check(path, limits=Limits(max_member_bytes=total, max_total_bytes=total // 2))
    assert check(path, limits=Limits(max_member_bytes=total, max_total_bytes=2 * total))[0]["node_health"] == 2000


def _as_file(pair):
    info, data = pair
    return info, io.BytesIO(data)


@pytest.mark.parametrize("content, reason", [
    (b"", "not a gzip'd tar archive"),
    (b"PK\x03\x04 a zip file", "not a gzip'd tar archive"),
    (gzip.compress(b"just text, not a tar" * 100), "archive"),
    (gzip.compress(json.dumps({"format": 1}).encode()), "archive"),
])
def test_not_a_tar_gz(tmp_path, content, reason):
    path = tmp_path / "x.tar.gz"
    path.write_bytes(content)
    with pytest.raises(ArchiveError, match=reason):
        check(path)


def test_truncated_archive(tmp_path):
    path = archive(tmp_path / "a.tar.gz", files=dataset_files(HOUR, n=3000))
    data = open(path, "rb").read()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArchiveError):
        check(tmp_path / "cut.tar.gz")


def test_manifest_must_come_first_and_be_json(tmp_path):
    files = dataset_files(HOUR)
    members = [member("account_usage.csv", files["account_usage"]),
               member("manifest.json", json.dumps(manifest_for(AGENT, HOUR, files)).encode())]
    with pytest.raises(ArchiveError, match="first member must be manifest.json"):
        check(write_tar_gz(tmp_path / "a.tar.gz", members))
    with pytest.raises(ArchiveError, match="manifest is not JSON"):
        check(write_tar_gz(tmp_path / "b.tar.gz", [member("manifest.json", b"{not json")]))


# --- install and quarantine -----------------------------------------------------------

def test_install_moves_atomically_into_place(tmp_path):
    src = archive(tmp_path / "incoming.part")
    dest = str(tmp_path / "upload" / "2026" / "11" / "30" / "05" / AGENT / "tx.tar.gz")
    digest = sha256_file(src)
    assert archives.install(src, dest) == dest
    assert not os.path.exists(src) and sha256_file(dest) == digest


def test_quarantine_keeps_archive_with_reason(tmp_path):
    src = tmp_path / "incoming.part"
    src.write_bytes(b"garbage")
    dest = str(tmp_path / "quarantine" / "2026" / "11" / "30" / "05" / AGENT / "tx.tar.gz")
    why = archives.quarantine(str(src), dest, "not a gzip'd tar archive", {"transaction_id": "tx"})
    assert why == dest[: -len(".tar.gz")] + ".reason.json" == archives.reason_path(dest)
    assert open(dest, "rb").read() == b"garbage" and not src.exists()
    record = archives.read_reason(dest)
    assert record["reason"] == "not a gzip'd tar archive" and record["transaction_id"] == "tx"
    assert record["quarantined_at"].endswith("Z")
    assert [p for p in os.listdir(os.path.dirname(dest)) if p.endswith(".tmp")] == []
