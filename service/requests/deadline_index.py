"""The deadline index: the requests not yet answered, by the day they are due.

One empty marker per request not yet answered: `deadlines/{due_by}/{id}`
(`Keys.deadline_marker`). Listed in key order they are the open requests by due date, so
"overdue" and "due before" cost LISTs plus one read per request shown, never a scan of every
record. The record is the truth: a marker is put before the record changes (filing,
extension) and deleted after (answered, purged), so a crash leaves at worst a stale marker,
never a request missing from the index. Due dates only move later, so a marker before its
record's `due_by` is stale for sure; one after it may belong to an extension in progress.
"""

from __future__ import annotations

from datetime import date, timedelta

from ulid import ULID

from service.clock import SYSTEM, Clock, isoformat
from service.requests.ledger import Ledger, RecordConflict, RequestClosed
from service.requests.records import AccessRequest, Status
from service.storage.s3 import ArchiveStore, PreconditionFailed

# A marker whose record does not exist may be a filing in progress (the marker goes first);
# one this old is a filing that never got its record written.
ORPHAN_AFTER = timedelta(hours=1)


class DeadlineIndex:
    """Put, drop and list deadline markers, reading records through the ledger."""

    def __init__(self, store: ArchiveStore, ledger: Ledger, clock: Clock = SYSTEM) -> None:
        self._store = store
        self._ledger = ledger
        self._clock = clock

    async def open(self, request_id: str, due: date) -> None:
        await self._store.put(
            self._store.keys.deadline_marker(request_id, due),
            b"",
            content_type="application/octet-stream",
        )

    async def close(self, request_id: str, due: date) -> None:
        await self._store.delete(self._store.keys.deadline_marker(request_id, due))

    async def open_by_deadline(
        self, before: date, *, limit: int, cursor: str = ""
    ) -> tuple[list[AccessRequest], str | None]:
        """Requests not yet answered with `due_by` < `before`, by due date then id; the
        cursor is the last one's `{due_by}/{id}`. Stale markers met on the way are dropped."""
        prefix = self._store.keys.deadlines_folder()
        horizon = before.isoformat()
        found: list[AccessRequest] = []
        if limit <= 0:
            return found, None
        start_after = prefix + cursor if cursor else ""
        async for item in self._store.objects(prefix, start_after=start_after, page_size=200):
            due_text, _, request_id = item.key[len(prefix) :].partition("/")
            if due_text >= horizon:
                break
            record = await self._open_record(request_id, date.fromisoformat(due_text))
            if record is not None:
                found.append(record)
                if len(found) == limit:
                    return found, f"{due_text}/{request_id}"
        return found, None

    async def count_open_before(self, before: date) -> int:
        """How many deadline markers fall before `before`: LISTs only, no record read. A
        marker a crash left behind (answered, but not yet dropped) counts until a listing
        of the overdue requests meets and drops it."""
        prefix = self._store.keys.deadlines_folder()
        horizon = prefix + before.isoformat()
        count = 0
        async for item in self._store.objects(prefix):
            if item.key >= horizon:
                break
            count += 1
        return count

    async def indexed(self) -> set[str]:
        """The ids of every request with a marker (one LIST per thousand markers)."""
        prefix = self._store.keys.deadlines_folder()
        return {item.key.rsplit("/", 1)[1] async for item in self._store.objects(prefix)}

    async def _open_record(self, request_id: str, due: date) -> AccessRequest | None:
        """The record a deadline marker stands for, if the marker is its current one."""
        found = await self._ledger.get(request_id)
        if found is None:
            if self._clock.now() - ULID.from_str(request_id).datetime > ORPHAN_AFTER:
                await self.close(request_id, due)  # a filing that never got written
            return None
        record = found[0]
        if record.answered_at is not None or record.status is Status.PURGED:
            await self.close(request_id, due)
            return None
        current = record.deadline.due_by
        if due < current:
            await self.close(request_id, due)  # left behind by an extension
        return record if due == current else None

    async def extend(self, request_id: str, months: int, reason: str) -> AccessRequest | None:
        """Extend a request's deadline (None: no such request). ExtensionRefused beyond two
        months in all; RequestClosed once it is answered or purged.

        It lives here, not in the ledger, though it writes the record too: an extension moves
        the request's marker, and the order of the three writes (new marker, record, old
        marker) is what keeps the index whole through a crash. The ledger stays a plain
        repository of records that knows nothing of markers.
        """
        for _ in range(5):
            found = await self._ledger.get(request_id)
            if found is None:
                return None
            record, etag = found
            if record.status is Status.PURGED:
                raise RequestClosed(f"the request was purged at {record.purged_at}")
            if record.answered_at is not None:
                raise RequestClosed(f"the request was answered at {record.answered_at}")
            old_due = record.deadline.due_by
            record.extend(months, reason, isoformat(self._clock.now()))
            await self.open(request_id, record.deadline.due_by)
            try:
                await self._ledger.save(record, etag)
            except PreconditionFailed:
                continue
            await self.close(request_id, old_due)
            return record
        raise RecordConflict(request_id)
