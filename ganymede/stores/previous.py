"""Previous-hour values: what a loaded hour hands to the next one's derived fields, kept in MySQL.

Growth of bytes stored compares a document with the same key's document one
hour earlier. Asking MongoDB for those (an `_id $in` per batch) costs the
load more than writing its documents; the staged rows already stream out of
MySQL, so joining them there with the previous hour's values costs almost
nothing. Each load therefore writes, beside its documents, the
`previous_fields` of every document (JSON) to `previous_values`.

The table is a cache of MongoDB, not a source: only the last KEEP_HOURS
hours per agent stay, the hourly dump leaves its rows out, and a load whose
previous hour is not in it (an old backfill, a restored database) asks
MongoDB as before. Its rows are written after the documents they copy and
retired with them, so a hour it holds says what MongoDB says.
"""
import json
from datetime import timedelta

from .. import hours

TABLE = "previous_values"
KEEP_HOURS = 3  # the hour before the one loading, with room for a late or catch-up load
_encode = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps with options builds an encoder per call

CREATE = f"""CREATE TABLE IF NOT EXISTS `{TABLE}` (
  agent_id VARCHAR(64) NOT NULL,
  hour DATETIME NOT NULL,
  dataset VARCHAR(64) NOT NULL,
  doc_key VARBINARY(1024) NOT NULL,
  transaction_id CHAR(36) NOT NULL,
  fields VARCHAR(4096) NOT NULL,
  PRIMARY KEY (agent_id, hour, dataset, doc_key)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"""


def key_sql(dataset, alias):
    """SQL giving a staged row's key part of its document `_id` (exact bytes), for a key of text columns."""
    return "CONCAT_WS('|', " + ", ".join(f"CAST({alias}.`{c}` AS BINARY)" for c in dataset.key) + ")"


def join_sql(dataset, row_alias, alias):
    """A LEFT JOIN giving each staged row its key's values of one agent's hour; parameters (agent_id, hour)."""
    return (f"LEFT JOIN `{TABLE}` {alias} ON {alias}.agent_id = %s AND {alias}.hour = %s "
            f"AND {alias}.dataset = '{dataset.name}' AND {alias}.doc_key = {key_sql(dataset, row_alias)}")


def decode(text):
    """The joined field -> the previous-hour fields as a dict, or None when the key had no document then."""
    return json.loads(text) if text else None


def has_hour(conn, dataset, agent_id, hour):
    """Whether the cache holds anything of this agent's hour for the dataset (else MongoDB is asked)."""
    with conn.cursor() as cur:
        cur.execute(f"SELECT 1 FROM `{TABLE}` WHERE agent_id = %s AND hour = %s AND dataset = %s LIMIT 1",
                    (agent_id, hour, dataset.name))
        return cur.fetchone() is not None


def store(conn, dataset, agent_id, hour, transaction_id, docs):
    """Keep the previous fields of written documents for the next hour's load; one statement, one commit.

    The statement is built here rather than by executemany: its per-value
    escaping cost the load more than MySQL's work; the constant columns are
    escaped once.
    """
    if not docs:
        return
    prefix, fields, escape = len(f"{agent_id}|{hours.compact(hour)}|"), dataset.previous_fields, conn.escape
    fixed = ", ".join(conn.escape(v) for v in (agent_id, hour, dataset.name, transaction_id))
    values = ",".join(f"({fixed}, {escape(doc['_id'][prefix:])}, "
                      f"{escape(_encode({f: doc[f] for f in fields}))})" for doc in docs)
    with conn.cursor() as cur:
        cur.execute(f"INSERT INTO `{TABLE}` (agent_id, hour, dataset, transaction_id, doc_key, fields) "
                    f"VALUES {values} ON DUPLICATE KEY UPDATE "
                    "transaction_id = VALUES(transaction_id), fields = VALUES(fields)")
    conn.commit()


def retire(conn, agent_id, hour, transaction_id):
    """After a replacement loads: the values of the transactions it superseded go with their documents."""
    with conn.cursor() as cur:
        cur.execute(f"DELETE FROM `{TABLE}` WHERE agent_id = %s AND hour = %s AND transaction_id <> %s",
                    (agent_id, hour, transaction_id))
        retired = cur.rowcount
    conn.commit()
    return retired


def prune(conn, agent_id, hour):
    """Drop the agent's hours older than KEEP_HOURS before `hour` (a later hour is never touched)."""
    with conn.cursor() as cur:
        cur.execute(f"DELETE FROM `{TABLE}` WHERE agent_id = %s AND hour < %s",
                    (agent_id, hour - timedelta(hours=KEEP_HOURS)))
    conn.commit()
