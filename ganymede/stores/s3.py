"""The backup's S3 side: one bucket per UTC hour, objects uploaded and verified (docs/operations-s3.md).

Each file goes up with its SHA-256 as `sha256` metadata and a checksum S3 checks on arrival (SHA-256 below the
multipart threshold, the full-object CRC32 above); a HEAD then proves the copy by size, metadata and checksum.
A copy that fails is deleted (a rerun sends it again) and the run fails, naming it; an object already there is
skipped only when it passes the same test. boto3 failures leave as S3BackupError, never with the secret key.
"""
import base64
import logging
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import boto3
import botocore.config
import botocore.exceptions
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig

from .. import files, hours, s3curl
from ..errors import ConfigError, S3BackupError

log = logging.getLogger(__name__)

MIB = 1024 * 1024
MIN_PART_MB = 5  # S3's smallest part (all but the last)

_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
               "AuthorizationHeaderMalformed", "InvalidClientTokenId"}
_DENIED_CODES = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}


@dataclass(frozen=True)
class LocalFile:
    """A file to back up and what proves a copy: size, hex SHA-256 and, if it goes up multipart, its CRC32."""
    path: str
    size: int
    sha256: str
    crc32: str = None


@dataclass(eq=False)
class S3Store:
    """An S3 client and transfer settings; `profile`, `s3curl_path` only name credentials in errors."""
    client: object
    transfer: TransferConfig
    endpoint_url: str
    profile: str = ""
    s3curl_path: str = ""

    def __repr__(self):
        return f"S3Store({self.endpoint_url!r}, profile={self.profile!r})"

    def ensure_bucket(self, name):
        """Create the bucket or accept ours (not proof it is empty: us-east-1 answers 200 to a re-create)."""
        region = self.client.meta.region_name
        where = {} if region in (None, "", "us-east-1") else {
            "CreateBucketConfiguration": {"LocationConstraint": region}}
        try:
            with self._errors(f"creating bucket {name}"):
                self.client.create_bucket(Bucket=name, **where)
            log.info("bucket %s ready", name)
        except S3BackupError as exc:
            code = _code(exc.__cause__)
            if code == "BucketAlreadyOwnedByYou" or code == "BucketAlreadyExists" and self._owns(name):
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

    def _owns(self, name):
        """ListBuckets lists exactly the buckets the caller owns: the one reliable ownership test."""
        with self._errors(f"checking who owns bucket {name}"):
            pages = self.client.get_paginator("list_buckets").paginate(Prefix=name)
            return any(bucket["Name"] == name for page in pages for bucket in page.get("Buckets", []))

    def local(self, path):
        """What will verify a copy of `path` (a LocalFile): its SHA-256, and its CRC32 if it goes up multipart."""
        size = os.path.getsize(path)
        crc32 = crc32_file(path) if size >= self.transfer.multipart_threshold else None
        return LocalFile(path, size, files.sha256_file(path), crc32)

    def put_verified(self, bucket, key, path, local=None, listed=None):
        """Upload `path` to bucket/key unless a verified copy is there; "skipped" or "uploaded" (and verified)."""
        return self.put_all(bucket, {key: path}, {key: local} if local else None, listed)[key][0]

    def put_all(self, bucket, paths, known=None, listed=None):
        """{key: (action, LocalFile)} of put_verified over {key: path}, `max_concurrency` at a time.
        `listed` ({key: size}) is what is there (default: one listing of the keys' common prefix);
        `known` ({key: LocalFile}) spares hashing those again."""
        known = known or {}
        listed = self.listed(bucket, os.path.commonprefix(list(paths))) if listed is None else listed

        def send(item):
            key, path = item
            local = known.get(key) or self.local(path)
            if listed.get(key) == local.size and self._verified(bucket, key, local) is None:
                log.info("s3://%s/%s already verified, skipped", bucket, key)
                return key, "skipped", local, None
            self._upload(bucket, key, local)
            return key, "uploaded", local, self._verified(bucket, key, local)

        with ThreadPoolExecutor(self.transfer.max_concurrency, thread_name_prefix="s3-put") as pool:
            done = list(pool.map(send, paths.items()))
        problems = [(key, local, problem) for key, _, local, problem in done if problem]
        for key, _, _ in problems:
            with self._errors(f"removing unverified s3://{bucket}/{key}"):
                self.client.delete_object(Bucket=bucket, Key=key)
        if problems:
            key, local, problem = problems[0]
            more = f" (and {len(problems) - 1} more objects)" if len(problems) > 1 else ""
            raise S3BackupError(f"verification of s3://{bucket}/{key} (from {local.path}) failed: {problem}{more}")
        for key, action, local, _ in done:
            if action == "uploaded":
                log.info("uploaded and verified s3://%s/%s (%d bytes)", bucket, key, local.size)
        return {key: (action, local) for key, action, local, _ in done}

    def _upload(self, bucket, key, local):
        # multipart: the full-object CRC32 (and each part with its own); else S3 checks the SHA-256 it computes
        checksum = {"ChecksumCRC32": local.crc32} if local.crc32 else {"ChecksumAlgorithm": "SHA256"}
        extra = {"Metadata": {"sha256": local.sha256}, **checksum}
        with self._errors(f"uploading {local.path} to s3://{bucket}/{key}"):
            self.client.upload_file(local.path, bucket, key, ExtraArgs=extra, Config=self.transfer)

    def _verified(self, bucket, key, local):
        """Why bucket/key is not a copy of the local file, or None if it is (one HEAD)."""
        head = self.describe(bucket, key)
        if head is None:
            return "object missing after upload"
        if head["Size"] != local.size:
            return f"size {head['Size']} != local {local.size}"
        if head["sha256"] != local.sha256:
            return "sha256 metadata differs from the local file"
        if head["ChecksumType"] == "COMPOSITE":
            return "the server keeps only a checksum of its parts' checksums, not of the whole object"
        if head["ChecksumSHA256"]:
            return None if head["ChecksumSHA256"] == b64(local.sha256) else \
                "the server's SHA-256 of it differs from the local file's"
        if head["ChecksumCRC32"]:
            return None if head["ChecksumCRC32"] == (local.crc32 or crc32_file(local.path)) else \
                "the server's CRC32 of it differs from the local file's"
        return "the server reports no SHA-256 or CRC32 checksum of it"

    def describe(self, bucket, key):
        """Size, ETag, our sha256 metadata and the server's checksums of one object; None if absent."""
        try:
            with self._errors(f"reading s3://{bucket}/{key}"):
                head = self.client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        except S3BackupError as exc:
            if _code(exc.__cause__) in _MISSING_CODES:
                return None
            raise
        return {"Size": head["ContentLength"], "ETag": head.get("ETag", "").strip('"'),
                "sha256": head.get("Metadata", {}).get("sha256"),
                **{name: head.get(name) for name in ("ChecksumSHA256", "ChecksumCRC32", "ChecksumType")}}

    def list_objects(self, bucket, prefix=""):
        """Every object of the bucket under `prefix` as {Key, Size, ETag}."""
        with self._errors(f"listing s3://{bucket}/{prefix}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            return [{"Key": obj["Key"], "Size": obj["Size"], "ETag": obj.get("ETag", "").strip('"')}
                    for page in pages for obj in page.get("Contents", [])]

    def listed(self, bucket, prefix=""):
        """{key: size} of the bucket's objects under `prefix`."""
        return {o["Key"]: o["Size"] for o in self.list_objects(bucket, prefix)}

    @contextmanager
    def _errors(self, action):
        try:
            yield
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, S3UploadFailedError) as exc:
            cause = exc  # boto3's S3UploadFailedError keeps the botocore error behind it only as context
            while isinstance(cause, S3UploadFailedError) and (cause.__cause__ or cause.__context__):
                cause = cause.__cause__ or cause.__context__
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


def _code(exc):
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code") or exc.response.get(
            "ResponseMetadata", {}).get("HTTPStatusCode", "")) or None
    return None


def b64(hex_digest):
    """A hex digest the way S3 writes checksums: base64 of its bytes."""
    return base64.b64encode(bytes.fromhex(hex_digest)).decode("ascii")


def crc32_file(path):
    """The file's CRC32 as S3 writes it (base64 of 4 big-endian bytes), read in 1 MiB blocks."""
    crc = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(MIB), b""):
            crc = zlib.crc32(block, crc)
    return b64(f"{crc:08x}")


def make_client(cfg, creds):
    """An S3Store for a `ganymede.config.s3` section and .s3curl Credentials. Path-style addressing: hourly
    buckets are not DNS entries of Cloud Files. Checksum mode: some stores reject boto3's CRC32 headers."""
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
        connect_timeout=10,
        read_timeout=120,
        retries={"mode": "standard", "max_attempts": 3},
        # objects go up max_concurrency at a time, a multipart one with as many parts at a time
        max_pool_connections=max(10, cfg.max_concurrency ** 2),
    )
    client = boto3.session.Session().client(
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


_INVALID = re.compile(r"[^a-z0-9]+")  # hyphens too, so a run of them and invalid characters becomes one '-'


def bucket_name(template, hour, prefix=""):
    """The bucket for one UTC hour: `prefix` + template with {yyyymmddhh} filled, invalid characters made '-'
    ('Ganymede_Backups.{yyyymmddhh}' works). Never truncated (two hours could share a bucket): ConfigError."""
    if "{yyyymmddhh}" not in template:
        raise ConfigError(f"[s3] bucket_template {template!r} must contain {{yyyymmddhh}}: one bucket per hour")
    raw = prefix + template.replace("{yyyymmddhh}", hours.compact(hour))
    name = _INVALID.sub("-", raw.lower()).strip("-")
    if not 3 <= len(name) <= 63:
        raise ConfigError(f"bucket name {name!r} from template {template!r} is {len(name)} characters; "
                          "S3 allows 3 to 63")
    if name.startswith("sthree-") or name.endswith("-s3alias"):
        raise ConfigError(f"bucket name {name!r} uses a prefix or suffix S3 reserves")
    return name
