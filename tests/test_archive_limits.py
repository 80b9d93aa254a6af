"""ganymede.archives against hostile archives, at the production default limits.

Every archive here is written by hand, ustar headers and gzip stream byte by
byte (a writer independent of the code under test), and streamed to disk: a
GiB bomb costs the test one MB of disk and no memory. The memory cases run
check_file (what the API's complete runs) and a worker's read of the archive
in a subprocess and assert its peak RSS (VmHWM from /proc), never a duration.
"""
import gzip
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from types import SimpleNamespace

import pytest
from ganymede_agent.archive import ArchiveError, sha256_file

from ganymede import archives, config
from ganymede.api.base import limits_from_config
from conftest import require_port
from test_archives import AGENT, HEADERS, HOUR, csv_bytes, dataset_files, manifest_for

GIB_IN_MIB = 1024
PEAK_LIMIT_MB = 300
GNU_MAGIC = b"ustar  \0"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def limits():
    """The limits ganymede-api builds from luigi.cfg's defaults."""
    return limits_from_config(config.api())


# --- an independent writer: ustar headers and a gzip stream by hand ---------------------------------

def ustar_header(name, size, kind=b"0", magic=b"ustar\x0000", prefix=b"", size_field=None):
    """One 512-byte header as POSIX.1-1988 lays it out (offsets from the standard, checksum unsigned)."""
    block = bytearray(512)
    block[0:len(name)] = name
    block[100:108] = b"0000644\0"
    block[108:116] = block[116:124] = b"0000000\0"
    block[124:136] = size_field or b"%011o\0" % size
    block[136:148] = b"00000000000\0"
    block[156:157] = kind
    block[257:265] = magic
    block[345:345 + len(prefix)] = prefix
    block[148:156] = b"%06o\0 " % (sum(block) + 8 * ord(" "))
    return bytes(block)


class GzipWriter:
    """A gzip member written by hand (RFC 1952): 10-byte header, raw deflate, CRC32 and ISIZE."""

    def __init__(self, path):
        self.path, self.file, self.crc, self.size = path, open(path, "wb"), 0, 0
        self.file.write(b"\x1f\x8b\x08\x00\0\0\0\0\x00\xff")
        self.deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)

    def write(self, data):
        self.file.write(self.deflate.compress(data))
        self.crc, self.size = zlib.crc32(data, self.crc), self.size + len(data)

    def repeat(self, byte, mib):
        """`mib` MiB of one byte: one MiB deflated once (ending byte-aligned, no back-references) and repeated."""
        chunk = byte * (1 << 20)
        once = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        block = once.compress(chunk) + once.flush(zlib.Z_FULL_FLUSH)
        self.file.write(self.deflate.flush(zlib.Z_FULL_FLUSH))
        for _ in range(mib):
            self.file.write(block)
            self.crc = zlib.crc32(chunk, self.crc)
        self.size += mib << 20
        self.deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)

    def member(self, name, data, kind=b"0"):
        self.write(ustar_header(name, len(data), kind) + data + bytes(-len(data) % 512))

    def close(self):
        self.file.write(self.deflate.flush(zlib.Z_FINISH) + struct.pack("<II", self.crc, self.size & 0xFFFFFFFF))
        self.file.close()
        return self.path


def write_archive(path, *, before=(), manifest=None, files=None, extra=(), end=bytes(10240)):
    """A valid archive unless told otherwise: `before`/`extra` are callables that write to the GzipWriter
    before the manifest / after the CSVs; `end` follows the members (default: end-of-archive and padding)."""
    files = dataset_files(HOUR) if files is None else files
    gz = GzipWriter(str(path))
    for write in before:
        write(gz)
    gz.member(b"manifest.json", json.dumps(manifest or manifest_for(AGENT, HOUR, files)).encode())
    for name, data in files.items():
        gz.member(name.encode() + b".csv", data)
    for write in extra:
        write(gz)
    gz.write(end)
    return gz.close()


def raw(*blocks):
    return lambda gz: gz.write(b"".join(blocks))


def check(path, limits):
    return archives.check_file(str(path), AGENT, "test", HOUR, limits)


def test_the_hand_written_archive_is_a_gzip_tar_that_standard_readers_and_the_server_accept(tmp_path, limits):
    """The writer above is sound: Python's gzip and tarfile read it back, repeated blocks included."""
    path = write_archive(tmp_path / "a.tar.gz", extra=[raw(ustar_header(b"zeros", 3 << 20)), lambda gz: gz.repeat(b"\0", 3)])
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(open(path, "rb").read()))) as tar:
        assert tar.getnames() == ["manifest.json", "account_usage.csv", "api_requests.csv", "node_health.csv", "zeros"]
        assert tar.extractfile("api_requests.csv").read() == dataset_files(HOUR)["api_requests"]
        assert tar.extractfile("zeros").read() == bytes(3 << 20)
    with pytest.raises(ArchiveError, match="zeros: not announced in the manifest"):
        check(path, limits)
    assert check(write_archive(tmp_path / "b.tar.gz"), limits)[0] == {
        "account_usage": 3, "api_requests": 3, "node_health": 3}


def test_production_limits_are_the_documented_defaults(limits):
    """[api] max_member_mb = 4096, max_total_mb = 8192; the reader's own: 1 MiB manifest, 64 members, 64 KiB lines."""
    assert (limits.max_member_bytes, limits.max_total_bytes) == (4096 << 20, 8192 << 20)
    assert (limits.max_manifest_bytes, limits.max_members, limits.max_line_bytes) == (1 << 20, 64, 65536)
    assert archives.Limits() == limits, "the worker reads with Limits(): it must accept what the API accepted"


# --- every header kind but a regular file is refused from its header ---------------------------------

def _manifest_bytes():
    return json.dumps(manifest_for(AGENT, HOUR, dataset_files(HOUR))).encode()


def _csv_with(name, data):
    files = dataset_files(HOUR)
    files[name] = data
    return files


def _with_body(name, body, kind, magic=b"ustar\x0000"):
    return raw(ustar_header(name, len(body), kind, magic), body, bytes(-len(body) % 512))


def _padding_not_zero():
    """account_usage.csv, announced and intact, but the bytes that pad it to 512 are not zeros."""
    files = dataset_files(HOUR)
    data = files.pop("account_usage")
    assert len(data) % 512
    return dict(manifest=manifest_for(AGENT, HOUR, dict(files, account_usage=data)), files=files,
                extra=[raw(ustar_header(b"account_usage.csv", len(data)), data, b"\x01" * (-len(data) % 512))])


REFUSED = {
    # id: (write_archive keyword arguments, reason in the ArchiveError)
    "pax-extended": (dict(before=[_with_body(b"PaxHeaders/x", b"27 path=../../evil.csv\n", b"x")]),
                     "PaxHeaders/x: pax extended header (type 'x') refused"),
    "pax-global": (dict(before=[_with_body(b"pax_global_header", b"19 comment=hello\n", b"g")]),
                   "pax global header (type 'g') refused"),
    "gnu-long-name": (dict(extra=[_with_body(b"././@LongLink", b"a" * 300 + b"\0", b"L", GNU_MAGIC)]),
                      "GNU long name header (type 'L') refused"),
    "gnu-long-link": (dict(extra=[_with_body(b"././@LongLink", b"b" * 300 + b"\0", b"K", GNU_MAGIC)]),
                      "GNU long link header (type 'K') refused"),
    "gnu-sparse": (dict(extra=[_with_body(b"sparse.csv", bytes(512), b"S", GNU_MAGIC)]),
                   "sparse.csv: GNU sparse file (type 'S') refused"),
    "contiguous": (dict(extra=[_with_body(b"contig.csv", b"a\n", b"7")]), "contiguous file (type '7') refused"),
    "vendor-type": (dict(extra=[_with_body(b"v.csv", b"", b"V")]), "member type 'V' refused"),
    "symlink-first": (dict(before=[raw(ustar_header(b"x", 0, b"2"))]), "not a regular file"),
    "directory": (dict(extra=[raw(ustar_header(b"d", 0, b"5"))]), "not a regular file"),
    # headers that are not ustar, or lie
    "v7-no-magic": (dict(extra=[raw(ustar_header(b"old.csv", 0, magic=bytes(8)))]), "not a ustar archive"),
    "bad-checksum": (dict(extra=[raw(ustar_header(b"e.csv", 0)[:148] + b"0000000\0" + ustar_header(b"e.csv", 0)[156:])]),
                     "checksum does not match"),
    "size-not-octal": (dict(extra=[raw(ustar_header(b"e.csv", 0, size_field=b"0x7fffffff\0\0"))]),
                       "numeric field is not octal"),
    "size-base256-1tib": (dict(extra=[raw(ustar_header(b"node_health.csv", 0,
                                                       size_field=b"\x80" + (1 << 40).to_bytes(11, "big")))]),
                          "larger than the configured limit"),
    "ustar-prefix-path": (dict(extra=[raw(ustar_header(b"evil.csv", 0, prefix=b"../.."))]),
                          "../../evil.csv: member path must be a plain file name"),
    # the members' framing
    "data-in-member-padding": (_padding_not_zero(), "account_usage.csv: data hidden in the padding"),
    "tar-after-the-end": (dict(end=bytes(1024) + ustar_header(b"node_health.csv", 0) + bytes(1024)),
                          "data after the tar's end-of-archive blocks"),
    "one-zero-block": (dict(end=bytes(512)), "truncated tar"),
    "no-end-of-archive": (dict(end=b""), "truncated tar"),
    "huge-zero-padding": (dict(end=bytes(3 << 20)), "padding after the tar's end-of-archive"),
    # CSV records: many short lines inside one quoted field are still one record; it starts on line 2
    # ('"a\n', 3 bytes), each later line adds 2: line 32769 takes it to 65537 bytes
    "quoted-multiline-record": (dict(files=_csv_with("account_usage", csv_bytes(HEADERS["account_usage"], [])
                                                     + b'"' + b"a\n" * 40_000 + b'",1,1,1,1,1\n')),
                                "account_usage.csv: line 32769: a line longer than 65536 bytes"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused(tmp_path, limits, case):
    kwargs, reason = REFUSED[case]
    path = write_archive(tmp_path / "a.tar.gz", **kwargs)
    with pytest.raises(ArchiveError) as err:
        check(path, limits)
    assert reason in str(err.value)


def test_more_members_than_the_limit(tmp_path, limits):
    """Counted as headers arrive (the catalog's three datasets refuse a 70-dataset manifest sooner, in check_file)."""
    empty = {f"ds{i:02d}": b"" for i in range(70)}
    path = write_archive(tmp_path / "a.tar.gz", files=empty, manifest=manifest_for(AGENT, HOUR, empty))
    with open(path, "rb") as f, pytest.raises(ArchiveError, match="more than 64 members"):
        for _, _, member in archives.read_archive(f, limits):
            pass


@pytest.mark.parametrize("line_bytes, accepted", [(65536, True), (65537, False)])
def test_a_record_of_exactly_the_limit_passes(line_bytes, accepted, limits):
    data = b"a" * (line_bytes - 1) + b"\n" + b"b\n"
    rows = archives.csv_rows(io.BytesIO(data), limits, "x.csv")
    if accepted:
        assert [len(r[0]) for r in rows] == [65535, 1]
    else:
        with pytest.raises(ArchiveError, match="x.csv: line 1: a line longer than 65536 bytes"):
            list(rows)


# --- gzip integrity ----------------------------------------------------------------------------------

def _edit(path, edit):
    data = open(path, "rb").read()
    open(path, "wb").write(edit(data))
    return path


GZIP_CASES = {
    "truncated-half": (lambda d: d[: len(d) // 2], "truncated gzip stream"),
    "truncated-trailer": (lambda d: d[:-4], "truncated gzip stream"),  # the tar is whole, the ISIZE is not
    "bad-crc": (lambda d: d[:-8] + struct.pack("<I", struct.unpack("<I", d[-8:-4])[0] ^ 1) + d[-4:],
                "gzip CRC32 does not match"),
    "bad-isize": (lambda d: d[:-4] + struct.pack("<I", struct.unpack("<I", d[-4:])[0] + 512),
                  "gzip length (ISIZE) does not match"),
    "trailing-garbage": (lambda d: d + b"garbage", "data after the gzip stream"),
    "trailing-zeros": (lambda d: d + bytes(512), "data after the gzip stream"),
    "second-member": (lambda d: d + gzip.compress(ustar_header(b"node_health.csv", 2) + b"x\n" + bytes(1534)),
                      "data after the gzip stream (a second gzip member"),
    "empty-file": (lambda d: b"", "not a gzip'd tar archive (empty file)"),
    "zip-file": (lambda d: b"PK\x03\x04" + d[4:], "not a gzip'd tar archive"),
}


@pytest.mark.parametrize("case", sorted(GZIP_CASES))
def test_gzip_integrity(tmp_path, limits, case):
    edit, reason = GZIP_CASES[case]
    path = _edit(write_archive(tmp_path / "a.tar.gz"), edit)
    with pytest.raises(ArchiveError) as err:
        check(path, limits)
    assert reason in str(err.value)
    assert err.value.file_sha256 == sha256_file(path)


def test_the_worker_read_checks_integrity_too(tmp_path):
    """read_archive itself (what staging streams) ends only after the gzip trailer checked out."""
    path = _edit(write_archive(tmp_path / "a.tar.gz"), GZIP_CASES["second-member"][0])
    with open(path, "rb") as f, pytest.raises(ArchiveError, match="second gzip member"):
        for _, _, member in archives.read_archive(f):
            if member:
                member.read()


# --- names reach logs and JSON reasons escaped ---------------------------------------------------------

@pytest.mark.parametrize("where, kind", [("before", b"2"), ("extra", b"0")])
def test_control_characters_in_member_names_are_escaped(tmp_path, limits, where, kind):
    name = b"evil\n2026-12-04 09:00:00 INFO \x1b[32maccepted\x1b[0m\r\xc2\x85\xff.csv"
    path = write_archive(tmp_path / "a.tar.gz", **{where: [raw(ustar_header(name, 0, kind))]})
    with pytest.raises(ArchiveError) as err:
        check(path, limits)
    message = str(err.value)
    assert message.startswith("evil\\n2026-12-04 09:00:00 INFO \\x1b[32maccepted\\x1b[0m\\r\\x85\\xff.csv: ")
    assert not any(c in message for c in "\n\r\x1b\x85")


# --- memory: bombs within the upload limit, API and worker below 300 MB ------------------------------

def _pax_bomb(gz):
    gz.write(ustar_header(b"PaxHeaders/account_usage.csv", GIB_IN_MIB << 20, b"x"))
    gz.repeat(b"\0", GIB_IN_MIB)


def _gnu_long_name_bomb(gz):
    gz.write(ustar_header(b"././@LongLink", GIB_IN_MIB << 20, b"L", GNU_MAGIC))
    gz.repeat(b"a", GIB_IN_MIB)


def _manifest_bomb(gz):
    gz.write(ustar_header(b"manifest.json", GIB_IN_MIB << 20))
    gz.repeat(b" ", GIB_IN_MIB)


def _csv_line_bomb(path):
    """account_usage.csv: its header, then one line of a GiB."""
    files = dataset_files(HOUR)
    header = csv_bytes(HEADERS["account_usage"], [])
    manifest = manifest_for(AGENT, HOUR, files)
    manifest["datasets"]["account_usage"].update(bytes=len(header) + (GIB_IN_MIB << 20) + 1)
    gz = GzipWriter(str(path))
    gz.member(b"manifest.json", json.dumps(manifest).encode())
    gz.write(ustar_header(b"account_usage.csv", len(header) + (GIB_IN_MIB << 20) + 1) + header)
    gz.repeat(b"a", GIB_IN_MIB)
    gz.write(b"\n" + bytes(-(len(header) + 1) % 512) + bytes(1024))
    return gz.close()


BOMBS = {
    # id: (build(path), reason from check_file at the production limits)
    "pax-header-1gib": (lambda p: write_archive(p, before=[_pax_bomb]), "pax extended header (type 'x') refused"),
    "gnu-long-name-1gib": (lambda p: write_archive(p, extra=[_gnu_long_name_bomb]), "GNU long name header"),
    "manifest-1gib": (lambda p: write_archive(p, before=[_manifest_bomb]), "manifest larger than the configured limit"),
    "csv-line-1gib": (_csv_line_bomb, "account_usage.csv: line 2: a line longer than 65536 bytes"),
    "zero-tail-1gib": (lambda p: write_archive(p, end=b"", extra=[lambda gz: gz.repeat(b"\0", GIB_IN_MIB)]),
                       "padding after the tar's end-of-archive"),
}

PROBE = r"""
import json, os, shutil, sys
from datetime import datetime
from ganymede import archives, config
from ganymede.api.base import limits_from_config
from ganymede_agent.archive import ArchiveError, sha256_file

mode, path, agent_id, geo, hour = sys.argv[1:]
try:
    if mode == "api":  # what the API's complete runs, with the limits it builds from luigi.cfg
        limits = limits_from_config(config.api())
        archives.check_file(path, agent_id, geo, datetime.fromisoformat(hour), limits)
    else:  # what the worker's stage_archive does with each member
        with open(path, "rb") as raw, open(os.devnull, "wb") as sink:
            for name, entry, member in archives.read_archive(raw):
                if member is not None:
                    shutil.copyfileobj(member, sink, 1 << 20)
                    member.verify()
    outcome = "accepted"
except ArchiveError as exc:
    outcome = str(exc)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"outcome": outcome, "peak_kb": int(status["VmHWM"].split()[0])}))
"""


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    """Each bomb built once for the module, on first use."""
    base, built = tmp_path_factory.mktemp("bombs"), {}

    def get(case):
        if case not in built:
            built[case] = BOMBS[case][0](base / f"{case}.tar.gz")
            assert os.path.getsize(built[case]) < 8 << 20  # far within the 512 MB upload limit
        return built[case]
    return get


def _probe(tmp_path, mode, path):
    """Run PROBE in a fresh interpreter (default luigi.cfg values: an empty config, no repo luigi.cfg)."""
    config = tmp_path / "luigi.cfg"
    config.write_text("")
    env = dict(os.environ, LUIGI_CONFIG_PATH=str(config),
               PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "agent")]))
    done = subprocess.run([sys.executable, "-c", PROBE, mode, str(path), AGENT, "test", HOUR.isoformat()],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("case", sorted(BOMBS))
def test_bomb_refused_by_the_api_check_below_300_mb(tmp_path, bombs, case):
    result = _probe(tmp_path, "api", bombs(case))
    assert BOMBS[case][1] in result["outcome"]
    assert result["peak_kb"] < PEAK_LIMIT_MB << 10, result


@pytest.mark.parametrize("case", sorted(BOMBS))
def test_bomb_read_by_a_worker_stays_below_300_mb(tmp_path, bombs, case):
    """A worker never sees an archive the API refused; if one got there anyway, its read stays bounded too."""
    result = _probe(tmp_path, "worker", bombs(case))
    assert result["outcome"] != "accepted"
    assert result["peak_kb"] < PEAK_LIMIT_MB << 10, result


def test_a_refusal_quoting_agent_text_is_escaped_and_short(tmp_path, limits):
    """A 60 KB header row with an escape sequence: the reason quotes it, but escaped and cut to 500 characters."""
    files = dataset_files(HOUR)
    files["api_requests"] = b"\x1b[2J" + b"h" * 60_000 + b"\n"
    with pytest.raises(ArchiveError) as err:
        check(write_archive(tmp_path / "a.tar.gz", files=files), limits)
    message = str(err.value)
    assert message.startswith("api_requests.csv: header ['\\x1b[2Jhhh") and message.endswith("hhh...")
    assert len(message) == 503 and "\x1b" not in message


# --- the same bombs through ganymede-api: create, PUT, complete --------------------------------------

@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """ganymede-api as production runs it, at its default [api] limits, and the agent the bombs name."""
    import faultlib as F
    require_port("127.0.0.1", 3306, "MariaDB")
    base = tmp_path_factory.mktemp("api")
    env = F.new_world(base)
    proc = F.ApiProcess(env, base / "api.log").start()
    token = F.register_agent(env, AGENT, "test")
    yield SimpleNamespace(F=F, proc=proc, port=proc.port, token=token)
    proc.stop()
    F.drop_world(env)


def _api_peak_kb(proc):
    with open(f"/proc/{proc.proc.pid}/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1])


def _send(api, path):
    F, hour_text = api.F, HOUR.strftime("%Y-%m-%dT%H")
    created = F.create_transaction(api.port, AGENT, api.token, hour_text)
    assert created.status in (200, 201), created
    transaction_id = created.json["transaction_id"]
    with open(path, "rb") as f:
        assert F.upload(api.port, AGENT, api.token, transaction_id, f.read()).status == 200
    return F.complete(api.port, AGENT, api.token, transaction_id)


@pytest.mark.parametrize("case", sorted(BOMBS))
def test_bomb_through_the_api_is_a_422_and_its_peak_stays_below_300_mb(api, bombs, case):
    reply = _send(api, bombs(case))
    assert reply.status == 422 and BOMBS[case][1] in reply.json["error"], reply
    assert _api_peak_kb(api.proc) < PEAK_LIMIT_MB << 10
    assert api.F.healthz(api.port).status == 200


def test_a_valid_archive_through_the_same_api_completes(api, tmp_path):
    reply = _send(api, write_archive(tmp_path / "a.tar.gz"))
    assert reply.status == 200, reply
    assert reply.json["rows"] == {"account_usage": 3, "api_requests": 3, "node_health": 3}
