"""The view model: everything the template shows, as plain values (dates in words, counts,
cut cells, the chart's geometry), made from the request's facts, the walk and the findings.
The template only lays them out."""

from __future__ import annotations

from collections import Counter
from typing import Any

from service.answer.report.caps import ROW_CAP
from service.answer.report.cells import cell, clean, cut, describe
from service.answer.report.chart import SERIES, chart
from service.answer.report.context import ReportContext
from service.answer.report.dates import day_text, last_day, moment_text, month_text
from service.answer.report.findings import Findings
from service.answer.report.mime import Message
from service.answer.report.people import Record, details_view, looked_view
from service.answer.report.tables import MORE, Table
from service.answer.report.walk import ArchiveWalker
from service.answer.statement import HEADINGS, TEXTS

# Friendly column titles for keys Copernica is known to use; others keep their own name.
COLUMN_TITLES = {
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
    MORE: "Other fields",
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


def report_view(
    ctx: ReportContext, found: Findings, walks: list[ArchiveWalker], records: dict[str, Record]
) -> dict[str, Any]:
    """The template's `report` (`walks`: one per data file, the first source's first)."""
    problems = [w.problem for w in walks if w.problem]
    extra = [name for w in walks for name in w.extra_members]
    info = walks[0].info if walks else None
    counts = found.counts
    messages = sorted(
        found.messages,
        key=lambda m: (m.sent is None, m.sent.timestamp() if m.sent else 0.0),
    )
    events_total = sum(found.event_types.values())
    return {
        "request_id": ctx.request_id,
        "controller": ctx.controller,
        "subject_label": ctx.subject_label,
        "received_on": day_text(ctx.received_on),
        "due_by": day_text(ctx.due_by),
        "generated_at": moment_text(ctx.generated_at),
        "events_asked": ctx.events_range is not None,
        "events_from": day_text(ctx.events_range[0]) if ctx.events_range else "",
        "events_to": day_text(last_day(ctx.events_range[1])) if ctx.events_range else "",
        "problem": " ".join(problems),
        "notes": _notes(found.budget_hit, extra[:20]),
        "counts": [
            {"label": "Messages sent to you", "count": counts["messages"]},
            {"label": "Times a message was opened", "count": counts["opens"]},
            {"label": "Links clicked", "count": counts["clicks"]},
            {"label": "Survey answers", "count": counts["surveys"]},
            {"label": "Other records", "count": counts["other"]},
            {"label": "Events", "count": events_total},
        ],
        "event_types": _event_types(found.event_types),
        "event_total": events_total,
        "months": month_rows(found.months, found.undated),
        "chart": chart(found.months),
        "messages": [message_view(m, n) for n, m in enumerate(messages, 1)],
        "message_total": counts["messages"],
        "message_more": counts["messages"] - len(messages),
        "tables": _tables(found, events_asked=ctx.events_range is not None),
        "info": describe(info) if info is not None else "",
        "data_files": [w.name for w in walks],
        "several": len(ctx.sources) > 1,
        "people": details_view(ctx, records),
        "looked": looked_view(ctx),
        "statement": statement_view(ctx),
    }


def statement_view(ctx: ReportContext) -> dict[str, Any]:
    """The article-15 block: the company's texts under the service's headings, in paragraphs."""
    language = ctx.language if ctx.language in HEADINGS else "en"
    headings = HEADINGS[language]
    texts = ctx.statement.texts(language)
    contact = ctx.statement.contact
    return {
        "lang": language,
        "title": headings["title"],
        "intro": headings["intro"],
        "parts": [
            {
                "id": name,
                "heading": headings[name],
                "paragraphs": [p.strip() for p in getattr(texts, name).split("\n\n") if p.strip()],
            }
            for name in TEXTS
        ],
        "authority_heading": headings["authority"],
        "authority": {"name": ctx.statement.authority.name, "url": ctx.statement.authority.url},
        "contact_heading": headings["contact"],
        "contact": {"name": contact.name, "email": contact.email, "address": contact.address},
    }


def _tables(found: Findings, *, events_asked: bool) -> list[dict[str, Any]]:
    tables = [
        table_view(found.tables["open"], "opens", "opens"),
        table_view(found.tables["click"], "clicks", "clicks"),
        table_view(found.tables["survey"], "survey answers", "surveys"),
    ]
    if events_asked:
        tables.append(table_view(found.event_table, "events", "events"))
    tables += [
        table_view(table, "records", f"other-{n}", first_other=n == 1)
        for n, table in enumerate(found.others.values(), 1)
    ]
    return tables


def _event_types(event_types: Counter[str]) -> list[dict[str, Any]]:
    """The documented types in Copernica's order, zeros included; then any others found."""
    return [
        {"type": kind, "label": label, "meaning": meaning, "count": event_types[kind]}
        for kind, (label, meaning) in EVENT_TYPES.items()
    ] + [
        {
            "type": kind,
            "label": kind,
            "meaning": "a kind of event Copernica does not describe",
            "count": n,
        }
        for kind, n in sorted(event_types.items(), key=lambda kv: (-kv[1], kv[0]))
        if kind not in EVENT_TYPES
    ]


def _notes(budget_hit: bool, extra_members: list[str]) -> list[str]:
    notes = []
    if budget_hit:
        notes.append(
            "This report reached its size limit, so some tables stop early; "
            "everything is counted above and is in data.json."
        )
    if extra_members:
        names = ", ".join(cell(name) for name in extra_members)
        notes.append(
            f"data.json also holds parts named {names}; what they hold is shown "
            "with the records below."
        )
    return notes


def table_view(table: Table, noun: str, anchor: str, first_other: bool = False) -> dict[str, Any]:
    """One table as the template shows it: friendly headers, rows by time where they have
    one, and how many rows are not shown."""
    rows = table.rows
    if table.sort_by_time and "time" in table.columns:
        rows = sorted(rows, key=lambda row: row.get("time", ""))
    return {
        "title": table.title,
        "intro": table.intro,
        "headers": [
            COLUMN_TITLES.get(name.lower(), cut(clean(name), 100)) for name in table.columns
        ],
        "rows": [[row.get(name, "") for name in table.columns] for row in rows],
        "total": table.total,
        "more": table.total - len(table.rows),
        "noun": noun,
        "id": anchor,
        "first_other": first_other,
    }


def message_view(message: Message, number: int) -> dict[str, Any]:
    return {
        "number": number,
        "sent": moment_text(message.sent) if message.sent else message.sent_text or "unknown",
        "sender": message.sender or "unknown",
        "recipient": message.recipient or "unknown",
        "subject": message.subject or "(no subject)",
        "excerpt": message.excerpt,
        "from_html": message.excerpt_source == "html",
        "attachments": message.attachments,
        "size": size_text(message.size),
        "details": message.details,
    }


def month_rows(months: dict[str, Counter[str]], undated: Counter[str]) -> list[dict[str, Any]]:
    """The month table: every month with a count, in order, then the undated counts."""
    rows = [
        {"label": month_text(month), "values": [months[month][s] for s, _ in SERIES]}
        for month in sorted(months)
    ]
    if any(undated[s] for s, _ in SERIES):
        rows.append({"label": "Date unknown", "values": [undated[s] for s, _ in SERIES]})
    return rows[:ROW_CAP]


def size_text(size: int) -> str:
    if size < 1024:
        return f"{size} bytes"
    if size < 1024 * 1024:
        return f"{size / 1024:.0f} KB"
    return f"{size / (1024 * 1024):.1f} MB"
