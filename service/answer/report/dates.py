"""Times as Copernica writes them read into months and moments, and dates written in words
for the reader ("20 June 2026")."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from typing import Any

MONTH_NAMES = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_TIME_FIELDS = ("time", "timestamp", "date", "datetime", "created", "moment")
_MONTH = re.compile(r"\s*(\d{4})-(\d{2})")


def time_of(record: dict[str, Any]) -> Any:
    """The value of a record's first field that names a time, as it is (None: none)."""
    for name in _TIME_FIELDS:
        if name in record:
            return record[name]
    return None


def month_of(value: Any) -> str | None:
    """The month ("YYYY-MM") of a time as Copernica writes it, or of a Unix time."""
    if isinstance(value, str):
        found = _MONTH.match(value)
        if found and "01" <= found.group(2) <= "12":
            return f"{found.group(1)}-{found.group(2)}"
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 1e10:
        return month_of_moment(datetime.fromtimestamp(value, UTC))
    return None


def month_of_moment(moment: datetime | None) -> str | None:
    return None if moment is None else f"{moment.year:04d}-{moment.month:02d}"


def parse_time(value: Any) -> datetime | None:
    """An ISO 8601 text or a Unix time as a UTC moment (no zone: UTC)."""
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 1e10:
        return datetime.fromtimestamp(value, UTC)
    return None


def day_text(day: date) -> str:
    return f"{day.day} {MONTH_NAMES[day.month - 1]} {day.year}"


def moment_text(moment: datetime) -> str:
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return f"{day_text(moment.date())}, {moment:%H:%M} UTC"


def month_text(month: str) -> str:
    """The month "2026-06" as "June 2026"."""
    year, number = month.split("-")
    return f"{MONTH_NAMES[int(number) - 1]} {year}"


def last_day(until: date) -> date:
    """The last day of a range that ends before `until`."""
    return date.fromordinal(until.toordinal() - 1)
