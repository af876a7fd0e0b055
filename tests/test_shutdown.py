"""SIGTERM: readiness drops at once, a slow large callback in flight still completes, exit 0."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable

import aiohttp

from service.callbacks import callback_url
from service.config import Secret
from service.simulator import PayloadSpec, payload_bytes
from tests.conftest import CALLBACK_SECRET, Bucket, ServiceProcess, Simulator, file_request, sha256
from tests.test_callbacks import archive_key

MIB = 1024 * 1024


async def test_sigterm_finishes_the_callback_in_flight_and_exits_cleanly(
    service_processes: Callable[..., ServiceProcess], simulator: Simulator, store: Bucket
) -> None:
    simulator.state.faults.lose_callback = True
    replica = service_processes(
        SHUTDOWN_DRAIN_SECONDS="1", SHUTDOWN_GRACE_SECONDS="30", S3_PART_BYTES=str(5 * MIB)
    )
    async with aiohttp.ClientSession() as http:
        created = await file_request(http, replica.admin_url, {"email": "sig@example.com"})
        body = payload_bytes(
            PayloadSpec("email", "sig@example.com", created["copernica_id"], 12 * MIB)
        )
        started = asyncio.Event()

        async def slowly() -> AsyncIterator[bytes]:
            for offset in range(0, len(body), 512 * 1024):
                yield body[offset : offset + 512 * 1024]
                started.set()
                await asyncio.sleep(0.15)  # about 3.5 s in all

        url = callback_url(replica.url, Secret(CALLBACK_SECRET), created["id"])
        upload = asyncio.create_task(http.post(url, data=slowly()))
        await started.wait()
        assert replica.proc is not None
        replica.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)

        async with http.get(f"{replica.url}/readyz") as ready:
            assert ready.status == 503  # the load balancer is told at once
        async with http.get(f"{replica.url}/healthz") as alive:
            assert alive.status == 200  # and requests are still served while draining

        answer = await upload
        assert answer.status == 200
        assert (await answer.json())["sha256"] == sha256(body)
        answer.release()

    code = await asyncio.get_running_loop().run_in_executor(None, replica.proc.wait, 30)
    assert code == 0
    assert await store.read(archive_key(created["id"])) == body
    assert await store.uploads() == []
