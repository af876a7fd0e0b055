"""The Copernica client against the simulator over HTTP: id forms, versions, errors, retries."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from service.copernica.client import (
    Backoff,
    CopernicaClient,
    CopernicaError,
    CopernicaUnavailable,
    RateLimiter,
    Readiness,
)
from service.copernica.subject import Subject
from service.metrics import Metrics
from tests.conftest import ACCESS_TOKEN, Simulator, make_settings
from tests.support import eventually

QUICK = Backoff(attempts=4, base=0.01, cap=0.05)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def client(
    http: aiohttp.ClientSession, simulator: Simulator, version: str = "v2", **env: str
) -> CopernicaClient:
    settings = make_settings(
        COPERNICA_API_URL=f"{simulator.url}/{version}",
        COPERNICA_AUTH_URL=f"{simulator.url}/authenticate",
        **env,
    )
    return CopernicaClient(http, settings, Metrics())


@pytest.mark.parametrize("form", ["X-Created", "Location", "X-Location", "body"])
async def test_created_id_is_read_from_every_answer_form(
    http: aiohttp.ClientSession, simulator: Simulator, form: str
) -> None:
    simulator.state.config.create_id_header = form
    copernica = client(http, simulator)

    created = await copernica.create_datarequest(Subject("email", "a+b@example.com"), None)

    assert created in simulator.state.requests
    assert simulator.state.requests[created].subject_id == "a+b@example.com"


@pytest.mark.parametrize("version", ["v2", "v3", "v4"])
async def test_each_api_version_authenticates(
    http: aiohttp.ClientSession, simulator: Simulator, version: str
) -> None:
    copernica = client(http, simulator, version)
    created = await copernica.create_datarequest(Subject("profile", "12"), "https://x.test/cb")
    assert await copernica.readiness(created) in (Readiness.PENDING, Readiness.READY)
    assert simulator.state.requests[created].report == "https://x.test/cb"
    assert (len(simulator.state.jwts) == 1) == (version == "v4")


async def test_v4_jwt_is_refreshed_when_it_runs_out(
    http: aiohttp.ClientSession, simulator: Simulator
) -> None:
    simulator.state.config.jwt_lifetime = 0.2
    copernica = client(http, simulator, "v4")
    await copernica.create_datarequest(Subject("profile", "1"), None)
    await eventually(
        lambda: all(ends <= time.monotonic() for ends in simulator.state.jwts.values()),
        what="the token running out",
    )

    await copernica.create_datarequest(Subject("profile", "2"), None)

    assert len(simulator.state.jwts) == 2


async def test_wrong_token_is_a_final_error_that_hides_the_token(
    http: aiohttp.ClientSession, simulator: Simulator
) -> None:
    simulator.state.config.access_token = "another-token"
    copernica = client(http, simulator)
    with pytest.raises(CopernicaError) as raised:
        await copernica.create_datarequest(Subject("email", "a@b.cd"), None, backoff=QUICK)
    assert raised.value.status == 401
    assert ACCESS_TOKEN not in str(raised.value) and ACCESS_TOKEN not in repr(raised.value)
    assert simulator.state.api_calls == 1  # not retried


async def test_copernica_error_message_is_kept(
    http: aiohttp.ClientSession, simulator: Simulator
) -> None:
    copernica = client(http, simulator)
    with pytest.raises(CopernicaError, match="No subprofile with supplied ID"):
        await copernica.create_datarequest(Subject("subprofile", "0"), None)


async def test_429_and_5xx_are_retried_until_they_pass(
    http: aiohttp.ClientSession, simulator: Simulator
) -> None:
    simulator.state.faults.fail_next = 3
    copernica = client(http, simulator)
    created = await copernica.create_datarequest(Subject("profile", "3"), None, backoff=QUICK)
    assert created in simulator.state.requests
    assert simulator.state.api_calls == 4


async def test_retry_after_is_honoured(http: aiohttp.ClientSession, simulator: Simulator) -> None:
    simulator.state.faults.status_429_rate = 1.0
    simulator.state.config.retry_after_seconds = 1
    copernica = client(http, simulator)
    started = time.monotonic()
    with pytest.raises(CopernicaUnavailable, match="HTTP 429 'Too many requests' after 2 tries"):
        await copernica.create_datarequest(
            Subject("profile", "3"), None, backoff=Backoff(attempts=2, base=0.01, cap=5)
        )
    assert time.monotonic() - started >= 1.0


async def test_unreachable_copernica_is_unavailable_without_the_token(
    http: aiohttp.ClientSession,
) -> None:
    settings = make_settings(COPERNICA_API_URL="http://127.0.0.1:9/v2")
    copernica = CopernicaClient(http, settings, Metrics())
    with pytest.raises(CopernicaUnavailable) as raised:
        await copernica.create_datarequest(Subject("profile", "1"), None, backoff=QUICK)
    assert ACCESS_TOKEN not in str(raised.value)


async def test_rate_limit_is_never_exceeded(
    http: aiohttp.ClientSession, simulator: Simulator
) -> None:
    copernica = client(http, simulator, COPERNICA_MAX_RPS="10")
    created = await copernica.create_datarequest(Subject("profile", "4"), None)
    started = time.monotonic()
    await asyncio.gather(*(copernica.readiness(created) for _ in range(25)))
    elapsed = time.monotonic() - started
    assert simulator.state.max_rps <= 10
    assert elapsed >= 2.0  # 25 calls at 10/s with a burst of one


async def test_limiter_survives_timeouts_on_a_starved_loop() -> None:
    """Callers give up (timeouts) while the loop is blocked now and then, so timeouts and
    wake-ups fall due together. Every caller must get a slot or its timeout, nothing else.
    Found by the soak: the limiter's `asyncio.Condition` under `wait_for` then raised
    "Lock is not acquired" (a 500 to the operator, a crashed poll visit) or hung."""
    limiter = RateLimiter(5)
    errors: list[str] = []
    done = asyncio.Event()

    async def blocker() -> None:
        while not done.is_set():
            await asyncio.sleep(0.01)
            time.sleep(0.15)  # noqa: ASYNC251 - the point: a loop starved for a while

    async def caller(delay: float, patience: float) -> None:
        await asyncio.sleep(delay)
        try:
            async with asyncio.timeout(patience), limiter.slot():
                await asyncio.sleep(0.02)
        except TimeoutError:
            pass
        except Exception as exc:
            errors.append(repr(exc))

    starving = asyncio.create_task(blocker())
    async with asyncio.timeout(60):  # a hang fails here, not at the suite's timeout
        await asyncio.gather(*(caller(n / 200, 0.05 + (n % 10) / 20) for n in range(400)))
    done.set()
    await starving
    assert errors == []


async def test_limiter_allows_at_most_rate_calls_in_any_second() -> None:
    limiter = RateLimiter(10)
    stamps = []

    async def call() -> None:
        async with limiter.slot():
            stamps.append(time.monotonic())
            await asyncio.sleep(0.01)  # the call itself, holding its slot

    await asyncio.gather(*(call() for _ in range(25)))
    busiest = max(sum(1 for t in stamps if start <= t < start + 1.0) for start in stamps)
    assert busiest == 10
    assert stamps[-1] - stamps[0] >= 2.0
    # And it does not pace slower than needed: a window's calls go at once when it opens (10,
    # 10, then 5), not spread out over it.
    waves = [1]
    for before, after in itertools.pairwise(stamps):
        if after - before >= 0.5:
            waves.append(0)
        waves[-1] += 1
    assert waves == [10, 10, 5]
    slow = RateLimiter(0.5)  # below one per second: one call per two seconds
    async with slow.slot():
        pass
    started = time.monotonic()
    async with slow.slot():
        pass
    assert time.monotonic() - started >= 2.0
