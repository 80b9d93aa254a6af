"""The status page: `ganymede status` as a grid of hours × stages, for admins.

Same rows as the CLI (ganymede.status), rendered as HTML that refreshes itself.
Browsers cannot send a bearer header, so the admin token is also accepted as
the password of HTTP basic auth (user `admin`).
"""
import base64
import binascii
import html
from datetime import timedelta

from .. import hours, status
from ..stores import txlog
from .handlers import ApiError, BaseHandler

COLOURS = {"done": "#2e7d32", "partial": "#f9a825", "pending": "#9e9e9e", "failed": "#c62828",
           "late": "#ef6c00", "closed": "#2e7d32", "waiting": "#1565c0", "open": "#f9a825", "overdue": "#ef6c00",
           "idle": "#cfd8dc"}


def cells(row):
    """(stage, text, colour class) for each column of one hour."""
    def ratio(n, d):
        return "done" if d and n == d else ("partial" if n else "pending")
    agents = ratio(len(row.arrived), len(row.expected)) if row.expected else ("done" if row.arrived else "pending")
    extract = {"on time": "done", "after deadline": "late"}.get(row.extract, "pending")
    backup = "done" if row.backup == "done" else ("partial" if row.backup.startswith("reopened") else "pending")
    failed = "failed" if row.failures else None
    return [
        ("agents", f"{len(row.arrived)}/{len(row.expected)}", agents),
        ("staged", f"{row.staged}/{row.transactions}", ratio(row.staged, row.transactions)),
        ("loaded", f"{row.loaded}/{row.transactions}", ratio(row.loaded, row.transactions)),
        ("extract", row.extract + (f" +{row.supplementary}" if row.supplementary else ""), extract),
        ("backup", row.backup, failed or backup),
        ("verdict", row.verdict + (f": {', '.join(row.failures)}" if row.failures else ""), row.verdict),
    ]


def render(rows, refresh_seconds=30):
    header = "".join(f"<th>{stage}</th>" for stage, _, _ in cells(rows[0])) if rows else ""
    body = "\n".join(
        f'<tr data-hour="{hours.format_hour(r.hour)}"><th>{hours.format_hour(r.hour)}</th>'
        + "".join(f'<td class="{cls}" data-stage="{stage}">{html.escape(text)}</td>' for stage, text, cls in cells(r))
        + "</tr>" for r in rows)
    style = "".join(f".{name}{{background:{colour};color:#fff}}" for name, colour in COLOURS.items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="{refresh_seconds}">
<title>Ganymede status</title>
<style>body{{font:14px sans-serif;margin:1.5em}}table{{border-collapse:collapse}}
th,td{{padding:.35em .8em;border:1px solid #fff;text-align:left}}thead th{{background:#263238;color:#fff}}
tbody th{{background:#eceff1;font-family:monospace}}{style}</style></head>
<body><h1>Ganymede: the last {len(rows)} hours (UTC)</h1>
<p>Generated {hours.now():%Y-%m-%d %H:%M:%S} UTC; refreshes every {refresh_seconds} s.</p>
<table id="grid"><thead><tr><th>hour</th>{header}</tr></thead>
<tbody>
{body}
</tbody></table></body></html>
"""


class StatusPageHandler(BaseHandler):
    def basic_or_bearer(self):
        scheme, _, value = self.request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise ApiError(400, "malformed basic credentials") from None
            return password if user == "admin" else ""
        return self.bearer()

    def write_error(self, status_code, **kwargs):
        if status_code == 401:
            self.set_header("WWW-Authenticate", 'Basic realm="ganymede status"')
        super().write_error(status_code, **kwargs)

    async def get(self):
        token = self.basic_or_bearer()
        if not token or not await self.db(txlog.authenticate_admin, token):
            raise ApiError(401, "admin token required (basic auth: user admin, password the token)")
        last = hours.last_complete_hour()
        first = last - timedelta(hours=self.api.status_hours - 1)
        rows = await self.db(lambda conn: status.hours_status(conn, self.api.state, first, last,
                                                              self.api.deadline_minutes, self.api.overdue_minutes))
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.finish(render(rows))
