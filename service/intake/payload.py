"""Incremental checking of a data-request body: fed chunk by chunk, never held whole.

Copernica's ready payload is `{"info": {"type": ..., "id": ...}, "data": [[...], ...]}`;
while the file is not ready the old GET form answers `"data": "Data not available (yet)"`.
Two checkers, one verdict. A body no larger than one S3 part is held whole anyway (it goes up
in one PutObject), so it is checked once at the end by simdjson, which validates the whole
document (structure, numbers, escapes, UTF-8) at gigabytes per second without building Python
objects for its contents. A larger body is parsed by ijson's C backend (yajl) as it streams, so
validity is known the moment the last byte arrives, and memory stays bounded: strings are
decoded one at a time, nesting is capped, and a single token (one huge string, or
whitespace) is capped too, because yajl buffers an unfinished token whole.

simdjson only ever says "valid data" or "not available (yet)"; on anything else (an error,
a duplicate member, a big number it cannot represent) yajl reads the same bytes and gives
the verdict and its reason, so both paths judge every body alike (tested on the same corpus).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ijson
import simdjson

from service.copernica.subject import SUBJECT_TYPES

NOT_AVAILABLE_TEXT = "Data not available (yet)"
MAX_DEPTH = 1024  # simdjson's own limit, so both checkers agree
_BOM = b"\xef\xbb\xbf"
_NOT_UTF8 = "invalid JSON: a string is not valid UTF-8"
_PARSER_BYTES = 1024 * 1024
_PARSER = simdjson.Parser()
_NOT_AVAILABLE_PLAIN = re.compile(rb'^\s*"?data not available \(yet\)"?\s*$', re.IGNORECASE)


def is_plain_not_available(body: bytes) -> bool:
    """The not-ready answer as bare text (or a bare JSON string) rather than an object."""
    return len(body) <= 64 and _NOT_AVAILABLE_PLAIN.match(body) is not None


class Verdict(enum.Enum):
    DATA = "data"
    NOT_AVAILABLE = "not_available"
    INVALID = "invalid"


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
    """Feed the body in chunks; `finish()` gives the verdict. Raises nothing to the caller.

    Below `whole_bytes` the body is checked at once in `finish`; past that the check streams,
    and `failed` turns true as soon as the body is known to be invalid. A caller that buffers
    the body itself (for its single PUT) passes `buffered`, which gives the bytes fed so far:
    the check then keeps no chunk of its own, and each chunk can be freed as soon as the
    caller copied it (one copy of the body in memory, not two). Without it the check keeps
    the chunks until `finish`.
    """

    def __init__(
        self,
        max_token_bytes: int,
        whole_bytes: int = 0,
        buffered: Callable[[], bytes | bytearray] | None = None,
    ) -> None:
        self._events = _Events()
        self._yajl: Any = None  # made when first needed: most bodies never need it
        self._max_token = max_token_bytes
        self._since_event = 0
        self._whole = whole_bytes > 0  # still below whole_bytes: checked whole at the end
        self._held: list[bytes] = []
        self._buffered = buffered
        self._fed_bytes = 0
        self._whole_bytes = whole_bytes
        self.error: str | None = None

    def _parser(self) -> Any:
        """yajl, started on first use: a body checked whole by simdjson never needs it."""
        if self._yajl is None:
            self._yajl = ijson.basic_parse_coro(self._events)
        return self._yajl

    @property
    def failed(self) -> bool:
        return self.error is not None

    def feed(self, chunk: bytes) -> None:
        """The next chunk; with `buffered`, call it before the caller buffers the chunk."""
        if self._whole:
            self._fed_bytes += len(chunk)
            if self._buffered is None:
                self._held.append(chunk)
            if self._fed_bytes < self._whole_bytes:
                return
            # Too large to check whole: stream from here on, starting with what came before.
            self._whole = False
            earlier = self._held if self._buffered is None else [bytes(self._buffered())]
            self._held = []
            for part in earlier:
                if part:  # an empty chunk would tell yajl the body ended
                    self._stream(part)
            if self._buffered is None:
                return  # the chunk was among the held ones
        self._stream(chunk)

    def _stream(self, chunk: bytes) -> None:
        if self.error is not None:
            return
        events = self._events
        events.seen_event = False
        try:
            self._parser().send(chunk)
        except PayloadInvalid as exc:
            self.error = str(exc)
            return
        except ijson.JSONError as exc:
            self.error = _json_error(exc)
            return
        except UnicodeDecodeError:  # yajl passes e.g. UTF-8-encoded surrogates to Python
            self.error = _NOT_UTF8
            return
        # yajl keeps an unfinished token (a string, a number, whitespace) whole in memory.
        self._since_event = 0 if events.seen_event else self._since_event + len(chunk)
        if self._since_event > self._max_token:
            self.error = f"a single JSON token is larger than {self._max_token} bytes"

    def finish(self) -> Result:
        """The verdict."""
        if self._whole:
            self._whole = False
            held, self._held = self._held, []
            if self._buffered is not None:
                whole = self._buffered()
            else:
                whole = held[0] if len(held) == 1 else b"".join(held)
            decided = _whole_verdict(whole)
            if decided is not None:
                return decided
            self._stream(bytes(whole))  # let yajl find the reason
        if self.error is None:
            try:
                self._parser().close()
            except PayloadInvalid as exc:
                self.error = str(exc)
            except ijson.JSONError as exc:
                self.error = _json_error(exc)
            except UnicodeDecodeError:
                self.error = _NOT_UTF8
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


def _whole_verdict(body: bytes | bytearray) -> Result | None:
    """DATA or NOT_AVAILABLE for a body simdjson finds clean; None means "ask yajl"."""
    if body.startswith(_BOM):
        return None
    # One parser kept for bodies up to a MiB (its buffers stay mapped: no page faults per
    # callback); a larger body gets its own, freed after. No document outlives this call.
    parser = _PARSER if len(body) <= _PARSER_BYTES else simdjson.Parser()
    try:
        document = parser.parse(body)
    except (ValueError, RuntimeError):  # simdjson's errors (UnicodeDecodeError included)
        return None
    if not isinstance(document, simdjson.Object):
        return None
    members = list(document.keys())
    if members.count("info") > 1 or members.count("data") > 1:
        return None
    info, data = document.get("info"), document.get("data")
    info_type = info_id = None
    if info is not None:
        if not isinstance(info, simdjson.Object):
            return None
        names = list(info.keys())
        if names.count("type") > 1 or names.count("id") > 1:
            return None
        info_type, info_id = info.get("type"), info.get("id")
    if data == NOT_AVAILABLE_TEXT:
        return Result(Verdict.NOT_AVAILABLE)
    if (
        info is None
        or not isinstance(data, simdjson.Array)
        or info_type not in SUBJECT_TYPES
        or not isinstance(info_id, str | int)
        or isinstance(info_id, bool)
    ):
        return None
    return Result(Verdict.DATA, info_type=info_type, info_id=info_id)


def _json_error(exc: Exception) -> str:
    """yajl's message without the excerpt of the body (it may hold an e-mail address)."""
    text = exc.args[0] if exc.args else str(exc)
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    first = str(text).strip().splitlines()[0] if str(text).strip() else "invalid JSON"
    return f"invalid JSON: {first}"
