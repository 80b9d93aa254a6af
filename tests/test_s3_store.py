"""The S3 store against a real S3 API: the moto server that `make services` starts.

Each test makes its own uniquely named buckets and removes them afterwards.
The bad-credentials tests start a second moto server with authentication on.
"""
import base64
import hashlib
import os
import socket
import subprocess
import sys
import time
import uuid
import zlib
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

import boto3
import botocore.config
import pytest

from ganymede import config
from ganymede.errors import ConfigError, S3BackupError
from ganymede.s3curl import Credentials
from ganymede.stores import s3
from ganymede.stores.s3 import bucket_name, make_client

ENDPOINT = os.environ.get("GANYMEDE_S3_ENDPOINT", "http://127.0.0.1:9000")
HOUR = datetime(2026, 11, 30, 5)
TEST_CREDS = Credentials("testing", "testing-secret-key-never-shown")


def _port_open(host, port):
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cfg(endpoint, **overrides):
    values = dict(endpoint_url=endpoint, region="us-east-1", profile="ganymede", s3curl_path="~/.s3curl",
                  checksum_mode="when_required", multipart_threshold_mb=5, multipart_chunk_mb=5,
                  max_concurrency=4)
    values.update(overrides)
    return config.s3(**values)


def _raw_client(endpoint, creds=TEST_CREDS, account=None):
    """A plain boto3 client for set-up and clean-up; `account` impersonates another moto account."""
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=creds.id, aws_secret_access_key=creds.key,
                          config=botocore.config.Config(s3={"addressing_style": "path"},
                                                        request_checksum_calculation="when_required",
                                                        response_checksum_validation="when_required"))
    if account:
        client.meta.events.register(
            "before-sign.s3.*", lambda request, **_: request.headers.__setitem__("x-moto-account-id", account))
    return client


def _drop_bucket(client, name):
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys})
        for upload in client.list_multipart_uploads(Bucket=name).get("Uploads", []):
            client.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
        client.delete_bucket(Bucket=name)
    except client.exceptions.NoSuchBucket:
        pass


@pytest.fixture(scope="module")
def endpoint():
    parts = urlsplit(ENDPOINT)
    if not _port_open(parts.hostname, parts.port or 80):
        pytest.fail(f"S3 test server (moto) at {ENDPOINT} is not answering; start it with: make services",
                    pytrace=False)
    return ENDPOINT


@pytest.fixture
def store(endpoint):
    return make_client(_cfg(endpoint), TEST_CREDS)


@pytest.fixture
def new_bucket(endpoint):
    """Hands out unique bucket names (prefix per test) and drops them all afterwards."""
    prefix = f"gt-{uuid.uuid4().hex[:10]}-"
    made = []

    def make(label="b"):
        made.append(f"{prefix}{label}")
        return made[-1]

    yield make
    client = _raw_client(endpoint)
    for name in made:
        _drop_bucket(client, name)


def _stored(store, bucket, key):
    """The object's bytes as S3 serves them (an independent read of the copy)."""
    return store.client.get_object(Bucket=bucket, Key=key)["Body"].read()


def _write(path, size, seed=b"x"):
    """A file of `size` bytes whose content depends on `seed`, written in 1 MiB blocks."""
    block = (seed * (s3.MIB // len(seed) + 1))[:s3.MIB]
    with open(path, "wb") as handle:
        left = size
        while left:
            handle.write(block[:min(left, s3.MIB)])
            left -= min(left, s3.MIB)
    return str(path)


# --- bucket names (pure) ---------------------------------------------------

@pytest.mark.parametrize("template, prefix, expected", [
    ("ganymede-{yyyymmddhh}", "", "ganymede-2026113005"),
    ("ganymede-{yyyymmddhh}", "gt-ab12-", "gt-ab12-ganymede-2026113005"),
    ("Ganymede_Backups.{yyyymmddhh}", "", "ganymede-backups-2026113005"),
    ("--GANY  mede!!{yyyymmddhh}__", "", "gany-mede-2026113005"),
    ("{yyyymmddhh}", "", "2026113005"),
    ("bk/{yyyymmddhh}/cf", "T_", "t-bk-2026113005-cf"),
    ("x" * 53 + "{yyyymmddhh}", "", "x" * 53 + "2026113005"),
])
def test_bucket_name(template, prefix, expected):
    assert bucket_name(template, HOUR, prefix=prefix) == expected


def test_bucket_name_folds_aware_hours_to_utc():
    aware = datetime(2026, 11, 30, 7, tzinfo=timezone(timedelta(hours=2)))
    assert bucket_name("g-{yyyymmddhh}", aware) == "g-2026113005"


@pytest.mark.parametrize("template, prefix, message", [
    ("x" * 54 + "{yyyymmddhh}", "", "3 to 63"),
    ("ganymede-{yyyymmddhh}", "p" * 45, "3 to 63"),
    ("ganymede", "", "must contain {yyyymmddhh}"),
    ("ganymede-{YYYYMMDDHH}", "", "must contain {yyyymmddhh}"),
    ("sthree-{yyyymmddhh}", "", "reserves"),
    ("{yyyymmddhh}-s3alias", "", "reserves"),
])
def test_bucket_name_that_cannot_be_valid_is_a_config_error(template, prefix, message):
    with pytest.raises(ConfigError, match=message):
        bucket_name(template, HOUR, prefix=prefix)


# Digests written out by hand: SHA-256("abc") is FIPS 180-2's first example, CRC-32("123456789") the
# standard check value 0xCBF43926; S3 writes both as base64 of the raw bytes.
ABC_SHA256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
ABC_SHA256_B64 = "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="
CHECK_CRC32_B64 = "y/Q5Jg=="


def test_checksums_are_written_as_s3_writes_them(tmp_path):
    path = tmp_path / "check"
    path.write_bytes(b"123456789")
    assert s3.crc32_file(str(path)) == CHECK_CRC32_B64
    assert s3.b64(ABC_SHA256) == ABC_SHA256_B64


def test_part_size_below_s3_minimum_is_a_config_error(endpoint):
    with pytest.raises(ConfigError, match="multipart_chunk_mb"):
        make_client(_cfg(endpoint, multipart_chunk_mb=1), TEST_CREDS)


def test_repr_hides_the_secret(store):
    assert TEST_CREDS.key not in repr(store)


# --- against the server ----------------------------------------------------

def test_ensure_bucket_twice_is_fine(store, new_bucket):
    name = new_bucket()
    store.ensure_bucket(name)
    store.ensure_bucket(name)
    assert store.list_objects(name) == []


def test_ensure_bucket_refuses_another_accounts_bucket(store, new_bucket, endpoint):
    name = new_bucket("foreign")
    foreign = _raw_client(endpoint, account="111111111111")
    foreign.create_bucket(Bucket=name)
    try:
        with pytest.raises(S3BackupError, match="belongs to another account"):
            store.ensure_bucket(name)
    finally:
        _drop_bucket(foreign, name)


def test_put_verified_uploads_then_skips(store, new_bucket, tmp_path):
    name = new_bucket()
    store.ensure_bucket(name)
    path = tmp_path / "ganymede.sql.gz"
    path.write_bytes(b"abc")
    assert store.put_verified(name, "2026/11/30/05/ganymede.sql.gz", str(path)) == "uploaded"
    assert store.put_verified(name, "2026/11/30/05/ganymede.sql.gz", str(path)) == "skipped"
    described = store.describe(name, "2026/11/30/05/ganymede.sql.gz")
    assert described["Size"] == 3 and described["sha256"] == ABC_SHA256
    assert described["ChecksumSHA256"] == ABC_SHA256_B64
    assert _stored(store, name, "2026/11/30/05/ganymede.sql.gz") == b"abc"
    assert store.list_objects(name) == [
        {"Key": "2026/11/30/05/ganymede.sql.gz", "Size": 3, "ETag": described["ETag"]}]


def test_multipart_upload_carries_a_full_object_crc32(store, new_bucket, tmp_path):
    name = new_bucket()
    store.ensure_bucket(name)
    path = _write(tmp_path / "big", 12 * s3.MIB, seed=b"multipart")
    assert store.put_verified(name, "big", path) == "uploaded"
    data = open(path, "rb").read()
    described = store.describe(name, "big")
    assert described["Size"] == 12 * s3.MIB and described["sha256"] == hashlib.sha256(data).hexdigest()
    assert described["ETag"].endswith("-3"), "expected a 3-part multipart upload"
    assert described["ChecksumType"] == "FULL_OBJECT"
    assert described["ChecksumCRC32"] == base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    assert _stored(store, name, "big") == data
    assert store.put_verified(name, "big", path) == "skipped"


def _crc32_b64(path):
    return base64.b64encode(zlib.crc32(open(path, "rb").read()).to_bytes(4, "big")).decode()


def _sha256_hex(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("checksum", ["full-object", "composite"])
def test_multipart_object_with_other_bytes_is_not_taken_for_ours(store, new_bucket, tmp_path, endpoint, checksum):
    """Same size, our sha256 metadata, a valid checksum of its own (full-object, or composite as an
    older Ganymede wrote them), other content: uploaded again, not skipped."""
    name = new_bucket()
    store.ensure_bucket(name)
    ours = _write(tmp_path / "ours", 12 * s3.MIB, seed=b"ours")
    other = _write(tmp_path / "other", 12 * s3.MIB, seed=b"theirs")
    extra = {"Metadata": {"sha256": _sha256_hex(ours)}}
    extra.update({"ChecksumCRC32": _crc32_b64(other)} if checksum == "full-object" else {"ChecksumAlgorithm": "CRC32"})
    _raw_client(endpoint).upload_file(other, name, "big", ExtraArgs=extra, Config=store.transfer)
    assert store.put_verified(name, "big", ours) == "uploaded"
    assert store.put_verified(name, "big", ours) == "skipped"
    assert _stored(store, name, "big") == open(ours, "rb").read()


def test_a_copy_of_ours_with_a_composite_checksum_is_uploaded_again(store, new_bucket, tmp_path, endpoint):
    """Our own bytes, but a composite CRC32 (what an older Ganymede uploaded) proves nothing about the whole
    file: replaced by a copy with a full-object checksum, then skipped."""
    name = new_bucket()
    store.ensure_bucket(name)
    ours = _write(tmp_path / "ours", 12 * s3.MIB, seed=b"ours")
    _raw_client(endpoint).upload_file(ours, name, "big", Config=store.transfer, ExtraArgs={
        "ChecksumAlgorithm": "CRC32", "Metadata": {"sha256": _sha256_hex(ours)}})
    assert store.describe(name, "big")["ChecksumCRC32"] != _crc32_b64(ours)  # composite: of the parts' CRC32s
    assert store.put_verified(name, "big", ours) == "uploaded"
    assert store.describe(name, "big")["ChecksumCRC32"] == _crc32_b64(ours)
    assert store.put_verified(name, "big", ours) == "skipped"


def test_changed_file_is_uploaded_again(store, new_bucket, tmp_path):
    name = new_bucket()
    store.ensure_bucket(name)
    path = _write(tmp_path / "f", 50_000, seed=b"old")
    assert store.put_verified(name, "f", path) == "uploaded"
    _write(path, 50_000, seed=b"new")  # same size, other bytes
    assert store.put_verified(name, "f", path) == "uploaded"
    assert _stored(store, name, "f") == open(path, "rb").read()


@pytest.mark.parametrize("size", [1000, 12 * s3.MIB], ids=["single-part", "multipart"])
def test_a_file_changed_after_it_was_hashed_fails_verification_and_leaves_nothing(store, new_bucket, tmp_path, size):
    """The bytes sent are not those hashed (the file changed in between): the copy is refused or deleted."""
    name = new_bucket()
    store.ensure_bucket(name)
    path = _write(tmp_path / "f", size, seed=b"hashed")
    hashed = store.local(path)
    _write(path, size, seed=b"changed")  # same size, other bytes
    with pytest.raises(S3BackupError, match=f"s3://{name}/f"):
        store.put_verified(name, "f", path, hashed)
    assert store.describe(name, "f") is None


def test_a_batch_costs_one_listing_then_one_upload_and_one_head_per_object(store, new_bucket, tmp_path):
    name = new_bucket()
    store.ensure_bucket(name)
    files = {f"archives/a/{i}.tar.gz": _write(tmp_path / f"a{i}", 10_000 + i, seed=bytes([i])) for i in range(5)}
    files["mysql/ganymede.sql.gz"] = _write(tmp_path / "dump", 12 * s3.MIB, seed=b"dump")
    calls = []
    store.client.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
    results = store.put_all(name, files)
    assert {key: action for key, (action, _) in results.items()} == dict.fromkeys(files, "uploaded")
    assert sorted(calls) == sorted(["ListObjectsV2"] + ["PutObject"] * 5 + ["HeadObject"] * 6 + [
        "CreateMultipartUpload", "UploadPart", "UploadPart", "UploadPart", "CompleteMultipartUpload"])
    for key, path in files.items():
        assert _stored(store, name, key) == open(path, "rb").read()

    calls.clear()
    again = store.put_all(name, files)
    assert {key: action for key, (action, _) in again.items()} == dict.fromkeys(files, "skipped")
    assert sorted(calls) == ["HeadObject"] * 6 + ["ListObjectsV2"]


def test_a_listing_that_lags_costs_an_upload_not_a_failure(store, new_bucket, tmp_path, monkeypatch):
    """An object the listing does not show yet is sent again, and verified like any other."""
    name = new_bucket()
    store.ensure_bucket(name)
    path = _write(tmp_path / "f", 1000)
    assert store.put_verified(name, "f", path) == "uploaded"
    monkeypatch.setattr(store, "list_objects", lambda bucket, prefix="": [])  # the listing never shows it
    assert store.put_verified(name, "f", path) == "uploaded"
    assert _stored(store, name, "f") == open(path, "rb").read()


def test_list_objects_pages_past_1000_keys(store, new_bucket):
    name = new_bucket()
    store.ensure_bucket(name)
    for i in range(1003):
        store.client.put_object(Bucket=name, Key=f"k{i:05d}", Body=b"")
    listed = store.list_objects(name)
    assert len(listed) == 1003 and listed[-1]["Key"] == "k01002"
    assert len(store.list_objects(name, prefix="k0100")) == 3


def test_missing_object_describes_as_none(store, new_bucket):
    name = new_bucket()
    store.ensure_bucket(name)
    assert store.describe(name, "nothing") is None


def test_missing_bucket_is_an_s3_backup_error(store, new_bucket, tmp_path):
    name = new_bucket("never-made")
    with pytest.raises(S3BackupError, match=name):
        store.put_verified(name, "f", _write(tmp_path / "f", 10))


def test_unreachable_endpoint(tmp_path):
    dead = f"http://127.0.0.1:{_free_port()}"
    store = make_client(_cfg(dead), TEST_CREDS)
    with pytest.raises(S3BackupError, match=f"S3 endpoint {dead} unreachable") as caught:
        store.ensure_bucket("gt-unreachable")
    assert TEST_CREDS.key not in str(caught.value)
    with pytest.raises(S3BackupError, match="unreachable"):
        store.put_verified("gt-unreachable", "f", _write(tmp_path / "f", 10))


# --- credentials, with authentication switched on ---------------------------

@pytest.fixture(scope="module")
def auth_server():
    """A second moto server that checks signatures after its first 4 calls, which make our user."""
    binary = os.path.join(os.path.dirname(sys.executable), "moto_server")
    if not os.path.exists(binary):
        pytest.fail(f"{binary} not found; install the services extra (make venv)", pytrace=False)
    port = _free_port()
    proc = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)],
                            env=dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="4"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not _port_open("127.0.0.1", port):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"moto_server with authentication did not start on port {port}", pytrace=False)
            time.sleep(0.1)
        url = f"http://127.0.0.1:{port}"
        iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName="ganymede")
        iam.put_user_policy(UserName="ganymede", PolicyName="s3", PolicyDocument=(
            '{"Version": "2012-10-17", "Statement": '
            '[{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}'))
        key = iam.create_access_key(UserName="ganymede")["AccessKey"]
        iam.get_user(UserName="ganymede")  # the 4th free call: from here on every call is checked
        yield url, Credentials(key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_right_credentials_work(auth_server, tmp_path):
    url, creds = auth_server
    store = make_client(_cfg(url), creds)
    name = f"gt-{uuid.uuid4().hex[:10]}-auth"
    store.ensure_bucket(name)
    try:
        assert store.put_verified(name, "f", _write(tmp_path / "f", 10)) == "uploaded"
    finally:
        _drop_bucket(_raw_client(url, creds), name)


@pytest.mark.parametrize("wrong, code", [
    ("secret", "SignatureDoesNotMatch"),
    ("id", "InvalidAccessKeyId"),
])
def test_wrong_credentials_are_an_s3_backup_error(auth_server, tmp_path, wrong, code):
    url, creds = auth_server
    bad = Credentials(creds.id, "wrong-secret-wrong-secret-wrong-secret00") if wrong == "secret" \
        else Credentials("AKIAUNKNOWNUNKNOWN00", creds.key)
    store = make_client(_cfg(url, profile="backup", s3curl_path="/home/ganymede/.s3curl"), bad)
    with pytest.raises(S3BackupError) as caught:
        store.ensure_bucket(f"gt-{uuid.uuid4().hex[:10]}-denied")
    message = str(caught.value)
    assert "credentials of profile 'backup'" in message and code in message
    assert "check /home/ganymede/.s3curl" in message
    assert bad.key not in message and creds.key not in message
    with pytest.raises(S3BackupError) as caught:
        store.put_verified(f"gt-{uuid.uuid4().hex[:10]}-denied", "f", _write(tmp_path / "f", 10))
    assert "profile 'backup'" in str(caught.value) and bad.key not in str(caught.value)
