"""Hostile input at the callback URL: every case gets the right status, nothing invalid is
archived, memory stays bounded, and the service keeps serving. Cases are listed in
docs/RELIABILITY.md."""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from service.config import Secret
from service.intake.callback import callback_url
from tests.conftest import (
    CALLBACK_SECRET,
    Bucket,
    Service,
    ServiceFactory,
    ServiceProcess,
    Simulator,
)
from tests.support import (
    EMAIL,
    MIB,
    archive_key,
    callbacks_answered,
    eventually,
    file_request,
    payload,
    pending_request,
    post,
    raw_exchange,
    text_of,
)

# A scenario suite: left out of the quick subset, `pytest -m "not slow"`.
pytestmark = pytest.mark.slow


async def still_serving(service: Service, simulator: Simulator, store: Bucket) -> None:
    """After whatever came before, a fresh request is still archived normally."""
    request_id = await pending_request(service, simulator)
    assert (await post(service, request_id, payload()))[0] == 200
    assert await store.read(archive_key(request_id)) == payload()


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("invalid utf-8", payload().replace(b"Hello", b"Hel\xff\xfeo")),
        ("utf-8 encoded surrogate", payload().replace(b"Hello", b"Hel\xed\xa0\x80o")),
        ("utf-8 bom", b"\xef\xbb\xbf" + payload()),
        ("NaN", payload().replace(b'{"open": 1}', b'{"open": NaN}')),
        ("Infinity", payload().replace(b'{"open": 1}', b'{"open": -Infinity}')),
        ("duplicate data", payload()[:-1] + b', "data": []}'),
        ("duplicate info", payload()[:-1] + b', "info": {"type": "email", "id": "x@y.z"}}'),
        ("deep nesting", b'{"info": {"type": "email", "id": "a"}, "data": ' + b"[" * 100_000),
        ("info is a string", b'{"info": "email", "data": []}'),
        (
            "info.type is a number",
            json.dumps({"info": {"type": 1, "id": EMAIL}, "data": []}).encode(),
        ),
        (
            "data is null",
            json.dumps({"info": {"type": "email", "id": EMAIL}, "data": None}).encode(),
        ),
        ("another subject", payload(info_id="someone@else.example")),
        ("top-level array", b"[" + payload() + b"]"),
        ("two documents", payload() + payload()),
        ("trailing garbage", payload() + b"<!-- -->"),
        ("empty body", b""),
        ("only whitespace", b" \r\n\t " * 100),
        ("html error page", b"<html><body>502 Bad Gateway</body></html>"),
        ("control characters", payload().replace(b"Hello", b"He\x01llo")),
    ],
)
async def test_hostile_body_is_422_quarantined_and_nothing_archived(
    service: Service, simulator: Simulator, store: Bucket, name: str, body: bytes
) -> None:
    request_id = await pending_request(service, simulator)

    status, answer = await post(service, request_id, body)

    assert status == 422, (name, answer)
    assert await store.keys("archive/") == []
    assert len(await store.keys(f"quarantine/{request_id}/")) == 1
    await still_serving(service, simulator, store)


async def test_mutation_fuzz_never_archives_an_invalid_body(
    service: Service, simulator: Simulator, store: Bucket
) -> None:
    """Truncations, byte flips, insertions and deletions of a valid payload: every answer is
    200 only for a body that is valid JSON for this subject, else 422; never a 5xx."""
    rng = random.Random(20261123)  # reproducible
    base = payload()
    bodies = []
    for _ in range(150):
        body = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(body) + 1)
            kind = rng.choice(("cut", "flip", "insert", "delete"))
            if kind == "cut":
                del body[at:]
            elif kind == "flip" and body:
                body[min(at, len(body) - 1)] ^= 1 << rng.randrange(8)
            elif kind == "insert":
                body[at:at] = rng.choice([b"{", b"]", b'"', b"\\", b",", b"\x00", b"\xc3"])
            elif body:
                del body[min(at, len(body) - 1)]
        bodies.append(bytes(body))
    archived: list[tuple[str, bytes]] = []
    request_id = await pending_request(service, simulator)
    statuses = []
    for body in bodies:
        status, answer = await post(service, request_id, body)
        statuses.append(status)
        if status == 200:
            assert answer["status"] == "archived"
            parsed = json.loads(body)  # must be valid JSON ...
            assert parsed["info"]["id"].lower() == EMAIL.lower()  # ... for this subject
            archived.append((request_id, body))
            request_id = await pending_request(service, simulator)  # judge the rest afresh
        else:
            assert status in (202, 422), status
    assert 500 not in statuses and statuses.count(422) > 100
    for archived_id, body in archived:
        assert await store.read(archive_key(archived_id)) == body


@pytest.mark.parametrize(
    "path",
    [
        "/callbacks/datarequest/..%2F..%2Fetc%2Fpasswd/x",
        "/callbacks/datarequest/../../v1/data-requests/x",
        "/callbacks/datarequest/" + "A" * 5000 + "/x",
        "/callbacks/datarequest/01ARZ3NDEKTSV4RRFFQ69G5FAV",
        "/callbacks/datarequest/",
        "/callbacks/datarequest/01ARZ3NDEKTSV4RRFFQ69G5FAV/x/extra",
    ],
)
async def test_malformed_paths_are_4xx_and_store_nothing(
    service: Service, store: Bucket, path: str
) -> None:
    async with service.http.post(service.url + path, data=payload()) as answer:
        assert 400 <= answer.status < 500
    assert await store.keys() == []


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_wrong_methods_are_405(
    service: Service, simulator: Simulator, store: Bucket, method: str
) -> None:
    request_id = await pending_request(service, simulator)
    async with service.http.request(
        method, service.callback_url(request_id), data=payload()
    ) as answer:
        assert answer.status == 405
    assert await store.keys("archive/") == []


async def test_lying_content_length(service: Service, simulator: Simulator, store: Bucket) -> None:
    request_id = await pending_request(service, simulator)
    path = service.callback_url(request_id).removeprefix(service.url)
    body = payload()
    # Says more than it sends, then hangs up: nothing is archived.
    host, port = service.url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body) + 500}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    await asyncio.sleep(0.3)  # the scenario: the sender stalls mid-body, then hangs up
    writer.close()
    # The service's own account of that callback first; then, that it archived nothing.
    await eventually(
        lambda: callbacks_answered(service.http, service.admin_url),
        lambda answered: answered == {("sender_hung_up", 400): 1},
        what="the hung-up callback on /metrics",
    )
    assert await store.keys("archive/") == []
    # Says less than it sends: the declared bytes are the body (invalid), the rest is parsed
    # as a next request (garbage): a 4xx either way, and nothing stored.
    short = await raw_exchange(
        service, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n".encode() + body
    )
    assert re.match(rb"HTTP/1\.[01] 4(00|22) ", short), short[:40]
    assert await store.keys("archive/") == []
    # No length at all on HTTP/1.1: an empty body (invalid: 422).
    none = await raw_exchange(service, f"POST {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert none.startswith(b"HTTP/1.1 422")
    await still_serving(service, simulator, store)


async def test_compressed_body_is_415_and_not_read(
    service: Service, simulator: Simulator, store: Bucket
) -> None:
    request_id = await pending_request(service, simulator)
    bomb = gzip.compress(b" " * (50 * MIB))  # 50 KiB that would expand a thousandfold
    for encoding in ("gzip", "deflate", "x-unknown", "br"):
        async with service.http.post(
            service.callback_url(request_id), data=bomb, headers={"Content-Encoding": encoding}
        ) as answer:
            # aiohttp's own parser refuses encodings it cannot decode (br without Brotli)
            # with 400 before our route runs; everything else gets our 415.
            assert answer.status == (400 if encoding == "br" else 415), encoding
            assert "Content-Encoding" in await answer.text() or encoding == "br"
    assert await store.keys("archive/") == []
    assert await store.keys("quarantine/") == []


async def test_slowloris_body_times_out_with_408_and_leaves_nothing(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    service = await make_service(CALLBACK_READ_TIMEOUT_SECONDS="1", S3_PART_BYTES=str(5 * MIB))
    request_id = await pending_request(service, simulator)
    body = payload(filler=6 * MIB)

    async def slow() -> AsyncIterator[bytes]:
        yield body[: 6 * MIB]  # enough for a multipart upload to have started
        await asyncio.sleep(3)  # the scenario: a stall longer than the read timeout
        yield body[6 * MIB :]

    try:
        status: int | None = (await post(service, request_id, slow()))[0]
    except aiohttp.ClientError:
        status = None  # the service closed before the client read its answer
    # What the service answered, whether or not the client was still there to read it.
    assert await callbacks_answered(service.http, service.admin_url) == {("read_timeout", 408): 1}
    assert status in (408, None)
    assert await store.keys("archive/") == []
    await eventually(store.uploads, lambda uploads: uploads == [], timeout=5, what="no upload")
    await still_serving(service, simulator, store)


async def test_a_thousand_idle_connections_do_not_stop_the_service(
    service: Service, simulator: Simulator, store: Bucket
) -> None:
    host, port = service.url.removeprefix("http://").split(":")
    held = []
    for _ in range(1000):
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /callbacks/datarequest/")  # a request line never finished
        held.append(writer)
    try:
        await asyncio.wait_for(still_serving(service, simulator, store), 20)
    finally:
        for writer in held:
            writer.close()


async def test_a_500_mb_single_string_is_refused_in_bounded_memory(
    service_processes: Callable[..., ServiceProcess],
    simulator: Simulator,
    store: Bucket,
    tmp_path: Path,
) -> None:
    simulator.state.faults.lose_callback = True
    replica = service_processes()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        created = await file_request(http, replica.admin_url, {"email": EMAIL})
        head = json.dumps({"info": {"type": "email", "id": EMAIL}}).encode()[:-1]

        async def huge() -> AsyncIterator[bytes]:
            yield head + b', "data": ["'
            block = b"x" * MIB
            for _ in range(500):
                yield block

        url = callback_url(replica.url, Secret(CALLBACK_SECRET), created["id"])
        try:
            async with http.post(url, data=huge()) as answer:
                status, text = answer.status, await answer.text()
        except aiohttp.ClientError as exc:
            # The service answers and closes while the rest is still being sent.
            status, text = None, f"closed before the answer was read: {exc!r}"
        # What the service answered, whether or not the client got to read it.
        answered = await callbacks_answered(http, replica.admin_url)
    assert replica.proc is not None
    status_lines = (await text_of(f"/proc/{replica.proc.pid}/status")).splitlines()
    peak_kib = int(next(line.split()[1] for line in status_lines if line.startswith("VmHWM:")))
    assert answered == {("invalid", 422): 1}, text
    assert status in (422, None), text
    assert peak_kib < 250 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"
    assert await store.keys("archive/") == []
    assert await store.uploads() == []
    async with aiohttp.ClientSession() as http, http.get(f"{replica.url}/healthz") as answer:
        assert answer.status == 200
