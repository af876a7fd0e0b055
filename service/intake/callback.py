"""The callback route: authenticate, stream, check, archive, answer.

`POST /callbacks/datarequest/{request_id}/{subject}/{token}` is the `report` address given to
Copernica (see `callback_urls.py`). The token is checked before a byte of the body is read.
The body then streams through a sha256, the incremental payload check and the S3 upload at
once, its `info` is checked against the subject's digest from the URL, and the answer is 200
only once the archive object is durable: one S3 call per accepted callback on any replica.
Addresses of the earlier form (`{request_id}/{token}`) need the request's subject from its
record: read while the first body bytes arrive, unless this replica remembers it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import structlog
from aiohttp import StreamReader, web

from service.config import Settings
from service.intake.body import BodyBrokeOff, BodyStalled, Intake, Outcome, Receipt
from service.intake.signatures import BodyDigest, SignatureInvalid, SignatureVerifier, Signed
from service.intake.urls import SOURCE, ULID_PATTERN, token_role
from service.intake.urls import callback_url as callback_url  # for tests and benchmarks
from service.metrics import Metrics
from service.requests.ledger import Ledger
from service.storage.s3 import ArchiveUnavailable

log = structlog.get_logger(__name__)

RETRY_AFTER_SECONDS = 30


class CallbackReceiver:
    """Finds the request a callback is for, then hands its body to the intake."""

    def __init__(self, intake: Intake, ledger: Ledger) -> None:
        self._intake = intake
        self._ledger = ledger

    async def receive(
        self,
        request_id: str,
        stream: StreamReader,
        signed_digest: BodyDigest | None = None,
        subject: str | None = None,
        discovered: bool = False,
    ) -> Receipt:
        """Take the body for the request; `subject` is the digest the URL carries (none in
        the earlier URL form, whose subject comes from the record); `discovered`: the URL is
        a discovered source's (its token says so)."""
        if subject is not None:
            try:
                first = await self._intake.read(stream)
            except BodyStalled as exc:
                return Receipt(Outcome.TIMEOUT, reason=str(exc), body_unread=True)
            except BodyBrokeOff as exc:
                return Receipt(Outcome.BROKE_OFF, reason=str(exc), body_unread=True)
            addressee = self._ledger.addressee_by_digest(request_id, subject, discovered)
            return await self._intake.take(addressee, first, stream, "callback", signed_digest)
        # The record read (if needed) overlaps with the arrival of the first body bytes.
        lookup = asyncio.ensure_future(self._ledger.addressee(request_id))
        try:
            first = await self._intake.read(stream)
            found = await lookup
        except BodyStalled as exc:
            return Receipt(Outcome.TIMEOUT, reason=str(exc), body_unread=True)
        except BodyBrokeOff as exc:
            return Receipt(Outcome.BROKE_OFF, reason=str(exc), body_unread=True)
        finally:
            lookup.cancel()
        if found is None:
            return Receipt(Outcome.UNKNOWN, reason="no such request", body_unread=True)
        if found.archived:
            return Receipt(Outcome.DUPLICATE, request=found, body_unread=True)
        return await self._intake.take(found, first, stream, "callback", signed_digest)


# The one place where an outcome becomes an HTTP status.
HTTP_STATUS = {
    Outcome.ARCHIVED: 200,
    Outcome.DUPLICATE: 200,
    Outcome.NOT_READY: 202,
    Outcome.UNAUTHORIZED: 401,
    Outcome.UNKNOWN: 404,
    Outcome.TIMEOUT: 408,
    Outcome.TOO_LARGE: 413,
    Outcome.UNSUPPORTED: 415,
    Outcome.INVALID: 422,
    Outcome.UNAVAILABLE: 503,
    Outcome.BROKE_OFF: 400,  # nobody is left to read it; the outcome is for logs and metrics
}


class CallbackView:
    """The aiohttp side: token first, then the receiver, then one mapping to HTTP."""

    def __init__(
        self,
        receiver: CallbackReceiver,
        verifier: SignatureVerifier,
        settings: Settings,
        metrics: Metrics,
    ) -> None:
        assert settings.callback_secret is not None
        self._receiver = receiver
        self._verifier = verifier
        self._secret = settings.callback_secret
        self._max_bytes = settings.max_callback_bytes
        self._metrics = metrics

    def _role(self, request: web.Request) -> str | None:
        """Whose data the URL brings (`urls.FIRST`/`urls.SOURCE`); None: a wrong token."""
        request_id, token = request.match_info["request_id"], request.match_info["token"]
        return token_role(self._secret, request_id, token, request.match_info.get("subject"))

    def _refusal(self, request: web.Request, role: str | None) -> Receipt | None:
        """A wrong token (`role` None) or a declared oversize body is refused before any body
        byte."""
        if role is None:
            return Receipt(Outcome.UNKNOWN, reason="not found", body_unread=True)
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            # Stored byte for byte means as sent; and a compressed body could expand beyond
            # every bound before a single check ran. Copernica sends plain JSON.
            return Receipt(
                Outcome.UNSUPPORTED,
                reason=f"Content-Encoding {encoding!r} is not accepted; send the JSON uncompressed",
                body_unread=True,
            )
        if request.content_length is not None and request.content_length > self._max_bytes:
            return Receipt(
                Outcome.TOO_LARGE,
                reason=f"body larger than {self._max_bytes} bytes",
                body_unread=True,
            )
        return None

    async def expect(self, request: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue`: refuse before the client sends the body at all."""
        refusal = self._refusal(request, self._role(request))
        if refusal is not None:
            return self._answer(request, refusal, time.perf_counter())
        if request.headers.get("Expect", "").lower() != "100-continue":
            raise web.HTTPExpectationFailed(text="Unknown Expect header")
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
        return None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        request_id = request.match_info["request_id"]
        bound = request_id if ULID_PATTERN.match(request_id) else "malformed"
        with structlog.contextvars.bound_contextvars(request_id=bound):
            return await self._handle(request)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        role = self._role(request)  # the token's HMACs, once per callback
        receipt = self._refusal(request, role)
        if receipt is None:
            signed: Signed | None = None
            try:
                signed = await self._verifier.check(
                    request.method, request.path_qs, request.headers
                )
                receipt = await self._receiver.receive(
                    request.match_info["request_id"],
                    request.content,
                    signed.digest if signed else None,
                    request.match_info.get("subject"),
                    discovered=role == SOURCE,
                )
            except SignatureInvalid as exc:
                receipt = Receipt(Outcome.UNAUTHORIZED, reason=str(exc), body_unread=True)
            except ArchiveUnavailable as exc:
                receipt = Receipt(Outcome.UNAVAILABLE, reason=str(exc))
            if signed is not None and HTTP_STATUS[receipt.outcome] == 200:
                # Only now is the nonce spent: Copernica retries a delivery that got 503 with
                # the same signed headers, and that retry must be archived, not refused.
                self._verifier.spend(signed)
        return self._answer(request, receipt, started)

    def _answer(self, request: web.Request, receipt: Receipt, started: float) -> web.Response:
        request_id = request.match_info["request_id"]
        outcome, status = receipt.outcome, HTTP_STATUS[receipt.outcome]
        elapsed = time.perf_counter() - started
        self._metrics.callbacks.labels(outcome.value, str(status)).inc()
        self._metrics.callback_seconds.observe(elapsed)
        if outcome is Outcome.ARCHIVED:
            self._metrics.archived_bytes.labels("callback").inc(receipt.size)
        log.log(
            logging.WARNING if status >= 500 else logging.INFO,
            "callback",
            request_id=request_id if ULID_PATTERN.match(request_id) else "malformed",
            outcome=outcome.value,
            status=status,
            bytes=receipt.size,
            sha256=receipt.sha256[:12] or None,
            subject=receipt.request.log_subject if receipt.request else None,
            reason=receipt.reason or None,
            duration_ms=round(elapsed * 1000, 2),
        )
        if status >= 400:
            body: dict[str, Any] = {
                "error": receipt.reason or outcome.value,
                "request_id": request_id,
            }
        else:
            body = {"status": outcome.value, "request_id": request_id}
            if receipt.sha256:
                body.update(sha256=receipt.sha256, size=receipt.size)
        response = web.json_response(body, status=status)
        if outcome is Outcome.UNAVAILABLE:
            response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        if receipt.body_unread:
            # The body was not (fully) read: do not reuse the connection for another request.
            response.force_close()
        return response
