"""A model of the lease and schedule protocol: replicas interleaving the steps of filing and
visiting one request, crashing mid-way and outliving their leases, against the real ledger
code and real S3 semantics (moto, through ArchiveStore).

What is driven, and how:
- The request is filed as `Filing._file` does it (marker first, then the record created with
  the filer's lease, then the lease released) and visited as `Poller._visit` and
  `Poller._finish` do it (read the record, drop a marker that is not its current one, take the
  lease with a conditional save, work, then new marker, record, old marker). Those two
  methods run each as one piece, so the steps are re-expressed here, one S3 step per rule,
  each calling the real `Ledger` methods (`schedule`, `unschedule`, `due`, `get`, `create`,
  `save`) and `RequestRecord` methods (`take_lease`, `leased_to_other`, `mark_*`), with
  `Poller._marker_is_stale` deciding about a marker that is not the record's current one.
  One rule runs the real `Poller._finish` whole instead of the finish steps.
  The work itself (asking Copernica) touches no S3 and is a choice: come back later, or final.
- Any marker may be picked by a visitor, not only those due by the clock: between two steps
  of one replica, any time may pass on another (a stall, an S3 retry, a short interval).
- A crash drops a replica's visit wherever it is; the replica comes back as a new process
  (a new lease owner).
- Time: `utcnow` is not injectable in the ledger, and leases that run out on the real clock
  would make each run take other branches (hypothesis needs the same choices to give the same
  run). So a lease either never runs out here (3600 s) or has run out before anybody else
  looks (-1 s: its holder outlives it, stalled or slow). Nothing is lost by that: a replica
  that meets a lease still running only leaves the record alone, which a run can always
  do by not stepping that replica; what a run-out lease allows (another replica takes over
  while the first still works, then the first finishes) is all reachable.

Invariants, after every step:
- at most one replica holds an unexpired lease on the request (filer or visitor);
- no write is lost: a conditional save succeeds only if nothing was written since its read;
- a request that is not final has the schedule marker its record's `next_poll_at` names.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from ulid import ULID

from service.answer.package import PackageBuilder
from service.answer.retention import Retention
from service.clock import parse_isoformat, utcnow
from service.collect.filing import FILING_OWNER
from service.collect.poller import Poller, Visit
from service.config import Settings
from service.metrics import Metrics
from service.requests.ledger import Ledger, stamp
from service.requests.records import RequestRecord
from service.storage.s3 import ArchiveStore, PreconditionFailed, s3_client
from tests.conftest import make_settings

T = TypeVar("T")

# Lease seconds: LONG never runs out here; RUN_OUT has run out before anybody else looks, as
# when its holder outlives it (stalls, or works longer than its lease).
LONG, RUN_OUT = 3600.0, -1.0
REPLICAS = 3
HASH_KEY = b"lease-model"
COME_BACK = 60.0  # seconds to the next visit when the work is not final


def poller_for(store: ArchiveStore, settings: Settings, metrics: Metrics) -> Poller:
    """A replica's Poller with its own Ledger. What the model and the tests below call of it
    (`visit` up to the lease, `_marker_is_stale`, `_finish`) uses the ledger, settings,
    metrics and hash key only: no Copernica client, intake or filing is given, none is called.
    """
    ledger = Ledger(store, HASH_KEY)
    return Poller(
        store,
        ledger,
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        PackageBuilder(store, None),
        Retention(store, ledger, 0, metrics, HASH_KEY),
        settings,
        metrics,
        HASH_KEY,
    )


@dataclass
class World:
    """What every example shares: one event loop and one S3 client on it, one bucket."""

    loop: asyncio.AbstractEventLoop
    client: Any
    settings: Settings

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(work)


WORLD: World | None = None


@dataclass
class Visiting:
    """One replica's visit in progress: the step it is at and what it knows."""

    when: str  # the marker it is visiting
    record: RequestRecord
    etag: str
    seen: int  # writes to the record when it was read
    step: str = "read"  # read -> leased -> marked -> saved
    lease_until: datetime | None = None
    wrote: int = 0  # writes to the record right after this visit's own lease write


@dataclass
class Replica:
    slot: int
    life: int
    ledger: Ledger
    poller: Poller
    visit: Visiting | None = None

    @property
    def owner(self) -> str:
        return self.poller.owner


class LeaseModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        assert WORLD is not None
        self.world = WORLD
        prefix = f"m{uuid.uuid4().hex[:12]}/"  # a fresh corner of the bucket per example
        self.settings = make_settings(
            ARCHIVE_BUCKET=WORLD.settings.archive_bucket or "",
            S3_ENDPOINT_URL=WORLD.settings.s3_endpoint_url or "",
            ARCHIVE_PREFIX=prefix,
        )
        self.metrics = Metrics()
        self.store = ArchiveStore(WORLD.client, self.settings, self.metrics)
        self.request_id = str(ULID())
        self.replicas = [self._start(slot, 0) for slot in range(REPLICAS)]
        # The filer: new -> marked -> leased -> done.
        self.filer = "new"
        self.filer_record: RequestRecord | None = None
        self.filer_etag = ""
        self.filer_until: datetime | None = None
        self.filer_wrote = 0  # writes to the record right after the filer created it
        self.writes = 0  # successful writes of the record, in the order S3 took them
        self.changed = True  # S3 may have changed since the schedule was last checked

    def _start(self, slot: int, life: int) -> Replica:
        poller = poller_for(self.store, self.settings, self.metrics)
        poller.owner = f"replica-{slot}.{life}"  # one process here: REPLICA would be shared
        return Replica(slot, life, poller._ledger, poller)

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return self.world.run(work)

    def write(self, work: Coroutine[Any, Any, T]) -> T:
        """Run a step that may change S3 (the schedule check looks again after one)."""
        self.changed = True
        return self.world.run(work)

    # -- filing (Filing._file) ---------------------------------------------------------------

    @initialize(lease=st.sampled_from([LONG, RUN_OUT]))
    def file_marker(self, lease: float) -> None:
        """The marker goes first. (A filer that crashes, or stalls beyond its lease, is one
        that takes no further step here.)"""
        record = RequestRecord(
            id=self.request_id,
            subject_type="email",
            subject_id="someone@example.com",
            next_poll_at=stamp(utcnow() + timedelta(seconds=COME_BACK)),
            received_on=utcnow().date().isoformat(),
        )
        assert record.next_poll_at is not None
        self.write(self.replicas[0].ledger.schedule(record.id, record.next_poll_at))
        record.take_lease(FILING_OWNER, lease)
        self.filer_record, self.filer = record, "marked"

    @precondition(lambda self: self.filer == "marked")
    @rule()
    def file_record(self) -> None:
        """The record, created with `If-None-Match: *`, leased to the filer."""
        record = self.filer_record
        assert record is not None and record.lease is not None
        self.filer_etag = self.write(self.replicas[0].ledger.create(record))
        self.writes += 1
        self.filer_wrote = self.writes
        self.filer_until = parse_isoformat(record.lease["until"])
        self.filer = "leased"

    @precondition(lambda self: self.filer == "leased")
    @rule()
    def file_done(self) -> None:
        """Copernica took it: pending, and the filer's lease released."""
        record = self.filer_record
        assert record is not None
        record.mark_pending("4711")
        record.lease = None
        try:
            self.write(self.replicas[0].ledger.save(record, self.filer_etag))
        except PreconditionFailed:
            pass  # a visitor took over after the filer's lease ran out
        else:
            assert self.filer_wrote == self.writes, "the filer saved over a write it never saw"
            self.writes += 1
        self.filer = "done"

    # -- a visit (Poller._visit, then Poller._finish) ----------------------------------------

    def _idle(self) -> list[Replica]:
        return [r for r in self.replicas if r.visit is None]

    def _at(self, step: str) -> list[Replica]:
        return [r for r in self.replicas if r.visit is not None and r.visit.step == step]

    @precondition(lambda self: self._idle())
    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        """A replica lists the schedule, picks a marker of the request and reads the record;
        a marker that is not the record's current one is dropped if certainly stale, and a
        record leased to another replica is left alone."""
        replica = data.draw(st.sampled_from(self._idle()), label="replica")
        ledger = replica.ledger
        far = utcnow() + timedelta(days=1)  # any marker may be due by now: see the docstring
        markers = [when for when, rid in self.run(ledger.due(far, 100)) if rid == self.request_id]
        if not markers:
            return
        when = data.draw(st.sampled_from(markers), label="marker")
        seen = self.writes
        found = self.run(ledger.get(self.request_id))
        if found is None or found[0].finished or found[0].next_poll_at != when:
            if replica.poller._marker_is_stale(found, when):
                self.write(ledger.unschedule(self.request_id, when))
            return
        record, etag = found
        if record.leased_to_other(replica.owner):
            return
        replica.visit = Visiting(when, record, etag, seen)

    @precondition(lambda self: self._at("read"))
    @rule(data=st.data(), lease=st.sampled_from([LONG, RUN_OUT]))
    def take_lease(self, data: st.DataObject, lease: float) -> None:
        replica = data.draw(st.sampled_from(self._at("read")), label="replica")
        visit = replica.visit
        assert visit is not None
        visit.record.take_lease(replica.owner, lease)
        try:
            visit.etag = self.write(replica.ledger.save(visit.record, visit.etag))
        except PreconditionFailed:
            replica.visit = None  # another replica took it first
            return
        assert visit.seen == self.writes, "a lease was taken over a write its taker never saw"
        self.writes += 1
        visit.wrote = self.writes
        assert visit.record.lease is not None
        visit.lease_until = parse_isoformat(visit.record.lease["until"])
        visit.step = "leased"

    @precondition(lambda self: self._at("leased"))
    @rule(data=st.data(), final=st.sampled_from([False, False, False, True]))
    def put_new_marker(self, data: st.DataObject, final: bool) -> None:
        """The work is done; the next visit's marker goes first (none if final)."""
        replica = data.draw(st.sampled_from(self._at("leased")), label="replica")
        visit = replica.visit
        assert visit is not None
        record = visit.record
        record.lease = None
        if final:
            record.mark_expired("model: final")
            record.next_poll_at = None
        else:
            record.next_poll_at = stamp(utcnow() + timedelta(seconds=COME_BACK))
            self.write(replica.ledger.schedule(record.id, record.next_poll_at))
        visit.step = "marked"

    @precondition(lambda self: self._at("marked"))
    @rule(data=st.data())
    def save_record(self, data: st.DataObject) -> None:
        replica = data.draw(st.sampled_from(self._at("marked")), label="replica")
        visit = replica.visit
        assert visit is not None
        try:
            self.write(replica.ledger.save(visit.record, visit.etag))
        except PreconditionFailed:
            replica.visit = None  # changed while we worked: our new marker is stale
            return
        assert visit.wrote == self.writes, "a visit saved over a write it never saw"
        self.writes += 1
        visit.step = "saved"

    @precondition(lambda self: self._at("saved"))
    @rule(data=st.data())
    def drop_old_marker(self, data: st.DataObject) -> None:
        replica = data.draw(st.sampled_from(self._at("saved")), label="replica")
        visit = replica.visit
        assert visit is not None
        self.write(replica.ledger.unschedule(self.request_id, visit.when))
        replica.visit = None

    @precondition(lambda self: self._at("leased"))
    @rule(data=st.data(), final=st.sampled_from([False, False, False, True]))
    def finish_whole(self, data: st.DataObject, final: bool) -> None:
        """The real `Poller._finish`: new marker, record, old marker in one go."""
        replica = data.draw(st.sampled_from(self._at("leased")), label="replica")
        visit = replica.visit
        assert visit is not None
        record = visit.record
        if final:
            record.mark_expired("model: final")
        result = Visit("expired" if final else "not_ready", None if final else COME_BACK)
        self.write(replica.poller._finish(record, visit.etag, visit.when, result))
        replica.visit = None
        stored = self.run(self.store.get(self.store.keys.record(self.request_id)))
        assert stored is not None
        if stored.body == record.to_bytes():  # `_finish` saved it (it says so only in a log)
            assert visit.wrote == self.writes, "a visit saved over a write it never saw"
            self.writes += 1

    # -- faults and time ---------------------------------------------------------------------

    @precondition(lambda self: any(r.visit is not None for r in self.replicas))
    @rule(data=st.data())
    def replica_crashes(self, data: st.DataObject) -> None:
        """A replica dies mid-visit and comes back as a new process (a new lease owner)."""
        busy = [r for r in self.replicas if r.visit is not None]
        replica = data.draw(st.sampled_from(busy), label="replica")
        self.replicas[replica.slot] = self._start(replica.slot, replica.life + 1)

    def _leases(self) -> list[datetime]:
        """The lease of every replica that holds one now: visitors past their lease write
        and before their result is saved, and the filer between its create and release."""
        found = [
            r.visit.lease_until
            for r in self.replicas
            if r.visit is not None and r.visit.step in ("leased", "marked") and r.visit.lease_until
        ]
        if self.filer == "leased" and self.filer_until is not None:
            found.append(self.filer_until)
        return found

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def one_lease_at_a_time(self) -> None:
        now = utcnow()
        running = [until for until in self._leases() if until > now]
        assert len(running) <= 1, f"{len(running)} replicas hold an unexpired lease"

    @invariant()
    def every_open_request_is_scheduled(self) -> None:
        if not self.changed:
            return  # nothing was written since the last look
        self.changed = False
        found = self.run(self.store.get(self.store.keys.record(self.request_id)))
        if found is None:
            return
        record = RequestRecord.from_bytes(found.body)
        if record.finished:
            return
        assert record.next_poll_at is not None, "an open request without a next visit"
        marker = f"{self.store.keys.prefix}due/{record.next_poll_at}/{record.id}"
        assert self.run(self.store.head(marker)) is not None, (
            f"no schedule marker for the record's next visit {record.next_poll_at}"
        )


MODEL_SETTINGS = settings(
    max_examples=50,
    stateful_step_count=25,
    deadline=None,
    derandomize=True,  # the same interleavings every run: a mutation is caught or not, always
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
    # `python -m tests.mutate` needs red or green only: LEASE_MODEL_SHRINK=0 reports a failing
    # run as found instead of shrinking it (which can take hypothesis' limit, 5 minutes).
    phases=[
        p for p in Phase if p is not Phase.shrink or os.environ.get("LEASE_MODEL_SHRINK") != "0"
    ],
)


# Passing takes well under a minute; a failing run is shrunk, which hypothesis bounds at 5.
@pytest.mark.timeout(420)
def test_leases_and_schedule_hold_whatever_the_interleaving(s3_endpoint: str) -> None:
    global WORLD
    loop = asyncio.new_event_loop()
    bucket = f"lease-model-{uuid.uuid4().hex[:12]}"
    world_settings = make_settings(ARCHIVE_BUCKET=bucket, S3_ENDPOINT_URL=s3_endpoint)
    stack = contextlib.AsyncExitStack()
    try:
        client = loop.run_until_complete(stack.enter_async_context(s3_client(world_settings)))
        loop.run_until_complete(client.create_bucket(Bucket=bucket))
        WORLD = World(loop, client, world_settings)
        run_state_machine_as_test(LeaseModel, settings=MODEL_SETTINGS)
    finally:
        WORLD = None
        loop.run_until_complete(stack.aclose())
        loop.close()


# -- the interleavings the model found, as plain tests of the real `Poller.visit` -------------


@pytest.fixture
async def replicas(s3_endpoint: str, bucket: str) -> AsyncIterator[tuple[Poller, Poller]]:
    """Two replicas' pollers on one bucket, each with its own S3 client."""
    settings = make_settings(ARCHIVE_BUCKET=bucket, S3_ENDPOINT_URL=s3_endpoint)
    async with s3_client(settings) as one, s3_client(settings) as other:
        first = poller_for(ArchiveStore(one, settings, Metrics()), settings, Metrics())
        second = poller_for(ArchiveStore(other, settings, Metrics()), settings, Metrics())
        first.owner, second.owner = "replica-a", "replica-b"
        yield first, second


async def scheduled(ledger: Ledger, request_id: str) -> list[str]:
    return [
        when
        for when, rid in await ledger.due(utcnow() + timedelta(days=1), 100)
        if rid == request_id
    ]


async def test_a_visit_during_filing_leaves_the_new_request_scheduled(
    replicas: tuple[Poller, Poller],
) -> None:
    """Filing puts the marker, then creates the record: a replica that meets the marker in
    between must not drop it (the record, once written, names it)."""
    filer, poller = replicas[0]._ledger, replicas[1]
    record = RequestRecord(
        id=str(ULID()),
        subject_type="email",
        subject_id="someone@example.com",
        next_poll_at=stamp(utcnow()),
    )
    assert record.next_poll_at is not None
    await filer.schedule(record.id, record.next_poll_at)

    await poller.visit(record.id, record.next_poll_at)  # no record yet
    await filer.create(record)

    assert await scheduled(filer, record.id) == [record.next_poll_at]


async def test_a_visit_during_a_reschedule_leaves_the_new_marker(
    replicas: tuple[Poller, Poller],
) -> None:
    """A visit puts its next marker, then saves the record naming it: a replica that meets
    the new marker in between must not drop it."""
    first, second = replicas
    ledger = first._ledger
    old = stamp(utcnow())
    record = RequestRecord(
        id=str(ULID()), subject_type="email", subject_id="someone@example.com", next_poll_at=old
    )
    record.mark_pending("4711")
    await ledger.schedule(record.id, old)
    etag = await ledger.create(record)
    # The first replica's visit: lease taken, work done, its next marker put...
    record.take_lease(first.owner, 600)
    etag = await ledger.save(record, etag)
    record.lease, record.next_poll_at = None, stamp(utcnow())
    await ledger.schedule(record.id, record.next_poll_at)

    await second.visit(record.id, record.next_poll_at)  # ...when the second meets that marker
    await ledger.save(record, etag)  # the first goes on: the record names its new marker
    await ledger.unschedule(record.id, old)

    assert await scheduled(ledger, record.id) == [record.next_poll_at]


async def test_markers_certainly_stale_are_still_dropped(replicas: tuple[Poller, Poller]) -> None:
    """A marker before the record's next visit, or of a finished request, goes when met."""
    poller = replicas[0]
    ledger = poller._ledger
    earlier, current = stamp(utcnow() - timedelta(seconds=1)), stamp(utcnow())
    record = RequestRecord(
        id=str(ULID()), subject_type="email", subject_id="someone@example.com", next_poll_at=current
    )
    record.mark_pending("4711")
    for when in (earlier, current):
        await ledger.schedule(record.id, when)
    etag = await ledger.create(record)

    await poller.visit(record.id, earlier)
    assert await scheduled(ledger, record.id) == [current]

    record.mark_expired("gone")
    await ledger.save(record, etag)
    await poller.visit(record.id, current)
    assert await scheduled(ledger, record.id) == []
