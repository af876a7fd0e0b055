"""The request record: one access request, its facts and its status changes.

A record is the JSON object `requests/{id}.json` in S3 (see `ledger.py` for how it is read
and written). Its status changes only through its `mark_*` methods.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from enum import StrEnum
from typing import Any

from ulid import ULID

from service.clock import isoformat, parse_isoformat, utcnow
from service.copernica.subject import Subject
from service.requests.deadline import Deadline


class Status(StrEnum):
    """Where a request stands. It changes only through the record's `mark_*` methods."""

    SUBMITTING = "submitting"  # record written, Copernica has not confirmed it yet
    PENDING = "pending"  # Copernica has it; a callback or the poller brings the data
    ARCHIVED = "archived"  # the data (and the events asked for) are stored
    FAILED = "failed"  # Copernica refused it or says the data is gone
    EXPIRED = "expired"  # no data before REQUEST_EXPIRY_HOURS
    PURGED = "purged"  # everything stored was deleted after RETENTION_DAYS


STATUSES = tuple(s.value for s in Status)
FINAL_STATUSES = (Status.ARCHIVED, Status.FAILED, Status.EXPIRED, Status.PURGED)

# Who holds a lease: this process. Stable for its life, unique across replicas and restarts.
REPLICA = f"{socket.gethostname()}-{os.getpid()}-{str(ULID())[-6:]}"


@dataclass
class RequestRecord:
    id: str
    subject_type: str
    subject_id: str  # the raw address or number: only ever in this record and the archive
    status: Status = Status.SUBMITTING
    copernica_id: str | None = None
    created_at: str = ""
    updated_at: str = ""
    attempts: int = 0
    last_error: str | None = None
    report: bool = False
    events: dict[str, Any] | None = None
    archive: dict[str, Any] | None = None
    idempotency_key: str | None = None
    next_poll_at: str | None = None  # when the poller looks next; its schedule marker's time
    poll_errors: int = 0  # consecutive failed polls, for backoff
    lease: dict[str, Any] | None = None  # {"owner", "until"} while one replica works on it
    version: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # Answering the access request. Records written before these existed have none of them:
    # such a request was received the day it was filed (`received_day`).
    received_on: str | None = None  # YYYY-MM-DD, the day the company received the request
    extension: dict[str, Any] | None = None  # {"months": n, "history": [{months, reason, at}]}
    package: dict[str, Any] | None = None  # {key, sha256, size, built_at}
    answered_at: str | None = None  # first download or link of the package
    purged_at: str | None = None

    @property
    def subject(self) -> Subject:
        return Subject(self.subject_type, self.subject_id)

    @property
    def events_complete(self) -> bool:
        """No events were asked for, or all their windows are stored."""
        return self.events is None or bool(self.events.get("complete"))

    @property
    def received_day(self) -> date:
        if self.received_on:
            return date.fromisoformat(self.received_on)
        return parse_isoformat(self.created_at).date()

    @property
    def deadline(self) -> Deadline:
        months = int(self.extension["months"]) if self.extension else 0
        return Deadline(self.received_day, months, answered=self.answered_at is not None)

    @property
    def needs_package(self) -> bool:
        """Data (and events) are archived but the access package is not built yet."""
        return self.status is Status.ARCHIVED and self.package is None

    @property
    def finished(self) -> bool:
        """Nothing left for the poller: final, and packaged if archived."""
        return self.status in FINAL_STATUSES and not self.needs_package

    def extend(self, months: int, reason: str, at: str) -> None:
        """Extend the deadline by `months` (ExtensionRefused beyond two months in all)."""
        total = self.deadline.extend(months)
        history = list(self.extension["history"]) if self.extension else []
        history.append({"months": months, "reason": reason, "at": at})
        self.extension = {"months": total, "history": history}

    # -- the status changes: here and nowhere else ----------------------------------------

    def mark_pending(self, copernica_id: str) -> None:
        """Copernica accepted the request under `copernica_id`."""
        self.status, self.copernica_id, self.last_error = Status.PENDING, copernica_id, None

    def mark_failed(self, error: str) -> None:
        self.status, self.last_error = Status.FAILED, error

    def mark_expired(self, error: str) -> None:
        self.status, self.last_error = Status.EXPIRED, error

    def mark_archived(self, archive: dict[str, Any] | None = None) -> None:
        """The data is stored (`archive`: its facts, if not recorded yet)."""
        self.status, self.last_error = Status.ARCHIVED, None
        self.archive = self.archive or archive

    def mark_packaged(self, package: dict[str, Any]) -> None:
        self.package = package
        self.last_error = None

    def mark_answered(self, at: str) -> bool:
        """The package was handed out (download or link); True the first time only."""
        if self.answered_at is not None:
            return False
        self.answered_at = at
        return True

    def mark_purged(self, subject_digest: str, at: str) -> None:
        """Everything stored for the request is deleted: keep the facts, not the subject."""
        self.status = Status.PURGED
        self.subject_id = f"hmac-sha256:{subject_digest}"
        self.purged_at = at
        self.lease = None
        self.next_poll_at = None
        self.last_error = None

    def take_lease(self, owner: str, seconds: float) -> None:
        self.lease = {"owner": owner, "until": isoformat(utcnow() + timedelta(seconds=seconds))}

    def leased_to_other(self, owner: str) -> bool:
        """Somebody else works on this record and their lease has not run out."""
        lease = self.lease
        if not lease or lease["owner"] == owner:
            return False
        return parse_isoformat(lease["until"]) > utcnow()

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, body: bytes) -> RequestRecord:
        raw = json.loads(body)
        known = {f for f in cls.__dataclass_fields__}
        record = cls(**{k: v for k, v in raw.items() if k in known})
        record.status = Status(record.status)
        return record
