"""What the console's pages show, from records and forms: listing filters and pages, a
request's timeline, and the filing form checked field by field.

Nothing here renders HTML or answers HTTP; `routes.py` does that with these values.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

from service.clock import parse_isoformat
from service.collect.filing import InvalidRequest, NewRequest, parse_new_request
from service.errors import InvalidInput
from service.requests.deadline import MAX_EXTENSION_MONTHS
from service.requests.deadline_index import DeadlineIndex
from service.requests.ledger import Ledger
from service.requests.records import STATUSES, AccessRequest, DataRequest, DiscoveryStatus

PAGE_SIZE = 50
SOON_DAYS = 7
# The requests page's views. The first three read the deadline index (requests not yet
# answered, by due date: a LIST and one record read per row); "all" pages through the
# records in id order, which is filing order (ids are ULIDs), oldest first.
VIEWS = {
    "open": "Open, by due date",
    "overdue": "Overdue",
    "soon": f"Due in the next {SOON_DAYS} days",
    "all": "All, by filing time",
}
_ID = r"[0-9A-HJKMNP-TV-Z]{26}"
_CURSORS = {
    "all": re.compile(rf"^{_ID}$"),
    "deadline": re.compile(rf"^\d{{4}}-\d{{2}}-\d{{2}}/({_ID}|~)$"),
}
STATUS_LABELS = {
    "submitting": "Being filed",
    "pending": "Waiting for Copernica",
    "archived": "Archived",
    "failed": "Failed",
    "expired": "Expired",
    "purged": "Deleted",
}
# A source's status, in words (a source can also be gone or unsupported).
SOURCE_LABELS = {
    **STATUS_LABELS,
    "failed": "Refused by Copernica",
    "expired": "Expired: no data in time",
    "gone": "Gone: removed from Copernica",
    "unsupported": "Not offered by Copernica",
}
# What a source's status means for the answer, shown beside its error.
SOURCE_MEANING = {
    "submitting": "Recorded; being filed with Copernica (retried by the poller).",
    "pending": "Filed; waiting for Copernica's data.",
    "archived": "",
    "failed": "Copernica refused this data request; nothing of it is in the package.",
    "expired": "Copernica sent no data before REQUEST_EXPIRY_HOURS; not in the package.",
    "gone": "The record was deleted in Copernica after it was found; nothing to collect.",
    "unsupported": "This account does not offer this data request; the profiles and "
    "subprofiles holding the address are asked instead.",
}
DISCOVERY_LABELS = {
    "off": "Off: the filed subject only",
    "running": "Looking in every database and collection",
    "done": "Done: every database and collection was asked",
    "over_limit": "Stopped at its limit: waits for an operator",
    "retrying": "Copernica is failing: retried with backoff",
}


class FilterError(InvalidInput):
    """A query parameter of the requests page is not one the page offers (`field`)."""

    title = "No such page"


@dataclass(frozen=True)
class Filters:
    view: str = "open"
    status: str = ""
    cursor: str = ""

    @classmethod
    def parse(cls, query: Any) -> Filters:
        view = query.get("view") or "open"
        status = query.get("status") or ""
        cursor = query.get("cursor") or ""
        if view not in VIEWS:
            raise FilterError(f"There is no view {view[:40]!r}.", field="view")
        if status and status not in STATUSES:
            raise FilterError(f"There is no status {status[:40]!r}.", field="status")
        pattern = _CURSORS["all" if view == "all" else "deadline"]
        if cursor and not pattern.match(cursor):
            raise FilterError(
                "The page cursor is not valid; start again from the first page.", field="cursor"
            )
        return cls(view, status, cursor)

    def query(self, **changes: str) -> dict[str, str]:
        """This filter as query parameters, with `changes`; empty ones left out."""
        values = {"view": self.view, "status": self.status, "cursor": self.cursor, **changes}
        return {k: v for k, v in values.items() if v}


@dataclass
class Listing:
    rows: list[Row]
    next_cursor: str | None
    read: int  # records read for this page (before the status filter)
    counts: dict[str, int]  # per status, among the records read


@dataclass(frozen=True)
class Row:
    id: str
    status: str
    subject: str
    received_on: date
    due_by: date
    days_left: int
    overdue: bool
    answered: bool
    created_at: str
    sources: int


async def listing(
    ledger: Ledger, deadlines: DeadlineIndex, filters: Filters, today: date
) -> Listing:
    """One page of the requests page: at most PAGE_SIZE records read, never a scan.

    The status filter applies to the records of the page read, so a page may show fewer
    rows than it read (the ledger keeps no index by status; its own status filter reads
    records until it has a full page, which can mean all of them).
    """
    cursor = filters.cursor
    if filters.view == "all":
        records, next_cursor = await ledger.page(status=None, limit=PAGE_SIZE, cursor=cursor)
    else:
        before = {
            "open": date.max,
            "overdue": today,
            "soon": today + timedelta(days=SOON_DAYS + 1),
        }[filters.view]
        if filters.view == "soon" and not cursor:
            # Start after every marker due before today: "~" sorts after any request id.
            cursor = f"{(today - timedelta(days=1)).isoformat()}/~"
        records, next_cursor = await deadlines.open_by_deadline(
            before, limit=PAGE_SIZE, cursor=cursor
        )
    counts = Counter(str(record.status) for record in records)
    shown = [r for r in records if not filters.status or r.status == filters.status]
    return Listing(
        [row(r, today) for r in shown],
        next_cursor,
        len(records),
        {status: counts[status] for status in STATUSES if counts[status]},
    )


def row(record: AccessRequest, today: date) -> Row:
    deadline = record.deadline
    return Row(
        id=record.id,
        status=record.status,
        subject=subject_label(record),
        received_on=deadline.received_on,
        due_by=deadline.due_by,
        days_left=deadline.days_left(today),
        overdue=deadline.overdue(today),
        answered=record.answered_at is not None,
        created_at=record.created_at,
        sources=len(record.data_requests),
    )


def subject_label(record: AccessRequest) -> str:
    if record.status == "purged":
        return "deleted"
    subject = record.subject
    if subject.type == "email":
        return subject.id
    return f"{subject.type} {subject.id}"


# -- one request -------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One line of a request's timeline."""

    title: str
    at: str | None = None  # ISO time; None for what is still to come
    detail: str = ""
    tone: str = "done"  # done | next | problem


def timeline(record: AccessRequest) -> list[Step]:
    """What happened to the request, oldest first, from what its record keeps; then what
    comes next, if anything."""
    steps: list[Step] = []
    first = record.first
    filed = f"{first.attempts} attempt{'s' if first.attempts != 1 else ''}"
    if first.copernica_id:
        filed += f"; Copernica id {first.copernica_id}"
    steps.append(Step("Filed with Copernica", record.created_at, filed))
    for extension in record.extension.history if record.extension else ():
        months = extension.months
        steps.append(
            Step(
                f"Deadline extended by {months} month{'s' if months != 1 else ''}",
                extension.at,
                extension.reason,
            )
        )
    archive = first.archive
    if archive:
        way = {"callback": "Copernica's callback", "poll": "polling Copernica"}.get(
            str(archive.source), str(archive.source or "unknown")
        )
        steps.append(
            Step(
                f"Data received by {way} and archived",
                archive.received_at or None,
                _stored(archive.size, archive.sha256),
            )
        )
    if record.package:
        package = record.package
        steps.append(
            Step(
                "Access package built",
                package.built_at,
                _stored(package.size, package.sha256),
            )
        )
    if record.answered_at:
        steps.append(Step("Package handed out (first download or link)", record.answered_at, ""))
    if record.purged_at:
        steps.append(Step("Stored data deleted (retention period over)", record.purged_at, ""))
    if record.status in ("failed", "expired"):
        title = "Copernica refused the request" if record.status == "failed" else "Expired"
        steps.append(Step(title, record.updated_at, first.last_error or "", "problem"))
    steps.sort(key=lambda s: s.at or "")
    steps += _next_steps(record)
    return steps


def _next_steps(record: AccessRequest) -> list[Step]:
    first = record.first
    discovery = record.discovery
    if discovery.status is DiscoveryStatus.OVER_LIMIT:
        detail = f"{discovery.matches} found; raise the limit under Sources to go on"
        return [Step("Discovery stopped at its limit", None, detail, "problem")]
    if not discovery.finished and record.status != "purged":
        detail = f"last error: {discovery.last_error}" if discovery.last_error else ""
        return [Step("Looking for the person in every database", None, detail, "next")]
    if record.status == "submitting":
        detail = f"last error: {first.last_error}" if first.last_error else ""
        return [Step("Being filed with Copernica; retried by the poller", None, detail, "next")]
    if record.status == "pending":
        detail = f"next check {time_text(record.next_poll_at)}" if record.next_poll_at else ""
        if first.last_error:
            detail += f"; last error: {first.last_error}"
        events = first.events
        if events and not events.complete:
            detail += f"; events: {events.stored} of {events.windows} months"
        return [Step("Waiting for Copernica's data", None, detail.strip("; "), "next")]
    if record.needs_package:
        detail = f"last error: {first.last_error}" if first.last_error else ""
        return [Step("Building the access package", None, detail, "next")]
    if record.package and not record.answered_at and record.status != "purged":
        return [Step("Hand the package to the data subject", None, "", "next")]
    return []


@dataclass(frozen=True)
class SourceView:
    """One source as the Sources card shows it: no raw address (the address's own source
    is "The address itself"), where it was found, its status and its error in words."""

    name: str
    found_in: str
    status: str
    label: str
    meaning: str
    error: str
    data_size: int | None
    details_size: int | None
    copernica_id: str | None


def sources(record: AccessRequest) -> list[SourceView]:
    return [_source_view(d, n == 0) for n, d in enumerate(record.data_requests)]


def _source_view(data: DataRequest, first: bool) -> SourceView:
    if data.subject_type == "email":
        name = "The address itself"
    elif data.subject_id.startswith("hmac-sha256:"):  # purged: the id is gone too
        name = f"{data.subject_type.capitalize()} (deleted)"
    else:
        name = f"{data.subject_type.capitalize()} {data.subject_id}"
        if data.profile:
            name += f" (of profile {data.profile})"
    if data.collection is not None:
        found_in = f"Collection {data.collection.name}"
        if data.database is not None:
            found_in += f" in {data.database.name}"
    elif data.database is not None:
        found_in = f"Database {data.database.name}"
    else:
        found_in = "As filed" if first else "—"
    status = str(data.status)
    return SourceView(
        name=name,
        found_in=found_in,
        status=status,
        label=SOURCE_LABELS.get(status, status),
        meaning=SOURCE_MEANING.get(status, ""),
        error=data.last_error or "",
        data_size=data.archive.size if data.archive else None,
        details_size=data.details.size if data.details else None,
        copernica_id=data.copernica_id,
    )


def discovery_limit(record: AccessRequest, default: int) -> int:
    """The number of sources discovery may find for this request."""
    return record.discovery.max_sources or default


def _stored(size: int, sha256: str | None) -> str:
    """Size and the start of the sha256 (the page shows it in full beside the timeline)."""
    return f"{size_text(size)}, sha256 {sha256[:12] if sha256 else '?'}…"


def extension_months_left(record: AccessRequest) -> int:
    if record.answered_at or record.status == "purged":
        return 0
    return MAX_EXTENSION_MONTHS - record.deadline.extended_months


def size_text(size: int) -> str:
    """Bytes for people: 532 bytes, 14.2 KB, 3.1 MB (decimal units, as file managers show)."""
    if size < 1000:
        return f"{size} bytes"
    for unit in ("KB", "MB", "GB", "TB"):
        size_f = size / 1000
        if size_f < 1000 or unit == "TB":
            return f"{size_f:.1f} {unit}"
        size = int(size_f)
    raise AssertionError("unreachable")


def time_text(iso: str | None) -> str:
    """`2026-05-10T14:03:07.123456Z` -> `2026-05-10 14:03 UTC`."""
    if not iso:
        return ""
    try:
        return parse_isoformat(iso).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return iso


# -- the filing form ---------------------------------------------------------------------

SUBJECT_KINDS = {"email": "E-mail address", "profile": "Profile id", "subprofile": "Subprofile id"}
# The form field beside which an input error of `parse_new_request` is shown, by its `field`.
_FORM_FIELDS = {
    **{kind: "subject" for kind in SUBJECT_KINDS},
    "received_on": "received_on",
    "events": "events_since",
    "events.since": "events_since",
    "events.until": "events_until",
}
_PLACEHOLDER = {"profile": 1}  # a valid subject, to check the other fields on their own


@dataclass
class FilingForm:
    """The filing form as sent, and what is wrong with it, by field name."""

    values: dict[str, str]
    errors: dict[str, str] = field(default_factory=dict)

    @classmethod
    def blank(cls, today: date, discover: bool) -> FilingForm:
        """An empty form; `discover` (DISCOVERY) ticks "look in every database"."""
        values = {"subject_type": "email", "received_on": today.isoformat()}
        return cls({**values, "discover": "on" if discover else ""})

    @classmethod
    def read(cls, form: Any) -> FilingForm:
        """The form as sent; an unticked box sends nothing, so `discover` is "" then."""
        names = ("subject_type", "subject", "received_on", "events_since", "events_until")
        values = {name: str(form.get(name, "")).strip() for name in names}
        return cls({**values, "discover": "on" if form.get("discover") == "on" else ""})

    def check(self) -> NewRequest | None:
        """The request to file, or None with `errors` filled in beside each field.

        The rules are `parse_new_request`'s (the API's); each field is checked on its own
        so that every wrong field is marked at once, not only the first."""
        v = self.values
        kind, subject = v["subject_type"], v["subject"]
        body: dict[str, Any] = {}
        if kind not in SUBJECT_KINDS:
            self.errors["subject_type"] = "Choose e-mail address, profile or subprofile."
        elif not subject:
            self.errors["subject"] = f"Give the {SUBJECT_KINDS[kind].lower()}."
        else:
            body[kind] = subject
            self._try("subject", {kind: subject})
        body["discover"] = v.get("discover") == "on"
        if v["received_on"]:
            body["received_on"] = v["received_on"]
            self._try("received_on", {**_PLACEHOLDER, "received_on": v["received_on"]})
        if v["events_since"] or v["events_until"]:
            events = {"since": v["events_since"]}
            if v["events_until"]:
                events["until"] = v["events_until"]
            body["events"] = events
            if not v["events_since"]:
                self.errors["events_since"] = "Give the first day of events to include."
            else:
                self._try("events_since", {**_PLACEHOLDER, "events": events})
        if self.errors:
            return None
        try:
            return parse_new_request(body)
        except InvalidRequest as exc:  # fields fine alone but not together (none today)
            self.errors["form"] = str(exc)
            return None

    def _try(self, name: str, body: dict[str, Any]) -> None:
        """Check `body` (one field's value, beside a valid placeholder); an error goes
        beside the field it names (`InvalidInput.field`), else beside `name`."""
        try:
            parse_new_request(body)
        except InvalidRequest as exc:
            self.errors[_FORM_FIELDS.get(exc.field or "", name)] = exc.message
