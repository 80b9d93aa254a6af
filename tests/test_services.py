"""The services script and the test servers it starts (run `make services` first)."""

import datetime
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from pymongo import MongoClient, UpdateOne
from pymongo.errors import PyMongoError

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "services"
SERVICES = ["mariadb", "mongodb", "s3", "luigid"]
HOUR = datetime.datetime(2026, 11, 30, 5)


def services(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def new_mongo_db():
    port = int(os.environ.get("GANYMEDE_MONGO_PORT", "27017"))
    client = MongoClient("127.0.0.1", port, serverSelectionTimeoutMS=5000)
    try:
        client.admin.command("ping")
    except PyMongoError as exc:
        pytest.fail(f"no MongoDB test server on 127.0.0.1:{port} ({exc}); start it with: make services")
    names = []

    def database():
        names.append(f"test_services_{uuid.uuid4().hex[:12]}")
        return client[names[-1]]

    yield database
    for name in names:
        client.drop_database(name)
    client.close()


def test_status_lists_every_service_up():
    res = services("status")
    assert res.returncode == 0, f"some service is down; start them with: make services\n{res.stderr}"
    rows = [line.split() for line in res.stdout.splitlines()]
    assert [row[0] for row in rows] == SERVICES
    assert all(row[2] == "up" for row in rows), res.stdout


@pytest.mark.parametrize("name", SERVICES)
def test_each_service_answers(name):
    res = services("status", name)
    assert res.returncode == 0, f"{res.stderr.strip()}; start it with: make services"
    row = res.stdout.split()
    assert (row[0], row[2]) == (name, "up"), res.stdout


@pytest.mark.parametrize("args", [("status", "nosuch"), ("start", "mongodb", "nosuch"), ("reload",), ()])
def test_bad_arguments_are_one_line_on_stderr(args):
    res = services(*args)
    assert res.returncode == 1
    assert res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.stderr


def test_set_datetime_on_existing_document_keeps_a_datetime(new_mongo_db):
    docs = new_mongo_db()["docs"]
    docs.insert_many([{"_id": 1}, {"_id": 2}, {"_id": 3}])
    docs.update_one({"_id": 1}, {"$set": {"hour": HOUR, "nested": {"at": HOUR}}})
    docs.find_one_and_update({"_id": 2}, {"$set": {"hour": HOUR}})
    docs.bulk_write([UpdateOne({"_id": 3}, {"$set": {"hour": HOUR}})])
    for doc in docs.find():
        assert isinstance(doc["hour"], datetime.datetime), doc
        assert doc["hour"] == HOUR
    assert docs.find_one({"_id": 1})["nested"]["at"] == HOUR
    assert docs.count_documents({"hour": {"$gte": HOUR}}) == 3


def test_databases_are_isolated_and_dropped_one_at_a_time(new_mongo_db):
    first, second = new_mongo_db(), new_mongo_db()
    first["c"].insert_one({"_id": "a"})
    second["c"].insert_one({"_id": "b"})
    assert [d["_id"] for d in second["c"].find()] == ["b"]
    first.client.drop_database(first.name)
    assert first["c"].count_documents({}) == 0
    assert second["c"].count_documents({}) == 1


def test_restart_brings_back_an_empty_server_and_leaves_others_alone(tmp_path):
    """A second S3 test server of our own (own port, own runtime dir): restarted, it has forgotten its buckets;
    the MongoDB server this run did not start is left alone."""
    import boto3
    from conftest import free_port
    env = dict(os.environ, GANYMEDE_SERVICES_DIR=str(tmp_path), GANYMEDE_S3_PORT=str(free_port()))
    run = lambda *args: subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                                       timeout=60, env=env)
    assert run("start", "s3").returncode == 0
    try:
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{env['GANYMEDE_S3_PORT']}", region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
        s3.create_bucket(Bucket="before-restart")
        first_pid = (tmp_path / "s3.pid").read_text().strip()
        res = run("restart", "s3", "mongodb")
        assert res.returncode == 0, res.stderr
        assert "mongodb: not restarted (not started by us)" in res.stdout
        assert (tmp_path / "s3.pid").read_text().strip() != first_pid
        assert s3.list_buckets()["Buckets"] == []
    finally:
        run("stop", "s3")
