"""Retention: delete everything stored for a request once its package is older than
RETENTION_DAYS (storage limitation, GDPR art. 5(1)(e)).

This is the one place that deletes data, so it proves before it deletes. Candidates come
from listing `packages/` (a request without a package is never a candidate), and each is
then checked against its own record: status `archived`, a recorded package at that very key,
and `package.built_at` + RETENTION_DAYS in the past. Only then are the archive (left as an
empty tombstone, so a late callback cannot store it again), the events,
the quarantined bodies, the idempotency claim and the deadline marker deleted, the record
scrubbed (the subject replaced by its keyed digest) and marked `purged`, and the package
deleted last: a crash anywhere leaves the package listed, so the next sweep finishes the job
(deleting is idempotent), and a record that says `purged` lets it delete the leftover.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import structlog

from service.clock import SYSTEM, Clock, isoformat, parse_isoformat
from service.logs import subject_digest
from service.metrics import Metrics
from service.requests.deadline_index import DeadlineIndex
from service.requests.ledger import Ledger
from service.requests.records import AccessRequest, Status
from service.storage.s3 import ArchiveStore

log = structlog.get_logger(__name__)


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

    @property
    def enabled(self) -> bool:
        return self._keep is not None

    def due(self, record: AccessRequest, package_key: str, now: datetime) -> bool:
        """Everything of this request may be deleted now."""
        if self._keep is None or record.status is not Status.ARCHIVED or record.package is None:
            return False
        if record.package.key != package_key:
            return False
        return parse_isoformat(record.package.built_at) + self._keep <= now

    async def sweep(self) -> int:
        """Purge every request that is due now (on the clock); returns how many were purged."""
        if self._keep is None:
            return 0
        now = self._clock.now()
        prefix = self._store.keys.packages_folder()
        candidates = [
            item.key
            async for item in self._store.objects(prefix)
            # S3's own clock only preselects; the record's built_at decides.
            if item.modified + self._keep <= now + timedelta(minutes=5)
        ]
        purged = 0
        for key in candidates:
            request_id = self._store.keys.package_id(key)
            if await self.purge(request_id, key, now):
                purged += 1
        return purged

    async def purge(self, request_id: str, package_key: str, now: datetime) -> bool:
        found = await self._ledger.get(request_id)
        if found is None:
            log.warning("retention_no_record", request_id=request_id)  # never guess: keep it
            return False
        record = found[0]
        if record.status is Status.PURGED:
            await self._store.delete(package_key)  # a purge that stopped before its last step
            return False
        if not self.due(record, package_key, now):
            return False
        built_at = record.package.built_at if record.package else None
        await self._delete_stored(record)
        digest = subject_digest(self._hash_key, record.subject.type, record.subject.id)
        at = isoformat(now)

        def scrub(current: AccessRequest) -> bool:
            if current.status is Status.PURGED:
                return False
            if not self.due(current, package_key, now):
                raise RuntimeError(f"record of {request_id} changed during its purge")
            current.mark_purged(digest, at)
            return True

        await self._ledger.update(request_id, scrub)
        await self._store.delete(package_key)
        self._metrics.purged.inc()
        log.info("purged", request_id=request_id, package_built_at=built_at)
        return True

    async def _delete_stored(self, record: AccessRequest) -> None:
        keys = self._store.keys
        # The archive's bytes are replaced by an empty tombstone rather than deleted: a late
        # delivery of the callback (its URL needs no record) then meets an existing key and
        # stores nothing again.
        await self._store.put(
            keys.archive(record.id),
            b"",
            metadata={"purged": "true"},
            content_type="application/octet-stream",
        )
        for prefix in (
            keys.events_folder(record.id),
            keys.quarantine_folder(record.id),
        ):
            async for item in self._store.objects(prefix):
                await self._store.delete(item.key)
        if record.idempotency_key:
            await self._store.delete(keys.idempotency(record.idempotency_key))
        if record.answered_at is None:
            await self._deadlines.close(record.id, record.deadline.due_by)
