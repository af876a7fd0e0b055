"""Discovery (SPEC "Sources and discovery"): `Discoverer` against the real simulator's account
and a real S3, driven on an in-memory record as the poller's visit drives it (`advance` with a
budget, the record saved between calls: here round-tripped through its bytes).

Each test also holds discovery to SPEC's cost rule, counted where Copernica counts: the
simulator's `account_calls` (listing + one query per place and field + extra pages + one details
call per match here; the filing call is the poller's)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import pytest
from ulid import ULID

from service.collect.discovery import Discoverer
from service.config import Settings
from service.copernica.account import Account, AnswerMalformed, record_of
from service.copernica.client import Backoff, CopernicaClient
from service.metrics import Metrics
from service.requests.ledger import Ledger
from service.requests.records import (
    AccessRequest,
    DataRequest,
    Discovery,
    DiscoveryStatus,
    Events,
    Status,
)
from service.storage.s3 import ArchiveStore
from tests.conftest import ACCESS_TOKEN, Bucket, Simulator, make_settings

ALICE = "alice@example.com"
HASH_KEY = b"discovery-test-key"


def fields(*named: str, email: str = "Email") -> list[dict[str, str]]:
    return [{"name": email, "type": "email"}, *({"name": n, "type": "text"} for n in named)]


def profile(pid: str, database: str, **values: str) -> dict[str, Any]:
    return {"id": pid, "database": database, "fields": values}


def subprofile(sid: str, pid: str, collection: str, **values: str) -> dict[str, Any]:
    return {"id": sid, "profile": pid, "collection": collection, "fields": values}


# Alice is in the newsletter (her address in another case), in its orders collection, and in
# the shop by its `Contact` text field (DISCOVERY_FIELDS). A database without an address field
# is never queried; the legacy one ignores the filter and answers everyone.
ACCOUNT = {
    "databases": [
        {
            "id": "1",
            "name": "Newsletter",
            "fields": fields("Name"),
            "collections": [{"id": "11", "name": "Orders", "fields": fields("Item")}],
        },
        {"id": "2", "name": "Shop", "fields": fields("Contact", email="Mail")},
        {"id": "3", "name": "Names only", "fields": [{"name": "Name", "type": "text"}]},
        {"id": "4", "name": "Legacy", "fields": fields()},
    ],
    "profiles": [
        profile("101", "1", Email="Alice@Example.COM", Name="Alice"),
        profile("102", "1", Email="bob@example.com", Name="Bob"),
        profile("201", "2", Mail="shop-alias@example.net", Contact=ALICE),
        profile("202", "2", Mail=ALICE.upper(), Contact="x"),
        profile("203", "2", Mail="carol@example.com", Contact="carol@example.com"),
        profile("301", "3", Name=ALICE),
        profile("401", "4", Email="dave@example.com"),
        profile("402", "4", Email="erin@example.com"),
    ],
    "subprofiles": [
        subprofile("1001", "101", "11", Email=ALICE, Item="book"),
        subprofile("1002", "102", "11", Email="bob@example.com", Item="pen"),
    ],
}
FOUND = {"profile:101", "profile:201", "profile:202", "subprofile:1001"}
# Listing: one databases page (every nested wrapper whole). Queries: Newsletter on Email,
# Orders on Email, Shop on Mail and on Contact, Legacy on Email (ignored: one page).
QUERIES = {"databases": 1, "profiles": 4, "subprofiles": 1}


@dataclass
class World:
    simulator: Simulator
    http: aiohttp.ClientSession
    settings: Settings
    store: ArchiveStore
    bucket: Bucket
    ledger: Ledger

    def discoverer(self, **settings: Any) -> Discoverer:
        """A Discoverer of its own (as a new visit or another replica has), quick to retry."""
        merged = replace(self.settings, **settings)
        client = CopernicaClient(self.http, merged, Metrics())
        account = Account(client, Backoff(attempts=2, base=0.001, cap=0.001))
        return Discoverer(account, self.store, merged, self.ledger.digest_of)

    async def sim(self, path: str, body: Any) -> Any:
        async with self.http.post(f"{self.simulator.url}/_sim/{path}", json=body) as answer:
            assert answer.status == 200, await answer.text()
            return await answer.json()

    def calls(self) -> dict[str, int]:
        return {k: v for k, v in self.simulator.state.account_calls.items() if v}

    async def copernica(self, path: str) -> bytes:
        """What Copernica answers a GET, exactly."""
        url = f"{self.simulator.url}/v2/{path}?access_token={ACCESS_TOKEN}"
        async with self.http.get(url) as answer:
            assert answer.status == 200
            return await answer.read()


@pytest.fixture
async def world(
    simulator: Simulator, s3: Any, bucket: str, store: Bucket, s3_endpoint: str
) -> AsyncIterator[World]:
    settings = make_settings(
        ARCHIVE_BUCKET=bucket,
        S3_ENDPOINT_URL=s3_endpoint,
        COPERNICA_API_URL=simulator.url + "/v2",
        COPERNICA_MAX_RPS="1000",
        PUBLIC_BASE_URL="http://receiver.test",
        DISCOVERY_FIELDS="contact, Nickname",
    )
    archive = ArchiveStore(s3, settings, Metrics())
    async with aiohttp.ClientSession() as http:
        found = World(simulator, http, settings, archive, store, Ledger(archive, HASH_KEY))
        await found.sim("account", ACCOUNT)
        yield found


def access_request(kind: str = "email", subject: str = ALICE, **discovery: Any) -> AccessRequest:
    first = DataRequest(kind, subject, events=Events("2026-01-15", "2026-03-01", windows=2))
    return AccessRequest.new(
        str(ULID()), first, discovery=Discovery(DiscoveryStatus.RUNNING, **discovery)
    )


async def discover(
    world: World, record: AccessRequest, max_calls: int = 100, **settings: Any
) -> tuple[AccessRequest, int]:
    """Advance until it stops (a new Discoverer and the record read back from its bytes before
    each advance, as separate visits would); the record and how many advances it took."""
    advances = 0
    while True:
        record = AccessRequest.from_bytes(record.to_bytes())
        advances += 1
        if not await world.discoverer(**settings).advance(record, max_calls):
            return record, advances


def sources(record: AccessRequest) -> list[str]:
    return [d.source for d in record.discovered]


def source(record: AccessRequest, name: str) -> DataRequest:
    found = record.source(name)
    assert found is not None, f"no source {name}: {sources(record)}"
    return found


async def test_finds_every_place_holding_the_address_at_the_cost_spec_allows(world: World) -> None:
    record, _ = await discover(world, access_request())

    assert record.discovery.status is DiscoveryStatus.DONE
    assert set(sources(record)) == FOUND  # no Bob, no Carol, nobody from Legacy or Names only
    assert len(sources(record)) == len(FOUND)
    shop, mail, orders = (
        source(record, n) for n in ("profile:201", "profile:202", "subprofile:1001")
    )
    assert (shop.found_by, mail.found_by, orders.found_by) == ("Contact", "Mail", "Email")
    assert shop.database is not None and shop.database.name == "Shop"
    assert orders.collection is not None and orders.database is not None
    assert (orders.collection.name, orders.profile, orders.database.name) == (
        "Orders",
        "101",
        "Newsletter",
    )
    for found in record.discovered:
        assert (found.status, found.report, found.details) == (Status.SUBMITTING, True, None)
        assert found.events == Events("2026-01-15", "2026-03-01", windows=2)
    summary = record.discovery.summary()
    assert summary["databases"] == 4 and summary["collections"] == 1
    assert (summary["queries"], summary["matches"]) == (5, 4)
    assert world.calls() == QUERIES  # Legacy ignored the filter: one page, no false match
    assert summary["calls"] == sum(QUERIES.values())

    # Each source's details: Copernica's exact bytes, once; a second fetch adopts them. A
    # subprofile removed meanwhile is a source gone.
    await world.sim("faults", {"gone_sources": ["subprofile:1001"]})
    for found in record.discovered:
        await world.discoverer().fetch_details(record, found)
    assert (orders.status, orders.last_error) == (Status.GONE, "No subprofile with supplied ID")
    assert orders.details is None
    assert world.calls() == {**QUERIES, "profile": 3, "subprofile": 1}
    assert record.discovery.calls == sum(QUERIES.values()) + len(FOUND)
    details = source(record, "profile:201").details
    assert details is not None
    body = await world.bucket.read(details.key)
    assert body == await world.copernica("profile/201")
    assert (details.sha256, details.size) == (hashlib.sha256(body).hexdigest(), len(body))
    digest = world.ledger.digest_of(source(record, "profile:201"))
    assert details.key.endswith(f"sources/{record.id}/{digest}/details.json")
    again = AccessRequest.from_bytes(record.to_bytes())
    source(again, "profile:201").details = None
    await world.discoverer().fetch_details(again, source(again, "profile:201"))
    assert source(again, "profile:201").details == details


async def test_a_huge_account_is_read_in_pages_of_1000(world: World) -> None:
    """2,600 profiles: 1,100 holding the address in one database (two query pages), 1,500 in a
    database that ignores the filter (one page read, only the real match kept)."""
    many = [profile(str(10_000 + n), "1", Email=ALICE) for n in range(1_100)]
    crowd = [profile(str(20_000 + n), "2", Mail=f"p{n}@example.org") for n in range(1_500)]
    crowd[3]["fields"]["Mail"] = ALICE  # in the first page
    crowd[1_400]["fields"]["Mail"] = ALICE  # beyond it: SPEC's one page leaves it
    await world.sim(
        "account",
        {
            "databases": [
                {"id": "1", "name": "Big", "fields": fields()},
                {"id": "2", "name": "Crowd", "fields": fields(email="Mail")},
            ],
            "profiles": many + crowd,
        },
    )
    await world.sim("faults", {"ignore_filter_databases": ["2"]})

    record, _ = await discover(world, access_request(max_sources=5_000))

    assert record.discovery.status is DiscoveryStatus.DONE
    assert len(sources(record)) == 1_101 == len(set(sources(record)))
    assert "profile:20003" in sources(record) and "profile:20000" not in sources(record)
    assert world.calls() == {"databases": 1, "profiles": 3}  # Big: 1000 + 100; Crowd: one page
    assert record.discovery.calls == 4


async def test_over_the_limit_it_waits_then_resumes_where_it_stopped(world: World) -> None:
    record, _ = await discover(world, access_request(), discovery_max_sources=2)

    assert record.discovery.status is DiscoveryStatus.OVER_LIMIT
    assert len(sources(record)) == 2 and record.discovery.matches == 2
    assert "raise the limit" in (record.discovery.last_error or "")
    stopped_at = world.calls()
    assert not await world.discoverer(discovery_max_sources=2).advance(record, 100)
    assert world.calls() == stopped_at  # waiting costs nothing

    record.discovery = replace(record.discovery, max_sources=10)  # the operator's raise
    record, _ = await discover(world, record, discovery_max_sources=2)

    assert record.discovery.status is DiscoveryStatus.DONE
    assert record.discovery.last_error is None
    assert set(sources(record)) == FOUND and len(sources(record)) == len(FOUND)
    # The page it stopped on is read again, nothing before it.
    reread = sum(world.calls().values()) - sum(QUERIES.values())
    assert reread == 1
    assert record.discovery.calls == sum(QUERIES.values()) + 1


async def test_copernica_unavailable_leaves_it_retrying_then_it_resumes(world: World) -> None:
    record = access_request()
    discoverer = world.discoverer()
    assert await discoverer.advance(record, 2)  # the listing and the first query
    done_before = world.calls()
    # Three 503s: this call's two tries fail, the next call's first try too.
    await world.sim("faults", {"list_errors": 3})

    assert not await discoverer.advance(record, 100)
    assert record.discovery.status is DiscoveryStatus.RETRYING
    assert record.discovery.errors == 1
    assert "503" in (record.discovery.last_error or "")
    kept = AccessRequest.from_bytes(record.to_bytes())
    record, _ = await discover(world, kept)

    assert record.discovery.status is DiscoveryStatus.DONE
    assert (record.discovery.errors, record.discovery.last_error) == (0, None)
    assert set(sources(record)) == FOUND and len(sources(record)) == len(FOUND)
    assert done_before == {"databases": 1, "profiles": 1}
    # Only the failed tries come on top: no page done before was read again.
    assert sum(world.calls().values()) == sum(QUERIES.values()) + 3
    assert record.discovery.calls == sum(QUERIES.values()) + 1  # the failed call, counted once


async def test_a_discovery_resumed_call_by_call_finds_the_same_sources(world: World) -> None:
    """One call per visit, the record read back from its bytes by a new Discoverer each time
    (a replica killed after any call): the same sources, none twice, every call counted."""
    record, advances = await discover(world, access_request(), max_calls=1)

    assert record.discovery.status is DiscoveryStatus.DONE
    assert set(sources(record)) == FOUND and len(sources(record)) == len(FOUND)
    assert advances == sum(QUERIES.values()) + 1  # one call each, and the last one: done
    assert world.calls() == QUERIES
    assert record.discovery.calls == sum(world.calls().values())


async def test_a_profile_filing_looks_for_its_address(world: World) -> None:
    record, _ = await discover(world, access_request("profile", "101"))

    assert record.discovery.status is DiscoveryStatus.DONE
    assert record.discovery.address == "Alice@Example.COM"
    # The address, then the three other places; 101 itself not twice.
    assert sources(record)[0] == "email"
    assert set(sources(record)) == {"email"} | (FOUND - {"profile:101"})
    assert len(sources(record)) == len(FOUND)
    assert source(record, "email").subject_id == "Alice@Example.COM"
    # Its details, its database's fields, then the search.
    assert world.calls() == {**QUERIES, "profile": 1, "database_fields": 1}
    await world.discoverer().fetch_details(record, record.first)  # noted already: no call
    assert world.calls()["profile"] == 1
    details = record.first.details
    assert details is not None
    assert await world.bucket.read(details.key) == await world.copernica("profile/101")

    # A subprofile filing: the address from its collection's e-mail field.
    other, _ = await discover(world, access_request("subprofile", "1001"))
    assert other.discovery.address == ALICE
    assert set(sources(other)) == {"email", "profile:101", "profile:201", "profile:202"}

    # A profile without an address, and one Copernica says is gone: nothing to look for.
    await world.sim("faults", {"gone_sources": ["profile:203"]})
    for subject in ("301", "203"):
        other, _ = await discover(world, access_request("profile", subject))
        assert other.discovery.status is DiscoveryStatus.DONE
        assert other.discovered == []
        assert "nothing discovered" in (other.discovery.last_error or "")
    assert other.first.status is Status.GONE


async def test_a_database_gone_between_listing_and_query_is_skipped(world: World) -> None:
    record = access_request()
    assert await world.discoverer().advance(record, 1)  # the listing: four databases, Orders
    assert record.discovery.phase == "querying"
    shop_gone = {**ACCOUNT, "databases": [d for d in ACCOUNT["databases"] if d["id"] != "2"]}
    shop_gone["profiles"] = [p for p in ACCOUNT["profiles"] if p["database"] != "2"]
    await world.sim("account", shop_gone)

    record, _ = await discover(world, record)

    assert record.discovery.status is DiscoveryStatus.DONE
    assert record.discovery.last_error is None
    assert set(sources(record)) == {"profile:101", "subprofile:1001"}
    assert world.calls()["profiles"] == 3  # Newsletter, Shop (gone: one 400), Legacy


async def test_fields_and_collections_beyond_the_answer_are_read_from_their_own_lists(
    world: World,
) -> None:
    """A database answer holds 20 fields and 20 collections at most (the simulator, as a paged
    wrapper says): its e-mail field is the 25th and Alice's collection the 22nd. With one call
    per visit, the wide database waits for a visit of its own."""
    many = [{"name": f"F{n}", "type": "text"} for n in range(24)]
    collections = [{"id": str(100 + n), "name": f"C{n}", "fields": fields()} for n in range(22)]
    await world.sim(
        "account",
        {
            "databases": [
                {"id": "1", "name": "Plain", "fields": fields()},
                {
                    "id": "2",
                    "name": "Wide",
                    "fields": [*many, {"name": "Email", "type": "email"}],
                    "collections": collections,
                },
            ],
            "profiles": [profile("201", "2", Email=ALICE), profile("202", "2", Email="x@y.z")],
            "subprofiles": [subprofile("2001", "201", "121", Email=ALICE)],
        },
    )

    record, _ = await discover(world, access_request(), max_calls=1)

    assert set(sources(record)) == {"profile:201", "subprofile:2001"}
    assert (record.discovery.databases, record.discovery.collections) == (2, 22)
    assert world.calls() == {
        "databases": 2,  # read again for Wide, after the visit that read Plain
        "database_fields": 1,
        "database_collections": 1,
        "profiles": 2,
        "subprofiles": 22,
    }
    assert record.discovery.calls == sum(world.calls().values())


async def test_a_malformed_answer_is_retried_never_taken(world: World) -> None:
    await world.sim("faults", {"garbage_next": 1})  # a proxy's HTML page with a 200

    record = access_request()
    assert not await world.discoverer().advance(record, 100)

    assert record.discovery.status is DiscoveryStatus.RETRYING
    assert "malformed answer (not JSON)" in (record.discovery.last_error or "")
    record, _ = await discover(world, record)
    assert set(sources(record)) == FOUND and record.discovery.status is DiscoveryStatus.DONE


@pytest.mark.parametrize(
    "body",
    [b"[]", b'{"fields": {}}', b'{"ID": true}', b'{"ID": "7", "fields": "x"}', b"<html>"],
)
def test_a_record_answer_of_another_shape_is_a_typed_error(body: bytes) -> None:
    with pytest.raises(AnswerMalformed, match="Copernica profile: malformed answer"):
        record_of("profile", body)
