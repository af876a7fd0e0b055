"""Deterministic data-request payloads of any size, generated as a stream of chunks.

The shape is Copernica's ready payload: `{"info": {"type", "id"}, "data": [[...], ...]}`,
where each inner array holds what was found about one mailing: the complete MIME message
sent, its opens and clicks, sometimes a survey answer. The same spec always gives the same
bytes, so a test can compute what the archive must hold without storing it.
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

CHUNK = 64 * 1024


@dataclass(frozen=True)
class PayloadSpec:
    subject_type: str  # email | profile | subprofile
    subject_id: str  # as given to the create call
    copernica_id: str
    size: int  # approximate target size in bytes
    wrong_subject: bool = False
    malformed: bool = False

    @property
    def info_id(self) -> str | int:
        if self.subject_type == "email":
            return "someone.else@example.net" if self.wrong_subject else self.subject_id
        number = int(self.subject_id)
        return number + 1 if self.wrong_subject else number


def _mime(rng: random.Random, n: int, to: str) -> str:
    boundary = f"=_b{rng.getrandbits(48):012x}"
    text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(40, 160)))
    parts = [
        f"Return-Path: <bounce-{n}@mail.shop.test>",
        f"Message-ID: <{rng.getrandbits(64):016x}.{n}@mail.shop.test>",
        f"Date: Mon, {1 + n % 28:02d} Jun 2026 10:{n % 60:02d}:00 +0000",
        "From: Shop Newsletter <news@shop.test>",
        f"To: {to}",
        f"Subject: Weekly offers #{n}",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/alternative; boundary="{boundary}"',
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "",
        text,
        f"--{boundary}",
        "Content-Type: text/html; charset=utf-8",
        "",
        f'<html><body><p>{text}</p><a href="https://shop.test/o/{n}">Shop</a></body></html>',
    ]
    if n % 5 == 0:
        blob = base64.b64encode(rng.randbytes(rng.randint(2000, 12000))).decode()
        parts += [
            f"--{boundary}",
            'Content-Type: application/pdf; name="offer.pdf"',
            "Content-Transfer-Encoding: base64",
            "",
            blob,
        ]
    parts.append(f"--{boundary}--")
    return "\r\n".join(parts)


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
)


def _mailing(rng: random.Random, n: int, to: str) -> bytes:
    day = f"2026-06-{1 + n % 28:02d}"
    items: list[object] = [_mime(rng, n, to)]
    for k in range(rng.randint(0, 3)):
        items.append(
            {
                "type": "open",
                "time": f"{day} 11:{k:02d}:00",
                "ip": f"192.0.2.{rng.randint(1, 254)}",
                "useragent": "Mozilla/5.0",
            }
        )
    for k in range(rng.randint(0, 2)):
        items.append(
            {
                "type": "click",
                "time": f"{day} 12:{k:02d}:00",
                "url": f"https://shop.test/o/{n}?c={k}",
                "ip": "198.51.100.7",
            }
        )
    if n % 7 == 3:
        items.append({"type": "survey", "question": "How did we do?", "answer": rng.randint(1, 5)})
    return json.dumps(items, ensure_ascii=False).encode()


def payload_chunks(spec: PayloadSpec) -> Iterator[bytes]:
    """The payload as chunks of about 64 KiB; memory stays small for any size."""
    rng = random.Random(f"{spec.copernica_id}:{spec.subject_id}")
    head = json.dumps({"type": spec.subject_type, "id": spec.info_id})
    to = spec.subject_id if spec.subject_type == "email" else f"profile-{spec.subject_id}@x.test"
    buffer = bytearray(b'{"info": ' + head.encode() + b', "data": [')
    written = 0
    n = 0
    while written + len(buffer) < spec.size or n == 0:
        if n:
            buffer += b", "
        buffer += _mailing(rng, n, to)
        n += 1
        if len(buffer) >= CHUNK:
            written += len(buffer)
            yield bytes(buffer)
            buffer.clear()
    buffer += b"]}"
    if spec.malformed:
        del buffer[-2:]  # the closing brackets never come
    yield bytes(buffer)


def payload_bytes(spec: PayloadSpec) -> bytes:
    return b"".join(payload_chunks(spec))


def payload_digest(spec: PayloadSpec) -> tuple[int, str]:
    """(size, sha256) of a payload, computed by streaming it."""
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
