"""The request record: one GDPR access request and the Copernica data requests it owns.

An *access request* is what the company received from the data subject: when (`received_on`),
its deadline and extensions, the package that answers it, when it was handed out, when it was
purged. It owns one or more *data requests*, each one Copernica data request (a *source*: the
address itself, or a profile or subprofile holding it) with its own Copernica id, status,
archive and events. The filed subject is the first source. The record is the JSON object
`requests/{id}.json` in S3 (`ledger.py` reads and writes it with conditional writes), and
one visit of the poller works on the whole record, so the lease and the next visit belong to
the access request.

Facts (archive, events, package, extension, lease) are small frozen types built in one place
each. Status changes happen only through the `mark_*` methods: a data request's on
`DataRequest`, the access request's (packaged, answered, purged) on `AccessRequest`.

Records written before the split (one flat object per request, `format` absent) are read as an
access request with one data request (`_unflattened`); they are written back in the new form.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date, datetime
from enum import StrEnum
from typing import Any

from ulid import ULID

from service.clock import isoformat, parse_isoformat
from service.copernica.subject import Subject
from service.requests.deadline import Deadline

FORMAT = 2  # the record's layout; a record without `format` is the flat one before the split


class Status(StrEnum):
    """Where a request stands. A data request is submitting, pending, archived, failed or
    expired; `purged` is the access request's own (everything stored was deleted)."""

    SUBMITTING = "submitting"  # record written, Copernica has not confirmed it yet
    PENDING = "pending"  # Copernica has it; a callback or the poller brings the data
    ARCHIVED = "archived"  # the data (and the events asked for) are stored
    FAILED = "failed"  # Copernica refused it or says the data is gone
    EXPIRED = "expired"  # no data before REQUEST_EXPIRY_HOURS
    GONE = "gone"  # a source Copernica says no longer exists ("No entity with supplied ID")
    UNSUPPORTED = "unsupported"  # a source whose data request Copernica answers "Invalid method"
    PURGED = "purged"  # everything stored was deleted after RETENTION_DAYS


# What an access request can be (a source's `gone`/`unsupported` is its own, never the request's).
STATUSES = tuple(s.value for s in Status if s not in (Status.GONE, Status.UNSUPPORTED))
SOURCE_STATUSES = tuple(s.value for s in Status if s is not Status.PURGED)
FINAL_STATUSES = (
    Status.ARCHIVED,
    Status.FAILED,
    Status.EXPIRED,
    Status.GONE,
    Status.UNSUPPORTED,
    Status.PURGED,
)
# An access request in one of these ended without a package (later also `refused`): retention
# counts RETENTION_DAYS from its `ended_at`.
ENDED_WITHOUT_PACKAGE = (Status.FAILED, Status.EXPIRED)

# Who holds a lease: this process. Stable for its life, unique across replicas and restarts.
REPLICA = f"{socket.gethostname()}-{os.getpid()}-{str(ULID())[-6:]}"


# -- the facts -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Archive:
    """Where a data request's data lies, and what it is (sha256 None: a multipart upload
    whose digest was not noted yet)."""

    bucket: str
    key: str
    sha256: str | None
    size: int
    source: str | None  # callback | poll
    received_at: str | None

    @classmethod
    def from_head(cls, head: dict[str, Any], bucket: str, key: str) -> Archive:
        """The facts read back from the object's metadata (the callback path writes no
        record: the poller or an operator read folds them in later)."""
        meta = head.get("Metadata", {})
        modified = head.get("LastModified")
        return cls(
            bucket=bucket,
            key=key,
            sha256=meta.get("sha256"),
            size=int(head.get("ContentLength", 0)),
            source=meta.get("source"),
            received_at=meta.get("received-at") or (isoformat(modified) if modified else None),
        )

    def with_sha256(self, sha256: str) -> Archive:
        return replace(self, sha256=sha256)

    def to_json(self) -> dict[str, Any]:
        return {
            "bucket": self.bucket,
            "key": self.key,
            "sha256": self.sha256,
            "size": self.size,
            "source": self.source,
            "received_at": self.received_at,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Archive:
        return cls(
            bucket=raw.get("bucket", ""),
            key=raw["key"],
            sha256=raw.get("sha256"),
            size=int(raw.get("size", 0)),
            source=raw.get("source"),
            received_at=raw.get("received_at"),
        )


@dataclass(frozen=True, slots=True)
class Events:
    """The subject's events asked for: the range, how many month windows it has, how many
    are stored, and how many events they held."""

    since: str
    until: str
    windows: int
    stored: int = 0
    events: int = 0

    @property
    def complete(self) -> bool:
        return self.stored >= self.windows

    @property
    def range(self) -> dict[str, str]:
        return {"since": self.since, "until": self.until}

    def progressed(self, stored: int, events: int) -> Events:
        """After a fetch: `stored` windows in all, `events` more events."""
        return replace(self, stored=stored, events=self.events + events)

    def to_json(self) -> dict[str, Any]:
        return {
            "since": self.since,
            "until": self.until,
            "windows": self.windows,
            "stored": self.stored,
            "events": self.events,
            "complete": self.complete,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Events:
        return cls(
            since=raw["since"],
            until=raw["until"],
            windows=int(raw.get("windows", 0)),
            stored=int(raw.get("stored", 0)),
            events=int(raw.get("events", 0)),
        )


@dataclass(frozen=True, slots=True)
class Package:
    """The access package in S3."""

    key: str
    sha256: str
    size: int
    built_at: str

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "sha256": self.sha256,
            "size": self.size,
            "built_at": self.built_at,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Package:
        return cls(raw["key"], raw["sha256"], int(raw["size"]), raw["built_at"])


@dataclass(frozen=True, slots=True)
class ExtensionStep:
    months: int
    reason: str
    at: str


@dataclass(frozen=True, slots=True)
class Extension:
    """The deadline's extensions: months in all, and each step with its reason."""

    months: int
    history: tuple[ExtensionStep, ...]

    def plus(self, months: int, total: int, reason: str, at: str) -> Extension:
        return Extension(total, (*self.history, ExtensionStep(months, reason, at)))

    def without_reasons(self) -> Extension:
        """The months and dates, not the reasons (free text, which may name the subject)."""
        return Extension(self.months, tuple(replace(s, reason="") for s in self.history))

    def to_json(self) -> dict[str, Any]:
        return {
            "months": self.months,
            "history": [{"months": s.months, "reason": s.reason, "at": s.at} for s in self.history],
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Extension:
        steps = tuple(
            ExtensionStep(int(s["months"]), s["reason"], s["at"]) for s in raw.get("history", [])
        )
        return cls(int(raw["months"]), steps)


NO_EXTENSION = Extension(0, ())


@dataclass(frozen=True, slots=True)
class Lease:
    """One replica works on the record until `until` (a crashed replica's lease runs out)."""

    owner: str
    until: str

    def held_by_other(self, owner: str, now: datetime) -> bool:
        return self.owner != owner and parse_isoformat(self.until) > now

    def to_json(self) -> dict[str, Any]:
        return {"owner": self.owner, "until": self.until}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Lease:
        return cls(raw["owner"], raw["until"])


@dataclass(frozen=True, slots=True)
class Place:
    """A database or collection a source was found in: its Copernica id and name."""

    id: str
    name: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Place:
        return cls(str(raw["id"]), str(raw.get("name", "")))


@dataclass(frozen=True, slots=True)
class Details:
    """A profile's or subprofile's own record (`GET profile/{id}`), archived as Copernica
    answered it: where it lies and what it is."""

    key: str
    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Details:
        return cls(raw["key"], raw["sha256"], int(raw["size"]))


class DiscoveryStatus(StrEnum):
    """Where the search for the person stands (SPEC "Sources and discovery")."""

    OFF = "off"  # not asked for: the filed subject only
    RUNNING = "running"  # listing databases and collections, or querying them
    DONE = "done"  # every database and collection was asked; every match is a source
    OVER_LIMIT = "over_limit"  # more matches than the limit: waits for an operator
    RETRYING = "retrying"  # Copernica failing; retried with backoff (see last_error)


@dataclass(frozen=True, slots=True)
class Target:
    """One place to ask: a database's profiles or a collection's subprofiles, with the
    address fields it really has (its `email`-typed one and the DISCOVERY_FIELDS it holds)."""

    kind: str  # database | collection
    id: str
    name: str
    database: Place  # the database itself, or the collection's database
    fields: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "id": self.id,
            "name": self.name,
            "database": self.database.to_json(),
            "fields": list(self.fields),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Target:
        return cls(
            raw["kind"],
            str(raw["id"]),
            raw.get("name", ""),
            Place.from_json(raw["database"]),
            tuple(raw.get("fields", ())),
        )


@dataclass(frozen=True, slots=True)
class Discovery:
    """The search for every profile and subprofile holding `address`, resumable: the record
    is saved after each page, so a crash re-reads at most the page it was on.

    Phases: `listing` (databases page by page from `next_start`, each turned into targets),
    then `querying` (target `cursor`, its field `field_index`, page `next_start`), then done.
    Matches become data requests of the access request as they are found."""

    status: DiscoveryStatus
    address: str | None = None  # the address looked for (in the record only, never logged)
    phase: str = "listing"  # listing | querying | done
    targets: tuple[Target, ...] = ()
    cursor: int = 0  # the target being queried
    field_index: int = 0  # its field being queried
    next_start: int = 0  # the next page's `start`, in the current listing or query
    databases: int = 0
    collections: int = 0
    queries: int = 0
    matches: int = 0
    calls: int = 0
    max_sources: int | None = None  # an operator's raise of DISCOVERY_MAX_SOURCES, for this one
    errors: int = 0  # consecutive failures, for backoff
    last_error: str | None = None

    def called(self) -> Discovery:
        """One more Copernica call on discovery's account (a discovered source's filing)."""
        return replace(self, calls=self.calls + 1)

    @property
    def finished(self) -> bool:
        """Nothing left to discover: off or done (over_limit and retrying still wait)."""
        return self.status in (DiscoveryStatus.OFF, DiscoveryStatus.DONE)

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "address": self.address,
            "phase": self.phase,
            "targets": [t.to_json() for t in self.targets],
            "cursor": self.cursor,
            "field_index": self.field_index,
            "next_start": self.next_start,
            "databases": self.databases,
            "collections": self.collections,
            "queries": self.queries,
            "matches": self.matches,
            "calls": self.calls,
            "max_sources": self.max_sources,
            "errors": self.errors,
            "last_error": self.last_error,
        }

    def summary(self) -> dict[str, Any]:
        """What the API shows (SPEC): no address, no plan, no cursor."""
        return {k: v for k, v in self.to_json().items() if k in _DISCOVERY_SHOWN}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Discovery:
        return cls(
            status=DiscoveryStatus(raw["status"]),
            address=raw.get("address"),
            phase=raw.get("phase", "listing"),
            targets=tuple(Target.from_json(t) for t in raw.get("targets", ())),
            cursor=int(raw.get("cursor", 0)),
            field_index=int(raw.get("field_index", 0)),
            next_start=int(raw.get("next_start", 0)),
            databases=int(raw.get("databases", 0)),
            collections=int(raw.get("collections", 0)),
            queries=int(raw.get("queries", 0)),
            matches=int(raw.get("matches", 0)),
            calls=int(raw.get("calls", 0)),
            max_sources=_opt(raw.get("max_sources"), int),
            errors=int(raw.get("errors", 0)),
            last_error=raw.get("last_error"),
        )


DISCOVERY_OFF = Discovery(DiscoveryStatus.OFF)
_DISCOVERY_SHOWN = (
    "status", "databases", "collections", "queries", "matches", "calls", "max_sources",
    "last_error",
)  # fmt: skip


def _opt(raw: dict[str, Any] | None, build: Any) -> Any:
    return None if raw is None else build(raw)


# -- one Copernica data request --------------------------------------------------------------


@dataclass
class DataRequest:
    """One Copernica data request of an access request (one source)."""

    subject_type: str  # email | profile | subprofile
    subject_id: str  # the raw address or number: only ever in the record and the archive
    status: Status = Status.SUBMITTING
    copernica_id: str | None = None
    attempts: int = 0  # filing attempts
    last_error: str | None = None
    report: bool = False  # filed with a `report` (callback) address
    archive: Archive | None = None
    events: Events | None = None
    poll_errors: int = 0  # consecutive failed polls, for backoff
    resubmitted: int = 0  # filed again after a lost answer
    # Where a profile or subprofile source was found (None for the address itself) and its
    # own record as Copernica answered it (`details`); `found_by`: the field that matched.
    database: Place | None = None
    collection: Place | None = None
    profile: str | None = None  # a subprofile's profile id
    found_by: str | None = None
    details: Details | None = None
    # When Copernica accepted it: a source found later than its request expires
    # REQUEST_EXPIRY_HOURS after its own filing (None: the request's creation counts).
    filed_at: str | None = None

    @property
    def subject(self) -> Subject:
        return Subject(self.subject_type, self.subject_id)

    @property
    def source(self) -> str:
        """The source's name: `email` for the address, `profile:{id}`, `subprofile:{id}`."""
        return "email" if self.subject_type == "email" else f"{self.subject_type}:{self.subject_id}"

    @property
    def events_complete(self) -> bool:
        """No events were asked for, or all their windows are stored."""
        return self.events is None or self.events.complete

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES

    # -- the status changes: here and nowhere else ----------------------------------------

    def mark_pending(self, copernica_id: str, at: str | None = None) -> None:
        """Copernica accepted the request under `copernica_id` (`at`: when, for a source
        found after its request was filed)."""
        self.status, self.copernica_id, self.last_error = Status.PENDING, copernica_id, None
        self.filed_at = self.filed_at or at

    def mark_failed(self, error: str) -> None:
        self.status, self.last_error = Status.FAILED, error

    def mark_expired(self, error: str) -> None:
        self.status, self.last_error = Status.EXPIRED, error

    def mark_gone(self, error: str) -> None:
        """Copernica says the profile or subprofile no longer exists."""
        self.status, self.last_error = Status.GONE, error

    def mark_unsupported(self, error: str) -> None:
        """Copernica does not offer this data request ("Invalid method")."""
        self.status, self.last_error = Status.UNSUPPORTED, error

    def note_details(self, details: Details) -> None:
        self.details = self.details or details

    def mark_archived(self, archive: Archive | None = None) -> None:
        """The data is stored (`archive`: its facts, if not recorded yet)."""
        self.status, self.last_error = Status.ARCHIVED, None
        self.archive = self.archive or archive

    def note_archive(self, archive: Archive) -> None:
        """The data is stored but the events are not all in yet: the facts, not the status."""
        self.archive = self.archive or archive

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "subject_type": self.subject_type,
            "subject_id": self.subject_id,
            "status": self.status.value,
            "copernica_id": self.copernica_id,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "report": self.report,
            "archive": None if self.archive is None else self.archive.to_json(),
            "events": None if self.events is None else self.events.to_json(),
            "poll_errors": self.poll_errors,
            "resubmitted": self.resubmitted,
            "database": None if self.database is None else self.database.to_json(),
            "collection": None if self.collection is None else self.collection.to_json(),
            "profile": self.profile,
            "found_by": self.found_by,
            "details": None if self.details is None else self.details.to_json(),
            "filed_at": self.filed_at,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> DataRequest:
        return cls(
            subject_type=raw["subject_type"],
            subject_id=raw["subject_id"],
            status=Status(raw.get("status", "submitting")),
            copernica_id=raw.get("copernica_id"),
            attempts=int(raw.get("attempts", 0)),
            last_error=raw.get("last_error"),
            report=bool(raw.get("report", False)),
            archive=_opt(raw.get("archive"), Archive.from_json),
            events=_opt(raw.get("events"), Events.from_json),
            poll_errors=int(raw.get("poll_errors", 0)),
            resubmitted=int(raw.get("resubmitted", 0)),
            database=_opt(raw.get("database"), Place.from_json),
            collection=_opt(raw.get("collection"), Place.from_json),
            profile=raw.get("profile"),
            found_by=raw.get("found_by"),
            details=_opt(raw.get("details"), Details.from_json),
            filed_at=raw.get("filed_at"),
        )


# -- the access request ----------------------------------------------------------------------


@dataclass
class AccessRequest:
    id: str
    data_requests: list[DataRequest]
    created_at: str = ""
    updated_at: str = ""
    version: int = 0  # bumped by every write: two writes never have identical bytes
    idempotency_key: str | None = None
    # Answering. A record written before deadlines existed has no `received_on`: such a
    # request was received the day it was filed (`received_day`).
    received_on: str | None = None  # YYYY-MM-DD, the day the company received the request
    extension: Extension | None = None
    package: Package | None = None
    answered_at: str | None = None  # first download or link of the package
    # When the request ended without a package (`ENDED_WITHOUT_PACKAGE`): set once, by
    # `mark_ended`; retention purges RETENTION_DAYS after it.
    ended_at: str | None = None
    purged_at: str | None = None
    # One visit works on the whole record.
    lease: Lease | None = None
    next_poll_at: str | None = None  # when the poller looks next; its schedule marker's time
    # The search for the person's profiles and subprofiles (off: the filed subject only).
    discovery: Discovery = DISCOVERY_OFF

    @classmethod
    def new(cls, request_id: str, first: DataRequest, **facts: Any) -> AccessRequest:
        return cls(id=request_id, data_requests=[first], **facts)

    @property
    def first(self) -> DataRequest:
        """The filed subject's own data request (the first source)."""
        return self.data_requests[0]

    @property
    def subject(self) -> Subject:
        """The subject as filed."""
        return self.first.subject

    def source(self, name: str) -> DataRequest | None:
        """The data request of source `name` (`email`, `profile:{id}`, `subprofile:{id}`)."""
        return next((d for d in self.data_requests if d.source == name), None)

    def add_source(self, data_request: DataRequest) -> bool:
        """A source found by discovery, recorded before Copernica is called for it; False
        (and nothing added) if the request has that source already."""
        if self.source(data_request.source) is not None:
            return False
        self.data_requests.append(data_request)
        return True

    @property
    def discovered(self) -> list[DataRequest]:
        """The sources besides the filed subject."""
        return self.data_requests[1:]

    @property
    def status(self) -> Status:
        """`purged` once purged; else, while any data request is still open, `submitting`
        (all are) or `pending`; once all are final, `archived` if any source holds data, else
        the first source's final status. With one data request: its own status."""
        if self.purged_at is not None:
            return Status.PURGED
        open_ = [d for d in self.data_requests if not d.final]
        if open_:
            if all(d.status is Status.SUBMITTING for d in open_) and len(open_) == len(
                self.data_requests
            ):
                return Status.SUBMITTING
            return Status.PENDING
        if not self.discovery.finished:
            return Status.PENDING
        if any(d.status is Status.ARCHIVED for d in self.data_requests):
            return Status.ARCHIVED
        if self.first.status in (Status.GONE, Status.UNSUPPORTED):
            return Status.FAILED  # nothing to answer with: the request failed
        return self.first.status

    @property
    def received_day(self) -> date:
        if self.received_on:
            return date.fromisoformat(self.received_on)
        return parse_isoformat(self.created_at).date()

    @property
    def deadline(self) -> Deadline:
        months = self.extension.months if self.extension else 0
        return Deadline(self.received_day, months, answered=self.answered_at is not None)

    @property
    def needs_package(self) -> bool:
        """Discovery is done, every source is final, one holds data, and the package is not
        built yet."""
        return self.status is Status.ARCHIVED and self.package is None

    @property
    def finished(self) -> bool:
        """Nothing left for the poller: final, and packaged if archived."""
        return self.status in FINAL_STATUSES and not self.needs_package

    def extend(self, months: int, reason: str, at: str) -> None:
        """Extend the deadline by `months` (ExtensionRefused beyond two months in all)."""
        total = self.deadline.extend(months)
        self.extension = (self.extension or NO_EXTENSION).plus(months, total, reason, at)

    # -- the access request's own changes -------------------------------------------------

    def mark_packaged(self, package: Package) -> None:
        self.package = package
        for data_request in self.data_requests:
            if data_request.status is Status.ARCHIVED:  # a gone source keeps Copernica's words
                data_request.last_error = None

    def mark_answered(self, at: str) -> bool:
        """The package was handed out (download or link); True the first time only."""
        if self.answered_at is not None:
            return False
        self.answered_at = at
        return True

    @property
    def ended_without_package(self) -> bool:
        """Every source is final and none holds data (failed, expired): nothing to package."""
        return self.purged_at is None and self.status in ENDED_WITHOUT_PACKAGE

    def mark_ended(self, at: str) -> bool:
        """Note when the request ended without a package; True the first time only (the caller
        then puts its retention marker before it writes the record)."""
        if self.ended_at is not None or not self.ended_without_package:
            return False
        self.ended_at = at
        return True

    def mark_purged(self, at: str, subject_digest: Callable[[str, str], str]) -> None:
        """Everything stored for the request is deleted: keep the facts for the register (ids,
        dates, status, sources count, sizes, sha256s), not the subject. Each source's subject
        becomes its keyed digest (`subject_digest(type, id)`); free text that may name the
        subject (errors, the reasons of extensions) goes."""
        self.purged_at = at
        self.lease = None
        self.next_poll_at = None
        if self.extension is not None:
            self.extension = self.extension.without_reasons()
        for data_request in self.data_requests:
            if not data_request.subject_id.startswith("hmac-sha256:"):
                digest = subject_digest(data_request.subject_type, data_request.subject_id)
                data_request.subject_id = f"hmac-sha256:{digest}"
            data_request.last_error = None
        # The address looked for goes; the counts stay (sources found, calls made).
        self.discovery = replace(self.discovery, address=None, targets=(), last_error=None)

    def adopt_operator_changes(self, current: AccessRequest) -> None:
        """What an operator changed in `current` while a visit worked on this copy (the visit
        holds the lease; operators write without one): the extension, the hand-out, a raised
        discovery limit (which makes the request due at once), and the version, so the
        visit's write goes on from theirs. Everything else is the visit's."""
        self.version = max(self.version, current.version)
        self.extension = current.extension
        self.answered_at = self.answered_at or current.answered_at
        raised = current.discovery.max_sources
        if raised is not None and raised != self.discovery.max_sources:
            status = self.discovery.status
            if status is DiscoveryStatus.OVER_LIMIT:
                status = DiscoveryStatus.RUNNING
            self.discovery = replace(self.discovery, max_sources=raised, status=status)
            if current.next_poll_at is not None and (
                self.next_poll_at is None or current.next_poll_at < self.next_poll_at
            ):
                self.next_poll_at = current.next_poll_at  # the raise's marker, due now

    def take_lease(self, owner: str, until: datetime) -> None:
        self.lease = Lease(owner, isoformat(until))

    def leased_to_other(self, owner: str, now: datetime) -> bool:
        """Somebody else works on this record and their lease has not run out."""
        return self.lease is not None and self.lease.held_by_other(owner, now)

    def leased(self, now: datetime) -> bool:
        """A visit (or a filing) works on this record: writers that hold no lease (an
        operator's read folding in an archive, a callback's note) leave it to that visit."""
        return self.lease is not None and parse_isoformat(self.lease.until) > now

    # -- bytes ---------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "id": self.id,
            "status": self.status.value,  # derived, for people reading the bucket; not read back
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "version": self.version,
            "idempotency_key": self.idempotency_key,
            "received_on": self.received_on,
            "extension": None if self.extension is None else self.extension.to_json(),
            "package": None if self.package is None else self.package.to_json(),
            "answered_at": self.answered_at,
            "ended_at": self.ended_at,
            "purged_at": self.purged_at,
            "lease": None if self.lease is None else self.lease.to_json(),
            "next_poll_at": self.next_poll_at,
            "discovery": self.discovery.to_json(),
            "data_requests": [d.to_json() for d in self.data_requests],
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, body: bytes) -> AccessRequest:
        raw = json.loads(body)
        if "format" not in raw:
            raw = cls._unflattened(raw)
        return cls(
            id=raw["id"],
            data_requests=[DataRequest.from_json(d) for d in raw["data_requests"]],
            created_at=raw.get("created_at", ""),
            updated_at=raw.get("updated_at", ""),
            version=int(raw.get("version", 0)),
            idempotency_key=raw.get("idempotency_key"),
            received_on=raw.get("received_on"),
            extension=_opt(raw.get("extension"), Extension.from_json),
            package=_opt(raw.get("package"), Package.from_json),
            answered_at=raw.get("answered_at"),
            ended_at=raw.get("ended_at"),
            purged_at=raw.get("purged_at"),
            lease=_opt(raw.get("lease"), Lease.from_json),
            next_poll_at=raw.get("next_poll_at"),
            discovery=_opt(raw.get("discovery"), Discovery.from_json) or DISCOVERY_OFF,
        )

    @staticmethod
    def _unflattened(raw: dict[str, Any]) -> dict[str, Any]:
        """A record of the release before the split (one flat object for the access request
        and its one data request) in the current form, so one reader serves both. Its
        `purged` status is the access request's now; the data request it purged had been
        archived (only packaged requests were purged then)."""
        status, purged_at = raw.get("status", "submitting"), raw.get("purged_at")
        if status == Status.PURGED:
            status, purged_at = Status.ARCHIVED, purged_at or raw.get("updated_at", "")
        resubmitted = (raw.get("extra") or {}).get("resubmitted", 0)
        first = {**raw, "status": status, "resubmitted": resubmitted}
        return {**raw, "purged_at": purged_at, "data_requests": [first]}
