"""What the archive and the events hold: every item counted in full (per kind, per month),
and kept in capped form (messages, table rows) within the report's text budget. The report
never drops a record, it only cuts what it shows."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from typing import Any

from service.answer.report.caps import (
    EVENT_KIND_CAP,
    GROUP_CAP,
    MESSAGE_CAP,
    ROW_CAP,
    TEXT_BUDGET,
)
from service.answer.report.cells import cell, clean, cut, describe
from service.answer.report.classify import kind_of, message_in, section_of
from service.answer.report.dates import month_of, month_of_moment, time_of
from service.answer.report.mime import (
    Message,
    decode_header,
    mime_head,
    raw_date_and_subject,
    read_message,
)
from service.answer.report.tables import Table

_COUNTER = {"open": "opens", "click": "clicks", "survey": "surveys"}
_MESSAGE_ID = re.compile(r"^message-id[ \t]*:[ \t]*([^\r\n]+)", re.IGNORECASE | re.MULTILINE)


class Findings:
    """Takes items (`item`) and event windows (`add_events`); its fields are what was found."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()  # messages, opens, clicks, surveys, other
        self.months: dict[str, Counter[str]] = {}  # "YYYY-MM" -> counts per chart series
        self.undated: Counter[str] = Counter()
        self.messages: list[Message] = []
        self.tables: dict[str, Table] = {
            "open": Table(
                "Opens",
                "Each time a message was opened and its images were loaded.",
                sort_by_time=True,
            ),
            "click": Table("Clicks", "Each link followed in a message.", sort_by_time=True),
            "survey": Table("Survey answers", "Surveys and forms you filled in."),
        }
        self.others: dict[Any, Table] = {}
        self.event_types: Counter[str] = Counter()
        self.event_table = Table("Events", "Every event, in the order they were recorded.")
        self.budget_hit = False
        self._chars = 0
        self._group_subject: str | None = None  # of the last message in the current array
        self._group_subject_raw = False  # True: still RFC 2047 encoded
        # Across sources (`next_source`): identities of the earlier sources' items, and of
        # the current one's; an item an earlier source had is not counted again.
        self._earlier: set[bytes] = set()
        self._current: set[bytes] = set()
        self._check = False
        self._remember = False

    def next_source(self, *, check: bool, record: bool) -> None:
        """Another source's data begins. `check`: skip items an earlier source had (a message
        is known by its Message-ID, else its text; anything else by its content); `record`:
        remember this source's items for the sources after it. Items repeated within one
        source are counted as they are, as with one source."""
        self._earlier |= self._current
        self._current = set()
        self._check, self._remember = check, record
        self._group_subject = None

    def item(self, value: Any) -> None:
        """One item of `data`, whatever it is."""
        if self._check or self._remember:
            identity, head = _identity(value)
            if self._check and identity in self._earlier:
                if head is not None:  # what follows it in its array belongs to it
                    _, self._group_subject = raw_date_and_subject(head)
                    self._group_subject_raw = True
                return
            if self._remember:
                self._current.add(identity)
        head = mime_head(value) if isinstance(value, str) else None
        if head is not None:
            self._message(value, head, {})
        elif isinstance(value, dict):
            self._record(value)
        else:
            self._other_value(value)

    def group_edge(self) -> None:
        """An array starts or ends: opens and clicks after it belong to no message before."""
        self._group_subject = None

    def add_events(self, events: list[dict[str, Any]]) -> None:
        """One month window of normalised events ({"event", "time", "data"})."""
        table = self.event_table
        for event in events:
            if isinstance(event, dict):
                kind = event.get("event")
                data = event.get("data")
                when = event.get("time")
                if when is None and isinstance(data, dict):
                    when = data.get("time")
            else:
                kind, data, when = None, event, None
            kind = cut(clean(kind.strip()), 100) if isinstance(kind, str) else ""
            if not kind:
                kind = "unknown"
            elif kind not in self.event_types and len(self.event_types) >= EVENT_KIND_CAP:
                kind = "(other kinds)"
            self.event_types[kind] += 1
            self._count("events", month_of(when))
            table.total += 1
            if len(table.rows) < ROW_CAP and self._room():
                details = (
                    {k: v for k, v in data.items() if k != "time"}
                    if isinstance(data, dict)
                    else data
                )
                row = {"When": cell(when), "Type": cell(kind), "Details": describe(details)}
                self._chars += table.add(row)

    def _record(self, record: dict[str, Any]) -> None:
        kind_field, kind = kind_of(record)
        section = section_of(kind)
        if section is not None:
            self._activity(section, record, kind_field)
            return
        found = message_in(record)
        if found is not None:
            key, text, head = found
            self._message(text, head, {k: v for k, v in record.items() if k != key})
            return
        self._other(record, kind_field, kind)

    def _message(self, text: str, head: str, details: dict[str, Any]) -> None:
        self.counts["messages"] += 1
        month: str | None
        if len(self.messages) < MESSAGE_CAP and self._room():
            message = read_message(text, details)
            self.messages.append(message)
            self._chars += message.chars()
            self._group_subject, self._group_subject_raw = message.subject, False
            month = month_of_moment(message.sent)
        else:  # counted and dated only, from its raw headers: fast for any number
            sent, self._group_subject = raw_date_and_subject(head)
            self._group_subject_raw = True
            month = month_of_moment(sent)
        if month is None:
            month = month_of(time_of(details))
        self._count("messages", month)

    def _activity(self, section: str, record: dict[str, Any], kind_field: str | None) -> None:
        counter = _COUNTER[section]
        self.counts[counter] += 1
        if section != "survey":
            self._count(counter, month_of(time_of(record)))
        table = self.tables[section]
        table.total += 1
        if len(table.rows) < ROW_CAP and self._room():
            row = {key: cell(value) for key, value in record.items() if key != kind_field}
            if self._group_subject is not None and "message" not in row:
                row["message"] = cell(self._subject_of_group())
            self._chars += table.add(row)

    def _other(self, record: dict[str, Any], kind_field: str | None, kind: str | None) -> None:
        self.counts["other"] += 1
        if kind_field is not None and kind is not None:
            key: Any = ("kind", kind.lower())
            title, intro = f"Records of type “{cut(clean(kind), 100)}”", ""
            record = {k: v for k, v in record.items() if k != kind_field}
        else:
            key = ("fields", frozenset(record))
            names = ", ".join(cut(clean(name), 60) for name in list(record)[:8])
            names += ", …" if len(record) > 8 else ""
            title, intro = "Records", f"Records with the fields: {names}."
        table = self.others.get(key)
        if table is None:
            if len(self.others) >= GROUP_CAP:
                key = ("overflow",)
                table = self.others.get(key)
                record = {"record": record}
                if table is None:
                    table = self.others[key] = Table(
                        "Records of other shapes", "Shown whole, as they are in data.json."
                    )
            else:
                table = self.others[key] = Table(title, intro)
        table.total += 1
        if len(table.rows) < ROW_CAP and self._room():
            self._chars += table.add({k: cell(v) for k, v in record.items()})

    def _other_value(self, value: Any) -> None:
        self.counts["other"] += 1
        key = ("values",)
        table = self.others.get(key)
        if table is None:
            table = self.others[key] = Table(
                "Single values", "Values found on their own, not inside a record."
            )
        table.total += 1
        if len(table.rows) < ROW_CAP and self._room():
            self._chars += table.add({"value": cell(value)})

    def _subject_of_group(self) -> str:
        if self._group_subject_raw and self._group_subject is not None:
            self._group_subject = decode_header("subject", self._group_subject)
            self._group_subject_raw = False
        return self._group_subject or "(no subject)"

    def _count(self, series: str, month: str | None) -> None:
        if month is None:
            self.undated[series] += 1
        else:
            counts = self.months.get(month)
            if counts is None:
                counts = self.months[month] = Counter()
            counts[series] += 1

    def _room(self) -> bool:
        if self._chars < TEXT_BUDGET:
            return True
        self.budget_hit = True
        return False


def _identity(value: Any) -> tuple[bytes, str | None]:
    """A stable identity of an item across sources, and its message's header block if it is
    or holds a message."""
    head = mime_head(value) if isinstance(value, str) else None
    text = value if head is not None else None
    if head is None and isinstance(value, dict):
        found = message_in(value)
        if found is not None:
            _, text, head = found
    if head is not None and text is not None:
        found_id = _MESSAGE_ID.search(head)
        if found_id is not None:
            return b"m" + _digest(found_id.group(1).strip().lower()), head
        return b"t" + _digest(text), head
    return b"v" + _digest(json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)), None


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=16).digest()
