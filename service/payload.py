"""Incremental checking of a data-request body: fed chunk by chunk, never held whole.

Copernica's ready payload is `{"info": {"type": ..., "id": ...}, "data": [[...], ...]}`;
while the file is not ready the old GET form answers `"data": "Data not available (yet)"`.
The body is parsed by ijson's C backend (yajl) as it streams, so validity is known the moment
the last byte arrives, and memory stays bounded: strings are decoded one at a time, nesting
is capped, and a single token (one huge string, or whitespace) is capped too, because yajl
buffers an unfinished token whole.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

import ijson

SUBJECT_TYPES = ("email", "profile", "subprofile")
NOT_AVAILABLE_TEXT = "Data not available (yet)"
MAX_DEPTH = 512
_NOT_AVAILABLE_PLAIN = re.compile(rb'^\s*"?data not available \(yet\)"?\s*$', re.IGNORECASE)


def is_plain_not_available(body: bytes) -> bool:
    """The not-ready answer as bare text (or a bare JSON string) rather than an object."""
    return len(body) <= 64 and _NOT_AVAILABLE_PLAIN.match(body) is not None


class Verdict(enum.Enum):
    DATA = "data"
    NOT_AVAILABLE = "not_available"
    INVALID = "invalid"


@dataclass(frozen=True)
class Subject:
    """Whom a data request is about: type email/profile/subprofile and the address or id."""

    type: str
    id: str

    def matches(self, info_type: Any, info_id: Any) -> bool:
        if info_type != self.type or isinstance(info_id, bool):
            return False
        if self.type == "email":
            return isinstance(info_id, str) and info_id.strip().casefold() == self.id.casefold()
        # Profile ids are numbers; accept them as JSON numbers or numeric strings.
        if isinstance(info_id, int):
            return str(info_id) == self.id
        return isinstance(info_id, str) and info_id.strip() == self.id


@dataclass(frozen=True)
class Result:
    verdict: Verdict
    reason: str = ""
    info_type: Any = None
    info_id: Any = None


class PayloadInvalid(Exception):
    """The body is not an acceptable data-request payload; the message says why."""


class _Events:
    """Receives yajl events one by one and tracks just enough structure to judge the body."""

    def __init__(self) -> None:
        self.depth = 0
        self.seen_event = False
        self.top_key: str | None = None  # key currently open at depth 1
        self.info_key: str | None = None  # key currently open inside `info`
        self.info: dict[str, Any] = {}
        self.info_seen = False
        self.data_kind: str | None = None  # "array" or "not_available"
        self.in_info = False

    def send(self, item: tuple[str, Any]) -> None:
        event, value = item
        self.seen_event = True
        depth = self.depth
        if event in ("start_map", "start_array"):
            if depth == 0 and event != "start_map":
                raise PayloadInvalid("top-level JSON value must be an object")
            self._value_at(depth, event, None)
            self.depth = depth + 1
            if self.depth > MAX_DEPTH:
                raise PayloadInvalid(f"JSON nesting deeper than {MAX_DEPTH}")
            if depth == 1 and self.top_key == "info":
                self.in_info = event == "start_map"
        elif event in ("end_map", "end_array"):
            self.depth = depth - 1
            if self.depth == 1:
                self.in_info = False
        elif event == "map_key":
            if depth == 1:
                if value in ("info", "data") and (
                    (value == "info" and self.info_seen)
                    or (value == "data" and self.data_kind is not None)
                ):
                    raise PayloadInvalid(f"duplicate top-level member {value!r}")
                self.top_key = value
            elif depth == 2 and self.in_info:
                if value in self.info:
                    raise PayloadInvalid(f"duplicate member info.{value}")
                self.info_key = value
        else:
            if depth == 0:
                raise PayloadInvalid("top-level JSON value must be an object")
            self._value_at(depth, event, value)

    def _value_at(self, depth: int, event: str, value: Any) -> None:
        """A value starts at `depth`; only depth 1 (top members) and 2 (in info) matter."""
        if depth == 1:
            if self.top_key == "info":
                if event != "start_map":
                    raise PayloadInvalid("member 'info' must be an object")
                self.info_seen = True
            elif self.top_key == "data":
                if event == "start_array":
                    self.data_kind = "array"
                elif event == "string" and value == NOT_AVAILABLE_TEXT:
                    self.data_kind = "not_available"
                else:
                    raise PayloadInvalid("member 'data' must be an array")
        elif depth == 2 and self.in_info and self.info_key in ("type", "id"):
            self.info[self.info_key] = value if event not in ("start_map", "start_array") else ...


class PayloadCheck:
    """Feed the body in chunks; `finish()` gives the verdict. Raises nothing to the caller."""

    def __init__(self, max_token_bytes: int) -> None:
        self._events = _Events()
        self._parser = ijson.basic_parse_coro(self._events)
        self._max_token = max_token_bytes
        self._since_event = 0
        self.error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None

    def feed(self, chunk: bytes) -> None:
        if self.error is not None:
            return
        events = self._events
        events.seen_event = False
        try:
            self._parser.send(chunk)
        except PayloadInvalid as exc:
            self.error = str(exc)
            return
        except ijson.JSONError as exc:
            self.error = _json_error(exc)
            return
        # yajl keeps an unfinished token (a string, a number, whitespace) whole in memory.
        self._since_event = 0 if events.seen_event else self._since_event + len(chunk)
        if self._since_event > self._max_token:
            self.error = f"a single JSON token is larger than {self._max_token} bytes"

    def finish(self) -> Result:
        if self.error is None:
            try:
                self._parser.close()
            except PayloadInvalid as exc:
                self.error = str(exc)
            except ijson.JSONError as exc:
                self.error = _json_error(exc)
        if self.error is not None:
            return Result(Verdict.INVALID, self.error)
        events = self._events
        if events.data_kind == "not_available":
            return Result(Verdict.NOT_AVAILABLE)
        if not events.info_seen:
            return Result(Verdict.INVALID, "member 'info' is missing")
        if events.data_kind is None:
            return Result(Verdict.INVALID, "member 'data' is missing")
        info_type, info_id = events.info.get("type"), events.info.get("id")
        if info_type not in SUBJECT_TYPES:
            return Result(Verdict.INVALID, "info.type must be email, profile or subprofile")
        if not isinstance(info_id, str | int) or isinstance(info_id, bool):
            return Result(Verdict.INVALID, "info.id must be a string or an integer")
        return Result(Verdict.DATA, info_type=info_type, info_id=info_id)


def _json_error(exc: Exception) -> str:
    """yajl's message without the excerpt of the body (it may hold an e-mail address)."""
    text = exc.args[0] if exc.args else str(exc)
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    first = str(text).strip().splitlines()[0] if str(text).strip() else "invalid JSON"
    return f"invalid JSON: {first}"
