"""The status page in a real headless browser (Debian's Chromium), and its auth."""
import base64
import os
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from datetime import timedelta
from html.parser import HTMLParser

import luigi
import pytest

from ganymede import hours, status
from ganymede.api import status_page
from ganymede.stores import txlog
from ganymede.tasks import HourlyBackup
from conftest import completed_transaction

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium(*args):
    binary = shutil.which("chromium")
    if not binary:
        pytest.fail("chromium is not installed; run: make browser (apt-get install chromium)", pytrace=False)
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=90)


class Grid(HTMLParser):
    """{hour: {stage: css class}} from the rendered DOM."""

    def __init__(self):
        super().__init__()
        self.rows, self.hour = {}, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-hour" in attrs:
            self.hour = attrs["data-hour"]
            self.rows[self.hour] = {}
        elif tag == "td" and self.hour and "data-stage" in attrs:
            self.rows[self.hour][attrs["data-stage"]] = attrs.get("class")


@pytest.fixture
def admin_token(genv):
    with genv.mysql() as conn:
        return txlog.add_admin_token(conn, "ops")


def test_status_page_grid_in_a_real_browser(genv, api_server, admin_token, mongo_up, s3_up):
    closed = hours.last_complete_hour() - timedelta(hours=3)
    completed_transaction(genv, "agent-a", closed)
    assert luigi.build([HourlyBackup(hour=closed)], local_scheduler=True)
    latest = hours.last_complete_hour()
    completed_transaction(genv, "agent-a", latest)
    url = api_server.replace("http://", f"http://admin:{admin_token}@") + "/status"
    result = chromium("--dump-dom", url)
    parser = Grid()
    parser.feed(result.stdout)
    assert len(parser.rows) == 24, result.stdout[:2000]
    row = parser.rows[hours.format_hour(closed)]
    assert row == {"agents": "done", "staged": "done", "loaded": "done", "extract": "done", "backup": "done",
                   "verdict": "closed"}
    assert parser.rows[hours.format_hour(latest)]["staged"] == "pending"
    assert parser.rows[hours.format_hour(latest)]["verdict"] in ("waiting", "open")
    assert re.search(r'<meta http-equiv="refresh" content="\d+">', result.stdout)
    if os.environ.get("GANYMEDE_DOCS_SCREENSHOTS"):  # refresh docs/images/ from this world
        chromium("--hide-scrollbars", "--window-size=1280,900",
                 f"--screenshot={os.environ['GANYMEDE_DOCS_SCREENSHOTS']}/status-page.png", url)


def test_status_page_needs_an_admin_token(genv, api_server, admin_token):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(api_server + "/status", timeout=5)
    assert err.value.code == 401 and err.value.headers["WWW-Authenticate"].startswith("Basic")
    wrong = base64.b64encode(b"admin:not-the-token").decode()
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(api_server + "/status",
                                                      headers={"Authorization": f"Basic {wrong}"}), timeout=5)
    assert err.value.code == 401
    ok = urllib.request.urlopen(urllib.request.Request(api_server + "/status",
                                                       headers={"Authorization": f"Bearer {admin_token}"}), timeout=5)
    assert ok.status == 200 and "text/html" in ok.headers["Content-Type"]


def relative_luminance(colour):
    """WCAG 2.x relative luminance of #rrggbb."""
    def channel(hex2):
        c = int(hex2, 16) / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (channel(colour[i:i + 2]) for i in (1, 3, 5))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


@pytest.mark.parametrize("name, pair", sorted({**status_page.COLOURS, **status_page.PAGE_COLOURS}.items()))
def test_every_colour_pair_reaches_wcag_aa(name, pair):
    lighter, darker = sorted((relative_luminance(c) for c in pair), reverse=True)
    assert (lighter + 0.05) / (darker + 0.05) >= 4.5, (name, pair)


def test_every_verdict_has_a_colour():
    assert {status_page.css_class(v) for v in status.VERDICTS} <= set(status_page.COLOURS)


class Tables(HTMLParser):
    """{table id: [[cell text, …] per body row]} and the links, from the rendered DOM."""

    def __init__(self):
        super().__init__()
        self.tables, self.links, self.ids, self.table, self.row, self.cell = {}, {}, {}, None, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids[attrs["id"]] = attrs
        if tag == "table":
            self.table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr" and self.table is not None:
            self.row = []
        elif tag == "td" and self.row is not None:
            self.cell = ""
        elif tag == "a":
            self.links[attrs.get("id") or attrs.get("href")] = attrs.get("href")

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data

    def handle_endtag(self, tag):
        if tag == "td" and self.row is not None:
            self.row.append(self.cell)
            self.cell = None
        elif tag == "tr" and self.row:
            self.table.append(self.row)
            self.row = None
        elif tag == "table":
            self.table = None


def test_the_page_of_one_hour_in_a_real_browser(genv, api_server, admin_token, mongo_up, s3_up, tmp_path):
    hour = hours.last_complete_hour() - timedelta(hours=3)
    good = completed_transaction(genv, "agent-a", hour)
    with genv.mysql() as conn:
        txlog.add_agent(conn, "agent-b", "geo-b", expected_from=hour)
    assert luigi.build([HourlyBackup(hour=hour)], local_scheduler=True)
    url = (api_server.replace("http://", f"http://admin:{admin_token}@") + f"/status?hour={hours.format_hour(hour)}")
    result = chromium("--dump-dom", url)
    page = Tables()
    page.feed(result.stdout)
    assert page.tables["agents"] == [["agent-a", "sent", "yes"], ["agent-b", "missing", "yes"]], result.stdout[:3000]
    ((tx_id, agent, state, archive, reason),) = page.tables["transactions"]
    assert (tx_id, agent, state, reason) == (good["transaction_id"], "agent-a", "completed", "")
    assert archive.startswith("archives/")  # moved by the backup; the page says where it is now
    assert [r[0] for r in page.tables["rounds"]] == ["0"]
    keys = {r[0] for r in page.tables["objects"]}
    assert {"MANIFEST.json", f"archives/agent-a/{good['transaction_id']}.tar.gz"} <= keys
    assert page.links["graph"].endswith("taskId=" + HourlyBackup(hour=hour).task_id)
    assert page.ids["verdict"]["data-verdict"] == "closed"
    shot = tmp_path / "status-hour.png"
    chromium("--hide-scrollbars", "--window-size=1280,900", f"--screenshot={shot}", url)
    assert open(shot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("GANYMEDE_DOCS_SCREENSHOTS"):  # scripts/screenshots sets it to refresh docs/images/
        shutil.copy(shot, os.path.join(os.environ["GANYMEDE_DOCS_SCREENSHOTS"], "status-hour.png"))
