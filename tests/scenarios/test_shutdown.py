"""SIGTERM: readiness drops at once, a slow large callback in flight still completes, exit 0."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from service.config import Secret
from service.intake.callback import callback_url
from service.simulator.payloads import PayloadSpec, payload_bytes
from tests.conftest import CALLBACK_SECRET, Bucket, ServiceProcess, Simulator, sha256
from tests.support import MIB, archive_key, eventually, file_request, text_of

# A scenario suite: left out of the quick subset, `pytest -m "not slow"`.
pytestmark = pytest.mark.slow


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
                await asyncio.sleep(0.15)  # a slow sender: about 3.5 s in all

        url = callback_url(replica.url, Secret(CALLBACK_SECRET), created["id"])
        upload = asyncio.create_task(http.post(url, data=slowly()))
        await started.wait()
        assert replica.proc is not None
        replica.proc.send_signal(signal.SIGTERM)

        async def readiness() -> int:
            async with http.get(f"{replica.url}/readyz") as ready:
                return ready.status

        # The load balancer is told at once: while the callback is still coming in.
        await eventually(readiness, lambda status: status == 503, what="readiness dropped")
        assert not upload.done()
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


async def test_sigterm_ends_within_drain_and_grace_while_copernica_never_answers(
    service_processes: Callable[..., ServiceProcess], simulator: Simulator, store: Bucket
) -> None:
    """A poll waits on a Copernica that never answers (and a long client timeout): after
    drain + grace the visit is cancelled and the process exits 0; its lease runs out."""
    simulator.state.faults.lose_callback = True
    replica = service_processes(
        SHUTDOWN_DRAIN_SECONDS="1",
        SHUTDOWN_GRACE_SECONDS="2",
        POLL_INTERVAL_SECONDS="0.2",
        COPERNICA_TIMEOUT_SECONDS="600",
    )
    async with aiohttp.ClientSession() as http:
        await file_request(http, replica.admin_url, {"email": "hang@example.com"})
    filed_calls = simulator.state.api_calls
    simulator.state.faults.slow_seconds = 3600  # every answer from now on: never

    await eventually(lambda: simulator.state.api_calls, lambda n: n > filed_calls)
    assert replica.proc is not None
    replica.proc.send_signal(signal.SIGTERM)
    # Without the bound the process waits for the 600 s client timeout: `wait` would raise.
    code = await asyncio.get_running_loop().run_in_executor(None, replica.proc.wait, 60)

    assert code == 0
    assert '"poller_cancelled"' in await text_of(replica.log_path)
    assert await store.uploads() == []
