#!/usr/bin/env python3
"""Start the nx-27017 MongoDB test server with two neosqlite defects worked around.

nx-27017 0.8.1 / neosqlite 1.17 store a datetime written by ``$set`` onto an
existing document as a string when the update goes through neosqlite's SQL
(json_set) path. Updates whose spec carries a datetime anywhere are sent to
neosqlite's Python update path instead, which keeps real datetimes.

A compound index holding ``_id`` (the extract's ``{hour: 1, _id: 1}``) becomes
a SQLite index on ``json_extract(data, '_id')``, a malformed JSON path that
makes every later write to the collection fail. Such an index is created
without its ``_id`` part (``_id`` is the table's own column): only how fast
the stand-in answers changes, never what it answers.
Arguments are those of ``nx-27017``.
"""

import datetime

from neosqlite.collection.index_manager import IndexManager
from neosqlite.collection.query_helper import _sql_updates
from nx_27017 import nx_27017

_original_can_use_sql_updates = _sql_updates.SqlUpdatesMixin._can_use_sql_updates


def _has_datetime(value):
    if isinstance(value, datetime.datetime):
        return True
    if isinstance(value, dict):
        return any(_has_datetime(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_datetime(v) for v in value)
    return False


def _can_use_sql_updates(self, update_spec, doc_id, original_doc=None):
    if _has_datetime(update_spec):
        return False
    return _original_can_use_sql_updates(self, update_spec, doc_id, original_doc)


_sql_updates.SqlUpdatesMixin._can_use_sql_updates = _can_use_sql_updates

_original_create_index = IndexManager.create_index


def _create_index(self, key, *args, **kwargs):
    if isinstance(key, list) and len(key) > 1 and any(isinstance(k, tuple) and k[0] == "_id" for k in key):
        key = [k for k in key if k[0] != "_id"]
    return _original_create_index(self, key, *args, **kwargs)


IndexManager.create_index = _create_index

if __name__ == "__main__":
    nx_27017.main()
