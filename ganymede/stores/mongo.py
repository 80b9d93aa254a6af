"""MongoDB: one collection per dataset, documents keyed by a deterministic `_id`.

Writes are whole-document upserts by `_id`, so loading a transaction again overwrites instead of duplicating.
Every query the pipeline makes is here, each served by an index `ganymede db upgrade` creates (INDEXES).
"""
from contextlib import contextmanager

import pymongo
from pymongo.errors import PyMongoError

from ..errors import StoreUnavailable

# Per dataset collection, besides the `_id` index every collection has (the previous-hour lookup):
INDEXES = [
    [("hour", pymongo.ASCENDING), ("_id", pymongo.ASCENDING)],  # the extract: find({hour}).sort(_id), no SORT stage
    [("hour", pymongo.ASCENDING), ("agent_id", pymongo.ASCENDING), ("transaction_id", pymongo.ASCENDING)],  # retire
]


def connect(cfg):
    """(client, database) for a ganymede.config.mongodb; naive datetimes out mean UTC (hours.utc)."""
    client = pymongo.MongoClient(cfg.uri, serverSelectionTimeoutMS=5000, connectTimeoutMS=5000)
    return client, client[cfg.database]


@contextmanager
def _reaching(what):
    try:
        yield
    except PyMongoError as exc:
        raise StoreUnavailable(f"MongoDB {what} failed: {exc}") from None


def create_indexes(db, names):
    """Create INDEXES on each named collection (idempotent); returns {collection: [index names]}."""
    with _reaching("index creation"):
        return {name: [db[name].create_index(keys) for keys in INDEXES] for name in names}


def replace_many(collection, docs):
    """Upsert whole documents by `_id`; returns how many were written."""
    if not docs:
        return 0
    with _reaching(f"write to {collection.name}"):
        result = collection.bulk_write([pymongo.ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in docs],
                                       ordered=False)
    return result.upserted_count + result.matched_count


def find_by_ids(collection, ids, fields):
    """{_id: document reduced to `fields`} of those of `ids` that exist: one `_id $in` query (the _id index)."""
    with _reaching(f"read of {collection.name}"):
        return {d["_id"]: d for d in collection.find({"_id": {"$in": ids}}, dict.fromkeys(fields, 1),
                                                     batch_size=len(ids) or 1)}


def delete_agent_hour(db, names, hour, agent_id, transaction_id, keep=False):
    """Remove documents of one agent and hour from each named collection: those of `transaction_id`, or with
    keep=True those of every other transaction (what a replacement supersedes). Returns {collection: deleted}."""
    match = {"$ne": transaction_id} if keep else transaction_id
    with _reaching("delete"):
        return {name: db[name].delete_many({"hour": hour, "agent_id": agent_id,
                                            "transaction_id": match}).deleted_count for name in names}


def hour_documents(collection, hour, transaction_ids=None):
    """The hour's documents in `_id` order (the extract's deterministic order), streamed."""
    query = {"hour": hour}
    if transaction_ids is not None:
        query["transaction_id"] = {"$in": list(transaction_ids)}
    return collection.find(query, sort=[("_id", pymongo.ASCENDING)], batch_size=2000)


def key_values(collection, hour, field, agent_ids):
    """{agent: set of `field` values} of the agents' documents of the hour (the `hour` index), streamed."""
    found = {agent: set() for agent in agent_ids}
    with _reaching(f"read of {collection.name}"):
        for doc in collection.find({"hour": hour, "agent_id": {"$in": list(agent_ids)}},
                                   {"agent_id": 1, field: 1, "_id": 0}, batch_size=2000):
            found[doc["agent_id"]].add(doc[field])
    return found
