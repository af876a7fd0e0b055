"""Housekeeping: a background task beside the poll loop (not inside it), run by one replica
at a time.

A round, at start and then every `JANITOR_EVERY_TICKS` ticks' worth of time (the poller's
tick, `service.collect.visits.tick_seconds`):
- the census: pending count, oldest pending age and overdue count for /metrics;
- the janitor: multipart uploads whose key already exists (a racing delivery lost, or a
  killed replica left one), uploads under `sources/{id}/` of a request purged (or with no
  record), and start-up probes a crashed process left are aborted;
- the migrations (`Migrations.backfill`, then `Migrations.ended`), one page a round, not in
  a process's first round (a new process first gets on with what is due), until done;
- retention's sweep.
These list whole prefixes, so they run beside the ticks, not between them. A round that
fails (S3 down) is only logged: the next one tries again.

**One replica at a time.** Only the replica holding the housekeeping lease (`Lease`, an
object `leases/housekeeping.json` written with conditional PUTs) runs a round's work; the
others read the lease (one GET a round) and do nothing else, so an idle deployment's S3
calls do not grow with replicas times pending requests. The lease lasts `LEASE_ROUNDS` rounds;
the holder renews it at the start of every round (one PUT, which also carries its last census
for the other replicas' consoles), and within a round whose work outlasts half of it. A
crashed holder's lease runs out and the first replica to look after that takes it; a holder
that stops writes its lease expired, so the next replica takes it at its next round. Overlap
is harmless (every part of a round was made to run on many replicas at once): the lease saves
calls, it does not guard correctness.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from botocore import xform_name
from ulid import ULID

from service.answer.retention import Retention
from service.clock import SYSTEM, Clock, isoformat, parse_isoformat
from service.collect.visits import tick_seconds
from service.config import Settings
from service.metrics import Metrics
from service.requests.deadline_index import DeadlineIndex
from service.requests.ledger import RecordConflict
from service.requests.migrations import Migrations
from service.requests.records import AccessRequest, Status
from service.requests.schedule import Schedule
from service.storage.proof import abort_stale_probes
from service.storage.s3 import ArchiveStore, ArchiveUnavailable, PreconditionFailed

log = structlog.get_logger(__name__)

JANITOR_EVERY_TICKS = 10
LEASE_ROUNDS = 3  # the lease lasts three rounds: a holder renews it every round

# Which part of housekeeping the running code is (None outside it), for the S3 call count.
_PART: ContextVar[str | None] = ContextVar("housekeeping_part", default=None)


@contextlib.contextmanager
def _part(name: str) -> Iterator[None]:
    token = _PART.set(name)
    try:
        yield
    finally:
        _PART.reset(token)


def count_s3_calls(client: Any, metrics: Metrics) -> None:
    """Count the S3 calls housekeeping makes (`receiver_housekeeping_s3_requests_total`, by
    part and operation), whichever component makes them: a hook on the S3 client that reads
    the part from the calling task's context."""

    def counted(model: Any, **_: Any) -> None:
        part = _PART.get()
        if part is not None:
            metrics.housekeeping_s3.labels(part, xform_name(model.name)).inc()

    client.meta.events.register("before-call.s3", counted)


@dataclass(frozen=True)
class Census:
    """What the census counted, and when."""

    pending: int
    oldest: datetime | None  # creation time of the oldest request not yet final
    overdue: int
    at: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "pending": self.pending,
            "oldest": isoformat(self.oldest) if self.oldest else None,
            "overdue": self.overdue,
            "at": isoformat(self.at),
        }

    @classmethod
    def from_json(cls, data: Any) -> Census | None:
        try:
            oldest = data["oldest"]
            return cls(
                int(data["pending"]),
                parse_isoformat(oldest) if oldest else None,
                int(data["overdue"]),
                parse_isoformat(data["at"]),
            )
        except (TypeError, KeyError, ValueError):
            return None


@dataclass(frozen=True)
class LeaseState:
    """The lease object's content: who holds it, until when, and the holder's last census."""

    holder: str
    until: datetime
    census: Census | None

    def body(self) -> bytes:
        census = self.census.as_json() if self.census else None
        return json.dumps(
            {"holder": self.holder, "until": isoformat(self.until), "census": census},
            sort_keys=True,
        ).encode()

    @classmethod
    def parse(cls, body: bytes) -> LeaseState | None:
        """None for an object that is not a lease (taken over as if it had expired)."""
        try:
            data = json.loads(body)
            return cls(
                str(data["holder"]),
                parse_isoformat(data["until"]),
                Census.from_json(data["census"]),
            )
        except (TypeError, KeyError, ValueError):
            return None


def replica_name() -> str:
    """This process's name in the lease: host and pid for the operator, a ULID to be unique."""
    return f"{socket.gethostname()}/{os.getpid()}/{ULID()}"


class Lease:
    """The housekeeping lease: the object `Keys.housekeeping_lease()`, written only with
    conditions (`If-None-Match: *` when absent, `If-Match: <etag>` when expired or ours), so
    of two replicas taking it at once exactly one wins."""

    def __init__(self, store: ArchiveStore, seconds: float, clock: Clock, holder: str) -> None:
        self._store = store
        self._key = store.keys.housekeeping_lease()
        self._period = timedelta(seconds=seconds)
        self._clock = clock
        self.holder = holder
        self._etag: str | None = None  # of our own last write while we hold it
        self._until: datetime | None = None
        self.seen: LeaseState | None = None  # the lease as last read or written

    def held(self) -> bool:
        """We hold it and it has not run out (by our clock)."""
        return (
            self._etag is not None and self._until is not None and self._clock.now() < self._until
        )

    def remaining(self) -> float:
        """Seconds until the lease last seen runs out (0 if none or run out)."""
        if self.seen is None:
            return 0.0
        return max(0.0, (self.seen.until - self._clock.now()).total_seconds())

    async def take(self, census: Census | None = None) -> bool:
        """Hold the lease for a round: while ours has not run out, renew it (one conditional
        PUT, with `census`); otherwise one GET, and a conditional PUT when it is absent, has
        run out, or is ours. False when another replica holds it (or won the race)."""
        if self.held():
            return await self.renew(census)
        self._etag = None
        found = await self._store.get(self._key)
        state = LeaseState.parse(found.body) if found is not None else None
        now = self._clock.now()
        if state is not None and state.holder != self.holder and state.until > now:
            self.seen = state
            return False
        census = state.census if state is not None else None  # kept until ours is counted
        return await self._write(
            census, now + self._period, if_match=found.etag if found is not None else None
        )

    async def renew(self, census: Census | None) -> bool:
        """Extend our lease by a period from now, with `census` in it (else the census it
        carries; one conditional PUT). False when it is no longer ours (another replica took
        it after it ran out)."""
        if self._etag is None:
            return False
        if census is None and self.seen is not None:
            census = self.seen.census
        return await self._write(census, self._clock.now() + self._period, if_match=self._etag)

    async def keep(self, census: Census | None) -> bool:
        """Renew only when less than half the lease remains (a long round)."""
        if self.held() and self.remaining() > self._period.total_seconds() / 2:
            return True
        return await self.renew(census)

    async def release(self) -> None:
        """Write our lease expired (conditionally), so another replica takes it at its next
        round instead of waiting it out. Best effort: if S3 does not answer, it runs out."""
        if self._etag is None:
            return
        census = self.seen.census if self.seen is not None else None
        with contextlib.suppress(ArchiveUnavailable):
            await self._write(census, self._clock.now(), if_match=self._etag)
        self._etag = None
        log.info("housekeeping_lease_released", holder=self.holder)

    async def _write(self, census: Census | None, until: datetime, *, if_match: str | None) -> bool:
        state = LeaseState(self.holder, until, census)
        try:
            etag = await self._store.put(
                self._key, state.body(), if_none_match=if_match is None, if_match=if_match
            )
        except PreconditionFailed:
            self._etag = None  # another replica wrote it first: it holds the lease
            return False
        self._etag, self._until, self.seen = etag, until, state
        return True


class Housekeeping:
    def __init__(
        self,
        store: ArchiveStore,
        schedule: Schedule,
        deadlines: DeadlineIndex,
        migrations: Migrations,
        retention: Retention,
        settings: Settings,
        metrics: Metrics,
        clock: Clock = SYSTEM,
        holder: str | None = None,
    ) -> None:
        self._clock = clock
        self._store = store
        self._schedule = schedule
        self._deadlines = deadlines
        self._migrations = migrations
        self._retention = retention
        self._metrics = metrics
        self._backfill: str | None = ""  # backfill cursor (Migrations.backfill); None once done
        self._ended: str | None = ""  # Migrations.ended's cursor; None once done
        self._started = clock.now()  # records filed since are this release's: no backfill
        self._every = JANITOR_EVERY_TICKS * tick_seconds(settings.poll_interval_seconds)
        self.lease = Lease(store, LEASE_ROUNDS * self._every, clock, holder or replica_name())
        self._census_counted: Census | None = None
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        """A round now, then one every `JANITOR_EVERY_TICKS` ticks' worth of time, until
        `stop()`; the round in progress then finishes and the lease is released. A replica
        not holding the lease looks again once the holder's lease would run out, if that
        comes sooner, so a crashed holder is replaced within one lease period."""
        first = True
        while not self._stopping.is_set():
            await self.round(backfill=not first)
            first = False
            pause = self._every * random.uniform(0.8, 1.2)
            seen = self.lease.seen
            if seen is not None and seen.holder != self.lease.holder:
                pause = min(pause, self.lease.remaining() + self._every * random.uniform(0.05, 0.2))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), pause)
        await self.release()

    def stop(self) -> None:
        """Finish the round in progress, start no new one."""
        self._stopping.set()

    async def release(self) -> None:
        """Give the lease up (if held) so another replica takes over at once."""
        with _part("lease"):
            await self.lease.release()
        self._publish(holding=False)

    async def round(self, *, backfill: bool = True) -> None:
        """One round: take or renew the lease (carrying the last census, for the others);
        if held, the census, the janitor, a backfill page and retention's sweep, the lease
        renewed between them if half of it has gone by."""
        try:
            with _part("lease"):
                holding = await self.lease.take(self._census_counted)
            self._publish(holding)
            self._metrics.housekeeping_rounds.labels("holder" if holding else "standby").inc()
            if not holding:
                return
            steps: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
                ("census", self._count),
                ("janitor", self._janitor),
                ("retention", self._retention.sweep),
            ]
            if backfill and (self._backfill is not None or self._ended is not None):
                steps.insert(2, ("backfill", self._backfill_page))
            for part, step in steps:
                with _part("lease"):
                    if not await self.lease.keep(self._census_counted):
                        self._publish(holding=False)
                        return
                with _part(part):
                    await step()
        except (ArchiveUnavailable, RecordConflict) as exc:
            log.warning("poll_housekeeping_failed", error=str(exc))
        except Exception:
            log.exception("poll_housekeeping_crashed")

    def _publish(self, holding: bool) -> None:
        """The census on /metrics (holder only) and for the console (every replica: a replica
        not holding the lease shows the holder's, as its lease object carries it)."""
        holding = holding and self.lease.held()
        census = self._census_counted if holding else None
        if census is None and self.lease.seen is not None:
            census = self.lease.seen.census
        if census is not None:
            oldest = census.oldest
            age = (self._clock.now() - oldest).total_seconds() if oldest else 0.0
            self._metrics.census.set(census.pending, age, census.overdue)
        if not holding:
            self._census_counted = None  # a later turn as holder starts from the lease's
        self._metrics.census.exported = holding
        self._metrics.housekeeping_holder.set(1 if holding else 0)

    async def _count(self) -> None:
        self._census_counted = await self._census()
        self._publish(holding=True)

    async def _janitor(self) -> None:
        """Abort the multipart uploads that can never complete or must not: the key exists
        (`If-None-Match: *` would refuse it), or it is a source's of a request that is purged
        or has no record (retention deleted its folder: nothing may be stored there again).
        Others may be in progress on another replica and stay (the bucket's lifecycle rule
        ends those that never finish)."""
        store = self._store
        for key, upload_id in await store.uploads(store.keys.prefix):
            if await store.head(key) is not None or await self._purged_source(key):
                await store.abort_upload(key, upload_id)
        await abort_stale_probes(store)

    async def _purged_source(self, key: str) -> bool:
        request_id = self._store.keys.source_request_id(key)
        if request_id is None:
            return False
        found = await self._store.get(self._store.keys.record(request_id))
        return found is None or AccessRequest.from_bytes(found.body).status is Status.PURGED

    async def _backfill_page(self) -> None:
        """One page of the first migration not yet done."""
        if self._backfill is not None:
            self._backfill = await self._migrations.backfill(self._backfill, self._started)
        elif self._ended is not None:
            self._ended = await self._migrations.ended(self._ended, self._started)

    async def _census(self) -> Census:
        """Pending count and oldest pending creation time (a request id is a ULID: its
        creation time is in it), and the overdue count."""
        ids = set(await self._schedule.scheduled())
        oldest = min((ULID.from_str(i).datetime for i in ids), default=None)
        overdue = await self._deadlines.count_open_before(self._clock.now().date())
        return Census(len(ids), oldest, overdue, self._clock.now())
