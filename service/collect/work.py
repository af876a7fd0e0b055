"""What a visit of the poller does to one access request (`service.collect.visits` holds the
lease and moves the schedule around it):

- an archived record without its package gets the package built (or adopts the one a
  crashed replica left);
- discovery (`service.collect.discovery`) moves on by a bounded number of Copernica calls;
  the sources it finds are recorded (this visit's record write) before any is filed (a
  later visit), so a crash never files a source nobody knows about;
- each source that is not final, the filed subject first:
  - `submitting`: filed (a profile's or subprofile's own record archived first; again after
    a crash), up to `MAX_SUBMIT_ATTEMPTS`;
  - `pending`: first HEAD its archive (a callback may have won), then check expiry (closing
    the archive key with a tombstone), then archive the events asked for, then ask Copernica
    and, when ready, stream the data into its archive through the same intake as callbacks;
- once discovery is done and every source is final, the package is built.

It returns a `Visit`: the outcome (a label of `receiver_poll_visits_total`) and when to come
back, with backoff after failures; the record is changed in place, never written here.
"""

from __future__ import annotations

import hashlib
import random
from datetime import timedelta

import structlog

from service.answer.package import PackageBuilder, PackageError
from service.answer.retention import note_ended
from service.clock import SYSTEM, Clock, parse_isoformat
from service.collect.discovery import Discoverer
from service.collect.events import Progress, S3Sink, fetch_events, request_windows
from service.collect.filing import Filing
from service.collect.visits import Checkpoint, Visit
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
from service.metrics import Metrics
from service.requests.ledger import Ledger
from service.requests.records import AccessRequest, Archive, DataRequest, DiscoveryStatus, Status
from service.storage.s3 import ArchiveStore, ArchiveUnavailable, PreconditionFailed

log = structlog.get_logger(__name__)

MAX_SUBMIT_ATTEMPTS = 5
MAX_BACKOFF_FACTOR = 16
# Bounds on one visit's work, so a request with many sources or a long discovery never
# holds a worker (and the other requests behind it) for long: the rest comes next visit.
DISCOVERY_CALLS_PER_VISIT = 50
SOURCES_PER_VISIT = 25
SOON = 0.0  # come back at the next tick


class RequestWork:
    """The work of a visit, on the clients it needs: Copernica (data requests and events),
    intake, filing and the package builder."""

    def __init__(
        self,
        store: ArchiveStore,
        ledger: Ledger,
        copernica: CopernicaClient,
        events: CopernicaClient,
        intake: Intake,
        filing: Filing,
        discoverer: Discoverer,
        packages: PackageBuilder,
        settings: Settings,
        metrics: Metrics,
        clock: Clock = SYSTEM,
    ) -> None:
        self._clock = clock
        self._discoverer = discoverer
        self._store = store
        self._ledger = ledger
        self._copernica = copernica
        self._events = events
        self._intake = intake
        self._filing = filing
        self._packages = packages
        self._metrics = metrics
        self._interval = settings.poll_interval_seconds
        self._expiry = timedelta(hours=settings.request_expiry_hours)

    async def do(self, record: AccessRequest, checkpoint: Checkpoint) -> Visit:
        """The work of one visit (the caller holds the record's lease and saves it; the
        checkpoint writes it before each filing)."""
        if record.needs_package:
            return await self._package(record, "packaged")
        # Sources found in this visit are filed in the next, once the record holds them.
        known = [d for d in record.data_requests if not d.final]
        visits = [await self._discover(record)]
        for data in self._turn(record, known):
            visits.append(await self._collect(record, data, checkpoint))
        visit = _earliest(visits)
        if record.needs_package:
            return await self._package(record, visit.outcome)
        # Ended without a package (failed, expired): its retention marker, before the record.
        await note_ended(self._store, record, self._clock.now())
        return visit

    async def _discover(self, record: AccessRequest) -> Visit | None:
        """Discovery's share of the visit: None when it has nothing to do."""
        discovery = record.discovery
        if discovery.finished or discovery.status is DiscoveryStatus.OVER_LIMIT:
            return None  # over_limit waits for an operator's raise (it reschedules)
        more = await self._discoverer.advance(record, DISCOVERY_CALLS_PER_VISIT)
        discovery = record.discovery
        if more:
            return Visit("discovering", SOON)
        if discovery.status is DiscoveryStatus.RETRYING:
            factor = min(MAX_BACKOFF_FACTOR, 2 ** max(0, discovery.errors - 1))
            return Visit("discovery_retrying", self._interval * factor * random.uniform(0.8, 1.2))
        # The sources found so far are filed at the next visit, over the limit too (they are
        # within it); then the request waits for the raise, which makes it due again.
        to_file = any(d.status is Status.SUBMITTING for d in record.discovered)
        outcome = (
            "discovery_over_limit"
            if discovery.status is DiscoveryStatus.OVER_LIMIT
            else "discovered"
        )
        return Visit(outcome, SOON if to_file else None)

    @staticmethod
    def _turn(record: AccessRequest, open_: list[DataRequest]) -> list[DataRequest]:
        """The open sources this visit works on: all of them, or `SOURCES_PER_VISIT` taken in
        turn (the record's version moves the window on) with the filed subject always in."""
        if len(open_) <= SOURCES_PER_VISIT:
            return open_
        start = record.version % len(open_)
        turn = (open_ + open_)[start : start + SOURCES_PER_VISIT]
        if record.first in open_ and record.first not in turn:
            turn[-1] = record.first
        return turn

    async def _collect(
        self, record: AccessRequest, data: DataRequest, checkpoint: Checkpoint
    ) -> Visit:
        """One data request: filed (again), expired, or its events and data fetched."""
        if data.status is Status.SUBMITTING or data.copernica_id is None:
            return await self._resubmit(record, data, checkpoint)
        addressee = self._ledger.source_addressee(record, data)
        key = addressee.archive_key(self._store.keys)
        head = await self._store.head(key)
        filed_at = parse_isoformat(data.filed_at or record.created_at)
        if head is None and self._clock.now() - filed_at > self._expiry:
            if await self._close_archive(key):
                data.mark_expired("no data before REQUEST_EXPIRY_HOURS")
                return Visit("expired", None)
            head = await self._store.head(key)  # the data landed just now: take it
        if head is not None and head.get("Metadata", {}).get("closed"):
            # Our own tombstone: an earlier visit closed the key, then lost its record write.
            data.mark_expired("no data before REQUEST_EXPIRY_HOURS")
            return Visit("expired", None)
        try:
            # An access request is answered completely or not at all: events first (they
            # are small), and `archived` only once both the data and the events are stored.
            if not data.events_complete:
                await self._archive_events(record, data)
            if head is not None:
                data.mark_archived(Archive.from_head(head, self._store.bucket, key))
                return Visit("archived", None)
            return await self._fetch(record, data)
        except DataGone as exc:
            data.mark_failed(f"Copernica: data gone ({exc})")
            return Visit("gone", None)
        except CopernicaUnavailable as exc:
            data.last_error = str(exc)
            return self._later(data, "copernica_unavailable", failed=True)
        except CopernicaError as exc:
            if exc.status in (401, 403):  # our token, not this request: keep trying
                data.last_error = str(exc)
                return self._later(data, "copernica_refused", failed=True)
            data.mark_failed(str(exc))
            return Visit("copernica_refused", None)

    async def _archive_events(self, record: AccessRequest, data: DataRequest) -> None:
        """Every window of the data request's events range into `events/{id}/{window}.jsonl`
        (a discovered source's: `sources/{id}/{digest}/events/{window}.jsonl`)."""
        events = data.events
        assert events is not None
        source = Source(data.subject_type, data.subject_id)
        keys = self._store.keys
        if data is record.first:
            sink = S3Sink(self._store, lambda w: keys.events(record.id, w.name))
        else:
            digest = self._ledger.digest_of(data)
            sink = S3Sink(self._store, lambda w: keys.source_events(record.id, digest, w.name))
        progress = Progress()
        try:
            await fetch_events(
                self._events, source, request_windows(events.range), sink, progress=progress
            )
        finally:
            # Partial progress shows in the record too; stored windows are never refetched.
            data.events = events.progressed(progress.skipped + progress.windows, progress.events)

    async def _fetch(self, record: AccessRequest, data: DataRequest) -> Visit:
        assert data.copernica_id is not None
        readiness = await self._copernica.readiness(data.copernica_id)
        if readiness is Readiness.PENDING:
            return self._later(data, "not_ready")
        if readiness is Readiness.GONE:
            raise DataGone("status says not available")
        async with self._copernica.open_data(data.copernica_id) as body:
            if body is None:
                return self._later(data, "not_ready")
            try:
                first = await self._intake.read(body)
                receipt = await self._intake.take(
                    self._ledger.source_addressee(record, data), first, body, "poll"
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
            key = self._ledger.source_addressee(record, data).archive_key(self._store.keys)
            head = await self._store.head(receipt.key or key)
            archive = Archive.from_head(head, self._store.bucket, key) if head else None
            if receipt.outcome is Outcome.ARCHIVED:
                # We stored exactly what we hashed (a multipart object's metadata lacks it).
                if archive is not None:
                    archive = archive.with_sha256(receipt.sha256)
                data.archive = archive or data.archive
            else:
                # Someone else stored the archive first: its facts are theirs, never those
                # of the body we fetched (a refiled request has a second Copernica request,
                # whose data differs). Their record note, else the object's own metadata.
                data.archive = data.archive or archive
            data.mark_archived()
            return Visit(receipt.outcome.value, None)
        if receipt.outcome is Outcome.NOT_READY:
            return self._later(data, "not_ready")
        # Invalid or too large: quarantined; try again later, the error is on the record.
        data.last_error = f"fetched data rejected: {receipt.reason}"
        return self._later(data, receipt.outcome.value, failed=True)

    async def _package(self, record: AccessRequest, outcome: str) -> Visit:
        """Build the access package of an archived request (or adopt the one a crashed
        replica left); if that fails, the request stays scheduled until it is built."""
        first = record.first
        try:
            built = await self._packages.ensure(record)
            if first.archive is not None and not first.archive.sha256:
                # A multipart archive's sha256 is noted in the record after the upload; if
                # that note was lost (S3 down just then), the build, which read every byte,
                # supplies it; an adopted package did not, so the archive is read once.
                sha256 = built.data_sha256 or await self._archive_sha256(record)
                first.archive = first.archive.with_sha256(sha256)
        except ArchiveUnavailable as exc:
            first.last_error = f"package not built yet: {exc}"
            self._metrics.packages_built.labels("deferred").inc()
            return self._later(first, f"{outcome}_package_deferred", failed=True)
        except PackageError as exc:
            first.last_error = str(exc)
            self._metrics.packages_built.labels("failed").inc()
            log.error("package_failed", request_id=record.id, error=str(exc))
            return self._later(first, f"{outcome}_package_failed", failed=True)
        record.mark_packaged(built.package)
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

    async def _archive_sha256(self, record: AccessRequest) -> str:
        digest = hashlib.sha256()
        async with self._store.open(self._store.keys.archive(record.id)) as reading:
            async for chunk in reading.chunks():
                digest.update(chunk)
        return digest.hexdigest()

    async def _resubmit(
        self, record: AccessRequest, data: DataRequest, checkpoint: Checkpoint
    ) -> Visit:
        """A `submitting` data request: the filing never got Copernica's answer (crash or
        outage)."""
        if data.attempts >= MAX_SUBMIT_ATTEMPTS:
            data.mark_failed(f"could not file after {data.attempts} attempts: {data.last_error}")
            return Visit("failed", None)
        if data.attempts or data is record.first:
            # Copernica may have filed an earlier attempt whose answer we lost (the filed
            # subject with no attempt recorded: its filer died before it could save the
            # record); its callback lands on the same key and is deduplicated there.
            data.resubmitted += 1
        await self._filing.call_copernica(record, data, checkpoint)
        if data.status is Status.PENDING:
            return self._later(data, "resubmitted" if data.resubmitted else "filed")
        if data.final:  # failed, gone, unsupported
            return Visit(data.status.value, None)
        return self._later(data, "resubmit_failed", failed=True)

    def _later(self, data: DataRequest, outcome: str, *, failed: bool = False) -> Visit:
        data.poll_errors = data.poll_errors + 1 if failed else 0
        factor = min(MAX_BACKOFF_FACTOR, 2**data.poll_errors)
        return Visit(outcome, self._interval * factor * random.uniform(0.8, 1.2))


def _earliest(visits: list[Visit | None]) -> Visit:
    """One visit's verdict from its parts: the first part's outcome (the discovery's, else
    the filed subject's), back when the soonest part wants to be (None: no part does)."""
    parts = [v for v in visits if v is not None]
    if not parts:
        return Visit("waiting", None)
    times = [v.next_in for v in parts if v.next_in is not None]
    return Visit(parts[0].outcome, min(times) if times else None)
