"""The transaction log: agents, transactions and their append-only events.

Every function takes an open pymysql connection and commits what it changed together with the matching event
row, so the log never disagrees with the state. The rules (one accepted transaction per agent and hour,
replacements, idempotent retries) live here, not in the HTTP handlers.
"""
import hashlib
import hmac
import json
import secrets
import uuid
from contextlib import contextmanager, suppress

import pymysql

from .. import hours, paths
from ..errors import AgentError, Busy, Conflict, Forbidden, NotFound
from .mysql import committing, marks, select

OPEN_STATES = ("created", "uploaded")
_TX_COLUMNS = ("transaction_id, agent_id, hour, state, supersedes, archive_path, size, sha256, error, "
               "created_at, updated_at, completed_at")


def hash_token(token):
    """Tokens are 256-bit random strings, so one SHA-256 is enough to make a stored hash useless to a thief."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def add_agent(conn, agent_id, geo, expected_from=None):
    """Register an agent; returns its token (shown once, stored hashed). Expected from `expected_from`'s hour
    (default: now), so a backfilling agent holds past hours' extracts until sent or past their deadline."""
    for value, what in ((agent_id, "agent id"), (geo, "geo")):
        try:
            paths.check_id(value, what)  # both become paths, document fields and extract lines
        except ValueError as exc:
            raise AgentError(f"{exc}: use letters, digits, '.', '_' or '-' (at most 64)") from None
    token = secrets.token_urlsafe(32)
    with committing(conn) as cur:
        try:
            cur.execute("INSERT INTO agents (agent_id, geo, token_hash, active, created_at, expected_from) "
                        "VALUES (%s, %s, %s, 1, UTC_TIMESTAMP(6), %s)",
                        (agent_id, geo, hash_token(token), expected_from and hours.floor_hour(expected_from)))
        except pymysql.err.IntegrityError:
            conn.rollback()
            raise AgentError(f"agent {agent_id!r} already exists") from None
    return token


def list_agents(conn):
    return select(conn, "SELECT agent_id, geo, active, created_at, expected_from, revoked_at FROM agents "
                  "ORDER BY agent_id", dicts=True)


def revoke_agent(conn, agent_id):
    with committing(conn) as cur:
        found = cur.execute("UPDATE agents SET active = 0, revoked_at = COALESCE(revoked_at, "
                            "UTC_TIMESTAMP(6)) WHERE agent_id = %s", (agent_id,))
    if not found:
        raise AgentError(f"no agent {agent_id!r}")


def authenticate(conn, agent_id, token, tell_revoked=False):
    """The agent row if `token` is this active agent's, else None (never says why); with `tell_revoked`, a
    revoked agent's right token gets Forbidden instead: only the token's holder learns it is revoked."""
    row = next(iter(select(conn, "SELECT agent_id, geo, token_hash, active FROM agents WHERE agent_id = %s",
                           (agent_id,), dicts=True)), None)
    expected = row["token_hash"] if row else hash_token("no-such-agent")
    if not (hmac.compare_digest(expected, hash_token(token or "")) and row):
        return None
    if not row["active"] and tell_revoked:
        raise Forbidden("agent is revoked")
    return row if row["active"] else None


def add_admin_token(conn, name):
    """A token for the roster and status endpoints; shown once, stored hashed."""
    token = secrets.token_urlsafe(32)
    with committing(conn) as cur:
        cur.execute("INSERT INTO admin_tokens (name, token_hash, created_at) VALUES (%s, %s, UTC_TIMESTAMP(6)) "
                    "ON DUPLICATE KEY UPDATE token_hash = VALUES(token_hash), created_at = VALUES(created_at), "
                    "revoked_at = NULL", (name, hash_token(token)))
    return token


def authenticate_admin(conn, token):
    """True if `token` is a live admin token (compared in constant time against each)."""
    presented = hash_token(token or "")
    hashes = select(conn, "SELECT token_hash FROM admin_tokens WHERE revoked_at IS NULL")
    return any([hmac.compare_digest(h, presented) for (h,) in hashes])


def expected_agents(conn, hour):
    """Agents active at `hour`: registered before it ended and not revoked before it began."""
    start, end = hours.window(hour)
    return [r[0] for r in select(conn, "SELECT agent_id FROM agents WHERE COALESCE(expected_from, created_at) < %s "
                                 "AND (revoked_at IS NULL OR revoked_at >= %s) ORDER BY agent_id", (end, start))]


def _event(cur, transaction_id, event, detail=None):
    cur.execute("INSERT INTO transaction_events (transaction_id, at, event, detail) "
                "VALUES (%s, UTC_TIMESTAMP(6), %s, %s)",
                (transaction_id, event, None if detail is None else json.dumps(detail, sort_keys=True, default=str)))


def _set_failed(cur, transaction_id, reason, detail=None):
    cur.execute("UPDATE transactions SET state = 'failed', error = %s, updated_at = UTC_TIMESTAMP(6) "
                "WHERE transaction_id = %s", (reason[:2000], transaction_id))
    _event(cur, transaction_id, "failed", dict(detail or {}, reason=reason[:2000]))


def get_transaction(conn, transaction_id, for_update=False):
    rows = select(conn, f"SELECT {_TX_COLUMNS} FROM transactions WHERE transaction_id = %s"
                  + (" FOR UPDATE" if for_update else ""), (transaction_id,), dicts=True)
    return next(iter(rows), None)


def create_transaction(conn, agent_id, hour, replace=False):
    """(transaction row, created?) for agent and hour: a retry gets the open one it made before; a completed
    hour is a Conflict unless `replace`, whose transaction supersedes the completed one once it completes."""
    hour = hours.floor_hour(hour)
    if not select(conn, "SELECT agent_id FROM agents WHERE agent_id = %s FOR UPDATE", (agent_id,)):
        conn.rollback()
        raise Forbidden(f"unknown agent {agent_id!r}")
    existing = select(conn, f"SELECT {_TX_COLUMNS} FROM transactions WHERE agent_id = %s AND hour = %s "
                      "AND state IN ('created', 'uploaded', 'completed') ORDER BY created_at",
                      (agent_id, hour), dicts=True)
    completed = [t for t in existing if t["state"] == "completed"]
    open_ = [t for t in existing if t["state"] in OPEN_STATES]
    if open_ and bool(open_[0]["supersedes"]) == bool(replace and completed):
        conn.rollback()
        return open_[0], False
    if completed and not replace:
        conn.rollback()
        raise Conflict(f"agent {agent_id!r} already completed hour {hours.format_hour(hour)} "
                       f"(transaction {completed[0]['transaction_id']}); send replace=true to replace it",
                       completed[0]["transaction_id"])
    with committing(conn) as cur:
        for stale in open_:
            _set_failed(cur, stale["transaction_id"], "abandoned for a newer request")
        transaction_id = str(uuid.uuid4())
        supersedes = completed[0]["transaction_id"] if completed else None
        cur.execute("INSERT INTO transactions (transaction_id, agent_id, hour, state, supersedes, created_at, "
                    "updated_at) VALUES (%s, %s, %s, 'created', %s, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))",
                    (transaction_id, agent_id, hour, supersedes))
        _event(cur, transaction_id, "created", {"agent_id": agent_id, "hour": hours.format_hour(hour),
                                                "supersedes": supersedes})
    return get_transaction(conn, transaction_id), True


def mark_uploaded(conn, transaction_id, size, sha256):
    """The archive's bytes are on disk and match the sha256 the agent announced."""
    tx = _locked(conn, transaction_id, OPEN_STATES)
    if tx["state"] == "uploaded" and tx["sha256"] == sha256 and tx["size"] == size:
        conn.rollback()
        return tx
    with committing(conn) as cur:
        cur.execute("UPDATE transactions SET state = 'uploaded', size = %s, sha256 = %s, updated_at = UTC_TIMESTAMP(6) "
                    "WHERE transaction_id = %s", (size, sha256, transaction_id))
        _event(cur, transaction_id, "uploaded", {"size": size, "sha256": sha256})
    return get_transaction(conn, transaction_id)


def mark_completed(conn, transaction_id, archive_path, counts):
    """The archive was validated and moved into upload/; a replacement retires what it supersedes."""
    tx = _locked(conn, transaction_id, ("uploaded",))
    with committing(conn) as cur:
        cur.execute("UPDATE transactions SET state = 'completed', archive_path = %s, completed_at = UTC_TIMESTAMP(6), "
                    "updated_at = UTC_TIMESTAMP(6) WHERE transaction_id = %s", (archive_path, transaction_id))
        _event(cur, transaction_id, "completed", {"rows": counts})
        if tx["supersedes"]:
            cur.execute("UPDATE transactions SET state = 'superseded', updated_at = UTC_TIMESTAMP(6) "
                        "WHERE transaction_id = %s AND state = 'completed'", (tx["supersedes"],))
            _event(cur, tx["supersedes"], "superseded", {"by": transaction_id})
    return get_transaction(conn, transaction_id)


def mark_failed(conn, transaction_id, reason, detail=None):
    _locked(conn, transaction_id, OPEN_STATES)
    with committing(conn) as cur:
        _set_failed(cur, transaction_id, reason, detail)
    return get_transaction(conn, transaction_id)


def _locked(conn, transaction_id, states):
    tx = get_transaction(conn, transaction_id, for_update=True)
    if tx is None or tx["state"] not in states:
        conn.rollback()
        if tx is None:
            raise NotFound(f"no transaction {transaction_id}", transaction_id)
        raise Conflict(f"transaction {transaction_id} is {tx['state']}, not {' or '.join(states)}", transaction_id)
    return tx


def events(conn, transaction_id):
    return [{"at": at, "event": event, "detail": json.loads(detail) if detail else None}
            for at, event, detail in select(conn, "SELECT at, event, detail FROM transaction_events "
                                                  "WHERE transaction_id = %s ORDER BY event_id", (transaction_id,))]


def hour_transactions(conn, hour, states=("completed",)):
    """The hour's transactions in the given states, oldest completion first: one query per hour."""
    return select(conn, f"SELECT {_TX_COLUMNS} FROM transactions WHERE hour = %s AND state IN ({marks(states)}) "
                  "ORDER BY completed_at, transaction_id", (hours.floor_hour(hour), *states), dicts=True)


def agent_windows(conn):
    """(agent_id, expected from, revoked_at) of every agent: one query serves any range of hours."""
    return select(conn, "SELECT agent_id, COALESCE(expected_from, created_at), revoked_at FROM agents "
                  "ORDER BY agent_id")


def transactions_between(conn, first, last):
    """Every transaction of the hours first..last (inclusive), with agent, hour and state: one query."""
    return select(conn, "SELECT transaction_id, agent_id, hour, state FROM transactions WHERE hour BETWEEN %s "
                  "AND %s ORDER BY hour, agent_id, created_at", (hours.floor_hour(first), hours.floor_hour(last)),
                  dicts=True)


def open_count(conn):
    """How many transactions are created or uploaded and not completed yet (any hour)."""
    return select(conn, f"SELECT COUNT(*) FROM transactions WHERE state IN ({marks(OPEN_STATES)})", OPEN_STATES,
                  commit=True)[0][0]


def unfinished(conn, agent_id, since):
    """Ids of the agent's transactions of hours from `since` on that never completed (their archive may still be
    in incoming/)."""
    rows = select(conn, "SELECT transaction_id FROM transactions WHERE agent_id = %s AND hour >= %s "
                  "AND state IN ('created', 'uploaded', 'failed')", (agent_id, hours.floor_hour(since)))
    return {r[0] for r in rows}


def states(conn, transaction_ids):
    """{transaction id: state} of those of `transaction_ids` the log holds."""
    found, ids = {}, list(transaction_ids)
    for i in range(0, len(ids), 1000):
        chunk = ids[i:i + 1000]
        found.update(select(conn, f"SELECT transaction_id, state FROM transactions WHERE transaction_id IN "
                            f"({marks(chunk)})", chunk))
    conn.commit()
    return found


@contextmanager
def transaction_lock(conn, transaction_id, wait):
    """Serialize upload-finish, complete and the sweep of one transaction's files, across API processes
    (a MySQL named lock); Busy if another holds it past `wait` seconds."""
    name = f"ganymede-tx-{transaction_id}"
    if select(conn, "SELECT GET_LOCK(%s, %s)", (name, wait))[0][0] != 1:
        raise Busy(f"another request is working on transaction {transaction_id}; retry", transaction_id)
    try:
        yield
    finally:
        with suppress(pymysql.err.Error), conn.cursor() as cur:  # a lost connection releases the lock by itself
            cur.execute("SELECT RELEASE_LOCK(%s)", (name,))


def set_archive_path(conn, transaction_id, path):
    """The transaction's archive now lives at `path` (moved upload/ -> archives/ after its hour's backup)."""
    with committing(conn) as cur:
        cur.execute("UPDATE transactions SET archive_path = %s, updated_at = UTC_TIMESTAMP(6) "
                    "WHERE transaction_id = %s", (path, transaction_id))
        _event(cur, transaction_id, "archived", {"archive_path": path})


def mark_isolated(conn, transaction_id, reason, detail=None):
    """A completed transaction whose data cannot be staged or loaded becomes failed, with reason and event
    (once: a failed one gets no second event); returns the row, or None when the log does not hold it."""
    tx = get_transaction(conn, transaction_id, for_update=True)
    with committing(conn) as cur:
        if tx and tx["state"] == "completed":
            _set_failed(cur, transaction_id, reason, detail)
    return tx and get_transaction(conn, transaction_id)


def append_event_once(conn, transaction_id, event, detail=None):
    """A pipeline step (staged, loaded, backed_up, …) finished; logged once however often a crashed step reruns."""
    with committing(conn) as cur:
        if not cur.execute("SELECT 1 FROM transaction_events WHERE transaction_id = %s AND event = %s "
                           "LIMIT 1", (transaction_id, event)):
            _event(cur, transaction_id, event, detail)
