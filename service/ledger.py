"""Request records (the ledger): one JSON object per data request in S3, updated conditionally.

A record is created with `If-None-Match: *` before Copernica is called and every later change
is a read-modify-write with `If-Match: <etag>`, so two replicas never overwrite each other's
change. Each write bumps `version`, so two records never have identical bytes (moto's ETag is
the MD5 of the body, and identical bytes would make `If-Match` meaningless).
"""

from __future__ import annotations

import hmac
import json
import os
import socket
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from ulid import ULID

from .archive import ArchiveStore, PreconditionFailed, isoformat, parse_isoformat, utcnow
from .logs import subject_digest
from .payload import Subject

STATUSES = ("submitting", "pending", "archived", "failed", "expired")
FINAL_STATUSES = ("archived", "failed", "expired")
_STAMP = "%Y%m%dT%H%M%S.%fZ"


# Who holds a lease: this process. Stable for its life, unique across replicas and restarts.
REPLICA = f"{socket.gethostname()}-{os.getpid()}-{str(ULID())[-6:]}"


def stamp(moment: datetime) -> str:
    """A time as a string that sorts like the time (schedule keys are listed in order)."""
    return moment.strftime(_STAMP)


def parse_stamp(text: str) -> datetime:
    return datetime.strptime(text, _STAMP).replace(tzinfo=UTC)


@dataclass
class RequestRecord:
    id: str
    subject_type: str
    subject_id: str  # the raw address or number: only ever in this record and the archive
    status: str = "submitting"
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

    @property
    def subject(self) -> Subject:
        return Subject(self.subject_type, self.subject_id)

    @property
    def events_complete(self) -> bool:
        """No events were asked for, or all their windows are stored."""
        return self.events is None or bool(self.events.get("complete"))

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
        return cls(**{k: v for k, v in raw.items() if k in known})


@dataclass(frozen=True, slots=True)
class Addressee:
    """What taking a body for a request needs to know of it: its ids and its subject as a
    keyed digest (no raw address). None of it changes once Copernica has the request, so a
    replica may keep it (`Ledger.addressee`); only `archived` may be out of date, and the
    archive's `If-None-Match` makes that harmless."""

    id: str
    copernica_id: str | None
    subject_type: str
    subject_digest: str
    key: bytes = field(repr=False, compare=False)
    archived: bool = False

    @property
    def log_subject(self) -> str:
        return self.subject_digest[:16]

    def matches(self, info_type: Any, info_id: Any) -> bool:
        """The body's `info` names this subject: same type; an e-mail address compared
        case-insensitively, a profile id as a JSON number or a numeric string."""
        if info_type != self.subject_type or isinstance(info_id, bool):
            return False
        if isinstance(info_id, int) and info_type != "email":
            info_id = str(info_id)
        if not isinstance(info_id, str):
            return False
        theirs = subject_digest(self.key, info_type, info_id)
        return hmac.compare_digest(theirs, self.subject_digest)


class RecordConflict(Exception):
    """The record kept changing under us; the caller may try again later."""


class Ledger:
    """Create, read and conditionally update request records.

    It also keeps the addressees of the last `remember` records this replica read or wrote,
    so a callback for a request this replica filed or polled costs no record read.
    """

    def __init__(self, store: ArchiveStore, hash_key: bytes, remember: int = 10_000) -> None:
        self._store = store
        self._key = hash_key
        self._recent: OrderedDict[str, Addressee] = OrderedDict()
        self._remember = remember

    def addressee_of(self, record: RequestRecord) -> Addressee:
        return Addressee(
            record.id,
            record.copernica_id,
            record.subject_type,
            subject_digest(self._key, record.subject_type, record.subject_id),
            self._key,
            archived=record.status == "archived",
        )

    def _seen(self, record: RequestRecord) -> None:
        # Until Copernica's id is in the record the request may still be (re)filed.
        if record.copernica_id is None or record.status == "submitting" or self._remember <= 0:
            return
        self._recent[record.id] = self.addressee_of(record)
        self._recent.move_to_end(record.id)
        if len(self._recent) > self._remember:
            self._recent.popitem(last=False)

    def archived(self, request_id: str) -> None:
        """This replica stored the request's archive: a repeat delivery needs no S3 call."""
        known = self._recent.get(request_id)
        if known is not None and not known.archived:
            self._recent[request_id] = replace(known, archived=True)

    async def addressee(self, request_id: str) -> Addressee | None:
        """The request's addressee: remembered, else read from its record (None: no record)."""
        known = self._recent.get(request_id)
        if known is not None:
            self._recent.move_to_end(request_id)
            return known
        found = await self.get(request_id)
        if found is None:
            return None
        # `get` remembered it, unless Copernica's id is not in the record yet.
        return self._recent.get(request_id) or self.addressee_of(found[0])

    async def create(self, record: RequestRecord) -> str:
        now = isoformat(utcnow())
        record.created_at = record.created_at or now
        record.updated_at = now
        return await self._store.put(
            self._store.keys.record(record.id), record.to_bytes(), if_none_match=True
        )

    async def get(self, request_id: str) -> tuple[RequestRecord, str] | None:
        stored = await self._store.get(self._store.keys.record(request_id))
        if stored is None:
            return None
        record = RequestRecord.from_bytes(stored.body)
        self._seen(record)
        return record, stored.etag

    async def save(self, record: RequestRecord, etag: str) -> str:
        """Write a changed record if nobody changed it since `etag`; else PreconditionFailed."""
        record.version += 1
        record.updated_at = isoformat(utcnow())
        etag = await self._store.put(
            self._store.keys.record(record.id), record.to_bytes(), if_match=etag
        )
        self._seen(record)
        return etag

    async def update(
        self,
        request_id: str,
        change: Callable[[RequestRecord], bool],
        *,
        attempts: int = 5,
    ) -> RequestRecord | None:
        """Apply `change` (returns False for "nothing to do") with optimistic concurrency."""
        for _ in range(attempts):
            found = await self.get(request_id)
            if found is None:
                return None
            record, etag = found
            if not change(record):
                return record
            try:
                await self.save(record, etag)
            except PreconditionFailed:
                continue
            return record
        raise RecordConflict(request_id)

    async def page(
        self, *, status: str | None, limit: int, cursor: str
    ) -> tuple[list[RequestRecord], str | None]:
        """Records in id (= creation time) order after `cursor`, optionally of one status."""
        prefix = self._store.keys.record("")[: -len(".json")]
        found: list[RequestRecord] = []
        start_after = prefix + cursor + ".json" if cursor else ""
        while len(found) < limit:
            keys = await self._store.list_keys(prefix, start_after=start_after, limit=200)
            if not keys:
                return found, None
            for key in keys:
                start_after = key
                stored = await self._store.get(key)
                if stored is None:
                    continue
                record = RequestRecord.from_bytes(stored.body)
                if status is None or record.status == status:
                    found.append(record)
                    if len(found) == limit:
                        break
        return found, found[-1].id if found else None

    # -- the poll schedule -----------------------------------------------------------------
    # One empty marker object per scheduled poll: `due/{stamp}/{id}`. S3 lists keys in order,
    # so the due requests are the first keys under `due/`, and a tick with nothing due costs
    # one LIST however many requests are pending. The record's `next_poll_at` names its one
    # valid marker; any other marker of the same id is stale and is deleted when met.

    def _marker(self, request_id: str, when: str) -> str:
        return f"{self._store.keys.prefix}due/{when}/{request_id}"

    async def schedule(self, request_id: str, when: str) -> None:
        await self._store.put(
            self._marker(request_id, when), b"", content_type="application/octet-stream"
        )

    async def unschedule(self, request_id: str, when: str) -> None:
        # S3 answers a delete of a missing key with success: deleting is idempotent.
        await self._store.delete(self._marker(request_id, when))

    async def due(self, now: datetime, limit: int) -> list[tuple[str, str]]:
        """(stamp, request id) of markers due at `now`, oldest first, at most `limit`."""
        prefix = f"{self._store.keys.prefix}due/"
        horizon = stamp(now)
        found: list[tuple[str, str]] = []
        start_after = ""
        while len(found) < limit:
            keys = await self._store.list_keys(
                prefix, start_after=start_after, limit=min(1000, limit - len(found))
            )
            for key in keys:
                when, _, request_id = key[len(prefix) :].partition("/")
                if when > horizon:
                    return found
                found.append((when, request_id))
            if len(keys) < min(1000, limit):
                return found
            start_after = keys[-1]
        return found

    async def scheduled(self) -> list[str]:
        """Ids of every scheduled (not final) request: one LIST call per 1000 of them."""
        prefix = f"{self._store.keys.prefix}due/"
        ids: list[str] = []
        start_after = ""
        while True:
            keys = await self._store.list_keys(prefix, start_after=start_after, limit=1000)
            ids += [key.rsplit("/", 1)[1] for key in keys]
            if len(keys) < 1000:
                return ids
            start_after = keys[-1]
