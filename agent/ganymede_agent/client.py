"""ganymede-api over HTTP (urllib): retries within one budget per run (the API is idempotent per hour)."""
import email.utils
import http.client
import json
import logging
import os
import random
import ssl
import time
import urllib.error
import urllib.request
from collections import namedtuple
from datetime import datetime, timezone
from itertools import count
from urllib.parse import urljoin, urlsplit

from . import __version__

log = logging.getLogger("ganymede_agent")

TRANSIENT_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))
AUTH_STATUSES = frozenset({401, 403})
_PROTOCOL_RESTARTS = 3


class Unavailable(Exception):
    """Transient failures outlasted the run's retry budget (or cannot be retried, like a bad certificate)."""


class Misdirected(Exception):
    """[api] url does not lead to the API: a redirect, or no transactions endpoint there. Nothing is rejected."""


class Refused(Exception):
    """The API refused a call for good (a 4xx other than 408/429): `status`, the server's `error`, `body`."""

    def __init__(self, call, status, body):
        self.call, self.status, self.body = call, status, body
        self.error = self.body.get("error") or f"HTTP {status}"
        super().__init__(f"{call} -> {status}: {self.error}")

    def reason(self):
        """What is kept beside a rejected archive."""
        return {"call": self.call, "status": self.status, "error": self.error, "response": self.body}


Response = namedtuple("Response", "status body headers")
# already: the server had completed this very archive before (a lost answer)
Delivered = namedtuple("Delivered", "transaction_id rows already", defaults=(False,))


class RetryBudget:
    """Backoff delays, and the run's budget for them (it starts at the first failure)."""

    def __init__(self, budget_seconds, base_seconds, cap_seconds, clock=time.monotonic, sleep=time.sleep,
                 rng=random.random):
        self.budget, self.base, self.cap = budget_seconds, base_seconds, cap_seconds
        self.clock, self.sleep, self.rng = clock, sleep, rng
        self.deadline = None

    def delay(self, attempt, retry_after=None):
        if retry_after is not None:
            return retry_after
        return self.rng() * min(self.cap, self.base * 2 ** attempt)

    def wait(self, attempt, retry_after, failure):
        """Sleep before retry number `attempt`, or raise Unavailable if that would overrun the budget."""
        now = self.clock()
        if self.deadline is None:
            self.deadline = now + self.budget
        delay = self.delay(attempt, retry_after)
        if now + delay > self.deadline:
            raise Unavailable(f"{failure} (retry budget of {self.budget:g}s used up)")
        log.debug("%s; retry %d in %.2fs", failure, attempt + 1, delay)
        self.sleep(delay)


def parse_retry_after(value, now=None):
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # a redirect surfaces as its 3xx: POSTs must not silently become GETs


class Api:
    def __init__(self, base_url, agent_id, token, timeout, budget, ca_file=""):
        self.base_url = base_url.rstrip("/") + "/"
        self.agent_id, self._token, self.timeout, self.budget = agent_id, token, timeout, budget
        handlers = [_NoRedirect]
        if urlsplit(self.base_url).scheme == "https":  # building a TLS context costs ~0.2 s: only when used
            handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=ca_file or None)))
        self._opener = urllib.request.build_opener(*handlers)

    def url(self, path):
        return urljoin(self.base_url, path.lstrip("/"))  # an absolute upload_url stays as it is

    def call(self, method, path, json_body=None, file_path=None, headers=None):
        """One API call, retried while transient; returns the Response for any other status."""
        url, call = self.url(path), f"{method} {urlsplit(self.url(path)).path}"
        for attempt in count():
            try:
                response = self._once(method, url, json_body, file_path, headers or {})
            except ssl.SSLCertVerificationError as exc:
                raise Unavailable(f"{call}: TLS certificate not trusted ({exc.verify_message}); "
                                  "check [api] url and ca_file") from None
            except (OSError, http.client.HTTPException) as exc:
                failure, retry_after = f"{call}: {_describe(exc)}", None
            else:
                if 300 <= response.status < 400:
                    raise Misdirected(f"{call}: redirected ({response.status}) to "
                                      f"{response.headers.get('location', '?')}; fix [api] url")
                if response.status not in TRANSIENT_STATUSES:
                    return response
                failure = f"{call}: HTTP {response.status} {response.body.get('error', '')}".rstrip()
                retry_after = parse_retry_after(response.headers.get("retry-after"))
            self.budget.wait(attempt, retry_after, failure)

    def _once(self, method, url, json_body, file_path, extra_headers):
        headers = {"Authorization": f"Bearer {self._token}", "X-Agent-Id": self.agent_id,
                   "Accept": "application/json", "User-Agent": f"ganymede-agent/{__version__}", **extra_headers}
        body = None
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        elif file_path is not None:
            body = open(file_path, "rb")
            headers["Content-Type"] = "application/octet-stream"
            headers["Content-Length"] = str(os.fstat(body.fileno()).st_size)
        request = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            resp = self._opener.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            resp = exc
        except urllib.error.URLError as exc:  # its reason, so call() tells a bad certificate from a refusal
            raise exc.reason if isinstance(exc.reason, OSError) else OSError(str(exc.reason)) from None
        finally:
            if hasattr(body, "close"):
                body.close()
        with resp:
            return Response(resp.status, _json(resp.read()), {k.lower(): v for k, v in resp.headers.items()})

    def deliver(self, hour, path, sha256, replace=False):
        """Create (or resume) the hour's transaction, upload the archive, complete it; returns Delivered."""
        # replace=True only once the server holds a different archive: a retried replacement is a no-op
        for _ in range(_PROTOCOL_RESTARTS):
            r = self.call("POST", "/v1/transactions", {"agent_id": self.agent_id, "hour": hour, "replace": False})
            if r.status == 409 and (done := self._completed_with(r.body.get("transaction_id"), sha256)):
                return done
            if r.status == 409 and replace:
                r = self.call("POST", "/v1/transactions", {"agent_id": self.agent_id, "hour": hour, "replace": True})
            if r.status == 409:
                raise Refused("POST /v1/transactions", 409, dict(r.body, error=(
                    f"hour {hour} was already completed on the server with a different archive "
                    f"(transaction {r.body.get('transaction_id')}): {r.body.get('error', '')}").strip()))
            if r.status in (404, 405):
                raise Misdirected(f"POST {self.url('/v1/transactions')} answered {r.status}: "
                                  "is [api] url the Ganymede API?")
            _expect(r, "POST /v1/transactions", 200, 201)
            tx, r = r.body, None
            call = f"PUT {tx['upload_url']}"
            if not (tx.get("state") == "uploaded" and tx.get("sha256") == sha256):
                r = self.call("PUT", tx["upload_url"], file_path=path, headers={"X-Archive-SHA256": sha256})
            if r is None or r.status in (200, 201):
                call, r = f"POST {tx['complete_url']}", self.call("POST", tx["complete_url"])
                if r.status == 200:
                    return Delivered(tx["transaction_id"], r.body.get("rows") or {})
            if r.status != 409:
                raise Refused(call, r.status, r.body)
            if done := self._completed_with(tx["transaction_id"], sha256):
                return done
            # the transaction moved on (abandoned, failed): start again
        raise Refused("POST /v1/transactions", 409, {"error": f"hour {hour}: the transaction kept changing state "
                                                              f"under this agent ({_PROTOCOL_RESTARTS} attempts)"})

    def _completed_with(self, transaction_id, sha256):
        """Delivered if that transaction is completed with exactly our archive (an answer we lost)."""
        if not transaction_id:
            return None
        r = self.call("GET", f"/v1/transactions/{transaction_id}")
        if r.status == 200 and r.body.get("state") == "completed" and r.body.get("sha256") == sha256:
            return Delivered(transaction_id, r.body.get("rows") or {}, already=True)
        if r.status in AUTH_STATUSES:
            _expect(r, f"GET /v1/transactions/{transaction_id}", 200)
        return None


def _expect(response, call, *statuses):
    if response.status not in statuses:
        raise Refused(call, response.status, response.body)


def _json(data):
    try:
        value = json.loads(data.decode("utf-8")) if data else {}
    except (UnicodeDecodeError, ValueError):
        return {"error": data[:200].decode("utf-8", "replace").strip()}
    return value if isinstance(value, dict) else {"value": value}


def _describe(exc):
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = getattr(exc, "strerror", None) or str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
