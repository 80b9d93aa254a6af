"""The backup's S3 side: one bucket per UTC hour, objects uploaded and verified.

A file below the multipart threshold goes up in one PutObject with its
SHA-256 and Content-MD5, which the server checks; a larger one through boto3's
managed transfer (`upload_file` with a TransferConfig: parts in parallel, each
sent with its CRC32 so the server rejects a corrupted part; CRC32 rather than
SHA-256 because hashing every part twice, here and on the server, cost the
upload a fifth of its speed). After the uploads every object is checked
against its local file: a single-part one by the size and ETag (the server's
MD5 of what it stored) of one listing of the bucket, anything else by a HEAD
(size, our whole-file sha256 in the user metadata, and the checksum the server
computed: the SHA-256 of a single-part object, or for a multipart object the
CRC32 over its parts' CRC32s, recomputed here from the file with the part size
the server reports). So "uploaded" means "verified", and an object is skipped
only when it passes the same check.

Every boto3/botocore failure leaves this module as S3BackupError with a message
an operator can act on; none of them carries the secret key.
"""
import base64
import hashlib
import logging
import os
import re
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import boto3
import botocore.config
import botocore.exceptions
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from s3transfer.utils import ChunksizeAdjuster

from .. import hours, s3curl
from . import botomodels
from ..errors import ConfigError, S3BackupError

log = logging.getLogger(__name__)

MIB = 1024 * 1024
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 120
MAX_ATTEMPTS = 3
MIN_PART_MB = 5  # S3's smallest part (all but the last)

_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
               "AuthorizationHeaderMalformed", "InvalidClientTokenId"}
_DENIED_CODES = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
_COMPOSITE = re.compile(r"-\d+$")


@dataclass(frozen=True)
class LocalFile:
    """A file to back up and what proves a copy of it: size, hex SHA-256, and either its hex MD5 (a
    single-part upload: the ETag S3 gives the copy) or S3's multipart CRC32 checksum for `part_size` parts."""
    path: str
    size: int
    sha256: str
    md5: str = None
    composite: str = None
    part_size: int = None


class S3Store:
    """A configured S3 client plus the transfer settings backups use.

    `profile` and `s3curl_path` are only names for error messages: they tell
    the operator which credentials to fix, without ever holding the secret.
    """

    def __init__(self, client, transfer, endpoint_url, profile="", s3curl_path=""):
        self.client = client
        self.transfer = transfer
        self.endpoint_url = endpoint_url
        self.profile = profile
        self.s3curl_path = s3curl_path

    def __repr__(self):
        return f"S3Store({self.endpoint_url!r}, profile={self.profile!r})"

    # --- buckets -----------------------------------------------------------

    def ensure_bucket(self, name):
        """Create the bucket, or accept it if it exists and is ours; refuse someone else's.

        (Success does not mean it is empty: us-east-1 answers 200 to creating a bucket one already owns.)
        """
        try:
            with self._errors(f"creating bucket {name}"):
                self.client.create_bucket(Bucket=name, **self._location())
            log.info("bucket %s ready", name)
        except S3BackupError as exc:
            code = _code(exc.__cause__)
            if code == "BucketAlreadyOwnedByYou":
                return
            if code == "BucketAlreadyExists" and self._owns(name):
                return
            if code == "BucketAlreadyExists":
                raise S3BackupError(
                    f"bucket {name} already exists at {self.endpoint_url} and belongs to another account: "
                    "change bucket_template in luigi.cfg [s3]") from None
            if code in _DENIED_CODES and self._usable(name):
                return  # keys without CreateBucket, bucket made by an administrator
            raise

    def _usable(self, name):
        try:
            with self._errors(f"checking bucket {name}"):
                self.client.head_bucket(Bucket=name)
            return True
        except S3BackupError:
            return False

    def _location(self):
        region = self.client.meta.region_name
        if region and region != "us-east-1":
            return {"CreateBucketConfiguration": {"LocationConstraint": region}}
        return {}

    def _owns(self, name):
        """ListBuckets lists exactly the buckets the caller owns: the one reliable ownership test."""
        with self._errors(f"checking who owns bucket {name}"):
            pages = self.client.get_paginator("list_buckets").paginate(Prefix=name)
            return any(bucket["Name"] == name for page in pages for bucket in page.get("Buckets", []))

    # --- objects -----------------------------------------------------------

    def local(self, path):
        """What will verify a copy of `path` (a LocalFile), from one read of it."""
        size = os.path.getsize(path)
        if size < self.transfer.multipart_threshold:
            sha256, md5 = sha256_md5_file(path)
            return LocalFile(path, size, sha256, md5=md5)
        part_size = self.part_size(size)
        sha256, composite = file_digests(path, part_size)
        return LocalFile(path, size, sha256, composite=composite, part_size=part_size)

    def part_size(self, size):
        """The part size boto3 uses for a file of `size` bytes (the configured one, raised past 10,000 parts)."""
        return ChunksizeAdjuster().adjust_chunksize(self.transfer.multipart_chunksize, size)

    def put_verified(self, bucket, key, path, local=None, listed=None):
        """Upload `path` to bucket/key unless an identical copy is there; "skipped" or "uploaded" (and verified)."""
        return self.put_all(bucket, {key: path}, {key: local} if local else None, listed)[key][0]

    def put_all(self, bucket, files, known=None, listed=None):
        """Upload {key: path} unless an identical copy is there, then verify every copy sent.

        Returns {key: (action, LocalFile)}, action "skipped" or "uploaded".
        One listing decides what is already there (or `listed`, a `listed()`
        of the bucket taken before) and one more, after the uploads, verifies
        them (see `_verified`); objects go up `max_concurrency` at a time.
        Copies that fail verification are deleted, so a later run uploads
        them again instead of skipping them, and the error names them.
        `known` {key: LocalFile} spares reading those files again.
        """
        known = known or {}
        prefix = os.path.commonprefix(list(files))
        listed = self.listed(bucket, prefix) if listed is None else listed

        def send(item):
            key, path = item
            local = known.get(key) or self.local(path)
            if key in listed and self._verified(bucket, key, local, listed[key]) is None:
                log.info("s3://%s/%s already verified, skipped", bucket, key)
                return key, ("skipped", local)
            self._upload(bucket, key, local)
            return key, ("uploaded", local)

        with ThreadPoolExecutor(self.transfer.max_concurrency, thread_name_prefix="s3-put") as pool:
            # (a lone object, or checks that ask the server nothing, stay on this thread: no hand-offs)
            results = dict((pool.map if len(files) > 1 else map)(send, files.items()))
            sent = {key: local for key, (action, local) in results.items() if action == "uploaded"}
            # only single-part copies can be proven by a listing; multipart ones get a HEAD either way
            listed = self.listed(bucket, prefix) if any(local.md5 for local in sent.values()) else {}
            heads = sum(not _proves(listed.get(key), local) for key, local in sent.items())
            problems = [(key, local, problem) for key, local, problem in (pool.map if heads > 1 else map)(
                lambda item: (*item, self._verified(bucket, item[0], item[1], listed.get(item[0]))), sent.items())
                if problem]
        for key, local, _ in problems:
            with self._errors(f"removing unverified s3://{bucket}/{key}"):
                self.client.delete_object(Bucket=bucket, Key=key)
        if problems:
            key, local, problem = problems[0]
            more = f" (and {len(problems) - 1} more objects)" if len(problems) > 1 else ""
            raise S3BackupError(f"verification of s3://{bucket}/{key} (from {local.path}) failed: {problem}{more}")
        for key, local in sent.items():
            log.info("uploaded and verified s3://%s/%s (%d bytes)", bucket, key, local.size)
        return results

    def listed(self, bucket, prefix=""):
        """{key: {Key, Size, ETag}} of the bucket's objects under `prefix`."""
        return {o["Key"]: o for o in self.list_objects(bucket, prefix)}

    def _upload(self, bucket, key, local):
        """One PutObject below the multipart threshold, else boto3's managed transfer (CRC32 per part).

        botocore computes the checksums of the bytes it sends (so the checksum
        the server keeps is of what it got, even if the file changed since
        `local` was read); Content-MD5 is ours, so a server refuses a body
        that is not the file we hashed.
        """
        metadata = {"sha256": local.sha256}
        with self._errors(f"uploading {local.path} to s3://{bucket}/{key}"):
            if local.md5 is None:
                self.client.upload_file(local.path, bucket, key, Config=self.transfer,
                                        ExtraArgs={"ChecksumAlgorithm": "CRC32", "Metadata": metadata})
                return
            with open(local.path, "rb") as body:
                self.client.put_object(Bucket=bucket, Key=key, Body=body, ChecksumAlgorithm="SHA256",
                                       ContentMD5=_b64(local.md5), Metadata=metadata)

    def _verified(self, bucket, key, local, listed):
        """Why bucket/key does not hold the local file, or None if it does.

        A single-part copy is proven by a listing entry with its size and
        the ETag the server computed over the bytes it stored (their MD5).
        Anything else (multipart, a listing that lags, a server whose ETags
        are not MD5s) is asked with a HEAD: size, our sha256 in the user
        metadata, and the server's checksum of the object (for a multipart
        copy, the CRC32 over its parts').
        """
        if _proves(listed, local):
            return None
        described = self.describe(bucket, key)
        if described is None:
            return "object missing after upload"
        return self._mismatch(bucket, described, local)

    def _mismatch(self, bucket, described, local):
        """Why the described object does not match the local file, or None if it does."""
        if described["Size"] != local.size:
            return f"size {described['Size']} != local {local.size}"
        if described["sha256"] != local.sha256:
            return "sha256 metadata differs from the local file"
        if not _COMPOSITE.search(described["ETag"]):  # a single-part copy: the SHA-256 of the whole object
            checksum = described["ChecksumSHA256"]
            if not checksum:
                return "the server reports no SHA-256 checksum"
            return None if checksum == _b64(local.sha256) else "the server's SHA-256 differs from the local file's"
        # Multipart: the server's checksum is the CRC32 over its parts' CRC32s ("...-N";
        # some servers omit "-N"), each part checked by the server on upload.
        checksum = described["ChecksumCRC32"]
        if not checksum:
            return "the server reports no CRC32 checksum for a multipart copy"
        count, part_size = self._parts(bucket, described["Key"], local.size)
        expected = local.composite if part_size == local.part_size else composite_crc32(local.path, part_size)
        if expected != f"{checksum.split('-')[0]}-{count}":
            return f"the server's CRC32 of {count} parts of {part_size} bytes differs from the local file's"
        return None

    def _parts(self, bucket, key, size):
        """(parts, part size) of a multipart object, asked of the server (HEAD of part 1).

        A server that cannot answer is assumed to hold the parts this
        configuration uploads (boto3's part size, adjusted as boto3 adjusts it).
        """
        try:
            with self._errors(f"reading part 1 of s3://{bucket}/{key}"):
                head = self.client.head_object(Bucket=bucket, Key=key, PartNumber=1)
            if head.get("PartsCount") and head.get("ContentLength"):
                return head["PartsCount"], head["ContentLength"]
        except S3BackupError as exc:
            if _code(exc.__cause__) is None:
                raise
        part_size = self.part_size(size)
        return -(-size // part_size), part_size

    def describe(self, bucket, key):
        """Size, ETag, our sha256 and the server's checksums of one object; None if absent."""
        try:
            with self._errors(f"reading s3://{bucket}/{key}"):
                head = self.client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        except S3BackupError as exc:
            if _code(exc.__cause__) in _MISSING_CODES:
                return None
            raise
        return {
            "Key": key,
            "Size": head["ContentLength"],
            "ETag": head.get("ETag", "").strip('"'),
            "sha256": head.get("Metadata", {}).get("sha256"),
            "ChecksumSHA256": head.get("ChecksumSHA256"),
            "ChecksumCRC32": head.get("ChecksumCRC32"),
            "LastModified": head.get("LastModified"),
        }

    def list_objects(self, bucket, prefix=""):
        """Every object of the bucket as {Key, Size, ETag}; one request per 1000 keys, no HEADs."""
        objects, token = [], {}
        with self._errors(f"listing s3://{bucket}/{prefix}"):
            while True:  # the loop a paginator would run, without loading its model (tens of ms, each run)
                page = self.client.list_objects_v2(Bucket=bucket, Prefix=prefix, **token)
                objects += [{"Key": obj["Key"], "Size": obj["Size"], "ETag": obj.get("ETag", "").strip('"')}
                            for obj in page.get("Contents", [])]
                if not page.get("IsTruncated"):
                    return objects
                token = {"ContinuationToken": page["NextContinuationToken"]}

    # --- errors ------------------------------------------------------------

    @contextmanager
    def _errors(self, action):
        """Turn whatever boto3 raises into S3BackupError with an operator's message."""
        try:
            yield
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, S3UploadFailedError) as exc:
            cause = _root(exc)
            raise S3BackupError(self._explain(cause, action)) from cause

    def _explain(self, exc, action):
        where = self.endpoint_url
        if isinstance(exc, (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError)):
            return f"S3 endpoint {where} unreachable while {action}: {exc}"
        if isinstance(exc, (botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectionClosedError)):
            return f"S3 endpoint {where} stopped answering while {action}: {exc}"
        code = _code(exc)
        if code is None:
            return f"S3 {action} failed at {where}: {exc}"
        message = exc.response.get("Error", {}).get("Message") or ""
        if code in _AUTH_CODES:
            return (f"S3 at {where} rejected the credentials of profile {self.profile!r} ({code}) "
                    f"while {action}: check {self.s3curl_path or '.s3curl'}")
        if code in _DENIED_CODES:
            return (f"S3 at {where} denied access ({code}) while {action}: the credentials of profile "
                    f"{self.profile!r} in {self.s3curl_path or '.s3curl'} are wrong or lack permission")
        if code == "NoSuchBucket":
            return f"S3 at {where}: no such bucket while {action}"
        return f"S3 at {where} refused {action}: {code} {message}".rstrip()


def _proves(listed, local):
    """Whether a listing entry proves a single-part copy of `local`: its size, and its ETag (the MD5 the
    server computed over what it stored) equal to the file's MD5."""
    return bool(listed and local.md5 and listed["Size"] == local.size and listed["ETag"] == local.md5)


def _root(exc):
    """The botocore error behind boto3's S3UploadFailedError, which keeps it only as context."""
    seen = exc
    while isinstance(seen, S3UploadFailedError) and (seen.__cause__ or seen.__context__):
        seen = seen.__cause__ or seen.__context__
    return seen


def _code(exc):
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code") or exc.response.get(
            "ResponseMetadata", {}).get("HTTPStatusCode", "")) or None
    return None


def _b64(hex_digest):
    return base64.b64encode(bytes.fromhex(hex_digest)).decode("ascii")


def make_client(cfg, creds):
    """An S3Store for a `ganymede.config.s3` section and the Credentials from .s3curl.

    Path-style addressing because hourly bucket names are not DNS entries of
    Cloud Files; checksum mode from the config because boto3's default CRC32
    headers are rejected by some S3-compatible stores.
    """
    if cfg.multipart_chunk_mb < MIN_PART_MB:
        raise ConfigError(f"[s3] multipart_chunk_mb must be at least {MIN_PART_MB} (S3's smallest part)")
    if cfg.max_concurrency < 1:
        raise ConfigError("[s3] max_concurrency must be at least 1")
    boto_config = botocore.config.Config(
        region_name=cfg.region,
        s3={"addressing_style": "path"},
        signature_version="s3v4",
        request_checksum_calculation=cfg.checksum_mode,
        response_checksum_validation=cfg.checksum_mode,
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
        max_pool_connections=max(10, cfg.max_concurrency),
    )
    botocore_session = botomodels.session(getattr(cfg, "model_cache", ""), "s3")
    client = boto3.session.Session(botocore_session=botocore_session).client(
        "s3", endpoint_url=cfg.endpoint_url, aws_access_key_id=creds.id,
        aws_secret_access_key=creds.key, config=boto_config)
    transfer = TransferConfig(
        multipart_threshold=cfg.multipart_threshold_mb * MIB,
        multipart_chunksize=cfg.multipart_chunk_mb * MIB,
        max_concurrency=cfg.max_concurrency,
        use_threads=True,
    )
    return S3Store(client, transfer, cfg.endpoint_url,
                   profile=getattr(cfg, "profile", ""), s3curl_path=getattr(cfg, "s3curl_path", ""))


def connect(cfg):
    """make_client with the credentials of cfg.profile read from cfg.s3curl_path."""
    return make_client(cfg, s3curl.load(cfg.s3curl_path, cfg.profile))


_INVALID = re.compile(r"[^a-z0-9-]+")
_HYPHENS = re.compile(r"-{2,}")


def bucket_name(template, hour, prefix=""):
    """The bucket for one UTC hour: `prefix` + template with {yyyymmddhh} filled, made S3-valid.

    Invalid characters become '-' rather than an error, so a template like
    'Ganymede_Backups.{yyyymmddhh}' just works; a name that cannot be valid
    (too long, too short, no hour in it) is a ConfigError, never truncated,
    because truncation could map two hours to one bucket.
    """
    if "{yyyymmddhh}" not in template:
        raise ConfigError(f"[s3] bucket_template {template!r} must contain {{yyyymmddhh}}: one bucket per hour")
    raw = prefix + template.replace("{yyyymmddhh}", hours.compact(hour))
    name = _HYPHENS.sub("-", _INVALID.sub("-", raw.lower())).strip("-")
    if not 3 <= len(name) <= 63:
        raise ConfigError(f"bucket name {name!r} from template {template!r} is {len(name)} characters; "
                          "S3 allows 3 to 63")
    if name.startswith("sthree-") or name.endswith("-s3alias"):
        raise ConfigError(f"bucket name {name!r} uses a prefix or suffix S3 reserves")
    return name


def file_digests(path, part_size):
    """(hex SHA-256 of the file, S3's CRC32 checksum of it uploaded in parts of `part_size`).

    S3's multipart CRC32 checksum is the base64 CRC32 of the parts' CRC32s
    (4 bytes each, big-endian), then "-<parts>". The whole-file hash runs in
    its own thread beside the parts' (hashlib and zlib release the GIL), each
    reading the file in 1 MiB blocks.
    """
    def whole():
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(MIB), b""):
                digest.update(block)
        return digest.hexdigest()

    def parts():
        over_parts, size = [], os.path.getsize(path)
        with open(path, "rb") as handle:
            for start in range(0, size, part_size):
                crc = 0
                for offset in range(start, min(start + part_size, size), MIB):
                    crc = zlib.crc32(handle.read(min(MIB, start + part_size - offset, size - offset)), crc)
                over_parts.append(struct.pack(">I", crc))
        combined = struct.pack(">I", zlib.crc32(b"".join(over_parts)))
        return f"{base64.b64encode(combined).decode('ascii')}-{len(over_parts)}"

    with ThreadPoolExecutor(max_workers=1) as pool:
        whole_future = pool.submit(whole)
        composite = parts()
        return whole_future.result(), composite


def composite_crc32(path, part_size):
    """S3's CRC32 checksum of the file uploaded in parts of `part_size` ("<base64>-<parts>")."""
    return file_digests(path, part_size)[1]


def sha256_md5_file(path, chunk_size=MIB):
    """(hex SHA-256, hex MD5) of a file, from one read."""
    sha256, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            sha256.update(chunk)
            md5.update(chunk)
    return sha256.hexdigest(), md5.hexdigest()


def sha256_file(path, chunk_size=MIB):
    """Hex SHA-256 of a file, read in chunks so a large dump never sits in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()
