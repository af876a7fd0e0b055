"""The polling fallback: whatever happens to callbacks, every request ends archived once."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from service.app import POLLER
from tests.conftest import Bucket, Service, ServiceFactory, Simulator, metric_counts, sha256
from tests.test_api import wait_for_status
from tests.test_callbacks import archive_key

FAST = {"POLL_INTERVAL_SECONDS": "0.3", "POLL_LEASE_SECONDS": "5"}


async def file(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    async with await service.file(body) as answer:
        assert answer.status == 202, await answer.text()
        return dict(await answer.json())


async def record_of(store: Bucket, request_id: str) -> dict[str, Any]:
    return dict(json.loads(await store.read(f"copernica/requests/{request_id}.json")))


@pytest.mark.parametrize("forms", [{"status", "data", "old"}, {"data", "old"}, {"old"}])
async def test_lost_callback_is_archived_by_the_poller(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket, forms: set[str]
) -> None:
    simulator.state.config.readiness_forms = forms
    simulator.state.faults.lose_callback = True
    service = await make_service(**FAST)
    created = await file(service, {"email": "ivy@example.com"})

    shown = await wait_for_status(service, created["id"], "archived")

    expected = simulator.state.payload_bytes(created["copernica_id"])
    assert shown["status"] == "archived"
    assert shown["archive"]["source"] == "poll"
    assert shown["archive"]["sha256"] == sha256(expected)
    assert await store.read(archive_key(created["id"])) == expected
    assert await store.keys("archive/") == [archive_key(created["id"])]
    # A final request leaves no schedule behind (the marker goes right after the record).
    for _ in range(50):
        if not await store.keys("due/"):
            break
        await asyncio.sleep(0.1)
    assert await store.keys("due/") == []


async def test_callback_and_poller_racing_make_one_object(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    simulator.state.faults.duplicate_callback = 3
    service = await make_service(POLL_INTERVAL_SECONDS="0.05", POLL_LEASE_SECONDS="5")
    created = [await file(service, {"profile": n}) for n in range(1, 6)]

    for item in created:
        await wait_for_status(service, item["id"], "archived")
    await asyncio.sleep(0.5)  # let stragglers (duplicates, polls) land

    keys = await store.keys("archive/")
    assert sorted(keys) == sorted(archive_key(item["id"]) for item in created)
    for item in created:
        expected = simulator.state.payload_bytes(item["copernica_id"])
        assert await store.read(archive_key(item["id"])) == expected


async def test_data_gone_at_copernica_marks_failed(
    make_service: ServiceFactory, simulator: Simulator
) -> None:
    simulator.state.faults.lose_callback = True
    simulator.state.config.expire_after = 0.01
    service = await make_service(**FAST)
    created = await file(service, {"email": "jo@example.com"})

    shown = await wait_for_status(service, created["id"], "failed")

    assert shown["status"] == "failed"
    assert "gone" in shown["last_error"]


async def test_never_ready_request_expires(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    simulator.state.config.ready_after = 3600
    service = await make_service(REQUEST_EXPIRY_HOURS="0.0003", **FAST)  # about one second
    created = await file(service, {"email": "kim@example.com"})

    shown = await wait_for_status(service, created["id"], "expired")

    assert shown["status"] == "expired"
    assert await store.keys("archive/") == []


async def test_filing_during_copernica_outage_is_resubmitted_later(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    simulator.state.faults.fail_next = 3  # the three filing tries all get 503
    service = await make_service(**FAST)
    created = await file(service, {"email": "lee@example.com"})
    assert created["status"] == "submitting"

    shown = await wait_for_status(service, created["id"], "archived")

    assert shown["status"] == "archived"
    assert shown["attempts"] == 2
    assert len(simulator.state.requests) == 1


async def test_crash_after_copernica_accepted_is_recovered_without_a_second_archive(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    """A replica died after Copernica's 201 but before it saved `pending`: the record still
    says `submitting`. The poller files again; both of Copernica's callbacks carry our id, and
    the archive's conditional key keeps exactly one object."""
    service = await make_service(**FAST)
    simulator.state.config.ready_after = 3600  # the first request never gets ready
    created = await file(service, {"email": "max@example.com"})
    record_key = f"copernica/requests/{created['id']}.json"
    crashed = await record_of(store, created["id"])
    crashed.update(status="submitting", copernica_id=None, version=crashed["version"] + 1)
    await store.client.put_object(
        Bucket=store.name, Key=record_key, Body=json.dumps(crashed).encode()
    )
    simulator.state.config.ready_after = 0.05

    shown = await wait_for_status(service, created["id"], "archived")

    assert shown["status"] == "archived"
    assert len(simulator.state.requests) == 2  # the lost answer's request and the new one
    assert shown["copernica_id"] == "1001" and shown["attempts"] == 2
    assert await store.keys("archive/") == [archive_key(created["id"])]
    assert (await record_of(store, created["id"]))["extra"]["resubmitted"] == 1


async def test_copernica_429_and_503_are_backed_off_and_the_rate_limit_holds(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    simulator.state.faults.lose_callback = True
    service = await make_service(
        COPERNICA_MAX_RPS="20", POLL_INTERVAL_SECONDS="0.2", POLL_LEASE_SECONDS="5"
    )
    created = [await file(service, {"profile": n}) for n in range(1, 13)]
    simulator.state.faults.status_429_rate = 0.3
    simulator.state.faults.status_5xx_rate = 0.2

    for item in created:
        await wait_for_status(service, item["id"], "archived", timeout=30)

    assert sorted(await store.keys("archive/")) == sorted(archive_key(i["id"]) for i in created)
    assert simulator.state.max_rps <= 20


async def test_an_idle_tick_costs_one_listing_however_many_are_pending(
    make_service: ServiceFactory, simulator: Simulator
) -> None:
    simulator.state.config.ready_after = 3600
    service = await make_service(POLL_INTERVAL_SECONDS="600")  # nothing due for 10 minutes
    for n in range(60):
        await file(service, {"profile": n + 1})
    poller = service.app[POLLER]
    before = await metric_counts(service)

    visited = [await poller.tick() for _ in range(5)]

    after = await metric_counts(service)
    spent = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    ticks = spent.pop("receiver_poll_ticks_total")
    assert visited == [0] * 5 and ticks >= 5  # the background loop may tick too
    assert spent == {"s3:list_objects_v2": ticks}


async def test_poller_metrics_show_pending_age_lag_and_leases(
    make_service: ServiceFactory, simulator: Simulator
) -> None:
    simulator.state.config.ready_after = 3600
    service = await make_service(POLL_INTERVAL_SECONDS="0.5")
    for n in range(3):
        await file(service, {"profile": n + 1})
    await asyncio.sleep(2.5)  # a few ticks, the census among them
    service.app[POLLER].stop()  # visits in progress finish and release their leases
    await asyncio.sleep(1.0)

    async with service.http.get(f"{service.admin_url}/metrics") as answer:
        text = await answer.text()
    values = dict(
        line.rsplit(" ", 1)
        for line in text.splitlines()
        if line.startswith(("receiver_pending", "receiver_oldest", "receiver_poll_"))
    )
    assert float(values["receiver_pending_requests"]) == 3
    assert 0 < float(values["receiver_oldest_pending_age_seconds"]) < 60
    assert float(values["receiver_poll_leases_held"]) == 0  # every lease taken was released
    assert "receiver_poll_lag_seconds" in values
    assert float(values['receiver_poll_visits_total{outcome="not_ready"}']) >= 3
