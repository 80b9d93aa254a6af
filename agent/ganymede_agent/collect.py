"""Reading an hour's datasets from the GEO database, every value exactly as stored (docs/agent.md).

pymysql's server-side cursor, fetched in batches, so an hour is never all in
memory. The connection keeps pymysql's encoders but no decoders (its `conv`
argument): each value is the server's own text, never parsed and printed
again; only DATETIME/TIMESTAMP become ISO text, in UTC. A binary value that is
not UTF-8 stops the hour (CollectError naming dataset and column) rather than
being encoded into a value the database never held.
"""
from datetime import datetime, timedelta
from operator import itemgetter

import pymysql
import pymysql.converters
import pymysql.cursors
from pymysql.constants import FIELD_TYPE

HOUR_FORMAT = "%Y-%m-%dT%H"
_FETCH = 5000
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
# The column types pymysql hands out as bytes when the column's character set is binary.
_STRING_TYPES = frozenset({
    FIELD_TYPE.STRING, FIELD_TYPE.VAR_STRING, FIELD_TYPE.VARCHAR, FIELD_TYPE.BLOB, FIELD_TYPE.TINY_BLOB,
    FIELD_TYPE.MEDIUM_BLOB, FIELD_TYPE.LONG_BLOB, FIELD_TYPE.BIT, FIELD_TYPE.GEOMETRY})


def _iso(text):
    """'YYYY-MM-DD HH:MM:SS[.ffffff]' as the server prints it -> the same with a 'T'."""
    return (text.decode("ascii") if isinstance(text, bytes) else text).replace(" ", "T", 1)


# Encoders for query parameters; as decoders only the datetime one: every other value stays the server's text.
_CONVERSIONS = {**pymysql.converters.encoders, FIELD_TYPE.DATETIME: _iso, FIELD_TYPE.TIMESTAMP: _iso}


class CollectError(Exception):
    """The GEO database could not give an hour's datasets; the hour is retried next run."""


def parse_hour(text):
    """'2026-11-30T05' -> naive UTC datetime on the hour."""
    try:
        return datetime.strptime(text.strip().rstrip("Z"), HOUR_FORMAT)
    except ValueError:
        raise ValueError(f"not a UTC hour (expected YYYY-MM-DDTHH): {text!r}") from None


def format_hour(value):
    return value.strftime(HOUR_FORMAT)


class Source:
    """The GEO database for one agent run: `datasets(hour)` yields (name, header, rows) for build_archive."""

    def __init__(self, db, sql_by_dataset):
        self.db, self.sql_by_dataset = db, sql_by_dataset

    def datasets(self, hour):
        """The hour's datasets, each streamed when build_archive reaches it."""
        db, start = self.db, parse_hour(hour) if isinstance(hour, str) else hour
        try:
            conn = pymysql.connect(
                host=db.host, port=db.port, user=db.user, password=db.password, database=db.database,
                unix_socket=db.unix_socket or None, connect_timeout=db.connect_timeout, charset="utf8mb4",
                conv=_CONVERSIONS, autocommit=True, init_command="SET time_zone = '+00:00'",
                # TLS on loopback protects nothing and costs a context per run; elsewhere pymysql's default
                ssl_disabled=True if db.unix_socket or db.host in _LOOPBACK else None)
        except pymysql.MySQLError as exc:
            raise CollectError(f"GEO database {db.database!r} at {db.unix_socket or f'{db.host}:{db.port}'}: "
                               f"{_mysql_reason(exc)}") from None
        try:
            for name, sql in self.sql_by_dataset.items():
                cur = conn.cursor(pymysql.cursors.SSCursor)
                try:
                    cur.execute(sql, {"start": start, "end": start + timedelta(hours=1)})
                except pymysql.MySQLError as exc:
                    raise CollectError(f"dataset {name!r}: {_mysql_reason(exc)}") from None
                if cur.description is None:
                    raise CollectError(f"dataset {name!r}: the query returns no rows (not a SELECT?)")
                yield name, [d[0] for d in cur.description], _rows(name, cur)
        finally:  # a build that stopped half-way must not leave a query (and its locks) open
            conn.close()


def _rows(dataset, cur):
    """The result's rows, a batch at a time; binary values become their UTF-8 text or stop the hour."""
    columns = [(i, d[0]) for i, d in enumerate(cur.description) if d[1] in _STRING_TYPES]
    try:
        while batch := cur.fetchmany(_FETCH):
            for i, column in columns:
                if bytes in set(map(type, map(itemgetter(i), batch))):
                    batch = [row[:i] + (_text(row[i], dataset, column),) + row[i + 1:] for row in batch]
            yield from batch
    except pymysql.MySQLError as exc:
        raise CollectError(f"dataset {dataset!r}: {_mysql_reason(exc)}") from None
    cur.close()


def _text(value, dataset, column):
    if not isinstance(value, bytes):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise CollectError(f"dataset {dataset!r}, column {column!r}: a binary value that is not UTF-8 text; "
                           f"convert it in the dataset's SQL (e.g. HEX({column}))") from None


def _mysql_reason(exc):
    return " ".join(str(exc.args[-1] if exc.args else exc).split()) or type(exc).__name__
