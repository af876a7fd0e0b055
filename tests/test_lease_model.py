"""A model of the lease and schedule protocol: replicas interleaving the steps of filing and
visiting one request, crashing mid-way and outliving their leases, against the real visit
protocol (`service.collect.visits.Poller.visit`), the real ledger code and real S3 semantics
(moto, through ArchiveStore).

What is driven, and how:
- Each replica's visit is the real `Poller.visit`, run as a task, with a scripted work
  function in place of `RequestWork.do` (the work touches no S3 and is a choice: come back
  later, or final). Every S3 call of a replica waits at its gate (its S3 client is wrapped):
  one rule lets one call through, so replicas interleave S3 call by S3 call, and the work is
  one more stop (where the rule chooses its outcome). Steps of one replica are those of the
  protocol: read the record, take the lease with a conditional save, work, then new marker,
  record, old marker; or drop a stale marker; or leave the record alone.
- The request is filed as `Filing._file` does it (marker first, then the record created with
  the filer's lease, then the lease released), with the real `Ledger` methods, re-expressed
  here one S3 step per rule: filing is not what this model is about.
- Any marker may be picked by a visitor, not only those due by the clock: between two steps
  of one replica, any time may pass on another (a stall, an S3 retry, a short interval).
- A crash cancels a replica's visit at whatever S3 call it waits for; the replica comes back
  as a new process (a new lease owner).
- Time: a lease is taken and checked on the system clock (`AccessRequest.take_lease` and
  `leased_to_other` take no `Clock`), and leases that run out on the real clock would make
  each run take other branches (hypothesis needs the same choices to give the same run). So
  a lease either never runs out here (3600 s) or has run out before anybody else looks
  (-1 s: its holder outlives it, stalled or slow). Nothing is lost by that: a replica
  that meets a lease still running only leaves the record alone, which a run can always
  do by not stepping that replica; what a run-out lease allows (another replica takes over
  while the first still works, then the first finishes) is all reachable.

What is observed: the wrapped S3 client of every actor (a replica's life, the filer) notes in
a `Journal` each write of the record as S3 took it, and what that actor had seen of the record
before it (its last read, or its own last write). The model keeps no copy of the protocol's
steps: a change to `visits.py` shows here as it is.

Invariants, after every step:
- at most one actor holds an unexpired lease on the request (between its successful lease
  write, or the filer's create, and its next write of the record);
- a replica works on the request only while it holds the lease (its lease write succeeded);
- no write is lost: a write of the record succeeds only if nothing was written since the
  writer's read;
- a request that is not final has the schedule marker its record's `next_poll_at` names.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

import botocore.exceptions
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

from service.clock import utcnow
from service.collect.filing import FILING_OWNER
from service.collect.visits import Checkpoint, Poller, Visit, Work
from service.config import Settings
from service.metrics import Metrics
from service.requests.ledger import Ledger
from service.requests.records import AccessRequest, DataRequest
from service.requests.schedule import Schedule, stamp
from service.storage.s3 import ArchiveStore, PreconditionFailed, s3_client
from tests.conftest import make_settings

# On moto and on SeaweedFS (tests/conftest.py): the test ids say which.
# Over ~20 s in all: left out of the quick subset, `pytest -m "not slow"`.
pytestmark = [pytest.mark.both_stores, pytest.mark.slow]

T = TypeVar("T")

# Lease seconds: LONG never runs out here; RUN_OUT has run out before anybody else looks, as
# when its holder outlives it (stalls, or works longer than its lease).
LONG, RUN_OUT = 3600.0, -1.0
REPLICAS = 3
HASH_KEY = b"lease-model"
COME_BACK = 60.0  # seconds to the next visit when the work is not final
# One step in eight is a crash instead (as its own rule, a crash was one rule in three, and
# few visits got past their lease).
CRASH = st.sampled_from([False] * 7 + [True])
S3_CALLS = {"get_object", "put_object", "delete_object", "head_object", "list_objects_v2"}


def poller_for(
    ledger: Ledger, schedule: Schedule, work: Work, settings: Settings, metrics: Metrics
) -> Poller:
    """A replica's Poller: the real visit protocol, with `work` as what a visit does."""
    return Poller(ledger, schedule, work, settings, metrics, HASH_KEY)


async def no_work(record: AccessRequest, checkpoint: Checkpoint) -> Visit:
    raise AssertionError(f"the work was called for {record.id}: no visit should get that far")


@dataclass
class World:
    """What every example shares: one event loop and one S3 client on it, one bucket."""

    loop: asyncio.AbstractEventLoop
    client: Any
    settings: Settings

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(work)


WORLD: World | None = None


# -- observing S3 ----------------------------------------------------------------------------


class Gate:
    """Holds an actor's next S3 call (or its work) until the model lets it through."""

    def __init__(self) -> None:
        self.parked = asyncio.Event()  # the actor waits here
        self._go = asyncio.Event()
        self.at = ""  # what it waits to do: an S3 operation, or "work"

    async def enter(self, what: str) -> None:
        self.at = what
        self._go.clear()
        self.parked.set()
        await self._go.wait()

    def release(self) -> None:
        self.at = ""
        self.parked.clear()
        self._go.set()


@dataclass
class Actor:
    """A filer or one life of a replica, as S3 sees it."""

    owner: str
    lease: float  # the seconds of the lease it takes
    seen: int = 0  # writes of the record it had seen: its last read, or its own last write
    holding_until: datetime | None = None  # its lease, while it believes it holds one


@dataclass
class Journal:
    """Every write of the record as S3 took it, and the lost writes found among them."""

    record_key: str
    writes: int = 0
    changed: bool = True  # S3 may have changed since the schedule was last checked
    lost: list[str] = field(default_factory=list)

    def read(self, actor: Actor) -> None:
        actor.seen = self.writes

    def wrote(self, actor: Actor) -> None:
        if actor.seen != self.writes:
            self.lost.append(
                f"{actor.owner} wrote the record over {self.writes - actor.seen} write(s) "
                "it never saw"
            )
        self.writes += 1
        actor.seen = self.writes
        # The first write of a visit (its lease) or of the filer (its create) takes the lease;
        # the next one (the finish, or the filer's release) gives it up.
        if actor.holding_until is None:
            actor.holding_until = utcnow() + timedelta(seconds=actor.lease)
        else:
            actor.holding_until = None


class ObservedS3:
    """An actor's S3 client: each call waits at the actor's gate (if it has one), and what
    the call did to the record is noted in the journal. Everything else is the real client."""

    def __init__(self, client: Any, actor: Actor, journal: Journal, gate: Gate | None) -> None:
        self._client = client
        self._actor = actor
        self._journal = journal
        self._gate = gate

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if name not in S3_CALLS:
            return method

        async def call(**kwargs: Any) -> Any:
            if self._gate is not None:
                await self._gate.enter(name)
            on_record = kwargs.get("Key") == self._journal.record_key
            try:
                answer = await method(**kwargs)
            except botocore.exceptions.ClientError:
                if on_record and name == "put_object":
                    self._actor.holding_until = None  # a failed write ends what it was doing
                raise
            if name in ("put_object", "delete_object"):
                self._journal.changed = True
            if on_record and name == "get_object":
                self._journal.read(self._actor)
            elif on_record and name == "put_object":
                self._journal.wrote(self._actor)
            return answer

        return call


# -- the model -------------------------------------------------------------------------------


@dataclass
class Replica:
    slot: int
    life: int
    actor: Actor
    gate: Gate
    ledger: Ledger
    schedule: Schedule
    task: asyncio.Task[None] | None = None
    final: bool = False  # what its work decides when let through

    @property
    def owner(self) -> str:
        return self.actor.owner


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
        self.store = ArchiveStore(WORLD.client, self.settings, self.metrics)  # the model's look
        self.look = Schedule(self.store)
        self.request_id = str(ULID())
        self.journal = Journal(self.store.keys.record(self.request_id))
        self.replicas = [self._start(slot, 0) for slot in range(REPLICAS)]
        # The filer: new -> marked -> leased -> done.
        self.filer = "new"
        self.filer_actor = Actor(FILING_OWNER, LONG)
        filer_store = self._store(self.filer_actor, None)
        self.filer_ledger = Ledger(filer_store, HASH_KEY)
        self.filer_schedule = Schedule(filer_store)
        self.filer_record: AccessRequest | None = None
        self.filer_etag = ""
        self.unleased: list[str] = []  # works begun without the lease

    def _store(self, actor: Actor, gate: Gate | None) -> ArchiveStore:
        client = ObservedS3(self.world.client, actor, self.journal, gate)
        return ArchiveStore(client, self.settings, self.metrics)

    def _start(self, slot: int, life: int) -> Replica:
        # One process here: each replica's life its own lease owner (REPLICA would be shared).
        actor, gate = Actor(f"replica-{slot}.{life}", LONG), Gate()
        store = self._store(actor, gate)
        return Replica(slot, life, actor, gate, Ledger(store, HASH_KEY), Schedule(store))

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return self.world.run(work)

    # -- filing (Filing._file) ---------------------------------------------------------------

    @initialize(lease=st.sampled_from([LONG, RUN_OUT]))
    def file_marker(self, lease: float) -> None:
        """The marker goes first. (A filer that crashes, or stalls beyond its lease, is one
        that takes no further step here.)"""
        record = AccessRequest.new(
            self.request_id,
            DataRequest("email", "someone@example.com"),
            next_poll_at=stamp(utcnow() + timedelta(seconds=COME_BACK)),
            received_on=utcnow().date().isoformat(),
        )
        assert record.next_poll_at is not None
        self.run(self.filer_schedule.schedule(record.id, record.next_poll_at))
        record.take_lease(FILING_OWNER, utcnow() + timedelta(seconds=lease))
        self.filer_actor.lease = lease
        self.filer_record, self.filer = record, "marked"

    @precondition(lambda self: self.filer == "marked")
    @rule()
    def file_record(self) -> None:
        """The record, created with `If-None-Match: *`, leased to the filer."""
        assert self.filer_record is not None
        self.filer_etag = self.run(self.filer_ledger.create(self.filer_record))
        self.filer = "leased"

    @precondition(lambda self: self.filer == "leased")
    @rule()
    def file_done(self) -> None:
        """Copernica took it: pending, and the filer's lease released."""
        record = self.filer_record
        assert record is not None
        record.first.mark_pending("4711")
        record.lease = None
        with contextlib.suppress(PreconditionFailed):  # a visitor took over after the lease
            self.run(self.filer_ledger.save(record, self.filer_etag))
        self.filer = "done"

    # -- visits (Poller.visit, the real one) ---------------------------------------------------

    def _idle(self) -> list[Replica]:
        return [r for r in self.replicas if r.task is None]

    def _busy(self) -> list[Replica]:
        return [r for r in self.replicas if r.task is not None]

    def _work_of(self, replica: Replica) -> Work:
        async def work(record: AccessRequest, checkpoint: Checkpoint) -> Visit:
            if replica.actor.holding_until is None:
                self.unleased.append(f"{replica.owner} works without a lease it wrote")
            await replica.gate.enter("work")
            if replica.final:
                record.first.mark_expired("model: final")
                return Visit("expired", None)
            return Visit("not_ready", COME_BACK)

        return work

    def _settle(self, replica: Replica) -> None:
        """Run the replica's visit until it waits at its gate again, or has ended."""
        task = replica.task
        assert task is not None

        async def settled() -> None:
            parked = asyncio.ensure_future(replica.gate.parked.wait())
            try:
                await asyncio.wait({parked, task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                parked.cancel()

        self.run(settled())
        if task.done():
            replica.task = None
            replica.actor.holding_until = None  # its visit is over, whatever it held
            if not task.cancelled():
                task.result()  # a visit that raised is a failure of the model's run

    @precondition(lambda self: self._idle())
    @rule(data=st.data(), lease=st.sampled_from([LONG, RUN_OUT]))
    def start_visit(self, data: st.DataObject, lease: float) -> None:
        """An idle replica picks a marker of the request from the schedule and starts its
        visit (which first waits to read the record)."""
        replica = data.draw(st.sampled_from(self._idle()), label="replica")
        far = utcnow() + timedelta(days=1)  # any marker may be due by now: see the docstring
        due = self.run(self.look.due(far, 100))
        markers = [when for when, rid in due if rid == self.request_id]
        if not markers:
            return
        when = data.draw(st.sampled_from(markers), label="marker")
        replica.actor.lease = lease
        settings = dataclasses.replace(self.settings, poll_lease_seconds=lease)
        poller = poller_for(
            replica.ledger, replica.schedule, self._work_of(replica), settings, self.metrics
        )
        poller.owner = replica.owner
        replica.task = self.world.loop.create_task(poller.visit(self.request_id, when))
        self._settle(replica)

    @precondition(lambda self: self._busy())
    @rule(data=st.data(), final=st.sampled_from([False, False, False, True]), crash=CRASH)
    def step(self, data: st.DataObject, final: bool, crash: bool) -> None:
        """A busy replica makes its next S3 call (or does its work, final or not); or dies
        there and comes back as a new process (a new lease owner)."""
        replica = data.draw(st.sampled_from(self._busy()), label="replica")
        if crash:
            assert replica.task is not None
            replica.task.cancel()
            self._settle(replica)
            self.replicas[replica.slot] = self._start(replica.slot, replica.life + 1)
            return
        replica.final = final
        replica.gate.release()
        self._settle(replica)

    def teardown(self) -> None:
        for replica in self._busy():
            assert replica.task is not None
            replica.task.cancel()
            self._settle(replica)

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def one_lease_at_a_time(self) -> None:
        now = utcnow()
        actors = [self.filer_actor, *(r.actor for r in self.replicas)]
        running = [a.owner for a in actors if a.holding_until and a.holding_until > now]
        assert len(running) <= 1, f"{running} hold an unexpired lease at once"

    @invariant()
    def only_a_lease_holder_works(self) -> None:
        assert not self.unleased, self.unleased[0]

    @invariant()
    def no_write_is_lost(self) -> None:
        assert not self.journal.lost, self.journal.lost[0]

    @invariant()
    def every_open_request_is_scheduled(self) -> None:
        if not self.journal.changed:
            return  # nothing was written since the last look
        self.journal.changed = False
        found = self.run(self.store.get(self.store.keys.record(self.request_id)))
        if found is None:
            return
        record = AccessRequest.from_bytes(found.body)
        if record.finished:
            return
        assert record.next_poll_at is not None, "an open request without a next visit"
        marker = self.store.keys.schedule_marker(record.id, record.next_poll_at)
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


@dataclass
class Side:
    """One replica: its poller (whose work must never be reached here), its ledger and
    schedule."""

    poller: Poller
    ledger: Ledger
    schedule: Schedule


@pytest.fixture
async def replicas(s3_endpoint: str, bucket: str) -> AsyncIterator[tuple[Side, Side]]:
    """Two replicas' pollers on one bucket, each with its own S3 client."""
    settings = make_settings(ARCHIVE_BUCKET=bucket, S3_ENDPOINT_URL=s3_endpoint)
    async with s3_client(settings) as one, s3_client(settings) as other:
        sides = []
        for client, owner in ((one, "replica-a"), (other, "replica-b")):
            store = ArchiveStore(client, settings, Metrics())
            ledger, schedule = Ledger(store, HASH_KEY), Schedule(store)
            poller = poller_for(ledger, schedule, no_work, settings, Metrics())
            poller.owner = owner
            sides.append(Side(poller, ledger, schedule))
        yield sides[0], sides[1]


async def scheduled(schedule: Schedule, request_id: str) -> list[str]:
    return [
        when
        for when, rid in await schedule.due(utcnow() + timedelta(days=1), 100)
        if rid == request_id
    ]


async def test_a_visit_during_filing_leaves_the_new_request_scheduled(
    replicas: tuple[Side, Side],
) -> None:
    """Filing puts the marker, then creates the record: a replica that meets the marker in
    between must not drop it (the record, once written, names it)."""
    filer, poller = replicas[0].ledger, replicas[1].poller
    schedule = replicas[0].schedule
    record = AccessRequest.new(
        str(ULID()), DataRequest("email", "someone@example.com"), next_poll_at=stamp(utcnow())
    )
    assert record.next_poll_at is not None
    await schedule.schedule(record.id, record.next_poll_at)

    await poller.visit(record.id, record.next_poll_at)  # no record yet
    await filer.create(record)

    assert await scheduled(schedule, record.id) == [record.next_poll_at]


async def test_a_visit_during_a_reschedule_leaves_the_new_marker(
    replicas: tuple[Side, Side],
) -> None:
    """A visit puts its next marker, then saves the record naming it: a replica that meets
    the new marker in between must not drop it."""
    first, second = replicas
    ledger, schedule = first.ledger, first.schedule
    old = stamp(utcnow())
    record = AccessRequest.new(
        str(ULID()), DataRequest("email", "someone@example.com"), next_poll_at=old
    )
    record.first.mark_pending("4711")
    await schedule.schedule(record.id, old)
    etag = await ledger.create(record)
    # The first replica's visit: lease taken, work done, its next marker put...
    record.take_lease(first.poller.owner, utcnow() + timedelta(seconds=600))
    etag = await ledger.save(record, etag)
    record.lease, record.next_poll_at = None, stamp(utcnow())
    await schedule.schedule(record.id, record.next_poll_at)

    await second.poller.visit(record.id, record.next_poll_at)  # ...when the second meets it
    await ledger.save(record, etag)  # the first goes on: the record names its new marker
    await schedule.unschedule(record.id, old)

    assert await scheduled(schedule, record.id) == [record.next_poll_at]


async def test_markers_certainly_stale_are_still_dropped(replicas: tuple[Side, Side]) -> None:
    """A marker before the record's next visit, or of a finished request, goes when met."""
    poller, ledger, schedule = replicas[0].poller, replicas[0].ledger, replicas[0].schedule
    earlier, current = stamp(utcnow() - timedelta(seconds=1)), stamp(utcnow())
    record = AccessRequest.new(
        str(ULID()), DataRequest("email", "someone@example.com"), next_poll_at=current
    )
    record.first.mark_pending("4711")
    for when in (earlier, current):
        await schedule.schedule(record.id, when)
    etag = await ledger.create(record)

    await poller.visit(record.id, earlier)
    assert await scheduled(schedule, record.id) == [current]

    record.first.mark_expired("gone")
    await ledger.save(record, etag)
    await poller.visit(record.id, current)
    assert await scheduled(schedule, record.id) == []
