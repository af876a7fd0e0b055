"""Migrations of records written by earlier releases, run a page at a time by housekeeping
(the lease holder's). Two: `received_on` and the deadline index (`Migrations.backfill`), and
the retention markers of requests that ended without a package (`Migrations.ended`).
"""

from __future__ import annotations

import json
from datetime import datetime

from ulid import ULID

from service.clock import SYSTEM, Clock, isoformat, parse_isoformat
from service.requests.deadline_index import DeadlineIndex
from service.requests.ledger import Ledger
from service.requests.records import AccessRequest, Status
from service.requests.schedule import Schedule, stamp
from service.storage.s3 import ArchiveStore

RECEIVED_ON = "received-on"  # its marker: `migrations/received-on.done`
ENDED = "retention-markers"  # `migrations/retention-markers.done`, progress in `.json`


def _created_before(request_id: str, horizon: datetime) -> bool:
    """Whether a record key's request id (a ULID) was made before `horizon`; a key that is
    not a ULID counts as old, so the backfill reads it rather than skip it."""
    try:
        return bool(ULID.from_str(request_id).datetime < horizon)
    except ValueError:
        return True


class Migrations:
    """The migrations, each a method the poller calls a page at a time until it says done."""

    def __init__(
        self,
        store: ArchiveStore,
        ledger: Ledger,
        deadlines: DeadlineIndex,
        schedule: Schedule,
        clock: Clock = SYSTEM,
    ) -> None:
        self._store = store
        self._ledger = ledger
        self._deadlines = deadlines
        self._schedule = schedule
        self._clock = clock

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
        keys = self._store.keys
        done = keys.migration_done(RECEIVED_ON)
        if not cursor and await self._store.head(done) is not None:
            return None
        start_after = keys.record(cursor) if cursor else ""
        ids: list[str] = []  # one page: one LIST of at most `limit` keys
        listing = self._store.objects(
            keys.records_folder(), start_after=start_after, page_size=limit
        )
        async for item in listing:
            ids.append(keys.record_id(item.key))
            if len(ids) == limit:
                break
        older = [request_id for request_id in ids if _created_before(request_id, horizon)]
        if older:
            indexed = await self._deadlines.indexed()
            for request_id in older:
                if request_id not in indexed:
                    await self._backfill_one(request_id)
        if len(older) < len(ids) or len(ids) < limit:
            await self._store.put(done, b"", content_type="application/octet-stream")
            return None
        return ids[-1]

    async def _backfill_one(self, request_id: str) -> None:
        stored = await self._store.get(self._store.keys.record(request_id))
        if stored is None:
            return
        record = AccessRequest.from_bytes(stored.body)
        if record.received_on is not None:
            return
        if record.answered_at is None and record.status is not Status.PURGED:
            await self._deadlines.open(request_id, record.deadline.due_by)
        now = self._clock.now()
        visit = stamp(now) if record.needs_package and not record.next_poll_at else None
        if visit is not None:
            await self._schedule.schedule(request_id, visit)  # marker first, as in filing

        def settle(current: AccessRequest) -> bool:
            if current.received_on is not None:
                return False
            current.received_on = current.received_day.isoformat()
            if visit is not None and current.needs_package and not current.next_poll_at:
                current.next_poll_at = visit
            return True

        await self._ledger.update(request_id, settle)

    async def ended(self, cursor: str, horizon: datetime, limit: int = 200) -> str | None:
        """Requests that ended `failed` or `expired` under an earlier release have no
        retention marker (`note_ended` puts it only for requests ending now), so retention
        would never purge them: each gets its marker, of the day it ended (its `ended_at`,
        else its `updated_at`, the last write: the one that ended it), then `ended_at` in its
        record, as `note_ended` does. One page per call (at most `limit` records read); None
        when all are done, which `migrations/retention-markers.done` remembers.

        Resumable: how far it got is noted in S3 after every page, so a restart, or another
        replica taking over housekeeping, goes on from there. Several replicas at once only
        repeat work: the marker's key is the record's own, the record write conditional and
        only for a record that has not ended yet. Records created from `horizon` on (the
        caller's start) are this release's, so the pass ends at the first of them; a record
        an earlier release ends after the pass (replicas of both releases side by side) is
        missed, as by the received-on backfill.
        """
        keys = self._store.keys
        done, progress = keys.migration_done(ENDED), keys.migration_progress(ENDED)
        if not cursor:
            if await self._store.head(done) is not None:
                return None
            noted = await self._store.get(progress)
            cursor = str(json.loads(noted.body)["after"]) if noted is not None else ""
        start_after = keys.record(cursor) if cursor else ""
        ids: list[str] = []
        async for item in self._store.objects(
            keys.records_folder(), start_after=start_after, page_size=limit
        ):
            ids.append(keys.record_id(item.key))
            if len(ids) == limit:
                break
        older = [request_id for request_id in ids if _created_before(request_id, horizon)]
        for request_id in older:
            await self._mark_ended(request_id)
        if len(older) < len(ids) or len(ids) < limit:
            await self._store.put(done, b"", content_type="application/octet-stream")
            if cursor:
                await self._store.delete(progress)
            return None
        body = json.dumps({"after": ids[-1]}).encode()
        await self._store.put(progress, body, content_type="application/json")
        return ids[-1]

    async def _mark_ended(self, request_id: str) -> None:
        found = await self._ledger.get(request_id)
        if found is None:
            return
        record = found[0]
        if record.ended_at is not None or not record.ended_without_package:
            return
        ended = record.updated_at or record.created_at or isoformat(self._clock.now())
        # The marker first, as `note_ended` does: a crash then leaves a marker whose record
        # has no `ended_at` yet (retention reads its `updated_at`; the next pass writes it).
        await self._store.put(
            self._store.keys.retention_marker(request_id, parse_isoformat(ended).date()),
            b"",
            content_type="application/octet-stream",
        )
        await self._ledger.update(request_id, lambda current: current.mark_ended(ended))
