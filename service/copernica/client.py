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
import collections
import contextlib
import email.utils
import enum
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import structlog
from yarl import URL

from service.config import Secret, Settings
from service.copernica.events import Source, Window, normalised
from service.copernica.subject import Subject
from service.metrics import Metrics

log = structlog.get_logger(__name__)

_RETRY_STATUSES = {429, 500, 502, 503, 504}


class CopernicaError(Exception):
    """Copernica refused the call (a 4xx other than 429): final, with its own message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Copernica answered {status}: {message}")
        self.status = status
        self.message = message


def says_unsupported(exc: CopernicaError) -> bool:
    """Copernica does not offer the call: "Invalid method" (recorded against the live API; the
    e-mail data request, since it left the v3/v4 overviews, may answer so)."""
    return exc.status in (400, 404, 405) and exc.message.strip().casefold() == "invalid method"


class CopernicaUnavailable(Exception):
    """Copernica could not be reached or kept failing; try again later."""


class DataGone(Exception):
    """Copernica says the data of this request is no longer available (it expired)."""


class RateLimiter:
    """At most `rate` calls in any one-second window, shared by every call of the process.

    A sliding window, not a token bucket (a bucket lets `rate + burst` calls into some
    windows). A call holds its slot from when it is sent until its answer's headers arrive,
    and the window is counted from that arrival: the server has the request by then, so
    however network latency varies, Copernica never sees more than `rate` calls in one
    second. Below one call per second: one call per `1 / rate` seconds.
    """

    MARGIN = 0.02

    def __init__(self, rate: float) -> None:
        self._calls = max(1, int(rate))
        self._window = (1.0 if rate >= 1 else 1.0 / rate) * (1 + self.MARGIN)
        self._answered: collections.deque[float] = collections.deque()
        self._open = 0
        # No lock: between the check and taking a slot there is no await, so on one event
        # loop it cannot be interleaved. (An `asyncio.Condition` under `wait_for` lost its
        # lock when a timeout and a wake-up fell due together on a starved loop: CPython
        # 3.11 raised "Lock is not acquired" or hung; found by the soak.)
        self._released = asyncio.Event()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        while True:
            now = time.monotonic()
            while self._answered and self._answered[0] <= now - self._window:
                self._answered.popleft()
            if self._open + len(self._answered) < self._calls:
                self._open += 1
                break
            wait = self._answered[0] + self._window - now if self._answered else None
            self._released.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), wait)
        try:
            yield
        finally:
            self._open -= 1
            self._answered.append(time.monotonic())
            self._released.set()


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


async def _retry_reason(answer: aiohttp.ClientResponse) -> str:
    """A retryable answer in words: its status and Copernica's own ("Loadbalancer Error"),
    read bounded, for the operator."""
    reason = f"HTTP {answer.status}"
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        said = _error_message(await answer.content.read(2048))
        reason += "" if said == "no message" else f" {said!r}"
    return reason


def subject_path(subject: Subject) -> str:
    """`email/{email}` (percent-encoded, `@` kept), `profile/{id}`, `subprofile/{id}`."""
    return f"{subject.type}/{quote(subject.id, safe='@')}"


class TokenAuth:
    """v2/v3: the access token rides in the `access_token` query parameter."""

    def __init__(self, token: Secret) -> None:
        self._token = token

    async def apply(self, params: dict[str, str], headers: dict[str, str]) -> None:
        params["access_token"] = self._token.reveal()

    def expire(self) -> bool:
        return False  # nothing to refresh: a 401 is final


class BearerAuth:
    """v4: a JWT from the authentication server (POST `access_token=...`), valid 24 hours.

    Refreshed an hour before it runs out, and at once when the API answers 401.
    """

    LIFETIME = 23 * 3600.0

    def __init__(
        self,
        token: Secret,
        url: str,
        session: aiohttp.ClientSession,
        timeout: aiohttp.ClientTimeout,
    ) -> None:
        self._token = token
        self._url = url
        self._session = session
        self._timeout = timeout
        self._jwt: str | None = None
        self._fetched = 0.0
        self._lock = asyncio.Lock()

    async def apply(self, params: dict[str, str], headers: dict[str, str]) -> None:
        headers["Authorization"] = f"Bearer {await self._current()}"

    def expire(self) -> bool:
        self._jwt = None
        return True

    async def _current(self) -> str:
        async with self._lock:
            if self._jwt is None or time.monotonic() - self._fetched > self.LIFETIME:
                try:
                    async with self._session.post(
                        self._url,
                        data={"access_token": self._token.reveal()},
                        timeout=self._timeout,
                    ) as answer:
                        body = (await answer.read()).decode("utf-8", "replace").strip()
                        status = answer.status
                except (aiohttp.ClientError, TimeoutError) as exc:
                    raise CopernicaUnavailable(f"authentication: {type(exc).__name__}") from None
                if status >= 500 or status == 429:
                    raise CopernicaUnavailable(f"authentication: HTTP {status}")
                if status >= 400 or not body:
                    raise CopernicaError(
                        status, f"authentication refused: {_error_message(body.encode())}"
                    )
                self._jwt, self._fetched = body.strip('"'), time.monotonic()
            return self._jwt


class CopernicaClient:
    """Calls to one Copernica API base: rate-limited, retried, authenticated per version."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: Settings,
        metrics: Metrics,
        limiter: RateLimiter | None = None,
        base_url: str | None = None,
    ) -> None:
        assert settings.copernica_access_token is not None
        self._session = session
        self._base = base_url or settings.copernica_api_url
        self._timeout = aiohttp.ClientTimeout(total=settings.copernica_timeout_seconds)
        # A payload of hundreds of MB may take long in total; it must not stall.
        self._stream_timeout = aiohttp.ClientTimeout(
            sock_connect=settings.copernica_timeout_seconds,
            sock_read=settings.copernica_timeout_seconds,
        )
        self._auth: TokenAuth | BearerAuth
        if self._base.rstrip("/").endswith("/v4"):
            self._auth = BearerAuth(
                settings.copernica_access_token, settings.copernica_auth_url, session, self._timeout
            )
        else:
            self._auth = TokenAuth(settings.copernica_access_token)
        self.forms = ReadinessForms()
        self._metrics = metrics
        self.limiter = limiter or RateLimiter(settings.copernica_max_rps)

    async def send(
        self,
        method: str,
        path: str,
        *,
        endpoint: str,
        params: dict[str, str] | None = None,
        backoff: Backoff = Backoff(),
        stream: bool = False,
        once: bool = False,
    ) -> aiohttp.ClientResponse:
        """Send one logical call: rate-limited, retried on 429/5xx/network errors with backoff.

        Returns the open response of the first answer that is not retryable; the caller
        reads and releases it. Messages name the endpoint, never the URL (it holds the token).
        `once`: a call that creates something is not tried again after a lost answer (a
        timeout, a broken connection), which Copernica may have acted on: it raises
        `CopernicaUnavailable` instead, and the caller, whose record counts the try, decides.
        """
        url = URL(f"{self._base}/{path}", encoded=True)
        last = "no attempt"
        refreshed = False
        attempt = 0
        while attempt < backoff.attempts:
            query, headers = dict(params or {}), dict[str, str]()
            await self._auth.apply(query, headers)
            retry_after: float | None = None
            try:
                async with self.limiter.slot():
                    answer = await self._session.request(
                        method,
                        url.update_query(query),
                        headers=headers,
                        timeout=self._stream_timeout if stream else self._timeout,
                    )
            except (aiohttp.ClientError, TimeoutError) as exc:
                self._metrics.copernica_calls.labels(endpoint, "error").inc()
                last = f"{type(exc).__name__} on {endpoint}"
                if once:
                    raise CopernicaUnavailable(
                        f"Copernica {endpoint}: {last}; not tried again (it may have been made)"
                    ) from None
            else:
                self._metrics.copernica_calls.labels(endpoint, str(answer.status)).inc()
                if answer.status == 401 and not refreshed and self._auth.expire():
                    answer.release()
                    refreshed = True  # a JWT ran out early: fetch a new one, once
                    continue
                if answer.status not in _RETRY_STATUSES:
                    return answer
                last = await _retry_reason(answer)
                retry_after = _retry_after(answer.headers.get("Retry-After"))
                answer.release()
            attempt += 1
            if attempt < backoff.attempts:
                pause = backoff.delay(attempt - 1, retry_after)
                log.info("copernica_retry", endpoint=endpoint, attempt=attempt, reason=last,
                         pause_s=round(pause, 3))  # fmt: skip
                await asyncio.sleep(pause)
        raise CopernicaUnavailable(f"Copernica {endpoint}: {last} after {backoff.attempts} tries")

    async def call(
        self,
        method: str,
        path: str,
        *,
        endpoint: str,
        params: dict[str, str] | None = None,
        backoff: Backoff = Backoff(),
        once: bool = False,
    ) -> tuple[int, dict[str, str], bytes]:
        """`send`, read whole (small answers only); a 4xx becomes `CopernicaError`."""
        answer = await self.send(
            method, path, endpoint=endpoint, params=params, backoff=backoff, once=once
        )
        try:
            body = await answer.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise CopernicaUnavailable(f"Copernica {endpoint}: {type(exc).__name__}") from None
        finally:
            answer.release()
        if answer.status >= 400:
            raise CopernicaError(answer.status, _error_message(body))
        return answer.status, {k.lower(): v for k, v in answer.headers.items()}, body

    async def create_datarequest(
        self,
        subject: Subject,
        report: str | None,
        *,
        backoff: Backoff = Backoff(),
    ) -> str:
        """File a data request; returns Copernica's id (an opaque string). Not tried again
        after a lost answer (Copernica may have filed it): `CopernicaUnavailable`, and the
        caller's record counts the try, so its next filing is known as a resubmission."""
        params = {"report": report} if report else {}
        _status, headers, body = await self.call(
            "POST",
            f"{subject_path(subject)}/datarequest",
            endpoint="create",
            params=params,
            backoff=backoff,
            once=True,
        )
        created = _created_id(headers, body)
        if created is None:
            raise CopernicaError(_status, "create answered without an id")
        return created

    async def events(
        self, source: Source, window: Window, tags: str | None = None
    ) -> list[dict[str, Any]]:
        """One window of events (v1 `GET .../events`), normalised to {event, time, data}."""
        params = {"start": window.start.isoformat(), "end": window.end.isoformat()}
        if tags:
            params["tags"] = tags
        _status, _headers, body = await self.call(
            "GET", source.path, endpoint="events", params=params
        )
        try:
            return list(normalised(json.loads(body)))
        except ValueError:
            # A 200 with garbage (a proxy's error page, a cut answer): try again later.
            raise CopernicaUnavailable("Copernica events: answer is not a JSON array") from None

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
            # A 200 with garbage (a proxy's error page, a cut answer): transient, ask again.
            raise CopernicaUnavailable("Copernica status: answer is not a JSON object") from None
        if state == "available":
            return Readiness.READY
        if state == "pending":
            return Readiness.PENDING
        return Readiness.GONE

    @contextlib.asynccontextmanager
    async def open_data(self, copernica_id: str) -> AsyncIterator[aiohttp.StreamReader | None]:
        """Stream the data: yields the body of the open response, or None while it is not
        ready (the response itself stays in here).

        Tries `datarequest/{id}/data` and falls back to the old `datarequest/{id}` form, whose
        not-ready answer is recognised by the payload check itself.
        """
        quoted = quote(copernica_id, safe="")
        paths = ([f"datarequest/{quoted}/data"] if self.forms.data_route else []) + [
            f"datarequest/{quoted}"
        ]
        for path in paths:
            answer = await self.send("GET", path, endpoint="data", stream=True)
            if answer.status < 400:
                try:
                    yield answer.content
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
