"""The poll schedule: when each request not yet final is visited next.

One empty marker object per scheduled visit: `due/{stamp}/{id}` (`Keys.schedule_marker`). S3
lists keys in order, so the due requests are the first keys under `due/`, and a tick with
nothing due costs one LIST however many requests are pending. The record's `next_poll_at`
names its one valid marker; any other marker of the same id is stale and is deleted when met
(by the poller, which reads the record). A marker is put before the record names it and
deleted after the record moved on, so a crash leaves at worst a stale marker, never an
unscheduled request.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from service.clock import SYSTEM, Clock
from service.storage.s3 import ArchiveStore

_STAMP = "%Y%m%dT%H%M%S.%fZ"


def stamp(moment: datetime) -> str:
    """A time as a string that sorts like the time (schedule keys are listed in order)."""
    return moment.strftime(_STAMP)


def parse_stamp(text: str) -> datetime:
    return datetime.strptime(text, _STAMP).replace(tzinfo=UTC)


class Schedule:
    """Put, drop and list the schedule's markers."""

    def __init__(self, store: ArchiveStore, clock: Clock = SYSTEM) -> None:
        self._store = store
        self._clock = clock
        # Set when this process made a request due now (a filing that starts a discovery, an
        # operator's raise of its limit): this replica's poller need not wait out its tick.
        # Other replicas find the marker at their next tick, as always.
        self.nudged = asyncio.Event()

    def nudge(self) -> None:
        """A request is due now and its record free (written, lease released): tick soon."""
        self.nudged.set()

    def stamp_in(self, seconds: float) -> str:
        """The stamp of a visit `seconds` from now (on this schedule's clock)."""
        return stamp(self._clock.now() + timedelta(seconds=seconds))

    async def schedule(self, request_id: str, when: str) -> None:
        await self._store.put(
            self._store.keys.schedule_marker(request_id, when),
            b"",
            content_type="application/octet-stream",
        )

    async def unschedule(self, request_id: str, when: str) -> None:
        # S3 answers a delete of a missing key with success: deleting is idempotent.
        await self._store.delete(self._store.keys.schedule_marker(request_id, when))

    async def due(self, now: datetime, limit: int) -> list[tuple[str, str]]:
        """(stamp, request id) of markers due at `now`, oldest first, at most `limit`: one
        LIST when `limit` is at most a thousand."""
        prefix = self._store.keys.schedule_folder()
        horizon = stamp(now)
        found: list[tuple[str, str]] = []
        if limit <= 0:
            return found
        async for item in self._store.objects(prefix, page_size=min(1000, limit)):
            when, _, request_id = item.key[len(prefix) :].partition("/")
            if when > horizon:
                break
            found.append((when, request_id))
            if len(found) == limit:
                break
        return found

    async def scheduled(self) -> list[str]:
        """Ids of every scheduled (not final) request: one LIST call per 1000 of them."""
        return [
            item.key.rsplit("/", 1)[1]
            async for item in self._store.objects(self._store.keys.schedule_folder())
        ]
