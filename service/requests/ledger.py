"""Request records (the ledger): one JSON object per data request in S3, updated conditionally.

A record is created with `If-None-Match: *` before Copernica is called and every later change
is a read-modify-write with `If-Match: <etag>`, so two replicas never overwrite each other's
change. Each write bumps `version`, so two records never have identical bytes (moto's ETag is
the MD5 of the body, and identical bytes would make `If-Match` meaningless).
"""

from __future__ import annotations

import hmac
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

from ulid import ULID

from service.clock import isoformat, utcnow
from service.copernica.subject import SUBJECT_TYPES
from service.errors import Conflict, Unavailable
from service.logs import subject_digest
from service.requests.records import RequestRecord, Status
from service.storage.s3 import ArchiveStore, PreconditionFailed

_STAMP = "%Y%m%dT%H%M%S.%fZ"


def _created_before(request_id: str, horizon: datetime) -> bool:
    """Whether a record key's request id (a ULID) was made before `horizon`; a key that is
    not a ULID counts as old, so the backfill reads it rather than skip it."""
    try:
        return bool(ULID.from_str(request_id).datetime < horizon)
    except ValueError:
        return True


def stamp(moment: datetime) -> str:
    """A time as a string that sorts like the time (schedule keys are listed in order)."""
    return moment.strftime(_STAMP)


def parse_stamp(text: str) -> datetime:
    return datetime.strptime(text, _STAMP).replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Addressee:
    """What taking a body for a request needs to know of it: its ids and its subject as a
    keyed digest (no raw address). None of it changes once Copernica has the request, so a
    replica may keep it (`Ledger.addressee`); only `archived` may be out of date, and the
    archive's `If-None-Match` makes that harmless."""

    id: str
    copernica_id: str | None
    subject_type: str | None  # None: known only by its digest (from the callback URL)
    subject_digest: str
    key: bytes = field(repr=False, compare=False)
    archived: bool = False

    @property
    def log_subject(self) -> str:
        return self.subject_digest[:16]

    def matches(self, info_type: Any, info_id: Any) -> bool:
        """The body's `info` names this subject: same type (the digest covers it too); an
        e-mail address compared case-insensitively, a profile id as a JSON number or a
        numeric string."""
        if info_type not in SUBJECT_TYPES or isinstance(info_id, bool):
            return False
        if self.subject_type is not None and info_type != self.subject_type:
            return False
        if isinstance(info_id, int) and info_type != "email":
            info_id = str(info_id)
        if not isinstance(info_id, str):
            return False
        theirs = subject_digest(self.key, info_type, info_id)
        return hmac.compare_digest(theirs, self.subject_digest)


class RecordConflict(Unavailable):
    """The record kept changing under us; the caller may try again later (a 503 with
    `Retry-After`, as for storage: nothing was changed, and waiting is the cure)."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"request {request_id} kept changing; try again")
        self.request_id = request_id


class RequestClosed(Conflict):
    """The request can no longer change this way (answered, or purged); says why."""


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
            archived=record.status is Status.ARCHIVED,
        )

    def _seen(self, record: RequestRecord) -> None:
        # Until Copernica's id is in the record the request may still be (re)filed.
        if record.copernica_id is None or record.status is Status.SUBMITTING or self._remember <= 0:
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

    def addressee_by_digest(self, request_id: str, digest: str) -> Addressee:
        """The addressee a callback URL of the current form names: no record read."""
        return Addressee(request_id, None, None, digest, self._key)

    def subject_digest_of(self, record: RequestRecord) -> str:
        return subject_digest(self._key, record.subject_type, record.subject_id)

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
        self,
        *,
        status: str | None,
        limit: int,
        cursor: str,
        keep: Callable[[RequestRecord], bool] | None = None,
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
                if (status is None or record.status == status) and (keep is None or keep(record)):
                    found.append(record)
                    if len(found) == limit:
                        break
        return found, found[-1].id if found else None

    # -- the deadline index ----------------------------------------------------------------
    # One empty marker per request not yet answered: `deadlines/{due_by}/{id}`. Listed in
    # key order they are the open requests by due date, so "overdue" and "due before" cost
    # LISTs plus one read per request shown, never a scan of every record. The record is
    # the truth: a marker is put before the record changes (filing, extension) and deleted
    # after (answered, purged), so a crash leaves at worst a stale marker, never a request
    # missing from the index. Due dates only move later, so a marker before its record's
    # `due_by` is stale for sure; one after it may belong to an extension in progress.

    def _deadline_marker(self, request_id: str, due: date) -> str:
        return f"{self._store.keys.prefix}deadlines/{due.isoformat()}/{request_id}"

    async def open_deadline(self, request_id: str, due: date) -> None:
        await self._store.put(
            self._deadline_marker(request_id, due), b"", content_type="application/octet-stream"
        )

    async def close_deadline(self, request_id: str, due: date) -> None:
        await self._store.delete(self._deadline_marker(request_id, due))

    async def open_by_deadline(
        self, before: date, *, limit: int, cursor: str = ""
    ) -> tuple[list[RequestRecord], str | None]:
        """Requests not yet answered with `due_by` < `before`, by due date then id; the
        cursor is the last one's `{due_by}/{id}`. Stale markers met on the way are dropped."""
        prefix = f"{self._store.keys.prefix}deadlines/"
        horizon = before.isoformat()
        found: list[RequestRecord] = []
        start_after = prefix + cursor if cursor else ""
        last = ""
        while len(found) < limit:
            keys = await self._store.list_keys(prefix, start_after=start_after, limit=200)
            for key in keys:
                start_after = key
                due_text, _, request_id = key[len(prefix) :].partition("/")
                if due_text >= horizon:
                    return found, None
                record = await self._open_record(request_id, date.fromisoformat(due_text))
                if record is not None:
                    found.append(record)
                    last = f"{due_text}/{request_id}"
                    if len(found) == limit:
                        return found, last
            if len(keys) < 200:
                return found, None
        return found, last or None

    async def count_open_before(self, before: date) -> int:
        """How many deadline markers fall before `before`: LISTs only, no record read. A
        marker a crash left behind (answered, but not yet dropped) counts until a listing
        of the overdue requests meets and drops it."""
        prefix = f"{self._store.keys.prefix}deadlines/"
        horizon = prefix + before.isoformat()
        count = 0
        async for item in self._store.objects(prefix):
            if item.key >= horizon:
                break
            count += 1
        return count

    async def _open_record(self, request_id: str, due: date) -> RequestRecord | None:
        """The record a deadline marker stands for, if the marker is its current one."""
        found = await self.get(request_id)
        if found is None:
            if utcnow() - ULID.from_str(request_id).datetime > timedelta(hours=1):
                await self.close_deadline(request_id, due)  # a filing that never got written
            return None
        record = found[0]
        if record.answered_at is not None or record.status is Status.PURGED:
            await self.close_deadline(request_id, due)
            return None
        current = record.deadline.due_by
        if due < current:
            await self.close_deadline(request_id, due)  # left behind by an extension
        return record if due == current else None

    async def extend(self, request_id: str, months: int, reason: str) -> RequestRecord | None:
        """Extend a request's deadline (None: no such request). ExtensionRefused beyond two
        months in all; RequestClosed once it is answered or purged."""
        for _ in range(5):
            found = await self.get(request_id)
            if found is None:
                return None
            record, etag = found
            if record.status is Status.PURGED:
                raise RequestClosed(f"the request was purged at {record.purged_at}")
            if record.answered_at is not None:
                raise RequestClosed(f"the request was answered at {record.answered_at}")
            old_due = record.deadline.due_by
            record.extend(months, reason, isoformat(utcnow()))
            await self.open_deadline(request_id, record.deadline.due_by)
            try:
                await self.save(record, etag)
            except PreconditionFailed:
                continue
            await self.close_deadline(request_id, old_due)
            return record
        raise RecordConflict(request_id)

    async def backfill(self, cursor: str, horizon: datetime, limit: int = 200) -> str | None:
        """Records written before deadlines and packages existed get `received_on` (their
        creation day), a deadline marker, and, if archived, a visit of the poller to build
        their package. One page per call; None when all are done, which a marker object
        remembers, so later processes skip it with one HEAD.

        Only records created before `horizon` (the caller's start: everything filed since was
        filed by this release) and without a deadline marker are read. Record keys are ULIDs,
        in creation order, so the pass ends at the first newer one: on a bucket with no older
        record it ends with its first LIST, however many requests are filed meanwhile. A
        record an earlier release still files after that (replicas of both releases running
        side by side) is read with its creation day all the same; only its marker is missing.
        """
        done = f"{self._store.keys.prefix}migrations/received-on.done"
        if not cursor and await self._store.head(done) is not None:
            return None
        prefix = self._store.keys.record("")[: -len(".json")]
        start_after = prefix + cursor + ".json" if cursor else ""
        keys = await self._store.list_keys(prefix, start_after=start_after, limit=limit)
        ids = [key[len(prefix) : -len(".json")] for key in keys]
        older = [request_id for request_id in ids if _created_before(request_id, horizon)]
        if older:
            indexed = {
                item.key.rsplit("/", 1)[1]
                async for item in self._store.objects(f"{self._store.keys.prefix}deadlines/")
            }
            for request_id in older:
                if request_id not in indexed:
                    await self._backfill_one(self._store.keys.record(request_id), request_id)
        if len(older) < len(ids) or len(ids) < limit:
            await self._store.put(done, b"", content_type="application/octet-stream")
            return None
        return ids[-1]

    async def _backfill_one(self, key: str, request_id: str) -> None:
        stored = await self._store.get(key)
        if stored is None:
            return
        record = RequestRecord.from_bytes(stored.body)
        if record.received_on is not None:
            return
        if record.answered_at is None and record.status is not Status.PURGED:
            await self.open_deadline(request_id, record.deadline.due_by)
        visit = stamp(utcnow()) if record.needs_package and not record.next_poll_at else None
        if visit is not None:
            await self.schedule(request_id, visit)  # marker first, as in filing

        def settle(current: RequestRecord) -> bool:
            if current.received_on is not None:
                return False
            current.received_on = current.received_day.isoformat()
            if visit is not None and current.needs_package and not current.next_poll_at:
                current.next_poll_at = visit
            return True

        await self.update(request_id, settle)

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
