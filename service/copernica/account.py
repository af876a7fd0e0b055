"""The account's contents: databases, collections, their fields, profiles and subprofiles.

Typed calls over `CopernicaClient` (its rate limit, retries with backoff and jitter on 429/5xx,
timeouts; the token never leaves the client), each answer parsed into frozen types. Facts relied
on (SPEC "Finding the person", from Copernica's REST docs and clients run against the live API):

- The lists answer `{"start","limit","count","total","data":[...]}`; `limit` is at most 1000;
  `total=false` makes Copernica skip counting (the answer then has no usable `total`).
- A database carries `ID`, `name`, `fields` and `collections`; a collection `ID`, `name`,
  `fields`. The nested `fields`/`collections` are paged wrappers themselves: when one holds
  fewer than its `total`, the rest comes from `database/{id}/fields`, `database/{id}/collections`
  or `collection/{id}/fields` (`Account.all_fields`, `Account.all_collections`).
- IDs are strings (some answers give numbers: read as strings).
- `fields[]=name==value` filters profiles and subprofiles; yarl sends the parameter's name as
  `fields%5B%5D` and escapes the value (`==` as `%3D%3D`, `+` as `%2B`), which servers decode to
  `fields[]` and the value as given. A filter on a field the database lacks is ignored.
- Errors: 400 with Copernica's own words, mapped here to types (`SourceGone`, `PlaceGone`) so
  callers never match strings.

A 200 whose body is not the documented shape raises `AnswerMalformed`, a `CopernicaUnavailable`:
a proxy's error page or a cut answer is worth trying again later; a lasting one shows in the
caller's last error. No aiohttp type passes this module.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote

from service.copernica.client import Backoff, CopernicaClient, CopernicaError, CopernicaUnavailable

T = TypeVar("T")

MAX_LIMIT = 1000  # Copernica's largest page
# Within one call: a few quick tries. A longer outage ("Loadbalancer Error" for minutes) is the
# caller's to wait out between visits (discovery's `retrying`), not a visit's to sleep through.
ACCOUNT_BACKOFF = Backoff(attempts=3, base=0.5, cap=5.0)


class AnswerMalformed(CopernicaUnavailable):
    """Copernica answered 200 with something that is not the documented shape."""


class SourceGone(CopernicaError):
    """The profile or subprofile no longer exists ("No entity with supplied ID", "No subprofile
    with supplied ID", "This profile has already been removed")."""


class PlaceGone(CopernicaError):
    """The database or collection no longer exists ("No database with supplied ID", "No
    collection with given ID")."""


# Copernica's words (lower case) for each kind of "not there", recorded against the live API.
_GONE: tuple[tuple[str, type[CopernicaError]], ...] = (
    ("no entity with supplied id", SourceGone),
    ("no subprofile with supplied id", SourceGone),
    ("this profile has already been removed", SourceGone),
    ("no database with supplied id", PlaceGone),
    ("no collection with given id", PlaceGone),
)


def typed_error(exc: CopernicaError) -> CopernicaError:
    """`exc` as `SourceGone` or `PlaceGone` when Copernica's message says so; else `exc`.
    Filing a profile's data request meets the same words: callers may use it there too."""
    if isinstance(exc, SourceGone | PlaceGone) or exc.status not in (400, 404, 410):
        return exc
    said = exc.message.strip().casefold()
    for words, kind in _GONE:
        if words in said:
            return kind(exc.status, exc.message)
    return exc


# -- what the answers hold -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a list: its items, where it starts, how many it holds, and the list's
    total when Copernica counted it (None with `total=false`)."""

    items: tuple[T, ...]
    start: int
    count: int
    total: int | None

    @property
    def next_start(self) -> int:
        return self.start + self.count

    def complete(self) -> bool:
        """The page holds the whole list (it starts at 0 and reaches the counted total)."""
        return self.start == 0 and self.total is not None and self.count >= self.total

    def more_after(self, limit: int) -> bool:
        """Another page may follow: short of the total, or (uncounted) a full page."""
        if self.total is not None:
            return self.next_start < self.total and self.count > 0
        return self.count >= limit


@dataclass(frozen=True, slots=True)
class Field:
    id: str
    name: str
    type: str  # `email` marks the field used for mailings; `text`, `integer`, ...


@dataclass(frozen=True, slots=True)
class Collection:
    id: str
    name: str
    database: str
    fields: Page[Field] | None  # the nested wrapper (None: the answer had none)


@dataclass(frozen=True, slots=True)
class Database:
    id: str
    name: str
    fields: Page[Field] | None
    collections: Page[Collection] | None

    @property
    def whole(self) -> bool:
        """Its answer held all its fields, collections and their fields: reading them takes
        no further call."""
        return (
            self.fields is not None
            and self.fields.complete()
            and self.collections is not None
            and self.collections.complete()
            and all(c.fields is not None and c.fields.complete() for c in self.collections.items)
        )


@dataclass(frozen=True, slots=True)
class Record:
    """A profile or subprofile: its id, its field values, and where it lies (`database` for a
    profile, `collection` and `profile` for a subprofile)."""

    id: str
    values: tuple[tuple[str, str], ...]
    database: str | None = None
    collection: str | None = None
    profile: str | None = None

    def value(self, name: str) -> str | None:
        """The value of field `name` (its name compared exactly, else case-insensitively)."""
        for key, value in self.values:
            if key == name:
                return value
        folded = name.casefold()
        return next((v for k, v in self.values if k.casefold() == folded), None)


# -- parsing: every shape checked, every failure an AnswerMalformed ----------------------------


class _Parse:
    """Readers for one endpoint's answer; each failure names the endpoint and what was wrong."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def fail(self, what: str) -> AnswerMalformed:
        return AnswerMalformed(f"Copernica {self.endpoint}: malformed answer ({what})")

    def json(self, body: bytes) -> Any:
        try:
            return json.loads(body)
        except ValueError:
            raise self.fail("not JSON") from None

    def obj(self, raw: Any, what: str) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise self.fail(f"{what} is not an object")
        return raw

    def ident(self, raw: dict[str, Any], name: str, what: str) -> str:
        value = raw.get(name)
        if isinstance(value, bool) or not isinstance(value, int | str) or str(value).strip() == "":
            raise self.fail(f"{what} without a usable {name}")
        return str(value).strip()

    def optional_ident(self, raw: dict[str, Any], name: str) -> str | None:
        value = raw.get(name)
        if isinstance(value, bool) or not isinstance(value, int | str) or str(value) == "":
            return None
        return str(value)

    def count(self, raw: dict[str, Any], name: str, default: int | None) -> int | None:
        value = raw.get(name, default)
        if value is None or value is False:
            return default
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise self.fail(f"{name} is not a number")
        try:
            return max(0, int(value))
        except ValueError:
            raise self.fail(f"{name} is not a number") from None

    def page(self, raw: Any, item: Callable[[Any], T], what: str, start: int = 0) -> Page[T]:
        wrapper = self.obj(raw, what)
        data = wrapper.get("data")
        if not isinstance(data, list):
            raise self.fail(f"{what} has no data list")
        items = tuple(item(entry) for entry in data)
        first = self.count(wrapper, "start", start)
        return Page(items, first or 0, len(items), self.count(wrapper, "total", None))

    def nested(self, raw: Any, item: Callable[[Any], T], what: str) -> Page[T] | None:
        return None if raw is None else self.page(raw, item, what)

    def field(self, raw: Any) -> Field:
        entry = self.obj(raw, "a field")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise self.fail("a field without a name")
        kind = entry.get("type")
        return Field(
            self.ident(entry, "ID", "a field"), name, kind if isinstance(kind, str) else ""
        )

    def collection(self, raw: Any) -> Collection:
        entry = self.obj(raw, "a collection")
        return Collection(
            self.ident(entry, "ID", "a collection"),
            str(entry.get("name", "")),
            self.optional_ident(entry, "database") or "",
            self.nested(entry.get("fields"), self.field, "a collection's fields"),
        )

    def database(self, raw: Any) -> Database:
        entry = self.obj(raw, "a database")
        return Database(
            self.ident(entry, "ID", "a database"),
            str(entry.get("name", "")),
            self.nested(entry.get("fields"), self.field, "a database's fields"),
            self.nested(entry.get("collections"), self.collection, "a database's collections"),
        )

    def record(self, raw: Any) -> Record:
        entry = self.obj(raw, "a record")
        values = entry.get("fields", {})
        if isinstance(values, list) and not values:
            values = {}  # PHP's empty array
        values = self.obj(values, "a record's fields")
        return Record(
            self.ident(entry, "ID", "a record"),
            tuple((str(k), "" if v is None else str(v)) for k, v in values.items()),
            database=self.optional_ident(entry, "database"),
            collection=self.optional_ident(entry, "collection"),
            profile=self.optional_ident(entry, "profile"),
        )


def record_of(kind: str, body: bytes) -> Record:
    """A `GET profile/{id}` / `GET subprofile/{id}` answer as a `Record`."""
    parse = _Parse(kind)
    return parse.record(parse.json(body))


# -- the calls -----------------------------------------------------------------------------


def _id(value: str) -> str:
    return quote(value, safe="")


class Account:
    """The account's list and record calls, typed. Every method is one Copernica call (as the
    client sends it: retried inside on 429/5xx; `CopernicaUnavailable` when that did not help)."""

    def __init__(self, client: CopernicaClient, backoff: Backoff = ACCOUNT_BACKOFF) -> None:
        self._client = client
        self._backoff = backoff

    async def _get(self, path: str, endpoint: str, params: dict[str, str]) -> bytes:
        try:
            _status, _headers, body = await self._client.call(
                "GET", path, endpoint=endpoint, params=params, backoff=self._backoff
            )
        except CopernicaError as exc:
            raise typed_error(exc) from None
        return body

    async def _page(
        self,
        path: str,
        endpoint: str,
        item: Callable[[_Parse], Callable[[Any], T]],
        start: int,
        limit: int,
        extra: dict[str, str] | None = None,
    ) -> Page[T]:
        params = {"start": str(start), "limit": str(min(limit, MAX_LIMIT)), "total": "false"}
        body = await self._get(path, endpoint, {**params, **(extra or {})})
        parse = _Parse(endpoint)
        return parse.page(parse.json(body), item(parse), "the answer", start)

    async def list_databases(self, start: int, limit: int) -> Page[Database]:
        return await self._page("databases", "databases", lambda p: p.database, start, limit)

    async def database_fields(self, database_id: str, start: int, limit: int) -> Page[Field]:
        path = f"database/{_id(database_id)}/fields"
        return await self._page(path, "database_fields", lambda p: p.field, start, limit)

    async def database_collections(
        self, database_id: str, start: int, limit: int
    ) -> Page[Collection]:
        path = f"database/{_id(database_id)}/collections"
        return await self._page(path, "database_collections", lambda p: p.collection, start, limit)

    async def collection_fields(self, collection_id: str, start: int, limit: int) -> Page[Field]:
        path = f"collection/{_id(collection_id)}/fields"
        return await self._page(path, "collection_fields", lambda p: p.field, start, limit)

    async def profiles(
        self, database_id: str, field: str, value: str, start: int, limit: int
    ) -> Page[Record]:
        """The database's profiles whose `field` equals `value` (if the database honours the
        filter: check each record's value)."""
        path = f"database/{_id(database_id)}/profiles"
        where = {"fields[]": f"{field}=={value}"}
        return await self._page(path, "profiles", lambda p: p.record, start, limit, where)

    async def subprofiles(
        self, collection_id: str, field: str, value: str, start: int, limit: int
    ) -> Page[Record]:
        path = f"collection/{_id(collection_id)}/subprofiles"
        where = {"fields[]": f"{field}=={value}"}
        return await self._page(path, "subprofiles", lambda p: p.record, start, limit, where)

    async def details(self, kind: str, record_id: str) -> bytes:
        """`GET profile/{id}` or `GET subprofile/{id}`: Copernica's exact bytes (`SourceGone`
        when it no longer exists). Parse with `record_of`."""
        if kind not in ("profile", "subprofile"):
            raise ValueError(f"details of a {kind!r}: profile or subprofile only")
        return await self._get(f"{kind}/{_id(record_id)}", kind, {})

    async def all_fields(
        self, kind: str, place_id: str, nested: Page[Field] | None, counted: Callable[[], None]
    ) -> tuple[Field, ...]:
        """A database's or collection's (`kind`) fields: the nested wrapper when it is whole,
        else read from `database/{id}/fields` / `collection/{id}/fields` page by page,
        `counted()` before each call."""
        read = self.database_fields if kind == "database" else self.collection_fields
        return await _whole(nested, lambda start: read(place_id, start, MAX_LIMIT), counted)

    async def all_collections(
        self, database: Database, counted: Callable[[], None]
    ) -> tuple[Collection, ...]:
        """A database's collections: nested when whole, else from `database/{id}/collections`."""
        return await _whole(
            database.collections,
            lambda start: self.database_collections(database.id, start, MAX_LIMIT),
            counted,
        )


async def _whole(
    nested: Page[T] | None,
    dedicated: Callable[[int], Awaitable[Page[T]]],
    counted: Callable[[], None],
) -> tuple[T, ...]:
    if nested is not None and nested.complete():
        return nested.items
    items: list[T] = []
    start = 0
    while True:
        counted()
        page = await dedicated(start)
        items.extend(page.items)
        if not page.more_after(MAX_LIMIT):
            return tuple(items)
        start = page.next_start
