"""Several replicas on one bucket: each request archived exactly once, polled by one at a time,
and a replica killed with SIGKILL in the middle loses nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import Bucket, ServiceProcess, Simulator
from tests.support import archive_key, eventually, file_request

# On moto and on SeaweedFS (tests/conftest.py): the test ids say which.
# A scenario suite: left out of the quick subset, `pytest -m "not slow"`.
pytestmark = [pytest.mark.both_stores, pytest.mark.slow]

REQUESTS = 200


async def file_many(http: aiohttp.ClientSession, urls: list[str], count: int) -> list[dict]:
    """File `count` requests spread over the replicas, 16 at a time."""
    gate = asyncio.Semaphore(16)

    async def one(n: int) -> dict[str, Any]:
        async with gate:
            return await file_request(http, urls[n % len(urls)], {"profile": n + 1})

    return list(await asyncio.gather(*(one(n) for n in range(count))))


async def test_two_replicas_archive_every_lost_callback_once_despite_a_kill(
    service_processes: Callable[..., ServiceProcess], simulator: Simulator, store: Bucket
) -> None:
    simulator.state.faults.lose_callback = True  # only the pollers can archive anything
    settings = {"POLL_INTERVAL_SECONDS": "1", "POLL_LEASE_SECONDS": "3", "COPERNICA_MAX_RPS": "40"}
    first, second = service_processes(**settings), service_processes(**settings)
    async with aiohttp.ClientSession() as http:
        created = await file_many(http, [first.admin_url, second.admin_url], REQUESTS)
        by_copernica_id = {item["copernica_id"]: item["id"] for item in created}

        # Kill one replica once the polling is well under way.
        await eventually(
            lambda: store.keys("archive/"),
            lambda keys: len(keys) >= REQUESTS // 4,
            timeout=120,
            what="polling under way",
        )
        second.kill()

        await eventually(
            lambda: store.keys("archive/"),
            lambda keys: len(keys) >= REQUESTS,
            timeout=120,
            what="every request archived",
        )

    keys = await store.keys("archive/")
    assert sorted(keys) == sorted(archive_key(item["id"]) for item in created)
    for copernica_id, request_id in list(by_copernica_id.items())[::20]:
        assert await store.read(archive_key(request_id)) == simulator.state.payload_bytes(
            copernica_id
        )
    # The lease kept the replicas apart: no request's data was ever fetched by two at once.
    assert max(r.max_open_fetches for r in simulator.state.requests.values()) == 1
    fetched_twice = [c for c, r in simulator.state.requests.items() if r.data_gets > 1]
    # Only a request whose fetch the killed replica had begun may be fetched again.
    assert len(fetched_twice) <= 4, fetched_twice
    assert await store.uploads() == []
    assert simulator.state.max_rps <= 2 * 40
    assert await asyncio.to_thread(first.stop) == 0
