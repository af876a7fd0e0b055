"""Copernica's events: month-window planning, the nine endpoint kinds, and normalisation.

The seed document (REST API v1, GET events) gives the window rules, with dates as UTC days
and `end` exclusive: `start` alone gives one month from `start`; `end` alone the month
before `end`; both more than a month apart give one month from `start` and `end` is
ignored. So a range is only answered completely in pieces of at most one month: `plan`
cuts any `[since, until)` into such windows. Copernica says the limit "may change if
performance requires it": it is `WINDOW_MONTHS`, here and nowhere else.
"""

from __future__ import annotations

import calendar
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from typing import Any
from urllib.parse import quote

from service.errors import InvalidInput

WINDOW_MONTHS = 1

# Endpoint kind -> does its id name an e-mail address (else a number, or tags)?
KINDS = (
    "message",
    "old/message",
    "email",
    "tags",
    "profile",
    "subprofile",
    "template",
    "old/template",
    "old/document",
)


class EventsInputError(InvalidInput):
    """Bad dates, an empty or reversed range, an unknown kind: nothing is fetched."""


def add_months(day: date, months: int) -> date:
    """`day` moved by whole months, clamped to the month's end (Jan 31 + 1 = Feb 28/29)."""
    index = day.year * 12 + day.month - 1 + months
    year, month = divmod(index, 12)
    last = calendar.monthrange(year, month + 1)[1]
    return date(year, month + 1, min(day.day, last))


def window_limit(start: date) -> date:
    """The latest exclusive end Copernica honours for a window starting at `start`."""
    return add_months(start, WINDOW_MONTHS)


@dataclass(frozen=True, order=True)
class Window:
    start: date
    end: date  # exclusive

    @property
    def name(self) -> str:
        return self.start.isoformat()


def plan(since: date, until: date) -> list[Window]:
    """Windows covering `[since, until)` exactly, in order, each within Copernica's limit."""
    if until <= since:
        raise EventsInputError(f"until ({until}) must be after since ({since})", field="until")
    windows = []
    start = since
    while start < until:
        end = min(until, window_limit(start))
        windows.append(Window(start, end))
        start = end
    return windows


def parse_day(text: str, name: str) -> date:
    try:
        return date.fromisoformat(text)
    except (TypeError, ValueError):
        raise EventsInputError(
            f"{name} must be a date as YYYY-MM-DD, got {text!r}", field=name
        ) from None


@dataclass(frozen=True)
class Source:
    """Whose events: one of the nine endpoint kinds and its id (address, number or tags)."""

    kind: str
    id: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise EventsInputError(
                f"unknown events kind {self.kind!r}; one of {', '.join(KINDS)}", field="kind"
            )
        if self.kind == "email":
            if "@" not in self.id or any(c.isspace() for c in self.id):
                raise EventsInputError("email must be an e-mail address", field="email")
        elif self.kind == "tags":
            if not [t for t in self.id.split(";") if t.strip()]:
                raise EventsInputError("tags must name at least one tag", field="tags")
        elif not self.id.isdigit() or int(self.id) <= 0:
            raise EventsInputError(f"{self.kind} id must be a positive integer", field=self.kind)

    @property
    def path(self) -> str:
        """The URL path: e-mail percent-encoded (`@` kept), tags encoded one by one and
        joined by literal semicolons, as the seed's `tags/$tag1;$tag2/events`."""
        if self.kind == "email":
            ident = quote(self.id, safe="@")
        elif self.kind == "tags":
            ident = ";".join(quote(t.strip(), safe="") for t in self.id.split(";") if t.strip())
        else:
            ident = self.id
        return f"{self.kind}/{ident}/events"


def normalise(item: Any) -> dict[str, Any]:
    """One event as `{"event", "time", "data"}`, from the documented `{event, data}` shape or
    from a flat object; unknown event types are kept as they are."""
    if not isinstance(item, dict):
        return {"event": "unknown", "time": None, "data": {"value": item}}
    if isinstance(item.get("data"), dict) and ("event" in item or "type" in item):
        data = item["data"]
        event = item.get("event", item.get("type"))
        when = item.get("time", data.get("time", data.get("timestamp")))
        return {"event": event, "time": when, "data": data}
    data = {k: v for k, v in item.items() if k not in ("event", "type")}
    event = item.get("event", item.get("type", "unknown"))
    return {"event": event, "time": item.get("time", item.get("timestamp")), "data": data}


def normalised(answer: Any) -> Iterator[dict[str, Any]]:
    """Every event of one answer; an object wrapping a list (`{"data": [...]}`) is unwrapped."""
    if isinstance(answer, dict):
        for key in ("events", "data", "items"):
            if isinstance(answer.get(key), list):
                answer = answer[key]
                break
        else:
            answer = [answer]
    if not isinstance(answer, list):
        raise ValueError("events answer is not a JSON array")
    for item in answer:
        yield normalise(item)
