"""The callback address: the subject's keyed digest and a token in the path, so accepting a
callback takes one S3 call on every replica. (Addresses of the earlier form, which stay valid:
test_callback_urls_earlier.py.)"""

from __future__ import annotations

from service.config import Secret
from service.intake.urls import callback_url, token_valid
from tests.conftest import CALLBACK_SECRET, Bucket, Service, ServiceFactory, Simulator
from tests.support import EMAIL, archive_key, delivery_cost, filed, payload, pending_request

SECRET = Secret(CALLBACK_SECRET)


def test_the_token_covers_the_id_and_the_subject() -> None:
    request_id, subject = "01JC0000000000000000000000", "a" * 64
    url = callback_url("https://x.test", SECRET, request_id, subject)
    token = url.rsplit("/", 1)[1]
    assert url.startswith(f"https://x.test/callbacks/datarequest/{request_id}/{subject}/")
    assert token_valid(SECRET, request_id, token, subject)
    assert not token_valid(SECRET, request_id, token, "b" * 64)  # another subject
    assert not token_valid(SECRET, request_id, token)  # the earlier form's token differs
    assert not token_valid(SECRET, request_id, token, "A" * 64)  # not a hex digest
    assert not token_valid(Secret("other"), request_id, token, subject)


async def report_of(simulator: Simulator, request_id: str, store: Bucket) -> str:
    """The `report` address the service gave Copernica for the request."""
    record = [r for r in simulator.state.requests.values() if request_id in (r.report or "")]
    assert len(record) == 1
    return str(record[0].report)


async def test_the_tests_deliver_to_the_address_the_service_gave_copernica(
    service: Service, simulator: Simulator, store: Bucket
) -> None:
    """`Service.callback_url` (what most tests deliver to) is the report address itself."""
    simulator.state.faults.lose_callback = True
    for body in ({"email": f" {EMAIL} "}, {"profile": "0042"}, {"subprofile": 7}):
        request_id = str((await filed(service, body))["id"])
        assert service.callback_url(request_id) == await report_of(simulator, request_id, store)


async def test_a_callback_costs_one_write_on_a_replica_that_never_saw_the_request(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    filer, other = await make_service(), await make_service()
    request_id = await pending_request(filer, simulator)
    report = await report_of(simulator, request_id, store)
    assert EMAIL.lower() not in report.lower() and "@" not in report
    url = report.replace(filer.url, other.url)

    status, spent = await delivery_cost(other, url, payload())

    assert status == 200
    assert spent == {"s3:put_object": 1}  # no record read: the URL carries the subject
    assert await store.read(archive_key(request_id)) == payload()
    # A repeat delivery streams again and ends in a refused conditional write: still 200,
    # still one object, and still one S3 call.
    status, spent = await delivery_cost(other, url, payload())
    assert status == 200 and spent == {"s3:put_object": 1}
    assert await store.keys("archive/") == [archive_key(request_id)]


async def test_the_body_is_checked_against_the_subject_in_the_url(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    service = await make_service()
    request_id = await pending_request(service, simulator)
    report = await report_of(simulator, request_id, store)

    async with service.http.post(report, data=payload(info_id="mallory@example.com")) as answer:
        assert answer.status == 422
    async with service.http.post(report, data=payload(info_id=EMAIL, kind="profile")) as answer:
        assert answer.status == 422  # the digest covers the subject's type too
    assert await store.keys("archive/") == []
    assert await store.keys(f"quarantine/{request_id}/")
    async with service.http.post(report, data=payload(info_id=EMAIL.upper())) as answer:
        assert answer.status == 200  # an e-mail address compared case-insensitively


async def test_a_tampered_subject_or_token_is_404_before_the_body_is_read(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    service = await make_service()
    request_id = await pending_request(service, simulator)
    report = await report_of(simulator, request_id, store)
    base, subject, token = report.rsplit("/", 2)
    other_subject = ("0" if subject[0] != "0" else "1") + subject[1:]
    for url in (f"{base}/{other_subject}/{token}", f"{base}/{subject}/{token[:-1]}x"):
        async with service.http.post(url, data=payload()) as answer:
            assert answer.status == 404
    assert await store.keys("archive/") == []
