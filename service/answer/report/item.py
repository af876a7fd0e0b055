"""One item (an element of an inner array of `data`) built from the JSON parser's events,
with caps on depth, breadth and characters: what an item held beyond them is counted and
stands as one `Skipped` value, a string beyond MIME_PREFIX as its `Long` start."""

from __future__ import annotations

from typing import Any

from service.answer.report.caps import ITEM_CHARS, ITEM_DEPTH, ITEM_ENTRIES, MIME_PREFIX
from service.answer.report.cells import Long, Skipped

STARTS = frozenset({"start_map", "start_array"})
ENDS = frozenset({"end_map", "end_array"})


class ItemBuilder:
    """Builds one item from parser events; `reset()` before the next."""

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
        events per open or click), so the common cases come first and nothing is a call:
        that is why it is one long function."""
        if self._skip:
            if event in STARTS:
                self._skip += 1
            elif event in ENDS:
                self._skip -= 1
            return not self._skip and not self._stack
        if event == "map_key":
            self._key = value
            return False
        stack = self._stack
        if event in ENDS:
            container = stack.pop()
            skipped = self._skipped.pop(id(container), 0) if self._skipped else 0
            if skipped:
                if isinstance(container, dict):
                    container["…"] = Skipped(skipped)
                else:
                    container.append(Skipped(skipped))
            return not stack
        if stack:
            container = stack[-1]
            if len(container) >= ITEM_ENTRIES or self._chars >= ITEM_CHARS:
                self._skipped[id(container)] = self._skipped.get(id(container), 0) + 1
                if event in STARTS:
                    self._skip = 1
                return False
        if event in STARTS:
            if len(stack) >= ITEM_DEPTH:  # shown as "… 1 more value" in its container
                self._skipped[id(container)] = self._skipped.get(id(container), 0) + 1
                self._skip = 1
                return False
            value = {} if event == "start_map" else []
        elif value.__class__ is str:
            if len(value) > MIME_PREFIX:
                value = Long(value[:MIME_PREFIX], len(value))
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
        if event in STARTS:
            stack.append(value)
            return False
        return not stack

    def partial(self) -> Any:
        """What was built of an item the input broke off in (its open containers stay)."""
        return self.root
