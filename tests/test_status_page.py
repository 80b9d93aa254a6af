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

from ganymede import hours
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
