"""A value as the text a reader sees in one table cell: control characters replaced, cut to
a length with an ellipsis, nested values as compact JSON; and the two stand-ins an item holds
for what it did not keep (`Long`, `Skipped`), shown as such."""

from __future__ import annotations

import json
import re
from typing import Any

from service.answer.report.caps import CELL_CHARS

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


class Long(str):
    """The start of a string too long to keep whole, and how long it was."""

    full_length: int

    def __new__(cls, text: str, full_length: int) -> Long:
        self = super().__new__(cls, text)
        self.full_length = full_length
        return self


class Skipped:
    """Stands for values an item held beyond its caps (they are in data.json)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __str__(self) -> str:
        return f"… {self.count:,} more value{'s' if self.count != 1 else ''}, see data.json"


def clean(text: str) -> str:
    """Text safe to put in the page: no control characters, no lone surrogates."""
    return _CONTROL.sub("\ufffd", text)


def cut(text: str, limit: int = CELL_CHARS) -> str:
    if len(text) <= limit:
        return text
    return text[:limit].rstrip() + "…"


def cell(value: Any) -> str:
    """A value as the text of one table cell: nested values as compact JSON, cut."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Long):
        return clean(cut(value)) + f" ({value.full_length:,} characters in all)"
    if isinstance(value, str):
        return clean(cut(value))
    if isinstance(value, int | float | Skipped):
        return str(value)
    return clean(cut(compact(value)))


def compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def describe(value: Any) -> str:
    """A record as one line of `key: value` pairs, for details beside a table or message."""
    if isinstance(value, dict):
        parts = [f"{key}: {cell(item)}" for key, item in value.items()]
        return cut(clean("; ".join(parts)), CELL_CHARS * 2)
    return cell(value)
