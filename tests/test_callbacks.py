"""The callback route, as Copernica meets it: status codes, and exactly what lands in S3."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from typing import Any

import pytest

from service.logs import configure_logging
from tests.conftest import (
    ACCESS_TOKEN,
    API_TOKEN,
    CALLBACK_SECRET,
    Bucket,
    Service,
    ServiceFactory,
    Simulator,
    TcpProxy,
    make_settings,
    sha256,
)
from tests.support import (
    EMAIL,
    MIB,
    archive_key,
    delivery_cost,
    eventually,
    payload,
    pending_request,
    post,
    raw_exchange,
)

# Over ~20 s in all: left out of the quick subset, `pytest -m "not slow"`.
pytestmark = pytest.mark.slow


async def archive_keys(store: Bucket) -> list[str]:
    return await store.keys("archive/")


async def test_valid_callback_is_archived_byte_for_byte(
    service: Service, simulator: Simulator, store: Bucket
) -> None:
    request_id = await pending_request(service, simulator)
    body = payload(info_id=EMAIL.upper())  # e-mail compared case-insensitively

    status, answer = await post(service, request_id, body, headers={"Content-Type": "text/plain"})

    assert status == 200
    assert answer == {
        "status": "archived",
        "request_id": request_id,
        "sha256": sha256(body),
        "size": len(body),
    }
    assert await archive_keys(store) == [archive_key(request_id)]
    assert await store.read(archive_key(request_id)) == body
    meta = (await store.head(archive_key(request_id)))["Metadata"]
    assert meta["sha256"] == sha256(body)
    assert meta["size"] == str(len(body))
    assert meta["source"] == "callback"
    assert meta["request-id"] == request_id
    # Not read for the one S3 write: the address names the request and its subject only
    # (the record has Copernica's id; the earlier form, which reads it, puts it here too).
    assert meta["copernica-id"] == ""
    shown = await service.show(request_id)
    assert shown["status"] == "archived"
    assert shown["archive"]["sha256"] == sha256(body)
    assert shown["archive"]["key"] == archive_key(request_id)


async def test_repeat_and_concurrent_deliveries_make_one_object(
    service: Service, simulator: Simulator, store: Bucket
) -> None:
    request_id = await pending_request(service, simulator)
    body = payload()

    results = await asyncio.gather(*(post(service, request_id, body) for _ in range(8)))
    again = await post(service, request_id, body)

    assert [status for status, _ in results] == [200] * 8
    assert sorted(a["status"] for _, a in results).count("archived") == 1
    assert again[0] == 200
    assert await archive_keys(store) == [archive_key(request_id)]
    assert await store.read(archive_key(request_id)) == body


async def test_profile_subject_accepts_number_or_numeric_string(
    service: Service, simulator: Simulator, store: Bucket
) -> None:
    first = await pending_request(service, simulator, {"profile": 42})
    second = await pending_request(service, simulator, {"subprofile": 7})

    assert (await post(service, first, payload(42, "profile")))[0] == 200
    assert (await post(service, second, payload("7", "subprofile")))[0] == 200
    assert len(await archive_keys(store)) == 2


def path_without_token(service: Service, request_id: str) -> str:
    """The request's callback path up to its token: `/callbacks/datarequest/{id}/{digest}`."""
    return service.callback_url(request_id).removeprefix(service.url).rsplit("/", 1)[0]


@pytest.mark.parametrize("token", ["wrong", "A" * 43, ""])
async def test_wrong_token_is_404_before_the_body_is_read(
    service: Service, simulator: Simulator, store: Bucket, token: str
) -> None:
    request_id = await pending_request(service, simulator)
    before = await store.keys()
    path = f"{path_without_token(service, request_id)}/{token}"

    # Headers announce a megabyte that is never sent: the answer must come anyway.
    answer = await raw_exchange(
        service,
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {MIB}\r\n\r\n".encode(),
    )

    assert answer.startswith(b"HTTP/1.1 404")
    assert await store.keys() == before


async def test_expect_continue_with_wrong_token_gets_404_not_100(
    service: Service, simulator: Simulator
) -> None:
    request_id = await pending_request(service, simulator)
    answer = await raw_exchange(
        service,
        f"POST {path_without_token(service, request_id)}/nope HTTP/1.1\r\nHost: x\r\n"
        f"Content-Length: 10\r\nExpect: 100-continue\r\n\r\n".encode(),
    )
    assert answer.startswith(b"HTTP/1.1 404")


async def test_expect_continue_with_good_token_is_archived(
    service: Service, simulator: Simulator, store: Bucket
) -> None:
    request_id = await pending_request(service, simulator)
    body = payload()
    async with service.http.post(
        service.callback_url(request_id), data=body, expect100=True
    ) as answer:
        assert answer.status == 200
    assert await store.read(archive_key(request_id)) == body


async def test_token_of_another_request_is_refused(
    service: Service, simulator: Simulator, store: Bucket
) -> None:
    first = await pending_request(service, simulator)
    second = await pending_request(service, simulator)
    # The same subject, so the same digest: only the id differs from the first's address.
    stolen = service.callback_url(first).rsplit("/", 1)[1]

    async with service.http.post(
        f"{service.url}{path_without_token(service, second)}/{stolen}", data=payload()
    ) as answer:
        assert answer.status == 404
    assert await archive_keys(store) == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"info": {"type": "email", "id": "x"}, "data": [', "invalid JSON"),
        (b"<html>oops</html>", "invalid JSON"),
        (payload(info_id="mallory@example.com"), "does not match"),
        (payload(info_id=42, kind="profile"), "does not match"),
        (b'{"info": {"type": "email"}, "data": []}', "info.id"),
        (
            b'{"info": {"type": "email", "id": "a@b.c"}, "data": {"x": 1}}',
            "'data' must be an array",
        ),
    ],
)
async def test_rejected_body_is_422_and_quarantined_whole(
    service: Service, simulator: Simulator, store: Bucket, body: bytes, reason: str
) -> None:
    request_id = await pending_request(service, simulator)

    status, answer = await post(service, request_id, body)

    assert status == 422
    assert reason in answer["error"]
    assert await archive_keys(store) == []
    [quarantined] = await store.keys(f"quarantine/{request_id}/")
    assert await store.read(quarantined) == body
    meta = (await store.head(quarantined))["Metadata"]
    assert reason in meta["reason"] and meta["truncated"] == "false"
    assert meta["sha256"] == sha256(body)
    assert (await service.show(request_id))["status"] == "pending"


@pytest.mark.parametrize(
    "body",
    [
        json.dumps(
            {"info": {"type": "email", "id": EMAIL}, "data": "Data not available (yet)"}
        ).encode(),
        b"Data not available (yet)",
    ],
)
async def test_not_available_body_is_202_and_nothing_archived(
    service: Service, simulator: Simulator, store: Bucket, body: bytes
) -> None:
    request_id = await pending_request(service, simulator)
    before = await store.keys()

    status, answer = await post(service, request_id, body)

    assert (status, answer["status"]) == (202, "not_ready")
    assert await store.keys() == before
    assert (await service.show(request_id))["status"] == "pending"


async def test_oversize_body_is_413_and_nothing_written(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    service = await make_service(MAX_CALLBACK_BYTES="1000")
    request_id = await pending_request(service, simulator)
    before = await store.keys()

    path = service.callback_url(request_id).removeprefix(service.url)
    declared = await raw_exchange(
        service, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n".encode()
    )

    async def chunked() -> Any:
        for _ in range(20):
            yield b" " * 100  # 2000 bytes of valid leading whitespace, no length declared

    status, _ = await post(service, request_id, chunked())

    assert declared.startswith(b"HTTP/1.1 413")
    assert status == 413
    assert await store.keys() == before
    assert await store.uploads() == []


async def test_exactly_the_limit_is_accepted(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    body = payload()
    service = await make_service(MAX_CALLBACK_BYTES=str(len(body)))
    request_id = await pending_request(service, simulator)
    assert (await post(service, request_id, body))[0] == 200


async def test_large_body_goes_up_in_parts_and_is_exact(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    service = await make_service(S3_PART_BYTES=str(5 * MIB))
    request_id = await pending_request(service, simulator)
    body = payload(filler=13 * MIB)

    async def streamed() -> Any:
        for i in range(0, len(body), 100_000):
            yield body[i : i + 100_000]

    status, answer = await post(service, request_id, streamed())

    assert status == 200 and answer["sha256"] == sha256(body)
    assert await store.read(archive_key(request_id)) == body
    assert await store.uploads() == []
    shown = await service.show(request_id)
    assert shown["status"] == "archived"
    assert shown["archive"]["sha256"] == sha256(body)
    assert shown["archive"]["size"] == len(body)
    # A repeat of the big body is recognised before it is uploaded again.
    assert (await post(service, request_id, body))[0] == 200
    assert await store.uploads() == []
    assert await archive_keys(store) == [archive_key(request_id)]


async def test_large_invalid_body_is_aborted_and_quarantined_head(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    service = await make_service(S3_PART_BYTES=str(5 * MIB))
    request_id = await pending_request(service, simulator)
    body = payload(filler=12 * MIB)[:-1]  # the last byte missing: invalid only at the end

    status, answer = await post(service, request_id, body)

    assert status == 422 and "invalid JSON" in answer["error"]
    assert await archive_keys(store) == []
    assert await store.uploads() == []
    [quarantined] = await store.keys(f"quarantine/{request_id}/")
    kept = await store.read(quarantined)
    assert kept == body[: len(kept)] and len(kept) == MIB  # its first MiB
    assert (await store.head(quarantined))["Metadata"]["truncated"] == "true"


async def test_s3_down_is_503_with_retry_after_and_nothing_written(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket, s3_proxy: TcpProxy
) -> None:
    service = await make_service(S3_ENDPOINT_URL=s3_proxy.url, S3_TIMEOUT_SECONDS="2")
    request_id = await pending_request(service, simulator)
    before = await store.keys()
    s3_proxy.down()

    async with service.http.post(service.callback_url(request_id), data=payload()) as answer:
        assert answer.status == 503
        assert int(answer.headers["Retry-After"]) > 0

    s3_proxy.up()
    assert await store.keys() == before
    # Once S3 is back, Copernica's retry is archived.
    assert (await post(service, request_id, payload()))[0] == 200


async def test_s3_failing_mid_upload_leaves_no_object_and_no_upload(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket, s3_proxy: TcpProxy
) -> None:
    service = await make_service(
        S3_ENDPOINT_URL=s3_proxy.url, S3_TIMEOUT_SECONDS="2", S3_PART_BYTES=str(5 * MIB)
    )
    request_id = await pending_request(service, simulator)
    body = payload(filler=16 * MIB)
    s3_proxy.cut_after_bytes = s3_proxy.bytes_to_target + 7 * MIB  # during the second part

    async with service.http.post(service.callback_url(request_id), data=body) as answer:
        status = answer.status
    assert status == 503
    s3_proxy.up()

    assert await archive_keys(store) == []
    # The abort that failed while S3 was down is retried in the background.
    await eventually(store.uploads, lambda uploads: uploads == [], timeout=10, what="no upload")
    assert (await service.show(request_id))["status"] == "pending"


async def test_log_lines_carry_no_address_and_no_secret(
    make_service: ServiceFactory, simulator: Simulator
) -> None:
    service = await make_service()
    lines = io.StringIO()
    configure_logging(make_settings(LOG_FORMAT="json"), stream=lines)
    request_id = await pending_request(service, simulator)
    other_id = await pending_request(service, simulator)

    await post(service, request_id, payload())
    await post(service, other_id, payload(info_id="mallory@example.com"))

    logging.getLogger().handlers = []  # configure_logging installed one for the process
    # The simulator plays Copernica in this process: its access log is its own.
    logged = [json.loads(line) for line in lines.getvalue().splitlines()]
    ours = [entry for entry in logged if entry.get("logger") != "aiohttp.access"]
    callbacks = [entry for entry in ours if entry["event"] == "callback"]
    assert [c["outcome"] for c in callbacks] == ["archived", "invalid"]
    text = "\n".join(json.dumps(entry) for entry in ours).lower()
    for forbidden in (
        EMAIL.lower(),
        "mallory@example.com",
        CALLBACK_SECRET.lower(),
        ACCESS_TOKEN.lower(),
        API_TOKEN.lower(),
        service.callback_url(request_id).rsplit("/", 1)[1].lower(),
    ):
        assert forbidden not in text
    assert {"request_id", "bytes", "sha256", "duration_ms", "subject"} <= set(callbacks[0])


async def s3_spent(service: Service, request_id: str, body: bytes) -> dict[str, float]:
    """The S3 calls (and other counters) one accepted callback moved, the poller's left out."""
    status, spent = await delivery_cost(service, service.callback_url(request_id), body)
    assert status == 200
    return spent


async def test_an_accepted_callback_costs_one_write_on_any_replica(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    filer, other = await make_service(), await make_service()
    request_id = await pending_request(filer, simulator)
    assert await s3_spent(filer, request_id, payload()) == {"s3:put_object": 1}
    assert await store.read(archive_key(request_id)) == payload()
    # A repeat delivery, to the replica that filed it or another: the body streams again and
    # ends in a write S3 refuses (If-None-Match); 200 all the same, one object in the bucket.
    assert await s3_spent(filer, request_id, payload()) == {"s3:put_object": 1}
    assert await s3_spent(other, request_id, payload()) == {"s3:put_object": 1}
    assert await archive_keys(store) == [archive_key(request_id)]


async def test_the_subject_is_checked_without_reading_the_record(
    service: Service, simulator: Simulator, store: Bucket
) -> None:
    request_id = await pending_request(service, simulator)
    wrong = payload(info_id="mallory@example.com")
    status, answer = await post(service, request_id, wrong)
    assert status == 422 and "subject" in answer["error"]
    status, spent = await delivery_cost(service, service.callback_url(request_id), wrong)
    assert status == 422 and spent == {"s3:put_object": 1}  # its quarantine copy only
    upper = payload(info_id=EMAIL.upper())
    assert await s3_spent(service, request_id, upper) == {"s3:put_object": 1}
    assert await store.read(archive_key(request_id)) == upper
