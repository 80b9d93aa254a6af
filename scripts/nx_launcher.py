#!/usr/bin/env python3
"""Start the nx-27017 MongoDB test server with one neosqlite defect worked around.

nx-27017 0.8.1 / neosqlite 1.17 store a datetime written by ``$set`` onto an
existing document as a string when the update goes through neosqlite's SQL
(json_set) path. Updates whose spec carries a datetime anywhere are sent to
neosqlite's Python update path instead, which keeps real datetimes.
Arguments are those of ``nx-27017``.
"""

import datetime

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

if __name__ == "__main__":
    nx_27017.main()
