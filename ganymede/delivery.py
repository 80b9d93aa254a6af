"""Extract delivery (docs/operations.md, "Extract delivery"): an atomic copy into the vendor's outbox, then
an HTTPS POST when an endpoint is set. Every attempt sends the same Idempotency-Key, so a receiver can drop
the copy a lost response made us send again."""
import os
import shutil
import ssl
import time
from urllib.parse import urlsplit

import urllib3
from urllib3.exceptions import HTTPError, MaxRetryError, SSLError
from urllib3.util import Retry, Timeout

from . import files, hours
from .errors import ConfigError, DeliveryError

USER_AGENT = "ganymede-extract/1"
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
MAX_RETRY_WAIT_S = 300


def copy_to_outbox(path, outbox):
    """Copy a file into the outbox atomically; returns where. The partial copy has a fixed name: the rerun
    after a crash mid-copy overwrites it instead of leaving a stray file for the vendor."""
    dest = os.path.join(outbox, os.path.basename(path))
    partial = os.path.join(outbox, f".{os.path.basename(path)}.partial")
    os.makedirs(outbox, exist_ok=True)
    shutil.copyfile(path, partial)
    return files.move_durably(partial, dest)  # fsyncs the copy before the rename


def read_token(path):
    """The bearer token in `path`, refused if group or others can read it (like .s3curl)."""
    token = files.read_private(path, lambda message: ConfigError(f"[extract] token_file {message}"))
    token = token.decode("utf-8", "replace").strip()
    if not token or any(c in token for c in "\r\n"):
        raise ConfigError(f"[extract] token_file {path} must hold one non-empty line")
    return token


def https_target(url):
    """(host, port, path, url fit for a log) of the delivery endpoint; only HTTPS, no credentials in it."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(f"[extract] endpoint_url must be an https:// URL, not {parts.scheme or 'no'} scheme")
    if parts.username or parts.password:
        raise ConfigError("[extract] endpoint_url must not carry credentials: put a bearer token in token_file")
    shown = f"https://{parts.netloc}{parts.path or '/'}"
    return parts.hostname, parts.port or 443, (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), shown


class _Retry(Retry):
    """urllib3's Retry with the endpoint's Retry-After capped like the backoff."""

    def get_retry_after(self, response):
        seconds = super().get_retry_after(response)
        return None if seconds is None else min(seconds, MAX_RETRY_WAIT_S)


def post_extract(path, sha256, hour, round_, cfg):
    """POST the file to cfg.endpoint_url; the delivery record or DeliveryError."""
    host, port, target, shown = https_target(cfg.endpoint_url)
    if cfg.attempts < 1:
        raise ConfigError("[extract] attempts must be at least 1")
    name = os.path.basename(path)
    headers = {"Content-Type": "application/gzip", "Content-Length": str(os.path.getsize(path)),
               "Content-Disposition": f'attachment; filename="{name}"', "User-Agent": USER_AGENT,
               "Idempotency-Key": f"{name}:{sha256}", "X-Ganymede-Sha256": sha256,
               "X-Ganymede-Hour": hours.format_hour(hour), "X-Ganymede-Round": str(round_)}
    if cfg.token_file:
        headers["Authorization"] = f"Bearer {read_token(cfg.token_file)}"
    retry = _Retry(total=cfg.attempts - 1, other=0, redirect=False, allowed_methods=None,
                   status_forcelist=RETRY_STATUSES, backoff_factor=cfg.retry_wait_seconds,
                   backoff_max=MAX_RETRY_WAIT_S, raise_on_status=False)
    context = ssl.create_default_context(cafile=os.path.expanduser(cfg.ca_file) if cfg.ca_file else None)
    started = time.monotonic()
    with urllib3.HTTPSConnectionPool(host, port, ssl_context=context, maxsize=1, retries=retry,
                                     timeout=Timeout(cfg.timeout_seconds), blocksize=1 << 16) as pool, \
            open(path, "rb") as body:
        try:
            response = pool.urlopen("POST", target, body=body, headers=headers, preload_content=False)
        except MaxRetryError as exc:
            if isinstance(exc.reason, SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(exc.reason):
                raise DeliveryError(f"delivery of {name} to {shown}: the server's certificate was refused "
                                    f"({exc.reason}); set [extract] ca_file if it uses a private CA") from None
            raise DeliveryError(f"delivery of {name} to {shown} failed after {cfg.attempts} attempts: "
                                f"{type(exc.reason).__name__}: {exc.reason}") from None
        except HTTPError as exc:
            raise DeliveryError(f"delivery of {name} to {shown} failed: {type(exc).__name__}: {exc}") from None
        try:
            text = response.read(2048).decode("utf-8", "replace")
        finally:
            response.release_conn()
    attempts = 1 + len(response.retries.history) if response.retries else 1
    if 200 <= response.status < 300:
        return {"url": shown, "status": response.status, "attempts": attempts, "at": hours.now(),
                "seconds": round(time.monotonic() - started, 3), "response": text[:500]}
    problem = f"HTTP {response.status} {response.reason}: {text[:300]}".rstrip(": ")
    if response.status in RETRY_STATUSES:
        raise DeliveryError(f"delivery of {name} to {shown} failed after {attempts} attempts: {problem}")
    raise DeliveryError(f"delivery of {name} to {shown} refused ({problem}); not retried")


def deliver(path, sha256, hour, round_, cfg, outbox):
    """Outbox copy always, then the HTTPS POST if an endpoint is configured; returns the delivery record."""
    record = {"outbox": copy_to_outbox(path, outbox), "https": None}
    if cfg.endpoint_url:
        record["https"] = post_extract(path, sha256, hour, round_, cfg)
    return record
