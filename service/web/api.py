"""Operator routes (`/v1/*`, bearer token), health, readiness and metrics.

Handlers parse, call and map the result; the errors they raise (`service.errors`: a
malformed input, no such request, a package not built or deleted, storage unavailable) are
answered by `middlewares.api_errors` with their status.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import replace
from datetime import date, timedelta
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.answer.package import CONTENT_TYPE, package_filename
from service.clock import isoformat, utcnow
from service.collect.filing import Filing, parse_new_request
from service.config import Settings
from service.errors import Conflict, Gone, InvalidInput, NotFoundError, ServiceError
from service.intake.urls import ULID_PATTERN
from service.metrics import Metrics
from service.requests.deadline import parse_extension
from service.requests.deadline_index import DeadlineIndex
from service.requests.ledger import Ledger, RecordConflict
from service.requests.records import (
    STATUSES,
    AccessRequest,
    Archive,
    DataRequest,
    DiscoveryStatus,
    Status,
)
from service.requests.schedule import Schedule
from service.storage.s3 import ArchiveStore, ArchiveUnavailable, NotFound

log = structlog.get_logger(__name__)

MAX_PAGE = 1000
DEADLINE_CURSOR = re.compile(r"^\d{4}-\d{2}-\d{2}/[0-9A-HJKMNP-TV-Z]{26}$")


# A request id in a route: a ULID, so any other id is the router's 404 (no handler checks).
ROUTE_ID = "{id:[0-9A-HJKMNP-TV-Z]{26}}"


def no_such_request() -> NotFoundError:
    return NotFoundError("no such request")


async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json(loads=json.loads)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("body must be JSON") from None


class OperatorApi:
    def __init__(
        self,
        filing: Filing,
        ledger: Ledger,
        schedule: Schedule,
        deadlines: DeadlineIndex,
        store: ArchiveStore,
        settings: Settings,
        metrics: Metrics,
    ) -> None:
        self._filing = filing
        self._ledger = ledger
        self._schedule = schedule
        self._deadlines = deadlines
        self._max_sources = settings.discovery_max_sources
        self._store = store
        self._link_seconds = settings.package_link_seconds
        self._metrics = metrics

    async def create(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        key = request.headers.get("Idempotency-Key")
        if key is not None and not (0 < len(key) <= 255 and key.isprintable()):
            raise InvalidInput(
                "Idempotency-Key must be 1-255 printable characters", field="Idempotency-Key"
            )
        record = await self._filing.file(parse_new_request(body), key)
        return web.json_response(describe(record), status=202)

    async def show(self, request: web.Request) -> web.Response:
        record = await self.current(request.match_info["id"])
        if record is None:
            raise no_such_request()
        return web.json_response(describe(record))

    async def current(self, request_id: str) -> AccessRequest | None:
        """A request's record as the operator should see it (None: no such request)."""
        found = await self._ledger.get(request_id)
        if found is None:
            return None
        return await self._reconcile(found[0])

    async def _reconcile(self, record: AccessRequest) -> AccessRequest:
        """The callback path writes only the archive object: fold it into the record on read."""
        first = record.first
        if first.status is not Status.PENDING or not first.events_complete:
            return record  # with events asked for, the poller decides when all is stored
        key = self._store.keys.archive(record.id)
        head = await self._store.head(key)
        if head is None or head.get("Metadata", {}).get("closed"):
            # No data, or the poller's tombstone of an expiring request (it writes `expired`
            # next): never an archive.
            return record
        info = Archive.from_head(head, self._store.bucket, key)

        def change(current: AccessRequest) -> bool:
            if current.first.status is not Status.PENDING:
                return False
            if current.leased(utcnow()):
                # A visit works on it and finds the archive itself. Writing now would cost
                # that visit its record write: the discovery it did and the sources it filed
                # at Copernica, lost (filed again by the next visit).
                return False
            current.first.mark_archived(info)
            return True

        try:
            updated = await self._ledger.update(record.id, change)
        except RecordConflict:
            updated = None
        if updated is None:
            first.mark_archived(info)
            return record
        if updated.first.status is Status.PENDING:
            updated.first.mark_archived(info)  # shown so; the visit holding it records it
        return updated

    async def list(self, request: web.Request) -> web.Response:
        """A page of requests: by id (creation), or with `overdue=true` / `due_before=DAY`
        the requests not yet answered by due date (from the deadline index)."""
        query = request.query
        status = query.get("status")
        if status is not None and status not in STATUSES:
            raise InvalidInput(f"status must be one of {', '.join(STATUSES)}", field="status")
        try:
            limit = int(query.get("limit", "100"))
        except ValueError:
            raise InvalidInput("limit must be an integer", field="limit") from None
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"limit must be between 1 and {MAX_PAGE}", field="limit")
        overdue = query.get("overdue")
        if overdue not in (None, "true", "false"):
            raise InvalidInput("overdue must be true or false", field="overdue")
        due_before: date | None = None
        if "due_before" in query:
            try:
                due_before = date.fromisoformat(query["due_before"])
            except ValueError:
                raise InvalidInput(
                    "due_before must be a day as YYYY-MM-DD", field="due_before"
                ) from None
        today = utcnow().date()
        cursor = query.get("cursor", "")
        by_deadline = overdue == "true" or due_before is not None
        if cursor and not (DEADLINE_CURSOR if by_deadline else ULID_PATTERN).match(cursor):
            raise InvalidInput("cursor is not valid", field="cursor")
        if by_deadline:
            horizon = min(d for d in (due_before, today if overdue else None) if d)
            records, next_cursor = await self._deadlines.open_by_deadline(
                horizon, limit=limit, cursor=cursor
            )
            records = [r for r in records if status is None or r.status == status]
        else:
            keep = None
            if overdue == "false":
                keep = lambda r: not r.deadline.overdue(today)  # noqa: E731
            records, next_cursor = await self._ledger.page(
                status=status, limit=limit, cursor=cursor, keep=keep
            )
        return web.json_response(
            {"items": [describe(r, today) for r in records], "next_cursor": next_cursor}
        )

    async def extend(self, request: web.Request) -> web.Response:
        """`{"months": 1|2, "reason": "..."}`: the deadline moves, two months at most in all."""
        request_id = request.match_info["id"]
        months, reason = parse_extension(await _json_body(request))
        record = await self._deadlines.extend(request_id, months, reason)
        if record is None:
            raise no_such_request()
        log.info("deadline_extended", request_id=request_id, months=months)
        return web.json_response(describe(record))

    async def discovery(self, request: web.Request) -> web.Response:
        """`{"max_sources": N}`: raise the limit of a discovery waiting `over_limit`."""
        max_sources = parse_max_sources(await _json_body(request))
        record = await self.raise_limit(request.match_info["id"], max_sources)
        return web.json_response(describe(record))

    async def raise_limit(self, request_id: str, max_sources: int) -> AccessRequest:
        """Let a discovery that stopped `over_limit` go on to `max_sources` sources: it is
        `running` again and the poller visits the request at once (a marker for now is put
        first, then the record names it). InvalidInput if `max_sources` is not above the
        current limit; Conflict if discovery is not over its limit; Gone once purged."""
        found = await self._ledger.get(request_id)
        if found is None:
            raise no_such_request()
        self._check_raise(found[0], max_sources)
        when = self._schedule.stamp_in(0)
        await self._schedule.schedule(request_id, when)
        replaced: list[str | None] = []

        def change(record: AccessRequest) -> bool:
            self._check_raise(record, max_sources)
            replaced[:] = [record.next_poll_at]
            record.discovery = replace(
                record.discovery, status=DiscoveryStatus.RUNNING, max_sources=max_sources
            )
            record.next_poll_at = when
            return True

        record = await self._ledger.update(request_id, change)
        if record is None:
            raise no_such_request()
        if replaced and replaced[0] not in (None, when):
            await self._schedule.unschedule(request_id, str(replaced[0]))
        self._schedule.nudge()  # this replica's poller visits it at once
        log.info("discovery_limit_raised", request_id=request_id, max_sources=max_sources)
        return record

    def _check_raise(self, record: AccessRequest, max_sources: int) -> None:
        if record.status is Status.PURGED:
            raise Gone(f"the request was deleted at {record.purged_at} (RETENTION_DAYS)")
        discovery = record.discovery
        if discovery.status is not DiscoveryStatus.OVER_LIMIT:
            raise Conflict(
                f"discovery is {discovery.status.value}, not over_limit: there is no limit to raise"
            )
        limit = discovery.max_sources or self._max_sources
        if max_sources <= limit:
            raise InvalidInput(
                f"max_sources must be larger than the current limit ({limit})",
                field="max_sources",
            )

    async def package(self, request: web.Request) -> web.StreamResponse:
        """The access package as a download (`ETag` = its sha256); the first complete one
        answers the request."""
        record = await self.packaged(request.match_info["id"])
        return await self.send_package(request, record)

    async def package_link(self, request: web.Request) -> web.Response:
        """A presigned GET of the package, valid PACKAGE_LINK_SECONDS."""
        record = await self.packaged(request.match_info["id"])
        return web.json_response(await self.link(record))

    # -- handing out, shared with the operator console ------------------------------------

    async def packaged(self, request_id: str) -> AccessRequest:
        """The record of a request whose package can be handed out (`request_id` from a
        route: a ULID); NotFoundError, or a PackageRefused saying why not."""
        found = await self._ledger.get(request_id)
        if found is None:
            raise no_such_request()
        record = found[0]
        if record.status is Status.PURGED:
            raise PackagePurged(f"deleted at {record.purged_at} (RETENTION_DAYS)")
        if record.package is None:
            raise PackageNotReady(f"the package is not built yet (status {record.status})")
        return record

    async def send_package(self, request: web.Request, record: AccessRequest) -> web.StreamResponse:
        """Stream the package of `record` (from `packaged`) as the answer to `request`; a
        complete download answers the access request. PackageRefused or ArchiveUnavailable
        before the first byte; a failure mid-stream cuts the download short (it then fails
        its sha256 check)."""
        assert record.package is not None
        response = web.StreamResponse(
            headers={
                "Content-Type": CONTENT_TYPE,
                "ETag": f'"{record.package.sha256}"',
                "Content-Disposition": f'attachment; filename="{package_filename(record.id)}"',
            }
        )
        try:
            async with self._store.open(record.package.key) as reading:
                response.content_length = reading.size
                await response.prepare(request)
                async for chunk in reading.chunks():
                    await response.write(chunk)
        except NotFound:
            raise PackageNotReady(
                "the package is recorded but not in storage (being purged?)"
            ) from None
        except ArchiveUnavailable as exc:
            if response.prepared:  # no error answer can follow the headers
                raise DownloadCutShort(str(exc)) from exc
            raise
        await response.write_eof()
        await self._answered(record.id, "download")
        return response

    async def link(self, record: AccessRequest) -> dict[str, str]:
        """A presigned GET of the package of `record` (from `packaged`), valid
        PACKAGE_LINK_SECONDS: `{url, expires_at, sha256}`; it answers the access request."""
        assert record.package is not None
        url = await self._store.presigned_get(
            record.package.key, self._link_seconds, package_filename(record.id)
        )
        await self._answered(record.id, "link")
        expires = utcnow() + timedelta(seconds=self._link_seconds)
        return {"url": url, "expires_at": isoformat(expires), "sha256": record.package.sha256}

    async def _answered(self, request_id: str, way: str) -> None:
        """The first hand-out answers the access request: `answered_at`, and the request
        leaves the deadline index."""
        self._metrics.packages_handed_out.labels(way).inc()
        now = isoformat(utcnow())
        first: list[bool] = []

        def change(record: AccessRequest) -> bool:
            first[:] = [record.mark_answered(now)]
            return first[0]

        try:
            record = await self._ledger.update(request_id, change)
            if record is not None and first and first[0]:
                await self._deadlines.close(request_id, record.deadline.due_by)
                log.info("request_answered", request_id=request_id, way=way)
        except (ArchiveUnavailable, RecordConflict) as exc:
            # The subject has the package; the next hand-out records it.
            log.warning("answered_not_recorded", request_id=request_id, error=str(exc))


class PackageRefused(ServiceError):
    """The request exists but its package cannot be handed out; the kind says why (its
    status) and the message how. The console shows it on the request's page."""


class PackageNotReady(PackageRefused, Conflict):
    """Not built yet (or recorded but no longer in storage): 409."""


class PackagePurged(PackageRefused, Gone):
    """Deleted when the retention period ended: 410."""


class DownloadCutShort(Exception):
    """Storage failed after the download's headers went out: the connection is closed
    without an error answer, and the partial package fails its sha256 check."""


class Health:
    """Liveness, readiness (S3 reachable, not draining) and the Prometheus endpoint."""

    _READY_CACHE_SECONDS = 1.0
    _READY_TIMEOUT_SECONDS = 2.0

    def __init__(self, store: ArchiveStore, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics
        self.draining = False
        self._checked_at = 0.0
        self._reachable = False

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, _request: web.Request) -> web.Response:
        if self.draining:
            return web.json_response({"status": "draining"}, status=503)
        now = time.monotonic()
        if now - self._checked_at > self._READY_CACHE_SECONDS:
            # A probe must answer quickly; an S3 that does not answer in time is not reachable.
            try:
                async with asyncio.timeout(self._READY_TIMEOUT_SECONDS):
                    self._reachable = await self._store.reachable()
            except TimeoutError:
                self._reachable = False
            self._checked_at = time.monotonic()
        if not self._reachable:
            return web.json_response({"status": "s3 unreachable"}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def parse_max_sources(body: Any) -> int:
    """`{"max_sources": N}`, N a positive integer (InvalidInput naming `max_sources`)."""
    if not isinstance(body, dict):
        raise InvalidInput("body must be a JSON object")
    unknown = set(body) - {"max_sources"}
    if unknown:
        raise InvalidInput(f"unknown member(s): {', '.join(sorted(unknown))}")
    value = body.get("max_sources")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput('give {"max_sources": N}, a positive integer', field="max_sources")
    return value


def describe(record: AccessRequest, today: date | None = None) -> dict[str, Any]:
    """The operator's view of a request (no raw subject: it stays in the record). The
    top-level `subject_type`, `copernica_id`, `attempts`, `last_error`, `archive` and `events`
    are the first source's (the filed subject); `sources` lists every data request (an
    address shows as `email`, never itself), `discovery` the search for the others."""
    today = today or utcnow().date()
    deadline = record.deadline
    first = record.first
    return {
        "id": record.id,
        "status": record.status,
        "subject_type": first.subject_type,
        "copernica_id": first.copernica_id,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "attempts": first.attempts,
        "last_error": first.last_error,
        "archive": _facts(first.archive),
        "events": _facts(first.events),
        "received_on": deadline.received_on.isoformat(),
        "due_by": deadline.due_by.isoformat(),
        "days_left": deadline.days_left(today),
        "overdue": deadline.overdue(today),
        "extension": _facts(record.extension),
        "package": _facts(record.package),
        "answered_at": record.answered_at,
        "purged_at": record.purged_at,
        "sources": [_source(d) for d in record.data_requests],
        "discovery": record.discovery.summary(),
    }


def _source(data: DataRequest) -> dict[str, Any]:
    """One source as the API shows it: where it was found, its details and its data."""
    archive = data.archive
    return {
        "source": data.source,
        "status": data.status,
        "copernica_id": data.copernica_id,
        "database": _facts(data.database),
        "collection": _facts(data.collection),
        "profile": data.profile,
        "details": _facts(data.details),
        "archive": None
        if archive is None
        else {
            "key": archive.key,
            "sha256": archive.sha256,
            "size": archive.size,
            "source": archive.source,
        },
        "last_error": data.last_error,
    }


def _facts(facts: Any) -> dict[str, Any] | None:
    return None if facts is None else dict(facts.to_json())
