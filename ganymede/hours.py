"""UTC hours. A naive datetime always means UTC (as Luigi's DateHourParameter and pymongo hand them out);
`utc()` is the one place aware values are folded to that convention."""
from datetime import datetime, timedelta, timezone

from .errors import HourError

HOUR_FORMAT = "%Y-%m-%dT%H"


def utc(value):
    return value if value.tzinfo is None else value.astimezone(timezone.utc).replace(tzinfo=None)


def now():
    return utc(datetime.now(timezone.utc))


def floor_hour(value):
    return utc(value).replace(minute=0, second=0, microsecond=0)


def parse_hour(text):
    """'2026-11-30T05' (also with ':00' minutes or a trailing 'Z') -> naive UTC datetime."""
    cleaned = str(text).strip().rstrip("Z")
    for fmt in (HOUR_FORMAT, "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"):
        try:
            value = datetime.strptime(cleaned, fmt)
        except ValueError:
            continue
        if value.minute or value.second:
            raise HourError(f"not on the hour: {text!r}")
        return value
    raise HourError(f"not a UTC hour (expected YYYY-MM-DDTHH): {text!r}")


def format_hour(value):
    return floor_hour(value).strftime(HOUR_FORMAT)


def compact(value):
    """2026113005: the hour as used in file and bucket names."""
    return floor_hour(value).strftime("%Y%m%d%H")


def last_complete_hour(at=None):
    return floor_hour(at or now()) - timedelta(hours=1)


def window(hour):
    start = floor_hour(hour)
    return start, start + timedelta(hours=1)


def deadline(hour, minutes):
    """When an hour's extract stops waiting for missing agents."""
    return floor_hour(hour) + timedelta(hours=1, minutes=minutes)


def hours_between(first, last):
    """Every hour from first to last, inclusive."""
    hour, last = floor_hour(first), floor_hour(last)
    while hour <= last:
        yield hour
        hour += timedelta(hours=1)
