"""The polling fallback: every replica visits due requests until each one is final.

Callbacks get lost; this loop makes sure nothing ready at Copernica is missed before it
expires. A tick lists the due markers of the schedule (see `Ledger.due`), then visits each:

1. read the record; a marker of a final record, or one before the record's `next_poll_at`,
   is stale and dropped (one after it, or without a record yet, may be the next visit's
   marker being put in place: it stays, unless its time is long past);
2. take the record's lease with a conditional write, so one replica at a time works on it
   (a crashed replica's lease simply runs out);
3. the work: a `submitting` record is filed again (crash recovery); for a `pending` one,
   first HEAD the archive (a callback may have won), then check expiry, then ask Copernica
   and, when ready, stream the data into the archive through the same intake as callbacks;
4. schedule the next visit (new marker first, then the record, then drop the old marker: a
   crash anywhere in between leaves at worst a stale marker, never an unscheduled request).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import random
from dataclasses import dataclass
from datetime import timedelta

import structlog
from ulid import ULID

from service.answer.package import PackageBuilder, PackageError
from service.answer.retention import Retention
from service.clock import parse_isoformat, utcnow
from service.collect.events import Progress, S3Sink, fetch_events, request_windows
from service.collect.filing import Filing, archive_from_head
from service.config import Settings
from service.copernica.client import (
    CopernicaClient,
    CopernicaError,
    CopernicaUnavailable,
    DataGone,
    Readiness,
)
from service.copernica.events import Source
from service.intake.body import BodyBrokeOff, BodyStalled, Intake, Outcome
from service.logs import subject_hash
from service.metrics import Metrics
from service.requests.ledger import Ledger, RecordConflict, parse_stamp, stamp
from service.requests.records import REPLICA, RequestRecord, Status
from service.storage.proof import abort_stale_probes
from service.storage.s3 import ArchiveStore, ArchiveUnavailable, PreconditionFailed

log = structlog.get_logger(__name__)

MAX_SUBMIT_ATTEMPTS = 5
MAX_BACKOFF_FACTOR = 16
MIN_WORKERS, MAX_WORKERS = 4, 32
BATCH = 200
JANITOR_EVERY_TICKS = 10
# How long a marker that names no visit yet may belong to a schedule change in progress.
MARKER_GRACE = timedelta(hours=1)


@dataclass
class Visit:
    """What one visit decided: the record's new state, and when to come back (if ever)."""

    outcome: str
    next_in: float | None


class Poller:
    def __init__(
        self,
        store: ArchiveStore,
        ledger: Ledger,
        copernica: CopernicaClient,
        events: CopernicaClient,
        intake: Intake,
        filing: Filing,
        packages: PackageBuilder,
        retention: Retention,
        settings: Settings,
        metrics: Metrics,
        hash_key: bytes,
    ) -> None:
        self._store = store
        self._packages = packages
        self._retention = retention
        self._backfill: str | None = ""  # backfill cursor (Ledger.backfill); None once done
        self._started = utcnow()  # records filed since are this release's: no backfill
        self._ledger = ledger
        self._copernica = copernica
        self._events = events
        self._intake = intake
        self._filing = filing
        self._settings = settings
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
        self._expiry = timedelta(hours=settings.request_expiry_hours)
        self._stopping = asyncio.Event()

    # -- the loop ----------------------------------------------------------------------------

    def tick_seconds(self) -> float:
        return min(10.0, max(0.05, self._interval / 5))

    async def run(self) -> None:
        """Tick until `stop()`; an S3 outage only delays the next tick."""
        ticks = 0
        housekeeping: asyncio.Task[None] | None = None
        try:
            while not self._stopping.is_set():
                visited = 0
                try:
                    visited = await self.tick()
                    ticks += 1
                except ArchiveUnavailable as exc:
                    log.warning("poll_tick_failed", error=str(exc))
                except Exception:
                    log.exception("poll_tick_crashed")
                # Janitor and census list whole prefixes: beside the ticks, not between them.
                if ticks % JANITOR_EVERY_TICKS == 1 and (
                    housekeeping is None or housekeeping.done()
                ):
                    housekeeping = asyncio.create_task(self._housekeeping(ticks))
                if visited >= BATCH:
                    continue  # a full batch: more may be due already, no pause
                pause = self.tick_seconds() * random.uniform(0.8, 1.2)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), pause)
            if housekeeping is not None:
                await housekeeping
        finally:
            if housekeeping is not None:
                housekeeping.cancel()  # when the shutdown deadline cancels the loop itself

    async def _housekeeping(self, ticks: int) -> None:
        try:
            await self._store.abort_superseded_uploads()
            await abort_stale_probes(self._store)
            await self._census()
            # Not in the first round: a new process first gets on with what is due.
            if self._backfill is not None and ticks > JANITOR_EVERY_TICKS:
                self._backfill = await self._ledger.backfill(self._backfill, self._started)
            await self._retention.sweep(utcnow())
        except (ArchiveUnavailable, RecordConflict) as exc:
            log.warning("poll_housekeeping_failed", error=str(exc))
        except Exception:
            log.exception("poll_housekeeping_crashed")

    def stop(self) -> None:
        """Finish the visits in progress, start no new one."""
        self._stopping.set()

    async def tick(self) -> int:
        """Visit everything due now (bounded per tick); returns how many were visited."""
        now = utcnow()
        due = await self._ledger.due(now, BATCH)
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
                await self._ledger.unschedule(request_id, when)
            return
        record, etag = found
        if record.leased_to_other(self.owner):
            return  # another replica (or a filing in progress) works on it; the marker stays
        record.take_lease(self.owner, self._lease_seconds)
        try:
            etag = await self._ledger.save(record, etag)
        except PreconditionFailed:
            return  # another replica took it first
        self._metrics.poll_leases.inc()
        try:
            result = await self._work(record)
            await self._finish(record, etag, when, result)
        finally:
            self._metrics.poll_leases.dec()

    def _marker_is_stale(self, found: tuple[RequestRecord, str] | None, when: str) -> bool:
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
        return utcnow() - parse_stamp(when) > MARKER_GRACE

    async def _census(self) -> None:
        """Pending count and oldest pending age for /metrics (a request id is a ULID: its
        creation time is in it)."""
        ids = await self._ledger.scheduled()
        self._metrics.pending.set(len(set(ids)))
        oldest = min((ULID.from_str(i).datetime for i in ids), default=None)
        self._metrics.oldest_pending.set((utcnow() - oldest).total_seconds() if oldest else 0)
        self._metrics.overdue.set(await self._ledger.count_open_before(utcnow().date()))

    async def _work(self, record: RequestRecord) -> Visit:
        if record.needs_package:
            return await self._package(record, "packaged")
        if record.status is Status.SUBMITTING or record.copernica_id is None:
            return await self._resubmit(record)
        key = self._store.keys.archive(record.id)
        head = await self._store.head(key)
        if head is None and utcnow() - parse_isoformat(record.created_at) > self._expiry:
            if await self._close_archive(key):
                record.mark_expired("no data before REQUEST_EXPIRY_HOURS")
                return Visit("expired", None)
            head = await self._store.head(key)  # the data landed just now: take it
        if head is not None and head.get("Metadata", {}).get("closed"):
            # Our own tombstone: an earlier visit closed the key, then lost its record write.
            record.mark_expired("no data before REQUEST_EXPIRY_HOURS")
            return Visit("expired", None)
        try:
            # An access request is answered completely or not at all: events first (they
            # are small), and `archived` only once both the data and the events are stored.
            if not record.events_complete:
                await self._archive_events(record)
            if head is not None:
                record.mark_archived(archive_from_head(head, self._store.bucket, key))
                return await self._package(record, "archived")
            return await self._fetch(record)
        except DataGone as exc:
            record.mark_failed(f"Copernica: data gone ({exc})")
            return Visit("gone", None)
        except CopernicaUnavailable as exc:
            record.last_error = str(exc)
            return self._later(record, "copernica_unavailable", failed=True)
        except CopernicaError as exc:
            if exc.status in (401, 403):  # our token, not this request: keep trying
                record.last_error = str(exc)
                return self._later(record, "copernica_refused", failed=True)
            record.mark_failed(str(exc))
            return Visit("copernica_refused", None)

    async def _archive_events(self, record: RequestRecord) -> None:
        """Every window of the record's events range into `events/{id}/{window}.jsonl`."""
        assert record.events is not None
        source = Source(record.subject_type, record.subject_id)
        sink = S3Sink(self._store, lambda w: self._store.keys.events(record.id, w.name))
        progress = Progress()
        try:
            await fetch_events(
                self._events, source, request_windows(record.events), sink, progress=progress
            )
        finally:
            # Partial progress shows in the record too; stored windows are never refetched.
            events = record.events
            events["stored"] = progress.skipped + progress.windows
            events["events"] = events.get("events", 0) + progress.events
            events["complete"] = events["stored"] == events["windows"]

    async def _fetch(self, record: RequestRecord) -> Visit:
        assert record.copernica_id is not None
        readiness = await self._copernica.readiness(record.copernica_id)
        if readiness is Readiness.PENDING:
            return self._later(record, "not_ready")
        if readiness is Readiness.GONE:
            raise DataGone("status says not available")
        async with self._copernica.open_data(record.copernica_id) as body:
            if body is None:
                return self._later(record, "not_ready")
            try:
                first = await self._intake.read(body)
                receipt = await self._intake.take(
                    self._ledger.addressee_of(record), first, body, "poll"
                )
            except (BodyStalled, BodyBrokeOff) as exc:
                # Copernica's answer broke off mid-stream: nothing was archived; retry later.
                raise CopernicaUnavailable(
                    f"data download broke off: {type(exc).__name__}"
                ) from None
        if receipt.outcome in (Outcome.TIMEOUT, Outcome.BROKE_OFF):
            # Copernica's answer stalled or broke off mid-stream: nothing was archived.
            raise CopernicaUnavailable(f"data download broke off: {receipt.reason}")
        if receipt.outcome is Outcome.ARCHIVED:
            self._metrics.archived_bytes.labels("poll").inc(receipt.size)
        if receipt.outcome in (Outcome.ARCHIVED, Outcome.DUPLICATE):
            key = self._store.keys.archive(record.id)
            head = await self._store.head(receipt.key or key)
            archive = archive_from_head(head, self._store.bucket, key) if head else None
            if receipt.outcome is Outcome.ARCHIVED:
                # We stored exactly what we hashed (a multipart object's metadata lacks it).
                if archive is not None:
                    archive["sha256"] = receipt.sha256
                record.archive = archive or record.archive
            else:
                # Someone else stored the archive first: its facts are theirs, never those
                # of the body we fetched (a refiled request has a second Copernica request,
                # whose data differs). Their record note, else the object's own metadata.
                record.archive = record.archive or archive
            record.mark_archived()
            return await self._package(record, receipt.outcome.value)
        if receipt.outcome is Outcome.NOT_READY:
            return self._later(record, "not_ready")
        # Invalid or too large: quarantined; try again later, the error is on the record.
        record.last_error = f"fetched data rejected: {receipt.reason}"
        return self._later(record, receipt.outcome.value, failed=True)

    async def _package(self, record: RequestRecord, outcome: str) -> Visit:
        """Build the access package of an archived request (or adopt the one a crashed
        replica left); if that fails, the request stays scheduled until it is built."""
        try:
            package = await self._packages.ensure(record)
            data_sha256 = package.pop("data_sha256", None)
            if record.archive is not None and not record.archive.get("sha256"):
                # A multipart archive's sha256 is noted in the record after the upload; if
                # that note was lost (S3 down just then), the build, which read every byte,
                # supplies it; an adopted package did not, so the archive is read once.
                record.archive["sha256"] = data_sha256 or await self._archive_sha256(record)
        except ArchiveUnavailable as exc:
            record.last_error = f"package not built yet: {exc}"
            self._metrics.packages_built.labels("deferred").inc()
            return self._later(record, f"{outcome}_package_deferred", failed=True)
        except PackageError as exc:
            record.last_error = str(exc)
            self._metrics.packages_built.labels("failed").inc()
            log.error("package_failed", request_id=record.id, error=str(exc))
            return self._later(record, f"{outcome}_package_failed", failed=True)
        record.mark_packaged(package)
        self._metrics.packages_built.labels("built").inc()
        return Visit(outcome, None)

    async def _close_archive(self, key: str) -> bool:
        """Close an expired request's archive key with an empty tombstone (`If-None-Match`),
        as retention does for a purged one: a callback still under way or arriving later
        then stores nothing (its upload meets an existing key and is aborted, by itself or
        by the janitor), so an `expired` request never gets data behind its back. False if
        the data landed first. Found by the soak: a callback finishing as the request
        expired left an archive that no record owned, and its uploads for ever."""
        try:
            await self._store.put(
                key,
                b"",
                if_none_match=True,
                metadata={"closed": "expired"},
                content_type="application/octet-stream",
            )
        except PreconditionFailed:
            return False
        return True

    async def _archive_sha256(self, record: RequestRecord) -> str:
        digest = hashlib.sha256()
        async with self._store.open(self._store.keys.archive(record.id)) as reading:
            async for chunk in reading.chunks():
                digest.update(chunk)
        return digest.hexdigest()

    async def _resubmit(self, record: RequestRecord) -> Visit:
        """A `submitting` record: the filing never got Copernica's answer (crash or outage)."""
        if record.attempts >= MAX_SUBMIT_ATTEMPTS:
            record.mark_failed(
                f"could not file after {record.attempts} attempts: {record.last_error}"
            )
            return Visit("failed", None)
        if record.attempts:
            # Copernica may have filed an earlier attempt whose answer we lost; its callback
            # carries the same request id and is deduplicated by the archive's conditional key.
            record.extra["resubmitted"] = record.extra.get("resubmitted", 0) + 1
        await self._filing.call_copernica(record)
        if record.status is Status.PENDING:
            return self._later(record, "resubmitted")
        if record.status is Status.FAILED:
            return Visit("failed", None)
        return self._later(record, "resubmit_failed", failed=True)

    def _later(self, record: RequestRecord, outcome: str, *, failed: bool = False) -> Visit:
        record.poll_errors = record.poll_errors + 1 if failed else 0
        factor = min(MAX_BACKOFF_FACTOR, 2**record.poll_errors)
        return Visit(outcome, self._interval * factor * random.uniform(0.8, 1.2))

    async def _finish(self, record: RequestRecord, etag: str, when: str, result: Visit) -> None:
        """Release the lease and move the schedule: new marker, record, old marker."""
        record.lease = None
        old_when = when
        if result.next_in is not None:
            record.next_poll_at = stamp(utcnow() + timedelta(seconds=result.next_in))
            await self._ledger.schedule(record.id, record.next_poll_at)
        else:
            record.next_poll_at = None
        try:
            await self._ledger.save(record, etag)
        except PreconditionFailed:
            # Someone changed the record while we held the lease (an operator read folding in
            # the archive): our marker is stale then, and theirs stands.
            log.info("poll_record_changed", request_id=record.id)
            return
        await self._ledger.unschedule(record.id, old_when)
        self._metrics.poll_visits.labels(result.outcome).inc()
        log.info(
            "poll",
            request_id=record.id,
            outcome=result.outcome,
            status=record.status,
            subject=subject_hash(self._hash_key, record.subject_type, record.subject_id),
            next_in_s=round(result.next_in, 1) if result.next_in is not None else None,
            error=record.last_error,
        )
