"""Deterministic data-request payloads of any size, generated as a stream of chunks.

The shape is Copernica's ready payload: `{"info": {"type", "id"}, "data": [[...], ...]}`,
where each inner array holds what was found about one mailing: the complete MIME message
sent, its opens and clicks, sometimes a survey answer. The same spec always gives the same
bytes, so a test can compute what an archive must hold without storing it.

Size is the point: a payload can be hundreds of MB (SPEC), so nothing here holds more than a
few mailings. A payload draws a small pool of distinct mailings at random and then repeats
them with a running counter in every Message-ID, subject and link, the way a long-time
subscriber's history repeats one newsletter. Because a mailing's length depends only on its
pool entry and the counter's digits, the exact size is known without generating the bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

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

    @property
    def info_id(self) -> str | int:
        """The subject as Copernica reports it: an e-mail string or a number."""
        if self.subject_type == "email":
            return "someone.else@example.net" if self.wrong_subject else self.subject_id
        number = int(self.subject_id)
        return number + 1 if self.wrong_subject else number


def _php_json(value: Any) -> str:
    """JSON as PHP's json_encode writes it by default: compact, non-ASCII as \\uXXXX and
    `/` as `\\/`. Copernica is a PHP shop; a receiver must keep such bytes exactly as sent."""
    return json.dumps(value, separators=(",", ":")).replace("/", "\\/")


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


def _mime(rng: random.Random, k: int, to: str) -> str:
    """A complete sent message: headers, text and HTML alternatives, now and then a PDF."""
    n = _COUNTER
    boundary = f"=_b{rng.getrandbits(48):012x}"
    text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(40, 160)))
    lines = [
        f"Return-Path: <bounce-{n}@mail.shop.test>",
        f"Message-ID: <{rng.getrandbits(64):016x}.{n}@mail.shop.test>",
        f"Date: Mon, {1 + k % 28:02d} Jun 2026 10:{k * 3 % 60:02d}:00 +0000",
        "From: Shop Newsletter <news@shop.test>",
        f"To: <{to}>",
        f"Subject: Weekly offers #{n}",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/mixed; boundary="{boundary}"',
        "",
        f"--{boundary}",
        f'Content-Type: multipart/alternative; boundary="{boundary}a"',
        "",
        f"--{boundary}a",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        text,
        f"--{boundary}a",
        "Content-Type: text/html; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        f'<html><body><p>{text}</p><a href="https://shop.test/o/{n}">Shop</a></body></html>',
        f"--{boundary}a--",
    ]
    if k % 5 == 0:
        blob = base64.encodebytes(rng.randbytes(rng.randint(2000, 12000))).decode()
        lines += [
            f"--{boundary}",
            'Content-Type: application/pdf; name="offer.pdf"',
            "Content-Transfer-Encoding: base64",
            'Content-Disposition: attachment; filename="offer.pdf"',
            "",
            blob.replace("\n", "\r\n").rstrip(),
        ]
    lines.append(f"--{boundary}--")
    return "\r\n".join(lines)


def _mailing(rng: random.Random, k: int, to: str) -> list[bytes]:
    """Pool entry k: one mailing's JSON array, split where its counter goes."""
    day = f"2026-06-{1 + k % 28:02d}"
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
            else f"{spec.subject_type}-{spec.subject_id}@customers.shop.test"
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
