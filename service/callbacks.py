"""The callback route: authenticate, stream, check, archive, answer.

`POST /callbacks/datarequest/{request_id}/{token}` is the `report` address given to Copernica.
The token (an HMAC of the request id) is checked before a byte of the body is read. The body
then streams through a sha256, the incremental payload check and the S3 upload at once; the
answer is 200 only once the archive object is durable. One read (the request record, issued
while the first body bytes arrive) and one write (the archive object) per accepted callback.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import hashlib
import hmac
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from aiohttp import StreamReader, web

from .archive import (
    AlreadyArchived,
    ArchiveStore,
    ArchiveUnavailable,
    StreamedUpload,
    isoformat,
    utcnow,
)
from .config import Secret, Settings
from .ledger import Ledger, RecordConflict, RequestRecord
from .logs import subject_hash
from .metrics import Metrics
from .payload import PayloadCheck, Verdict

log = structlog.get_logger(__name__)

ULID_PATTERN = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
ROUTE = "/callbacks/datarequest/{request_id}/{token}"
RETRY_AFTER_SECONDS = 30


def callback_token(secret: Secret, request_id: str) -> str:
    """URL-safe HMAC-SHA256 of the request id; identical on every replica sharing the secret."""
    mac = hmac.new(
        secret.reveal().encode(), b"datarequest-callback:" + request_id.encode(), hashlib.sha256
    ).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def callback_url(public_base_url: str, secret: Secret, request_id: str) -> str:
    return (
        f"{public_base_url}/callbacks/datarequest/{request_id}/{callback_token(secret, request_id)}"
    )


def token_valid(secret: Secret, request_id: str, token: str) -> bool:
    if not ULID_PATTERN.match(request_id) or len(token) > 64:
        return False
    return hmac.compare_digest(callback_token(secret, request_id), token)


class Outcome(enum.Enum):
    """What happened to one callback; the HTTP status is decided from this, in one place."""

    ARCHIVED = (200, "archived")
    DUPLICATE = (200, "duplicate")
    NOT_READY = (202, "not_ready")
    UNKNOWN = (404, "unknown")
    TOO_LARGE = (413, "too_large")
    INVALID = (422, "invalid")
    UNAVAILABLE = (503, "s3_unavailable")

    @property
    def status(self) -> int:
        return self.value[0]

    @property
    def label(self) -> str:
        return self.value[1]


@dataclass
class Receipt:
    outcome: Outcome
    size: int = 0
    sha256: str = ""
    reason: str = ""
    key: str = ""
    record: RequestRecord | None = None
    body_unread: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class CallbackReceiver:
    """Takes one callback body from the wire to S3 and says what happened."""

    def __init__(self, store: ArchiveStore, ledger: Ledger, settings: Settings) -> None:
        self._store = store
        self._ledger = ledger
        self._max_bytes = settings.max_callback_bytes
        self._max_token = settings.max_json_token_bytes

    async def receive(self, request_id: str, stream: StreamReader) -> Receipt:
        # The record read overlaps with the arrival of the first body bytes.
        lookup = asyncio.ensure_future(self._ledger.get(request_id))
        try:
            first = await stream.readany()
            found = await lookup
        finally:
            lookup.cancel()
        if found is None:
            return Receipt(Outcome.UNKNOWN, reason="no such request", body_unread=True)
        record, _etag = found
        if record.status == "archived":
            return Receipt(Outcome.DUPLICATE, record=record, body_unread=True)

        received_at = utcnow()
        upload = self._store.upload(
            self._store.keys.archive(request_id),
            {
                "source": "callback",
                "request-id": request_id,
                "copernica-id": record.copernica_id or "",
                "received-at": isoformat(received_at),
            },
        )
        try:
            return await self._stream(record, first, stream, upload, received_at)
        except AlreadyArchived:
            return Receipt(Outcome.DUPLICATE, record=record, body_unread=True)
        finally:
            # Whatever went wrong (S3, a dropped connection), leave no upload behind.
            await upload.abort()

    async def _stream(
        self,
        record: RequestRecord,
        chunk: bytes,
        stream: StreamReader,
        upload: StreamedUpload,
        received_at: datetime,
    ) -> Receipt:
        digest = hashlib.sha256()
        check = PayloadCheck(self._max_token)
        size = 0
        while chunk:
            size += len(chunk)
            if size > self._max_bytes:
                return Receipt(
                    Outcome.TOO_LARGE,
                    size=size,
                    record=record,
                    body_unread=True,
                    reason=f"body larger than {self._max_bytes} bytes",
                )
            digest.update(chunk)
            check.feed(chunk)
            if check.failed:
                break
            await upload.write(chunk)
            chunk = await stream.readany()

        if check.failed:
            return await self._quarantine(
                record, upload, chunk, stream, size, digest, received_at, check.error or "invalid"
            )
        result = check.finish()
        if result.verdict is Verdict.NOT_AVAILABLE:
            return Receipt(Outcome.NOT_READY, size=size, record=record)
        if result.verdict is Verdict.INVALID:
            return await self._quarantine(
                record, upload, b"", stream, size, digest, received_at, result.reason
            )
        if not record.subject.matches(result.info_type, result.info_id):
            return await self._quarantine(
                record,
                upload,
                b"",
                stream,
                size,
                digest,
                received_at,
                "info does not match the request's subject",
            )
        sha256 = digest.hexdigest()
        multipart = upload.multipart
        created = await upload.commit({"sha256": sha256, "size": str(size)})
        receipt = Receipt(
            Outcome.ARCHIVED if created else Outcome.DUPLICATE,
            size=size,
            sha256=sha256,
            key=upload.key,
            record=record,
        )
        if created and multipart:
            # A multipart object's metadata was fixed before its sha256 was known: the record
            # carries it. Not needed for durability, so a failure here is only logged.
            await self._note_in_record(record.id, receipt, received_at)
        return receipt

    async def _quarantine(
        self,
        record: RequestRecord,
        upload: StreamedUpload,
        chunk: bytes,
        stream: StreamReader,
        size: int,
        digest: Any,
        received_at: datetime,
        reason: str,
    ) -> Receipt:
        """Keep the rejected body (whole up to one part size, else its start) for inspection."""
        cap = self._store.part_bytes
        if upload.multipart:
            # The first part is kept; the rest already went to the (aborted) upload.
            head, finished = upload.first_bytes(), False
        else:
            # The buffer holds everything before the failing chunk, which was hashed already.
            kept = [upload.buffered_bytes(), chunk]
            held = len(kept[0]) + len(chunk)
            finished = not chunk
            while not finished and held <= cap:
                chunk = await stream.readany()
                if not chunk:
                    finished = True
                    break
                size += len(chunk)
                if size > self._max_bytes:
                    return Receipt(
                        Outcome.TOO_LARGE,
                        size=size,
                        record=record,
                        body_unread=True,
                        reason=f"body larger than {self._max_bytes} bytes",
                    )
                digest.update(chunk)
                kept.append(chunk)
                held += len(chunk)
            head = b"".join(kept)
        truncated = not finished or len(head) > cap
        metadata = {
            "reason": reason,
            "request-id": record.id,
            "received-at": isoformat(received_at),
            "bytes-received": str(size),
            "truncated": "true" if truncated else "false",
        }
        if not truncated:
            metadata["sha256"] = digest.hexdigest()
        await upload.abort()
        key = await self._store.quarantine(record.id, received_at, head[:cap], metadata)
        return Receipt(
            Outcome.INVALID,
            size=size,
            reason=reason,
            key=key,
            record=record,
            body_unread=not finished,
        )

    async def _note_in_record(
        self, request_id: str, receipt: Receipt, received_at: datetime
    ) -> None:
        info = archive_info(
            self._store,
            receipt.key,
            receipt.sha256,
            receipt.size,
            "callback",
            isoformat(received_at),
        )

        def change(record: RequestRecord) -> bool:
            if record.archive is not None:
                return False
            record.archive = info
            record.status = "archived"
            return True

        try:
            await self._ledger.update(request_id, change)
        except (ArchiveUnavailable, RecordConflict) as exc:
            log.warning("record_update_deferred", request_id=request_id, error=str(exc))


def archive_info(
    store: ArchiveStore, key: str, sha256: str, size: int, source: str, received_at: str
) -> dict[str, Any]:
    return {
        "bucket": store.bucket,
        "key": key,
        "sha256": sha256,
        "size": size,
        "source": source,
        "received_at": received_at,
    }


class CallbackView:
    """The aiohttp side: token first, then the receiver, then one mapping to HTTP."""

    def __init__(
        self, receiver: CallbackReceiver, settings: Settings, metrics: Metrics, hash_key: bytes
    ) -> None:
        assert settings.callback_secret is not None
        self._receiver = receiver
        self._secret = settings.callback_secret
        self._max_bytes = settings.max_callback_bytes
        self._metrics = metrics
        self._hash_key = hash_key

    def _early_answer(self, request: web.Request) -> web.Response | None:
        """404 for a wrong token, 413 for a declared oversize body: before any body byte."""
        request_id, token = request.match_info["request_id"], request.match_info["token"]
        if not token_valid(self._secret, request_id, token):
            return _answer(Outcome.UNKNOWN, {"error": "not found"}, close=True)
        if request.content_length is not None and request.content_length > self._max_bytes:
            return _answer(
                Outcome.TOO_LARGE,
                {"error": f"body larger than {self._max_bytes} bytes"},
                close=True,
            )
        return None

    async def expect(self, request: web.Request) -> web.Response | None:
        """`Expect: 100-continue`: refuse before the client sends the body at all."""
        early = self._early_answer(request)
        if early is not None:
            self._count(early.status, Outcome.UNKNOWN if early.status == 404 else Outcome.TOO_LARGE)
            return early
        if request.headers.get("Expect", "").lower() != "100-continue":
            raise web.HTTPExpectationFailed(text="Unknown Expect header")
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
        return None

    async def handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        request_id = request.match_info["request_id"]
        early = self._early_answer(request)
        if early is not None:
            outcome = Outcome.UNKNOWN if early.status == 404 else Outcome.TOO_LARGE
            self._log(outcome, request_id, Receipt(outcome), started)
            return early
        try:
            receipt = await self._receiver.receive(request_id, request.content)
        except ArchiveUnavailable as exc:
            receipt = Receipt(Outcome.UNAVAILABLE, reason=str(exc))
        self._log(receipt.outcome, request_id, receipt, started)
        return _answer(receipt.outcome, _body(request_id, receipt), close=receipt.body_unread)

    def _count(self, status: int, outcome: Outcome) -> None:
        self._metrics.callbacks.labels(outcome.label, str(status)).inc()

    def _log(self, outcome: Outcome, request_id: str, receipt: Receipt, started: float) -> None:
        elapsed = time.perf_counter() - started
        self._count(outcome.status, outcome)
        self._metrics.callback_seconds.observe(elapsed)
        if outcome is Outcome.ARCHIVED:
            self._metrics.archived_bytes.labels("callback").inc(receipt.size)
        record = receipt.record
        log.log(
            30 if outcome.status >= 500 else 20,
            "callback",
            request_id=request_id if ULID_PATTERN.match(request_id) else "invalid",
            outcome=outcome.label,
            status=outcome.status,
            bytes=receipt.size,
            sha256=receipt.sha256[:12],
            subject=subject_hash(self._hash_key, record.subject_type, record.subject_id)
            if record
            else None,
            reason=receipt.reason or None,
            duration_ms=round(elapsed * 1000, 2),
        )


def _body(request_id: str, receipt: Receipt) -> dict[str, Any]:
    outcome = receipt.outcome
    if outcome.status >= 400:
        return {"error": receipt.reason or outcome.label, "request_id": request_id}
    body: dict[str, Any] = {"status": outcome.label, "request_id": request_id}
    if receipt.sha256:
        body.update(sha256=receipt.sha256, size=receipt.size)
    return body


def _answer(outcome: Outcome, body: dict[str, Any], *, close: bool = False) -> web.Response:
    response = web.json_response(body, status=outcome.status)
    if outcome is Outcome.UNAVAILABLE:
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    if close:
        # The body was not (fully) read: do not reuse the connection for another request.
        response.force_close()
    return response
