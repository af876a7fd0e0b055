"""The legal deadline of an access request (GDPR art. 12(3)).

A controller answers "without undue delay and in any event within one month of receipt of the
request"; the period "may be extended by two further months where necessary", with reasons.
So `due_by` = `received_on` + 1 month (+ the months extended), a calendar month clamped to the
month's end (2026-01-31 -> 2026-02-28), and never more than two months of extension in all.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from service.copernica.events import add_months
from service.errors import Conflict, InvalidInput

BASE_MONTHS = 1
MAX_EXTENSION_MONTHS = 2
MAX_REASON_CHARS = 2000
# A day of receipt further back than this is almost surely a typo (1926 for 2026).
MAX_RECEIVED_AGE_DAYS = 366


class DeadlineInputError(InvalidInput):
    """Bad input for a deadline (a day in the future, an unknown month count, no reason)."""


class ExtensionRefused(Conflict):
    """The extension would exceed two months in all; the message says how much is left."""


def due_by(received_on: date, extended_months: int = 0) -> date:
    return add_months(received_on, BASE_MONTHS + extended_months)


def parse_received_on(value: Any, today: date) -> date:
    """`received_on` as given by an operator: a `YYYY-MM-DD` day, not after today (UTC)."""
    if not isinstance(value, str):
        raise DeadlineInputError("'received_on' must be a day as YYYY-MM-DD", field="received_on")
    try:
        day = date.fromisoformat(value)
    except ValueError:
        raise DeadlineInputError(
            f"'received_on' must be a day as YYYY-MM-DD, got {value[:40]!r}", field="received_on"
        ) from None
    if len(value) != 10:
        raise DeadlineInputError("'received_on' must be a day as YYYY-MM-DD", field="received_on")
    if day > today:
        raise DeadlineInputError(
            f"'received_on' is in the future ({day} > today, {today})", field="received_on"
        )
    if day < today - timedelta(days=MAX_RECEIVED_AGE_DAYS):
        raise DeadlineInputError(
            f"'received_on' is more than {MAX_RECEIVED_AGE_DAYS} days ago ({day}); check the year",
            field="received_on",
        )
    return day


def parse_extension(body: Any) -> tuple[int, str]:
    """`{"months": 1|2, "reason": "..."}` -> (months, reason)."""
    if not isinstance(body, dict):
        raise DeadlineInputError('body must be {"months": 1 or 2, "reason": "..."}')
    unknown = set(body) - {"months", "reason"}
    if unknown:
        raise DeadlineInputError(f"unknown member(s): {', '.join(sorted(unknown))}")
    months = body.get("months")
    if isinstance(months, bool) or months not in (1, 2):
        raise DeadlineInputError("'months' must be 1 or 2", field="months")
    reason = body.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise DeadlineInputError(
            "'reason' is required: say why the extension is necessary", field="reason"
        )
    if len(reason) > MAX_REASON_CHARS:
        raise DeadlineInputError(
            f"'reason' must be at most {MAX_REASON_CHARS} characters", field="reason"
        )
    return int(months), reason.strip()


@dataclass(frozen=True)
class Deadline:
    """Where a request stands against its deadline on a given day."""

    received_on: date
    extended_months: int
    answered: bool

    @property
    def due_by(self) -> date:
        return due_by(self.received_on, self.extended_months)

    def days_left(self, today: date) -> int:
        """Days until `due_by` (0 on the day itself, negative when late)."""
        return (self.due_by - today).days

    def overdue(self, today: date) -> bool:
        """`due_by` has passed and the package was not handed out."""
        return not self.answered and today > self.due_by

    def extend(self, months: int) -> int:
        """The months extended in all after adding `months`; ExtensionRefused beyond two."""
        total = self.extended_months + months
        if total > MAX_EXTENSION_MONTHS:
            left = MAX_EXTENSION_MONTHS - self.extended_months
            raise ExtensionRefused(
                f"a deadline may be extended by {MAX_EXTENSION_MONTHS} months in all; "
                f"{self.extended_months} used, {left} left"
            )
        return total
