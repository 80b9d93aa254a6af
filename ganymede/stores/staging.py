"""Staging tables: one per dataset, every row tagged with its transaction.

Rows go in with LOAD DATA LOCAL INFILE (MySQL's fastest path) from a CSV the server wrote itself, every field
quoted so MySQL reads no value differently from Python's csv module (not even NULL), and come out through a
server-side cursor. Staging holds text exactly as sent: a load that would change a value is a DataError.
"""
import csv

import pymysql.cursors

from ..errors import DataError, StoreUnavailable
from .mysql import committing, select


def clear(conn, datasets, transaction_id, chunk=50_000):
    """Remove a transaction's staged rows of `datasets`, `chunk` rows per commit (small undo logs, locks and
    replication lag); a clear cut short leaves fewer rows, which the load notices (it restages)."""
    with committing(conn) as cur:
        for dataset in datasets:
            while cur.execute(f"DELETE FROM `{dataset.staging_table}` WHERE transaction_id = %s "
                              "ORDER BY row_id LIMIT %s", (transaction_id, chunk)) == chunk:
                conn.commit()


def write_csv(out, rows):
    """Rows `[record, value, …]` (str) as the CSV load_csv reads: every field quoted, quotes doubled, '\\n' after
    each. `record` is the row's record number in the agent's CSV, kept so a reject can name it."""
    csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(rows)


def load_csv(conn, dataset, path, transaction_id):
    """LOAD DATA one write_csv CSV for a transaction in one commit; returns the rows loaded. LOAD DATA LOCAL
    makes errors (truncated values, missing or extra fields) warnings, so a warning rolls back: DataError."""
    columns = ", ".join(f"`{c}`" for c in dataset.column_names)
    sql = (f"LOAD DATA LOCAL INFILE %s INTO TABLE `{dataset.staging_table}` CHARACTER SET utf8mb4 "
           "FIELDS TERMINATED BY ',' ENCLOSED BY '\"' ESCAPED BY '' LINES TERMINATED BY '\\n' "
           f"(record, {columns}) SET transaction_id = %s")
    try:
        with committing(conn) as cur:
            loaded = cur.execute(sql, (path, transaction_id))
            cur.execute("SHOW WARNINGS LIMIT 3")
            warnings = "; ".join(message for level, _code, message in cur.fetchall() if level != "Note")
            if warnings:
                conn.rollback()
                raise DataError(f"transaction {transaction_id}: {dataset.name}.csv: MySQL would not stage it "
                                f"unchanged ({warnings})")
    except (pymysql.err.DataError, pymysql.err.IntegrityError) as exc:
        raise DataError(f"transaction {transaction_id}: {dataset.name}.csv: MySQL refused it ({exc.args[-1]})") from None
    except pymysql.err.OperationalError as exc:
        raise StoreUnavailable(f"MySQL lost while staging transaction {transaction_id}: {exc.args[-1]}") from None
    return loaded


def counts(conn, datasets, transaction_id):
    """{dataset name: rows staged} of a transaction, one query for all."""
    selects = " UNION ALL ".join(f"SELECT %s, COUNT(*) FROM `{d.staging_table}` WHERE transaction_id = %s"
                                 for d in datasets)
    return dict(select(conn, selects, [v for d in datasets for v in (d.name, transaction_id)]))


SEPARATOR = "\x1f"  # ASCII unit separator: a row holding it is never staged (Dataset.fits_staging)


def iter_batches(conn, dataset, transaction_id, batch_size):
    """Lists of staged rows `[record, value, …]` (strings, catalog order) from a server-side cursor, each row
    one SEPARATOR-joined field (pymysql decodes fields in Python: one field instead of n halves the cost).
    Rows come in staging order, by `group_by`'s exact bytes first ('GET', 'get' apart): groups come whole."""
    columns = ", ".join(f"`{c}`" for c in dataset.column_names)
    order = "".join(f"CAST(`{c}` AS BINARY), " for c in dataset.group_by) + "row_id"
    with conn.cursor(pymysql.cursors.SSCursor) as cur:
        cur.execute(f"SELECT CONCAT_WS(CHAR(31), record, {columns}) FROM `{dataset.staging_table}` "
                    f"WHERE transaction_id = %s ORDER BY {order}", (transaction_id,))
        while batch := cur.fetchmany(batch_size):
            yield [row[0].split(SEPARATOR) for row in batch]
