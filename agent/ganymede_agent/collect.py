"""Reading an hour's datasets from the GEO database, as CSV-ready rows.

Two readers give the same values, so the same rows make byte-identical
archives whichever ran:

- `client`: the `mariadb`/`mysql` command-line client streams the query as
  tab-separated text (`--batch --quick`). When the archive module takes CSV as
  bytes (`archive.CsvChunks`), whole chunks become CSV with a few bytes
  operations and no per-row Python; otherwise lines are split into rows.
- `pymysql`: a server-side cursor (SSCursor) whose decoders are removed, so
  values arrive as the server's own text and nothing is converted per value.

Either way values are the server's text for the column: integers as digits,
DOUBLE/DECIMAL as MySQL prints them, DATETIME/TIMESTAMP as
'YYYY-MM-DDTHH:MM:SS' (session time_zone '+00:00'), NULL as an empty field.
With the client, a text value that is exactly 'NULL' cannot be told from NULL
and is sent empty too.
"""
import csv
import io
import os
import re
import shutil
import subprocess
import tempfile
from datetime import datetime, timedelta

import pymysql
import pymysql.converters
import pymysql.cursors
from pymysql.constants import FIELD_TYPE

from . import archive

HOUR_FORMAT = "%Y-%m-%dT%H"
_DATETIME_TYPES = (FIELD_TYPE.DATETIME, FIELD_TYPE.TIMESTAMP)
_BINARY_CHARSET = 63
_CHUNK = 1 << 20
_FETCH = 5000
_UNESCAPE = re.compile(rb"\\(.)", re.S)
_UNESCAPED = {b"0": b"\0", b"t": b"\t", b"n": b"\n", b"\\": b"\\"}
# Encoders only: query parameters are still escaped, but result values are left as the server's text.
_RAW_CONVERSIONS = dict(pymysql.converters.encoders)


class CollectError(Exception):
    """The GEO database (or its client) could not give an hour's datasets; the hour is retried next run."""


def parse_hour(text):
    """'2026-11-30T05' -> naive UTC datetime on the hour."""
    try:
        return datetime.strptime(text.strip().rstrip("Z"), HOUR_FORMAT)
    except ValueError:
        raise ValueError(f"not a UTC hour (expected YYYY-MM-DDTHH): {text!r}") from None


def format_hour(value):
    return value.strftime(HOUR_FORMAT)


def find_client(path=""):
    """The command-line client to stream with, or None."""
    if path:
        return path if os.access(path, os.X_OK) else None
    return shutil.which("mariadb") or shutil.which("mysql")


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class Source:
    """The GEO database for one agent run: `datasets(hour)` yields (name, header, rows) for build_archive."""

    def __init__(self, db, sql_by_dataset, reader="auto"):
        self.db, self.sql_by_dataset = db, sql_by_dataset
        self.client = find_client(db.client_path) if reader in ("auto", "client") else None
        if reader == "client" and not self.client:
            raise CollectError(f"reader=client but no mariadb/mysql client found ({db.client_path or 'PATH'})")
        self.reader = "client" if self.client else "pymysql"

    def connect(self):
        db = self.db
        try:
            return pymysql.connect(
                host=db.host, port=db.port, user=db.user, password=db.password, database=db.database,
                unix_socket=db.unix_socket or None, connect_timeout=db.connect_timeout, charset="utf8mb4",
                conv=_RAW_CONVERSIONS, autocommit=True, init_command="SET time_zone = '+00:00'",
                # TLS on loopback protects nothing and costs a context per run; elsewhere pymysql's default
                ssl_disabled=True if db.unix_socket or db.host in _LOOPBACK else None)
        except pymysql.MySQLError as exc:
            raise CollectError(f"GEO database {db.database!r} at {db.unix_socket or f'{db.host}:{db.port}'}: "
                               f"{_mysql_reason(exc)}") from None

    def datasets(self, hour):
        """The hour's datasets, each streamed when build_archive reaches it."""
        start = parse_hour(hour) if isinstance(hour, str) else hour
        params = {"start": start, "end": start + timedelta(hours=1)}
        conn, opened = self.connect(), []
        try:
            for name, sql in self.sql_by_dataset.items():
                try:
                    if self.reader == "client":
                        header, streams = self._client_dataset(conn, name, sql, params)
                    else:
                        header, streams = self._pymysql_dataset(conn, sql, params)
                except pymysql.MySQLError as exc:
                    raise CollectError(f"dataset {name!r}: {_mysql_reason(exc)}") from None
                opened += streams
                yield name, header, streams[-1]
        finally:  # a build that stopped half-way must not leave a query (and its table locks) open
            for stream in reversed(opened):
                if hasattr(stream, "close"):
                    stream.close()
            conn.close()

    # --- pymysql --------------------------------------------------------------------
    def _pymysql_dataset(self, conn, sql, params):
        cur = conn.cursor(pymysql.cursors.SSCursor)
        cur.execute(sql, params)
        header, datetimes, binaries = _columns(cur)
        return header, [_pymysql_rows(cur, _fixer(datetimes, binaries))]

    # --- command-line client ----------------------------------------------------------
    def _client_dataset(self, conn, name, sql, params):
        with conn.cursor() as cur:
            cur.execute(f"SELECT * FROM ({sql}) AS ganymede_columns LIMIT 0", params)
            header, datetimes, _ = _columns(cur)
            query = cur.mogrify(sql, params)
        output, ncols = self._client_output(name, query), len(header)
        csv_chunks = getattr(archive, "CsvChunks", None)
        if csv_chunks:  # an archive module that takes CSV as bytes: no per-row Python at all
            return header, [output, csv_chunks(tsv_to_csv(data, ncols, datetimes) for data in output)]
        return header, [output, client_rows(output, ncols, datetimes)]

    def _client_output(self, name, query):
        """The client's --batch output of the query, in chunks of whole lines."""
        with tempfile.TemporaryDirectory(prefix="ganymede-agent-") as tmp:
            defaults = os.path.join(tmp, "client.cnf")
            fd = os.open(defaults, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(_defaults_file(self.db))
            with open(os.path.join(tmp, "stderr"), "w+b") as err:
                proc = subprocess.Popen(
                    [self.client, f"--defaults-file={defaults}", "--batch", "--quick", "--skip-column-names",
                     "--default-character-set=utf8mb4", "--no-auto-rehash",
                     "-e", f"SET time_zone = '+00:00'; {query}"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, bufsize=_CHUNK)
                try:
                    rest = b""
                    while True:
                        data = proc.stdout.read(_CHUNK)
                        if not data:
                            break
                        data = rest + data
                        cut = data.rfind(b"\n") + 1
                        data, rest = data[:cut], data[cut:]
                        if data:
                            yield data
                    if proc.wait() != 0 or rest:
                        err.seek(0)
                        message = " ".join(err.read()[-500:].decode("utf-8", "replace").split())
                        raise CollectError(f"dataset {name!r}: {os.path.basename(self.client)} exited "
                                           f"{proc.returncode}: {message or 'truncated output'}")
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
                    proc.stdout.close()


_TABS_TO_COMMAS = bytes.maketrans(b"\t", b",")
_TO_CSV = bytes.maketrans(b"\t ", b",T")  # and the space of each datetime ("YYYY-MM-DD HH:MM:SS") becomes a T


def tsv_to_csv(data, ncols, datetimes=()):
    """Whole lines of the client's --batch output -> (the same rows as CSV bytes, row count).

    The common case (no quoting, escaping or NULL needed; the only spaces are
    the ones inside the datetime columns) is one bytes.translate call;
    anything else is rendered line by line by the csv module, exactly as
    archive.write_csv would.
    """
    rows = _check_columns(data, ncols)
    if (ncols > 1 and b"," not in data and b'"' not in data and b"\\" not in data and b"\r" not in data
            and (b"N" not in data or b"NULL" not in data)  # one byte is found far faster than four
            and (not datetimes or data.count(b" ") == rows * len(datetimes))
            and _utf8(data)):
        return data.translate(_TO_CSV if datetimes else _TABS_TO_COMMAS), rows
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for line in data[:-1].split(b"\n"):
        writer.writerow(_client_values(line.split(b"\t"), datetimes))
    return out.getvalue().encode("utf-8"), rows


def client_rows(chunks, ncols, datetimes=()):
    """Rows (lists of str) from chunks of the client's --batch output, for build_archive."""
    for data in chunks:
        _check_columns(data, ncols)
        if b"\\" not in data and b"NULL" not in data and _utf8(data):
            for line in data[:-1].decode("utf-8").split("\n"):
                values = line.split("\t")
                for i in datetimes:
                    if len(values[i]) > 10:
                        values[i] = values[i][:10] + "T" + values[i][11:]
                yield values
        else:
            for line in data[:-1].split(b"\n"):
                yield _client_values(line.split(b"\t"), datetimes)


def _check_columns(data, ncols):
    rows = data.count(b"\n")
    if data.count(b"\t") != rows * (ncols - 1):
        raise CollectError(f"unexpected client output: expected {ncols} tab-separated columns per line")
    return rows


def _client_values(fields, datetimes):
    values = []
    for i, field in enumerate(fields):
        if field == b"NULL":
            values.append("")
            continue
        if b"\\" in field:
            field = _UNESCAPE.sub(lambda m: _UNESCAPED.get(m.group(1), m.group(1)), field)
        value = field.decode("utf-8", "replace")
        if i in datetimes and len(value) > 10 and value[10] == " ":
            value = value[:10] + "T" + value[11:]
        values.append(value)
    return values


def _utf8(data):
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _defaults_file(db):
    lines = ["[client]", f"user={_option(db.user)}", f"password={_option(db.password)}",
             f"database={_option(db.database)}", f"connect-timeout={int(max(1, db.connect_timeout))}"]
    if db.unix_socket:
        lines.append(f"socket={_option(db.unix_socket)}")
    else:
        lines += [f"host={_option(db.host)}", f"port={int(db.port)}", "protocol=TCP"]
    return "\n".join(lines) + "\n"


def _option(value):
    """A value quoted for a MySQL option file."""
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- shared -----------------------------------------------------------------------------

def _columns(cur):
    """(names, datetime column indexes, binary column indexes) of the current result."""
    names = [d[0] for d in cur.description]
    fields = getattr(cur._result, "fields", None) or []
    datetimes = tuple(i for i, d in enumerate(cur.description) if d[1] in _DATETIME_TYPES)
    binaries = tuple(i for i, f in enumerate(fields) if getattr(f, "charsetnr", None) == _BINARY_CHARSET
                     and f.type_code not in _NUMERIC_OR_TIME)
    return names, datetimes, binaries


_NUMERIC_OR_TIME = frozenset({
    FIELD_TYPE.DECIMAL, FIELD_TYPE.NEWDECIMAL, FIELD_TYPE.TINY, FIELD_TYPE.SHORT, FIELD_TYPE.LONG,
    FIELD_TYPE.FLOAT, FIELD_TYPE.DOUBLE, FIELD_TYPE.NULL, FIELD_TYPE.LONGLONG, FIELD_TYPE.INT24,
    FIELD_TYPE.DATE, FIELD_TYPE.TIME, FIELD_TYPE.DATETIME, FIELD_TYPE.TIMESTAMP, FIELD_TYPE.YEAR,
    FIELD_TYPE.NEWDATE})


def _fixer(datetimes, binaries):
    """A per-row fix for the few columns whose server text is not what the CSV wants; None if none are."""
    if not datetimes and not binaries:
        return None

    def fix(row):
        row = list(row)
        for i in binaries:
            if isinstance(row[i], bytes):
                row[i] = row[i].decode("utf-8", "replace")
        for i in datetimes:
            value = row[i]
            if value is not None and len(value) > 10:
                row[i] = value[:10] + "T" + value[11:]
        return row
    return fix


def _pymysql_rows(cur, fix):
    try:
        while True:
            batch = cur.fetchmany(_FETCH)
            if not batch:
                return
            if fix:
                yield from map(fix, batch)
            else:
                yield from batch
    finally:
        cur.close()


def _mysql_reason(exc):
    args = getattr(exc, "args", ())
    return " ".join(str(args[-1] if args else exc).split()) or type(exc).__name__
