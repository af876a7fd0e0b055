"""The archive's bytes, fed in chunks, walked into items: ijson's push parser (yajl in C)
turns bytes into events, the structure outside items (the top object, `data` and the arrays
inside it) is tracked here, and each item is built alone by an `ItemBuilder`, so nothing
holds the archive whole. Damage (bad JSON, bad UTF-8, an early end, a value too long) stops
the walk and is kept, in words, as `problem`: what was read before it still counts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ijson

from service.answer.report.caps import GROUP_DEPTH, MAX_TOKEN
from service.answer.report.cells import clean, cut
from service.answer.report.item import ENDS, ItemBuilder

try:  # yajl in C, not the pure-Python backend ijson falls back to
    _IJSON: Any = ijson.get_backend("yajl2_c")
except ImportError:  # pragma: no cover - the wheel ships it on every platform we run on
    _IJSON = ijson  # ijson itself picks the best backend available

FEED_BLOCK = 2 * 1024 * 1024  # bytes handed to yajl at once, at least (see ArchiveWalker.feed)


class ArchiveWalker:
    """Feed the archive's bytes in order, then `close()`. Every item of `data` goes to
    `on_item` as it completes; `on_group_edge` is called where an array inside `data` starts
    or ends (what an array holds belongs together: a message and its opens)."""

    def __init__(
        self,
        on_item: Callable[[Any], None],
        on_group_edge: Callable[[], None],
        *,
        block_bytes: int = FEED_BLOCK,
        name: str = "data.json",
    ) -> None:
        self.name = name  # the file walked, as its problems name it
        self._on_item = on_item
        self._on_group_edge = on_group_edge
        self._block_bytes = block_bytes
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._fed = 0
        self._since_event = 0
        self._events: Any = ijson.utils.sendable_list()
        self._parser: Any = _IJSON.basic_parse_coro(self._events, use_float=True)
        self._closed = False
        self.problem: str | None = None  # what stopped the walk, in words
        self.info: Any = None  # the `info` member, built like an item
        self.extra_members: list[str] = []  # top-level members beside info and data
        # Where the parser stands outside items: "map" for the top object, "array" for
        # `data` and the arrays inside it; the item builder takes over inside an item.
        self._stack: list[str] = []
        self._key: str | None = None
        self._building: str | None = None  # "info" or "item" while a builder runs
        self._builder = ItemBuilder()

    def feed(self, chunk: bytes) -> None:
        """The next bytes of the archive, any size. yajl re-reads a token that spans two
        calls from its start, so a 1 MiB message fed in 64 KiB pieces would be lexed 8 times
        over (measured: 30 MB/s instead of 200). So bytes are passed on in blocks of at least
        `block_bytes`, and while one token goes on (no event came from the last blocks) each
        block is as long as that token so far: re-reading stays linear for any length."""
        if self._closed or self.problem is not None:
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

    def close(self) -> None:
        """The input ended: finish the walk (once), and say why if it ended too early."""
        if self._closed:
            return
        self._flush()
        self._closed = True
        if self._fed == 0:
            self.problem = f"The file {self.name} is empty."
        elif self.problem is None:
            try:
                self._parser.close()
            except ijson.IncompleteJSONError:
                self.problem = f"The file {self.name} ends too early: its last part is missing."
            except ijson.JSONError as exc:
                self.problem = _damage(exc, self.name)
            self._consume()
        if self._building is not None:  # the input broke off inside an item: show its start
            self._finish_item(self._builder.partial())

    def _flush(self) -> None:
        if not self._pending:
            return
        block = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending, self._pending_bytes = [], 0
        self._fed += len(block)
        try:
            self._parser.send(block)
        except ijson.JSONError as exc:
            self.problem = _damage(exc, self.name)
        except UnicodeDecodeError:
            self.problem = f"The file {self.name} holds text that is not valid UTF-8."
        finally:
            self._consume()
        self._since_event = self._since_event + len(block) if not self._events else 0
        self._events.clear()
        if self.problem is None and self._since_event > MAX_TOKEN:
            self.problem = (
                f"One value in {self.name} is longer than {MAX_TOKEN // (1024 * 1024)} MiB; "
                "it and what follows it are not shown here."
            )

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
                    and len(self.extra_members) < 20
                ):
                    self.extra_members.append(value)
                continue
            if event in ENDS:
                stack.pop()
                self._on_group_edge()
                continue
            top = stack[-1] if stack else None
            if top is None and event == "start_map":
                stack.append("map")
                continue
            is_info = top == "map" and self._key == "info"
            if event == "start_array" and not is_info and len(stack) <= GROUP_DEPTH:
                stack.append("array")
                self._on_group_edge()
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
        else:
            self._on_item(value)


def _damage(exc: Exception, name: str) -> str:
    """What broke, in words, with yajl's first line (not its excerpt of the body)."""
    text = exc.args[0] if exc.args else str(exc)
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    first = str(text).strip().splitlines()[0] if str(text).strip() else "invalid JSON"
    return (
        f"The file {name} is damaged after some point, so this report shows only what "
        f"could be read before it (technical detail: {clean(cut(first, 200))})."
    )
