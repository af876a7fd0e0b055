"""Retention: everything of a request is deleted once its package is older than
RETENTION_DAYS, and nothing of a request that is not due is ever touched."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from ulid import ULID

from service.answer.retention import Retention
from service.clock import FixedClock, isoformat, parse_isoformat, utcnow
from service.collect.housekeeping import Housekeeping
from service.logs import subject_digest
from service.metrics import Metrics
from service.requests.deadline_index import DeadlineIndex
from service.requests.ledger import Ledger
from service.requests.migrations import Migrations
from service.requests.records import AccessRequest, DataRequest, Package, Status
from service.requests.schedule import Schedule
from service.storage.keys import Keys
from service.storage.s3 import ArchiveStore, s3_client
from tests.conftest import Bucket, Service, ServiceFactory, Simulator, make_settings
from tests.support import (
    archive_key,
    eventually,
    filed,
    metric,
    record_of,
    snapshot,
    wait_for_status,
    wait_until_packaged,
)

# On moto and on SeaweedFS (tests/conftest.py): the test ids say which.
# Over ~20 s in all: left out of the quick subset, `pytest -m "not slow"`.
pytestmark = [pytest.mark.both_stores, pytest.mark.slow]

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


# -- deleted means deleted: every version, and requests that ended without a package --------


async def versions_of(store: Bucket, request_id: str) -> dict[tuple[str, str], tuple]:
    """Every version and delete marker in the bucket whose key names the request, with its
    bytes: (key, version id) -> (latest, delete marker, bytes or None). The poll schedule's
    markers (`due/`, empty, named by request id and time) are left out: retention does not
    look for them (docs/answering.md#retention)."""
    found: dict[tuple[str, str], tuple] = {}
    pages = store.client.get_paginator("list_object_versions").paginate(Bucket=store.name)
    async for page in pages:
        for item in page.get("Versions", []) + page.get("DeleteMarkers", []):
            key = item["Key"]
            if request_id not in key or "/due/" in key:
                continue
            body = None
            if "Size" in item:  # a version, not a delete marker
                answer = await store.client.get_object(
                    Bucket=store.name, Key=key, VersionId=item["VersionId"]
                )
                async with answer["Body"] as stream:
                    body = bytes(await stream.read())
            found[(key, item["VersionId"])] = (item["IsLatest"], "Size" not in item, body)
    return found


async def all_versions(store: Bucket, under: str) -> list[tuple[str, str]]:
    answer = await store.client.list_object_versions(Bucket=store.name, Prefix=store.prefix + under)
    return [
        (item["Key"], item["VersionId"])
        for item in answer.get("Versions", []) + answer.get("DeleteMarkers", [])
    ]


def only_tombstone_and_record(
    found: dict[tuple[str, str], tuple], request_id: str, *, null_markers: bool = False
) -> None:
    """What a purge leaves of a request: the archive's empty tombstone and the scrubbed record,
    each one current version; not one other version, delete marker or object (`null_markers`:
    but for `null` delete markers, which SeaweedFS 4.48 does not delete in a suspended bucket;
    they hold no bytes)."""
    if null_markers:
        found = {k: v for k, v in found.items() if not (k[1] == "null" and v[1])}
    assert sorted((key, latest, marker) for (key, _), (latest, marker, _) in found.items()) == [
        (archive_key(request_id), True, False),
        (f"copernica/requests/{request_id}.json", True, False),
    ]
    assert found[next(k for k in found if k[0] == archive_key(request_id))][2] == b""


async def versioning(store: Bucket, status: str) -> None:
    await store.client.put_bucket_versioning(
        Bucket=store.name, VersioningConfiguration={"Status": status}
    )


@contextlib.asynccontextmanager
async def sweeper(bucket: str, s3_endpoint: str) -> AsyncIterator[ArchiveStore]:
    """A replica's store for a sweep of the test's own (its Retention on a FixedClock)."""
    settings = make_settings(ARCHIVE_BUCKET=bucket, S3_ENDPOINT_URL=s3_endpoint)
    async with s3_client(settings) as s3:
        yield ArchiveStore(s3, settings, Metrics())


async def built_later(store: Bucket, request_id: str, built: datetime) -> None:
    """The request's package as if built at `built` (its record written as an operator
    would, with a plain PUT)."""
    record = await record_of(store, request_id)
    record["package"]["built_at"] = isoformat(built)
    record["version"] += 1
    await store.client.put_object(
        Bucket=store.name,
        Key=f"copernica/requests/{request_id}.json",
        Body=json.dumps(record).encode(),
    )


async def download(service: Service, store: Bucket, request_id: str) -> None:
    """The operator downloads the package: `answered_at` (written beside the download), and
    the deadline marker goes."""
    async with service.http.get(
        f"{service.admin_url}/v1/data-requests/{request_id}/package", headers=service.auth
    ) as answer:
        assert answer.status == 200
        await answer.read()
    await eventually(lambda: record_of(store, request_id), lambda r: r["answered_at"] is not None)
    await eventually(
        lambda: store.keys("deadlines/"), lambda keys: not any(request_id in k for k in keys)
    )


async def test_versioned_bucket_a_due_request_loses_every_version_a_young_one_none(
    make_service: ServiceFactory, store: Bucket, s3_endpoint: str, bucket: str
) -> None:
    """Versioning on from the start: every write of the record left a version holding the
    address. The purge leaves the tombstone's and the scrubbed record's current versions and
    nothing else; the request not yet due keeps every version, byte for byte."""
    await versioning(store, "Enabled")
    service = await make_service(**FAST)
    # The start-up check saw the versioning.
    assert (
        await metric(service, "receiver_bucket_versioning", receiver_bucket_versioning="enabled")
        == 1
    )
    due = await filed(service, {"email": "vera@example.com"}, **{"Idempotency-Key": "v-1"})
    async with service.http.post(service.callback_url(due["id"]), data=b"{broken") as answer:
        assert answer.status == 422  # a quarantined body: the request's too
    young = await filed(service, {"email": "walt@example.com"})
    built = parse_isoformat((await wait_until_packaged(service, due["id"]))["package"]["built_at"])
    await wait_until_packaged(service, young["id"])
    await download(service, store, due["id"])  # the deadline marker: a version and a delete marker
    await built_later(store, young["id"], built + timedelta(minutes=1))
    before = await versions_of(store, due["id"])
    # The test can fail: earlier versions of the record hold the address, and there are
    # delete markers (the answered deadline marker).
    assert any(
        not latest and b"vera@example.com" in (body or b"") for latest, _, body in before.values()
    )
    assert any(marker for _, marker, _ in before.values())
    assert await all_versions(store, "idempotency/")
    young_before = await versions_of(store, young["id"])

    async with sweeper(bucket, s3_endpoint) as archive:
        clock = FixedClock(built + timedelta(days=1, seconds=1))
        assert await retention_of(archive, 1.0, clock).sweep() == 1

    after = await versions_of(store, due["id"])
    only_tombstone_and_record(after, due["id"])
    assert await all_versions(store, "idempotency/") == []
    purged = next(body for (key, _), (_, _, body) in after.items() if "/requests/" in key)
    assert purged is not None and b"vera@example.com" not in purged
    assert json.loads(purged)["status"] == "purged"
    assert await versions_of(store, young["id"]) == young_before


async def test_failed_and_expired_requests_are_purged_after_retention_not_before(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket, s3_endpoint: str, bucket: str
) -> None:
    """Requests that end without a package are purged RETENTION_DAYS after they ended
    (`ended_at`), found through their retention marker; a microsecond before, every version of
    everything of theirs stays as it was."""
    await versioning(store, "Enabled")
    service = await make_service(**FAST, REQUEST_EXPIRY_HOURS="0.0003")  # about one second
    simulator.state.faults.reject_create = True
    failed = await filed(service, {"email": "xena@example.com"})
    assert failed["status"] == "failed"
    simulator.state.faults.reject_create = False
    simulator.state.config.ready_after = 3600
    expired = await filed(service, {"email": "yuri@example.com"}, **{"Idempotency-Key": "y-1"})
    await wait_for_status(service, expired["id"], "expired")
    ends = {}
    for request in (failed, expired):
        record = await record_of(store, request["id"])
        assert record["ended_at"]
        ends[request["id"]] = parse_isoformat(record["ended_at"])
    assert len(await store.keys("retention/")) == 2

    async with sweeper(bucket, s3_endpoint) as archive:
        for request_id, ended in sorted(ends.items(), key=lambda item: item[1]):
            everything = {i: await versions_of(store, i) for i in ends}
            clock = FixedClock(ended + timedelta(days=2) - timedelta(microseconds=1))
            retention = retention_of(archive, 2.0, clock)
            assert await retention.sweep() == 0
            assert {i: await versions_of(store, i) for i in ends} == everything
            clock.advance(timedelta(microseconds=1))
            assert await retention.sweep() == 1
            only_tombstone_and_record(await versions_of(store, request_id), request_id)
            # The other one (purged already, or not due yet) is as it was, every version.
            for other in set(ends) - {request_id}:
                assert await versions_of(store, other) == everything[other]

    assert await all_versions(store, "retention/") == []
    assert await all_versions(store, "idempotency/") == []
    for request_id, address in ((failed["id"], b"xena@"), (expired["id"], b"yuri@")):
        raw = await store.read(f"copernica/requests/{request_id}.json")
        assert address not in raw
        purged = json.loads(raw)
        assert purged["status"] == "purged" and purged["purged_at"] and purged["ended_at"]
        assert purged["received_on"] and len(purged["data_requests"]) == 1
        assert purged["data_requests"][0]["subject_id"].startswith("hmac-sha256:")
        assert (await service.show(request_id))["status"] == "purged"


async def extend(service: Service, request_id: str, reason: str) -> None:
    async with service.http.post(
        f"{service.admin_url}/v1/data-requests/{request_id}/extend",
        headers=service.auth,
        json={"months": 1, "reason": reason},
    ) as answer:
        assert answer.status == 200


async def test_versioning_switched_on_after_data_exists(
    make_service: ServiceFactory, store: Bucket, s3_endpoint: str, bucket: str
) -> None:
    """Objects written before versioning was switched on are `null` versions, and writes
    since leave them behind as noncurrent ones: the purge deletes them all. An extension's
    reason (free text naming the subject) does not outlive it either."""
    service = await make_service(**FAST)
    assert (
        await metric(service, "receiver_bucket_versioning", receiver_bucket_versioning="off") == 1
    )
    due = await filed(service, {"email": "zoe@example.com"})
    young = await filed(service, {"email": "abe@example.com"})
    built = parse_isoformat((await wait_until_packaged(service, due["id"]))["package"]["built_at"])
    await wait_until_packaged(service, young["id"])
    await built_later(store, young["id"], built + timedelta(minutes=1))
    await versioning(store, "Enabled")
    await extend(service, due["id"], "zoe@example.com asked about three databases")
    await download(service, store, due["id"])
    before = await versions_of(store, due["id"])
    assert any(version == "null" and not latest for (_, version), (latest, _, _) in before.items())
    young_before = await versions_of(store, young["id"])

    async with sweeper(bucket, s3_endpoint) as archive:
        clock = FixedClock(built + timedelta(days=1, seconds=1))
        assert await retention_of(archive, 1.0, clock).sweep() == 1
        assert archive.versioning == "Enabled"

    only_tombstone_and_record(await versions_of(store, due["id"]), due["id"])
    raw = await store.read(f"copernica/requests/{due['id']}.json")
    assert b"zoe@example.com" not in raw
    assert json.loads(raw)["extension"]["months"] == 1
    assert await versions_of(store, young["id"]) == young_before


async def test_suspended_versioning_keeps_old_versions_and_the_purge_deletes_them(
    make_service: ServiceFactory, store: Bucket, s3_endpoint: str, bucket: str, store_kind: str
) -> None:
    """A bucket whose versioning was enabled, then suspended, keeps the versions written
    while it was enabled; writes since are `null` versions. The purge deletes them all."""
    if store_kind == "moto":
        pytest.skip(
            "moto 5.2.6 does not keep versions in a suspended bucket (a PUT or DELETE drops "
            "every version of the key) and answers 500 to a DELETE by version id of a key "
            "whose current version is a delete marker"
        )
    await versioning(store, "Enabled")
    service = await make_service(**FAST)
    due = await filed(service, {"email": "ida@example.com"})
    built = parse_isoformat((await wait_until_packaged(service, due["id"]))["package"]["built_at"])
    await extend(service, due["id"], "more time")
    await versioning(store, "Suspended")
    # SeaweedFS 4.48 answers 412 to If-Match on a key whose current version was written
    # while versioning was enabled (docs/answering.md#retention): a plain write of the same
    # record makes its current version a `null` one, and the service can update it again.
    key = f"copernica/requests/{due['id']}.json"
    await store.client.put_object(Bucket=store.name, Key=key, Body=await store.read(key))
    await download(service, store, due["id"])
    before = await versions_of(store, due["id"])
    assert sum(not latest for latest, _, _ in before.values()) >= 5

    async with sweeper(bucket, s3_endpoint) as archive:
        clock = FixedClock(built + timedelta(days=1, seconds=1))
        assert await retention_of(archive, 1.0, clock).sweep() == 1
        assert archive.versioning == "Suspended"

    only_tombstone_and_record(await versions_of(store, due["id"]), due["id"], null_markers=True)
    assert b"ida@example.com" not in await store.read(key)


# -- what an earlier release left, and a request's sources ------------------------------------

FIXTURES = Path(__file__).parent / "fixtures" / "records"


@contextlib.asynccontextmanager
async def holder(
    bucket: str, s3_endpoint: str, days: float, clock: FixedClock
) -> AsyncIterator[Housekeeping]:
    """A replica's housekeeping (lease, census, janitor, migrations, retention) on `clock`."""
    settings = make_settings(ARCHIVE_BUCKET=bucket, S3_ENDPOINT_URL=s3_endpoint)
    async with s3_client(settings) as s3:
        archive = ArchiveStore(s3, settings, Metrics())
        ledger = Ledger(archive, KEY, clock=clock)
        deadlines, schedule = DeadlineIndex(archive, ledger, clock), Schedule(archive, clock)
        yield Housekeeping(
            archive,
            schedule,
            deadlines,
            Migrations(archive, ledger, deadlines, schedule, clock),
            retention_of(archive, days, clock),
            settings,
            Metrics(),
            clock,
        )


async def test_requests_ended_under_the_earlier_release_get_their_marker_and_are_purged(
    store: Bucket, s3_endpoint: str, bucket: str
) -> None:
    """Flat records of the release before `ended_at` and retention markers: the lease
    holder's migration gives a failed and an expired one their marker (the day of their last
    write) and `ended_at`, leaves a pending one alone, and retention purges each when due."""
    await versioning(store, "Enabled")
    raw = {n: json.loads((FIXTURES / f"{n}.json").read_bytes()) for n in ("failed", "expired")}
    raw["expired"]["updated_at"] = "2026-12-02T00:00:00.000000Z"  # due a day after `failed`
    ids = {n: r["id"] for n, r in raw.items()}
    bodies = {n: json.dumps(r).encode() for n, r in raw.items()}
    bodies["pending"] = (FIXTURES / "pending-profile-with-events.json").read_bytes()
    ids["pending"] = json.loads(bodies["pending"])["id"]
    for name, body in bodies.items():
        await store.client.put_object(
            Bucket=store.name, Key=f"copernica/requests/{ids[name]}.json", Body=body
        )
    pending_before = await versions_of(store, ids["pending"])

    clock = FixedClock(parse_isoformat("2026-12-03T00:00:00.000000Z"))
    async with holder(bucket, s3_endpoint, 3.0, clock) as housekeeping:
        for _ in range(3):  # the received-on backfill's page, then the markers', then none
            await housekeeping.round()
        assert await store.keys("migrations/") == [
            "copernica/migrations/received-on.done",
            "copernica/migrations/retention-markers.done",
        ]
        assert sorted(await store.keys("retention/")) == [
            f"copernica/retention/2026-12-01/{ids['failed']}",
            f"copernica/retention/2026-12-02/{ids['expired']}",
        ]
        for name in ("failed", "expired"):
            assert (await record_of(store, ids[name]))["ended_at"] == raw[name]["updated_at"]
        expired_before = await versions_of(store, ids["expired"])

        clock.moment = parse_isoformat(raw["failed"]["updated_at"]) + timedelta(days=3)
        await housekeeping.round()

    only_tombstone_and_record(await versions_of(store, ids["failed"]), ids["failed"])
    purged = await record_of(store, ids["failed"])
    assert purged["status"] == "purged" and purged["data_requests"][0]["subject_id"] != "555"
    assert await versions_of(store, ids["expired"]) == expired_before
    assert await versions_of(store, ids["pending"]) == pending_before


async def test_the_marker_migration_goes_on_where_another_replica_left_it(
    store: Bucket, s3_endpoint: str, bucket: str
) -> None:
    """A page at a time, its progress noted in S3: a replica that takes over housekeeping
    goes on after the last page done, not from the start; the note goes when all are done."""
    ids = []
    for name in ("failed", "expired"):
        body = (FIXTURES / f"{name}.json").read_bytes()
        ids.append(json.loads(body)["id"])
        await store.client.put_object(
            Bucket=bucket, Key=f"copernica/requests/{ids[-1]}.json", Body=body
        )
    horizon = utcnow()
    async with sweeper(bucket, s3_endpoint) as archive:
        one, other = (
            Migrations(archive, ledger, DeadlineIndex(archive, ledger), Schedule(archive))
            for ledger in (Ledger(archive, KEY), Ledger(archive, KEY))
        )
        assert await one.ended("", horizon, limit=1) == ids[0]
        assert await store.keys("migrations/") == ["copernica/migrations/retention-markers.json"]
        assert await other.ended("", horizon, limit=1) == ids[1]  # not ids[0] again
        assert await other.ended(ids[1], horizon, limit=1) is None
    assert await store.keys("migrations/") == ["copernica/migrations/retention-markers.done"]
    assert len(await store.keys("retention/")) == 2


async def test_a_purged_requests_sources_go_every_version_and_uploads_to_them_stop(
    store: Bucket, s3_endpoint: str, bucket: str
) -> None:
    """A request owns what discovery found under `sources/{id}/`: its purge deletes all of
    it, every version, but for an empty tombstone at each discovered source's data key (a
    late callback's `If-None-Match: *` then stores nothing, as for the archive). The janitor
    aborts uploads there (the key exists, or the request is purged) and leaves those of a
    request in progress. Another request's sources are untouched."""
    await versioning(store, "Enabled")
    built = utcnow()  # S3's LastModified preselects packages: the clock runs a day ahead
    due, young = str(ULID.from_datetime(built)), str(ULID.from_datetime(built))
    keys = Keys("copernica/")
    profile = subject_digest(KEY, "profile", "101")  # the discovered source's folder
    for request_id, at in ((due, built), (young, built + timedelta(hours=1))):
        record = AccessRequest.new(
            request_id,
            DataRequest("email", f"{request_id[-4:].lower()}@example.com", Status.ARCHIVED),
            created_at=isoformat(at),
            updated_at=isoformat(at),
        )
        record.add_source(DataRequest("profile", "101", Status.ARCHIVED, copernica_id="7"))
        record.mark_packaged(Package(keys.package(request_id), "0" * 64, 2, isoformat(at)))
        first = subject_digest(KEY, "email", record.first.subject_id)
        objects = {
            keys.source_details(request_id, first): b"{}",
            keys.source_data(request_id, profile): b'{"data": 1}',
            keys.source_details(request_id, profile): b"{}",
            keys.source_events(request_id, profile, "2026-11-01"): b"{}\n",
            keys.record(request_id): record.to_bytes(),
            keys.package(request_id): b"PK",
        }
        for key, body in objects.items():
            for _ in range(2):  # two versions of each
                await store.client.put_object(Bucket=bucket, Key=key, Body=body)
        for key in (
            keys.source_data(request_id, profile),
            keys.source_events(request_id, profile, "2026-11-02"),
        ):
            await store.client.create_multipart_upload(Bucket=bucket, Key=key)
    young_before = await all_versions(store, f"sources/{young}/")
    uploads = [keys.source_events(young, profile, "2026-11-02")]  # in progress: stays

    clock = FixedClock(built + timedelta(days=1))
    async with holder(bucket, s3_endpoint, 1.0, clock) as housekeeping:
        await housekeeping.round()  # janitor: the data keys exist; then retention's purge
        waiting = [u["Key"] for u in await store.uploads()]
        assert sorted(waiting) == sorted([*uploads, keys.source_events(due, profile, "2026-11-02")])
        await housekeeping.round()  # the janitor again: the request is purged now
    assert [u["Key"] for u in await store.uploads()] == uploads

    left = await versions_of(store, f"sources/{due}/")
    tombstone = keys.source_data(due, profile)
    assert [(k, latest, body) for (k, _), (latest, _, body) in left.items()] == [
        (tombstone, True, b"")
    ]
    assert (await store.head(tombstone))["Metadata"] == {"purged": "true"}
    assert (await record_of(store, due))["status"] == "purged"
    assert await all_versions(store, f"sources/{young}/") == young_before
