"""Retention: everything of a request is deleted once its package is older than
RETENTION_DAYS, and nothing of a request that is not due is ever touched."""

from __future__ import annotations

import json
from datetime import timedelta

from service.answer.retention import Retention
from service.clock import FixedClock, isoformat, parse_isoformat, utcnow
from service.metrics import Metrics
from service.requests.deadline_index import DeadlineIndex
from service.requests.ledger import Ledger
from service.storage.s3 import ArchiveStore, s3_client
from tests.conftest import Bucket, ServiceFactory, Simulator, make_settings
from tests.support import (
    archive_key,
    eventually,
    filed,
    metric,
    record_of,
    snapshot,
    wait_until_packaged,
)

FAST = {"POLL_INTERVAL_SECONDS": "0.2", "POLL_LEASE_SECONDS": "5"}
KEY = b"k" * 32


def retention_of(archive: ArchiveStore, days: float, clock: FixedClock) -> Retention:
    """A replica's Retention on its own ledger and deadline index, on `clock`."""
    ledger = Ledger(archive, KEY, clock=clock)
    return Retention(
        archive, ledger, DeadlineIndex(archive, ledger, clock), days, Metrics(), KEY, clock
    )


async def everything_of(store: Bucket, request_id: str) -> dict[str, bytes]:
    """Every object of a request but its record and poll marker (which change)."""
    found = await snapshot(store, request_id)
    return {k: v for k, v in found.items() if "/requests/" not in k and "/due/" not in k}


async def test_only_due_requests_are_purged(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket, s3_endpoint: str, bucket: str
) -> None:
    """Three requests: one packaged long enough ago, one packaged but not yet due, one with
    no package. A sweep at a moment between the first two deadlines purges the first only."""
    service = await make_service(**FAST)  # RETENTION_DAYS=0: the service itself never purges
    simulator.state.faults.lose_callback = True  # the poller fetches the data instead
    due = await filed(service, {"email": "mo@example.com"}, **{"Idempotency-Key": "k-1"})
    # A rejected body in quarantine belongs to the due request too.
    async with service.http.post(service.callback_url(due["id"]), data=b"{broken") as answer:
        assert answer.status == 422
    assert await store.keys(f"quarantine/{due['id']}/")
    young = await filed(service, {"email": "ned@example.com"})
    due_package = (await wait_until_packaged(service, due["id"]))["package"]
    young_package = (await wait_until_packaged(service, young["id"]))["package"]
    simulator.state.config.ready_after = 3600
    unpackaged = await filed(service, {"email": "oz@example.com"})
    unpackaged_before = await everything_of(store, unpackaged["id"])
    assert await store.keys("idempotency/")

    # Keep one day; sweep as if a day and a second had passed since the first package, with
    # the young one's package built later than that (its built_at moved a minute on).
    built = parse_isoformat(due_package["built_at"])
    record = await record_of(store, young["id"])
    record["package"]["built_at"] = (built + timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    record["version"] += 1
    await store.client.put_object(
        Bucket=store.name,
        Key=f"copernica/requests/{young['id']}.json",
        Body=json.dumps(record).encode(),
    )
    young_before = await snapshot(store, young["id"])
    settings = make_settings(ARCHIVE_BUCKET=bucket, S3_ENDPOINT_URL=s3_endpoint)
    async with s3_client(settings) as s3:
        archive = ArchiveStore(s3, settings, Metrics())
        clock = FixedClock(built + timedelta(days=1) - timedelta(seconds=1))
        retention = retention_of(archive, 1.0, clock)
        # Before the day is over nothing at all is purged.
        assert await retention.sweep() == 0
        clock.advance(timedelta(seconds=2))
        assert await retention.sweep() == 1
        # A second sweep finds nothing more to do.
        clock.advance(timedelta(seconds=1))
        assert await retention.sweep() == 0

    # Nothing of the request is left but an empty tombstone at its archive key.
    assert await everything_of(store, due["id"]) == {archive_key(due["id"]): b""}
    assert await store.keys("idempotency/") == []
    purged = await record_of(store, due["id"])
    assert purged["status"] == "purged" and purged["purged_at"]
    assert purged["data_requests"][0]["subject_id"].startswith("hmac-sha256:")
    assert "mo@example.com" not in json.dumps(purged)
    assert purged["package"]["sha256"] == due_package["sha256"]  # the facts stay
    assert await snapshot(store, young["id"]) == young_before
    assert young_package["key"] in young_before
    assert await everything_of(store, unpackaged["id"]) == unpackaged_before
    assert (await record_of(store, unpackaged["id"]))["data_requests"][0][
        "subject_id"
    ] == "oz@example.com"

    shown = await service.show(due["id"])
    assert shown["status"] == "purged"
    async with service.http.get(
        f"{service.admin_url}/v1/data-requests/{due['id']}/package", headers=service.auth
    ) as answer:
        assert answer.status == 410

    # Copernica delivers the callback once more, late: its address needs no record, but the
    # tombstone holds the key, so the data is not stored again.
    report = next(
        r.report for r in simulator.state.requests.values() if due["id"] in (r.report or "")
    )
    body = simulator.state.payload_bytes(shown["copernica_id"])
    async with service.http.post(str(report), data=body) as answer:
        assert answer.status == 200
    assert await everything_of(store, due["id"]) == {archive_key(due["id"]): b""}


async def test_a_request_is_purged_when_the_clock_reaches_its_due_time_not_before(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket, s3_endpoint: str, bucket: str
) -> None:
    """Time is the clock's: a sweep a microsecond before `built_at` + RETENTION_DAYS keeps
    everything, one at that very moment purges, and the record carries the clock's time."""
    service = await make_service(**FAST)  # RETENTION_DAYS=0: the service itself never purges
    simulator.state.faults.lose_callback = True
    created = await filed(service, {"email": "rae@example.com"})
    package = (await wait_until_packaged(service, created["id"]))["package"]
    before = await everything_of(store, created["id"])
    due_at = parse_isoformat(package["built_at"]) + timedelta(days=1)
    settings = make_settings(ARCHIVE_BUCKET=bucket, S3_ENDPOINT_URL=s3_endpoint)
    async with s3_client(settings) as s3:
        archive = ArchiveStore(s3, settings, Metrics())
        clock = FixedClock(due_at - timedelta(microseconds=1))
        retention = retention_of(archive, 1.0, clock)

        assert await retention.sweep() == 0
        assert await everything_of(store, created["id"]) == before
        assert (await record_of(store, created["id"]))["status"] == "archived"
        clock.advance(timedelta(microseconds=1))
        assert await retention.sweep() == 1

    purged = await record_of(store, created["id"])
    assert purged["status"] == "purged"
    assert purged["purged_at"] == purged["updated_at"] == isoformat(due_at)
    assert await everything_of(store, created["id"]) == {archive_key(created["id"]): b""}


async def test_retention_zero_keeps_everything(
    make_service: ServiceFactory, store: Bucket, s3_endpoint: str, bucket: str
) -> None:
    service = await make_service(**FAST)
    created = await filed(service, {"profile": 8})
    await wait_until_packaged(service, created["id"])
    before = await snapshot(store, created["id"])
    settings = make_settings(ARCHIVE_BUCKET=bucket, S3_ENDPOINT_URL=s3_endpoint)
    async with s3_client(settings) as s3:
        archive = ArchiveStore(s3, settings, Metrics())
        retention = retention_of(archive, 0, FixedClock(utcnow() + timedelta(days=3650)))
        assert await retention.sweep() == 0
    assert await snapshot(store, created["id"]) == before


async def test_the_service_purges_on_its_own_after_retention(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    # A retention of about two seconds; the poller's housekeeping sweeps.
    service = await make_service(**FAST, RETENTION_DAYS="0.00002")
    simulator.state.faults.lose_callback = True
    simulator.state.config.ready_after = 3600
    waiting = await filed(service, {"email": "pat@example.com"})
    simulator.state.faults.lose_callback = False
    simulator.state.config.ready_after = 0.05
    created = await filed(service, {"email": "quinn@example.com"})
    waiting_before = await everything_of(store, waiting["id"])

    shown = await eventually(
        lambda: service.show(created["id"]), lambda s: s["status"] == "purged", timeout=30
    )

    assert shown["purged_at"] and shown["package"]
    assert await everything_of(store, created["id"]) == {archive_key(created["id"]): b""}
    assert await metric(service, "receiver_purged_total") == 1
    # The request without a package is untouched.
    assert await everything_of(store, waiting["id"]) == waiting_before
    assert (await record_of(store, waiting["id"]))["data_requests"][0][
        "subject_id"
    ] == "pat@example.com"
