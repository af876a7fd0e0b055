"""The one clock: where the service reads the time, and how times are written down.

Components that decide by the time (leases, schedules, deadlines, retention) take a `Clock`,
so tests set the time instead of waiting for it. Times in records and S3 metadata are UTC,
written `2026-12-07T00:37:34.123456Z` (`isoformat`), which sorts like the time itself.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


class Clock:
    """The system clock (UTC). Tests pass a `FixedClock` or a subclass of their own."""

    def now(self) -> datetime:
        return datetime.now(UTC)


class FixedClock(Clock):
    """A clock that stands still until moved: for tests and for replaying a decision."""

    def __init__(self, moment: datetime) -> None:
        self.moment = moment

    def now(self) -> datetime:
        return self.moment

    def advance(self, by: timedelta) -> None:
        self.moment += by


SYSTEM = Clock()


def utcnow() -> datetime:
    """The system clock's time, for code that has no `Clock` of its own (logs, the CLI)."""
    return SYSTEM.now()


def isoformat(moment: datetime) -> str:
    return moment.strftime(_FORMAT)


def parse_isoformat(text: str) -> datetime:
    return datetime.strptime(text, _FORMAT).replace(tzinfo=UTC)
