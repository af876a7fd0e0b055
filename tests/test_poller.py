"""The polling fallback: whatever happens to callbacks, every request ends archived once."""

from __future__ import annotations

import json

import pytest

from service.app import POLLER, WORK
from service.clock import utcnow
from tests.conftest import Bucket, ServiceFactory, Simulator, sha256
from tests.support import (
    archive_key,
    eventually,
    filed,
    metric,
    metric_counts,
    record_of,
    wait_for_status,
)

# Over ~20 s in all: left out of the quick subset, `pytest -m "not slow"`.
pytestmark = pytest.mark.slow

FAST = {"POLL_INTERVAL_SECONDS": "0.3", "POLL_LEASE_SECONDS": "5"}


@pytest.mark.parametrize("forms", [{"status", "data", "old"}, {"data", "old"}, {"old"}])
async def test_lost_callback_is_archived_by_the_poller(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket, forms: set[str]
) -> None:
    simulator.state.config.readiness_forms = forms
    simulator.state.faults.lose_callback = True
    service = await make_service(**FAST)
    created = await filed(service, {"email": "ivy@example.com"})

    shown = await wait_for_status(service, created["id"], "archived")

    expected = simulator.state.payload_bytes(created["copernica_id"])
    assert shown["status"] == "archived"
    assert shown["archive"]["source"] == "poll"
    assert shown["archive"]["sha256"] == sha256(expected)
    assert await store.read(archive_key(created["id"])) == expected
    assert await store.keys("archive/") == [archive_key(created["id"])]
    # A final request leaves no schedule behind (the marker goes right after the record).
    await eventually(lambda: store.keys("due/"), lambda due: due == [], timeout=5, what="no marker")


async def test_callback_and_poller_racing_make_one_object(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    simulator.state.faults.duplicate_callback = 3
    service = await make_service(POLL_INTERVAL_SECONDS="0.05", POLL_LEASE_SECONDS="5")
    created = [await filed(service, {"profile": n}) for n in range(1, 6)]

    for item in created:
        await wait_for_status(service, item["id"], "archived")

    # Let the stragglers land: every delivery (the callback and its three duplicates) answered.
    def answered(copernica_id: str) -> int:
        found = simulator.state.deliveries
        return sum(1 for d in found if d.copernica_id == copernica_id and d.status == 200)

    await eventually(
        lambda: [answered(item["copernica_id"]) for item in created],
        lambda counts: counts == [4] * len(created),
        what="four deliveries answered 200 per request",
    )

    keys = await store.keys("archive/")
    assert sorted(keys) == sorted(archive_key(item["id"]) for item in created)
    for item in created:
        expected = simulator.state.payload_bytes(item["copernica_id"])
        assert await store.read(archive_key(item["id"])) == expected


async def test_a_different_body_stored_first_keeps_its_facts_and_gets_its_package(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    """A refiled request has two Copernica requests, whose bodies differ. If the other one's
    callback stores its body while the poller downloads this one's, the record must carry
    the stored object's sha256, not the downloaded body's: else the package builder finds a
    mismatch and never builds the package (found by the soak)."""
    simulator.state.faults.lose_callback = True
    simulator.state.config.ready_after = 3600
    service = await make_service(**FAST)
    created = await filed(service, {"email": "rae@example.com"})
    ours = simulator.state.requests[created["copernica_id"]]
    other = simulator.state.new_request("email", "rae@example.com", ours.report)
    stored_first = simulator.state.payload_bytes(other.copernica_id)
    fetched = simulator.state.payload_bytes(ours.copernica_id)
    assert stored_first != fetched

    # The poller's next status call waits a second at Copernica; meanwhile the other body lands.
    simulator.state.faults.slow_seconds = 1.0
    ours.ready_at = 0.0
    calls = simulator.state.api_calls
    await eventually(lambda: simulator.state.api_calls > calls, what="a poll under way")
    async with service.http.post(service.callback_url(created["id"]), data=stored_first) as answer:
        assert answer.status == 200
    simulator.state.faults.slow_seconds = 0.0
    await eventually(lambda: ours.data_gets > 0, what="the poller downloading its body")

    record = await eventually(
        lambda: record_of(store, created["id"]),
        lambda r: r.get("package") is not None or bool(r.get("last_error")),
        what="a package or an error",
    )
    assert record["data_requests"][0]["last_error"] is None
    assert record["data_requests"][0]["archive"]["sha256"] == sha256(stored_first)
    assert await store.read(archive_key(created["id"])) == stored_first
    assert record["package"]["sha256"]


async def test_data_gone_at_copernica_marks_failed(
    make_service: ServiceFactory, simulator: Simulator
) -> None:
    simulator.state.faults.lose_callback = True
    simulator.state.config.expire_after = 0.01
    service = await make_service(**FAST)
    created = await filed(service, {"email": "jo@example.com"})

    shown = await wait_for_status(service, created["id"], "failed")

    assert shown["status"] == "failed"
    assert "gone" in shown["last_error"]


async def test_never_ready_request_expires(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    simulator.state.config.ready_after = 3600
    service = await make_service(REQUEST_EXPIRY_HOURS="0.0003", **FAST)  # about one second
    created = await filed(service, {"email": "kim@example.com"})

    shown = await wait_for_status(service, created["id"], "expired")

    assert shown["status"] == "expired"
    # The archive key is closed by an empty tombstone: data arriving now is not stored
    # behind the back of a request that says `expired` (found by the soak).
    assert await store.keys("archive/") == [archive_key(created["id"])]
    assert await store.read(archive_key(created["id"])) == b""
    late = simulator.state.payload_bytes(created["copernica_id"])
    async with service.http.post(service.callback_url(created["id"]), data=late) as answer:
        assert answer.status == 200
    assert await store.read(archive_key(created["id"])) == b""
    assert (await service.show(created["id"]))["status"] == "expired"


async def test_closing_an_expired_requests_key_never_replaces_data_that_landed(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    """Expiry closes the archive key with a tombstone only if the key is free: data that
    landed between the visit's look and its tombstone is kept (and the request archived)."""
    simulator.state.config.ready_after = 3600
    service = await make_service(POLL_INTERVAL_SECONDS="600")
    created = await filed(service, {"email": "lev@example.com"})
    body = simulator.state.payload_bytes(created["copernica_id"])
    await store.client.put_object(Bucket=store.name, Key=archive_key(created["id"]), Body=body)

    assert await service.app[WORK]._close_archive(archive_key(created["id"])) is False
    assert await store.read(archive_key(created["id"])) == body


async def test_filing_during_copernica_outage_is_resubmitted_later(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    simulator.state.faults.fail_next = 3  # the three filing tries all get 503
    service = await make_service(**FAST)
    created = await filed(service, {"email": "lee@example.com"})
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
    created = await filed(service, {"email": "max@example.com"})
    record_key = f"copernica/requests/{created['id']}.json"
    crashed = await record_of(store, created["id"])
    crashed["data_requests"][0].update(status="submitting", copernica_id=None)
    crashed["version"] += 1
    await store.client.put_object(
        Bucket=store.name, Key=record_key, Body=json.dumps(crashed).encode()
    )
    simulator.state.config.ready_after = 0.05

    shown = await wait_for_status(service, created["id"], "archived")

    assert shown["status"] == "archived"
    assert len(simulator.state.requests) == 2  # the lost answer's request and the new one
    assert shown["copernica_id"] == "1001" and shown["attempts"] == 2
    assert await store.keys("archive/") == [archive_key(created["id"])]
    assert (await record_of(store, created["id"]))["data_requests"][0]["resubmitted"] == 1


async def test_copernica_429_and_503_are_backed_off_and_the_rate_limit_holds(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    simulator.state.faults.lose_callback = True
    service = await make_service(
        COPERNICA_MAX_RPS="20", POLL_INTERVAL_SECONDS="0.2", POLL_LEASE_SECONDS="5"
    )
    created = [await filed(service, {"profile": n}) for n in range(1, 13)]
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
        await filed(service, {"profile": n + 1})
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
    filing = utcnow()
    for n in range(3):
        await filed(service, {"profile": n + 1})
    # A few ticks, the census among them: each request visited, all three counted pending.
    await eventually(
        lambda: metric(service, "receiver_poll_visits_total", outcome="not_ready"),
        lambda visits: visits >= 3,
        what="three visits",
    )
    await eventually(
        lambda: metric(service, "receiver_pending_requests"), lambda n: n == 3, what="the census"
    )
    service.app[POLLER].stop()  # visits in progress finish and release their leases
    await eventually(lambda: metric(service, "receiver_poll_leases_held"), lambda n: n == 0)

    async with service.http.get(f"{service.admin_url}/metrics") as answer:
        text = await answer.text()
    values = dict(
        line.rsplit(" ", 1)
        for line in text.splitlines()
        if line.startswith(("receiver_pending", "receiver_oldest", "receiver_poll_"))
    )
    assert float(values["receiver_pending_requests"]) == 3
    # As old as the oldest request, which is no older than this test's filing.
    oldest = float(values["receiver_oldest_pending_age_seconds"])
    assert 0 < oldest <= (utcnow() - filing).total_seconds() + 0.001  # ids count milliseconds
    assert float(values["receiver_poll_leases_held"]) == 0  # every lease taken was released
    assert "receiver_poll_lag_seconds" in values
    assert float(values['receiver_poll_visits_total{outcome="not_ready"}']) >= 3


async def test_a_filing_whose_answer_was_lost_is_not_tried_again_and_is_counted(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    """Copernica takes no idempotency key: a create that timed out may have been filed. The
    client does not try it again at once; the record counts the try, so the poller's next
    filing is a known resubmission, and every request Copernica holds is counted."""
    simulator.state.faults.slow_seconds = 1.0  # every answer after the client's timeout
    service = await make_service(**FAST, COPERNICA_TIMEOUT_SECONDS="0.4")
    created = await filed(service, {"email": "lou@example.com"})
    assert created["status"] == "submitting"
    assert "not tried again" in created["last_error"]
    simulator.state.faults.slow_seconds = 0.0
    shown = await wait_for_status(service, created["id"], "archived")
    made = [r for r in simulator.state.requests.values() if r.subject_id == "lou@example.com"]
    assert shown["sources"][0]["copernica_id"] in {r.copernica_id for r in made}
    stored = await record_of(store, created["id"])
    # The record counts the lost try (filed or not: this simulator drops a request whose
    # caller went away) beside the resubmission; never fewer than Copernica holds.
    assert stored["data_requests"][0]["resubmitted"] == 1
    assert stored["data_requests"][0]["attempts"] == 2
    assert 1 <= len(made) <= 1 + stored["data_requests"][0]["resubmitted"]
