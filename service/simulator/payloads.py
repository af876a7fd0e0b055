"""Deterministic data-request payloads of any size, generated as a stream of chunks.

The shape is Copernica's ready payload: `{"info": {"type", "id"}, "data": [[...], ...]}`,
where each inner array holds what was found about one mailing: the complete MIME message
sent, its opens and clicks, sometimes a survey answer. The messages are as newsletters send
them, so a report has something true to render: RFC 2047 subjects and senders (Q and B),
text and HTML alternatives, HTML alone or text alone, in 8bit, quoted-printable or base64,
now and then a PDF. The same spec always gives the same bytes, so a test can compute what an
archive must hold without storing it.

Size is the point: a payload can be hundreds of MB (SPEC), so nothing here holds more than a
few mailings. A payload draws a small pool of distinct mailings at random and then repeats
them with a running counter in every Message-ID, subject and link, the way a long-time
subscriber's history repeats one newsletter. Because a mailing's length depends only on its
pool entry and the counter's digits, the exact size is known without generating the bytes.
"""

from __future__ import annotations

import base64
import hashlib
import quopri
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from email.utils import format_datetime
from html import escape
from typing import Any

from service.simulator.account import php_json

CHUNK = 64 * 1024  # every chunk is exactly this long, except the last
POOL = 16  # distinct mailings per payload; later ones repeat these with a new counter
_COUNTER = "~N~"  # stands for the mailing's number inside a pool entry; never occurs otherwise


@dataclass(frozen=True)
class PayloadSpec:
    """Everything the bytes of one payload depend on."""

    subject_type: str  # email | profile | subprofile
    subject_id: str  # as given to the create call
    copernica_id: str
    size: int  # target size in bytes; the payload is at least this long (one mailing more)
    wrong_subject: bool = False  # info.id names someone else
    malformed: bool = False  # the closing brackets never come
    seed: int = 0
    # The address the mailings went to, for a profile or subprofile (its e-mail field);
    # None: a made-up one (`profile-7@customers.shop.test`).
    to: str | None = None

    @property
    def info_id(self) -> str | int:
        """The subject as Copernica reports it: an e-mail string or a number."""
        if self.subject_type == "email":
            return "someone.else@example.net" if self.wrong_subject else self.subject_id
        number = int(self.subject_id)
        return number + 1 if self.wrong_subject else number


def _php_json(value: Any) -> str:
    """JSON as Copernica's PHP writes it (`\\uXXXX`, `\\/`): a receiver must keep such bytes
    exactly as sent."""
    return php_json(value).decode()


_WORDS = (
    "offer",
    "summer",
    "sale",
    "garden",
    "shoes",
    "discount",
    "new",
    "collection",
    "free",
    "shipping",
    "today",
    "only",
    "members",
    "exclusive",
    "jacket",
    "coffee",
    "café",
    "Grüße",
    "één",
    "naïve",
)
_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "Microsoft Office/16.0 (Microsoft Outlook 16.0.17726; Pro)",
    "Mozilla/5.0 (X11; Linux x86_64; rv:127.0) Gecko/20100101 Thunderbird/115.12",
)


# Subjects and sender names as newsletters have them: plain ASCII, or UTF-8 in RFC 2047
# encoded-words, Q ("=?utf-8?q?Gr=C3=BC=C3=9Fe?=") or B (base64) encoded, emoji included.
_SUBJECTS = (
    ("Weekly offers", None),
    ("Grüße aus dem Café: unsere Herbstauswahl", "q"),
    ("Summer sale ☀️ up to 50% off", "b"),
    ("Your order is on its way 🎉", "b"),
    ("Nieuwe collectie: één keer per jaar", "q"),
    ("Last chance: free shipping today", None),
    ("Naïve question: coffee or tea? ☕", "b"),
    ("Crème brûlée recipes inside", "q"),
)
_SENDERS = (("Shop Newsletter", None), ("Café Zoë", "q"), ("Shop · Members", "b"))
_FIRST_MAILING = date(2026, 1, 6)  # pool entry k is sent 11 k days later: half a year of mail


def _encoded_word(text: str, how: str) -> str:
    data = text.encode()
    if how == "b":
        return f"=?utf-8?b?{base64.b64encode(data).decode()}?="
    safe = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!*+-/"
    q = "".join(
        chr(byte) if byte in safe else "_" if byte == 32 else f"={byte:02X}" for byte in data
    )
    return f"=?utf-8?q?{q}?="


def _header_text(text: str, how: str | None) -> str:
    """`text` as a header value: as is, or RFC 2047 encoded-words of at most 60 characters
    folded onto continuation lines (a decoder joins adjacent words, dropping the fold)."""
    if how is None:
        return text
    words, piece = [], ""
    for char in text:
        if piece and len(_encoded_word(piece + char, how)) > 60:
            words.append(_encoded_word(piece, how))
            piece = ""
        piece += char
    words.append(_encoded_word(piece, how))
    return "\r\n ".join(words)


def _quoted_printable(text: str) -> str:
    """Quoted-printable, line by line, so that a counter (plain ASCII) is never split by a
    soft line break nor encoded: it is substituted in the JSON text after encoding."""
    lines = []
    for line in text.split("\n"):
        pieces = [
            quopri.encodestring(piece.encode(), quotetabs=False).decode()
            for piece in line.split(_COUNTER)
        ]
        lines.append(_COUNTER.join(pieces).replace("\n", "\r\n"))
    return "\r\n".join(lines)


def _base64_body(text: str) -> str:
    blob = base64.encodebytes(text.encode()).decode()
    return blob.replace("\n", "\r\n").rstrip()


def _part(content_type: str, encoding: str, text: str) -> list[str]:
    """One leaf entity: its headers, a blank line, its body in `encoding`."""
    if encoding == "quoted-printable":
        body = _quoted_printable(text)
    elif encoding == "base64":
        body = _base64_body(text.replace(_COUNTER, "0"))  # no counter inside base64
    else:
        body = text.replace("\n", "\r\n")
    return [f"Content-Type: {content_type}", f"Content-Transfer-Encoding: {encoding}", "", body]


def _multipart(subtype: str, boundary: str, parts: list[list[str]]) -> list[str]:
    lines = [f'Content-Type: multipart/{subtype}; boundary="{boundary}"', ""]
    lines.append("This is a multi-part message in MIME format.")
    for part in parts:
        lines += [f"--{boundary}", *part]
    lines.append(f"--{boundary}--")
    return lines


def _paragraph(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(20, 70))]
    words[0] = words[0][:1].upper() + words[0][1:]
    return " ".join(words) + "."


def _mime(rng: random.Random, k: int, to: str) -> str:
    """A complete sent message, as newsletters are: multipart/alternative (text and HTML),
    HTML only, or text only, in 8bit, quoted-printable or base64, now and then with a PDF.
    It stays one function: the message is written top to bottom as it will be read."""
    n = _COUNTER
    boundary = f"=_b{rng.getrandbits(48):012x}"
    subject, subject_encoding = _SUBJECTS[k % len(_SUBJECTS)]
    sender, sender_encoding = _SENDERS[k % len(_SENDERS)]
    paragraphs = [_paragraph(rng) for _ in range(rng.randint(1, 3))]
    sent = datetime.combine(
        _FIRST_MAILING + timedelta(days=11 * k), datetime.min.time(), timezone(timedelta(hours=1))
    ).replace(hour=10, minute=k * 3 % 60)
    text = "\n\n".join(
        [
            "Hello,",
            *paragraphs,
            f"See all offers: https://shop.test/o/{n}",
            "You receive this e-mail because you subscribed at shop.test.\n"
            "Unsubscribe: https://shop.test/unsubscribe",
        ]
    )
    html = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html><head><meta charset="utf-8">',
            f"<title>{escape(subject)}</title>",
            "<style>body{font-family:Arial,sans-serif;color:#222}h1{color:#0a5}</style>",
            "</head><body>",
            f"<h1>{escape(subject)}</h1>",
            *(f"<p>{escape(paragraph)}</p>" for paragraph in paragraphs),
            f'<p><a href="https://shop.test/o/{n}">See all offers</a></p>',
            '<p style="font-size:11px;color:#888">You receive this e-mail because you '
            'subscribed at shop.test. <a href="https://shop.test/unsubscribe">Unsubscribe</a>',
            "</p></body></html>",
        ]
    )
    plain_type, html_type = "text/plain; charset=utf-8", "text/html; charset=utf-8"
    variant = k % 4
    if variant == 0:
        entity = _multipart(
            "alternative",
            f"{boundary}a",
            [_part(plain_type, "8bit", text), _part(html_type, "quoted-printable", html)],
        )
    elif variant == 1:
        entity = _multipart(
            "alternative",
            f"{boundary}a",
            [_part(plain_type, "quoted-printable", text), _part(html_type, "8bit", html)],
        )
    elif variant == 2:  # HTML only, as many newsletters are
        entity = _part(html_type, "base64" if k % 8 == 2 else "quoted-printable", html)
    else:
        entity = _part(plain_type, "quoted-printable", text)
    if k % 5 == 0:
        blob = base64.encodebytes(rng.randbytes(rng.randint(2000, 12000))).decode()
        pdf = [
            'Content-Type: application/pdf; name="offer.pdf"',
            "Content-Transfer-Encoding: base64",
            'Content-Disposition: attachment; filename="offer.pdf"',
            "",
            blob.replace("\n", "\r\n").rstrip(),
        ]
        entity = _multipart("mixed", boundary, [entity, pdf])
    lines = [
        f"Return-Path: <bounce-{n}@mail.shop.test>",
        f"Message-ID: <{rng.getrandbits(64):016x}.{n}@mail.shop.test>",
        f"Date: {format_datetime(sent)}",
        f"From: {_header_text(sender, sender_encoding)} <news@shop.test>",
        f"To: <{to}>",
        f"Subject: {_header_text(subject, subject_encoding)} #{n}",
        "MIME-Version: 1.0",
        f"List-Unsubscribe: <https://shop.test/unsubscribe?m={n}>",
        *entity,
    ]
    return "\r\n".join(lines)


def _mailing(rng: random.Random, k: int, to: str) -> list[bytes]:
    """Pool entry k: one mailing's JSON array, split where its counter goes."""
    day = (_FIRST_MAILING + timedelta(days=11 * k)).isoformat()
    items: list[Any] = [_mime(rng, k, to)]
    for j in range(rng.randint(0, 3)):
        items.append(
            {
                "type": "open",
                "time": f"{day} 11:{j * 7:02d}:{rng.randint(0, 59):02d}",
                "ip": f"192.0.2.{rng.randint(1, 254)}",
                "useragent": rng.choice(_AGENTS),
            }
        )
    for j in range(rng.randint(0, 2)):
        items.append(
            {
                "type": "click",
                "time": f"{day} 12:{j * 7:02d}:{rng.randint(0, 59):02d}",
                "url": f"https://shop.test/o/{_COUNTER}?c={j}",
                "ip": f"198.51.100.{rng.randint(1, 254)}",
                "useragent": rng.choice(_AGENTS),
            }
        )
    if k % 7 == 3:
        items.append(
            {
                "type": "survey",
                "survey": "Customer satisfaction",
                "time": f"{day} 13:00:00",
                "answers": {"How did we do?": rng.randint(1, 5), "Anything else?": _text_of(rng)},
            }
        )
    return [part.encode() for part in _php_json(items).split(_COUNTER)]


def _text_of(rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))


class _Layout:
    """Where every byte of one payload comes from: head, mailings 0..count-1, tail."""

    def __init__(self, spec: PayloadSpec) -> None:
        self.spec = spec
        self._rng = random.Random(
            f"{spec.seed}:{spec.copernica_id}:{spec.subject_type}:{spec.subject_id}"
        )
        self._to = (
            spec.subject_id
            if spec.subject_type == "email"
            else spec.to or f"{spec.subject_type}-{spec.subject_id}@customers.shop.test"
        )
        self._pool: list[list[bytes]] = []
        info = _php_json({"type": spec.subject_type, "id": spec.info_id})
        self.head = b'{"info":' + info.encode() + b',"data":['
        self.tail = b"" if spec.malformed else b"]}"
        self.count, self.size = self._plan()

    def _entry(self, k: int) -> list[bytes]:
        # Drawn in order, so the pool is the same whichever mailing asks first.
        while len(self._pool) <= k:
            self._pool.append(_mailing(self._rng, len(self._pool), self._to))
        return self._pool[k]

    def mailing(self, n: int) -> bytes:
        return str(n).encode().join(self._entry(n % POOL))

    def mailing_size(self, n: int) -> int:
        parts = self._entry(n % POOL)
        return sum(map(len, parts)) + (len(parts) - 1) * len(str(n))

    def _plan(self) -> tuple[int, int]:
        """How many mailings reach the target size, and the exact total, without rendering."""
        total, n = len(self.head), 0
        while total < self.spec.size or n == 0:
            total += (1 if n else 0) + self.mailing_size(n)
            n += 1
        return n, total + len(self.tail)


def payload_chunks(spec: PayloadSpec) -> Iterator[bytes]:
    """The payload as chunks of exactly CHUNK bytes (the last shorter); memory stays small
    for any size."""
    layout = _Layout(spec)
    buffer = bytearray(layout.head)
    for n in range(layout.count):
        if n:
            buffer += b","
        buffer += layout.mailing(n)
        while len(buffer) >= CHUNK:
            yield bytes(buffer[:CHUNK])
            del buffer[:CHUNK]
    buffer += layout.tail
    while buffer:
        yield bytes(buffer[:CHUNK])
        del buffer[:CHUNK]


def payload_size(spec: PayloadSpec) -> int:
    """The exact length of the payload, computed without generating it."""
    return _Layout(spec).size


def payload_bytes(spec: PayloadSpec) -> bytes:
    """The whole payload in memory: for small sizes in tests."""
    return b"".join(payload_chunks(spec))


def payload_digest(spec: PayloadSpec) -> tuple[int, str]:
    """(size, sha256 hex) of a payload, computed by streaming it."""
    digest = hashlib.sha256()
    size = 0
    for chunk in payload_chunks(spec):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


EVENT_TYPES = (
    "attempt",
    "delivery",
    "open",
    "click",
    "error",
    "retry",
    "abuse",
    "unsubscribe",
    "bounce-later",
)  # the last is not in the docs: kept, not dropped


def make_events(
    since: date, until: date, per_day: int, first_id: int = 1, **fields: Any
) -> list[dict[str, Any]]:
    """Events on every day of `[since, until)`, `per_day` each, at spread times including
    00:00:00 and 23:59:59 (the edges of every window), with `fields` (email, profile, tags,
    template, message, ...) in their data."""
    rng = random.Random(f"{since}:{until}:{per_day}:{sorted(fields.items())}")
    found: list[dict[str, Any]] = []
    day = since
    n = first_id
    while day < until:
        for k in range(per_day):
            seconds = 0 if k == 0 else 86399 if k == per_day - 1 else rng.randint(1, 86398)
            moment = datetime.combine(day, datetime.min.time()) + timedelta(seconds=seconds)
            kind = EVENT_TYPES[n % len(EVENT_TYPES)]
            data: dict[str, Any] = {"id": n, "time": moment.strftime("%Y-%m-%d %H:%M:%S"), **fields}
            if kind in ("open", "click"):
                data.update(ip="192.0.2.10", country="NL", city="Amsterdam")
            found.append({"event": kind, "data": data})
            n += 1
        day += timedelta(days=1)
    return found
