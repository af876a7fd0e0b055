"""The polling fallback: every replica visits due requests until each one is final.

Callbacks get lost; this loop makes sure nothing ready at Copernica is missed before it
expires. A tick lists the due markers of the schedule (see `Schedule.due`), then visits each:

1. read the record; a marker of a final record, or one before the record's `next_poll_at`,
   is stale and dropped (one after it, or without a record yet, may be the next visit's
   marker being put in place: it stays, unless its time is long past);
2. take the record's lease with a conditional write, so one replica at a time works on it
   (a crashed replica's lease simply runs out);
3. the work (`service.collect.work`, given to the `Poller` as a `Work`): whatever it does
   to the request, it returns a `Visit` saying when to come back, if ever;
4. schedule the next visit (new marker first, then the record, then drop the old marker: a
   crash anywhere in between leaves at worst a stale marker, never an unscheduled request).

This module is the protocol only: it knows nothing of Copernica, intake or packages, so
`tests/test_lease_model.py` drives it with a scripted work function. Housekeeping (janitor,
census, backfill, retention) is a task of its own: `service.collect.housekeeping`.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

import structlog

from service.clock import SYSTEM, Clock
from service.config import Settings
from service.logs import subject_hash
from service.metrics import Metrics
from service.requests.ledger import Ledger, RecordConflict
from service.requests.records import REPLICA, AccessRequest
from service.requests.schedule import Schedule, parse_stamp
from service.storage.s3 import ArchiveUnavailable, PreconditionFailed

log = structlog.get_logger(__name__)

MIN_WORKERS, MAX_WORKERS = 4, 32
BATCH = 200
# The pause after a tick in which a visit asked to come back at once (`Visit.next_in` 0).
HURRY_PAUSE = 0.2
# How long a marker that names no visit yet may belong to a schedule change in progress.
MARKER_GRACE = timedelta(hours=1)


@dataclass
class Visit:
    """What one visit decided: the record's new state, and when to come back (if ever)."""

    outcome: str
    next_in: float | None


# A write of the record under the visit's lease, before a step that must not be done twice
# unknown (filing at Copernica: the record counts a try before it is made). A record changed
# meanwhile by someone else raises `RecordConflict`: the visit stops there.
Checkpoint = Callable[[], Awaitable[None]]
# What a visit does to the request it holds the lease of: changes the record in place (its
# status, errors, facts) and says when to come back. It writes the record only through its
# checkpoint; the visit writes it at the end.
Work = Callable[[AccessRequest, Checkpoint], Awaitable[Visit]]


def tick_seconds(interval: float) -> float:
    """The pause between two ticks, for a poll interval of `interval` seconds."""
    return min(10.0, max(0.05, interval / 5))


class Poller:
    def __init__(
        self,
        ledger: Ledger,
        schedule: Schedule,
        work: Work,
        settings: Settings,
        metrics: Metrics,
        hash_key: bytes,
        clock: Clock = SYSTEM,
    ) -> None:
        self._clock = clock
        self._ledger = ledger
        self._schedule = schedule
        self._work = work
        self._metrics = metrics
        self._hash_key = hash_key
        self.owner = REPLICA
        self._interval = settings.poll_interval_seconds
        # Enough visits in flight to keep Copernica's rate limit busy while each visit waits
        # on S3 round trips (about ten per visit); the rate limiter still paces the calls.
        self._workers = min(
            MAX_WORKERS, max(MIN_WORKERS, math.ceil(2 * settings.copernica_max_rps))
        )
        self._lease_seconds = settings.poll_lease_seconds
        self._stopping = asyncio.Event()
        self._hurry = False

    # -- the loop ----------------------------------------------------------------------------

    def tick_seconds(self) -> float:
        return tick_seconds(self._interval)

    async def run(self) -> None:
        """Tick until `stop()`; an S3 outage only delays the next tick."""
        while not self._stopping.is_set():
            visited = 0
            try:
                visited = await self.tick()
            except ArchiveUnavailable as exc:
                log.warning("poll_tick_failed", error=str(exc))
            except Exception:
                log.exception("poll_tick_crashed")
            if visited >= BATCH:
                continue  # a full batch: more may be due already, no pause
            pause = self.tick_seconds() * random.uniform(0.8, 1.2)
            if self._hurry:
                # A visit asked to come back at once (a discovery with calls left to make):
                # the shortest pause, so its next step does not wait a whole tick.
                self._hurry, pause = False, min(pause, HURRY_PAUSE)
            await self._pause(pause)

    async def _pause(self, seconds: float) -> None:
        """Until the next tick: `seconds`, or less if stopped or nudged (a marker due now was
        put by this process: see `Schedule.nudged`)."""
        nudged = self._schedule.nudged
        waits = [asyncio.ensure_future(self._stopping.wait()), asyncio.ensure_future(nudged.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        nudged.clear()

    def stop(self) -> None:
        """Finish the visits in progress, start no new one."""
        self._stopping.set()

    async def tick(self) -> int:
        """Visit everything due now (bounded per tick); returns how many were visited."""
        now = self._clock.now()
        due = await self._schedule.due(now, BATCH)
        self._metrics.poll_ticks.inc()
        self._metrics.poll_due.set(len(due))
        overdue = (now - parse_stamp(due[0][0])).total_seconds() if due else 0.0
        self._metrics.poll_lag.set(max(0.0, overdue))
        # Replicas list the same markers: shuffled, they mostly pick different ones first.
        random.shuffle(due)
        queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        for item in due:
            queue.put_nowait(item)

        async def worker() -> None:
            while not self._stopping.is_set():
                try:
                    when, request_id = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                try:
                    await self.visit(request_id, when)
                except (ArchiveUnavailable, RecordConflict) as exc:
                    log.warning("poll_visit_failed", request_id=request_id, error=str(exc))
                except Exception:
                    # The lease runs out and the request is visited again later.
                    log.exception("poll_visit_crashed", request_id=request_id)

        await asyncio.gather(*(worker() for _ in range(min(self._workers, len(due)) or 1)))
        return len(due)

    # -- one visit ---------------------------------------------------------------------------

    async def visit(self, request_id: str, when: str) -> None:
        # Every line written during the visit (a retry, a warning) carries the request id.
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            await self._visit(request_id, when)

    async def _visit(self, request_id: str, when: str) -> None:
        found = await self._ledger.get(request_id)
        if found is None or found[0].finished or found[0].next_poll_at != when:
            if self._marker_is_stale(found, when):
                await self._schedule.unschedule(request_id, when)
            return
        record, etag = found
        now = self._clock.now()
        if record.leased_to_other(self.owner, now):
            return  # another replica (or a filing in progress) works on it; the marker stays
        record.take_lease(self.owner, now + timedelta(seconds=self._lease_seconds))
        try:
            etag = await self._ledger.save(record, etag)
        except PreconditionFailed:
            return  # another replica took it first
        self._metrics.poll_leases.inc()

        async def checkpoint() -> None:
            nonlocal etag
            try:
                etag = await self._save_held(record, etag)
            except PreconditionFailed:
                raise RecordConflict(record.id) from None

        try:
            result = await self._work(record, checkpoint)
            await self._finish(record, etag, when, result)
        finally:
            self._metrics.poll_leases.dec()

    async def _save_held(self, record: AccessRequest, etag: str) -> str:
        """Write the record this visit holds. An operator may have written it meanwhile (an
        extension, a download, a raised discovery limit: they take no lease): their changes
        are taken into ours and the write tried again. PreconditionFailed if the lease is no
        longer ours (another replica took the request over once it ran out)."""
        for _ in range(3):
            try:
                return await self._ledger.save(record, etag)
            except PreconditionFailed:
                found = await self._ledger.get(record.id)
                if found is None or found[0].lease is None or found[0].lease.owner != self.owner:
                    raise
                current, etag = found
                record.adopt_operator_changes(current)
                log.info("poll_record_merged", request_id=record.id)
        return await self._ledger.save(record, etag)

    def _marker_is_stale(self, found: tuple[AccessRequest, str] | None, when: str) -> bool:
        """Whether a marker that is not its record's `next_poll_at` may be dropped.

        It may be the next visit's marker still being put in place: filing puts the marker
        before it creates the record, a visit (and the backfill) before the record names it.
        Dropping that one would leave the request with no marker at all once the record is
        written. Next visits only move later, so a marker before the record's `next_poll_at`
        is stale for sure, as is every marker of a finished request; any other is dropped
        only once its time is long past (a crash left it; the deadline index waits as long).
        """
        if found is not None:
            record = found[0]
            if record.finished:
                return True
            if record.next_poll_at is not None and when < record.next_poll_at:
                return True
        return self._clock.now() - parse_stamp(when) > MARKER_GRACE

    async def _finish(self, record: AccessRequest, etag: str, when: str, result: Visit) -> None:
        """Release the lease and move the schedule: new marker, record, old marker."""
        record.lease = None
        old_when = when
        if result.next_in is not None:
            record.next_poll_at = self._schedule.stamp_in(result.next_in)
            await self._schedule.schedule(record.id, record.next_poll_at)
        else:
            record.next_poll_at = None
        try:
            await self._save_held(record, etag)
        except PreconditionFailed:
            # Another replica took the request over (our lease ran out): our marker is stale
            # then, and theirs stands.
            log.info("poll_record_changed", request_id=record.id)
            return
        await self._schedule.unschedule(record.id, old_when)
        if result.next_in is not None and result.next_in <= 0:
            self._hurry = True
        self._metrics.poll_visits.labels(result.outcome).inc()
        log.info(
            "poll",
            request_id=record.id,
            outcome=result.outcome,
            status=record.status,
            subject=subject_hash(self._hash_key, record.subject.type, record.subject.id),
            next_in_s=round(result.next_in, 1) if result.next_in is not None else None,
            error=record.first.last_error,
        )
