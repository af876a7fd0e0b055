"""Discovery: every profile and subprofile that holds the subject's address becomes a source.

SPEC "Sources and discovery". The search runs in steps over the request's `Discovery` fact,
and its whole state is in the record (saved by the caller between `advance` calls), so a crash
or another replica re-reads at most the pages of one `advance`:

1. The address: an e-mail filing's own; a profile or subprofile filing reads its record (the
   answer archived as its details), its database's (collection's) `email`-typed field, and adds
   the address's own `email` source. No address: done, saying why.
2. Listing: databases page by page (1000 a page, uncounted), each turned into targets: the
   database and each of its collections that has an address field (the `email`-typed one and
   the `DISCOVERY_FIELDS` it really has; Copernica ignores a filter on a field it lacks).
3. Querying: each target on each of its fields, `fields[]=field==address`, paged. Only records
   whose field equals the address (case-insensitively) count. A page holding any other record
   means the filter was ignored: that query stops after its one page, so such a place costs one
   call and yields no false match.
4. Done.

Cost (SPEC): the listing, one query per (place, field), extra pages, and two calls per match
(its details by `fetch_details`, its filing by the caller); `discovery.calls` counts every
logical call made here (a call the client retried inside counts once). Beyond the request's
limit (`max_sources`, else DISCOVERY_MAX_SOURCES) discovery stops `over_limit` with that many
sources, its cursor on the page it was reading: a raised limit reads that page again (its
sources already recorded are not added twice) and goes on. Copernica failing (503 after the
client's retries, a malformed answer, a refusal) leaves it `retrying` with the error and the
progress kept; the caller backs off and calls `advance` again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from datetime import date
from typing import Any

import structlog

from service.config import Settings
from service.copernica.account import (
    MAX_LIMIT,
    Account,
    Database,
    Field,
    PlaceGone,
    Record,
    SourceGone,
    record_of,
)
from service.copernica.client import CopernicaError, CopernicaUnavailable
from service.copernica.events import plan
from service.requests.records import (
    AccessRequest,
    DataRequest,
    Details,
    DiscoveryStatus,
    Events,
    Place,
    Status,
    Target,
)
from service.storage.s3 import ArchiveStore, ArchiveUnavailable, PreconditionFailed

log = structlog.get_logger(__name__)

LISTING, QUERYING, DONE = "listing", "querying", "done"  # Discovery.phase


class _Calls:
    """The calls of one `advance`: each counted in the record as it is made, against a budget."""

    def __init__(self, record: AccessRequest, budget: int) -> None:
        self._record = record
        self.left = budget

    def take(self) -> None:
        self.left -= 1
        discovery = self._record.discovery
        self._record.discovery = replace(discovery, calls=discovery.calls + 1)

    @property
    def spent(self) -> bool:
        return self.left <= 0


def _set(record: AccessRequest, **changes: Any) -> None:
    record.discovery = replace(record.discovery, **changes)


def _same(value: str | None, address: str) -> bool:
    return value is not None and value.strip().casefold() == address.strip().casefold()


class Discoverer:
    """Moves an access request's discovery forward, and archives a source's details.

    `digest_of` is the keyed digest of a data request's subject (`Ledger.digest_of`): the
    folder of a source's things in S3."""

    def __init__(
        self,
        account: Account,
        store: ArchiveStore,
        settings: Settings,
        digest_of: Callable[[DataRequest], str],
    ) -> None:
        self._account = account
        self._store = store
        self._settings = settings
        self._digest_of = digest_of

    def limit(self, record: AccessRequest) -> int:
        """How many sources discovery may add to this request."""
        raised = record.discovery.max_sources
        return raised if raised is not None else self._settings.discovery_max_sources

    async def advance(self, record: AccessRequest, max_calls: int) -> bool:
        """Discover with at most about `max_calls` Copernica calls (a step begun finishes: one
        page, or one database's fields and collections). True: the budget is spent and more is
        to do at once; False: finished, waiting (`over_limit`) or `retrying` (the caller backs
        off; `errors` counts the failures in a row). S3 failures (`ArchiveUnavailable`, while
        archiving a filed profile's details) propagate with the progress kept in the record."""
        discovery = record.discovery
        if discovery.finished or (
            discovery.status is DiscoveryStatus.OVER_LIMIT
            and discovery.matches >= self.limit(record)
        ):
            return False
        if discovery.status is DiscoveryStatus.OVER_LIMIT:
            _set(record, last_error=None)  # the limit was raised
        _set(record, status=DiscoveryStatus.RUNNING)
        calls = _Calls(record, max_calls)
        try:
            while record.discovery.status is DiscoveryStatus.RUNNING:
                if record.discovery.phase == DONE:
                    _set(record, status=DiscoveryStatus.DONE)
                    break
                if calls.spent:
                    return True
                await self._step(record, calls)
                if record.discovery.errors and record.discovery.status is DiscoveryStatus.RUNNING:
                    _set(record, errors=0, last_error=None)
        except (CopernicaUnavailable, CopernicaError) as exc:
            errors = record.discovery.errors + 1
            _set(record, status=DiscoveryStatus.RETRYING, errors=errors, last_error=str(exc))
        finally:
            self._logged(record, max_calls - calls.left)
        return False

    async def _step(self, record: AccessRequest, calls: _Calls) -> None:
        discovery = record.discovery
        if discovery.address is None:
            await self._find_address(record, calls)
        elif discovery.phase == LISTING:
            await self._list(record, calls)
        else:
            await self._query(record, calls)

    # -- 1. the address ----------------------------------------------------------------------

    async def _find_address(self, record: AccessRequest, calls: _Calls) -> None:
        first = record.first
        if first.subject_type == "email":
            _set(record, address=first.subject_id.strip())
            return
        body = await self._details_body(record, first, calls)
        if body is None:
            return self._nothing(record, f"the filed {first.subject_type} no longer exists")
        found = record_of(first.subject_type, body)
        kind, place = (
            ("database", found.database)
            if first.subject_type == "profile"
            else ("collection", found.collection)
        )
        if place is None:
            return self._nothing(record, f"Copernica's {first.subject_type} names no {kind}")
        try:
            fields = await self._account.all_fields(kind, place, None, calls.take)
        except PlaceGone:
            return self._nothing(record, f"the filed {first.subject_type}'s place no longer exists")
        names = [f.name for f in fields if f.type.casefold() == "email"]
        address = next((v for v in map(found.value, names) if v and v.strip()), None)
        if address is None:
            return self._nothing(
                record, f"the filed {first.subject_type} has no e-mail address in its e-mail field"
            )
        _set(record, address=address.strip())
        record.add_source(self._source("email", address.strip(), record))

    def _nothing(self, record: AccessRequest, why: str) -> None:
        _set(
            record,
            status=DiscoveryStatus.DONE,
            phase=DONE,
            last_error=f"{why}: no address to look for, nothing discovered",
        )

    # -- 2. listing databases and collections --------------------------------------------------

    async def _list(self, record: AccessRequest, calls: _Calls) -> None:
        """One page of databases, each turned into targets. A database whose fields or
        collections need calls of their own waits for a budget left: the progress within the
        page is kept in `cursor`, and the next step reads the page again and goes on there."""
        discovery = record.discovery
        calls.take()
        page = await self._account.list_databases(discovery.next_start, MAX_LIMIT)
        begin = index = discovery.cursor
        while index < len(page.items):
            if index > begin and calls.spent and not page.items[index].whole:
                return
            targets, collections = await self._targets_of(page.items[index], calls)
            index += 1
            now = record.discovery
            _set(
                record,
                targets=now.targets + targets,
                cursor=index,
                databases=now.databases + 1,
                collections=now.collections + collections,
            )
        if page.more_after(MAX_LIMIT):
            _set(record, next_start=page.next_start, cursor=0)
        else:
            _set(record, phase=QUERYING, next_start=0, cursor=0, field_index=0)

    async def _targets_of(
        self, database: Database, calls: _Calls
    ) -> tuple[tuple[Target, ...], int]:
        """The database and its collections as targets (those with an address field), and how
        many collections it has. A database or collection gone meanwhile is skipped."""
        account, place = self._account, Place(database.id, database.name)
        try:
            fields = await account.all_fields("database", database.id, database.fields, calls.take)
            collections = await account.all_collections(database, calls.take)
        except PlaceGone:
            log.info("discovery_place_gone", kind="database", place=database.id)
            return (), 0
        found: list[Target] = []
        if names := self._address_fields(fields):
            found.append(Target("database", database.id, database.name, place, names))
        for collection in collections:
            try:
                fields = await account.all_fields(
                    "collection", collection.id, collection.fields, calls.take
                )
            except PlaceGone:
                log.info("discovery_place_gone", kind="collection", place=collection.id)
                continue
            if names := self._address_fields(fields):
                found.append(Target("collection", collection.id, collection.name, place, names))
        return tuple(found), len(collections)

    def _address_fields(self, fields: tuple[Field, ...]) -> tuple[str, ...]:
        """The `email`-typed fields, then the DISCOVERY_FIELDS the place really has (names as
        the place spells them)."""
        wanted = {name.casefold() for name in self._settings.discovery_fields or ()}
        email = [f.name for f in fields if f.type.casefold() == "email"]
        named = [f.name for f in fields if f.name.casefold() in wanted]
        return tuple(dict.fromkeys(email + named))

    # -- 3. querying ---------------------------------------------------------------------------

    async def _query(self, record: AccessRequest, calls: _Calls) -> None:
        """One page of one target's query on one field."""
        discovery = record.discovery
        if discovery.cursor >= len(discovery.targets):
            _set(record, phase=DONE)
            return
        target = discovery.targets[discovery.cursor]
        if discovery.field_index >= len(target.fields):
            return self._next_target(record)
        field, address = target.fields[discovery.field_index], discovery.address or ""
        query = self._account.profiles if target.kind == "database" else self._account.subprofiles
        calls.take()
        try:
            page = await query(target.id, field, address, discovery.next_start, MAX_LIMIT)
        except PlaceGone:
            log.info("discovery_place_gone", kind=target.kind, place=target.id)
            return self._next_target(record)
        matched = [r for r in page.items if _same(r.value(field), address)]
        for found in matched:
            if not self._add_match(record, target, field, found):
                return  # over the limit: the cursor stays on this page
        if len(matched) < len(page.items) or not page.more_after(MAX_LIMIT):
            # Done with this field (a page with another record: the filter was ignored).
            now = record.discovery
            _set(record, queries=now.queries + 1, field_index=now.field_index + 1, next_start=0)
            if record.discovery.field_index >= len(target.fields):
                self._next_target(record)
        else:
            _set(record, next_start=page.next_start)

    def _next_target(self, record: AccessRequest) -> None:
        _set(record, cursor=record.discovery.cursor + 1, field_index=0, next_start=0)

    def _add_match(self, record: AccessRequest, target: Target, field: str, found: Record) -> bool:
        """Record a match as a source (once); False when the limit stops discovery first."""
        kind = "profile" if target.kind == "database" else "subprofile"
        if record.source(f"{kind}:{found.id}") is not None:
            return True
        limit = self.limit(record)
        if record.discovery.matches >= limit:
            _set(
                record,
                status=DiscoveryStatus.OVER_LIMIT,
                last_error=f"more than {limit} profiles and subprofiles hold the address; "
                "raise the limit for this request to go on",
            )
            return False
        source = self._source(kind, found.id, record)
        source.database, source.found_by = target.database, field
        if kind == "subprofile":
            source.collection, source.profile = Place(target.id, target.name), found.profile
        record.add_source(source)
        _set(record, matches=record.discovery.matches + 1)
        return True

    def _source(self, kind: str, subject_id: str, record: AccessRequest) -> DataRequest:
        """A new source, to be filed: with a `report` URL when callbacks can reach us, and the
        first source's events range (its windows counted afresh, none stored)."""
        asked = record.first.events
        events = None
        if asked is not None:
            windows = plan(date.fromisoformat(asked.since), date.fromisoformat(asked.until))
            events = Events(asked.since, asked.until, windows=len(windows))
        return DataRequest(
            kind,
            subject_id,
            status=Status.SUBMITTING,
            report=self._settings.public_base_url is not None,
            events=events,
        )

    # -- details: a profile's or subprofile's own record ------------------------------------------

    async def fetch_details(self, record: AccessRequest, data_request: DataRequest) -> bool:
        """Archive the source's `GET profile/{id}` / `GET subprofile/{id}` answer (exact bytes,
        once: `If-None-Match: *`, an object already there adopted) and note it in the source.
        Copernica says it is gone: the source is `gone`; another refusal: `failed`. Nothing to
        do for the address, a source already noted or final. Raises `CopernicaUnavailable`
        (try later) and `ArchiveUnavailable`. The call counts in `discovery.calls` when
        discovery is on.

        True: the details were in S3 already though the record did not know them. Details are
        archived right before a filing, so an earlier visit got that far and its record write
        was lost (a replica killed, a write that lost a race): it may have filed the source."""
        if (
            data_request.subject_type not in ("profile", "subprofile")
            or data_request.details is not None
            or data_request.final
        ):
            return False
        if record.discovery.status is not DiscoveryStatus.OFF:
            _set(record, calls=record.discovery.calls + 1)
        try:
            body = await self._account.details(data_request.subject_type, data_request.subject_id)
        except SourceGone as exc:
            data_request.mark_gone(exc.message)
            return False
        except CopernicaError as exc:
            data_request.mark_failed(str(exc))
            return False
        return await self._archive_details(record, data_request, body)

    async def _details_body(
        self, record: AccessRequest, data_request: DataRequest, calls: _Calls
    ) -> bytes | None:
        """The source's record as Copernica answered it: read back from S3 once archived, else
        fetched and archived. None: Copernica says it is gone (the source marked so)."""
        if data_request.details is not None:
            stored = await self._store.get(data_request.details.key)
            if stored is not None:
                return stored.body
        calls.take()
        try:
            body = await self._account.details(data_request.subject_type, data_request.subject_id)
        except SourceGone as exc:
            data_request.mark_gone(exc.message)
            return None
        await self._archive_details(record, data_request, body)
        return body

    async def _archive_details(
        self, record: AccessRequest, data_request: DataRequest, body: bytes
    ) -> bool:
        """Archive and note the details; True when an earlier visit's object was adopted."""
        key = self._store.keys.source_details(record.id, self._digest_of(data_request))
        sha256 = hashlib.sha256(body).hexdigest()
        try:
            await self._store.put(
                key, body, if_none_match=True, metadata={"sha256": sha256}, sha256=sha256
            )
        except PreconditionFailed:
            data_request.note_details(await self._adopted(key))
            return True
        data_request.note_details(Details(key, sha256, len(body)))
        return False

    async def _adopted(self, key: str) -> Details:
        """The details another visit archived first: its facts, from metadata or the bytes."""
        head = await self._store.head(key)
        known = (head or {}).get("Metadata", {}).get("sha256")
        if head is not None and known:
            return Details(key, known, int(head.get("ContentLength", 0)))
        stored = await self._store.get(key)
        if stored is None:
            raise ArchiveUnavailable(f"S3: {key} was there, then not")
        return Details(key, hashlib.sha256(stored.body).hexdigest(), len(stored.body))

    def _logged(self, record: AccessRequest, calls: int) -> None:
        discovery = record.discovery
        log.info(
            "discovery_advanced",
            request_id=record.id,
            status=discovery.status.value,
            phase=discovery.phase,
            calls=calls,
            databases=discovery.databases,
            collections=discovery.collections,
            queries=discovery.queries,
            matches=discovery.matches,
            sources=len(record.data_requests),
        )
