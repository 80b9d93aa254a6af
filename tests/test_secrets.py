"""Secrets: no plain token in the database or any log; no S3 secret in config, logs or exceptions.

A representative day, with every secret made by the test: two agents deliver
through a real `ganymede-api` (verbose), one agent with a wrong token and one
revoked agent are refused, an admin reads the roster and the status page, the
hour's backup runs against an S3 server that checks signatures, first with a
wrong secret (from the command line, and in-process with pytest's caplog and
the exceptions Luigi reports), then with the right one. Then everything
written is read back (the API log, the agents' and luigi's output, caplog,
the exceptions and their tracebacks, every file under the state root and the
spools, the decompressed dump and extract, luigi.cfg, every row of every
table, every MongoDB document) and searched for each secret.
"""
import gzip
import io
import json
import logging
import os
import secrets
import tarfile
import traceback
import urllib.request
import base64
from contextlib import closing
from datetime import timedelta

import luigi
import pytest

import faultlib as F
from conftest import drop_buckets
from ganymede import generator, hours
from ganymede.stores import txlog
from ganymede.tasks import HourlyBackup
from test_s3_store import auth_server  # noqa: F401  (fixture: a moto server that checks signatures)


def write_s3curl(path, key_id, secret):
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(f"%awsSecretAccessKeys = (\n  ganymede => {{ id => '{key_id}', key => '{secret}' }},\n);\n")


def readable(path):
    """A file's text for the scan; gzip'd files (dump, extract, archives) decompressed, tar members included."""
    with open(path, "rb") as f:
        data = f.read()
    texts = [data]
    if data[:2] == b"\x1f\x8b":
        try:
            inner = gzip.decompress(data)
        except (OSError, EOFError):
            inner = b""
        texts.append(inner)
        try:
            with tarfile.open(fileobj=io.BytesIO(inner)) as tar:
                texts += [tar.extractfile(m).read() for m in tar if m.isreg()]
        except tarfile.TarError:
            pass
    return "\n".join(t.decode("utf-8", "replace") for t in texts)


def database_text(env):
    """Every cell of every table of the schema, as text."""
    out = []
    with F.sql(env) as conn, conn.cursor() as cur:
        cur.execute("SHOW TABLES")
        for (table,) in cur.fetchall():
            cur.execute(f"SELECT * FROM `{table}`")
            out += [f"{table}: " + " | ".join(map(str, row)) for row in cur.fetchall()]
    return out


@pytest.fixture
def failures():
    seen = []

    def record(task, exception):
        seen.append(exception)

    luigi.Task.event_handler(luigi.Event.FAILURE)(record)
    yield seen
    luigi.Task._event_callbacks[luigi.Task][luigi.Event.FAILURE].discard(record)


@pytest.mark.timeout(240)
def test_no_secret_in_the_database_logs_config_or_exceptions(genv, auth_server, tmp_path, caplog,  # noqa: F811
                                                            failures, mongo_up):
    url, creds = auth_server
    wrong_s3_secret = "wrong-" + secrets.token_urlsafe(30)
    genv.write_config(s3={"endpoint_url": url}, retcode=F.RETCODES, extract={"deadline_minutes": 0})
    hour = hours.last_complete_hour() - timedelta(hours=2)
    hour_text = hours.format_hour(hour)
    outputs = []  # everything printed by every command

    with closing(genv.mysql()) as conn:
        tokens = {a: txlog.add_agent(conn, a, "secret-geo") for a in ("geo-sec-a", "geo-sec-b", "geo-sec-revoked")}
        txlog.revoke_agent(conn, "geo-sec-revoked")
        admin = txlog.add_admin_token(conn, "ops")
    wrong_token = secrets.token_urlsafe(32)
    secret_values = {"S3 secret": creds.key, "wrong S3 secret": wrong_s3_secret, "admin token": admin,
                     "wrong agent token": wrong_token, **{f"token of {a}": t for a, t in tokens.items()}}

    geo_name = f"{genv.mysql_database}_geo"
    with closing(generator.create_database(geo_name)) as geo:
        generator.generate_hour(geo, hour, accounts=30, endpoints=2, nodes=2, seed=3)
    api = F.ApiProcess(genv, tmp_path / "api.log").start()
    try:
        def agent(agent_id, token, expected):
            cfg = generator.write_agent_config(
                str(tmp_path / f"{agent_id}-{expected}.cfg"), api_url=api.url, agent_id=agent_id, token=token,
                geo="secret-geo", database=geo_name, spool_dir=str(tmp_path / "spools" / agent_id),
                retry_budget_seconds=1, retry_base_seconds=0.05, retry_cap_seconds=0.2)
            result = F.run([f"{F.BIN}/ganymede-agent", "--config", cfg, "--hour", hour_text, "--verbose"], None,
                           timeout=90, log=outputs)
            assert result.returncode == expected, result.stderr

        agent("geo-sec-a", tokens["geo-sec-a"], 0)
        agent("geo-sec-b", tokens["geo-sec-b"], 0)
        agent("geo-sec-b", wrong_token, 5)  # refused credentials
        agent("geo-sec-revoked", tokens["geo-sec-revoked"], 5)
        roster = F.call(api.port, "GET", f"/v1/hours/{hour_text}/roster", None, {"Authorization": f"Bearer {admin}"})
        assert roster.status == 200, roster
        page = urllib.request.Request(f"{api.url}/status", headers={
            "Authorization": "Basic " + base64.b64encode(f"admin:{admin}".encode()).decode()})
        with urllib.request.urlopen(page, timeout=10) as resp:
            assert resp.status == 200
        assert F.call(api.port, "GET", "/status", None, {"Authorization": "Basic " + base64.b64encode(
            f"admin:{wrong_token}".encode()).decode()}).status == 401

        # the backup with a wrong S3 secret: from the command line, then in-process (caplog, exceptions)
        write_s3curl(genv.s3curl_path, creds.id, wrong_s3_secret)
        failed = F.run(F.luigi_command(hour_text), genv.subprocess_env, log=outputs)
        assert failed.returncode == F.RETCODES["task_failed"], failed.stderr[-3000:]
        failure_markers = {p: readable(os.path.join(genv.root, p)) for p in F.tree(genv.root)
                           if os.sep + "failures" + os.sep in p}  # removed once the hour succeeds: read them now
        assert failure_markers
        with caplog.at_level(logging.DEBUG):
            result = luigi.build([HourlyBackup(hour=hour)], local_scheduler=True, detailed_summary=True)
        assert result.status.name == "FAILED"
        assert any("SignatureDoesNotMatch" in str(exc) for exc in failures), failures
        exceptions = [text for exc in failures for text in (
            str(exc), repr(exc), "".join(traceback.format_exception(exc)))]

        write_s3curl(genv.s3curl_path, creds.id, creds.key)
        done = F.run(F.luigi_command(hour_text), genv.subprocess_env, log=outputs)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        api.stop()
        generator.drop_database(geo_name)
        drop_buckets(genv.bucket_prefix, F.s3_client(url, creds.id, creds.key))

    # what was written, everywhere
    sources = {"API log": api.log(), "caplog": "\n".join(
        f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records), "luigi.cfg": open(genv.config_path).read()}
    sources.update({f"command output {i}": text for i, text in enumerate(outputs)})
    sources.update({f"exception {i}": text for i, text in enumerate(exceptions)})
    sources["database"] = "\n".join(database_text(genv))
    db = F.mongo_db(genv)
    sources["mongodb"] = "\n".join(json.dumps(d, default=str) for name in db.list_collection_names()
                                   for d in db[name].find())
    for top in (genv.root, str(tmp_path / "spools")):
        for rel in F.tree(top):
            sources[os.path.join(top, rel)] = readable(os.path.join(top, rel))
    sources.update(failure_markers)
    assert any(p.endswith("ganymede.sql.gz") for p in sources)
    assert len(sources["API log"]) > 1000 and sources["mongodb"] and sources["caplog"]

    leaks = [(what, where) for what, value in secret_values.items() for where, text in sources.items()
             if value in text]
    assert leaks == [], f"secrets found: {leaks}"
    # and the tokens are there, hashed: the scan did read the table that holds them
    assert all(txlog.hash_token(t) in sources["database"] for t in tokens.values())
    assert "SignatureDoesNotMatch" in "\n".join(sources[k] for k in sources if k.startswith("command output"))
