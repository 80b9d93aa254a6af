"""/healthz: MySQL's schema, a writable state root and enough free disk; 503 naming what failed."""
import os
import shutil
import uuid

from ..errors import StoreUnavailable
from ..stores import mysql
from .base import ApiError, BaseHandler, log


def free_bytes(path):
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def checks(api, pool):
    found = {}
    try:
        with pool.connection() as conn:
            mysql.check_schema(conn)
        found["mysql"] = {"ok": True}
    except StoreUnavailable as exc:
        log.warning("healthz: %s", exc)
        found["mysql"] = {"ok": False, "detail": "unreachable"}
    except Exception as exc:  # SchemaError and anything else MySQL says: report, never 500
        found["mysql"] = {"ok": False, "detail": str(exc)[:200]}
    try:
        directory = os.path.dirname(api.state.incoming("healthz"))
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".healthz-{uuid.uuid4().hex}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
        found["state_root"] = {"ok": True}
    except OSError as exc:
        found["state_root"] = {"ok": False, "detail": f"not writable: {exc.strerror}"}
    try:
        free = free_bytes(api.state.root)
        found["disk"] = {"ok": free >= api.min_free_bytes, "free_mb": free >> 20, "min_free_mb": api.min_free_bytes >> 20}
    except OSError as exc:
        found["disk"] = {"ok": False, "detail": exc.strerror}
    return found


class HealthHandler(BaseHandler):
    async def get(self):
        found = await self.run(checks, self.api, self.pool)
        failed = sorted(name for name, check in found.items() if not check["ok"])
        if failed:
            raise ApiError(503, f"unhealthy: {', '.join(failed)}", ok=False, checks=found)
        self.send_json(200, {"ok": True, "checks": found})
