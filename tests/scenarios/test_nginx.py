"""Two replicas behind nginx (deploy/nginx.conf): 300 callbacks with duplicates and concurrent
deliveries, one replica SIGKILLed mid-run and restarted. Nothing acknowledged is lost, each
request is archived exactly once, and no multipart upload is left behind."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from deploy.local_nginx import Nginx
from service.config import Secret
from service.intake.callback import callback_url
from service.simulator.payloads import PayloadSpec, payload_bytes
from tests.conftest import CALLBACK_SECRET, Bucket, ServiceProcess, Simulator, free_port
from tests.support import MIB, archive_key, eventually, file_request

# A scenario suite: left out of the quick subset, `pytest -m "not slow"`.
pytestmark = pytest.mark.slow

REQUESTS = 100
DELIVERIES = 3  # per request: two at once, one later -> 300 callbacks


@pytest.fixture
def nginx_in_front(tmp_path: Path) -> Iterator[Callable[[list[int]], Nginx]]:
    started: list[Nginx] = []

    def start(upstreams: list[int]) -> Nginx:
        """nginx binds its port itself (`free_port`: another process may take it first); a
        start that found it taken is tried again on another."""
        for attempt in range(5):
            workdir = tmp_path / f"nginx-{len(started)}-{attempt}"
            workdir.mkdir()
            proxy = Nginx(workdir, upstreams, free_port())
            try:
                proxy.start()
            except RuntimeError:
                if "address already in use" not in _text(workdir / "error.log").lower():
                    raise
                proxy.stop()
                continue
            started.append(proxy)
            return proxy
        raise RuntimeError(f"no free port for nginx: see {tmp_path}")

    yield start
    for proxy in started:
        proxy.stop()


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


async def deliver(http: aiohttp.ClientSession, url: str, body: bytes, log: list[Any]) -> int:
    """One delivery the way Copernica retries it: until a 2xx or 4xx answer."""
    for _ in range(40):
        try:
            async with http.post(url, data=body) as answer:
                status = answer.status
        except aiohttp.ClientError:
            status = 0
        log.append((url, status))
        if 200 <= status < 500:
            return status
        await asyncio.sleep(0.25)  # Copernica's pause before it retries a delivery
    return status


async def test_behind_nginx_a_killed_replica_loses_nothing(
    service_processes: Callable[..., ServiceProcess],
    nginx_in_front: Callable[[list[int]], Nginx],
    simulator: Simulator,
    store: Bucket,
) -> None:
    simulator.state.faults.lose_callback = True  # the test plays Copernica's deliveries
    simulator.state.config.ready_after = 3600  # so only callbacks can archive anything
    # Ticks every 2 s, so a poller's janitor (every tenth tick, and at start) runs in time.
    settings = {
        "S3_PART_BYTES": str(5 * MIB),
        "POLL_INTERVAL_SECONDS": "10",
        "SHUTDOWN_DRAIN_SECONDS": "0",
    }
    first, second = service_processes(**settings), service_processes(**settings)
    proxy = nginx_in_front([first.port, second.port])
    secret = Secret(CALLBACK_SECRET)
    attempts: list[Any] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        # The operator API is not behind the load balancer: only callbacks and health are.
        async with http.get(f"{proxy.url}/v1/data-requests") as answer:
            assert answer.status == 404
        async with http.get(f"{proxy.url}/readyz") as answer:
            assert answer.status == 200
        created = []
        for n in range(REQUESTS):
            replica = (first, second)[n % 2]
            created.append(await file_request(http, replica.admin_url, {"profile": n + 1}))
        bodies = {
            item["id"]: payload_bytes(
                PayloadSpec(
                    "profile", str(n + 1), item["copernica_id"], 6 * MIB if n % 10 == 0 else 20_000
                )
            )  # every tenth goes up in parts
            for n, item in enumerate(created)
        }

        async def request_story(item: dict[str, Any]) -> list[int]:
            url = callback_url(proxy.url, secret, item["id"])
            body = bodies[item["id"]]
            together = await asyncio.gather(
                deliver(http, url, body, attempts), deliver(http, url, body, attempts)
            )
            return [*together, await deliver(http, url, body, attempts)]

        async def killer() -> None:
            await eventually(
                lambda: sum(1 for _, status in attempts if status == 200),
                lambda acknowledged: acknowledged >= 100,
                timeout=120,
                what="100 callbacks acknowledged",
            )
            second.kill()
            await asyncio.sleep(1.0)  # the scenario: the replica stays down for a second
            await asyncio.to_thread(second.start)  # same port: nginx sends to it again

        gate = asyncio.Semaphore(24)

        async def gated(item: dict[str, Any]) -> list[int]:
            async with gate:
                return await request_story(item)

        outcomes, _ = await asyncio.gather(
            asyncio.gather(*(gated(item) for item in created)), killer()
        )

    sent = len(attempts)
    acknowledged = [url for url, status in attempts if status == 200]
    print(
        f"\ncallbacks: {REQUESTS * DELIVERIES} deliveries, {sent} attempts, "
        f"{len(acknowledged)} acknowledged, {sent - len(acknowledged)} failed and retried"
    )
    assert all(status == [200] * DELIVERIES for status in outcomes), outcomes
    keys = await store.keys("archive/")
    assert sorted(keys) == sorted(archive_key(item["id"]) for item in created)
    for item in created:  # every acknowledged callback's bytes are there, exactly
        assert await store.read(archive_key(item["id"])) == bodies[item["id"]]
    # A replica killed mid-upload leaves an upload that can never complete; the janitor of
    # a poller (every tenth tick) aborts those whose key exists.
    await eventually(store.uploads, lambda uploads: uploads == [], timeout=30, what="no upload")
    print(
        f"archived {len(keys)} objects for {len(acknowledged)} acknowledged callbacks "
        f"({len(acknowledged) - len(keys)} duplicates avoided)"
    )
