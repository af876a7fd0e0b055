"""Callback addresses of the earlier form, `/callbacks/datarequest/{id}/{token}` (a token of
the id alone, no subject digest): what requests filed before the current form were given.
They stay valid: accepted, a wrong token refused before the body is read, the subject checked
against the request's record, read once (then remembered by the replica). Every other test
delivers to the current form (`Service.callback_url`; test_callback_urls.py)."""

from __future__ import annotations

import pytest
from ulid import ULID

from service.config import Secret
from service.intake.urls import callback_url
from tests.conftest import CALLBACK_SECRET, Bucket, Service, ServiceFactory, Simulator
from tests.support import (
    EMAIL,
    MIB,
    archive_key,
    delivery_cost,
    payload,
    pending_request,
    raw_exchange,
)

SECRET = Secret(CALLBACK_SECRET)


def earlier(service: Service, request_id: str) -> str:
    """The earlier form of the request's callback address, on `service`."""
    return callback_url(service.url, SECRET, request_id)


async def test_an_address_of_the_earlier_form_stays_valid(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    filer, other = await make_service(), await make_service()
    request_id = await pending_request(filer, simulator)

    status, spent = await delivery_cost(other, earlier(other, request_id), payload())

    assert status == 200
    assert spent == {"s3:get_object": 1, "s3:put_object": 1}  # the subject from the record
    assert await store.read(archive_key(request_id)) == payload()
    meta = (await store.head(archive_key(request_id)))["Metadata"]
    assert meta["copernica-id"] == (await filer.show(request_id))["copernica_id"]
    another = await pending_request(filer, simulator)
    async with other.http.post(
        earlier(other, another), data=payload(info_id="mallory@example.com")
    ) as answer:
        assert answer.status == 422


@pytest.mark.parametrize("token", ["wrong", "A" * 43, ""])
async def test_wrong_token_is_404_before_the_body_is_read(
    service: Service, simulator: Simulator, store: Bucket, token: str
) -> None:
    request_id = await pending_request(service, simulator)
    before = await store.keys()
    path = f"/callbacks/datarequest/{request_id}/{token}"

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
        f"POST /callbacks/datarequest/{request_id}/nope HTTP/1.1\r\nHost: x\r\n"
        f"Content-Length: 10\r\nExpect: 100-continue\r\n\r\n".encode(),
    )
    assert answer.startswith(b"HTTP/1.1 404")


async def test_token_of_another_request_is_refused(
    service: Service, simulator: Simulator, store: Bucket
) -> None:
    first = await pending_request(service, simulator)
    second = await pending_request(service, simulator)
    stolen = earlier(service, first).rsplit("/", 1)[1]

    async with service.http.post(
        f"{service.url}/callbacks/datarequest/{second}/{stolen}", data=payload()
    ) as answer:
        assert answer.status == 404
    assert await store.keys("archive/") == []


async def test_valid_token_for_unknown_request_is_404(service: Service, store: Bucket) -> None:
    # Only the earlier form looks the request up: a current-form token names a subject too.
    async with service.http.post(earlier(service, str(ULID())), data=payload()) as answer:
        assert answer.status == 404
    assert await store.keys() == []


async def test_an_accepted_callback_costs_one_write_on_the_replica_that_filed_it(
    service: Service, simulator: Simulator, store: Bucket
) -> None:
    request_id = await pending_request(service, simulator)
    url = earlier(service, request_id)
    assert await delivery_cost(service, url, payload()) == (200, {"s3:put_object": 1})
    assert await store.read(archive_key(request_id)) == payload()
    # A repeat delivery to the same replica: answered from memory, no S3 call at all.
    assert await delivery_cost(service, url, payload()) == (200, {})


async def test_an_accepted_callback_costs_one_read_and_one_write_on_another_replica(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    filer, other = await make_service(), await make_service()
    request_id = await pending_request(filer, simulator)
    spent = await delivery_cost(other, earlier(other, request_id), payload())
    assert spent == (200, {"s3:get_object": 1, "s3:put_object": 1})
    assert await store.read(archive_key(request_id)) == payload()
    # The replica that filed it does not know it was archived: its write is refused by
    # S3 (If-None-Match), and it answers 200 all the same, with one object in the bucket.
    spent = await delivery_cost(filer, earlier(filer, request_id), payload())
    assert spent == (200, {"s3:put_object": 1})
    assert await store.keys("archive/") == [archive_key(request_id)]


async def test_a_remembered_request_is_still_checked_for_its_subject(
    service: Service, simulator: Simulator, store: Bucket
) -> None:
    request_id = await pending_request(service, simulator)
    url = earlier(service, request_id)
    async with service.http.post(url, data=payload(info_id="mallory@example.com")) as answer:
        assert answer.status == 422 and "subject" in (await answer.json())["error"]
    upper = payload(info_id=EMAIL.upper())
    assert await delivery_cost(service, url, upper) == (200, {"s3:put_object": 1})
    assert await store.read(archive_key(request_id)) == upper
