"""The dataset catalog: what each dataset's columns are, its key, and its transform.

Everything here is a pure function of its arguments. A row arrives as CSV
strings; `parse_row` types it (or says why it cannot), `to_document` turns a
typed row into the MongoDB document with a deterministic `_id`.
"""
import math
import re
from dataclasses import dataclass, field
from datetime import datetime

from . import hours

_STR = re.compile(r"^[A-Za-z0-9_./:][A-Za-z0-9_.:/@+= -]*$")  # no leading = + - @: nothing a spreadsheet runs


class RowError(ValueError):
    """A row that cannot become a document; the message is the reason kept in the rejects file."""


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # 'str' | 'int' | 'float' | 'datetime'
    max_len: int = 128

    @property
    def sql_type(self):
        """Staging keeps the text as sent: typing happens in the transform, where a bad value is a reject, not a crash."""
        return f"VARCHAR({self.max_len if self.kind == 'str' else 40})"

    def parse(self, text):
        if text is None or text == "":
            raise RowError(f"{self.name}: empty")
        if self.kind == "str":
            if len(text) > self.max_len or not _STR.match(text):
                raise RowError(f"{self.name}: not a plain identifier of at most {self.max_len} characters")
            return text
        if self.kind == "int":
            try:
                value = int(text)
            except ValueError:
                raise RowError(f"{self.name}: not an integer: {text[:40]!r}") from None
            if not -(2 ** 63) <= value < 2 ** 63:
                raise RowError(f"{self.name}: out of range")
            return value
        if self.kind == "float":
            try:
                value = float(text)
            except ValueError:
                raise RowError(f"{self.name}: not a number: {text[:40]!r}") from None
            if not math.isfinite(value):
                raise RowError(f"{self.name}: not finite")
            return value
        if self.kind == "datetime":
            try:
                return hours.utc(datetime.fromisoformat(text)).replace(microsecond=0)
            except ValueError:
                raise RowError(f"{self.name}: not an ISO date-time: {text[:40]!r}") from None
        raise AssertionError(f"unknown column kind {self.kind}")


def _non_negative(*names):
    def check(row, hour):
        for name in names:
            if row[name] < 0:
                raise RowError(f"{name}: negative")
    return check


def _account_usage_derive(row, hour):
    row["avg_object_bytes"] = round(row["bytes_stored"] / row["objects"], 3) if row["objects"] else 0.0


def _api_requests_check(row, hour):
    _non_negative("count", "bytes")(row, hour)
    if not 100 <= row["status"] <= 599:
        raise RowError(f"status: {row['status']} is not an HTTP status")
    if row["latency_p50_ms"] < 0 or row["latency_p95_ms"] < row["latency_p50_ms"]:
        raise RowError("latency: need 0 <= p50 <= p95")


def _api_requests_derive(row, hour):
    row["is_error"] = row["status"] >= 500
    row["mean_bytes"] = round(row["bytes"] / row["count"], 3) if row["count"] else 0.0


def _node_health_check(row, hour):
    _non_negative("disk_total_bytes", "disk_used_bytes", "errors")(row, hour)
    if row["disk_used_bytes"] > row["disk_total_bytes"]:
        raise RowError("disk_used_bytes: larger than disk_total_bytes")
    start, end = hours.window(hour)
    if not start <= row["sampled_at"] < end:
        raise RowError(f"sampled_at: {row['sampled_at'].isoformat()} is outside the hour")


def _node_health_derive(row, hour):
    total = row["disk_total_bytes"]
    row["disk_used_pct"] = round(100.0 * row["disk_used_bytes"] / total, 3) if total else 0.0


@dataclass(frozen=True)
class Dataset:
    name: str
    columns: tuple
    key: tuple
    check: object = None
    derive: object = None
    column_names: tuple = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "column_names", tuple(c.name for c in self.columns))

    @property
    def staging_table(self):
        return f"stage_{self.name}"

    def check_header(self, header):
        if list(header) != list(self.column_names):
            raise RowError(f"header {header!r} != expected {list(self.column_names)!r}")

    def parse_row(self, values, hour):
        """CSV strings -> typed dict, checked; RowError says why not."""
        if len(values) != len(self.columns):
            raise RowError(f"{len(values)} fields, expected {len(self.columns)}")
        row = {c.name: c.parse(v) for c, v in zip(self.columns, values)}
        if self.check:
            self.check(row, hour)
        return row

    def document_id(self, agent_id, hour, row):
        parts = [agent_id, hours.compact(hour)]
        for name in self.key:
            value = row[name]
            parts.append(value.strftime("%Y%m%dT%H%M%S") if isinstance(value, datetime) else str(value))
        return "|".join(parts)

    def to_document(self, row, agent_id, geo, hour, transaction_id):
        """A typed row -> the stored document (derived fields added)."""
        doc = dict(row)
        if self.derive:
            self.derive(doc, hour)
        doc.update(_id=self.document_id(agent_id, hour, row), agent_id=agent_id, geo=geo,
                   hour=hours.floor_hour(hour), transaction_id=transaction_id)
        return doc


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
        ),
        Dataset(
            "api_requests",
            (Column("method", "str", 16), Column("endpoint", "str"), Column("status", "int"),
             Column("count", "int"), Column("bytes", "int"),
             Column("latency_p50_ms", "float"), Column("latency_p95_ms", "float")),
            key=("method", "endpoint", "status"),
            check=_api_requests_check,
            derive=_api_requests_derive,
        ),
        Dataset(
            "node_health",
            (Column("node_id", "str"), Column("sampled_at", "datetime"), Column("disk_total_bytes", "int"),
             Column("disk_used_bytes", "int"), Column("load_1m", "float"), Column("errors", "int")),
            key=("node_id", "sampled_at"),
            check=_node_health_check,
            derive=_node_health_derive,
        ),
    )
}


def get(name):
    try:
        return CATALOG[name]
    except KeyError:
        raise RowError(f"unknown dataset {name!r}") from None
