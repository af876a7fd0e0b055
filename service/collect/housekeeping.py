"""Housekeeping: a background task of every replica beside the poll loop (not inside it).

A round, at start and then every `JANITOR_EVERY_TICKS` ticks' worth of time (the poller's
tick, `service.collect.visits.tick_seconds`):
- the janitor: multipart uploads whose key already exists (a racing delivery lost, or a
  killed replica left one) and start-up probes a crashed process left are aborted;
- the census: pending count, oldest pending age and overdue count for /metrics;
- the backfill migration (`Migrations.backfill`), one page a round, not in the first round (a
  new process first gets on with what is due), until it is done;
- retention's sweep.
These list whole prefixes, so they run beside the ticks, not between them. A round that
fails (S3 down) is only logged: the next one tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

import structlog
from ulid import ULID

from service.answer.retention import Retention
from service.clock import SYSTEM, Clock
from service.collect.visits import tick_seconds
from service.config import Settings
from service.metrics import Metrics
from service.requests.deadline_index import DeadlineIndex
from service.requests.ledger import RecordConflict
from service.requests.migrations import Migrations
from service.requests.schedule import Schedule
from service.storage.proof import abort_stale_probes
from service.storage.s3 import ArchiveStore, ArchiveUnavailable

log = structlog.get_logger(__name__)

JANITOR_EVERY_TICKS = 10


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
    ) -> None:
        self._clock = clock
        self._store = store
        self._schedule = schedule
        self._deadlines = deadlines
        self._migrations = migrations
        self._retention = retention
        self._metrics = metrics
        self._backfill: str | None = ""  # backfill cursor (Migrations.backfill); None once done
        self._started = clock.now()  # records filed since are this release's: no backfill
        self._every = JANITOR_EVERY_TICKS * tick_seconds(settings.poll_interval_seconds)
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        """A round now, then one every `JANITOR_EVERY_TICKS` ticks' worth of time, until
        `stop()`; the round in progress then finishes."""
        first = True
        while not self._stopping.is_set():
            await self.round(backfill=not first)
            first = False
            pause = self._every * random.uniform(0.8, 1.2)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), pause)

    def stop(self) -> None:
        """Finish the round in progress, start no new one."""
        self._stopping.set()

    async def round(self, *, backfill: bool = True) -> None:
        try:
            await self._store.abort_superseded_uploads()
            await abort_stale_probes(self._store)
            await self._census()
            if self._backfill is not None and backfill:
                self._backfill = await self._migrations.backfill(self._backfill, self._started)
            await self._retention.sweep()
        except (ArchiveUnavailable, RecordConflict) as exc:
            log.warning("poll_housekeeping_failed", error=str(exc))
        except Exception:
            log.exception("poll_housekeeping_crashed")

    async def _census(self) -> None:
        """Pending count and oldest pending age for /metrics (a request id is a ULID: its
        creation time is in it)."""
        ids = await self._schedule.scheduled()
        self._metrics.pending.set(len(set(ids)))
        oldest = min((ULID.from_str(i).datetime for i in ids), default=None)
        self._metrics.oldest_pending.set(
            (self._clock.now() - oldest).total_seconds() if oldest else 0
        )
        self._metrics.overdue.set(await self._deadlines.count_open_before(self._clock.now().date()))
