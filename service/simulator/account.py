"""The simulator's Copernica account: databases, collections, typed fields, interests,
profiles and subprofiles, and the list semantics of the live REST API.

Shapes follow Copernica's REST documentation (v4 pages, also v2/v3) and the behaviour a
third-party client (rmuit/copernica-api) recorded against the live API:
- every list is a paged wrapper `{"start","limit","count","data","total"}`: `limit` defaults
  to 100 and is capped at 1000, a negative `start` or a `limit` below 1 gives no data, and
  `total` is left out when the `total` parameter is not true (`false`, `0`, `no`);
- a database object's nested `fields`, `interests` and `collections` (and a collection's
  `fields`) are such wrappers too; here they hold at most NESTED_LIMIT items, so a client
  must read a longer list from the dedicated endpoint;
- `fields[]=name==value` (any `fields[...]` key, as PHP's http_build_query writes arrays):
  the whole condition is trimmed, the field name matched case-insensitively, the value
  compared case-insensitively (`==`, `!=`); a condition on a field the database does not
  have, or with another operator, is ignored, so every record comes back;
- removed profiles and subprofiles are left out of lists; `GET profile/{id}` still shows a
  removed one, its fields emptied and `removed` its removal time;
- a profile's `fields` holds every field of its database, as strings ("" when not set);
- times are Europe/Amsterdam wall-clock `YYYY-MM-DD HH:MM:SS`, as Copernica writes them.

The account is loaded from JSON (`Account.from_json`, POST /_sim/account, `simulate
--account FILE`); a malformed one raises AccountError naming what is wrong.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
NESTED_LIMIT = 20  # items in a database object's nested fields/interests/collections
_TIME = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")
_CONDITION = re.compile(r"^(.+?)([=<>!~]{1,2})(.*)$", re.DOTALL)


class AccountError(ValueError):
    """A malformed account: the message says where."""


def php_json(value: Any) -> bytes:
    """JSON as PHP's json_encode writes it by default (Copernica is a PHP shop): compact,
    non-ASCII as \\uXXXX and `/` as `\\/`."""
    return json.dumps(value, separators=(",", ":")).replace("/", "\\/").encode()


# -- Europe/Amsterdam, by its own arithmetic (no tz database needed) ---------------------


def _last_sunday(year: int, month: int) -> datetime:
    day = datetime(year, month + 1, 1, tzinfo=UTC) - timedelta(days=1)
    return day - timedelta(days=(day.weekday() + 1) % 7)


def amsterdam(moment: datetime) -> str:
    """`moment` (aware) as Copernica writes times: Amsterdam wall clock, CET or, from the
    last Sunday of March to the last Sunday of October (01:00 UTC), CEST."""
    utc = moment.astimezone(UTC)
    summer_from = _last_sunday(utc.year, 3).replace(hour=1)
    summer_to = _last_sunday(utc.year, 10).replace(hour=1)
    offset = 2 if summer_from <= utc < summer_to else 1
    return (utc + timedelta(hours=offset)).strftime("%Y-%m-%d %H:%M:%S")


# -- the account's parts -------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    id: str
    name: str
    type: str  # text, email, integer, date, ...

    def json(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "name": self.name,
            "type": self.type,
            "value": "",
            "displayed": True,
            "ordered": False,
            "length": "255" if self.type == "text" else "100",
            "textlines": "0",
            "hidden": False,
            "index": self.type == "email",
        }


@dataclass(frozen=True)
class Interest:
    id: str
    name: str
    group: str

    def json(self) -> dict[str, Any]:
        return {"ID": self.id, "name": self.name, "group": self.group}


@dataclass(frozen=True)
class Collection:
    id: str
    name: str
    database: str
    fields: tuple[Field, ...]

    def json(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "name": self.name,
            "database": self.database,
            "fields": nested([f.json() for f in self.fields]),
            "intentions": {"email": 1, "sms": None, "fax": None, "pdf": None},
        }


@dataclass(frozen=True)
class Database:
    id: str
    name: str
    created: str
    fields: tuple[Field, ...]
    interests: tuple[Interest, ...]
    collections: tuple[Collection, ...]

    def json(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "name": self.name,
            "description": "",
            "archived": False,
            "created": self.created,
            "fields": nested([f.json() for f in self.fields]),
            "interests": nested([i.json() for i in self.interests]),
            "collections": nested([c.json() for c in self.collections]),
            "intentions": {"email": 1, "sms": None, "fax": None, "pdf": None},
        }


@dataclass(frozen=True)
class Record:
    """A profile (`owner` its database) or a subprofile (`owner` its collection, `profile`
    the profile it belongs to)."""

    id: str
    owner: str
    values: tuple[tuple[str, str], ...]  # (field name, value) in the owner's field order
    secret: str
    created: str
    modified: str
    removed: str | None  # when it was removed, or None
    interests: tuple[str, ...] = ()
    profile: str = ""

    def value(self, lowered_name: str) -> str | None:
        """The value of the field so named (`lowered_name` casefolded), or None."""
        return self._by_name.get(lowered_name)

    @cached_property
    def _by_name(self) -> dict[str, str]:
        return {name.casefold(): value for name, value in self.values}

    @cached_property
    def folded(self) -> dict[str, str]:
        """Casefolded values by casefolded field name: what the filter compares."""
        return {name.casefold(): value.casefold() for name, value in self.values}

    def fields_json(self) -> dict[str, str]:
        return {name: "" if self.removed else value for name, value in self.values}

    def profile_json(self, dataonly: bool = False) -> dict[str, Any]:
        if dataonly:
            keys = ("ID", "fields", "interests", "secret", "modified")
            return {k: v for k, v in self.profile_json().items() if k in keys}
        return {
            "ID": self.id,
            "fields": self.fields_json(),
            "interests": [] if self.removed else list(self.interests),
            "database": self.owner,
            "secret": self.secret,
            "created": self.created,
            "modified": self.modified,
            "removed": self.removed or False,
        }

    def subprofile_json(self, dataonly: bool = False) -> dict[str, Any]:
        found = {
            "ID": self.id,
            "secret": self.secret,
            "fields": self.fields_json(),
            "profile": self.profile,
            "collection": self.owner,
            "created": self.created,
            "modified": self.modified,
            "removed": self.removed or False,
        }
        if dataonly:
            del found["created"], found["removed"]
        return found


def nested(items: Sequence[Any]) -> dict[str, Any]:
    """A list inside a database or collection object: paged, at most NESTED_LIMIT items."""
    shown = list(items[:NESTED_LIMIT])
    return {
        "start": 0,
        "limit": NESTED_LIMIT,
        "count": len(shown),
        "data": shown,
        "total": len(items),
    }


# -- paging and the fields[] filter --------------------------------------------------------


def _number(text: str | None, default: int) -> int:
    """PHP's (int) cast, as the API applies it: a leading integer, or 0."""
    if text is None:
        return default
    found = re.match(r"^\s*([+-]?\d+)", text)
    return int(found.group(1)) if found else 0


def _true(text: str | None) -> bool:
    """The `total` parameter: absent means true; "true"/"yes" (any case), a number ≥ 1."""
    if text is None:
        return True
    if re.fullmatch(r"[+-]?\d+(\.\d*)?", text.strip()):
        return abs(float(text)) >= 1
    return text.casefold() in ("true", "yes")


@dataclass(frozen=True)
class Page:
    """`start`, `limit` and `total` of one list call, as the API reads its parameters."""

    start: int
    limit: int
    total: bool

    @classmethod
    def of(cls, query: Mapping[str, str]) -> Page:
        limit = min(_number(query.get("limit"), DEFAULT_LIMIT), MAX_LIMIT)
        return cls(_number(query.get("start"), 0), limit, _true(query.get("total")))

    def wrap(self, items: Sequence[Any], render: Callable[[Any], Any]) -> dict[str, Any]:
        shown = items[self.start : self.start + self.limit] if self.start >= 0 else []
        data = [render(item) for item in shown] if self.limit > 0 else []
        wrapper: dict[str, Any] = {
            "start": self.start,
            "limit": self.limit,
            "count": len(data),
            "data": data,
        }
        if self.total:
            wrapper["total"] = len(items)
        return wrapper


@dataclass(frozen=True)
class Condition:
    name: str  # casefolded
    equal: bool  # == or !=
    value: str  # casefolded

    def holds(self, record: Record) -> bool:
        return (record.folded.get(self.name, "") == self.value) == self.equal


def conditions(texts: Iterable[str], fields: Sequence[Field]) -> list[Condition]:
    """The `fields[]` conditions the API applies: on a field the list's owner has, with `==`
    or `!=`; any other is ignored (the live API ignores an unknown field name)."""
    known = {f.name.casefold() for f in fields}
    found = []
    for text in texts:
        parsed = _CONDITION.match(text.strip())
        if parsed is None or parsed.group(2) not in ("==", "!="):
            continue
        name, operator, value = parsed.groups()
        if name.casefold() in known:
            found.append(Condition(name.casefold(), operator == "==", value.casefold()))
    return found


def filter_texts(query: Iterable[tuple[str, str]]) -> list[str]:
    """The values of `fields[]`, `fields[0]`, ... in a query string."""
    return [value for key, value in query if key == "fields" or key.startswith("fields[")]


# -- the account ---------------------------------------------------------------------------


@dataclass
class Account:
    """Everything in the simulated Copernica account. `loaded`: an account was given; until
    then a profile or subprofile data request is taken for any positive id (as before)."""

    databases: dict[str, Database] = field(default_factory=dict)
    collections: dict[str, Collection] = field(default_factory=dict)
    profiles: dict[str, Record] = field(default_factory=dict)
    subprofiles: dict[str, Record] = field(default_factory=dict)
    loaded: bool = False
    # Live profiles per database and subprofiles per collection, in id order (built on load).
    _members: dict[tuple[str, str], list[Record]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, document: Any, now: datetime | None = None) -> Account:
        """The account an operator or a test describes (see the module docstring of
        service/simulator/app.py for the shape); AccountError says what is wrong."""
        return _Loader(now or datetime.now(UTC)).load(document)

    def summary(self) -> dict[str, int]:
        return {
            "databases": len(self.databases),
            "collections": len(self.collections),
            "profiles": len(self.profiles),
            "subprofiles": len(self.subprofiles),
        }

    def members(self, kind: str, owner: str) -> list[Record]:
        """The live profiles of a database (`kind` "profile"), or subprofiles of a
        collection ("subprofile"), by id."""
        return self._members.get((kind, owner), [])

    def index(self) -> None:
        members: dict[tuple[str, str], list[Record]] = {}
        for kind, records in (("profile", self.profiles), ("subprofile", self.subprofiles)):
            for record in records.values():
                if record.removed is None:
                    members.setdefault((kind, record.owner), []).append(record)
        for found in members.values():
            found.sort(key=lambda r: int(r.id))
        self._members = members

    def record(self, kind: str, subject_id: str) -> Record | None:
        """A profile or subprofile by id, removed or not."""
        return (self.profiles if kind == "profile" else self.subprofiles).get(subject_id)

    def email_of(self, kind: str, subject_id: str) -> str | None:
        """The value of the record's `email`-typed field, if it has one and it is set."""
        record = self.record(kind, subject_id)
        if record is None:
            return None
        owners: Mapping[str, Database | Collection]
        owners = self.databases if kind == "profile" else self.collections
        owner = owners.get(record.owner)
        for f in owner.fields if owner else ():
            if f.type == "email":
                return record.value(f.name.casefold()) or None
        return None


def query_records(
    records: Sequence[Record], texts: Sequence[str], fields: Sequence[Field]
) -> Sequence[Record]:
    """The records a list call with these `fields[]` conditions returns."""
    applied = conditions(texts, fields)
    if not applied:
        return records
    return [r for r in records if all(c.holds(r) for c in applied)]


# -- loading -------------------------------------------------------------------------------


def _id_of(item: Mapping[str, Any], where: str) -> str:
    value = item.get("id", item.get("ID"))
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.isdigit() or int(value) <= 0:
        raise AccountError(f"{where}: id must be a positive number as a string, got {value!r}")
    return value


def _object(value: Any, where: str, allowed: Iterable[str]) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise AccountError(f"{where}: expected a JSON object")
    unknown = set(value) - set(allowed)
    if unknown:
        raise AccountError(f"{where}: unknown members {sorted(unknown)}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise AccountError(f"{where}: expected a list")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise AccountError(f"{where}: expected a non-empty string")
    return value


class _Loader:
    """Reads an account document, checking every reference; one pass, in document order."""

    def __init__(self, now: datetime) -> None:
        self.now = amsterdam(now)
        self.account = Account(loaded=True)
        self.field_ids = 0

    def load(self, document: Any) -> Account:
        top = _object(document, "account", ("databases", "profiles", "subprofiles"))
        for n, item in enumerate(_list(top.get("databases"), "databases")):
            self.database(item, f"databases[{n}]")
        for n, item in enumerate(_list(top.get("profiles"), "profiles")):
            self.profile(item, f"profiles[{n}]")
        for n, item in enumerate(_list(top.get("subprofiles"), "subprofiles")):
            self.subprofile(item, f"subprofiles[{n}]")
        self.account.index()
        return self.account

    def fields(self, value: Any, where: str) -> tuple[Field, ...]:
        found: list[Field] = []
        for n, item in enumerate(_list(value, where)):
            spot = f"{where}[{n}]"
            raw = _object(item, spot, ("id", "ID", "name", "type"))
            self.field_ids += 1
            fid = _id_of(raw, spot) if ("id" in raw or "ID" in raw) else str(self.field_ids)
            kind = raw.get("type", "text")
            found.append(Field(fid, _text(raw.get("name"), f"{spot}.name"), _text(kind, spot)))
        names = [f.name.casefold() for f in found]
        if len(set(names)) != len(names):
            raise AccountError(f"{where}: two fields with one name")
        if sum(f.type == "email" for f in found) > 1:
            raise AccountError(f"{where}: more than one email-typed field")
        return tuple(found)

    def database(self, item: Any, where: str) -> None:
        allowed = ("id", "ID", "name", "fields", "interests", "collections", "created")
        raw = _object(item, where, allowed)
        did = _id_of(raw, where)
        if did in self.account.databases:
            raise AccountError(f"{where}: database {did} given twice")
        interests = []
        for n, entry in enumerate(_list(raw.get("interests"), f"{where}.interests")):
            spot = f"{where}.interests[{n}]"
            one = _object(entry, spot, ("id", "ID", "name", "group"))
            group = one.get("group", "")
            interests.append(Interest(_id_of(one, spot), _text(one.get("name"), spot), group))
        collections = []
        for n, entry in enumerate(_list(raw.get("collections"), f"{where}.collections")):
            spot = f"{where}.collections[{n}]"
            one = _object(entry, spot, ("id", "ID", "name", "fields"))
            cid = _id_of(one, spot)
            if cid in self.account.collections:
                raise AccountError(f"{spot}: collection {cid} given twice")
            name = _text(one.get("name"), f"{spot}.name")
            collection = Collection(
                cid, name, did, self.fields(one.get("fields"), spot + ".fields")
            )
            self.account.collections[cid] = collection
            collections.append(collection)
        self.account.databases[did] = Database(
            did,
            _text(raw.get("name"), f"{where}.name"),
            self.time(raw.get("created"), f"{where}.created"),
            self.fields(raw.get("fields"), f"{where}.fields"),
            tuple(interests),
            tuple(collections),
        )

    def time(self, value: Any, where: str) -> str:
        if value is None:
            return self.now
        if not isinstance(value, str) or not _TIME.match(value):
            raise AccountError(f"{where}: expected YYYY-MM-DD HH:MM:SS, got {value!r}")
        return value

    def values(
        self, value: Any, fields: Sequence[Field], where: str
    ) -> tuple[tuple[str, str], ...]:
        given = _object(value or {}, where, (f.name for f in fields))
        for name, text in given.items():
            if not isinstance(text, str | int | float) or isinstance(text, bool):
                raise AccountError(f"{where}.{name}: expected a string")
        return tuple((f.name, str(given.get(f.name, ""))) for f in fields)

    def record(
        self, raw: Mapping[str, Any], where: str, owner: str, fields: Sequence[Field]
    ) -> Record:
        rid = _id_of(raw, where)
        created = self.time(raw.get("created"), f"{where}.created")
        removed = raw.get("removed")
        if removed is True:
            removed = self.now
        elif removed is False:
            removed = None
        elif removed is not None:
            removed = self.time(removed, f"{where}.removed")
        secret = raw.get("secret") or hashlib.sha256(f"{owner}:{rid}".encode()).hexdigest()[:32]
        return Record(
            rid,
            owner,
            self.values(raw.get("fields"), fields, f"{where}.fields"),
            _text(secret, f"{where}.secret"),
            created,
            self.time(raw.get("modified", created), f"{where}.modified"),
            removed,
        )

    def profile(self, item: Any, where: str) -> None:
        allowed = (
            "id",
            "ID",
            "database",
            "fields",
            "interests",
            "secret",
            "created",
            "modified",
            "removed",
        )
        raw = _object(item, where, allowed)
        database = self.account.databases.get(str(raw.get("database")))
        if database is None:
            raise AccountError(f"{where}: no database {raw.get('database')!r} in the account")
        record = self.record(raw, where, database.id, database.fields)
        if record.id in self.account.profiles:
            raise AccountError(f"{where}: profile {record.id} given twice")
        names = {i.name for i in database.interests}
        interests = _list(raw.get("interests"), f"{where}.interests")
        if not all(isinstance(i, str) and i in names for i in interests):
            raise AccountError(
                f"{where}.interests: not all of {interests} are interests of database {database.id}"
            )
        self.account.profiles[record.id] = replace(record, interests=tuple(interests))

    def subprofile(self, item: Any, where: str) -> None:
        allowed = (
            "id",
            "ID",
            "profile",
            "collection",
            "fields",
            "secret",
            "created",
            "modified",
            "removed",
        )
        raw = _object(item, where, allowed)
        collection = self.account.collections.get(str(raw.get("collection")))
        profile = self.account.profiles.get(str(raw.get("profile")))
        if collection is None:
            raise AccountError(f"{where}: no collection {raw.get('collection')!r} in the account")
        if profile is None:
            raise AccountError(f"{where}: no profile {raw.get('profile')!r} in the account")
        if collection.database != profile.owner:
            raise AccountError(
                f"{where}: collection {collection.id} is not in profile {profile.id}'s database"
            )
        record = self.record(raw, where, collection.id, collection.fields)
        if record.id in self.account.subprofiles:
            raise AccountError(f"{where}: subprofile {record.id} given twice")
        self.account.subprofiles[record.id] = replace(record, profile=profile.id)


# -- a small account with one person in several places (make run, tests) -----------------

# Where `sample_account` puts the person, and the source each place becomes.
SAMPLE_PLACES = {"Newsletter": "profile:101", "Shop": "profile:201", "Orders": "subprofile:2101"}
SAMPLE_TEXT_FIELD = "Contact"  # Shop's text field holding an address: a DISCOVERY_FIELDS name


_SAMPLE_DATABASES: list[dict[str, Any]] = [
    {
        "id": "1",
        "name": "Newsletter",
        "fields": [{"name": "Email", "type": "email"}, {"name": "Name"}],
        "interests": [{"id": "1", "name": "weekly", "group": "newsletters"}],
    },
    {
        "id": "2",
        "name": "Shop",
        "fields": [
            {"name": "Email", "type": "email"},
            {"name": "Name"},
            {"name": SAMPLE_TEXT_FIELD},
            {"name": "City"},
        ],
        "collections": [
            {
                "id": "21",
                "name": "Orders",
                "fields": [
                    {"name": "Email", "type": "email"},
                    {"name": "Order"},
                    {"name": "Total", "type": "float"},
                ],
            }
        ],
    },
]


def sample_account(
    person: str, places: Iterable[str] = tuple(SAMPLE_PLACES), others: int = 2
) -> dict[str, Any]:
    """An account (the JSON POST /_sim/account takes) where `person` is found in `places`:
    "Newsletter" (profile 101 by its `email` field), "Shop" (profile 201 by the text field
    SAMPLE_TEXT_FIELD; its own e-mail field holds another address), "Orders" (subprofile 2101
    of profile 201 in collection 21 of Shop); and `others` more people in each database, one
    of them removed. Databases 1 and 2, collection 21."""
    places = set(places)
    unknown = places - set(SAMPLE_PLACES)
    if unknown:
        raise ValueError(f"unknown places {sorted(unknown)}; known: {list(SAMPLE_PLACES)}")
    profiles: list[dict[str, Any]] = [
        {
            "id": "101",
            "database": "1",
            "fields": {
                "Email": person if "Newsletter" in places else "someone@example.net",
                "Name": "Alice Example",
            },
            "interests": ["weekly"],
            "created": "2024-03-02 09:15:00",
            "modified": "2025-11-20 18:42:07",
        },
        {
            "id": "201",
            "database": "2",
            "fields": {
                "Email": "alice.shop@example.org",
                "Name": "A. Example",
                SAMPLE_TEXT_FIELD: person if "Shop" in places else "",
                "City": "Utrecht",
            },
            "created": "2023-06-11 14:03:22",
        },
    ]
    for n in range(others):
        removed = n == others - 1 and others > 1
        for database, base in (("1", 110), ("2", 210)):
            profiles.append(
                {
                    "id": str(base + n),
                    "database": database,
                    "fields": {"Email": f"customer{n}@example.net", "Name": f"Customer {n}"},
                    "removed": removed,
                }
            )
    orders = {"Order": "ORD-2025-0042", "Total": "59.90"}
    email = person if "Orders" in places else "alice.shop@example.org"
    subprofiles = [
        {"id": "2101", "profile": "201", "collection": "21", "fields": {"Email": email, **orders}},
        {"id": "2102", "profile": "210", "collection": "21", "fields": {"Email": "x@example.net"}},
    ]
    if not others:
        subprofiles.pop()
    databases = copy.deepcopy(_SAMPLE_DATABASES)  # the caller may change its copy
    return {"databases": databases, "profiles": profiles, "subprofiles": subprofiles}
