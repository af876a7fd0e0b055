"""Faults: S3 outages around a callback, a replica killed mid-upload, Copernica timing out,
server-side encryption on every object, and nothing ever written to local disk."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from service.config import Secret
from service.intake.callback import callback_url
from service.simulator.payloads import PayloadSpec, payload_bytes
from tests.conftest import (
    CALLBACK_SECRET,
    Bucket,
    ServiceFactory,
    ServiceProcess,
    Simulator,
    TcpProxy,
)
from tests.support import (
    MIB,
    archive_key,
    eventually,
    file_request,
    metric,
    payload,
    pending_request,
    post,
    wait_for_status,
)

# A scenario suite: left out of the quick subset, `pytest -m "not slow"`.
pytestmark = pytest.mark.slow

FAST_POLL = {"POLL_INTERVAL_SECONDS": "0.5", "POLL_LEASE_SECONDS": "3", "S3_TIMEOUT_SECONDS": "2"}


async def test_s3_down_during_the_callback_then_the_poller_archives_after_recovery(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket, s3_proxy: TcpProxy
) -> None:
    service = await make_service(S3_ENDPOINT_URL=s3_proxy.url, **FAST_POLL)
    request_id = await pending_request(service, simulator)  # Copernica will not call back
    s3_proxy.down()

    status, _ = await post(service, request_id, payload())  # our one callback attempt
    assert status == 503
    # The poller's ticks fail meanwhile (their listings of what is due); nothing is lost.
    await eventually(
        lambda: metric(
            service,
            "receiver_s3_request_duration_seconds_count",
            operation="list_objects_v2",
            outcome="error",
        ),
        lambda failed: failed >= 2,
        what="two failed listings",
    )
    s3_proxy.up()

    shown = await wait_for_status(service, request_id, "archived", timeout=20)
    assert shown["status"] == "archived" and shown["archive"]["source"] == "poll"
    copernica_id = shown["copernica_id"]
    assert await store.read(archive_key(request_id)) == simulator.state.payload_bytes(copernica_id)


async def test_s3_down_after_an_acknowledged_callback_loses_nothing(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket, s3_proxy: TcpProxy
) -> None:
    service = await make_service(S3_ENDPOINT_URL=s3_proxy.url, S3_TIMEOUT_SECONDS="2")
    request_id = await pending_request(service, simulator)
    assert (await post(service, request_id, payload()))[0] == 200
    s3_proxy.down()

    async with service.http.get(
        f"{service.admin_url}/v1/data-requests/{request_id}", headers=service.auth
    ) as answer:
        assert answer.status == 503 and "Retry-After" in answer.headers
    async with service.http.get(f"{service.url}/readyz") as answer:
        assert answer.status == 503
    s3_proxy.up()

    assert (await service.show(request_id))["status"] == "archived"
    assert await store.read(archive_key(request_id)) == payload()


async def test_replica_killed_mid_upload_leaves_no_object_and_the_poller_archives_later(
    service_processes: Callable[..., ServiceProcess], simulator: Simulator, store: Bucket
) -> None:
    simulator.state.faults.lose_callback = True
    replica = service_processes(
        S3_PART_BYTES=str(5 * MIB), POLL_INTERVAL_SECONDS="2", POLL_LEASE_SECONDS="3"
    )
    async with aiohttp.ClientSession() as http:
        created = await file_request(http, replica.admin_url, {"email": "k@example.com"})
        body = payload_bytes(
            PayloadSpec("email", "k@example.com", created["copernica_id"], 16 * MIB)
        )
        sent = asyncio.Event()

        async def slowly() -> AsyncIterator[bytes]:
            for offset in range(0, len(body), MIB):
                yield body[offset : offset + MIB]
                if offset >= 11 * MIB:
                    sent.set()  # two parts are up by now
                await asyncio.sleep(0.05)  # a slow sender: the kill comes mid-upload

        url = callback_url(replica.url, Secret(CALLBACK_SECRET), created["id"])
        upload = asyncio.create_task(http.post(url, data=slowly()))
        await sent.wait()
        replica.kill()
        with contextlib.suppress(aiohttp.ClientError):
            await upload  # the connection died with the replica: not acknowledged
        assert await store.keys("archive/") == []  # no partial object, ever

        # The poller of the restarted replica fetches the data itself.
        await asyncio.to_thread(replica.start)
        await eventually(lambda: store.keys("archive/"), what="the archive")
    expected = simulator.state.payload_bytes(created["copernica_id"])
    assert await store.read(archive_key(created["id"])) == expected
    # The killed replica's upload is aborted by a janitor.
    await eventually(store.uploads, lambda uploads: uploads == [], what="no upload")


async def test_copernica_timing_out_is_retried_until_it_answers(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    service = await make_service(COPERNICA_TIMEOUT_SECONDS="0.3", **FAST_POLL)
    simulator.state.faults.lose_callback = True
    async with await service.file({"email": "t@example.com"}) as answer:
        created = await answer.json()
    timed_out = await metric(service, "receiver_copernica_requests_total", status="error")
    simulator.state.faults.slow_seconds = 1.0  # every call now times out

    await eventually(
        lambda: metric(service, "receiver_copernica_requests_total", status="error"),
        lambda errors: errors >= timed_out + 2,
        what="two calls timed out",
    )
    assert (await service.show(created["id"]))["status"] == "pending"
    simulator.state.faults.slow_seconds = 0

    shown = await wait_for_status(service, created["id"], "archived", timeout=30)
    assert shown["status"] == "archived"


async def test_every_object_is_encrypted_at_rest_when_archive_sse_is_set(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    service = await make_service(ARCHIVE_SSE="AES256", S3_PART_BYTES=str(5 * MIB))
    small = await pending_request(service, simulator)
    large = await pending_request(service, simulator, {"email": "big@example.com"})
    assert (await post(service, small, payload()))[0] == 200
    assert (await post(service, large, payload("big@example.com", filler=6 * MIB)))[0] == 200
    assert (await post(service, small, b"{"))[0] in (200, 422)
    rejected = await pending_request(service, simulator, {"profile": 5})
    assert (await post(service, rejected, b"{"))[0] == 422

    keys = await store.keys()
    assert any("/archive/" in k for k in keys) and any("/quarantine/" in k for k in keys)
    assert any("/requests/" in k for k in keys) and any("/due/" in k for k in keys)
    for key in keys:
        assert (await store.head(key)).get("ServerSideEncryption") == "AES256", key


async def test_nothing_is_written_to_local_disk(
    service_processes: Callable[..., ServiceProcess],
    simulator: Simulator,
    store: Bucket,
    tmp_path: Path,
) -> None:
    """Bodies go from the socket to S3 only: no temp files however large the body."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    simulator.state.faults.lose_callback = True
    replica = service_processes(TMPDIR=str(scratch), S3_PART_BYTES=str(5 * MIB))
    async with aiohttp.ClientSession() as http:
        created = await file_request(http, replica.admin_url, {"email": "d@example.com"})
        body = payload_bytes(
            PayloadSpec("email", "d@example.com", created["copernica_id"], 12 * MIB)
        )
        url = callback_url(replica.url, Secret(CALLBACK_SECRET), created["id"])
        async with http.post(url, data=body) as answer:
            assert answer.status == 200
    assert replica.proc is not None
    open_files = []
    for fd in os.listdir(f"/proc/{replica.proc.pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # a socket may close meanwhile
            open_files.append(os.readlink(f"/proc/{replica.proc.pid}/fd/{fd}"))
    assert not [
        f
        for f in open_files
        if f.startswith("/") and not f.startswith(("/dev/", "/proc/")) and not f.endswith(".log")
    ], open_files
    replica.proc.send_signal(signal.SIGTERM)
    await asyncio.to_thread(replica.proc.wait, 30)
    assert list(scratch.iterdir()) == []


async def test_garbage_answers_from_copernica_are_transient(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    """A proxy in front of Copernica answering 200 with an HTML page: status checks and event
    fetches treat it as a passing fault, and the request is archived once answers are sane."""
    service = await make_service(**FAST_POLL)
    simulator.state.faults.lose_callback = True
    async with await service.file(
        {"email": "g@example.com", "events": {"since": "2026-01-01", "until": "2026-01-05"}}
    ) as answer:
        created = await answer.json()
    simulator.state.faults.garbage_next = 3

    shown = await wait_for_status(service, created["id"], "archived", timeout=30)

    assert shown["status"] == "archived" and shown["events"]["complete"]
    assert simulator.state.faults.garbage_next == 0  # all three were served and survived
