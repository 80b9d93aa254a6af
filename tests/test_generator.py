"""The GEO stats generator: realistic rows the catalog accepts, deterministic per seed."""
import csv
import gzip
import io
import os
import stat
import tarfile
import tempfile
import uuid
from contextlib import closing

import pytest

from ganymede import generator
from ganymede.datasets import CATALOG
from ganymede_agent import archive, collect, config

from conftest import require_port

HOUR = "2026-11-30T05"


@pytest.fixture
def geo_db():
    require_port("127.0.0.1", 3306, "MariaDB")
    name = f"ggen_{uuid.uuid4().hex[:10]}"
    conn = generator.create_database(name)
    yield name, conn
    conn.close()
    generator.drop_database(name)


def read_datasets(name, hour):
    """{dataset: (header, rows)}: through the agent's reader, the sample SQL and an archive read back with
    gzip, tarfile and csv alone."""
    source = collect.Source(config.Database(database=name), generator.sample_datasets())
    with tempfile.TemporaryDirectory() as tmp:
        dest = os.path.join(tmp, "a.tar.gz")
        with closing(source.datasets(hour)) as datasets:
            archive.build_archive(dest, {"agent_id": "a", "geo": "g", "hour": hour, "agent_version": "t"}, datasets)
        out = {}
        with gzip.open(dest) as gz, tarfile.open(fileobj=gz, mode="r|") as tar:
            for member in tar:
                if member.name.endswith(".csv"):
                    text = tar.extractfile(member).read().decode("utf-8")
                    header, *rows = csv.reader(io.StringIO(text, newline=""))
                    out[member.name[:-len(".csv")]] = (header, rows)
        return out


def test_every_generated_row_satisfies_the_catalog(geo_db):
    name, conn = geo_db
    counts = generator.generate_hour(conn, HOUR, accounts=300, endpoints=6, nodes=5, seed=3)
    assert counts == {"account_usage_hourly": 300, "api_request_stats": 5 * 6 * 13, "node_samples": 5 * 60}
    data = read_datasets(name, HOUR)
    assert set(data) == set(CATALOG)
    for dataset, (header, rows) in data.items():
        assert tuple(header) == CATALOG[dataset].column_names
        parsed = [CATALOG[dataset].parse_row(row, collect.parse_hour(HOUR)) for row in rows]
        assert len(parsed) == {"account_usage": 300, "api_requests": 390, "node_health": 300}[dataset]
    api = [CATALOG["api_requests"].parse_row(r, collect.parse_hour(HOUR)) for r in data["api_requests"][1]]
    assert any(r["status"] >= 500 for r in api) and any(r["status"] < 300 for r in api)
    assert all(200 <= r["status"] <= 599 for r in api)
    nodes = [CATALOG["node_health"].parse_row(r, collect.parse_hour(HOUR)) for r in data["node_health"][1]]
    assert len({r["node_id"] for r in nodes}) == 5 and any(r["errors"] for r in nodes)


def test_same_seed_same_rows_other_seed_other_rows(geo_db):
    name, conn = geo_db
    generator.generate_hour(conn, HOUR, seed=11)
    first = read_datasets(name, HOUR)
    generator.generate_hour(conn, HOUR, seed=11)  # a rerun replaces the hour, it does not add to it
    assert read_datasets(name, HOUR) == first
    generator.generate_hour(conn, HOUR, seed=12)
    assert read_datasets(name, HOUR)["account_usage"] != first["account_usage"]


def test_hours_stay_apart(geo_db):
    name, conn = geo_db
    generator.generate_hour(conn, HOUR, accounts=10, endpoints=1, nodes=1)
    generator.generate_hour(conn, "2026-11-30T06", accounts=20, endpoints=1, nodes=2)
    assert len(read_datasets(name, HOUR)["account_usage"][1]) == 10
    assert len(read_datasets(name, "2026-11-30T06")["node_health"][1]) == 120
    assert all(not rows for header, rows in read_datasets(name, "2026-11-30T07").values())


@pytest.mark.parametrize("rows, split", [
    (0, (0, 0, 0)), (1, (0, 0, 1)), (7, (4, 1, 2)), (1000, (600, 200, 200)), (12345, (7407, 2469, 2469))])
def test_rows_spreads_an_exact_total(geo_db, rows, split):
    """60% accounts, 20% API stats, the rest node samples."""
    name, conn = geo_db
    counts = generator.generate_hour(conn, HOUR, rows=rows, seed=1)
    assert (counts["account_usage_hourly"], counts["api_request_stats"], counts["node_samples"]) == split
    data = read_datasets(name, HOUR)
    assert tuple(len(data[d][1]) for d in ("account_usage", "api_requests", "node_health")) == split
    for dataset, (header, values) in data.items():
        for row in values:
            CATALOG[dataset].parse_row(row, collect.parse_hour(HOUR))


def test_write_agent_config_is_private_and_loads(tmp_path):
    path = generator.write_agent_config(
        str(tmp_path / "agent.cfg"), api_url="http://127.0.0.1:8750", agent_id="geo-1", token="t0k3n", geo="eu",
        database="geo_stats", spool_dir=str(tmp_path / "spool"), retry_budget_seconds=2)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    cfg = config.load(path)
    assert (cfg.agent_id, cfg.geo, cfg.token, cfg.database.database, cfg.retry.budget_seconds) == (
        "geo-1", "eu", "t0k3n", "geo_stats", 2)
    assert cfg.datasets == generator.sample_datasets()
    assert list(cfg.datasets) == list(CATALOG)


def test_the_sample_config_is_valid_apart_from_its_placeholders(tmp_path):
    path = tmp_path / "agent.cfg"
    with open(generator.sample_config_path()) as f:
        path.write_text(f.read())
    os.chmod(path, 0o600)
    cfg = config.load(str(path))
    assert cfg.agent_id == "geo-example-1" and set(cfg.datasets) == set(CATALOG)
