"""MongoDB: one collection per dataset, documents keyed by a deterministic `_id`.

Writes are whole-document upserts by `_id` (ReplaceOne), so loading a
transaction again overwrites instead of duplicating.
"""
import pymongo
from pymongo.errors import PyMongoError

from ..errors import StoreUnavailable


def connect(cfg):
    """(client, database) for a ganymede.config.mongodb; naive datetimes out mean UTC (hours.utc)."""
    client = pymongo.MongoClient(cfg.uri, serverSelectionTimeoutMS=5000, connectTimeoutMS=5000)
    return client, client[cfg.database]


def ensure_indexes(db, dataset_names):
    """Idempotent: creating an index that exists is a no-op."""
    for name in dataset_names:
        db[name].create_index([("hour", pymongo.ASCENDING), ("agent_id", pymongo.ASCENDING)])
        db[name].create_index([("transaction_id", pymongo.ASCENDING)])


def replace_many(collection, docs):
    """Upsert whole documents by `_id`; returns how many were written."""
    if not docs:
        return 0
    try:
        result = collection.bulk_write([pymongo.ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in docs],
                                       ordered=False)
    except PyMongoError as exc:
        raise StoreUnavailable(f"MongoDB write to {collection.name} failed: {exc}") from None
    return result.upserted_count + result.matched_count


def delete_stale(collection, transaction_ids, keep_transaction_id):
    """Remove documents of superseded transactions that the replacement did not overwrite."""
    if not transaction_ids:
        return 0
    return collection.delete_many({"transaction_id": {"$in": list(transaction_ids),
                                                      "$ne": keep_transaction_id}}).deleted_count


def hour_documents(collection, hour, transaction_ids=None):
    """The hour's documents in `_id` order (the extract's deterministic order), streamed."""
    query = {"hour": hour}
    if transaction_ids is not None:
        query["transaction_id"] = {"$in": list(transaction_ids)}
    return collection.find(query, sort=[("_id", pymongo.ASCENDING)], batch_size=2000)
