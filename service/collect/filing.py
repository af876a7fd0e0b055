"""Filing data requests: validate, record first (`submitting`), then ask Copernica.

The record exists before Copernica is called, so a crash in between leaves a `submitting`
record to recover rather than a request nobody knows about. An `Idempotency-Key` maps to one
request id through an object created with `If-None-Match: *`: a retried POST finds the first
request instead of filing a second one at Copernica.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import structlog
from ulid import ULID

from service.answer.retention import note_ended
from service.clock import SYSTEM, Clock, isoformat, utcnow
from service.collect.discovery import Discoverer
from service.collect.events import lookback, request_windows
from service.config import Settings
from service.copernica.account import SourceGone, typed_error
from service.copernica.client import (
    Backoff,
    CopernicaClient,
    CopernicaError,
    CopernicaUnavailable,
    says_unsupported,
)
from service.copernica.events import EventsInputError, add_months, parse_day, plan
from service.copernica.subject import Subject
from service.errors import Conflict, InvalidInput, Unprocessable
from service.intake.urls import FIRST, SOURCE, callback_url
from service.logs import subject_hash
from service.metrics import Metrics
from service.requests.deadline import DeadlineInputError, parse_received_on
from service.requests.deadline_index import DeadlineIndex
from service.requests.ledger import Ledger, RecordConflict
from service.requests.records import (
    DISCOVERY_OFF,
    REPLICA,
    AccessRequest,
    DataRequest,
    Discovery,
    DiscoveryStatus,
    Events,
    Status,
)
from service.requests.schedule import Schedule
from service.storage.s3 import ArchiveStore, NotFound, PreconditionFailed

log = structlog.get_logger(__name__)

# Pragmatic address check: one @, no whitespace or control characters, a dotted domain.
_EMAIL = re.compile(r"^[^@\s\x00-\x1f\x7f]{1,64}@[^@\s\x00-\x1f\x7f]+\.[^@\s\x00-\x1f\x7f.]+$")
# The operator waits for the answer: a short retry budget here; `submitting` records that
# did not get through are for the poller to resubmit.
_FILING_BACKOFF = Backoff(attempts=3, base=0.5, cap=4.0)
FILING_OWNER = f"{REPLICA}/filing"


class InvalidRequest(InvalidInput):
    """The operator's request is malformed; the message says how. Nothing was filed."""


class IdempotencyConflict(Unprocessable):
    """The Idempotency-Key was used before with a different request body."""

    def __init__(self, key: str) -> None:
        super().__init__("Idempotency-Key was used before with a different request")
        self.key = key


class IdempotencyInProgress(Conflict):
    """A request with this Idempotency-Key is being filed right now; retry shortly."""

    def __init__(self, key: str) -> None:
        super().__init__("a request with this Idempotency-Key is being filed; retry", retry_after=2)
        self.key = key


# An events range is fetched in month windows, one Copernica call each: ten years is 120.
MAX_EVENTS_YEARS = 10


@dataclass(frozen=True)
class NewRequest:
    subject: Subject
    fingerprint: str
    events: dict[str, str] | None = None  # {"since", "until"} asked for with the request
    received_on: date | None = None  # None: today
    # Look for the person in every database and collection; None: not said (DISCOVERY).
    discover: bool | None = None


def parse_new_request(body: Any) -> NewRequest:
    """Exactly one of email / profile / subprofile, each well formed."""
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object")
    kinds = [k for k in ("email", "profile", "subprofile") if k in body]
    if len(kinds) != 1:
        raise InvalidRequest("give exactly one of 'email', 'profile', 'subprofile'")
    unknown = set(body) - {"email", "profile", "subprofile", "events", "received_on", "discover"}
    if unknown:
        raise InvalidRequest(f"unknown member(s): {', '.join(sorted(unknown))}")
    events = _events_range(body["events"]) if "events" in body else None
    discover = body.get("discover")
    if "discover" in body and not isinstance(discover, bool):
        raise InvalidRequest("'discover' must be true or false", field="discover")
    today = utcnow().date()
    try:
        received_on = parse_received_on(body.get("received_on", today.isoformat()), today)
    except DeadlineInputError as exc:
        raise InvalidRequest(str(exc), field=exc.field) from None
    kind = kinds[0]
    value = body[kind]
    if kind == "email":
        if not isinstance(value, str) or len(value) > 254 or not _EMAIL.match(value.strip()):
            raise InvalidRequest("'email' must be an e-mail address", field="email")
        subject_id = value.strip()
    else:
        if isinstance(value, bool) or not (
            (isinstance(value, int) and value > 0)
            or (isinstance(value, str) and value.isdigit() and int(value) > 0)
        ):
            raise InvalidRequest(f"'{kind}' must be a positive integer id", field=kind)
        subject_id = str(int(value))
    identity = f"{kind}:{subject_id.casefold()}:{json.dumps(events, sort_keys=True)}"
    if "received_on" in body:
        identity += f":{received_on}"
    if discover is not None:
        identity += f":discover={str(discover).lower()}"
    fingerprint = hashlib.sha256(identity.encode()).hexdigest()
    return NewRequest(Subject(kind, subject_id), fingerprint, events, received_on, discover)


def _events_range(value: Any) -> dict[str, str]:
    """`{"since": "YYYY-MM-DD", "until": "YYYY-MM-DD"}`; `until` (exclusive) defaults to
    tomorrow, so today's events are included."""
    if not isinstance(value, dict) or "since" not in value or set(value) - {"since", "until"}:
        raise InvalidRequest(
            '\'events\' must be {"since": "YYYY-MM-DD"[, "until": ...]}', field="events"
        )
    try:
        since = parse_day(value["since"], "events.since")
        until = (
            parse_day(value["until"], "events.until")
            if value.get("until")
            else utcnow().date() + timedelta(days=1)
        )
    except EventsInputError as exc:  # the field is the name given to parse_day
        raise InvalidRequest(str(exc), field=exc.field) from None
    if until > add_months(since, 12 * MAX_EVENTS_YEARS):
        raise InvalidRequest(
            f"events range {since} to {until} is longer than {MAX_EVENTS_YEARS} years; "
            "ask for a shorter range",
            field="events.until",
        )
    try:
        plan(since, until)
    except EventsInputError as exc:  # until is not after since
        raise InvalidRequest(str(exc), field="events.until") from None
    return {"since": since.isoformat(), "until": until.isoformat()}


class Filing:
    """Creates request records and files them with Copernica."""

    def __init__(
        self,
        store: ArchiveStore,
        ledger: Ledger,
        schedule: Schedule,
        deadlines: DeadlineIndex,
        copernica: CopernicaClient,
        discoverer: Discoverer,
        settings: Settings,
        metrics: Metrics,
        hash_key: bytes,
        clock: Clock = SYSTEM,
    ) -> None:
        self._clock = clock
        self._discoverer = discoverer
        self._store = store
        self._ledger = ledger
        self._schedule = schedule
        self._deadlines = deadlines
        self._copernica = copernica
        self._settings = settings
        self._metrics = metrics
        self._hash_key = hash_key
        # Longest a filing can take: every try timing out, plus the pauses between them.
        self._filing_budget = (
            _FILING_BACKOFF.attempts * settings.copernica_timeout_seconds
            + _FILING_BACKOFF.attempts * _FILING_BACKOFF.cap
        )

    async def file(self, new: NewRequest, idempotency_key: str | None) -> AccessRequest:
        request_id = str(ULID())
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            return await self._file(new, idempotency_key, request_id)

    async def _file(
        self, new: NewRequest, idempotency_key: str | None, request_id: str
    ) -> AccessRequest:
        if idempotency_key is not None:
            first_id = await self._claim_key(idempotency_key, new, request_id)
            if first_id != request_id:
                found = await self._ledger.get(first_id)
                if found is not None:
                    return found[0]
                # The first filer has claimed the key but not yet written its record: it is
                # still at work, or it died in between (then, after its lease would have run
                # out, this request takes over its id).
                if self._clock.now() - ULID.from_str(first_id).datetime < timedelta(
                    seconds=self._filing_budget
                ):
                    raise IdempotencyInProgress(idempotency_key)
                request_id = first_id
        record = self._new_record(new, request_id, idempotency_key)
        # The markers go first: a crash after them leaves a marker without a record (dropped
        # when met), never a record the poller or the deadline index does not know about.
        assert record.next_poll_at is not None
        await self._schedule.schedule(record.id, record.next_poll_at)
        await self._deadlines.open(record.id, record.deadline.due_by)
        # While we file, the poller keeps off (our lease); if we crash, the lease runs out and
        # the poller finds a `submitting` record to file again.
        record.take_lease(FILING_OWNER, self._clock.now() + timedelta(seconds=self._filing_budget))
        try:
            etag = await self._ledger.create(record)
        except PreconditionFailed:
            # Two retries of a dead filer's key took over at once: the other one files it.
            found = await self._ledger.get(request_id)
            if found is None:
                raise
            return found[0]
        await self.call_copernica(record)
        # Refused by Copernica: ended without a package; its retention marker, before the record.
        await note_ended(self._store, record, self._clock.now())
        record.lease = None
        try:
            await self._ledger.save(record, etag)
        except PreconditionFailed:
            # Copernica (or its rate limit) kept us past our lease, and a poller took the
            # request over: it files a `submitting` record again. The request is in the
            # ledger either way; keep our answer if the takeover has none yet.
            return await self._overtaken(record)
        if record.discovery.status is DiscoveryStatus.RUNNING:
            self._schedule.nudge()  # its first visit, now that the record is free
        return record

    async def _overtaken(self, ours: AccessRequest) -> AccessRequest:
        mine = ours.first

        def settle(current: AccessRequest) -> bool:
            theirs = current.first
            if theirs.status is not Status.SUBMITTING:
                return False  # the takeover got Copernica's answer: it stands
            if mine.status is Status.PENDING and mine.copernica_id is not None:
                theirs.mark_pending(mine.copernica_id)
            elif mine.status is Status.FAILED and mine.last_error is not None:
                theirs.mark_failed(mine.last_error)
                if ours.ended_at is not None:  # its retention marker is in place (`file`)
                    current.mark_ended(ours.ended_at)
            else:
                return False
            return True

        log.warning("filing_overtaken", request_id=ours.id, status=ours.status)
        current = await self._ledger.update(ours.id, settle)
        if current is None:
            raise RecordConflict(ours.id)
        return current

    def _new_record(
        self, new: NewRequest, request_id: str, idempotency_key: str | None
    ) -> AccessRequest:
        first = DataRequest(
            subject_type=new.subject.type,
            subject_id=new.subject.id,
            report=self._settings.public_base_url is not None,
            events=self._events_of(new),
        )
        record = AccessRequest.new(
            request_id,
            first,
            idempotency_key=_key_hash(self._hash_key, idempotency_key) if idempotency_key else None,
            received_on=(new.received_on or self._clock.now().date()).isoformat(),
            discovery=self._discovery_of(new),
        )
        # A request that looks for the person is visited at once: discovery is the poller's.
        discovering = record.discovery.status is DiscoveryStatus.RUNNING
        record.next_poll_at = self._schedule.stamp_in(
            0 if discovering else self._settings.poll_interval_seconds
        )
        return record

    def _discovery_of(self, new: NewRequest) -> Discovery:
        """Off, or running: for an e-mail filing it looks for the filed address; for a
        profile or subprofile, for the address in its record (found by the discoverer)."""
        discover = self._settings.discovery if new.discover is None else new.discover
        if not discover:
            return DISCOVERY_OFF
        address = new.subject.id if new.subject.type == "email" else None
        return Discovery(DiscoveryStatus.RUNNING, address=address)

    def _events_of(self, new: NewRequest) -> Events | None:
        """What events to archive with the data: asked for, or EVENTS_LOOKBACK_DAYS."""
        asked = new.events
        if asked is None and self._settings.events_lookback_days > 0:
            asked = lookback(self._clock.now().date(), self._settings.events_lookback_days)
        if asked is None:
            return None
        return Events(asked["since"], asked["until"], windows=len(request_windows(asked)))

    async def call_copernica(
        self,
        record: AccessRequest,
        data: DataRequest | None = None,
        checkpoint: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Ask Copernica for one data request's data (the first one's unless `data` is given);
        the data request says how it went: pending, failed (gone, unsupported), or not yet.
        A discovered source gets a `report` address of its own (`urls.SOURCE`)."""
        data = data or record.first
        discovered = data is not record.first
        settings = self._settings
        report = None
        if settings.public_base_url and settings.callback_secret:
            report = callback_url(
                settings.public_base_url,
                settings.callback_secret,
                record.id,
                self._ledger.digest_of(data),
                role=SOURCE if discovered else FIRST,
            )
        if not await self._details(record, data):
            return
        data.attempts += 1
        if discovered:  # on discovery's account: two calls per match, details and filing
            record.discovery = record.discovery.called()
        if checkpoint is not None:
            # The try is in the record before Copernica sees it: if this visit dies after
            # Copernica filed it, the next visit knows one may exist (and counts it).
            await checkpoint()
        outcome = "pending"
        try:
            copernica_id = await self._copernica.create_datarequest(
                data.subject, report, backoff=_FILING_BACKOFF
            )
            now = isoformat(self._clock.now())
            data.mark_pending(copernica_id, at=now if discovered else None)
        except CopernicaError as exc:
            outcome = _refused(data, exc)
        except CopernicaUnavailable as exc:
            data.last_error, outcome = str(exc), "retry"
        self._metrics.requests_filed.labels(outcome).inc()
        log.info(
            "datarequest_filed",
            request_id=record.id,
            source=data.subject_type,
            subject=subject_hash(self._hash_key, data.subject_type, data.subject_id),
            status=data.status,
            copernica_id=data.copernica_id,
            error=data.last_error,
        )

    async def _details(self, record: AccessRequest, data: DataRequest) -> bool:
        """A profile's or subprofile's own record is archived right before it is filed (its
        fields are what the subject most expects to see); False: not to be filed now, because
        Copernica no longer has it (`gone`) or did not answer (the poller files it later)."""
        try:
            await self._discoverer.fetch_details(record, data)
        except CopernicaUnavailable as exc:
            data.last_error = f"details not fetched yet: {exc}"
            self._metrics.requests_filed.labels("retry").inc()
            return False
        if data.final:
            self._metrics.requests_filed.labels(data.status.value).inc()
            log.info("datarequest_not_filed", request_id=record.id, status=data.status)
            return False
        return True

    async def _claim_key(self, key: str, new: NewRequest, request_id: str) -> str:
        """The request id this key stands for: ours if we are first, else the first one's."""
        object_key = self._store.keys.idempotency(_key_hash(self._hash_key, key))
        claim = json.dumps({"request_id": request_id, "fingerprint": new.fingerprint}).encode()
        try:
            await self._store.put(object_key, claim, if_none_match=True)
            return request_id
        except PreconditionFailed:
            stored = await self._store.get(object_key)
            if stored is None:
                raise NotFound(object_key) from None
            first = json.loads(stored.body)
            if first["fingerprint"] != new.fingerprint:
                raise IdempotencyConflict(key) from None
            return str(first["request_id"])


def _refused(data: DataRequest, exc: CopernicaError) -> str:
    """A data request Copernica refused: gone (the profile was removed), unsupported (it does
    not offer the call: the e-mail data request on some accounts) or failed; the outcome."""
    if data.subject_type != "email" and isinstance(typed_error(exc), SourceGone):
        data.mark_gone(exc.message)
        return "gone"
    if says_unsupported(exc):
        data.mark_unsupported(exc.message)
        return "unsupported"
    data.mark_failed(str(exc))
    return "failed"


def _key_hash(hash_key: bytes, idempotency_key: str) -> str:
    return hmac.new(
        hash_key, b"idempotency:" + idempotency_key.encode(), hashlib.sha256
    ).hexdigest()
