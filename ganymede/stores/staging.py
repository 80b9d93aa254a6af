"""Staging tables: one per dataset, every row tagged with its transaction.

Rows go in with LOAD DATA LOCAL INFILE straight from the archive's CSV (the
fastest path MySQL has) and come out through a server-side cursor in batches.
Staging holds text exactly as sent; a load that would change a value (a
field too long for its column, a row with extra fields, bad UTF-8) is refused
rather than staged silently altered.
"""
import pymysql.cursors
from ganymede_agent.archive import ArchiveError

from . import previous


def clear(conn, datasets, transaction_id, chunk=50_000):
    """Remove a transaction's staged rows of `datasets` (a rerun starts from nothing), `chunk` rows per commit.

    Small commits keep undo logs, lock times and replication lag small for
    big transactions; a clear cut short leaves fewer rows, which the load
    notices (it restages). A small transaction's rows go in one commit.
    """
    with conn.cursor() as cur:
        for dataset in datasets:
            while cur.execute(f"DELETE FROM `{dataset.staging_table}` WHERE transaction_id = %s "
                              "ORDER BY row_id LIMIT %s", (transaction_id, chunk)) == chunk:
                conn.commit()
    conn.commit()


def load_csv(conn, dataset, path, transaction_id):
    """LOAD DATA one CSV (header line skipped) for a transaction in one commit; returns the rows loaded.

    The CSV was written by Python's csv module: fields optionally enclosed in
    double quotes, quotes doubled inside, no backslash escapes. LOAD DATA
    LOCAL turns errors into warnings (truncated values, missing or extra
    fields), so any warning rolls the load back.
    """
    columns = ", ".join(f"`{c}`" for c in dataset.column_names)
    sql = (f"LOAD DATA LOCAL INFILE %s INTO TABLE `{dataset.staging_table}` CHARACTER SET utf8mb4 "
           "FIELDS TERMINATED BY ',' OPTIONALLY ENCLOSED BY '\"' ESCAPED BY '' "
           "LINES TERMINATED BY '\\n' IGNORE 1 LINES "
           f"({columns}) SET transaction_id = %s")
    with conn.cursor() as cur:
        loaded = cur.execute(sql, (path, transaction_id))
        cur.execute("SHOW WARNINGS LIMIT 3")
        warnings = "; ".join(message for level, _code, message in cur.fetchall() if level != "Note")
        if warnings:
            conn.rollback()
            raise ArchiveError(f"transaction {transaction_id}: MySQL would not stage it unchanged ({warnings})",
                               f"{dataset.name}.csv")
    conn.commit()
    return loaded


def extents(conn, datasets, transaction_id):
    """{dataset name: (first row_id, last row_id, rows)} of a transaction's staged rows, one query for all."""
    selects = " UNION ALL ".join(f"SELECT %s, MIN(row_id), MAX(row_id), COUNT(*) FROM `{d.staging_table}` "
                                 "WHERE transaction_id = %s" for d in datasets)
    with conn.cursor() as cur:
        cur.execute(selects, [v for d in datasets for v in (d.name, transaction_id)])
        return {name: (low, high, n) for name, low, high, n in cur.fetchall()}


def first_row_id(extent):
    """The row_id of a dataset's first staged row if its rows are numbered without gaps, else None.

    One LOAD DATA gets consecutive ids (InnoDB's default auto-increment lock
    mode), so then row_id - first + 1 is the row's record number in its CSV.
    """
    low, high, n = extent
    return low if n and high - low + 1 == n else None


SEPARATOR = "\x1f"  # ASCII unit separator: no valid value of any column contains a control character


def iter_batches(conn, dataset, transaction_id, batch_size, previous_of=None):
    """Lists of staged rows `[row_id, value, …]` (strings, in catalog column order), read with a server-side cursor.

    Each row travels as one text field joined with SEPARATOR: pymysql decodes
    fields in Python, so one field instead of n halves the cost per row. A
    row holding the separator itself comes out with too many fields.
    Rows come in staging order, except for a dataset with a `group_by`: then
    grouped (by exact bytes, so 'GET' and 'get', 'a' and 'a ' stay apart) and
    in staging order within each group, so a group's rows arrive together.
    With `previous_of` (agent_id, hour), each row ends with one more field:
    its key's previous-hour values kept for that hour (JSON, '' if none; see
    ganymede.stores.previous).
    """
    columns = ", ".join(f"s.`{c}`" for c in dataset.column_names)
    order = "".join(f"CAST(s.`{c}` AS BINARY), " for c in dataset.group_by) + "s.row_id"
    extra, join, params = "", "", (transaction_id,)
    if previous_of:
        extra, join, params = ", IFNULL(p.fields, '')", previous.join_sql(dataset, "s", "p"), (*previous_of, transaction_id)
    with conn.cursor(pymysql.cursors.SSCursor) as cur:
        cur.execute(f"SELECT CONCAT_WS(CHAR(31), s.row_id, {columns}{extra}) FROM `{dataset.staging_table}` s {join} "
                    f"WHERE s.transaction_id = %s ORDER BY {order}", params)
        split = str.split
        while True:
            batch = cur.fetchmany(batch_size)
            if not batch:
                return
            yield [split(row[0], SEPARATOR) for row in batch]
