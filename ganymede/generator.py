"""Realistic GEO statistics in a GEO database, for tests, the demo and benchmarks.

Its tables are read by the SQL in `ganymede_agent/agent.cfg.sample`. Values come from a PRNG seeded by
(seed, hour), so the same call gives the same rows, and satisfy `datasets.CATALOG`'s row rules.
"""
import configparser
import itertools
import os
import random
import tempfile
from datetime import timedelta

import pymysql

import ganymede_agent

from . import hours

_U64 = "BIGINT UNSIGNED"
# {table: ({column: type}, primary key)}: every column NOT NULL, the key time first
TABLES = {
    "account_usage_hourly": ({"hour_start": "DATETIME", "account_id": "VARCHAR(64)", "bytes_stored": _U64,
                              "object_count": _U64, "bytes_in": _U64, "bytes_out": _U64,
                              "request_count": _U64}, ("hour_start", "account_id")),
    "api_request_stats": ({"hour_start": "DATETIME", "http_method": "VARCHAR(16)", "endpoint": "VARCHAR(128)",
                           "status_code": "SMALLINT UNSIGNED", "request_count": _U64, "bytes_total": _U64,
                           "latency_p50_ms": "DOUBLE", "latency_p95_ms": "DOUBLE"},
                          ("hour_start", "http_method", "endpoint", "status_code")),
    "node_samples": ({"sampled_at": "DATETIME", "node_name": "VARCHAR(64)", "disk_total_bytes": _U64,
                      "disk_used_bytes": _U64, "load_1m": "DOUBLE", "error_count": "INT UNSIGNED"},
                     ("sampled_at", "node_name")),
}

METHODS = ("GET", "PUT", "POST", "DELETE", "HEAD")
BASE_ENDPOINTS = ("/v1/objects", "/v1/buckets", "/v1/objects/multipart", "/v1/objects/copy", "/v1/acl",
                  "/v1/lifecycle", "/v1/versions", "/v1/tags", "/v1/cors", "/v1/policy", "/v1/stats", "/v1/auth")
STATUSES = (200, 201, 204, 206, 304, 400, 403, 404, 409, 429, 500, 502, 503)
SAMPLES_PER_NODE = 60  # one a minute
TB = 1 << 40


def connect(database=None, *, host="127.0.0.1", port=3306, user="root", password="", **kwargs):
    """A pymysql connection suited to the generator (UTC session, LOAD DATA LOCAL allowed)."""
    return pymysql.connect(host=host, port=port, user=user, password=password, database=database or None,
                           charset="utf8mb4", local_infile=True, autocommit=True,
                           init_command="SET time_zone = '+00:00'", **kwargs)


def create_database(name, **connect_args):
    """Create the GEO database `name` with its tables (idempotent); returns a connection to it."""
    with connect(**connect_args) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE IF NOT EXISTS `{_ident(name)}` DEFAULT CHARACTER SET utf8mb4")
    conn = connect(name, **connect_args)
    with conn.cursor() as cur:
        for table, (columns, key) in TABLES.items():
            body = "".join(f"{column} {kind} NOT NULL, " for column, kind in columns.items())
            cur.execute(f"CREATE TABLE IF NOT EXISTS {table} ({body}PRIMARY KEY ({', '.join(key)}))"
                        " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4")
    return conn


def drop_database(name, **connect_args):
    with connect(**connect_args) as conn, conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{_ident(name)}`")


def _ident(name):
    if not name.replace("_", "").isalnum():
        raise ValueError(f"not a plain database name: {name!r}")
    return name


def generate_hour(conn, hour, *, accounts=200, endpoints=len(BASE_ENDPOINTS), nodes=8, seed=0, rows=None):
    """Fill one UTC hour of stats; returns {table: rows inserted}.

    `rows=R` overrides the shape and writes R rows in all: 60% accounts, 20%
    API rows (over as many endpoints as needed), 20% node minute samples (over
    as many nodes). Existing rows of that hour are replaced, so a rerun gives the same table.
    """
    start, end = hours.window(hours.parse_hour(hour) if isinstance(hour, str) else hour)
    rng = random.Random(f"{seed}:{hours.format_hour(start)}")
    if rows is not None:
        accounts, n_api = rows * 6 // 10, rows // 5
        n_nodes = rows - accounts - n_api
    else:
        n_api = len(METHODS) * endpoints * len(STATUSES)
        n_nodes = nodes * SAMPLES_PER_NODE
    stamp = start.strftime("%Y-%m-%d %H:%M:%S")
    rows = {"account_usage_hourly": _accounts(rng, stamp, accounts),  # generators: each draws from rng as loaded
            "api_request_stats": itertools.islice(_api(rng, stamp), n_api),
            "node_samples": itertools.islice(_nodes(rng, start, n_nodes), n_nodes)}
    with conn.cursor() as cur:
        for table, (_, key) in TABLES.items():  # key[0]: the row's time
            cur.execute(f"DELETE FROM {table} WHERE {key[0]} >= %s AND {key[0]} < %s", (start, end))
        counts = {table: _load(cur, table, table_rows) for table, table_rows in rows.items()}
    conn.commit()
    return counts


def _accounts(rng, stamp, n):
    lognorm, randint = rng.lognormvariate, rng.randint
    for i in range(n):
        objects = int(lognorm(7, 2))
        stored = objects * int(lognorm(12, 1.5))
        yield (stamp, f"acct-{i:07d}", stored, objects, int(lognorm(16, 3)), int(lognorm(17, 3)), randint(0, 50000))


def _api(rng, stamp):
    for i in itertools.count():
        rounds, base = divmod(i, len(BASE_ENDPOINTS))
        endpoint = BASE_ENDPOINTS[base] + (f"/{rounds}" if rounds else "")
        for method in METHODS:
            for status in STATUSES:
                count = int(rng.lognormvariate(8 if status < 400 else 4, 1.5)) + 1
                p50 = round(rng.lognormvariate(3, 0.6), 3)
                p95 = round(p50 * (1 + rng.lognormvariate(0.5, 0.5)), 3)
                if status >= 500:
                    p95 = round(p95 * 3, 3)
                yield (stamp, method, endpoint, status, count, count * int(rng.lognormvariate(10, 2)), p50, p95)


def _nodes(rng, start, n):
    node_count = max(1, -(-n // SAMPLES_PER_NODE))
    totals = [rng.choice((48, 96, 192, 384)) * TB for _ in range(node_count)]
    fill = [rng.uniform(0.2, 0.95) for _ in range(node_count)]
    for minute in range(SAMPLES_PER_NODE):
        at = (start + timedelta(minutes=minute, seconds=rng.randrange(60))).strftime("%Y-%m-%d %H:%M:%S")
        for node in range(node_count):
            used = int(totals[node] * min(1.0, fill[node] + minute * 0.0001))
            errors = rng.choice((0, 0, 0, 0, 1, 2)) if rng.random() < 0.1 else 0
            yield (at, f"node-{node:04d}", totals[node], used, round(rng.uniform(0.05, 24.0), 2), errors)


def _load(cur, table, rows):
    """Bulk insert via a temporary tab-separated file; returns the row count."""
    count = 0
    with tempfile.NamedTemporaryFile("w", suffix=".tsv", encoding="utf-8") as f:
        for count, row in enumerate(rows, 1):
            f.write("\t".join(map(str, row)) + "\n")
        f.flush()
        if count:
            cur.execute(f"LOAD DATA LOCAL INFILE %s INTO TABLE `{table}` CHARACTER SET utf8mb4 "
                        "FIELDS TERMINATED BY '\\t' LINES TERMINATED BY '\\n'", (f.name,))
    return count


def sample_config_path():
    return os.path.join(os.path.dirname(ganymede_agent.__file__), "agent.cfg.sample")


def sample_datasets():
    """{dataset: SQL} from the agent's commented sample config, the one place the SQL is written."""
    parser = configparser.ConfigParser(interpolation=None)
    with open(sample_config_path(), encoding="utf-8") as f:
        parser.read_file(f)
    return dict(parser["datasets"])


def write_agent_config(path, *, api_url, agent_id, token, geo, database, spool_dir, db_host="127.0.0.1",
                       db_port=3306, db_user="root", db_password="", spool_max_mb=1024,
                       retry_budget_seconds=300, retry_base_seconds=1.0, retry_cap_seconds=60,
                       request_timeout_seconds=60, datasets=None):
    """Write an agent config (mode 0600) for the demo and tests; the SQL comes from the sample."""
    parser = configparser.ConfigParser(interpolation=None)  # it writes each value with str()
    parser["agent"] = {"agent_id": agent_id, "geo": geo}
    parser["api"] = {"url": api_url, "token": token, "timeout_seconds": request_timeout_seconds}
    parser["database"] = {"host": db_host, "port": db_port, "user": db_user, "password": db_password,
                          "database": database}
    parser["spool"] = {"dir": spool_dir, "max_mb": spool_max_mb}
    parser["retry"] = {"budget_seconds": retry_budget_seconds, "base_seconds": retry_base_seconds,
                       "cap_seconds": retry_cap_seconds}
    parser["datasets"] = datasets if datasets is not None else sample_datasets()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        parser.write(f)
    return path
