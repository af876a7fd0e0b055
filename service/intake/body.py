"""One body from a stream into the archive: hashed, checked and uploaded at once.

Shared by the callback route (Copernica POSTs the body) and the poller (we GET it): the same
limits, the same check, the same conditional key, so either path archives the same bytes and
the first writer wins. The outcome is a domain value; HTTP codes are decided by the caller.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
import structlog
from aiohttp import StreamReader

from service.clock import isoformat, utcnow
from service.config import Settings
from service.intake.payload import PayloadCheck, Verdict, is_plain_not_available
from service.intake.signatures import BodyDigest
from service.requests.ledger import Addressee, Ledger, RecordConflict
from service.requests.records import AccessRequest, Archive
from service.storage.s3 import AlreadyArchived, ArchiveStore, ArchiveUnavailable, StreamedUpload

log = structlog.get_logger(__name__)


class BodyStalled(Exception):
    """The sender stopped sending in the middle of the body."""


class BodyBrokeOff(Exception):
    """The connection closed in the middle of the body (the sender hung up, or the network
    broke): nothing of it is kept."""


class Outcome(enum.Enum):
    """What happened to one body."""

    ARCHIVED = "archived"
    DUPLICATE = "duplicate"
    NOT_READY = "not_ready"
    UNKNOWN = "unknown"
    TOO_LARGE = "too_large"
    TIMEOUT = "read_timeout"
    UNSUPPORTED = "unsupported_encoding"
    UNAUTHORIZED = "bad_signature"
    INVALID = "invalid"
    UNAVAILABLE = "s3_unavailable"
    BROKE_OFF = "sender_hung_up"


@dataclass
class Receipt:
    outcome: Outcome
    size: int = 0
    sha256: str = ""
    reason: str = ""
    key: str = ""
    request: Addressee | None = None
    body_unread: bool = False


class Intake:
    """Takes one body for one request into S3 and says what happened."""

    def __init__(self, store: ArchiveStore, ledger: Ledger, settings: Settings) -> None:
        self._store = store
        self._ledger = ledger
        self._max_bytes = settings.max_callback_bytes
        self._max_token = settings.max_json_token_bytes
        self._read_timeout = settings.callback_read_timeout_seconds

    async def read(self, stream: StreamReader) -> bytes:
        """The next chunk, or `BodyStalled` if the sender pauses longer than the read timeout
        (a slowloris sender must not hold a connection and an upload open for ever)."""
        try:
            async with asyncio.timeout(self._read_timeout):
                return await stream.readany()
        except TimeoutError:
            raise BodyStalled(f"no body bytes for {self._read_timeout:g} s") from None
        except (ConnectionError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            # Server side, aiohttp raises ConnectionResetError("Connection lost"); as a
            # client (the poller's download), a payload or connection error.
            raise BodyBrokeOff(f"connection closed mid-body ({type(exc).__name__})") from None

    async def take(
        self,
        request: Addressee,
        first: bytes,
        stream: StreamReader,
        source: str,
        signed_digest: BodyDigest | None = None,
    ) -> Receipt:
        """Archive the body that starts with `first` and continues in `stream`; with a
        `signed_digest` (from a verified signature) the body must hash to it too."""
        received_at = utcnow()
        upload = self._store.upload(
            request.archive_key(self._store.keys),
            {
                "source": source,
                "request-id": request.id,
                "copernica-id": request.copernica_id or "",
                "received-at": isoformat(received_at),
            },
        )
        try:
            receipt = await self._stream(
                request, first, stream, upload, received_at, source, signed_digest
            )
        except AlreadyArchived:
            receipt = Receipt(Outcome.DUPLICATE, request=request, body_unread=True)
        except BodyStalled as exc:
            return Receipt(Outcome.TIMEOUT, request=request, body_unread=True, reason=str(exc))
        except BodyBrokeOff as exc:
            return Receipt(Outcome.BROKE_OFF, request=request, body_unread=True, reason=str(exc))
        finally:
            # Whatever went wrong (S3, a dropped connection), leave no upload behind.
            await upload.abort()
        if receipt.outcome in (Outcome.ARCHIVED, Outcome.DUPLICATE) and not request.discovered:
            self._ledger.archived(request.id)  # the cache holds the filed subject's addressee
        return receipt

    async def _stream(
        self,
        request: Addressee,
        chunk: bytes,
        stream: StreamReader,
        upload: StreamedUpload,
        received_at: datetime,
        source: str,
        signed_digest: BodyDigest | None,
    ) -> Receipt:
        """Read the body chunk by chunk into the upload while hashing and checking it, then
        commit or abort. It stays one function: it is the callback's hot path, every chunk
        passes through its loop, and its steps share the hashes, the check and the upload."""
        digest = hashlib.sha256()
        # A signed digest in another algorithm needs its own hash; SHA-256 reuses ours.
        other = (
            signed_digest.new() if signed_digest and signed_digest.algorithm != "sha256" else None
        )
        # The check reads a body of one part whole from the upload's buffer at the end: no
        # chunk is kept twice.
        check = PayloadCheck(
            self._max_token, whole_bytes=self._store.part_bytes, buffered=lambda: upload.buffered
        )
        size = 0
        while chunk:
            size += len(chunk)
            if size > self._max_bytes:
                return self._too_large(size, request)
            digest.update(chunk)
            if other is not None:
                other.update(chunk)
            check.feed(chunk)
            if check.failed:
                break
            await upload.write(chunk)
            chunk = await self.read(stream)

        if signed_digest is not None and not check.failed:
            actual = (other or digest).digest()
            if actual != signed_digest.expected:
                return Receipt(
                    Outcome.UNAUTHORIZED,
                    size=size,
                    request=request,
                    reason="body does not match the signed Digest",
                )
        if check.failed:
            return await self._quarantine(
                request, upload, chunk, stream, size, digest, received_at, check.error or "invalid"
            )
        result = check.finish()
        if result.verdict is Verdict.NOT_AVAILABLE:
            return Receipt(Outcome.NOT_READY, size=size, request=request)
        if result.verdict is Verdict.INVALID:
            return await self._quarantine(
                request, upload, b"", stream, size, digest, received_at, result.reason
            )
        if not request.matches(result.info_type, result.info_id):
            return await self._quarantine(
                request,
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
            request=request,
        )
        if created and multipart:
            # A multipart object's metadata was fixed before its sha256 was known: the record
            # carries it. Not needed for durability, so a failure here is only logged.
            await self._note_in_record(request, receipt, received_at, source)
        return receipt

    def _too_large(self, size: int, request: Addressee) -> Receipt:
        """Over MAX_CALLBACK_BYTES: stop reading; nothing is stored (the caller aborts)."""
        reason = f"body larger than {self._max_bytes} bytes"
        return Receipt(
            Outcome.TOO_LARGE, size=size, request=request, body_unread=True, reason=reason
        )

    async def _quarantine(
        self,
        request: Addressee,
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
            # Its first MiB is kept; the rest already went to the (aborted) upload.
            head, finished = upload.first_bytes(), False
        else:
            # The buffer holds everything before the failing chunk, which was hashed already.
            kept = [bytes(upload.buffered), chunk]
            held = len(kept[0]) + len(chunk)
            finished = not chunk
            while not finished and held <= cap:
                chunk = await self.read(stream)
                if not chunk:
                    finished = True
                    break
                size += len(chunk)
                if size > self._max_bytes:
                    return self._too_large(size, request)
                digest.update(chunk)
                kept.append(chunk)
                held += len(chunk)
            head = b"".join(kept)
        if finished and is_plain_not_available(head):
            return Receipt(Outcome.NOT_READY, size=size, request=request)
        truncated = not finished or len(head) > cap
        metadata = {
            "reason": reason,
            "request-id": request.id,
            "received-at": isoformat(received_at),
            "bytes-received": str(size),
            "truncated": "true" if truncated else "false",
        }
        if not truncated:
            metadata["sha256"] = digest.hexdigest()
        await upload.abort()
        key = await self._store.quarantine(request.id, received_at, head[:cap], metadata)
        return Receipt(
            Outcome.INVALID,
            size=size,
            reason=reason,
            key=key,
            request=request,
            body_unread=not finished,
        )

    async def _note_in_record(
        self, request: Addressee, receipt: Receipt, received_at: datetime, source: str
    ) -> None:
        info = Archive(
            self._store.bucket,
            receipt.key,
            receipt.sha256,
            receipt.size,
            source,
            isoformat(received_at),
        )

        def change(record: AccessRequest) -> bool:
            data = self._ledger.data_request_of(record, request)
            if data is None or data.archive is not None:
                return False
            if record.leased(utcnow()):
                # A visit works on the record and finds the archive itself; a write now would
                # cost that visit its own write (its discovery steps, the sources it filed).
                return False
            if data.events_complete:  # else the poller finishes the events first
                data.mark_archived(info)
            else:
                data.note_archive(info)
            return True

        request_id = request.id
        try:
            await self._ledger.update(request_id, change)
        except (ArchiveUnavailable, RecordConflict) as exc:
            log.warning("record_update_deferred", request_id=request_id, error=str(exc))
