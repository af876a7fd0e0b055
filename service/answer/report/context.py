"""What the report says about the access request itself, beside what the data holds."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

from service.answer.statement import DEFAULT_STATEMENT, Statement


@dataclass(frozen=True, slots=True)
class SourceFact:
    """One source of the access request, as the report names it (never its address)."""

    source: str  # email | profile:{id} | subprofile:{id}
    kind: str  # email | profile | subprofile
    id: str  # the profile's or subprofile's number; "" for the address
    status: str  # archived | gone | unsupported | failed | expired
    database: str | None = None  # the database's name (a subprofile's: its collection's)
    collection: str | None = None  # a subprofile's collection's name
    profile: str | None = None  # a subprofile's profile number
    found_by: str | None = None  # the field that held the address


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
    # Every source, the filed subject first; empty: the filed subject alone, as before sources.
    sources: tuple[SourceFact, ...] = ()
    statement: Statement = DEFAULT_STATEMENT
    language: str = "en"  # of the article-15 block: en | nl
