"""The dataset catalog's pure functions: parsing, row rules, derived fields, document ids."""
from datetime import datetime

import pytest

from ganymede import datasets
from ganymede.datasets import CATALOG, RowError

HOUR = datetime(2026, 11, 30, 5)
ACCOUNT = ["acct-1", "1000", "4", "10", "20", "3"]
API = ["GET", "/v1/objects", "200", "10", "4096", "1.5", "9.25"]
NODE = ["node-1", "2026-11-30T05:01:00", "1000", "250", "0.5", "0"]
VALID = {"account_usage": ACCOUNT, "api_requests": API, "node_health": NODE}


def with_value(dataset, column, value):
    values = list(VALID[dataset])
    values[CATALOG[dataset].column_names.index(column)] = value
    return values


def parse(dataset, values, hour=HOUR):
    return CATALOG[dataset].parse_row(values, hour)


def reason(dataset, values):
    with pytest.raises(RowError) as exc:
        parse(dataset, values)
    return str(exc.value)


@pytest.mark.parametrize("dataset", sorted(VALID))
def test_valid_rows_parse(dataset):
    row = parse(dataset, VALID[dataset])
    assert list(row) == list(CATALOG[dataset].column_names)


def test_values_are_typed():
    assert parse("account_usage", ACCOUNT) == {"account_id": "acct-1", "bytes_stored": 1000, "objects": 4,
                                               "bytes_in": 10, "bytes_out": 20, "requests": 3}
    row = parse("api_requests", API)
    assert (row["status"], row["latency_p50_ms"], row["latency_p95_ms"]) == (200, 1.5, 9.25)
    assert parse("node_health", NODE)["sampled_at"] == datetime(2026, 11, 30, 5, 1)


# --- parse errors, per column kind -------------------------------------------------------

@pytest.mark.parametrize("dataset, column, value, expected", [
    # str
    ("account_usage", "account_id", "", "account_id: empty"),
    ("account_usage", "account_id", "a" * 129, "account_id: longer than 128 characters"),
    ("api_requests", "method", "G" * 17, "method: longer than 16 characters"),
    ("api_requests", "method", "=" * 16, "method: not a plain identifier of at most 16 characters"),
    ("account_usage", "account_id", "acct|2026113005", "not a plain identifier"),  # would forge an _id part
    ("account_usage", "account_id", "acct\n1", "not a plain identifier"),
    ("account_usage", "account_id", "acct\n", "not a plain identifier"),  # '$' would have let this through
    ("account_usage", "account_id", "acct\x1f1", "not a plain identifier"),
    ("account_usage", "account_id", "accté", "not a plain identifier"),
    # int
    ("account_usage", "bytes_stored", "", "bytes_stored: empty"),
    ("account_usage", "bytes_stored", "1.5", "bytes_stored: not an integer: '1.5'"),
    ("account_usage", "bytes_stored", "1e3", "not an integer"),
    ("account_usage", "bytes_stored", " 5", "not an integer"),
    ("account_usage", "bytes_stored", "5 ", "not an integer"),
    ("account_usage", "bytes_stored", "5\n", "not an integer"),
    ("account_usage", "bytes_stored", "+5", "not an integer"),
    ("account_usage", "bytes_stored", "1_000", "not an integer"),
    ("account_usage", "bytes_stored", "\u0665", "not an integer"),  # ARABIC-INDIC DIGIT FIVE: int() takes it
    ("account_usage", "bytes_stored", "0x10", "not an integer"),
    ("account_usage", "bytes_stored", "9223372036854775808", "bytes_stored: out of range"),
    ("account_usage", "bytes_stored", "12345678901234567890", "not an integer"),
    ("account_usage", "bytes_stored", "-" + "0" * 20, "bytes_stored: longer than 20 characters"),
    ("api_requests", "count", "many", "count: not an integer: 'many'"),
    # float
    ("api_requests", "latency_p50_ms", "", "latency_p50_ms: empty"),
    ("api_requests", "latency_p50_ms", "nan", "latency_p50_ms: not a number: 'nan'"),
    ("api_requests", "latency_p50_ms", "inf", "not a number"),
    ("api_requests", "latency_p50_ms", "1e999", "latency_p50_ms: not finite"),
    ("api_requests", "latency_p50_ms", "1,5", "not a number"),
    ("api_requests", "latency_p50_ms", "1_0.5", "not a number"),
    ("node_health", "load_1m", " 0.5", "load_1m: not a number"),
    ("node_health", "load_1m", "0." + "5" * 39, "load_1m: longer than 40 characters"),  # was staged nowhere
    ("node_health", "load_1m", "1" * 53, "load_1m: longer than 40 characters"),
    # datetime
    ("node_health", "sampled_at", "", "sampled_at: empty"),
    ("node_health", "sampled_at", "yesterday", "sampled_at: not an ISO date-time: 'yesterday'"),
    ("node_health", "sampled_at", "2026-13-30T05:01:00", "not an ISO date-time"),
    ("node_health", "sampled_at", "20261130T050100", "not an ISO date-time"),  # fromisoformat's other forms: no
    ("node_health", "sampled_at", "2026-11-30T05:01", "not an ISO date-time"),
    ("node_health", "sampled_at", "2026-11-30T05:01:00.1234567", "not an ISO date-time"),
    ("node_health", "sampled_at", "2026-11-30T05:01:00+02:00:00", "sampled_at: not an ISO date-time"),
    ("node_health", "sampled_at", "2026-11-30T05:01:00.000000+00:00" + " " * 10, "longer than 32 characters"),
])
def test_parse_errors_name_the_column_and_the_problem(dataset, column, value, expected):
    assert expected in reason(dataset, with_value(dataset, column, value))


@pytest.mark.parametrize("dataset, column, value", [
    ("account_usage", "account_id", "a" * 128), ("api_requests", "method", "G" * 16),
    ("account_usage", "bytes_stored", "-9223372036854775808"), ("node_health", "load_1m", "0." + "5" * 38),
    ("node_health", "sampled_at", "2026-11-30T05:01:00.000000+00:00"),
])
def test_values_at_their_length_limit_parse(dataset, column, value):
    col = next(c for c in CATALOG[dataset].columns if c.name == column)
    assert len(value) == col.max_len
    col.parse(value)


def test_staging_columns_are_as_wide_as_the_parsers_allow():
    widths = {c.name: c.sql_type for d in CATALOG.values() for c in d.columns}
    assert widths == {"account_id": "VARCHAR(128)", "bytes_stored": "VARCHAR(20)", "objects": "VARCHAR(20)",
                      "bytes_in": "VARCHAR(20)", "bytes_out": "VARCHAR(20)", "requests": "VARCHAR(20)",
                      "method": "VARCHAR(16)", "endpoint": "VARCHAR(128)", "status": "VARCHAR(20)",
                      "count": "VARCHAR(20)", "bytes": "VARCHAR(20)", "latency_p50_ms": "VARCHAR(40)",
                      "latency_p95_ms": "VARCHAR(40)", "node_id": "VARCHAR(128)", "sampled_at": "VARCHAR(32)",
                      "disk_total_bytes": "VARCHAR(20)", "disk_used_bytes": "VARCHAR(20)", "load_1m": "VARCHAR(40)",
                      "errors": "VARCHAR(20)"}


@pytest.mark.parametrize("values, fits", [
    (ACCOUNT, True), (ACCOUNT[:-1], False), (ACCOUNT + ["1"], False),
    (with_value("account_usage", "bytes_stored", "1" * 21), False),
    (with_value("account_usage", "account_id", "a\x1fb"), False),
    (with_value("account_usage", "bytes_stored", "-5"), True),  # fits; the row rules refuse it at load
])
def test_fits_staging(values, fits):
    assert CATALOG["account_usage"].fits_staging(values) is fits


@pytest.mark.parametrize("values, expected", [
    (ACCOUNT[:-1], "5 fields, expected 6"),
    (ACCOUNT + ["x"], "7 fields, expected 6"),
    ([], "0 fields, expected 6"),
])
def test_field_count(values, expected):
    assert reason("account_usage", values) == expected


@pytest.mark.parametrize("value", [
    "=cmd|' /C calc'!A0", "=HYPERLINK(\"http://evil\",\"x\")", "+1+1", "-2+3", "@SUM(A1:A2)",
    "\t=1", " =1", "\r=1", "=1", "'=1",
])
@pytest.mark.parametrize("dataset, column", [("account_usage", "account_id"), ("api_requests", "endpoint"),
                                             ("api_requests", "method"), ("node_health", "node_id")])
def test_formula_injection_looking_strings_are_rejected(dataset, column, value):
    said = reason(dataset, with_value(dataset, column, value))
    assert "not a plain identifier" in said or said == f"{column}: longer than 16 characters"


@pytest.mark.parametrize("value", ["/v1/objects", "acct-0001", "a.b_c:d/e@f+g=h i", "_x", ":y", "0"])
def test_plain_identifiers_pass(value):
    assert parse("account_usage", with_value("account_usage", "account_id", value))["account_id"] == value


# --- row rules ---------------------------------------------------------------------------

@pytest.mark.parametrize("dataset, column, value, expected", [
    ("account_usage", "bytes_stored", "-5", "bytes_stored: negative"),
    ("account_usage", "requests", "-1", "requests: negative"),
    ("api_requests", "count", "-1", "count: negative"),
    ("api_requests", "status", "99", "status: 99 is not an HTTP status"),
    ("api_requests", "status", "600", "status: 600 is not an HTTP status"),
    ("api_requests", "latency_p95_ms", "1.0", "latency: need 0 <= p50 <= p95"),
    ("api_requests", "latency_p50_ms", "-1", "latency: need 0 <= p50 <= p95"),
    ("node_health", "disk_used_bytes", "1001", "disk_used_bytes: larger than disk_total_bytes"),
    ("node_health", "errors", "-1", "errors: negative"),
    ("node_health", "sampled_at", "2026-11-30T06:00:00", "sampled_at: 2026-11-30T06:00:00 is outside the hour"),
    ("node_health", "sampled_at", "2026-11-30T04:59:59", "sampled_at: 2026-11-30T04:59:59 is outside the hour"),
    ("node_health", "sampled_at", "2026-11-30T05:30:00-01:00", "sampled_at: 2026-11-30T06:30:00 is outside the hour"),
])
def test_row_rules(dataset, column, value, expected):
    assert reason(dataset, with_value(dataset, column, value)) == expected


@pytest.mark.parametrize("text, expected", [
    ("2026-11-30T05:01:02", datetime(2026, 11, 30, 5, 1, 2)),
    ("2026-11-30 05:01:02", datetime(2026, 11, 30, 5, 1, 2)),      # what MySQL's DATETIME prints
    ("2026-11-30 05:01:02.999999", datetime(2026, 11, 30, 5, 1, 2)),  # whole seconds
    ("2026-11-30T07:01:02+02:00", datetime(2026, 11, 30, 5, 1, 2)),   # folded to UTC
    ("2026-11-30T05:01:02Z", datetime(2026, 11, 30, 5, 1, 2)),
])
def test_sample_times_are_utc_whole_seconds(text, expected):
    assert parse("node_health", with_value("node_health", "sampled_at", text))["sampled_at"] == expected


def test_header_must_be_the_catalogs():
    CATALOG["account_usage"].check_header(list(CATALOG["account_usage"].column_names))
    with pytest.raises(RowError, match="header"):
        CATALOG["account_usage"].check_header(["account_id", "bytes"])


# --- derived fields ----------------------------------------------------------------------

def document(dataset, values, previous=None, agent_id="agent-1"):
    return CATALOG[dataset].to_document(parse(dataset, values), agent_id, "geo-1", HOUR, "tx-1", previous)


@pytest.mark.parametrize("stored, objects, expected", [("1000", "4", 250.0), ("1000", "3", 333.333),
                                                       ("0", "0", 0.0), ("5", "0", 0.0)])
def test_avg_object_bytes(stored, objects, expected):
    values = with_value("account_usage", "bytes_stored", stored)
    values[2] = objects
    assert document("account_usage", values)["avg_object_bytes"] == expected


@pytest.mark.parametrize("previous, expected", [
    (None, None),                       # previous hour not loaded
    ({}, None),                         # loaded, but without the field (an older document shape)
    ({"bytes_stored": 400}, 600),
    ({"bytes_stored": 1000}, 0),
    ({"bytes_stored": 1500}, -500),     # deletions make it shrink
])
def test_bytes_stored_growth_against_the_previous_hour(previous, expected):
    assert document("account_usage", ACCOUNT, previous)["bytes_stored_growth"] == expected


def test_growth_is_none_until_compared():
    assert datasets.growth(7, None) is None and datasets.growth(7, 3) == 4


def test_previous_documents_are_matched_by_their_id():
    dataset = CATALOG["account_usage"]
    rows = [parse("account_usage", with_value("account_usage", "account_id", a)) for a in ("a", "b", "c")]
    docs = dataset.documents(rows, "agent-1", "g", HOUR, "tx")
    ids = [dataset.previous_id("agent-1", HOUR, d) for d in docs]
    assert ids == ["agent-1|2026113004|a", "agent-1|2026113004|b", "agent-1|2026113004|c"]
    dataset.with_previous(docs, ids, {"agent-1|2026113004|b": {"_id": "agent-1|2026113004|b", "bytes_stored": 1}})
    assert [d["bytes_stored_growth"] for d in docs] == [None, 999, None]


def test_previous_hour_crosses_midnight():
    row = parse("account_usage", ACCOUNT)
    assert CATALOG["account_usage"].previous_id("a", datetime(2027, 1, 1, 0), row) == "a|2026123123|acct-1"


def api_doc(status, count):
    values = with_value("api_requests", "status", str(status))
    values[3] = str(count)
    return document("api_requests", values)


@pytest.mark.parametrize("rows, expected", [
    ([(200, 90), (500, 10)], 0.1),
    ([(200, 90), (503, 5), (502, 5)], 0.1),
    ([(404, 50), (429, 50)], 0.0),       # client errors are not server errors
    ([(500, 3)], 1.0),
    ([(200, 2), (500, 1)], 0.333333),
    ([(200, 0), (500, 0)], None),        # no requests: no rate
])
def test_error_rate_per_endpoint(rows, expected):
    docs = CATALOG["api_requests"].with_summary([api_doc(s, c) for s, c in rows])
    assert {d["error_rate"] for d in docs} == {expected}


def test_api_row_level_fields():
    doc = api_doc(503, 4)
    assert doc["is_error"] is True and doc["mean_bytes"] == 1024.0
    assert api_doc(200, 0)["mean_bytes"] == 0.0 and api_doc(499, 1)["is_error"] is False


@pytest.mark.parametrize("used, total, expected", [("250", "1000", 25.0), ("0", "0", 0.0), ("1", "3", 33.333)])
def test_disk_used_pct(used, total, expected):
    values = with_value("node_health", "disk_used_bytes", used)
    values[2] = total
    assert document("node_health", values)["disk_used_pct"] == expected


def test_documents_carry_agent_geo_hour_and_transaction():
    doc = document("account_usage", ACCOUNT)
    assert {k: doc[k] for k in ("_id", "agent_id", "geo", "hour", "transaction_id")} == {
        "_id": "agent-1|2026113005|acct-1", "agent_id": "agent-1", "geo": "geo-1", "hour": HOUR,
        "transaction_id": "tx-1"}


# --- document ids ------------------------------------------------------------------------

@pytest.mark.parametrize("dataset, values, expected", [
    ("account_usage", ACCOUNT, "agent-1|2026113005|acct-1"),
    ("api_requests", API, "agent-1|2026113005|GET|/v1/objects|200"),
    ("node_health", NODE, "agent-1|2026113005|node-1|20261130T050100"),
])
def test_document_ids(dataset, values, expected):
    assert document(dataset, values)["_id"] == expected
    assert CATALOG[dataset].document_id("agent-1", HOUR, parse(dataset, values)) == expected


@pytest.mark.parametrize("text", ["2026-11-30T05:01:00", "2026-11-30 05:01:00", "2026-11-30T05:01:00.250",
                                  "2026-11-30T06:01:00+01:00"])
def test_the_same_sample_written_differently_is_the_same_document(text):
    values = with_value("node_health", "sampled_at", text)
    assert document("node_health", values)["_id"] == "agent-1|2026113005|node-1|20261130T050100"


def test_ids_are_deterministic_and_separate_agents_hours_and_keys():
    assert document("account_usage", ACCOUNT) == document("account_usage", ACCOUNT)
    ids = {document("account_usage", ACCOUNT)["_id"], document("account_usage", ACCOUNT, agent_id="agent-2")["_id"],
           document("account_usage", with_value("account_usage", "account_id", "acct-2"))["_id"],
           CATALOG["account_usage"].document_id("agent-1", datetime(2026, 11, 30, 6), parse("account_usage", ACCOUNT))}
    assert len(ids) == 4


def test_status_is_written_canonically_in_the_id():
    assert document("api_requests", with_value("api_requests", "status", "0200"))["_id"].endswith("|200")


def test_to_document_leaves_the_row_alone():
    row = parse("account_usage", ACCOUNT)
    CATALOG["account_usage"].to_document(row, "a", "g", HOUR, "t")
    assert set(row) == set(CATALOG["account_usage"].column_names)


def test_unknown_dataset():
    with pytest.raises(RowError, match="unknown dataset 'nope'"):
        datasets.get("nope")
