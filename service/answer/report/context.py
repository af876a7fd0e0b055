"""What the report says about the access request itself, beside what the data holds."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime


@dataclass(frozen=True)
class ReportContext:
    """The request's facts, as the package builder knows them."""

    request_id: str
    subject_type: str  # "email" | "profile" | "subprofile"
    subject_label: str  # e.g. "alice@example.com" or "profile 123" (shown as "about")
    controller: str | None  # REPORT_CONTROLLER_NAME; None: described, not named
    received_on: date
    due_by: date
    generated_at: datetime  # UTC
    events_range: tuple[date, date] | None  # [since, until) when events were asked
