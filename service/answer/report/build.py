"""The data subject's report: one self-contained HTML page saying, in plain words, what an
access request found (SPEC "Answering the access request").

The input is the archive's exact bytes, fed in chunks, and the archive can be hundreds of MB
with single messages of a MiB or more, so nothing here holds it whole: ijson's push parser
turns the bytes into events, and only one item (an element of an inner array of `data`) is
built at a time. Each item is counted at once and then kept in a small, capped form (a
message's headers and excerpt, a table row of cut cells), so memory stays bounded and the
counts and the chart still cover everything.

Copernica documents `data` only as "an array of arrays with all the info we have found:
complete MIMEs that were sent, opens and clicks information, completed surveys, etc." The
shapes are not documented, so every value is recognised by what it looks like, never by its
place, and whatever is not recognised is shown as a generic table: the report never drops
a record, it only cuts what it shows, and says so, pointing to data.json.
"""

from __future__ import annotations

import base64
import binascii
import email.header
import email.policy
import email.utils
import functools
import json
import quopri
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from email.message import Message
from email.parser import Parser
from html.parser import HTMLParser
from typing import Any

import ijson
import jinja2

try:  # yajl in C, not the pure-Python backend ijson falls back to
    _IJSON: Any = ijson.get_backend("yajl2_c")
except ImportError:  # pragma: no cover - the wheel ships it on every platform we run on
    _IJSON = ijson  # ijson itself picks the best backend available

MESSAGE_CAP = 2_000  # messages shown in detail
ROW_CAP = 5_000  # rows per table
GROUP_CAP = 50  # tables of other records; beyond, one table of "other shapes"
COLUMN_CAP = 40  # columns per table; the last one holds any further fields
CELL_CHARS = 500  # a cell longer than this is cut, with an ellipsis
EXCERPT_CHARS = 400  # text shown per message
TEXT_BUDGET = 16 * 1024 * 1024  # characters kept for all tables together
MIME_PREFIX = 64 * 1024  # a message is read this far: headers and text come before attachments
BODY_PREFIX = 32 * 1024  # of one text part, enough for an excerpt behind an HTML <head>
FEED_BLOCK = 2 * 1024 * 1024  # bytes handed to yajl at once, at least (see ReportBuilder.feed)
MAX_TOKEN = 64 * 1024 * 1024  # one JSON value may not be longer (yajl holds it whole)
ITEM_DEPTH = 32  # nesting kept inside one item
ITEM_ENTRIES = 1_000  # members or elements kept per object or array inside one item
ITEM_CHARS = 4 * 1024 * 1024  # characters kept per item
HEADER_CHARS = 2_000  # of one header, decoded and shown
EVENT_KIND_CAP = 100  # event types counted apart; any further ones are counted together
GROUP_DEPTH = 16  # arrays inside `data` descended into before an array is an item itself

_DEFAULT = email.policy.default
_MIME_PARSER = Parser(policy=email.policy.compat32)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_SPACE = re.compile(r"\s+")
_MONTH = re.compile(r"\s*(\d{4})-(\d{2})")
_HEADER_LINE = re.compile(r"[!-9;-~]{1,76}:")
_KNOWN_HEADER = re.compile(
    r"^(?:from|to|subject|date|mime-version|content-type|message-id|received|return-path)"
    r"[ \t]*:",
    re.IGNORECASE | re.MULTILINE,
)
_DATE_HEADER = re.compile(r"^date[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE | re.MULTILINE)
_SUBJECT_HEADER = re.compile(
    r"^subject[ \t]*:[ \t]*([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)", re.IGNORECASE | re.MULTILINE
)
_MORE = "\x00more"  # the column that holds a row's fields beyond COLUMN_CAP
_KIND_FIELDS = ("type", "event", "kind", "action")
_TIME_FIELDS = ("time", "timestamp", "date", "datetime", "created", "moment")
_OPEN = frozenset({"open", "opens", "opened", "impression", "impressions", "view"})
_CLICK = frozenset({"click", "clicks", "clicked"})
_SURVEY = frozenset({"survey", "surveys", "form", "forms", "answer", "answers"})
_STARTS = frozenset({"start_map", "start_array"})
_ENDS = frozenset({"end_map", "end_array"})

# Friendly column titles for keys Copernica is known to use; others keep their own name.
_COLUMN_TITLES = {
    "time": "When",
    "timestamp": "When",
    "ip": "IP address",
    "useragent": "Device or e-mail program",
    "user_agent": "Device or e-mail program",
    "url": "Link",
    "survey": "Survey",
    "answers": "Answers",
    "country": "Country",
    "city": "City",
    "message": "Message",
    _MORE: "Other fields",
}
# Event types Copernica documents, in its order, with what each means to the reader.
EVENT_TYPES = {
    "attempt": ("Delivery attempts", "a mail server tried to deliver a message to you"),
    "delivery": ("Deliveries", "a message reached your mailbox's server"),
    "open": ("Opens", "a message was opened (its images were loaded)"),
    "click": ("Clicks", "a link in a message was followed"),
    "error": ("Delivery errors", "a message could not be delivered"),
    "retry": ("Retries", "delivery was tried again later"),
    "abuse": ("Complaints", "a message was reported as unwanted"),
    "unsubscribe": ("Unsubscribes", "you unsubscribed from a mailing list"),
}
SERIES = (
    ("messages", "Messages sent"),
    ("opens", "Opens"),
    ("clicks", "Clicks"),
    ("events", "Events"),
)

_ENVIRONMENT = jinja2.Environment(
    loader=jinja2.PackageLoader("service.answer.report", "templates"),
    autoescape=True,  # every value from the payload is escaped; nothing is marked safe
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENVIRONMENT.filters["num"] = lambda n: f"{n:,}"


@dataclass(frozen=True)
class ReportContext:
    """What the report says about the request itself, beside what the data holds."""

    request_id: str
    subject_type: str  # "email" | "profile" | "subprofile"
    subject_label: str  # e.g. "alice@example.com" or "profile 123" (shown as "about")
    controller: str | None  # REPORT_CONTROLLER_NAME; None: described, not named
    received_on: date
    due_by: date
    generated_at: datetime  # UTC
    events_range: tuple[date, date] | None  # [since, until) when events were asked


class _Long(str):
    """The start of a string too long to keep whole, and how long it was."""

    full_length: int

    def __new__(cls, text: str, full_length: int) -> _Long:
        self = super().__new__(cls, text)
        self.full_length = full_length
        return self


class _Skipped:
    """Stands for values an item held beyond its caps (they are in data.json)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __str__(self) -> str:
        return f"… {self.count:,} more value{'s' if self.count != 1 else ''}, see data.json"


class _ItemBuilder:
    """Builds one item from parser events, with caps on depth, breadth and characters."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.root: Any = None
        self._stack: list[Any] = []
        self._key: str = ""
        self._skip = 0  # depth inside a subtree that is counted, not kept
        self._skipped: dict[int, int] = {}  # id(container) -> values not kept in it
        self._chars = 0

    def send(self, event: str, value: Any) -> bool:
        """Take one event; True when the item is complete. The hot path of the report (ten
        events per open or click), so the common cases come first and nothing is a call."""
        if self._skip:
            if event in _STARTS:
                self._skip += 1
            elif event in _ENDS:
                self._skip -= 1
            return not self._skip and not self._stack
        if event == "map_key":
            self._key = value
            return False
        stack = self._stack
        if event in _ENDS:
            container = stack.pop()
            skipped = self._skipped.pop(id(container), 0) if self._skipped else 0
            if skipped:
                if isinstance(container, dict):
                    container["…"] = _Skipped(skipped)
                else:
                    container.append(_Skipped(skipped))
            return not stack
        if stack:
            container = stack[-1]
            if len(container) >= ITEM_ENTRIES or self._chars >= ITEM_CHARS:
                self._skipped[id(container)] = self._skipped.get(id(container), 0) + 1
                if event in _STARTS:
                    self._skip = 1
                return False
        if event in _STARTS:
            if len(stack) >= ITEM_DEPTH:  # shown as "… 1 more value" in its container
                self._skipped[id(container)] = self._skipped.get(id(container), 0) + 1
                self._skip = 1
                return False
            value = {} if event == "start_map" else []
        elif value.__class__ is str:
            if len(value) > MIME_PREFIX:
                value = _Long(value[:MIME_PREFIX], len(value))
            self._chars += len(value)
        if not stack:
            self.root = value
        elif container.__class__ is dict:
            key = self._key
            if key in container:  # a duplicate member: kept beside the first, not over it
                n = 2
                while f"{self._key} ({n})" in container:
                    n += 1
                key = f"{self._key} ({n})"
            container[key] = value
        else:
            container.append(value)
        if event in _STARTS:
            stack.append(value)
            return False
        return not stack

    def partial(self) -> Any:
        """What was built of an item the input broke off in (its open containers stay)."""
        return self.root


@dataclass
class _Table:
    """One table of the report: columns in order of first appearance, rows of cut cells."""

    title: str
    intro: str
    columns: list[str] = field(default_factory=list)
    rows: list[dict[str, str]] = field(default_factory=list)
    total: int = 0
    sort_by_time: bool = False

    def view(self, noun: str, anchor: str, first_other: bool = False) -> dict[str, Any]:
        rows = self.rows
        if self.sort_by_time and "time" in self.columns:
            rows = sorted(rows, key=lambda row: row.get("time", ""))
        return {
            "title": self.title,
            "intro": self.intro,
            "headers": [
                _COLUMN_TITLES.get(name.lower(), _cut(_clean(name), 100)) for name in self.columns
            ],
            "rows": [[row.get(name, "") for name in self.columns] for row in rows],
            "total": self.total,
            "more": self.total - len(self.rows),
            "noun": noun,
            "id": anchor,
            "first_other": first_other,
        }


@dataclass
class _Message:
    """What the report shows of one message."""

    sent: datetime | None
    sent_text: str
    sender: str
    recipient: str
    subject: str
    excerpt: str
    excerpt_source: str  # "text", "html" or "" (none found)
    attachments: list[str]
    size: int
    details: list[tuple[str, str]]

    def chars(self) -> int:
        return len(self.subject) + len(self.excerpt) + len(self.sender) + len(self.recipient)


class ReportBuilder:
    """Feed the archive's bytes in order, add the events, then render the HTML report."""

    def __init__(self, context: ReportContext, *, block_bytes: int = FEED_BLOCK) -> None:
        self.context = context
        self._block_bytes = block_bytes
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._fed = 0
        self._since_event = 0
        self._events: Any = ijson.utils.sendable_list()
        self._parser: Any = _IJSON.basic_parse_coro(self._events, use_float=True)
        self._closed = False
        self._problem: str | None = None
        # Where the parser stands outside items: "map" for the top object, "array" for
        # `data` and the arrays inside it; the item builder takes over inside an item.
        self._stack: list[str] = []
        self._key: str | None = None
        self._building: str | None = None  # "info" or "item" while a builder runs
        self._builder = _ItemBuilder()
        self.info: Any = None
        self._extra_members: list[str] = []
        # What was found.
        self._counts: Counter[str] = Counter()
        self._months: dict[str, Counter[str]] = {}
        self._undated: Counter[str] = Counter()
        self._messages: list[_Message] = []
        self._group_subject: str | None = None  # of the last message in the current array
        self._group_subject_raw = False  # True: still RFC 2047 encoded
        self._tables: dict[str, _Table] = {
            "open": _Table(
                "Opens",
                "Each time a message was opened and its images were loaded.",
                sort_by_time=True,
            ),
            "click": _Table("Clicks", "Each link followed in a message.", sort_by_time=True),
            "survey": _Table("Survey answers", "Surveys and forms you filled in."),
        }
        self._others: dict[Any, _Table] = {}
        self._chars = 0
        self._budget_hit = False
        self._event_types: Counter[str] = Counter()
        self._event_table = _Table("Events", "Every event, in the order they were recorded.")

    # -- input -------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        """The next bytes of the archive, any size. yajl re-reads a token that spans two
        calls from its start, so a 1 MiB message fed in 64 KiB pieces would be lexed 8 times
        over (measured: 30 MB/s instead of 200). So bytes are passed on in blocks of at least
        `block_bytes`, and while one token goes on (no event came from the last blocks) each
        block is as long as that token so far: re-reading stays linear for any length."""
        if self._closed or self._problem is not None:
            return
        step = self._block_bytes
        # A larger chunk goes in block-sized pieces, so yajl's events for one call (and the
        # strings they hold) stay within a block.
        for start in range(0, len(chunk), step) if len(chunk) > step else (0,):
            piece = chunk if len(chunk) <= step else chunk[start : start + step]
            self._pending.append(piece)
            self._pending_bytes += len(piece)
            if self._pending_bytes >= max(step, self._since_event):
                self._flush()

    def add_events(self, events: list[dict[str, Any]]) -> None:
        """One month window of normalised events ({"event", "time", "data"})."""
        table = self._event_table
        for event in events:
            if isinstance(event, dict):
                kind = event.get("event")
                data = event.get("data")
                when = event.get("time")
                if when is None and isinstance(data, dict):
                    when = data.get("time")
            else:
                kind, data, when = None, event, None
            kind = _cut(_clean(kind.strip()), 100) if isinstance(kind, str) else ""
            if not kind:
                kind = "unknown"
            elif kind not in self._event_types and len(self._event_types) >= EVENT_KIND_CAP:
                kind = "(other kinds)"
            self._event_types[kind] += 1
            self._count("events", _month_of(when))
            table.total += 1
            if len(table.rows) < ROW_CAP and self._room():
                details = (
                    {k: v for k, v in data.items() if k != "time"}
                    if isinstance(data, dict)
                    else data
                )
                row = {"When": _cell(when), "Type": _cell(kind), "Details": _describe(details)}
                self._store(table, row)

    def _flush(self) -> None:
        if not self._pending:
            return
        block = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending, self._pending_bytes = [], 0
        self._fed += len(block)
        try:
            self._parser.send(block)
        except ijson.JSONError as exc:
            self._problem = _damage(exc)
        except UnicodeDecodeError:
            self._problem = "The file data.json holds text that is not valid UTF-8."
        finally:
            self._consume()
        self._since_event = self._since_event + len(block) if not self._events else 0
        self._events.clear()
        if self._problem is None and self._since_event > MAX_TOKEN:
            self._problem = (
                f"One value in data.json is longer than {MAX_TOKEN // (1024 * 1024)} MiB; "
                "it and what follows it are not shown here."
            )

    def _close(self) -> None:
        if self._closed:
            return
        self._flush()
        self._closed = True
        if self._fed == 0:
            self._problem = "The file data.json is empty."
        elif self._problem is None:
            try:
                self._parser.close()
            except ijson.IncompleteJSONError:
                self._problem = "The file data.json ends too early: its last part is missing."
            except ijson.JSONError as exc:
                self._problem = _damage(exc)
            self._consume()
        if self._building is not None:  # the input broke off inside an item: show its start
            self._finish_item(self._builder.partial())

    # -- structure -----------------------------------------------------------------------

    def _consume(self) -> None:
        """Walk the parser's events: track structure outside items, build items inside."""
        builder, stack = self._builder, self._stack
        send = builder.send
        building = self._building is not None
        for event, value in self._events:
            if building:
                if send(event, value):
                    self._finish_item(builder.root)
                    building = False
                continue
            if event == "map_key":
                self._key = value
                if (
                    len(stack) == 1
                    and value not in ("info", "data")
                    and len(self._extra_members) < 20
                ):
                    self._extra_members.append(value)
                continue
            if event in _ENDS:
                stack.pop()
                self._group_subject = None
                continue
            top = stack[-1] if stack else None
            if top is None and event == "start_map":
                stack.append("map")
                continue
            is_info = top == "map" and self._key == "info"
            if event == "start_array" and not is_info and len(stack) <= GROUP_DEPTH:
                stack.append("array")
                self._group_subject = None
                continue
            self._building = "info" if is_info else "item"
            builder.reset()
            if send(event, value):
                self._finish_item(builder.root)
            else:
                building = True

    def _finish_item(self, value: Any) -> None:
        role, self._building = self._building, None
        if role == "info":
            self.info = value
            return
        head = _mime_head(value) if isinstance(value, str) else None
        if head is not None:
            self._message(value, head, {})
        elif isinstance(value, dict):
            self._record(value)
        else:
            self._other_value(value)

    # -- kinds ---------------------------------------------------------------------------

    def _record(self, record: dict[str, Any]) -> None:
        kind_field, kind = _kind_of(record)
        name = kind.lower() if kind else ""
        if name in _OPEN or name in _CLICK or name in _SURVEY:
            section = "open" if name in _OPEN else "click" if name in _CLICK else "survey"
            self._activity(section, record, kind_field)
            return
        for key, value in record.items():
            head = _mime_head(value) if isinstance(value, str) else None
            if head is not None:
                self._message(value, head, {k: v for k, v in record.items() if k != key})
                return
        self._other(record, kind_field, kind)

    def _message(self, text: str, head: str, details: dict[str, Any]) -> None:
        self._counts["messages"] += 1
        month: str | None
        if len(self._messages) < MESSAGE_CAP and self._room():
            message = _read_message(text, details)
            self._messages.append(message)
            self._chars += message.chars()
            self._group_subject, self._group_subject_raw = message.subject, False
            month = _month_of_moment(message.sent)
        else:  # counted and dated only, from its raw headers: fast for any number
            found = _DATE_HEADER.search(head)
            month = _month_of_moment(_parse_date(found.group(1)) if found else None)
            subject = _SUBJECT_HEADER.search(head)
            self._group_subject = subject.group(1) if subject else None
            self._group_subject_raw = True
        if month is None:
            month = _month_of(_time_of(details))
        self._count("messages", month)

    def _activity(self, section: str, record: dict[str, Any], kind_field: str | None) -> None:
        counter = {"open": "opens", "click": "clicks", "survey": "surveys"}[section]
        self._counts[counter] += 1
        if section != "survey":
            self._count(counter, _month_of(_time_of(record)))
        table = self._tables[section]
        table.total += 1
        if len(table.rows) < ROW_CAP and self._room():
            row = {key: _cell(value) for key, value in record.items() if key != kind_field}
            if self._group_subject is not None and "message" not in row:
                row["message"] = _cell(self._subject_of_group())
            self._store(table, row)

    def _other(self, record: dict[str, Any], kind_field: str | None, kind: str | None) -> None:
        self._counts["other"] += 1
        if kind_field is not None and kind is not None:
            key: Any = ("kind", kind.lower())
            title, intro = f"Records of type “{_cut(_clean(kind), 100)}”", ""
            record = {k: v for k, v in record.items() if k != kind_field}
        else:
            key = ("fields", frozenset(record))
            names = ", ".join(_cut(_clean(name), 60) for name in list(record)[:8])
            names += ", …" if len(record) > 8 else ""
            title, intro = "Records", f"Records with the fields: {names}."
        table = self._others.get(key)
        if table is None:
            if len(self._others) >= GROUP_CAP:
                key = ("overflow",)
                table = self._others.get(key)
                record = {"record": record}
                if table is None:
                    table = self._others[key] = _Table(
                        "Records of other shapes", "Shown whole, as they are in data.json."
                    )
            else:
                table = self._others[key] = _Table(title, intro)
        table.total += 1
        if len(table.rows) < ROW_CAP and self._room():
            self._store(table, {k: _cell(v) for k, v in record.items()})

    def _other_value(self, value: Any) -> None:
        self._counts["other"] += 1
        key = ("values",)
        table = self._others.get(key)
        if table is None:
            table = self._others[key] = _Table(
                "Single values", "Values found on their own, not inside a record."
            )
        table.total += 1
        if len(table.rows) < ROW_CAP and self._room():
            self._store(table, {"value": _cell(value)})

    def _subject_of_group(self) -> str:
        if self._group_subject_raw and self._group_subject is not None:
            self._group_subject = _decode_header("subject", self._group_subject)
            self._group_subject_raw = False
        return self._group_subject or "(no subject)"

    def _count(self, series: str, month: str | None) -> None:
        if month is None:
            self._undated[series] += 1
        else:
            counts = self._months.get(month)
            if counts is None:
                counts = self._months[month] = Counter()
            counts[series] += 1

    def _room(self) -> bool:
        if self._chars < TEXT_BUDGET:
            return True
        self._budget_hit = True
        return False

    def _store(self, table: _Table, row: dict[str, str]) -> None:
        columns = table.columns
        for name in row:
            if name not in columns and len(columns) < COLUMN_CAP - 1:
                columns.append(name)
        extra = [name for name in row if name not in columns]
        if extra:  # a table keeps its width: further fields share one last column
            kept = {name: cell for name, cell in row.items() if name in columns}
            kept[_MORE] = _cut("; ".join(f"{name}: {row[name]}" for name in extra))
            row = kept
            if _MORE not in columns:
                columns.append(_MORE)
        table.rows.append(row)
        self._chars += sum(len(name) + len(cell) for name, cell in row.items())

    # -- output --------------------------------------------------------------------------

    def render(self) -> bytes:
        """The report as UTF-8 HTML. Call once, after the last chunk and events."""
        self._close()
        # Rendered piece by piece: render() would first list every one of the template's
        # outputs (millions for a full report) and then hold the text and its bytes at once.
        out = bytearray()
        pieces: list[str] = []
        for piece in _ENVIRONMENT.get_template("report.html.j2").generate(report=self._view()):
            pieces.append(piece)
            if len(pieces) >= 4096:
                out += "".join(pieces).encode("utf-8", "replace")
                pieces.clear()
        out += "".join(pieces).encode("utf-8", "replace")
        return bytes(out)

    def _view(self) -> dict[str, Any]:
        ctx = self.context
        counts = self._counts
        messages = sorted(
            self._messages,
            key=lambda m: (m.sent is None, m.sent.timestamp() if m.sent else 0.0),
        )
        tables = [
            self._tables["open"].view("opens", "opens"),
            self._tables["click"].view("clicks", "clicks"),
            self._tables["survey"].view("survey answers", "surveys"),
        ]
        if ctx.events_range is not None:
            tables.append(self._event_table.view("events", "events"))
        tables += [
            table.view("records", f"other-{n}", first_other=n == 1)
            for n, table in enumerate(self._others.values(), 1)
        ]
        event_types = [
            {"type": kind, "label": label, "meaning": meaning, "count": self._event_types[kind]}
            for kind, (label, meaning) in EVENT_TYPES.items()
        ] + [
            {
                "type": kind,
                "label": kind,
                "meaning": "a kind of event Copernica does not describe",
                "count": n,
            }
            for kind, n in sorted(self._event_types.items(), key=lambda kv: (-kv[1], kv[0]))
            if kind not in EVENT_TYPES
        ]
        notes = []
        if self._budget_hit:
            notes.append(
                "This report reached its size limit, so some tables stop early; "
                "everything is counted above and is in data.json."
            )
        if self._extra_members:
            names = ", ".join(_cell(name) for name in self._extra_members)
            notes.append(
                f"data.json also holds parts named {names}; what they hold is shown "
                "with the records below."
            )
        return {
            "request_id": ctx.request_id,
            "controller": ctx.controller,
            "subject_label": ctx.subject_label,
            "received_on": _day(ctx.received_on),
            "due_by": _day(ctx.due_by),
            "generated_at": _moment(ctx.generated_at),
            "events_asked": ctx.events_range is not None,
            "events_from": _day(ctx.events_range[0]) if ctx.events_range else "",
            "events_to": _day(_last_day(ctx.events_range[1])) if ctx.events_range else "",
            "problem": self._problem,
            "notes": notes,
            "counts": [
                {"label": "Messages sent to you", "count": counts["messages"]},
                {"label": "Times a message was opened", "count": counts["opens"]},
                {"label": "Links clicked", "count": counts["clicks"]},
                {"label": "Survey answers", "count": counts["surveys"]},
                {"label": "Other records", "count": counts["other"]},
                {"label": "Events", "count": sum(self._event_types.values())},
            ],
            "event_types": event_types,
            "event_total": sum(self._event_types.values()),
            "months": _month_rows(self._months, self._undated),
            "chart": _chart(self._months),
            "messages": [_message_view(m, n) for n, m in enumerate(messages, 1)],
            "message_total": counts["messages"],
            "message_more": counts["messages"] - len(messages),
            "tables": tables,
            "info": _describe(self.info) if self.info is not None else "",
        }


# -- values ---------------------------------------------------------------------------------


def _clean(text: str) -> str:
    """Text safe to put in the page: no control characters, no lone surrogates."""
    return _CONTROL.sub("\ufffd", text)


def _cut(text: str, limit: int = CELL_CHARS) -> str:
    if len(text) <= limit:
        return text
    return text[:limit].rstrip() + "…"


def _cell(value: Any) -> str:
    """A value as the text of one table cell: nested values as compact JSON, cut."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, _Long):
        return _clean(_cut(value)) + f" ({value.full_length:,} characters in all)"
    if isinstance(value, str):
        return _clean(_cut(value))
    if isinstance(value, int | float | _Skipped):
        return str(value)
    return _clean(_cut(_compact(value)))


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def _describe(value: Any) -> str:
    """A record as one line of `key: value` pairs, for details beside a table or message."""
    if isinstance(value, dict):
        parts = [f"{key}: {_cell(item)}" for key, item in value.items()]
        return _cut(_clean("; ".join(parts)), CELL_CHARS * 2)
    return _cell(value)


def _kind_of(record: dict[str, Any]) -> tuple[str | None, str | None]:
    for name in _KIND_FIELDS:
        value = record.get(name)
        if isinstance(value, str) and value.strip():
            return name, value.strip()
    return None, None


def _time_of(record: dict[str, Any]) -> Any:
    for name in _TIME_FIELDS:
        if name in record:
            return record[name]
    return None


def _month_of(value: Any) -> str | None:
    """The month ("YYYY-MM") of a time as Copernica writes it, or of a Unix time."""
    if isinstance(value, str):
        found = _MONTH.match(value)
        if found and "01" <= found.group(2) <= "12":
            return f"{found.group(1)}-{found.group(2)}"
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 1e10:
        return _month_of_moment(datetime.fromtimestamp(value, UTC))
    return None


def _month_of_moment(moment: datetime | None) -> str | None:
    return None if moment is None else f"{moment.year:04d}-{moment.month:02d}"


# -- messages -------------------------------------------------------------------------------


def _mime_head(text: str) -> str | None:
    """The header block of a MIME message, or None when `text` does not start with one that
    names at least one message header."""
    if not _HEADER_LINE.match(text):
        return None
    limit = min(len(text), MIME_PREFIX)
    end = text.find("\r\n\r\n", 0, limit)
    bare = text.find("\n\n", 0, end if end >= 0 else limit)
    if bare >= 0:
        end = bare
    elif end < 0:
        if text.find("\n", 0, limit) < 0:  # one line: a note such as "Note: ...", no message
            return None
        end = limit
    head = text[:end]
    return head if _KNOWN_HEADER.search(head) else None


def _read_message(text: str, details: dict[str, Any]) -> _Message:
    """Headers, a text excerpt and attachment names from the start of one MIME message.

    The structure is parsed with the compat32 policy and only the headers shown are decoded
    with email.policy.default (RFC 2047 and all): the default policy parses every header
    the parser touches, Content-Type dozens of times per message, which costs 5x more."""
    size = text.full_length if isinstance(text, _Long) else len(text)
    message = _MIME_PARSER.parsestr(text[:MIME_PREFIX])
    raw_date = message.get("date")
    sent = _parse_date(str(raw_date)) if raw_date is not None else None
    if sent is None:
        sent = _parse_time(_time_of(details))
    excerpt, source, attachments = _body_of(message)
    return _Message(
        sent=sent,
        sent_text=_clean(_cut(str(raw_date or _time_of(details) or ""), 100)),
        sender=_cut(_decode_header("from", message.get("from"))),
        recipient=_cut(_decode_header("to", message.get("to"))),
        subject=_cut(_decode_header("subject", message.get("subject"))),
        excerpt=excerpt,
        excerpt_source=source,
        attachments=attachments[:20],
        size=size,
        details=[(_clean(_cut(str(k), 100)), _cell(v)) for k, v in details.items()][:20],
    )


def _decode_header(name: str, raw: Any) -> str:
    """A header as the reader should see it: unfolded, RFC 2047 encoded-words decoded."""
    if raw is None:
        return ""
    return _decoded(name, str(raw)[:HEADER_CHARS])


@functools.lru_cache(maxsize=4096)
def _decoded(name: str, raw: str) -> str:
    """Cached: senders and recipients repeat from message to message. Subjects, nearly all
    different, go through email.header's RFC 2047 decoder (35 µs); email.policy.default's
    header classes, used for the address headers and as the fallback, take 200 µs."""
    text = raw
    if "=?" in raw or name != "subject":
        try:
            if name == "subject":
                text = str(email.header.make_header(email.header.decode_header(raw)))
            else:
                text = str(_DEFAULT.header_fetch_parse(name, raw))
        except Exception:  # a malformed header must not stop the report: try the other way
            try:
                text = str(_DEFAULT.header_fetch_parse(name, raw))
            except Exception:  # then show it raw, as it is in data.json
                text = raw
    return _clean(_SPACE.sub(" ", text).strip())


def _parse_date(raw: str) -> datetime | None:
    try:
        moment = email.utils.parsedate_to_datetime(raw.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 1e10:
        return datetime.fromtimestamp(value, UTC)
    return None


def _body_of(message: Message) -> tuple[str, str, list[str]]:
    """(excerpt, "text"|"html"|"", attachment names): the plain part preferred, else the
    HTML part turned into text (never rendered)."""
    plain: str | None = None
    html: str | None = None
    attachments: list[str] = []
    for part in message.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        disposition = part.get_content_disposition()
        if disposition == "attachment" or not ctype.startswith("text/"):
            name = part.get_filename()
            attachments.append(_clean(_cut(str(name), 100)) if name else ctype)
            continue
        if ctype == "text/plain" and plain is None:
            plain = _part_text(part)
        elif ctype == "text/html" and html is None:
            html = _part_text(part)
    if plain and plain.strip():
        return _excerpt(plain), "text", attachments
    if html:
        text = _html_text(html)
        if text:
            return _excerpt(text), "html", attachments
    return "", "", attachments


def _part_text(part: Message) -> str:
    payload = part.get_payload()
    if not isinstance(payload, str):
        return ""
    encoding = str(part.get("content-transfer-encoding", "")).strip().lower()
    if encoding == "base64":
        letters = "".join(payload[: BODY_PREFIX * 4 // 3 + 1024].split())
        try:
            data = base64.b64decode(letters[: len(letters) // 4 * 4])
        except (binascii.Error, ValueError):
            return ""
    elif encoding == "quoted-printable":
        data = quopri.decodestring(payload[: BODY_PREFIX * 3].encode("utf-8", "replace"))
    else:  # 7bit, 8bit, binary: the JSON string already holds the text
        return payload[:BODY_PREFIX]
    charset = part.get_content_charset() or "utf-8"
    try:
        return data.decode(charset, "replace")
    except LookupError:  # an unknown charset name
        return data.decode("utf-8", "replace")


class _HTMLText(HTMLParser):
    """The visible text of an HTML part: no head, styles, scripts or tags."""

    _HIDDEN = frozenset({"head", "style", "script", "title", "noscript", "template", "svg"})
    _BLOCKS = frozenset({"p", "br", "div", "li", "tr", "td", "h1", "h2", "h3", "h4", "table"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.size = 0
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._HIDDEN:
            self._hidden += 1
        elif tag in self._BLOCKS:
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN and self._hidden:
            self._hidden -= 1
        elif tag in self._BLOCKS:
            self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.parts.append(data)
            self.size += len(data)


def _html_text(html: str) -> str:
    reader = _HTMLText()
    for start in range(0, len(html), 4096):  # stop as soon as there is enough text
        reader.feed(html[start : start + 4096])
        if reader.size > EXCERPT_CHARS * 4:
            break
    return _SPACE.sub(" ", "".join(reader.parts)).strip()


def _excerpt(text: str) -> str:
    text = _SPACE.sub(" ", text[: EXCERPT_CHARS * 4]).strip()
    if len(text) <= EXCERPT_CHARS:
        return _clean(text)
    cut = text[:EXCERPT_CHARS]
    space = cut.rfind(" ")
    return _clean((cut[:space] if space > EXCERPT_CHARS // 2 else cut).rstrip(" ,.;:")) + " …"


def _message_view(message: _Message, number: int) -> dict[str, Any]:
    return {
        "number": number,
        "sent": _moment(message.sent) if message.sent else message.sent_text or "unknown",
        "sender": message.sender or "unknown",
        "recipient": message.recipient or "unknown",
        "subject": message.subject or "(no subject)",
        "excerpt": message.excerpt,
        "from_html": message.excerpt_source == "html",
        "attachments": message.attachments,
        "size": _size(message.size),
        "details": message.details,
    }


# -- dates and the chart --------------------------------------------------------------------

_MONTH_NAMES = (
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


def _day(day: date) -> str:
    return f"{day.day} {_MONTH_NAMES[day.month - 1]} {day.year}"


def _moment(moment: datetime) -> str:
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return f"{_day(moment.date())}, {moment:%H:%M} UTC"


def _last_day(until: date) -> date:
    return date.fromordinal(until.toordinal() - 1)


def _month_name(month: str) -> str:
    year, number = month.split("-")
    return f"{_MONTH_NAMES[int(number) - 1]} {year}"


def _size(size: int) -> str:
    if size < 1024:
        return f"{size} bytes"
    if size < 1024 * 1024:
        return f"{size / 1024:.0f} KB"
    return f"{size / (1024 * 1024):.1f} MB"


def _month_rows(months: dict[str, Counter[str]], undated: Counter[str]) -> list[dict[str, Any]]:
    rows = [
        {"label": _month_name(month), "values": [months[month][s] for s, _ in SERIES]}
        for month in sorted(months)
    ]
    if any(undated[s] for s, _ in SERIES):
        rows.append({"label": "Date unknown", "values": [undated[s] for s, _ in SERIES]})
    return rows[:ROW_CAP]


_CHART_WIDTH = 880
_CHART_LEFT = 128
_ROW_HEIGHT = 64
_ROW_GAP = 18
_COLOURS = ("#2f5d8a", "#3a8f6b", "#c77d1a", "#7a5ca8")


def _chart(months: dict[str, Counter[str]]) -> dict[str, Any] | None:
    """Geometry of the per-month chart: one row of bars per series, each on its own scale
    (events outnumber messages many times over), sharing the month axis. A span of more
    than four years is drawn per year."""
    if not months:
        return None
    first, last = min(months), max(months)
    y0, m0 = int(first[:4]), int(first[5:])
    y1, m1 = int(last[:4]), int(last[5:])
    span = (y1 - y0) * 12 + m1 - m0 + 1
    buckets: list[tuple[str, list[int]]] = []
    if span <= 48:
        for k in range(span):
            year, month = y0 + (m0 - 1 + k) // 12, (m0 - 1 + k) % 12 + 1
            counts = months.get(f"{year:04d}-{month:02d}", Counter())
            label = _MONTH_NAMES[month - 1][:3] + (f" {year}" if k == 0 or month == 1 else "")
            buckets.append((label, [counts[s] for s, _ in SERIES]))
        per = "month"
    else:
        years: dict[int, list[int]] = {}
        for name, counts in months.items():
            totals = years.setdefault(int(name[:4]), [0] * len(SERIES))
            for i, (s, _) in enumerate(SERIES):
                totals[i] += counts[s]
        if len(years) > 60:  # centuries of stray dates: the table below still lists all
            keep = sorted(years)[-60:]
            years = {y: years[y] for y in keep}
        buckets = [(str(year), years[year]) for year in sorted(years)]
        per = "year"
    n = len(buckets)
    plot = _CHART_WIDTH - _CHART_LEFT - 8
    step = plot / n
    bar = max(2.0, min(36.0, step * 0.7))
    every = max(1, round(n / 12))
    rows = []
    for i, (_, name) in enumerate(SERIES):
        top = i * (_ROW_HEIGHT + _ROW_GAP)
        peak = max(values[i] for _, values in buckets)
        bars = []
        for k, (label, values) in enumerate(buckets):
            value = values[i]
            height = (_ROW_HEIGHT - 14) * value / peak if peak else 0
            height = max(height, 1.5) if value else 0
            bars.append(
                {
                    "x": round(_CHART_LEFT + step * k + (step - bar) / 2, 1),
                    "y": round(top + _ROW_HEIGHT - height, 1),
                    "width": round(bar, 1),
                    "height": round(height, 1),
                    "value": value,
                    "label": label,
                    "show_value": n <= 24,
                }
            )
        rows.append(
            {
                "name": name,
                "colour": _COLOURS[i],
                "top": top,
                "base": top + _ROW_HEIGHT,
                "peak": peak,
                "bars": bars,
            }
        )
    axis = len(SERIES) * (_ROW_HEIGHT + _ROW_GAP)
    labels = [
        {"x": round(_CHART_LEFT + step * k + step / 2, 1), "text": label}
        for k, (label, _) in enumerate(buckets)
        if k % every == 0
    ]
    return {
        "width": _CHART_WIDTH,
        "height": axis + 12,
        "left": _CHART_LEFT,
        "right": _CHART_WIDTH - 8,
        "axis": axis - _ROW_GAP + 14,
        "rows": rows,
        "labels": labels,
        "per": per,
    }


def _damage(exc: Exception) -> str:
    """What broke, in words, with yajl's first line (not its excerpt of the body)."""
    text = exc.args[0] if exc.args else str(exc)
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    first = str(text).strip().splitlines()[0] if str(text).strip() else "invalid JSON"
    return (
        "The file data.json is damaged after some point, so this report shows only what "
        f"could be read before it (technical detail: {_clean(_cut(first, 200))})."
    )
