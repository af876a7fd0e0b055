"""The upstream client: Copernica's REST API, rate-limited, retried with backoff, token-safe.

Facts relied on (SPEC, "Upstream API facts"): v2/v3 authenticate with an `access_token` query
parameter; creating a data request answers 201 with the new id in `X-Created` (Copernica's
own PHP client reads `X-Created:\\s?(\\d+)`), else in `Location`/`X-Location` or a JSON body;
errors are `{"error": {"message": ...}}`; there is no documented rate limit, so 429 with
`Retry-After` and 502/503/504 under load are retried with exponential backoff and full jitter.
The access token is only ever put in the query of the outgoing request: messages, logs and
exceptions name the path, never the URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import enum
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp
import structlog
from yarl import URL

from .config import Settings
from .metrics import Metrics
from .payload import Subject

log = structlog.get_logger(__name__)

_RETRY_STATUSES = {429, 500, 502, 503, 504}


class CopernicaError(Exception):
    """Copernica refused the call (a 4xx other than 429): final, with its own message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Copernica answered {status}: {message}")
        self.status = status
        self.message = message


class CopernicaUnavailable(Exception):
    """Copernica could not be reached or kept failing; try again later."""


class DataGone(Exception):
    """Copernica says the data of this request is no longer available (it expired)."""


class RateLimiter:
    """A token bucket shared by every call of the process: at most `rate` calls per second."""

    def __init__(self, rate: float, burst: float = 1.0) -> None:
        self._rate = rate
        self._capacity = max(burst, 1.0)
        self._tokens = self._capacity
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * self._rate)
                self._stamp = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                await asyncio.sleep((1 - self._tokens) / self._rate)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter (AWS Architecture Blog, "Exponential Backoff")."""

    attempts: int = 5
    base: float = 0.5
    cap: float = 30.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(retry_after, self.cap)
        return random.uniform(0, min(self.cap, self.base * 2**attempt))


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())


def _error_message(body: bytes) -> str:
    try:
        parsed = json.loads(body)
        message = parsed["error"]["message"]
        return str(message)[:500]
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace").strip() or "no message"


def subject_path(subject: Subject) -> str:
    """`email/{email}` (percent-encoded, `@` kept), `profile/{id}`, `subprofile/{id}`."""
    return f"{subject.type}/{quote(subject.id, safe='@')}"


class CopernicaClient:
    """Calls to one Copernica API base (v2/v3 style, `access_token` parameter)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: Settings,
        metrics: Metrics,
        limiter: RateLimiter | None = None,
    ) -> None:
        assert settings.copernica_access_token is not None
        self._session = session
        self._base = settings.copernica_api_url
        self._token = settings.copernica_access_token
        self._timeout = aiohttp.ClientTimeout(total=settings.copernica_timeout_seconds)
        # A payload of hundreds of MB may take long in total; it must not stall.
        self._stream_timeout = aiohttp.ClientTimeout(
            sock_connect=settings.copernica_timeout_seconds,
            sock_read=settings.copernica_timeout_seconds,
        )
        self.forms = ReadinessForms()
        self._metrics = metrics
        self.limiter = limiter or RateLimiter(settings.copernica_max_rps)

    async def call(
        self,
        method: str,
        path: str,
        *,
        endpoint: str,
        params: dict[str, str] | None = None,
        backoff: Backoff = Backoff(),
    ) -> tuple[int, dict[str, str], bytes]:
        """One logical call: rate-limited, retried; returns status, headers and body."""
        url = URL(f"{self._base}/{path}", encoded=True).update_query(
            {**(params or {}), "access_token": self._token.reveal()}
        )
        last = "no attempt"
        for attempt in range(backoff.attempts):
            await self.limiter.acquire()
            retry_after: float | None = None
            try:
                async with self._session.request(method, url, timeout=self._timeout) as answer:
                    body = await answer.read()
                    status = answer.status
                    headers = {k.lower(): v for k, v in answer.headers.items()}
            except (aiohttp.ClientError, TimeoutError) as exc:
                self._metrics.copernica_calls.labels(endpoint, "error").inc()
                last = f"{type(exc).__name__} on {method} {path.split('/')[0]}"
            else:
                self._metrics.copernica_calls.labels(endpoint, str(status)).inc()
                if status < 400:
                    return status, headers, body
                if status not in _RETRY_STATUSES:
                    raise CopernicaError(status, _error_message(body))
                last = f"HTTP {status}"
                retry_after = _retry_after(headers.get("retry-after"))
            if attempt + 1 < backoff.attempts:
                pause = backoff.delay(attempt, retry_after)
                log.info(
                    "copernica_retry",
                    endpoint=endpoint,
                    attempt=attempt + 1,
                    reason=last,
                    pause_s=round(pause, 3),
                )
                await asyncio.sleep(pause)
        raise CopernicaUnavailable(f"Copernica {endpoint}: {last} after {backoff.attempts} tries")

    async def create_datarequest(
        self, subject: Subject, report: str | None, *, backoff: Backoff = Backoff()
    ) -> str:
        """File a data request; returns Copernica's id (an opaque string)."""
        params = {"report": report} if report else {}
        _status, headers, body = await self.call(
            "POST",
            f"{subject_path(subject)}/datarequest",
            endpoint="create",
            params=params,
            backoff=backoff,
        )
        created = _created_id(headers, body)
        if created is None:
            raise CopernicaError(_status, "create answered without an id")
        return created

    async def readiness(self, copernica_id: str) -> Readiness:
        """Ask whether the data is ready, through whichever form the deployment answers."""
        if not self.forms.status_route:
            return Readiness.UNKNOWN
        try:
            _status, _headers, body = await self.call(
                "GET", f"datarequest/{quote(copernica_id, safe='')}/status", endpoint="status"
            )
        except CopernicaError as exc:
            if _is_missing_route(exc) or exc.status == 404:
                self.forms.status_route = False
                return Readiness.UNKNOWN
            raise
        try:
            state = str(json.loads(body).get("status", "")).lower()
        except (ValueError, AttributeError):
            raise CopernicaError(_status, "status answer is not a JSON object") from None
        if state == "available":
            return Readiness.READY
        if state == "pending":
            return Readiness.PENDING
        return Readiness.GONE

    @contextlib.asynccontextmanager
    async def open_data(self, copernica_id: str) -> AsyncIterator[aiohttp.ClientResponse | None]:
        """Stream the data: yields the open response, or None while it is not ready.

        Tries `datarequest/{id}/data` and falls back to the old `datarequest/{id}` form, whose
        not-ready answer is recognised by the payload check itself.
        """
        quoted = quote(copernica_id, safe="")
        paths = ([f"datarequest/{quoted}/data"] if self.forms.data_route else []) + [
            f"datarequest/{quoted}"
        ]
        for path in paths:
            answer = await self._open(path)
            if answer.status < 400:
                try:
                    yield answer
                finally:
                    answer.release()
                return
            body = await answer.read()
            answer.release()
            error = CopernicaError(answer.status, _error_message(body))
            if path.endswith("/data"):
                if answer.status == 404 and not _is_missing_route(error):
                    yield None  # the /data form's "not ready yet"
                    return
                if _is_missing_route(error):
                    self.forms.data_route = False
                    continue
            if answer.status == 410 or (
                answer.status == 404 and "expired" in error.message.lower()
            ):
                raise DataGone(error.message)
            raise error
        raise CopernicaError(400, "no readiness form answered")

    async def _open(self, path: str) -> aiohttp.ClientResponse:
        """Open a streaming GET; retried like `call` until headers arrive."""
        url = URL(f"{self._base}/{path}", encoded=True).update_query(
            {"access_token": self._token.reveal()}
        )
        backoff = Backoff()
        last = "no attempt"
        for attempt in range(backoff.attempts):
            await self.limiter.acquire()
            retry_after = None
            try:
                answer = await self._session.get(url, timeout=self._stream_timeout)
            except (aiohttp.ClientError, TimeoutError) as exc:
                self._metrics.copernica_calls.labels("data", "error").inc()
                last = f"{type(exc).__name__} on GET datarequest"
            else:
                self._metrics.copernica_calls.labels("data", str(answer.status)).inc()
                if answer.status not in _RETRY_STATUSES:
                    return answer
                retry_after = _retry_after(answer.headers.get("Retry-After"))
                last = f"HTTP {answer.status}"
                answer.release()
            if attempt + 1 < backoff.attempts:
                await asyncio.sleep(backoff.delay(attempt, retry_after))
        raise CopernicaUnavailable(f"Copernica data: {last} after {backoff.attempts} tries")


class Readiness(enum.Enum):
    READY = "ready"
    PENDING = "pending"
    GONE = "gone"  # Copernica no longer has the data (expired or never will)
    UNKNOWN = "unknown"  # this deployment has no status route: fetch to find out


def _is_missing_route(exc: CopernicaError) -> bool:
    """How Copernica answers a path it does not serve (e.g. GET on a POST-only path)."""
    return exc.status in (400, 405) and "invalid method" in exc.message.lower()


class ReadinessForms:
    """Which of the three readiness forms this Copernica deployment answers, learned once.

    `datarequest/{id}/status` (JSON status), `datarequest/{id}/data` (404 while not ready)
    and the old `datarequest/{id}` (whose `data` member says "Data not available (yet)").
    """

    def __init__(self) -> None:
        self.status_route = True
        self.data_route = True


def _created_id(headers: dict[str, str], body: bytes) -> str | None:
    """The new id: X-Created, else the last segment of Location/X-Location, else JSON `id`."""
    value = headers.get("x-created", "").strip()
    if value:
        return value
    for name in ("location", "x-location"):
        location = headers.get(name, "").strip().rstrip("/")
        if location:
            return location.rsplit("/", 1)[-1].split("?", 1)[0]
    try:
        parsed = json.loads(body) if body.strip() else None
    except ValueError:
        return None
    if isinstance(parsed, dict) and parsed.get("id") not in (None, ""):
        return str(parsed["id"])
    if isinstance(parsed, int | str) and str(parsed).strip():
        return str(parsed).strip()
    return None
