"""The admins' status page: `ganymede status` as a grid of hours × stages, and `/status?hour=H`."""
import base64
import binascii
import glob
import html
import os
from datetime import timedelta

from .. import hours, markers, runs, status
from ..stores import quality
from .base import ApiError, BaseHandler, hour_arg

# (background, text) per cell class; every pair reaches WCAG AA contrast (4.5:1) for normal text
COLOURS = {"done": ("#2e7d32", "#ffffff"), "partial": ("#f9a825", "#000000"), "pending": ("#e0e0e0", "#212121"),
           "failed": ("#c62828", "#ffffff"), "late": ("#ef6c00", "#000000"), "closed": ("#2e7d32", "#ffffff"),
           "waiting": ("#1565c0", "#ffffff"), "open": ("#f9a825", "#000000"), "overdue": ("#ef6c00", "#000000"),
           "idle": ("#eceff1", "#37474f"), "no-data": ("#6a1b9a", "#ffffff")}
PAGE_COLOURS = {"header": ("#263238", "#ffffff"), "hour": ("#eceff1", "#000000"), "body": ("#ffffff", "#212121"),
                "link": ("#ffffff", "#0d47a1")}
REFRESH = 30


def css_class(verdict):
    return verdict.replace(" ", "-")


def cells(row):
    """(stage, text, colour class) for each column of one hour."""
    def ratio(n, d):
        return "done" if d and n == d else ("partial" if n else "pending")
    agents = ratio(len(row.arrived_expected), len(row.expected)) if row.expected else (
        "done" if row.arrived else "pending")
    extract = {"on time": "done", "after deadline": "late", "no data": "no-data"}.get(row.extract, "pending")
    backup = "done" if row.backup == "done" else ("partial" if row.backup.startswith("reopened") else "pending")
    return [
        ("agents", row.agents_text(), agents),
        ("staged", f"{row.staged}/{row.transactions}", ratio(row.staged, row.transactions)),
        ("loaded", f"{row.loaded}/{row.transactions}", ratio(row.loaded, row.transactions)),
        ("extract", row.extract + (f" +{row.supplementary}" if row.supplementary else ""), extract),
        ("backup", row.backup, "failed" if row.failures else backup),
        ("verdict", row.verdict + (f": {', '.join(row.failures)}" if row.failures else "")
         + (f"; quality {len(row.quality_failures)} failed" if row.quality_failures else ""), css_class(row.verdict)),
    ]


def _page(title, body):
    style = "".join(f".{name}{{background:{bg};color:{fg}}}" for name, (bg, fg) in COLOURS.items())
    (hbg, hfg), (rbg, rfg), (bbg, bfg), (_, link) = (PAGE_COLOURS[k] for k in ("header", "hour", "body", "link"))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH}">
<title>{html.escape(title)}</title>
<style>body{{font:14px sans-serif;margin:1.5em;background:{bbg};color:{bfg}}}table{{border-collapse:collapse}}
th,td{{padding:.35em .8em;border:1px solid #fff;text-align:left}}thead th{{background:{hbg};color:{hfg}}}
tbody th{{background:{rbg};color:{rfg};font-family:monospace}}a{{color:{link}}}
.detail td,.detail th{{border:1px solid #cfd8dc}}
#verdict{{white-space:pre;font-family:monospace;padding:.4em .8em;display:inline-block}}{style}</style></head>
<body>{body}</body></html>
"""


def render(rows):
    header = "".join(f"<th>{stage}</th>" for stage, _, _ in cells(rows[0])) if rows else ""
    body = "\n".join(
        f'<tr data-hour="{hours.format_hour(r.hour)}"><th><a href="/status?hour={hours.format_hour(r.hour)}">'
        f'{hours.format_hour(r.hour)}</a></th>'
        + "".join(f'<td class="{cls}" data-stage="{stage}">{html.escape(text)}</td>' for stage, text, cls in cells(r))
        + "</tr>" for r in rows)
    return _page("Ganymede status", f"""<h1>Ganymede: the last {len(rows)} hours (UTC)</h1>
<p>Generated {hours.now():%Y-%m-%d %H:%M:%S} UTC; refreshes every {REFRESH} s. An hour's link opens its
detail.</p>
<table id="grid"><thead><tr><th>hour</th>{header}</tr></thead>
<tbody>
{body}
</tbody></table>""")


def _table(id_, headers, rows):
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="detail" id="{id_}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def render_hour(row, transactions, root, graph, checks=()):
    """One hour in detail; extract rounds and bucket objects from its manifests and backup marker (no S3)."""
    h = hours.format_hour(row.hour)
    manifests = [markers.read_json(path) for path in glob.glob(root.extract_manifests_glob(row.hour))]
    rounds = sorted(((m.get("round"), m.get("file"), sum((m.get("counts") or {}).values()),
                      len(m.get("transactions", [])), "yes" if m.get("delivery") else "no (no data)")
                     for m in manifests), key=lambda r: r[0])
    marker = root.hour_marker(row.hour, "backup")
    backup = markers.read_json(marker) if os.path.exists(marker) else {}
    missing = ", ".join(row.not_arrived) or "none"
    agents = [(a, "sent" if a in row.arrived else "missing", "yes") for a in row.expected] + [
        (a, "sent", "no") for a in row.unexpected]
    failures = "".join(f"<li><b>{html.escape(f)}</b>: {html.escape(r)}</li>" for f, r in sorted(row.reasons.items()))
    txs = [(t["transaction_id"], t["agent_id"], t["state"],
            os.path.relpath(t["location"], root.root) if t.get("location") else "(no archive)",
            " ".join(str(t.get("error") or "").split())) for t in transactions]
    body = f"""<p><a href="/status">all hours</a></p>
<h1>Ganymede: hour {h} (UTC)</h1>
<p id="verdict" class="{css_class(row.verdict)}" data-verdict="{html.escape(row.verdict)}">{html.escape(row.line())}</p>
<p><a id="graph" href="{html.escape(graph)}">dependency graph in luigid</a></p>
<h2>Agents ({len(row.arrived_expected)} of {len(row.expected)} expected; missing: {html.escape(missing)})</h2>
{_table("agents", ("agent", "data", "expected"), agents)}
<h2>Failures</h2>
{f'<ul id="failures">{failures}</ul>' if failures else '<p id="failures">none</p>'}
<h2>Quality checks ({sum(not c.passed for c in checks)} failed of {len(checks)})</h2>
{_table("quality", ("result", "agent", "dataset", "check", "observed", "expected", "detail"),
        [("ok" if c.passed else "FAILED", c.agent_id, c.dataset, c.check, f"{c.observed:g}", c.expected, c.detail)
         for c in checks])}
<h2>Transactions</h2>
{_table("transactions", ("transaction", "agent", "state", "archive", "reason"), txs)}
<h2>Extract rounds</h2>
{_table("rounds", ("round", "file", "rows", "transactions", "delivered"), rounds)}
<h2>Bucket {html.escape(backup.get("bucket") or "(not backed up yet)")}</h2>
{_table("objects", ("key", "bytes"), [(o["key"], o["size"]) for o in backup.get("objects", [])])}"""
    return _page(f"Ganymede {h}", body)


class StatusPageHandler(BaseHandler):
    challenge = 'Basic realm="ganymede status"'  # a browser then asks for the admin token

    def basic_or_bearer(self):  # browsers send no bearer header: the admin token is basic auth's password too
        scheme, _, value = self.request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise ApiError(400, "malformed basic credentials") from None
            return password if user == "admin" else ""
        return self.bearer()

    async def get(self):
        await self.authenticate_admin(self.basic_or_bearer(),
                                      "admin token required (basic auth: user admin, password the token)")
        hour = self.get_argument("hour", None)
        if hour is not None:
            page = await self.db(self.hour_page, hour_arg(hour))
        else:
            last = hours.last_complete_hour()
            page = render(await self.db(status.hours_status, self.api.state, last - timedelta(
                hours=self.api.status_hours - 1), last, self.api.deadline_minutes, self.api.overdue_minutes))
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.finish(page)

    def hour_page(self, conn, hour):
        (row,) = status.hours_status(conn, self.api.state, hour, hour, self.api.deadline_minutes,
                                     self.api.overdue_minutes)
        transactions = status.hour_transactions(conn, self.api.state, hour)
        return render_hour(row, transactions, self.api.state, status.graph_url(runs.scheduler_url(), hour),
                           checks=quality.hour_results(conn, hour))
