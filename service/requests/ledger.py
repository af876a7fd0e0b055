"""Request records (the ledger): one JSON object per data request in S3, updated conditionally.

The repository of records, and a cache of the addressees it read. What is kept beside the
records lives in its own module: the poll schedule (`schedule`), the deadline index
(`deadline_index`), and the migrations of older records (`migrations`).

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
from typing import Any

from service.clock import SYSTEM, Clock, isoformat
from service.copernica.subject import SUBJECT_TYPES
from service.errors import Conflict, Unavailable
from service.logs import subject_digest
from service.requests.records import AccessRequest, DataRequest, Status
from service.storage.keys import Keys
from service.storage.s3 import ArchiveStore, PreconditionFailed


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
    # A source found by discovery (its data goes to `sources/{id}/{digest}/data.json`), not
    # the filed subject (`archive/.../{id}.json`).
    discovered: bool = False

    @property
    def log_subject(self) -> str:
        return self.subject_digest[:16]

    def archive_key(self, keys: Keys) -> str:
        """Where this data request's data is archived."""
        if self.discovered:
            return keys.source_data(self.id, self.subject_digest)
        return keys.archive(self.id)

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

    def __init__(
        self,
        store: ArchiveStore,
        hash_key: bytes,
        remember: int = 10_000,
        clock: Clock = SYSTEM,
    ) -> None:
        self._store = store
        self._clock = clock
        self._key = hash_key
        self._recent: OrderedDict[str, Addressee] = OrderedDict()
        self._remember = remember

    def addressee_of(self, record: AccessRequest) -> Addressee:
        """The addressee of the request's first data request (the filed subject)."""
        first = record.first
        return Addressee(
            record.id,
            first.copernica_id,
            first.subject_type,
            subject_digest(self._key, first.subject_type, first.subject_id),
            self._key,
            archived=first.status is Status.ARCHIVED,
        )

    def _seen(self, record: AccessRequest) -> None:
        # Until Copernica's id is in the record the request may still be (re)filed.
        first = record.first
        if first.copernica_id is None or first.status is Status.SUBMITTING or self._remember <= 0:
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

    def addressee_by_digest(
        self, request_id: str, digest: str, discovered: bool = False
    ) -> Addressee:
        """The addressee a callback URL of the current form names: no record read."""
        return Addressee(request_id, None, None, digest, self._key, discovered=discovered)

    def source_addressee(self, record: AccessRequest, data: DataRequest) -> Addressee:
        """The addressee of one of the request's data requests (the first one's, or a
        discovered source's)."""
        if data is record.first:
            return self.addressee_of(record)
        return Addressee(
            record.id,
            data.copernica_id,
            data.subject_type,
            self.digest_of(data),
            self._key,
            archived=data.status is Status.ARCHIVED,
            discovered=True,
        )

    def data_request_of(self, record: AccessRequest, addressee: Addressee) -> DataRequest | None:
        """The data request an addressee stands for: the first one, or the discovered source
        whose digest it carries (None: no such source in the record)."""
        if not addressee.discovered:
            return record.first
        return next(
            (d for d in record.discovered if self.digest_of(d) == addressee.subject_digest), None
        )

    def digest_of(self, data: DataRequest) -> str:
        """The keyed digest of a data request's subject: its callback URL's middle and, for
        a discovered source, its folder in S3 (`Keys.source_folder`)."""
        return subject_digest(self._key, data.subject_type, data.subject_id)

    def subject_digest_of(self, record: AccessRequest) -> str:
        return self.digest_of(record.first)

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

    async def create(self, record: AccessRequest) -> str:
        now = isoformat(self._clock.now())
        record.created_at = record.created_at or now
        record.updated_at = now
        return await self._store.put(
            self._store.keys.record(record.id), record.to_bytes(), if_none_match=True
        )

    async def get(self, request_id: str) -> tuple[AccessRequest, str] | None:
        stored = await self._store.get(self._store.keys.record(request_id))
        if stored is None:
            return None
        record = AccessRequest.from_bytes(stored.body)
        self._seen(record)
        return record, stored.etag

    async def save(self, record: AccessRequest, etag: str) -> str:
        """Write a changed record if nobody changed it since `etag`; else PreconditionFailed."""
        record.version += 1
        record.updated_at = isoformat(self._clock.now())
        etag = await self._store.put(
            self._store.keys.record(record.id), record.to_bytes(), if_match=etag
        )
        self._seen(record)
        return etag

    async def update(
        self,
        request_id: str,
        change: Callable[[AccessRequest], bool],
        *,
        attempts: int = 5,
    ) -> AccessRequest | None:
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
        keep: Callable[[AccessRequest], bool] | None = None,
    ) -> tuple[list[AccessRequest], str | None]:
        """Records in id (= creation time) order after `cursor`, optionally of one status."""
        found: list[AccessRequest] = []
        if limit <= 0:
            return found, None
        keys = self._store.keys
        start_after = keys.record(cursor) if cursor else ""
        listing = self._store.objects(keys.records_folder(), start_after=start_after, page_size=200)
        async for item in listing:
            stored = await self._store.get(item.key)
            if stored is None:
                continue
            record = AccessRequest.from_bytes(stored.body)
            if (status is None or record.status == status) and (keep is None or keep(record)):
                found.append(record)
                if len(found) == limit:
                    return found, record.id
        return found, None
