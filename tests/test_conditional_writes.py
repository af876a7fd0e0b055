"""Every conditional S3 write the service's guarantees rest on, each shown by what a user sees
when it matters: the race or repeat it exists for, played deterministically against moto.

- `If-None-Match: *` on the single PutObject of a streamed upload (archive, package): a second,
  different body for an archived request leaves the acknowledged archive as it is;
- `If-None-Match: *` on CompleteMultipartUpload: two large bodies racing (both past the
  upload's existence check) make one archive, the one acknowledged as archived;
- `If-Match` on record updates: two replicas taking a lease from the same read, one wins; an
  operator's change made while the poller works on the request is not undone by it;
- `If-None-Match: *` on record creation: a filer resuming after another took its request over
  does not file a second request at Copernica;
- `If-None-Match: *` on the idempotency claim: one key, one request;
- `If-None-Match: *` on an events window: a window stored once is never replaced.

`python -m tests.mutate` removes each condition in turn and checks that these tests go red.
Races are made deterministic with gates (a callback body held back mid-stream, the simulator
holding its answers) rather than with timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import date, timedelta
from typing import Any

import pytest
from aiohttp import web
from ulid import ULID

from service.app import COPERNICA, LEDGER, METRICS, POLLER, STORE, hash_key
from service.clock import utcnow
from service.collect.discovery import Discoverer
from service.collect.events import S3Sink
from service.collect.filing import Filing, _key_hash, parse_new_request
from service.copernica.account import Account
from service.copernica.events import Window
from service.metrics import Metrics
from service.requests.deadline_index import DeadlineIndex
from service.requests.ledger import Ledger
from service.requests.records import AccessRequest, DataRequest
from service.requests.schedule import Schedule
from service.simulator.app import SIM_STATE, SimulatorConfig, create_simulator_app
from service.storage.s3 import ArchiveStore, PreconditionFailed, s3_client
from tests.conftest import (
    ACCESS_TOKEN,
    Bucket,
    Service,
    ServiceFactory,
    Simulator,
    make_settings,
    sha256,
)
from tests.support import (
    EMAIL,
    MIB,
    archive_key,
    eventually,
    filed,
    payload,
    pending_request,
    record_of,
)

# On moto and on SeaweedFS (tests/conftest.py): the test ids say which.
pytestmark = pytest.mark.both_stores

PART = 5 * MIB  # S3's smallest part: bodies above it go up as multipart uploads


class Gate:
    """Holds the simulator's answers to data-request reads (status, data, the old GET) while
    closed, so a test can act while the poller waits on Copernica."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.opened.set()
        self.waiting = 0

    def close(self) -> None:
        self.opened.clear()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "GET" and "/datarequest/" in request.path:
            self.waiting += 1
            try:
                await self.opened.wait()
            finally:
                self.waiting -= 1
        return await handler(request)


GATE = web.AppKey("gate", Gate)


@pytest.fixture
async def simulator(aiohttp_server: Any) -> Simulator:
    """The Copernica simulator (overriding conftest's) with a gate on data-request reads; its
    data is never ready on its own, so the tests play Copernica's callbacks themselves."""
    app = create_simulator_app(
        SimulatorConfig(access_token=ACCESS_TOKEN, ready_after=3600, control=True)
    )
    gate = Gate()
    app[GATE] = gate
    app.middlewares.append(gate.middleware)
    server = await aiohttp_server(app, host="127.0.0.1")
    return Simulator(str(server.make_url("")).rstrip("/"), app[SIM_STATE], app)


Replica = Callable[[], Awaitable[ArchiveStore]]


@pytest.fixture
async def replica(s3_endpoint: str, bucket: str) -> AsyncIterator[Replica]:
    """Makes ArchiveStores as replicas hold them: each with its own S3 client, on the test's
    bucket, with the smallest part size (no start-up probe: the write under test is the one
    that must refuse)."""
    settings = make_settings(
        ARCHIVE_BUCKET=bucket, S3_ENDPOINT_URL=s3_endpoint, S3_PART_BYTES=str(PART)
    )
    async with contextlib.AsyncExitStack() as stack:

        async def make() -> ArchiveStore:
            client = await stack.enter_async_context(s3_client(settings))
            store = ArchiveStore(client, settings, Metrics())
            stack.push_async_callback(store.close)
            return store

        yield make


def body_of(letter: str, size: int) -> bytes:
    """A valid data-request body for EMAIL of about `size` bytes, its filler `letter`s: two
    bodies of different letters are different data for the same subject."""
    data = [[f"From: news@shop.test\r\n\r\n{letter * size}"], [{"open": 1}]]
    return json.dumps({"info": {"type": "email", "id": EMAIL}, "data": data}).encode()


async def deliver(
    service: Service, simulator: Simulator, request_id: str, body: Any
) -> tuple[int, dict]:
    """One delivery to the `report` address the service gave Copernica for the request (its
    current form names the subject, so no replica reads the record or remembers the request
    as archived: every delivery reaches the archive write)."""
    [report] = [
        r.report for r in simulator.state.requests.values() if request_id in (r.report or "")
    ]
    assert report is not None
    async with service.http.post(report, data=body) as answer:
        return answer.status, await answer.json(content_type=None)


async def upload_keys(store: Bucket) -> list[str]:
    return [upload["Key"] for upload in await store.uploads()]


# -- If-None-Match: * on the single PutObject of a streamed upload -----------------------------


async def test_a_different_second_body_leaves_the_acknowledged_archive(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    service = await make_service()
    request_id = await pending_request(service, simulator)
    first, second = payload(), payload(filler=100)

    status, answer = await deliver(service, simulator, request_id, first)
    again, repeat = await deliver(service, simulator, request_id, second)

    assert (status, answer["status"], answer["sha256"]) == (200, "archived", sha256(first))
    assert (again, repeat["status"]) == (200, "duplicate")
    assert await store.read(archive_key(request_id)) == first
    assert (await store.head(archive_key(request_id)))["Metadata"]["sha256"] == sha256(first)
    shown = await service.show(request_id)
    assert shown["status"] == "archived" and shown["archive"]["sha256"] == sha256(first)


@pytest.mark.parametrize("size", [1000, PART + MIB], ids=["single-put", "multipart"])
async def test_of_two_uploads_to_one_key_only_the_first_commit_counts(
    replica: Replica, store: Bucket, size: int
) -> None:
    archive = await replica()
    key = archive.keys.archive(str(ULID()))
    first, second = body_of("a", size), body_of("b", size)
    uploads = [archive.upload(key, {"source": "callback"}) for _ in range(2)]
    for upload, body in zip(uploads, (first, second), strict=True):
        for i in range(0, len(body), MIB):
            await upload.write(body[i : i + MIB])  # both past the existence check

    won = await uploads[0].commit({"sha256": sha256(first), "size": str(len(first))})
    lost = await uploads[1].commit({"sha256": sha256(second), "size": str(len(second))})

    assert (won, lost) == (True, False)
    assert await store.read(key) == first
    assert await store.uploads() == []  # the loser's parts are gone too


# -- If-None-Match: * on CompleteMultipartUpload -----------------------------------------------


async def test_racing_large_deliveries_keep_the_acknowledged_archive(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    service = await make_service(S3_PART_BYTES=str(PART))
    request_id = await pending_request(service, simulator)
    bodies = {"a": body_of("a", PART + MIB), "b": body_of("b", PART + MIB)}
    gates = {name: asyncio.Event() for name in bodies}

    async def held_back(name: str) -> AsyncIterator[bytes]:
        """The first part and a bit, then nothing until the test opens this body's gate."""
        body = bodies[name]
        split = PART + 64 * 1024
        for i in range(0, split, 256 * 1024):
            yield body[i : min(i + 256 * 1024, split)]
        await gates[name].wait()
        yield body[split:]

    deliveries = {
        name: asyncio.create_task(deliver(service, simulator, request_id, held_back(name)))
        for name in bodies
    }
    # Both bodies are past the existence check: two multipart uploads to the archive key.
    await eventually(
        lambda: upload_keys(store),
        lambda keys: keys == [archive_key(request_id)] * 2,
        what="two uploads in progress",
    )
    gates["a"].set()
    status_a, answer_a = await deliveries["a"]
    gates["b"].set()
    status_b, answer_b = await deliveries["b"]

    assert (status_a, answer_a["status"]) == (200, "archived")
    assert answer_a["sha256"] == sha256(bodies["a"])
    assert (status_b, answer_b["status"]) == (200, "duplicate")
    assert await store.read(archive_key(request_id)) == bodies["a"]
    assert await store.uploads() == []
    shown = await service.show(request_id)
    assert shown["archive"]["sha256"] == sha256(bodies["a"])


# -- If-Match on record updates ------------------------------------------------------------------


async def test_two_replicas_taking_the_lease_from_one_read_only_one_wins(
    replica: Replica,
) -> None:
    first, second = Ledger(await replica(), b"k"), Ledger(await replica(), b"k")
    record = AccessRequest.new(str(ULID()), DataRequest("email", EMAIL))
    record.first.mark_pending("7")
    await first.create(record)
    [(mine, etag), (theirs, same_etag)] = [await first.get(record.id), await second.get(record.id)]  # type: ignore[misc]
    assert etag == same_etag

    mine.take_lease("replica-a", utcnow() + timedelta(seconds=600))
    await first.save(mine, etag)
    theirs.take_lease("replica-b", utcnow() + timedelta(seconds=600))
    with pytest.raises(PreconditionFailed):
        await second.save(theirs, same_etag)

    stored, _ = await second.get(record.id)  # type: ignore[misc]
    assert stored.lease is not None and stored.lease.owner == "replica-a"
    assert stored.leased_to_other("replica-b", utcnow())


async def test_an_extension_made_while_the_poller_works_is_not_undone(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    service = await make_service()  # POLL_INTERVAL_SECONDS 300: its own loop finds nothing due
    request_id = await pending_request(service, simulator)
    when = (await record_of(store, request_id))["next_poll_at"]
    gate: Gate = simulator.app[GATE]
    gate.close()

    # The poller takes the lease and asks Copernica, which holds its answer...
    visit = asyncio.create_task(service.app[POLLER].visit(request_id, when))
    await eventually(lambda: gate.waiting, lambda n: n > 0, what="the poller asking Copernica")
    leased = await record_of(store, request_id)
    assert leased["lease"] is not None
    # ...while the operator extends the deadline.
    async with service.http.post(
        f"{service.admin_url}/v1/data-requests/{request_id}/extend",
        json={"months": 1, "reason": "complex request"},
        headers=service.auth,
    ) as answer:
        assert answer.status == 200, await answer.text()
        extended = (await answer.json())["due_by"]
    gate.opened.set()
    await visit

    shown = await service.show(request_id)
    assert shown["extension"] is not None and shown["extension"]["months"] == 1
    assert shown["due_by"] == extended > leased["received_on"]
    # The visit's own write went on from the operator's: its lease released (else the
    # request would wait for the lease to run out), its next visit named.
    record = await record_of(store, request_id)
    assert record["lease"] is None and record["next_poll_at"] not in (None, when)
    # The request is still scheduled at the time its record names.
    assert f"due/{record['next_poll_at']}/{request_id}" in [
        key.removeprefix("copernica/") for key in await store.keys("due/")
    ]


# -- If-None-Match: * on record creation ---------------------------------------------------------


async def test_a_record_is_created_once(replica: Replica) -> None:
    first, second = Ledger(await replica(), b"k"), Ledger(await replica(), b"k")
    request_id = str(ULID())
    await first.create(AccessRequest.new(request_id, DataRequest("email", EMAIL)))

    with pytest.raises(PreconditionFailed):
        await second.create(AccessRequest.new(request_id, DataRequest("profile", "9")))

    stored, _ = await first.get(request_id)  # type: ignore[misc]
    assert (stored.subject.type, stored.subject.id) == ("email", EMAIL)


async def test_a_stalled_filer_resuming_after_a_takeover_does_not_file_twice(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    """A filer claimed an Idempotency-Key for its request id, then stalled before writing the
    record; a retry with the key took the id over and filed it. The stalled filer resumes."""
    service = await make_service()
    body, key = {"email": EMAIL}, "order-4711"
    stalled_id = str(ULID.from_timestamp(time.time() - 3600))  # long past any filing budget
    app, secret = service.app, hash_key(service.settings)
    archive, ledger = app[STORE], app[LEDGER]
    stalled = Filing(
        archive,
        ledger,
        Schedule(archive),
        DeadlineIndex(archive, ledger),
        app[COPERNICA],
        Discoverer(Account(app[COPERNICA]), archive, service.settings, ledger.digest_of),
        service.settings,
        app[METRICS],
        secret,
    )
    new = parse_new_request(body)
    # The stalled filer's claim, as `Filing._claim_key` wrote it.
    claim = {"request_id": stalled_id, "fingerprint": new.fingerprint}
    claim_key = app[STORE].keys.idempotency(_key_hash(secret, key))
    await store.client.put_object(Bucket=store.name, Key=claim_key, Body=json.dumps(claim))

    taken_over = await filed(service, body, **{"Idempotency-Key": key})
    # The stalled filer goes on: `_file` is `file` with the request id it had drawn.
    resumed = await stalled._file(new, key, stalled_id)

    assert taken_over["id"] == stalled_id
    assert resumed.first.copernica_id == taken_over["copernica_id"]
    assert len(simulator.state.requests) == 1  # one data request at Copernica
    shown = await service.show(stalled_id)
    assert shown["status"] == "pending" and shown["copernica_id"] == taken_over["copernica_id"]


# -- If-None-Match: * on the idempotency claim ---------------------------------------------------


async def test_one_idempotency_key_files_one_request(
    make_service: ServiceFactory, simulator: Simulator
) -> None:
    service = await make_service()
    first = await filed(service, {"email": EMAIL}, **{"Idempotency-Key": "k-1"})
    again = await filed(service, {"email": EMAIL}, **{"Idempotency-Key": "k-1"})
    async with await service.file({"profile": 5}, headers={"Idempotency-Key": "k-1"}) as other:
        other_status = other.status

    assert again["id"] == first["id"]
    assert other_status == 422  # the key stands for the first request, not this one
    assert len(simulator.state.requests) == 1


# -- If-None-Match: * on an events window -------------------------------------------------------


async def test_an_events_window_stored_once_is_never_replaced(
    replica: Replica, store: Bucket
) -> None:
    window = Window(date(2026, 1, 1), date(2026, 2, 1))
    request_id = str(ULID())
    sinks = []
    for _ in range(2):  # two replicas that both found the window missing
        archive = await replica()
        sink = S3Sink(archive, lambda w, a=archive: a.keys.events(request_id, w.name))
        assert not await sink.done(window)
        sinks.append(sink)

    await sinks[0].write(window, b'{"event":"open"}\n', 1)
    await sinks[1].write(window, b'{"event":"open"}\n{"event":"click"}\n', 2)

    [key] = await store.keys(f"events/{request_id}/")
    assert await store.read(key) == b'{"event":"open"}\n'
    assert (await store.head(key))["Metadata"]["events"] == "1"
    assert await sinks[1].done(window)
