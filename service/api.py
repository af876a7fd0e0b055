"""Operator routes (`/v1/*`, bearer token), health, readiness and metrics."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .archive import ArchiveStore, ArchiveUnavailable
from .callbacks import ULID_PATTERN
from .config import Secret
from .filing import (
    Filing,
    IdempotencyConflict,
    IdempotencyInProgress,
    InvalidRequest,
    archive_from_head,
    describe,
    parse_new_request,
)
from .ledger import STATUSES, Ledger, RecordConflict, RequestRecord
from .metrics import Metrics

MAX_PAGE = 1000


def bearer_middleware(token: Secret) -> Any:
    """`/v1/*` needs `Authorization: Bearer <API_TOKEN>`, compared in constant time."""
    expected = f"Bearer {token.reveal()}".encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/v1/") or request.path == "/v1":
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return web.json_response(
                    {"error": "missing or wrong bearer token"},
                    status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="copernica-receiver"'},
                )
        return await handler(request)

    return middleware


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class OperatorApi:
    def __init__(self, filing: Filing, ledger: Ledger, store: ArchiveStore) -> None:
        self._filing = filing
        self._ledger = ledger
        self._store = store

    async def create(self, request: web.Request) -> web.Response:
        try:
            body = await request.json(loads=json.loads)
        except (ValueError, UnicodeDecodeError):
            return _error(400, "body must be JSON")
        key = request.headers.get("Idempotency-Key")
        if key is not None and not (0 < len(key) <= 255 and key.isprintable()):
            return _error(400, "Idempotency-Key must be 1-255 printable characters")
        try:
            new = parse_new_request(body)
            record = await self._filing.file(new, key)
        except InvalidRequest as exc:
            return _error(400, str(exc))
        except IdempotencyConflict:
            return _error(422, "Idempotency-Key was used before with a different request")
        except IdempotencyInProgress:
            return web.json_response(
                {"error": "a request with this Idempotency-Key is being filed; retry"},
                status=409,
                headers={"Retry-After": "2"},
            )
        except ArchiveUnavailable:
            return _unavailable()
        return web.json_response(describe(record), status=202)

    async def show(self, request: web.Request) -> web.Response:
        request_id = request.match_info["id"]
        if not ULID_PATTERN.match(request_id):
            return _error(404, "no such request")
        try:
            found = await self._ledger.get(request_id)
            if found is None:
                return _error(404, "no such request")
            record = await self._reconcile(found[0])
        except ArchiveUnavailable:
            return _unavailable()
        return web.json_response(describe(record))

    async def _reconcile(self, record: RequestRecord) -> RequestRecord:
        """The callback path writes only the archive object: fold it into the record on read."""
        if record.status == "archived" or not record.events_complete:
            return record  # with events asked for, the poller decides when all is stored
        key = self._store.keys.archive(record.id)
        head = await self._store.head(key)
        if head is None:
            return record
        info = archive_from_head(head, self._store.bucket, key)

        def change(current: RequestRecord) -> bool:
            if current.status == "archived":
                return False
            current.status, current.archive = "archived", info
            return True

        try:
            updated = await self._ledger.update(record.id, change)
        except RecordConflict:
            updated = None
        if updated is None:
            record.status, record.archive = "archived", info
            return record
        return updated

    async def list(self, request: web.Request) -> web.Response:
        status = request.query.get("status")
        if status is not None and status not in STATUSES:
            return _error(400, f"status must be one of {', '.join(STATUSES)}")
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            return _error(400, "limit must be an integer")
        if not 1 <= limit <= MAX_PAGE:
            return _error(400, f"limit must be between 1 and {MAX_PAGE}")
        cursor = request.query.get("cursor", "")
        if cursor and not ULID_PATTERN.match(cursor):
            return _error(400, "cursor is not valid")
        try:
            records, next_cursor = await self._ledger.page(
                status=status, limit=limit, cursor=cursor
            )
        except ArchiveUnavailable:
            return _unavailable()
        return web.json_response(
            {"items": [describe(r) for r in records], "next_cursor": next_cursor}
        )


def _unavailable() -> web.Response:
    return web.json_response(
        {"error": "storage unavailable, try again"}, status=503, headers={"Retry-After": "5"}
    )


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
