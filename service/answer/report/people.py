"""The person as Copernica's profiles and subprofiles describe them ("Your details"), and the
places the answer looked ("Where we looked"), in plain words.

A source's details are its `GET profile/{id}` / `GET subprofile/{id}` answer (SPEC "Finding
the person"): `{"ID", "fields": {name: value}, "interests", "created", "modified", ...}`, a
subprofile's with `profile` and `collection`. Each is read whole (it is one record, capped at
`DETAILS_BYTES`) and kept only as cut cells; a shape nobody documented is shown as it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from service.answer.report.caps import COLUMN_CAP, ITEM_ENTRIES
from service.answer.report.cells import cell, clean, cut, describe
from service.answer.report.context import ReportContext, SourceFact

DETAILS_BYTES = 1024 * 1024  # of one source's details read for the report (the file has all)

STATUS_WORDS = {
    "archived": "collected",
    "gone": "removed before we could collect it",
    "unsupported": "this kind of request is not offered by our e-mail provider",
    "failed": "our e-mail provider could not collect it",
    "expired": "our e-mail provider did not deliver it in time",
}


@dataclass
class Record:
    """One profile or subprofile as the report shows it."""

    fields: list[tuple[str, str]] = field(default_factory=list)
    interests: list[str] = field(default_factory=list)
    created: str = ""
    modified: str = ""
    profile: str | None = None  # a subprofile's profile number, as its details say
    note: str = ""  # why something is not shown


def read_details(body: bytes, complete: bool) -> Record:
    """A source's details (its first DETAILS_BYTES when not `complete`) as a Record."""
    if not complete:
        return Record(note="This record is too long to show here; it is in its details.json.")
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return Record(note="This record could not be read; it is in its details.json as it came.")
    if not isinstance(raw, dict):
        return Record(fields=[("Record", describe(raw))])
    record = Record(
        interests=_interests(raw.get("interests")),
        created=cell(raw["created"]) if raw.get("created") else "",
        modified=cell(raw["modified"]) if raw.get("modified") else "",
        profile=str(raw["profile"]) if raw.get("profile") not in (None, "") else None,
    )
    fields = raw.get("fields")
    if isinstance(fields, dict):
        for n, (name, value) in enumerate(fields.items()):
            if n >= ITEM_ENTRIES:
                record.note = f"{len(fields) - n:,} more fields are in its details.json."
                break
            record.fields.append((cut(clean(str(name)), 100), cell(value)))
    elif fields is not None:
        record.fields.append(("Fields", describe(fields)))
    return record


def _interests(raw: Any) -> list[str]:
    """Interests as names: a list of names or of objects with a name, or {name: yes/no}."""
    if isinstance(raw, dict):
        names = [name for name, value in raw.items() if value not in (False, 0, "", None, "0")]
    elif isinstance(raw, list):
        names = [
            item.get("name", describe(item)) if isinstance(item, dict) else item for item in raw
        ]
    else:
        return []
    return [cell(name) for name in names[: COLUMN_CAP * 5]]


def place_of(fact: SourceFact) -> str:
    """Where a source is, in words: never the address itself."""
    if fact.kind == "email":
        return "your e-mail address"
    database = f"database {fact.database}" if fact.database else "a database"
    if fact.kind == "subprofile":
        collection = f"collection {fact.collection}" if fact.collection else "a collection"
        return f"subprofile {fact.id} in {collection} of {database}"
    return f"{fact.kind} {fact.id} in {database}"


def looked_view(ctx: ReportContext) -> list[dict[str, str]]:
    """'Where we looked': each source and what became of it."""
    if not ctx.sources:  # a context from before sources: the filed subject alone
        place = "your e-mail address" if ctx.subject_type == "email" else ctx.subject_label
        return [{"place": place, "status": "collected", "found_by": "", "final": "archived"}]
    return [
        {
            "place": place_of(fact),
            "status": STATUS_WORDS.get(fact.status, "not collected"),
            "found_by": cut(clean(fact.found_by), 100) if fact.found_by else "",
            "final": fact.status,
        }
        for fact in ctx.sources
    ]


def details_view(ctx: ReportContext, records: dict[str, Record]) -> list[dict[str, Any]]:
    """'Your details': each collected profile under its database's name with its subprofiles
    under their collections' names; a subprofile whose profile is not a source on its own."""
    facts = [f for f in ctx.sources if f.kind != "email" and f.status == "archived"]
    profiles = {f.id: _entry(f, records.get(f.source)) for f in facts if f.kind == "profile"}
    shown: list[dict[str, Any]] = list(profiles.values())
    for fact in facts:
        if fact.kind != "subprofile":
            continue
        entry = _entry(fact, records.get(fact.source))
        owner = fact.profile or entry["profile"]
        if owner is not None and owner in profiles:
            profiles[owner]["subprofiles"].append(entry)
        else:
            entry["title"] = f"{entry['title']} (in {_database(fact)})"
            shown.append(entry)
    return shown


def _entry(fact: SourceFact, record: Record | None) -> dict[str, Any]:
    if record is None:
        record = Record(note="Its record itself was not collected.")
    title = (fact.collection if fact.kind == "subprofile" else fact.database) or ""
    return {
        "title": title or (f"A {fact.kind} with no name" if fact.kind else "A record"),
        "label": f"{fact.kind} {fact.id}",
        "fields": record.fields,
        "interests": record.interests,
        "created": record.created,
        "modified": record.modified,
        "note": record.note,
        "profile": record.profile,
        "subprofiles": [],
    }


def _database(fact: SourceFact) -> str:
    return f"database {fact.database}" if fact.database else "a database"
