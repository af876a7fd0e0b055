"""The request record: an access request owning its data requests, and records of the release
before the split (committed as fixtures, written by its own `AccessRequest.to_bytes`) read as
an access request with one data request."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from service.config import Secret
from service.intake.urls import callback_url
from service.requests.deadline import ExtensionRefused
from service.requests.records import (
    AccessRequest,
    Archive,
    DataRequest,
    Events,
    Status,
)
from tests.conftest import CALLBACK_SECRET, Bucket, ServiceFactory, Simulator, sha256
from tests.support import EMAIL, archive_key, payload, pending_request, wait_until_packaged

FIXTURES = Path(__file__).parent / "fixtures" / "records"


def legacy(name: str) -> tuple[dict, AccessRequest]:
    body = (FIXTURES / f"{name}.json").read_bytes()
    return json.loads(body), AccessRequest.from_bytes(body)


@pytest.mark.parametrize("name", sorted(p.stem for p in FIXTURES.glob("*.json")))
def test_every_earlier_record_reads_as_one_data_request_and_round_trips(name: str) -> None:
    raw, record = legacy(name)
    assert record.id == raw["id"]
    assert len(record.data_requests) == 1
    first = record.first
    assert (first.subject_type, first.copernica_id) == (raw["subject_type"], raw["copernica_id"])
    assert first.subject_id == raw["subject_id"]
    assert (first.attempts, first.last_error) == (raw["attempts"], raw["last_error"])
    assert record.status == raw["status"]
    assert record.version == raw["version"]
    assert record.next_poll_at == raw["next_poll_at"]
    assert record.received_on == raw.get("received_on")
    # Written in the new form and read back: the same request, fact for fact.
    again = AccessRequest.from_bytes(record.to_bytes())
    assert again == record
    assert json.loads(again.to_bytes())["format"] == 2


def test_an_archived_answered_record_keeps_its_facts_as_types() -> None:
    raw, record = legacy("archived-packaged-answered")
    first = record.first
    assert first.archive == Archive.from_json(raw["archive"])
    assert first.archive is not None and first.archive.size == 1048576
    assert first.events == Events("2026-11-01", "2026-12-01", windows=1, stored=1, events=7)
    assert first.events_complete
    assert record.package is not None and record.package.sha256 == "ab" * 32
    assert record.extension is not None and record.extension.months == 1
    assert record.extension.history[0].reason == "many sources"
    # received 2026-11-28, one month plus one extended: due 2027-01-28; answered, so not overdue
    assert record.deadline.due_by.isoformat() == "2027-01-28"
    assert record.answered_at == "2026-12-02T08:00:00.000000Z"
    assert record.finished and not record.needs_package


def test_a_pending_record_keeps_its_lease_schedule_and_events_progress() -> None:
    _, record = legacy("pending-profile-with-events")
    assert record.first.source == "profile:18381"
    assert record.first.resubmitted == 1  # was extra.resubmitted
    assert record.first.events is not None and not record.first.events_complete
    assert record.first.events.stored == 1 and record.first.events.events == 42
    assert record.lease is not None and record.lease.owner == "replica-a-1234-ABCDEF"
    before = datetime(2026, 12, 1, 10, 5, tzinfo=UTC)
    after = datetime(2026, 12, 1, 10, 7, tzinfo=UTC)
    assert record.leased_to_other("someone-else", before)
    assert not record.leased_to_other("someone-else", after)
    assert not record.leased_to_other("replica-a-1234-ABCDEF", before)
    assert record.idempotency_key == "3f2a"


def test_a_purged_record_is_purged_by_the_access_request_not_by_its_data_request() -> None:
    raw, record = legacy("purged")
    assert record.status is Status.PURGED
    assert record.purged_at == raw["purged_at"]
    assert record.first.status is Status.ARCHIVED
    assert record.first.subject_id.startswith("hmac-sha256:")
    assert record.finished


def test_a_record_before_deadlines_was_received_the_day_it_was_filed() -> None:
    _, record = legacy("before-deadlines")
    assert record.received_on is None
    assert record.received_day.isoformat() == "2026-10-01"
    assert record.needs_package  # archived, no package: the backfill schedules a build
    assert record.first.archive is not None and record.first.archive.sha256 is None


def test_the_access_request_status_follows_its_sources() -> None:
    first = DataRequest("email", "a@example.com")
    second = DataRequest("profile", "18381")
    record = AccessRequest.new("01KBX0G2M7Q3ZB1V8W4K6N9T2S", first, created_at="x")
    record.data_requests.append(second)
    assert record.status is Status.SUBMITTING
    first.mark_pending("1")
    assert record.status is Status.PENDING
    first.mark_archived(Archive("b", "k", "00", 2, "poll", None))
    assert record.status is Status.PENDING  # the profile is still open
    second.mark_failed("400 No entity with supplied ID")
    assert record.status is Status.ARCHIVED and record.needs_package
    first.status = Status.EXPIRED  # no source holds data: the first's own final status
    assert record.status is Status.EXPIRED and not record.needs_package


def test_extending_past_two_months_is_refused_and_changes_nothing() -> None:
    _, record = legacy("archived-packaged-answered")
    before = record.to_bytes()
    with pytest.raises(ExtensionRefused):
        record.extend(2, "too long", "2026-12-03T00:00:00.000000Z")
    assert record.to_bytes() == before
    record.answered_at = None
    record.extend(1, "still sources", "2026-12-03T00:00:00.000000Z")
    assert record.extension is not None and record.extension.months == 2
    assert [s.months for s in record.extension.history] == [1, 1]


# -- records of the earlier release in a running service ------------------------------------


def flat_pending(request_id: str, copernica_id: str, created_at: str, next_poll_at: str) -> bytes:
    """A `pending` record as the release before the split wrote it: the fixture's shape
    (`submitting.json`), this request's ids, Copernica's id, its poll marker's time and no
    lease."""
    raw = json.loads((FIXTURES / "submitting.json").read_bytes())
    raw.update(
        id=request_id,
        subject_id=EMAIL,
        status="pending",
        copernica_id=copernica_id,
        created_at=created_at,
        last_error=None,
        lease=None,
        next_poll_at=next_poll_at,
        received_on=created_at[:10],
        version=raw["version"] + 10,
    )
    return json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize("form", ["current", "earlier"])
async def test_a_pending_record_of_the_earlier_release_is_answered_through_its_callback_url(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket, form: str
) -> None:
    """A request the earlier release filed (its record flat, its callback URL given to
    Copernica then) is archived by Copernica's callback to that URL, read by this release as
    one data request, packaged, and its record written back in the new form."""
    service = await make_service(POLL_INTERVAL_SECONDS="0.3")
    request_id = await pending_request(service, simulator)
    shown = await service.show(request_id)
    key = f"copernica/requests/{request_id}.json"
    when = json.loads(await store.read(key))["next_poll_at"]
    flat = flat_pending(request_id, shown["copernica_id"], shown["created_at"], when)
    await store.client.put_object(Bucket=store.name, Key=key, Body=flat)
    assert AccessRequest.from_bytes(flat).first.status is Status.PENDING

    url = (
        service.callback_url(request_id)
        if form == "current"
        else callback_url(service.url, Secret(CALLBACK_SECRET), request_id)
    )
    body = payload()
    async with service.http.post(url, data=body) as answer:
        assert answer.status == 200, await answer.text()

    packaged = await wait_until_packaged(service, request_id)
    assert packaged["status"] == "archived"
    assert packaged["archive"]["sha256"] == sha256(body)
    assert await store.read(archive_key(request_id)) == body
    stored = json.loads(await store.read(key))
    assert stored["format"] == 2 and stored["version"] > json.loads(flat)["version"]
    assert [d["source"] for d in stored["data_requests"]] == ["email"]
    assert stored["data_requests"][0]["copernica_id"] == shown["copernica_id"]
    assert stored["package"]["sha256"] == packaged["package"]["sha256"]
