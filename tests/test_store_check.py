"""Start-up refuses a bucket it must not run on: missing, unreachable, or one whose store
ignores conditional writes (exactly-once rests on them). One clear line, exit code 2."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from ulid import ULID

from service.clock import utcnow
from tests.conftest import (
    ACCESS_TOKEN,
    API_TOKEN,
    CALLBACK_SECRET,
    Bucket,
    ServiceFactory,
    bound_socket,
    free_port,
    port_of,
)

# On moto and on SeaweedFS (tests/conftest.py): the test ids say which.
# Over ~20 s in all: left out of the quick subset, `pytest -m "not slow"`.
pytestmark = [pytest.mark.both_stores, pytest.mark.slow]

# What a store that does not implement conditional requests does: it never sees them.
CONDITIONS = ("If-None-Match", "If-Match")


@pytest.fixture
async def careless_s3(s3_endpoint: str) -> AsyncIterator[str]:
    """The store behind an HTTP proxy that drops conditional headers from every request."""
    async for url in _proxy(s3_endpoint, drop=CONDITIONS):
        yield url


@pytest.fixture
async def s3_gone_at_multipart(s3_endpoint: str) -> AsyncIterator[str]:
    """The store behind a proxy that hangs up on every CreateMultipartUpload: S3 goes away half-way
    through the start-up check."""
    async for url in _proxy(s3_endpoint, hang_up=lambda r: "uploads" in r.query):
        yield url


async def _proxy(
    s3_endpoint: str,
    drop: tuple[str, ...] = (),
    hang_up: Callable[[web.Request], bool] = lambda _request: False,
) -> AsyncIterator[str]:
    session = aiohttp.ClientSession(auto_decompress=False)

    async def forward(request: web.Request) -> web.StreamResponse:
        if hang_up(request):
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=599)
        headers = {k: v for k, v in request.headers.items() if k not in drop and k != "Host"}
        url, data = s3_endpoint + request.raw_path, await request.read()
        async with session.request(
            request.method, url, headers=signed_again(request.method, url, headers), data=data
        ) as answer:
            body = await answer.read()
            skip = {"Content-Length", "Transfer-Encoding", "Content-Encoding", "Connection"}
            return web.Response(
                status=answer.status,
                body=body,
                headers={k: v for k, v in answer.headers.items() if k not in skip},
            )

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{path:.*}", forward)
    listener = bound_socket()  # ours until the server listens on it: no port race
    server = TestServer(app, socket_factory=lambda *_: listener)
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()
    await session.close()


def signed_again(method: str, url: str, headers: dict[str, str]) -> dict[str, str]:
    """The request's headers signed afresh for `url` (SigV4, the test credentials), over the
    headers the client signed that are still there: a store that checks signatures
    (SeaweedFS; moto does not) then sees a well-signed request that never carried the dropped
    headers, as a store that ignores them would. The payload hash stays as the client sent
    it (unsigned, or a streamed checksum's)."""
    signed = headers.get("Authorization", "").partition("SignedHeaders=")[2].partition(",")[0]
    names = set(signed.split(";")) - {"host"}
    payload = headers.get("X-Amz-Content-SHA256", "UNSIGNED-PAYLOAD")

    class Resign(S3SigV4Auth):
        def payload(self, request: AWSRequest) -> str:
            return payload

        def headers_to_sign(self, request: AWSRequest) -> Any:
            chosen = super().headers_to_sign(request)
            for name in [n for n in chosen if n not in names and n != "host"]:
                del chosen[name]
            return chosen

    kept = {k: v for k, v in headers.items() if k not in ("Authorization", "X-Amz-Date")}
    aws = AWSRequest(method=method, url=url, headers=kept)
    credentials = Credentials(os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"])
    Resign(credentials, "s3", os.environ["AWS_DEFAULT_REGION"]).add_auth(aws)
    return dict(aws.headers.items())


async def serve(bucket: str, endpoint: str) -> tuple[int, str]:
    """Start `python -m service serve`; its exit code and output (it must not keep running).
    The process binds its two ports itself (`free_port`: another may take one first); a
    start that found one taken is tried again on two others."""
    for _ in range(5):
        code, err = await _serve_once(bucket, endpoint, free_port(), free_port())
        if "address already in use" not in err.lower():
            return code, err
    raise AssertionError(f"no free ports for the service; last: {err}")


async def _serve_once(bucket: str, endpoint: str, port: int, admin_port: int) -> tuple[int, str]:
    env = {
        **os.environ,
        "COPERNICA_ACCESS_TOKEN": ACCESS_TOKEN,
        "CALLBACK_SECRET": CALLBACK_SECRET,
        "API_TOKEN": API_TOKEN,
        "ARCHIVE_BUCKET": bucket,
        "S3_ENDPOINT_URL": endpoint,
        "S3_TIMEOUT_SECONDS": "2",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "ADMIN_PORT": str(admin_port),
        "LOG_FORMAT": "json",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "serve",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
    return proc.returncode or 0, err.decode()


async def test_a_store_that_ignores_conditional_writes_is_refused(
    careless_s3: str, store: Bucket
) -> None:
    code, err = await serve(store.name, careless_s3)

    assert code == 2
    [line] = err.strip().splitlines()
    assert line.startswith("refusing to start: ")
    assert "does not honour conditional writes" in line
    assert "If-None-Match: * on PutObject" in line
    assert await store.keys("startup-probe/") == []  # the probe cleans up after itself


async def test_a_mistyped_bucket_is_refused_by_name(s3_endpoint: str) -> None:
    code, err = await serve("copernica-archvie", s3_endpoint)

    assert code == 2
    [line] = err.strip().splitlines()
    assert "'copernica-archvie' does not exist" in line


@pytest.mark.any_store  # no store answers here
async def test_an_unreachable_store_is_refused(store: Bucket) -> None:
    # A port bound and never listened on refuses every connection, for as long as it is ours.
    with bound_socket() as nobody:
        code, err = await serve(store.name, f"http://127.0.0.1:{port_of(nobody)}")

    assert code == 2
    [line] = err.strip().splitlines()
    assert f"{store.name!r} is unreachable" in line


async def test_a_store_with_conditional_writes_passes_and_leaves_nothing(
    make_service: ServiceFactory, store: Bucket
) -> None:
    await make_service()  # started: the proof passed against moto
    assert await store.keys("startup-probe/") == []
    assert await store.uploads() == []


async def test_s3_going_away_during_the_check_is_refused_in_one_line(
    s3_gone_at_multipart: str, store: Bucket
) -> None:
    """Found by the soak: S3 unreachable half-way through the check crashed the start with a
    plain-text traceback instead of the one-line refusal."""
    code, err = await serve(store.name, s3_gone_at_multipart)

    assert code == 2
    [line] = err.strip().splitlines()
    assert "became unreachable during the start-up check" in line


async def test_a_probe_upload_left_by_a_dead_start_is_aborted(
    make_service: ServiceFactory, store: Bucket
) -> None:
    """A replica killed half-way through its check leaves the probe's multipart upload; the
    next start aborts it once it is a minute old (found by the soak)."""
    old = ULID.from_datetime(utcnow() - timedelta(minutes=5))
    fresh = ULID()  # another replica's check, under way right now: left alone
    for probe in (old, fresh):
        await store.client.create_multipart_upload(
            Bucket=store.name, Key=f"copernica/startup-probe/{probe}"
        )

    await make_service()

    assert [u["Key"] for u in await store.uploads()] == [f"copernica/startup-probe/{fresh}"]
