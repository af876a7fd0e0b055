"""The legal deadline: received_on, due_by, extensions, overdue listings and the metric."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from ulid import ULID

from service.clock import FixedClock
from service.metrics import Metrics
from service.requests.deadline import Deadline, ExtensionRefused, due_by
from service.requests.deadline_index import ORPHAN_AFTER, DeadlineIndex
from service.requests.ledger import Ledger
from service.storage.s3 import ArchiveStore, s3_client
from tests.conftest import Bucket, Service, ServiceFactory, Simulator, make_settings
from tests.support import eventually, metric, record_of

# Over ~20 s in all: left out of the quick subset, `pytest -m "not slow"`.
pytestmark = pytest.mark.slow

TODAY = datetime.now(UTC).date()


@pytest.mark.parametrize(
    ("received", "extended", "due"),
    [
        (date(2026, 1, 31), 0, date(2026, 2, 28)),
        (date(2024, 1, 31), 0, date(2024, 2, 29)),
        (date(2026, 3, 31), 0, date(2026, 4, 30)),
        (date(2026, 1, 31), 1, date(2026, 3, 31)),
        (date(2026, 1, 31), 2, date(2026, 4, 30)),
        (date(2026, 12, 15), 0, date(2027, 1, 15)),
        (date(2026, 11, 30), 2, date(2027, 2, 28)),
    ],
)
def test_due_by_is_one_calendar_month_clamped_plus_extensions(
    received: date, extended: int, due: date
) -> None:
    assert due_by(received, extended) == due


def test_days_left_and_overdue() -> None:
    deadline = Deadline(date(2026, 1, 31), 0, answered=False)
    assert deadline.days_left(date(2026, 2, 28)) == 0
    assert not deadline.overdue(date(2026, 2, 28))  # due on the day itself, not yet late
    assert deadline.days_left(date(2026, 3, 2)) == -2
    assert deadline.overdue(date(2026, 3, 1))
    assert not Deadline(date(2026, 1, 31), 0, answered=True).overdue(date(2026, 3, 1))
    assert Deadline(date(2026, 1, 31), 1, answered=False).extend(1) == 2
    with pytest.raises(ExtensionRefused):
        Deadline(date(2026, 1, 31), 1, answered=False).extend(2)


async def file(service: Service, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with await service.file(body) as answer:
        return answer.status, await answer.json()


async def extend(service: Service, request_id: str, body: Any) -> tuple[int, dict[str, Any]]:
    async with service.http.post(
        f"{service.admin_url}/v1/data-requests/{request_id}/extend", json=body, headers=service.auth
    ) as answer:
        return answer.status, await answer.json()


async def listing(service: Service, query: str) -> tuple[int, dict[str, Any]]:
    async with service.http.get(
        f"{service.admin_url}/v1/data-requests?{query}", headers=service.auth
    ) as answer:
        return answer.status, await answer.json()


async def test_filing_records_received_on_and_due_by(service: Service) -> None:
    received = TODAY - timedelta(days=10)
    status, created = await file(
        service, {"email": "dana@example.com", "received_on": received.isoformat()}
    )

    assert status == 202
    assert created["received_on"] == received.isoformat()
    assert created["due_by"] == due_by(received).isoformat()
    assert created["days_left"] == (due_by(received) - TODAY).days
    assert created["overdue"] is False
    shown = await service.show(created["id"])
    assert shown["due_by"] == created["due_by"]
    assert shown["extension"] is None and shown["answered_at"] is None


async def test_received_on_defaults_to_the_filing_day(service: Service) -> None:
    status, created = await file(service, {"profile": 7})
    assert status == 202
    assert created["received_on"] == TODAY.isoformat()
    assert created["due_by"] == due_by(TODAY).isoformat()


@pytest.mark.parametrize(
    ("received_on", "message"),
    [
        ((TODAY + timedelta(days=1)).isoformat(), "future"),
        ("1926-05-01", "more than 366 days ago"),
        ("2026-02-30", "YYYY-MM-DD"),
        ("20260101", "YYYY-MM-DD"),
        ("yesterday", "YYYY-MM-DD"),
        (20260101, "YYYY-MM-DD"),
        (None, "YYYY-MM-DD"),
    ],
)
async def test_bad_received_on_is_400_and_nothing_is_filed(
    service: Service, simulator: Simulator, store: Bucket, received_on: Any, message: str
) -> None:
    status, answer = await file(service, {"email": "e@example.com", "received_on": received_on})
    assert status == 400
    assert message in answer["error"]
    assert await store.keys() == []
    assert simulator.state.requests == {}


async def test_an_events_range_longer_than_ten_years_is_refused(
    service: Service, simulator: Simulator, store: Bucket
) -> None:
    status, answer = await file(
        service, {"email": "f@example.com", "events": {"since": "1900-01-01"}}
    )
    assert status == 400
    assert "longer than 10 years" in answer["error"]
    assert await store.keys() == []
    assert simulator.state.requests == {}
    # Ten years exactly is fine.
    since = TODAY.replace(year=TODAY.year - 10) + timedelta(days=2)
    status, _ = await file(service, {"email": "f@example.com", "events": {"since": str(since)}})
    assert status == 202


async def test_extensions_move_due_by_up_to_two_months_in_all(service: Service) -> None:
    received = TODAY - timedelta(days=3)
    _, created = await file(service, {"profile": 31, "received_on": received.isoformat()})

    status, first = await extend(service, created["id"], {"months": 1, "reason": "complex"})
    assert status == 200
    assert first["due_by"] == due_by(received, 1).isoformat()
    status, second = await extend(service, created["id"], {"months": 1, "reason": "many"})
    assert status == 200
    assert second["due_by"] == due_by(received, 2).isoformat()
    assert [h["reason"] for h in second["extension"]["history"]] == ["complex", "many"]

    status, refused = await extend(service, created["id"], {"months": 1, "reason": "more"})
    assert status == 409
    assert "2 used, 0 left" in refused["error"]
    shown = await service.show(created["id"])
    assert shown["due_by"] == due_by(received, 2).isoformat()
    assert shown["extension"]["months"] == 2


async def test_two_months_at_once_then_nothing_more(service: Service) -> None:
    _, created = await file(service, {"profile": 32})
    assert (await extend(service, created["id"], {"months": 2, "reason": "volume"}))[0] == 200
    assert (await extend(service, created["id"], {"months": 1, "reason": "again"}))[0] == 409


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"months": 3, "reason": "x"}, "'months' must be 1 or 2"),
        ({"months": 0, "reason": "x"}, "'months' must be 1 or 2"),
        ({"months": True, "reason": "x"}, "'months' must be 1 or 2"),
        ({"months": "1", "reason": "x"}, "'months' must be 1 or 2"),
        ({"months": 1}, "'reason' is required"),
        ({"months": 1, "reason": "   "}, "'reason' is required"),
        ({"months": 1, "reason": "x", "by": "me"}, "unknown member"),
        ([1], "body must be"),
    ],
)
async def test_bad_extension_is_400_and_changes_nothing(
    service: Service, store: Bucket, body: Any, message: str
) -> None:
    _, created = await file(service, {"profile": 33})
    before = await record_of(store, created["id"])
    status, answer = await extend(service, created["id"], body)
    assert status == 400
    assert message in answer["error"]
    assert await record_of(store, created["id"]) == before


async def test_extending_an_unknown_request_is_404(service: Service) -> None:
    status, _ = await extend(service, str(ULID()), {"months": 1, "reason": "x"})
    assert status == 404
    status, _ = await extend(service, "not-an-id", {"months": 1, "reason": "x"})
    assert status == 404


async def test_overdue_and_due_before_list_open_requests_by_due_date(
    make_service: ServiceFactory,
) -> None:
    service = await make_service(POLL_INTERVAL_SECONDS="0.2")
    late = TODAY - timedelta(days=45)  # due about two weeks ago
    soon = TODAY - timedelta(days=25)  # due in about a week
    ids = {}
    for name, received in (("late", late), ("soon", soon), ("new", TODAY)):
        status, created = await file(
            service, {"profile": len(ids) + 1, "received_on": received.isoformat()}
        )
        assert status == 202
        ids[name] = created["id"]

    status, overdue = await listing(service, "overdue=true")
    assert status == 200
    assert [i["id"] for i in overdue["items"]] == [ids["late"]]
    assert overdue["items"][0]["overdue"] is True
    assert overdue["items"][0]["days_left"] < 0

    horizon = due_by(soon) + timedelta(days=1)
    status, due = await listing(service, f"due_before={horizon}")
    assert [i["id"] for i in due["items"]] == [ids["late"], ids["soon"]]

    # Paging by due date: one at a time, the cursor carries on.
    status, first = await listing(service, f"due_before={horizon}&limit=1")
    status, second = await listing(
        service, f"due_before={horizon}&limit=1&cursor={first['next_cursor']}"
    )
    assert [first["items"][0]["id"], second["items"][0]["id"]] == [ids["late"], ids["soon"]]

    await eventually(lambda: metric(service, "receiver_requests_overdue"), lambda v: v == 1)

    # Extended by two months, the late one is no longer overdue.
    assert (await extend(service, ids["late"], {"months": 2, "reason": "complex"}))[0] == 200
    status, overdue = await listing(service, "overdue=true")
    assert overdue["items"] == []
    await eventually(lambda: metric(service, "receiver_requests_overdue"), lambda v: v == 0)


@pytest.mark.parametrize(
    "query",
    ["overdue=maybe", "due_before=2026-02-30", "due_before=tomorrow", "overdue=true&cursor=x"],
)
async def test_bad_list_filters_are_400(service: Service, query: str) -> None:
    status, answer = await listing(service, query)
    assert status == 400
    assert answer["error"]


async def put_legacy_record(store: Bucket, created: datetime) -> str:
    """A record as the release before deadlines wrote it (no received_on); its id."""
    request_id = str(ULID.from_datetime(created))
    legacy = {
        "id": request_id,
        "subject_type": "profile",
        "subject_id": "77",
        "status": "expired",
        "copernica_id": "900",
        "created_at": created.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "updated_at": created.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "attempts": 1,
        "last_error": None,
        "report": True,
        "events": None,
        "archive": None,
        "idempotency_key": None,
        "next_poll_at": None,
        "poll_errors": 0,
        "lease": None,
        "version": 3,
        "extra": {},
    }
    await store.client.put_object(
        Bucket=store.name,
        Key=f"{store.prefix}requests/{request_id}.json",
        Body=json.dumps(legacy).encode(),
    )
    return request_id


async def test_a_record_from_before_deadlines_is_read_with_its_creation_day(
    make_service: ServiceFactory, store: Bucket
) -> None:
    """Records written by the previous release have no received_on: their creation day is
    used, and the poller's backfill puts them in the deadline index."""
    created = datetime.now(UTC) - timedelta(days=40)
    request_id = await put_legacy_record(store, created)
    service = await make_service(POLL_INTERVAL_SECONDS="0.2")

    shown = await service.show(request_id)
    assert shown["received_on"] == created.date().isoformat()
    assert shown["due_by"] == due_by(created.date()).isoformat()
    assert shown["overdue"] is True

    async def overdue_ids() -> list[str]:
        return [i["id"] for i in (await listing(service, "overdue=true"))[1]["items"]]

    assert await eventually(overdue_ids, lambda ids: ids == [request_id])
    # The marker goes in before the record is rewritten: wait for the record too.
    await eventually(
        lambda: record_of(store, request_id),
        lambda record: record.get("received_on") == created.date().isoformat(),
        what="received_on written into the record",
    )


async def test_the_backfill_reads_only_records_from_before_its_start(
    make_service: ServiceFactory, store: Bucket
) -> None:
    """Records filed since the process started are this release's: the backfill ends at the
    first of them, in its first page, and reads none (here 250, more than a page of 200; in
    place before the service starts, their ids made a minute later)."""
    created = datetime.now(UTC) - timedelta(days=40)
    legacy_id = await put_legacy_record(store, created)
    later = datetime.now(UTC) + timedelta(minutes=1)
    newer = {}
    for _ in range(250):
        request_id = str(ULID.from_datetime(later))
        newer[request_id] = json.dumps({"id": request_id, "received_on": "2026-11-25"}).encode()
    await asyncio.gather(
        *(
            store.client.put_object(
                Bucket=store.name, Key=f"{store.prefix}requests/{request_id}.json", Body=body
            )
            for request_id, body in newer.items()
        )
    )
    service = await make_service(POLL_INTERVAL_SECONDS="0.2")
    await eventually(
        lambda: store.keys("migrations/"),
        lambda keys: f"{store.prefix}migrations/received-on.done" in keys,
        what="the backfill done",
    )
    assert (await record_of(store, legacy_id))["received_on"] == created.date().isoformat()
    reads = await metric(
        service, "receiver_s3_request_duration_seconds_count", operation="get_object"
    )
    assert reads < 20  # the legacy record and a few others; not 250
    for request_id, body in newer.items():
        assert await store.read(f"{store.prefix}requests/{request_id}.json") == body


async def test_a_marker_without_a_record_is_dropped_once_its_filing_is_long_past(
    store: Bucket, s3_endpoint: str, bucket: str
) -> None:
    """Filing puts the marker before the record: a marker with no record is a filing under
    way for an hour after its id was made (kept), a filing that died after that (dropped).
    The index's clock is moved across that hour; nothing waits."""
    made = ULID.from_datetime(datetime.now(UTC) - timedelta(days=3))
    request_id, filed_at = str(made), made.datetime  # the id's own time (milliseconds)
    settings = make_settings(ARCHIVE_BUCKET=bucket, S3_ENDPOINT_URL=s3_endpoint)
    async with s3_client(settings) as s3:
        archive = ArchiveStore(s3, settings, Metrics())
        clock = FixedClock(filed_at + ORPHAN_AFTER)
        index = DeadlineIndex(archive, Ledger(archive, b"k", clock=clock), clock)
        await index.open(request_id, filed_at.date())
        marker = archive.keys.deadline_marker(request_id, filed_at.date())

        assert await index.open_by_deadline(TODAY, limit=10) == ([], None)
        assert await store.keys("deadlines/") == [marker]
        clock.advance(timedelta(microseconds=1))
        assert await index.open_by_deadline(TODAY, limit=10) == ([], None)
        assert await store.keys("deadlines/") == []
