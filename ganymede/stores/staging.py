"""Staging tables: one per dataset, every row tagged with its transaction.

Rows go in with LOAD DATA LOCAL INFILE straight from the archive's CSV (the
fastest path MySQL has) and come out through a server-side cursor in batches.
"""
import pymysql.cursors


def clear(conn, dataset, transaction_id):
    """Remove a transaction's staged rows (a rerun starts from nothing)."""
    with conn.cursor() as cur:
        cur.execute(f"DELETE FROM `{dataset.staging_table}` WHERE transaction_id = %s", (transaction_id,))
    conn.commit()


def load_csv(conn, dataset, path, transaction_id):
    """LOAD DATA one CSV (header line skipped) for a transaction; returns the rows loaded.

    The CSV was written by Python's csv module: fields optionally enclosed in
    double quotes, quotes doubled inside, no backslash escapes.
    """
    columns = ", ".join(f"`{c}`" for c in dataset.column_names)
    sql = (f"LOAD DATA LOCAL INFILE %s INTO TABLE `{dataset.staging_table}` CHARACTER SET utf8mb4 "
           "FIELDS TERMINATED BY ',' OPTIONALLY ENCLOSED BY '\"' ESCAPED BY '' "
           "LINES TERMINATED BY '\\n' IGNORE 1 LINES "
           f"({columns}) SET transaction_id = %s")
    with conn.cursor() as cur:
        loaded = cur.execute(sql, (path, transaction_id))
    conn.commit()
    return loaded


def count(conn, dataset, transaction_id):
    with conn.cursor() as cur:
        cur.execute(f"SELECT COUNT(*) FROM `{dataset.staging_table}` WHERE transaction_id = %s", (transaction_id,))
        return cur.fetchone()[0]


def iter_batches(conn, dataset, transaction_id, batch_size):
    """Lists of raw rows (strings, in catalog column order), read with a server-side cursor."""
    columns = ", ".join(f"`{c}`" for c in dataset.column_names)
    with conn.cursor(pymysql.cursors.SSCursor) as cur:
        cur.execute(f"SELECT {columns} FROM `{dataset.staging_table}` WHERE transaction_id = %s ORDER BY row_id",
                    (transaction_id,))
        while True:
            batch = cur.fetchmany(batch_size)
            if not batch:
                return
            yield batch
