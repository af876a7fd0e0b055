"""Retention: delete everything stored for a request `RETENTION_DAYS` after its package was
built, or after it ended without one (`failed`, `expired`; later `refused`) (storage
limitation, GDPR art. 5(1)(e)). Deleted means deleted: in a bucket that keeps versions, every
version of what is purged goes.

This is the one place that deletes data, so it proves before it deletes. Candidates come from
two listings, never from reading every record:
- `packages/`: a packaged request (S3's LastModified only preselects);
- `retention/{ended-day}/{id}`: a marker put when a request ends without a package
  (`note_ended`, called where the status changes, before the record is written), listed
  only up to the day `RETENTION_DAYS` ago. The day is when it ended, not when it is due, so a
  changed `RETENTION_DAYS` applies to markers already there, and markers are put even while
  retention is off (`RETENTION_DAYS=0`), so switching it on later purges those requests too.
Each candidate is then checked against its own record (`due`): for a package, status
`archived`, that very package, and `package.built_at` + RETENTION_DAYS in the past; for a
marker, status `failed`/`expired` and `ended_at` (else `updated_at`, records of the release
before) + RETENTION_DAYS in the past. Only then are the archive (left as an empty tombstone, so
a late callback, whose write is `If-None-Match: *`, stores nothing), everything under
`sources/{id}/` (the discovered sources' data, details and events; each discovered source's
data key keeps an empty tombstone too, for the same reason), the events, the quarantined
bodies, the idempotency claim and the deadline marker deleted, the record scrubbed
(`AccessRequest.mark_purged`: the facts for the register stay, each subject becomes its keyed
digest) and marked `purged`, the record's earlier versions deleted, and the package or the
marker deleted last: a crash anywhere leaves it listed, so the next sweep finishes the job
(deleting is idempotent), and a record that says `purged` lets it delete the leftovers.

Versions. The bucket's versioning state is read at start-up (`prove_store`), then by the
first delete of every sweep, and once an hour by a sweep that deletes nothing (for /metrics):
an idle sweep costs nothing extra. In a bucket that never had versioning on, each key is one
DELETE, as before. In one that keeps versions (enabled, or suspended after it was: the old
versions stay; or unknown), each key or folder purged is one ListObjectVersions and a
DeleteObject per version id, delete markers and the `null` versions
written before versioning was switched on included, the current version last (a crash then
leaves the key listed). The archive's tombstone keeps only its own (current) version, and the
scrubbed record only its current one: its earlier versions hold the subject. A sweep that
found versioning off and purged something looks again at its end: if versioning was switched
on meanwhile, it deletes again by version what it purged (a plain DELETE then left a version).
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from service.clock import SYSTEM, Clock, isoformat, parse_isoformat
from service.logs import subject_digest
from service.metrics import Metrics
from service.requests.deadline import due_by
from service.requests.deadline_index import DeadlineIndex
from service.requests.ledger import Ledger
from service.requests.records import AccessRequest, Status
from service.storage.s3 import VERSIONING_OFF, ArchiveStore, Listed

log = structlog.get_logger(__name__)

# A marker whose record has not ended (the record write that was to end it was lost) is
# dropped only once it is this old: the write may still be on its way.
MARKER_GRACE = timedelta(hours=1)
# An idle sweep looks at the bucket's versioning no more often than this (for /metrics).
VERSIONING_LOOK_SECONDS = 3600.0


async def note_ended(store: ArchiveStore, record: AccessRequest, now: datetime) -> None:
    """Where a request's status changes, before its record is written: if it has just ended
    without a package, note when (`ended_at`) and put its retention marker, so retention
    finds it `RETENTION_DAYS` later without reading every record. The marker goes first: a
    crash after it leaves a marker whose record has not ended (dropped when met), never an
    ended record that retention does not know about."""
    if record.mark_ended(isoformat(now)):
        await store.put(
            store.keys.retention_marker(record.id, now.date()),
            b"",
            content_type="application/octet-stream",
        )


@dataclass(frozen=True)
class Candidate:
    """A request retention may purge, and the object that named it (its package or its
    retention marker), which goes last."""

    request_id: str
    key: str
    ended: bool  # found by its retention marker, else by its package


class Retention:
    def __init__(
        self,
        store: ArchiveStore,
        ledger: Ledger,
        deadlines: DeadlineIndex,
        retention_days: float,
        metrics: Metrics,
        hash_key: bytes,
        clock: Clock = SYSTEM,
    ) -> None:
        self._store = store
        self._ledger = ledger
        self._deadlines = deadlines
        self._clock = clock
        self._keep = timedelta(days=retention_days) if retention_days > 0 else None
        self._metrics = metrics
        self._hash_key = hash_key
        self._looked = False  # this sweep looked at the bucket's versioning
        self._looked_off = False  # and saw it off

    @property
    def enabled(self) -> bool:
        return self._keep is not None

    def due(self, record: AccessRequest, candidate: Candidate, now: datetime) -> bool:
        """Everything of this request may be deleted now."""
        if self._keep is None:
            return False
        if candidate.ended:
            if not record.ended_without_package:
                return False
            ended = record.ended_at or record.updated_at
            return parse_isoformat(ended) + self._keep <= now
        if record.status is not Status.ARCHIVED or record.package is None:
            return False
        if record.package.key != candidate.key:
            return False
        return parse_isoformat(record.package.built_at) + self._keep <= now

    async def sweep(self) -> int:
        """Purge every request that is due now (on the clock); returns how many were purged."""
        if self._keep is None:
            return 0
        now = self._clock.now()
        self._looked = False  # the first delete of this sweep looks at the versioning
        candidates = await self._packaged(now) + await self._ended(now)
        purged: list[tuple[AccessRequest, Candidate]] = []
        for candidate in candidates:
            record = await self.purge(candidate, now)
            if record is not None:
                purged.append((record, candidate))
        if not self._looked:
            await self._look_now_and_then()
        elif (
            purged and self._looked_off and await self._store.bucket_versioning() != VERSIONING_OFF
        ):
            # Versioning went on during this sweep: a plain DELETE since then left the object
            # as a noncurrent version. Delete again, by version.
            log.warning("retention_versioning_switched_on", purged=len(purged))
            for record, candidate in purged:
                await self._delete_stored(record)
                await self._finish(record.id, candidate)
        return len(purged)

    async def _packaged(self, now: datetime) -> list[Candidate]:
        assert self._keep is not None
        keys = self._store.keys
        return [
            Candidate(keys.package_id(item.key), item.key, ended=False)
            async for item in self._store.objects(keys.packages_folder())
            # S3's own clock only preselects; the record's built_at decides.
            if item.modified + self._keep <= now + timedelta(minutes=5)
        ]

    async def _ended(self, now: datetime) -> list[Candidate]:
        """Retention markers of the days up to `RETENTION_DAYS` ago (a marker of that very
        day may not be due yet: its record decides). Stale ones met are dropped."""
        assert self._keep is not None
        keys = self._store.keys
        last_day = (now - self._keep).date()
        found: list[Candidate] = []
        async for item in self._store.objects(keys.retention_folder()):
            try:
                day, request_id = keys.retention_marker_parts(item.key)
            except ValueError:
                continue  # not ours
            if day > last_day:
                break  # key order is day order: the rest ended later
            if await self._stale(item, request_id, now):
                continue
            found.append(Candidate(request_id, item.key, ended=True))
        return found

    async def _stale(self, marker: Listed, request_id: str, now: datetime) -> bool:
        """A marker whose record has not ended (its write was lost; a later ending puts a
        marker of its own) is dropped once it is older than `MARKER_GRACE`; one without a
        record at once (records are written when filed, before anything can end)."""
        found = await self._ledger.get(request_id)
        if found is not None:
            record = found[0]
            if record.ended_without_package or record.status is Status.PURGED:
                return False
            if now - marker.modified <= MARKER_GRACE:
                return True  # skipped for now, kept
        log.info("retention_marker_dropped", request_id=request_id, record=found is not None)
        await self._erase(marker.key)
        return True

    async def purge(self, candidate: Candidate, now: datetime) -> AccessRequest | None:
        """Purge one candidate if its record says it is due; the purged record, else None."""
        request_id = candidate.request_id
        found = await self._ledger.get(request_id)
        if found is None:
            log.warning("retention_no_record", request_id=request_id)  # never guess: keep it
            return None
        record = found[0]
        if record.status is Status.PURGED:
            # A purge that stopped before its last steps: the record's earlier versions and
            # the object that named it.
            await self._finish(request_id, candidate)
            return None
        if not self.due(record, candidate, now):
            return None
        await self._delete_stored(record)
        at = isoformat(now)

        def scrub(current: AccessRequest) -> bool:
            if current.status is Status.PURGED:
                return False
            if not self.due(current, candidate, now):
                raise RuntimeError(f"record of {request_id} changed during its purge")
            current.mark_purged(at, self._digest)
            return True

        await self._ledger.update(request_id, scrub)
        await self._finish(request_id, candidate)
        self._metrics.purged.inc()
        log.info(
            "purged",
            request_id=request_id,
            status=record.status,
            package_built_at=record.package.built_at if record.package else None,
            ended_at=record.ended_at,
            versions=self._store.keeps_versions,
        )
        return record

    def _digest(self, subject_type: str, subject_id: str) -> str:
        return subject_digest(self._hash_key, subject_type, subject_id)

    async def _delete_stored(self, record: AccessRequest) -> None:
        keys = self._store.keys
        # The archive's bytes are replaced by an empty tombstone rather than deleted: a late
        # delivery of the callback (its URL needs no record) then meets an existing key and
        # stores nothing again. Its earlier versions (the data) go.
        archive = keys.archive(record.id)
        await self._store.put(
            archive,
            b"",
            metadata={"purged": "true"},
            content_type="application/octet-stream",
        )
        await self._erase(archive, keep_current=True)
        # The same for each discovered source's data; the rest of its folder goes.
        tombstones = {
            keys.source_data(record.id, self._ledger.digest_of(source))
            for source in record.discovered
        }
        for tombstone in sorted(tombstones):
            await self._store.put(
                tombstone,
                b"",
                metadata={"purged": "true"},
                content_type="application/octet-stream",
            )
        await self._erase(keys.sources_folder(record.id), folder=True, spare=tombstones)
        await self._erase(keys.events_folder(record.id), folder=True)
        await self._erase(keys.quarantine_folder(record.id), folder=True)
        if record.idempotency_key:
            await self._erase(keys.idempotency(record.idempotency_key))
        if self._store.keeps_versions:
            # Every place its deadline marker ever was (extensions moved it), every version.
            for months in range(self._extended_months(record) + 1):
                await self._erase(
                    keys.deadline_marker(record.id, due_by(record.received_day, months))
                )
        elif record.answered_at is None:
            await self._deadlines.close(record.id, record.deadline.due_by)

    @staticmethod
    def _extended_months(record: AccessRequest) -> int:
        return record.extension.months if record.extension else 0

    async def _finish(self, request_id: str, candidate: Candidate) -> None:
        """The last steps: the scrubbed record's earlier versions (they hold the subject),
        then the package or the marker that named the request."""
        await self._erase(self._store.keys.record(request_id), keep_current=True)
        await self._erase(candidate.key)

    async def _erase(
        self,
        where: str,
        *,
        folder: bool = False,
        keep_current: bool = False,
        spare: Collection[str] = (),
    ) -> None:
        """Delete the key `where` (or every key under the folder `where`) for good: in a
        bucket that keeps versions every version and delete marker, by id, the current one
        last (`keep_current`: all but the current one; `spare`: keys in the folder whose
        current version stays); else one DELETE a key."""
        store = self._store
        if not self._looked:
            self._looked = True
            self._looked_off = await store.bucket_versioning() == VERSIONING_OFF
        if not store.keeps_versions:
            if keep_current:
                return  # the current version is all there is
            if not folder:
                await store.delete(where)
                return
            async for item in store.objects(where):
                if item.key not in spare:
                    await store.delete(item.key)
            return
        # The listing first, then the deletes: a page boundary never shifts under them.
        versions = [v async for v in store.versions(where) if folder or v.key == where]
        for version in sorted(versions, key=lambda v: v.latest):
            if version.latest and (keep_current or version.key in spare):
                continue
            await store.delete_version(version.key, version.version_id)
            self._metrics.purged_versions.inc()

    async def _look_now_and_then(self) -> None:
        """An idle sweep's look at the versioning, for /metrics: at most once an hour."""
        seen = self._store.versioning_seen_at
        if self._store.versioning is None or time.monotonic() - seen > VERSIONING_LOOK_SECONDS:
            await self._store.bucket_versioning()
