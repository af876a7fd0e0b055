"""What an item of `data` is, told from what it looks like: a message, an open, a click, a
survey answer, or another record.

Copernica documents `data` only as "an array of arrays with all the info we have found:
complete MIMEs that were sent, opens and clicks information, completed surveys, etc." The
shapes are not documented, so every value is recognised by what it looks like, never by its
place; whatever is not recognised is another record, shown as a generic table.
"""

from __future__ import annotations

from typing import Any

from service.answer.report.mime import mime_head

_KIND_FIELDS = ("type", "event", "kind", "action")
_OPEN = frozenset({"open", "opens", "opened", "impression", "impressions", "view"})
_CLICK = frozenset({"click", "clicks", "clicked"})
_SURVEY = frozenset({"survey", "surveys", "form", "forms", "answer", "answers"})


def kind_of(record: dict[str, Any]) -> tuple[str | None, str | None]:
    """(the field that names the record's kind, that kind stripped), or (None, None)."""
    for name in _KIND_FIELDS:
        value = record.get(name)
        if isinstance(value, str) and value.strip():
            return name, value.strip()
    return None, None


def section_of(kind: str | None) -> str | None:
    """The section ("open", "click" or "survey") a record of this kind belongs in, or None."""
    name = kind.lower() if kind else ""
    if name in _OPEN:
        return "open"
    if name in _CLICK:
        return "click"
    if name in _SURVEY:
        return "survey"
    return None


def message_in(record: dict[str, Any]) -> tuple[str, str, str] | None:
    """(key, message, its header block) of the first member that holds a MIME message."""
    for key, value in record.items():
        head = mime_head(value) if isinstance(value, str) else None
        if head is not None:
            return key, value, head
    return None
