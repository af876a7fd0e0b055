"""One MIME message read from the start of its text: is it one, its headers decoded
(RFC 2047), a text excerpt from its parts, the names of its attachments.

The structure is parsed with the compat32 policy and only the headers shown are decoded with
email.policy.default (RFC 2047 and all): the default policy parses every header the parser
touches, Content-Type dozens of times per message, which costs 5x more.
"""

from __future__ import annotations

import base64
import binascii
import email.header
import email.policy
import email.utils
import functools
import quopri
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import Message as MimePart
from email.parser import Parser
from typing import Any

from service.answer.report.caps import BODY_PREFIX, HEADER_CHARS, MIME_PREFIX
from service.answer.report.cells import Long, cell, clean, cut
from service.answer.report.dates import parse_time, time_of
from service.answer.report.text import excerpt, html_text, squeeze

_DEFAULT = email.policy.default
_MIME_PARSER = Parser(policy=email.policy.compat32)
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


@dataclass
class Message:
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


def mime_head(text: str) -> str | None:
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


def raw_date_and_subject(head: str) -> tuple[datetime | None, str | None]:
    """The Date (parsed) and the Subject (still RFC 2047 encoded) of a header block, found
    without parsing the message: fast enough for every message beyond those shown."""
    found = _DATE_HEADER.search(head)
    subject = _SUBJECT_HEADER.search(head)
    return (
        parse_date(found.group(1)) if found else None,
        subject.group(1) if subject else None,
    )


def read_message(text: str, details: dict[str, Any]) -> Message:
    """Headers, a text excerpt and attachment names from the start of one MIME message;
    `details` are the record's other fields, beside the message."""
    size = text.full_length if isinstance(text, Long) else len(text)
    message = _MIME_PARSER.parsestr(text[:MIME_PREFIX])
    raw_date = message.get("date")
    sent = parse_date(str(raw_date)) if raw_date is not None else None
    if sent is None:
        sent = parse_time(time_of(details))
    shown, source, attachments = _body_of(message)
    return Message(
        sent=sent,
        sent_text=clean(cut(str(raw_date or time_of(details) or ""), 100)),
        sender=cut(decode_header("from", message.get("from"))),
        recipient=cut(decode_header("to", message.get("to"))),
        subject=cut(decode_header("subject", message.get("subject"))),
        excerpt=shown,
        excerpt_source=source,
        attachments=attachments[:20],
        size=size,
        details=[(clean(cut(str(k), 100)), cell(v)) for k, v in details.items()][:20],
    )


def decode_header(name: str, raw: Any) -> str:
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
    return clean(squeeze(text))


def parse_date(raw: str) -> datetime | None:
    """An RFC 5322 Date header as a UTC moment (no zone: UTC); None when it is not one."""
    try:
        moment = email.utils.parsedate_to_datetime(raw.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _body_of(message: MimePart) -> tuple[str, str, list[str]]:
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
            attachments.append(clean(cut(str(name), 100)) if name else ctype)
            continue
        if ctype == "text/plain" and plain is None:
            plain = _part_text(part)
        elif ctype == "text/html" and html is None:
            html = _part_text(part)
    if plain and plain.strip():
        return excerpt(plain), "text", attachments
    if html:
        text = html_text(html)
        if text:
            return excerpt(text), "html", attachments
    return "", "", attachments


def _part_text(part: MimePart) -> str:
    """The start of one text part, its transfer encoding and charset undone."""
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
