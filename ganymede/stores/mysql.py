"""MySQL: connections, one-query reads and the versioned migrations of the `ganymede` schema.

The password is never in luigi.cfg: it comes from a my.cnf-style option file
named there (pymysql's read_default_file). Sessions run in UTC.
"""
from contextlib import contextmanager

import pymysql

from .. import datasets
from ..errors import SchemaError, StoreUnavailable


def connect(cfg, database=None, autocommit=False):
    """A new connection for a ganymede.config.mysql (or alike; tls, tls_ca optional); database=None: cfg's, '': none."""
    name = cfg.database if database is None else database
    # Without TLS asked for, pymysql would still build a TLS context per connection (~40 ms each).
    tls = ({"ssl_ca": getattr(cfg, "tls_ca", "") or None, "ssl_verify_cert": True, "ssl_verify_identity": True}
           if getattr(cfg, "tls", False) else {"ssl_disabled": True})
    try:
        return pymysql.connect(
            host=cfg.host, port=cfg.port, user=cfg.user, database=name or None,
            read_default_file=cfg.option_file or None, charset="utf8mb4",
            local_infile=True, autocommit=autocommit, connect_timeout=cfg.connect_timeout,
            init_command="SET time_zone = '+00:00'", **tls,
        )
    except pymysql.err.OperationalError as exc:
        raise StoreUnavailable(f"MySQL at {cfg.host}:{cfg.port} (database {name!r}) unreachable: {exc.args[-1]}") from None


def select(conn, sql, args=(), dicts=False, commit=False):
    """All rows of one query (tuples, or dicts); with `commit`, the read's snapshot ends with it."""
    with conn.cursor(pymysql.cursors.DictCursor if dicts else None) as cur:
        cur.execute(sql, args)
        rows = cur.fetchall()
    if commit:
        conn.commit()
    return rows


@contextmanager
def committing(conn):
    """A cursor whose work is committed when the block ends without an exception."""
    with conn.cursor() as cur:
        yield cur
    conn.commit()


def marks(values):
    """The `%s, %s, …` of an IN list of `values`."""
    return ", ".join(["%s"] * len(values))


def _staging_table(dataset):
    """A staging table as the catalog draws it now: each column exactly as wide as its parser allows."""
    cols = ",\n  ".join(f"`{c.name}` {c.sql_type} NOT NULL" for c in dataset.columns)
    return (f"CREATE TABLE IF NOT EXISTS `{dataset.staging_table}` (\n"
            f"  `row_id` BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,\n"
            f"  `transaction_id` CHAR(36) NOT NULL,\n  `record` BIGINT NOT NULL,\n  {cols},\n"
            f"  KEY `by_transaction` (`transaction_id`, `row_id`)\n) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4")


MIGRATIONS = [
    (1, "agents, transactions, transaction events, staging", [
        """CREATE TABLE IF NOT EXISTS agents (
          agent_id VARCHAR(64) NOT NULL PRIMARY KEY,
          geo VARCHAR(64) NOT NULL,
          token_hash CHAR(64) NOT NULL,
          active TINYINT(1) NOT NULL DEFAULT 1,
          created_at DATETIME(6) NOT NULL,
          revoked_at DATETIME(6) NULL
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
        """CREATE TABLE IF NOT EXISTS transactions (
          transaction_id CHAR(36) NOT NULL PRIMARY KEY,
          agent_id VARCHAR(64) NOT NULL,
          hour DATETIME NOT NULL,
          state VARCHAR(16) NOT NULL,
          supersedes CHAR(36) NULL,
          archive_path VARCHAR(512) NULL,
          size BIGINT NULL,
          sha256 CHAR(64) NULL,
          error TEXT NULL,
          created_at DATETIME(6) NOT NULL,
          updated_at DATETIME(6) NOT NULL,
          completed_at DATETIME(6) NULL,
          KEY by_hour (hour, state),
          KEY by_agent_hour (agent_id, hour),
          CONSTRAINT fk_tx_agent FOREIGN KEY (agent_id) REFERENCES agents (agent_id)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
        """CREATE TABLE IF NOT EXISTS transaction_events (
          event_id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
          transaction_id CHAR(36) NOT NULL,
          at DATETIME(6) NOT NULL,
          event VARCHAR(32) NOT NULL,
          detail TEXT NULL,
          KEY by_transaction (transaction_id, event_id)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
    ]),  # and the staging tables, made by 5 as the catalog draws them now
    (2, "admin tokens", [
        """CREATE TABLE IF NOT EXISTS admin_tokens (
          name VARCHAR(64) NOT NULL PRIMARY KEY,
          token_hash CHAR(64) NOT NULL,
          created_at DATETIME(6) NOT NULL,
          revoked_at DATETIME(6) NULL
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
    ]),
    (3, "agents.expected_from: the first hour an agent is expected for", [
        "ALTER TABLE agents ADD COLUMN IF NOT EXISTS expected_from DATETIME NULL AFTER created_at",
    ]),
    # 4 kept a copy of MongoDB's previous-hour values in MySQL; 5 drops it (MongoDB's _id index serves them)
    (4, "previous_values (dropped by 5)", []),
    # Staging holds no state of its own (a load restages what it misses), so its tables are rebuilt from the catalog.
    (5, "drop previous_values; staging columns as wide as the catalog's parsers, with the CSV record number",
     ["DROP TABLE IF EXISTS previous_values"]
     + [f"DROP TABLE IF EXISTS `{d.staging_table}`" for d in datasets.CATALOG.values()]
     + [_staging_table(d) for d in datasets.CATALOG.values()]),
    (6, "quality_results: the data-quality checks of each hour, agent and dataset", [
        """CREATE TABLE IF NOT EXISTS quality_results (
          hour DATETIME NOT NULL,
          agent_id VARCHAR(64) NOT NULL,
          dataset VARCHAR(64) NOT NULL,
          check_name VARCHAR(32) NOT NULL,
          round INT NOT NULL,
          passed TINYINT(1) NOT NULL,
          blocking TINYINT(1) NOT NULL,
          observed DOUBLE NOT NULL,
          expected VARCHAR(255) NOT NULL,
          detail VARCHAR(1024) NOT NULL,
          checked_at DATETIME(6) NOT NULL,
          PRIMARY KEY (hour, agent_id, dataset, check_name),
          KEY by_agent (agent_id, dataset, check_name, hour),
          KEY by_failure (passed, hour)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
    ]),
]

LATEST = MIGRATIONS[-1][0]


def upgrade(cfg):
    """Create the schema, apply the migrations not yet recorded; returns the versions applied. Statements are
    idempotent (DDL commits implicitly: a rerun resumes a crashed one); a named lock keeps upgrades apart."""
    with connect(cfg, database="", autocommit=True) as conn, conn.cursor() as cur:
        if not cfg.database or "`" in cfg.database or len(cfg.database) > 64:
            raise SchemaError(f"invalid database name {cfg.database!r}")
        cur.execute(f"CREATE DATABASE IF NOT EXISTS `{cfg.database}` CHARACTER SET utf8mb4")
    applied = []
    lock = f"ganymede-migrate-{cfg.database}"
    with connect(cfg, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT GET_LOCK(%s, 60)", (lock,))
        try:
            cur.execute("""CREATE TABLE IF NOT EXISTS schema_version (
                version INT NOT NULL PRIMARY KEY, description VARCHAR(200) NOT NULL,
                applied_at DATETIME(6) NOT NULL) ENGINE=InnoDB""")
            current = _current_version(cur)
            for version, description, statements in (m for m in MIGRATIONS if m[0] > current):
                for statement in statements:
                    cur.execute(statement)
                cur.execute("INSERT INTO schema_version VALUES (%s, %s, UTC_TIMESTAMP(6))", (version, description))
                applied.append(version)
        finally:
            cur.execute("SELECT RELEASE_LOCK(%s)", (lock,))
    return applied


def _current_version(cur):
    cur.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version")
    return cur.fetchone()[0]


def check_schema(conn):
    """Refuse to run against a schema this code does not match."""
    with conn.cursor() as cur:
        try:
            version = _current_version(cur)
        except pymysql.err.ProgrammingError:
            raise SchemaError("no ganymede schema: run `ganymede db upgrade`") from None
    if version != LATEST:
        raise SchemaError(f"schema version {version}, code expects {LATEST}: run `ganymede db upgrade`")
    return version

