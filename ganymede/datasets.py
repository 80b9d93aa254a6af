"""The dataset catalog: each dataset's columns, key, rules and derived fields; pure functions only."""
import math
import operator
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from . import hours

# One grammar per kind, ASCII only. A column's `max_len` bounds its text: checked before anything else, and
# the width of its staging column, so whatever parses can be staged and nothing longer reaches staging.
_STR = re.compile(r"[A-Za-z0-9_./:][A-Za-z0-9_.:/@+= -]*\Z")  # no leading = + - @: nothing a spreadsheet runs
_INT = re.compile(r"-?[0-9]{1,19}\Z")  # int() would also take ' 7', '+7', '1_000', '٧'
_FLOAT = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]{1,3})?\Z")
# date, 'T' or ' ', time to the second (fraction up to µs), optional UTC offset: what MySQL and isoformat() print
_DATETIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?"
                       r"(?:Z|[-+][0-9]{2}:[0-9]{2})?\Z")
MAX_LEN = {"int": 20, "float": 40, "datetime": 32}  # the longest text each grammar needs (str: per column)
_INT_MIN, _INT_MAX = -(2 ** 63), 2 ** 63


class RowError(ValueError):
    """A row that cannot become a document; the message is the reason kept in the rejects file."""


class RangeError(RowError):
    """A well-formed value out of range (a negative counter, disk used > total): counted by `value_ranges`."""


def _to_str(name, text, max_len):
    if _STR.match(text):
        return text
    raise RowError(f"{name}: not a plain identifier of at most {max_len} characters")


def _to_number(what, pattern, convert, in_range, outside):
    def to_number(name, text, max_len):
        if not pattern.match(text):
            raise RowError(f"{name}: not {what}: {text!r}")
        value = convert(text)
        if in_range(value):
            return value
        raise RowError(f"{name}: {outside}")
    return to_number


_to_int = _to_number("an integer", _INT, int, lambda value: _INT_MIN <= value < _INT_MAX, "out of range")
_to_float = _to_number("a number", _FLOAT, float, math.isfinite, "not finite")


def _to_datetime(name, text, max_len):
    try:
        if _DATETIME.match(text):
            return hours.utc(datetime.fromisoformat(text)).replace(microsecond=0)
    except ValueError:
        pass
    raise RowError(f"{name}: not an ISO date-time: {text!r}")


_CONVERT = {"str": _to_str, "int": _to_int, "float": _to_float, "datetime": _to_datetime}


@dataclass(frozen=True)
class Column:
    """A column of a dataset: its text (at most `max_len` characters, the default of its kind) and its type."""
    name: str
    kind: str  # 'str' | 'int' | 'float' | 'datetime'
    max_len: int = None  # default: MAX_LEN[kind], or 128 for 'str'

    def __post_init__(self):
        if self.kind not in _CONVERT:
            raise AssertionError(f"unknown column kind {self.kind}")
        if self.max_len is None:
            object.__setattr__(self, "max_len", MAX_LEN.get(self.kind, 128))

    def parse(self, text):
        """Text -> value, or RowError saying why not; the length is checked first, before any other work."""
        if len(text) > self.max_len:
            raise RowError(f"{self.name}: longer than {self.max_len} characters")
        if not text:
            raise RowError(f"{self.name}: empty")
        return _CONVERT[self.kind](self.name, text, self.max_len)

    @property
    def sql_type(self):
        """Staging keeps the text as sent, exactly as wide as the parser allows."""
        return f"VARCHAR({self.max_len})"


def _key_part(value):
    if isinstance(value, datetime):  # naive UTC, whole seconds: 2026-11-30T05:01:00 -> 20261130T050100
        return value.isoformat().replace("-", "").replace(":", "")
    return str(value)


def _non_negative(*names):
    def check(row, hour):
        for name in names:
            if row[name] < 0:
                raise RangeError(f"{name}: negative")
    return check


def growth(current, previous):
    """How much a counter moved since the previous hour; None when that hour is not known."""
    return None if previous is None else current - previous


def _account_usage_derive(doc):
    doc["avg_object_bytes"] = round(doc["bytes_stored"] / doc["objects"], 3) if doc["objects"] else 0.0


def _account_usage_from_previous(doc, previous):
    doc["bytes_stored_growth"] = growth(doc["bytes_stored"], previous.get("bytes_stored") if previous else None)


def _api_requests_check(row, hour):
    _non_negative("count", "bytes")(row, hour)
    if not 100 <= row["status"] <= 599:
        raise RangeError(f"status: {row['status']} is not an HTTP status")
    if row["latency_p50_ms"] < 0 or row["latency_p95_ms"] < row["latency_p50_ms"]:
        raise RangeError("latency: need 0 <= p50 <= p95")


def _api_requests_derive(doc):
    doc["is_error"] = doc["status"] >= 500
    doc["mean_bytes"] = round(doc["bytes"] / doc["count"], 3) if doc["count"] else 0.0


def _api_requests_summarize(docs):
    """Error rate of one (method, endpoint) over the transaction: 5xx requests / all requests (None if none)."""
    errors, total = sum(d["count"] for d in docs if d["status"] >= 500), sum(d["count"] for d in docs)
    return {"error_rate": round(errors / total, 6) if total else None}


def _node_health_check(row, hour):
    _non_negative("disk_total_bytes", "disk_used_bytes", "errors")(row, hour)
    if row["disk_used_bytes"] > row["disk_total_bytes"]:
        raise RangeError("disk_used_bytes: larger than disk_total_bytes")
    start, end = hours.window(hour)
    if not start <= row["sampled_at"] < end:
        raise RangeError(f"sampled_at: {row['sampled_at'].isoformat()} is outside the hour")


def _node_health_derive(doc):
    total = doc["disk_total_bytes"]
    doc["disk_used_pct"] = round(100.0 * doc["disk_used_bytes"] / total, 3) if total else 0.0


@dataclass(frozen=True)
class Quality:
    """A dataset's quality thresholds (docs/operations.md): a failed check in `blocking` stops the extract."""
    count_factor: float = 3.0
    trailing_hours: int = 24
    min_history: int = 2
    max_rejected_share: float = 0.05
    watch_key: str = None
    max_out_of_range: int = 0
    blocking: tuple = ()


@dataclass(frozen=True)
class Dataset:
    """One dataset: columns in CSV order, key within (agent, hour), rules and derived fields.

    `derive(doc)` adds the fields a row gives alone; `from_previous(doc, previous)` those that compare with the
    same key's document one hour earlier, reduced to `previous_fields` (None when that hour is not loaded);
    `summarize(docs)` those shared by every document of one group (`group_by` columns) of a transaction.
    """
    name: str
    columns: tuple
    key: tuple
    check: object = None
    derive: object = None
    previous_fields: tuple = ()
    from_previous: object = None
    group_by: tuple = ()
    summarize: object = None
    quality: Quality = Quality()
    column_names: tuple = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "column_names", tuple(c.name for c in self.columns))
        object.__setattr__(self, "_parsers", tuple(c.parse for c in self.columns))
        object.__setattr__(self, "_widths", tuple(c.max_len for c in self.columns))
        if bool(self.group_by) != bool(self.summarize) or bool(self.previous_fields) != bool(self.from_previous):
            raise AssertionError(f"{self.name}: group_by/summarize and previous_fields/from_previous go in pairs")

    @property
    def staging_table(self):
        return f"stage_{self.name}"

    def check_header(self, header):
        if list(header) != list(self.column_names):
            raise RowError(f"header {header!r} != expected {list(self.column_names)!r}")

    def fits_staging(self, values):
        """Whether a row can be staged unchanged: one value per column, each within its column's length, and
        none holding the unit separator staging reads rows back with. A row that does not fit never parses."""
        return (len(values) == len(self._widths) and all(map(operator.ge, self._widths, map(len, values)))
                and "\x1f" not in "".join(values))

    def parse_row(self, values, hour):
        """CSV strings -> typed dict, checked; RowError says why not."""
        if len(values) != len(self._parsers):
            raise RowError(f"{len(values)} fields, expected {len(self._parsers)}")
        row = dict(zip(self.column_names, map(operator.call, self._parsers, values)))
        if self.check:
            self.check(row, hour)
        return row

    def document_id(self, agent_id, hour, row):
        """'<agent>|<YYYYMMDDHH>|<key part>|…': the same key in the same hour is always the same document.

        '|' cannot occur inside a part: identifiers exclude it, numbers and date-times are written canonically.
        """
        return "|".join([agent_id, hours.compact(hour), *(_key_part(row[name]) for name in self.key)])

    def previous_id(self, agent_id, hour, row):
        """The `_id` the same key had one hour earlier."""
        return self.document_id(agent_id, hours.floor_hour(hour) - timedelta(hours=1), row)

    def group_of(self, row):
        return tuple(row[name] for name in self.group_by)

    def to_document(self, row, agent_id, geo, hour, transaction_id, previous=None):
        """A typed row -> the stored document; `previous` is the same key's document an hour earlier, if any."""
        doc = self.documents([dict(row)], agent_id, geo, hour, transaction_id)[0]
        if self.from_previous:
            self.from_previous(doc, previous)
        return doc

    def documents(self, rows, agent_id, geo, hour, transaction_id):
        """Typed rows become documents, in place, with the row-level derived fields: the load's inner loop."""
        hour = hours.floor_hour(hour)
        prefix = f"{agent_id}|{hours.compact(hour)}|"
        single = self.key[0] if len(self.key) == 1 else None
        derive, fixed = self.derive, {"agent_id": agent_id, "geo": geo, "hour": hour, "transaction_id": transaction_id}
        for doc in rows:
            if derive:
                derive(doc)
            key = _key_part(doc[single]) if single else "|".join([_key_part(doc[name]) for name in self.key])
            doc["_id"] = prefix + key
            doc.update(fixed)
        return rows

    def with_previous(self, docs, previous_ids, found):
        """Documents (and their previous-hour `_id`s, same order) given the fields that compare with that hour;
        `found` maps `_id` -> document for the previous-hour documents that exist."""
        for doc, previous_id in zip(docs, previous_ids):
            self.from_previous(doc, found.get(previous_id))
        return docs

    def with_summary(self, docs):
        """Documents of one group, each given the group's summary fields."""
        summary = self.summarize(docs)
        for doc in docs:
            doc.update(summary)
        return docs


CATALOG = {
    d.name: d
    for d in (
        Dataset(
            "account_usage",
            (Column("account_id", "str"), Column("bytes_stored", "int"), Column("objects", "int"),
             Column("bytes_in", "int"), Column("bytes_out", "int"), Column("requests", "int")),
            key=("account_id",),
            check=_non_negative("bytes_stored", "objects", "bytes_in", "bytes_out", "requests"),
            derive=_account_usage_derive,
            previous_fields=("bytes_stored",),
            from_previous=_account_usage_from_previous,
        ),
        Dataset(
            "api_requests",
            (Column("method", "str", 16), Column("endpoint", "str"), Column("status", "int"),
             Column("count", "int"), Column("bytes", "int"),
             Column("latency_p50_ms", "float"), Column("latency_p95_ms", "float")),
            key=("method", "endpoint", "status"),
            check=_api_requests_check,
            derive=_api_requests_derive,
            group_by=("method", "endpoint"),
            summarize=_api_requests_summarize,
            quality=Quality(max_rejected_share=0.01),
        ),
        Dataset(
            "node_health",
            (Column("node_id", "str"), Column("sampled_at", "datetime"), Column("disk_total_bytes", "int"),
             Column("disk_used_bytes", "int"), Column("load_1m", "float"), Column("errors", "int")),
            key=("node_id", "sampled_at"),
            check=_node_health_check,
            derive=_node_health_derive,
            quality=Quality(count_factor=2.0, watch_key="node_id"),  # a node that stopped reporting
        ),
    )
}


def get(name):
    try:
        return CATALOG[name]
    except KeyError:
        raise RowError(f"unknown dataset {name!r}") from None
