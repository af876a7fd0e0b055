"""The simulator's account: the calls that find a person (databases, fields, collections,
profiles, subprofiles), answered as the live Copernica API answers them, its fault switches,
and profile data requests. Over real HTTP, one simulator for the module; each test loads the
small account it needs (POST /_sim/account), which also drops the previous test's faults."""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from service.simulator.account import NESTED_LIMIT, amsterdam
from service.simulator.app import SIM_STATE, SimState, SimulatorConfig, create_simulator_app
from tests.conftest import free_port
from tests.support import SAMPLE_PLACES, account_with, eventually

# One worker under `make test` (xdist): the module's simulator (`sim`) is started once.
pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.xdist_group("sim-account")]

TOKEN = "account-test-token"
PERSON = "Alice.Example@Example.com"


@dataclass
class Sim:
    url: str
    state: SimState
    http: aiohttp.ClientSession
    reports: list[bytes] = field(default_factory=list)  # bodies POSTed to `report_url`
    report_url: str = ""

    async def get(self, path: str, *params: tuple[str, str]) -> tuple[int, Any]:
        query = [("access_token", TOKEN), *params]
        async with self.http.get(f"{self.url}/v2/{path}", params=query) as answer:
            return answer.status, json.loads(await answer.read())

    async def post(self, path: str, **params: str) -> tuple[int, dict[str, str], bytes]:
        query = {"access_token": TOKEN, **params}
        async with self.http.post(f"{self.url}/v2/{path}", params=query) as answer:
            return answer.status, dict(answer.headers), await answer.read()

    async def control(self, path: str, body: Any) -> tuple[int, Any]:
        async with self.http.post(f"{self.url}/_sim/{path}", json=body) as answer:
            return answer.status, await answer.json()

    async def load(self, account: dict[str, Any]) -> None:
        """A fresh simulator state (no faults, no requests) holding `account`."""
        assert (await self.control("reset", {}))[0] == 200
        status, answer = await self.control("account", account)
        assert status == 200, answer


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sim() -> AsyncIterator[Sim]:
    app = create_simulator_app(SimulatorConfig(access_token=TOKEN, ready_after=0.0, control=True))
    reports: list[bytes] = []

    async def report(request: web.Request) -> web.Response:
        reports.append(await request.read())
        return web.Response()

    receiver = web.Application()
    receiver.router.add_post("/report", report)
    async with (
        TestServer(app, host="127.0.0.1") as server,
        TestServer(receiver, host="127.0.0.1") as report_server,
        aiohttp.ClientSession() as http,
    ):
        yield Sim(
            str(server.make_url("")).rstrip("/"),
            app[SIM_STATE],
            http,
            reports,
            str(report_server.make_url("/report")),
        )


def shop(profiles: int = 5, fields: int = 2) -> dict[str, Any]:
    """Database 1 "Shop" (Email, Name and `fields - 2` more) with `profiles` people, ids
    1..n, every third one's address upper-cased; collection 11 "Orders" with one order."""
    extra = [{"name": f"F{n}"} for n in range(fields - 2)]
    return {
        "databases": [
            {
                "id": "1",
                "name": "Shop",
                "fields": [{"name": "Email", "type": "email"}, {"name": "Name"}, *extra],
                "collections": [
                    {"id": "11", "name": "Orders", "fields": [{"name": "Email", "type": "email"}]}
                ],
            }
        ],
        "profiles": [
            {
                "id": str(n),
                "database": "1",
                "fields": {
                    "Email": f"p{n}@example.com".upper() if n % 3 == 0 else f"p{n}@example.com"
                },
            }
            for n in range(1, profiles + 1)
        ],
        "subprofiles": [
            {"id": "501", "profile": "1", "collection": "11", "fields": {"Email": "p1@example.com"}}
        ],
    }


def ids(answer: dict[str, Any]) -> list[str]:
    return [item["ID"] for item in answer["data"]]


# -- lists ---------------------------------------------------------------------------------


async def test_lists_are_paged_wrappers_with_limit_capped_and_total_optional(sim: Sim) -> None:
    await sim.load(shop(profiles=5))

    status, first = await sim.get("database/1/profiles", ("start", "1"), ("limit", "2"))
    _, rest = await sim.get("database/1/profiles", ("start", "3"), ("total", "false"))
    _, capped = await sim.get("database/1/profiles", ("limit", "5000"))
    _, listed = await sim.get("databases")

    assert status == 200
    assert {k: v for k, v in first.items() if k != "data"} == {
        "start": 1,
        "limit": 2,
        "count": 2,
        "total": 5,
    }
    assert ids(first) == ["2", "3"]
    assert rest["limit"] == 100 and ids(rest) == ["4", "5"] and "total" not in rest
    assert capped["limit"] == 1000 and capped["count"] == 5
    assert listed["count"] == listed["total"] == 1
    database = listed["data"][0]
    assert database["ID"] == "1" and database["name"] == "Shop"
    assert {"fields", "interests", "collections"} <= database.keys()
    assert database["collections"]["data"][0]["database"] == "1"


async def test_a_database_objects_nested_lists_stop_at_twenty_the_endpoints_give_all(
    sim: Sim,
) -> None:
    account = shop(profiles=1, fields=NESTED_LIMIT + 3)
    account["databases"][0]["collections"] = [
        {"id": str(20 + n), "name": f"C{n}", "fields": [{"name": f"G{k}"} for k in range(22)]}
        for n in range(NESTED_LIMIT + 1)
    ]
    account["subprofiles"] = []
    await sim.load(account)

    _, listed = await sim.get("databases")
    nested = listed["data"][0]
    _, fields = await sim.get("database/1/fields")
    _, collections = await sim.get("database/1/collections", ("limit", "1000"))
    _, collection_fields = await sim.get("collection/40/fields")

    assert (nested["fields"]["count"], nested["fields"]["total"]) == (20, 23)
    assert (nested["collections"]["count"], nested["collections"]["total"]) == (20, 21)
    assert nested["collections"]["data"][0]["fields"]["count"] == 20
    assert fields["count"] == 23 and fields["data"][0]["type"] == "email"
    assert collections["count"] == 21 and collections["data"][-1]["ID"] == "40"
    assert collection_fields["count"] == 22 and collection_fields["data"][21]["name"] == "G21"


async def test_the_filter_ignores_case_and_an_unknown_field_and_removed_people_are_left_out(
    sim: Sim,
) -> None:
    account = shop(profiles=6)
    account["profiles"][4]["removed"] = True  # profile 5
    account["profiles"].append({"id": "7", "database": "1", "fields": {"Email": "p3@example.com"}})
    await sim.load(account)

    _, by_address = await sim.get("database/1/profiles", ("fields[]", "email==p3@EXAMPLE.com"))
    _, php_style = await sim.get("database/1/profiles", ("fields[0]", " EMAIL==p3@example.com "))
    _, unknown_field = await sim.get("database/1/profiles", ("fields[]", "Contact==p3@example.com"))
    _, removed = await sim.get("database/1/profiles", ("fields[]", "Email==p5@example.com"))
    _, subprofiles = await sim.get(
        "collection/11/subprofiles", ("fields[]", "Email==P1@example.com")
    )
    status, unknown_database = await sim.get("database/9/profiles")

    assert ids(by_address) == ["3", "7"] and by_address["total"] == 2
    assert by_address["data"][0]["fields"]["Email"] == "P3@EXAMPLE.COM"  # as stored
    assert ids(php_style) == ["3", "7"]
    assert ids(unknown_field) == ["1", "2", "3", "4", "6", "7"]  # every live profile
    assert removed["count"] == 0
    assert ids(subprofiles) == ["501"] and subprofiles["data"][0]["profile"] == "1"
    assert (status, unknown_database) == (
        400,
        {"error": {"message": "No database with supplied ID"}},
    )


async def test_a_profile_and_a_subprofile_are_answered_as_copernica_shows_them(sim: Sim) -> None:
    account = account_with(PERSON)
    await sim.load(account)

    _, profile = await sim.get("profile/101")
    _, subprofile = await sim.get("subprofile/2101")
    _, removed = await sim.get("profile/111")
    missing = await sim.get("profile/999")
    missing_sub = await sim.get("subprofile/999")

    assert profile == {
        "ID": "101",
        "fields": {"Email": PERSON, "Name": "Alice Example"},
        "interests": ["weekly"],
        "database": "1",
        "secret": profile["secret"],
        "created": "2024-03-02 09:15:00",
        "modified": "2025-11-20 18:42:07",
        "removed": False,
    }
    assert len(profile["secret"]) == 32
    assert list(subprofile) == [
        "ID",
        "secret",
        "fields",
        "profile",
        "collection",
        "created",
        "modified",
        "removed",
    ]
    assert (subprofile["profile"], subprofile["collection"]) == ("201", "21")
    assert subprofile["fields"]["Email"] == PERSON
    assert removed["fields"] == {"Email": "", "Name": ""} and isinstance(removed["removed"], str)
    assert missing == (400, {"error": {"message": "No entity with supplied ID"}})
    assert missing_sub == (400, {"error": {"message": "No subprofile with supplied ID"}})


async def test_times_are_amsterdam_wall_clock_in_winter_and_summer() -> None:
    assert amsterdam(datetime(2025, 1, 15, 12, 0, tzinfo=UTC)) == "2025-01-15 13:00:00"
    assert amsterdam(datetime(2025, 7, 1, 12, 0, tzinfo=UTC)) == "2025-07-01 14:00:00"
    assert amsterdam(datetime(2025, 3, 30, 0, 59, 59, tzinfo=UTC)) == "2025-03-30 01:59:59"
    assert amsterdam(datetime(2025, 3, 30, 1, 0, tzinfo=UTC)) == "2025-03-30 03:00:00"
    assert amsterdam(datetime(2025, 10, 26, 1, 0, tzinfo=UTC)) == "2025-10-26 02:00:00"


async def test_a_malformed_account_is_refused_saying_what_and_reset_empties_it(sim: Sim) -> None:
    await sim.load(account_with(PERSON))
    bad = account_with(PERSON)
    bad["subprofiles"][0]["collection"] = "77"

    refused = await sim.control("account", bad)
    not_json = await sim.control("account", ["not", "an", "account"])
    kept = await sim.get("profile/101")
    await sim.control("reset", {})
    emptied = await sim.get("databases")
    stand_in = await sim.get("profile/101")

    assert refused == (
        400,
        {"error": {"message": "subprofiles[0]: no collection '77' in the account"}},
    )
    assert not_json[0] == 400 and "expected a JSON object" in not_json[1]["error"]["message"]
    assert kept[0] == 200 and kept[1]["fields"]["Name"] == "Alice Example"  # the one held
    assert emptied[0] == 200 and emptied[1]["data"] == []
    # With no account, every positive id is a stand-in record (the suites that file profiles
    # without an account need one), not the one the reset dropped.
    assert stand_in[0] == 200 and "Name" not in stand_in[1]["fields"]


# -- fault switches ------------------------------------------------------------------------


async def test_list_errors_answer_the_next_account_calls_503_and_every_call_is_counted(
    sim: Sim,
) -> None:
    await sim.load(account_with(PERSON))
    assert (await sim.control("faults", {"list_errors": 3}))[0] == 200

    answers: list[Any] = [
        await sim.get("databases"),
        await sim.get("database/2/fields"),
        (await sim.post("email/x@example.com/datarequest"))[0],  # not an account call
        await sim.get("collection/21/subprofiles"),
        await sim.get("profile/101"),
    ]
    state = sim.state.snapshot()

    loadbalancer = (503, {"error": {"message": "Loadbalancer Error"}})
    assert answers[:2] == [loadbalancer, loadbalancer]
    assert answers[2] == 201
    assert answers[3] == loadbalancer
    assert answers[4][0] == 200
    assert state["faults"]["list_errors"] == 0
    assert state["account_calls"] == {
        "databases": 1,
        "database_fields": 1,
        "subprofiles": 1,
        "profile": 1,
    }
    assert [r["subject"] for r in state["requests"].values()] == ["email/x@example.com"]


async def test_gone_sources_stay_listed_but_their_record_and_data_request_are_refused(
    sim: Sim,
) -> None:
    await sim.load(account_with(PERSON))
    changes = {"gone_sources": [SAMPLE_PLACES["Newsletter"], SAMPLE_PLACES["Orders"]]}
    assert (await sim.control("faults", changes))[0] == 200

    _, listed = await sim.get("database/1/profiles", ("fields[]", f"Email=={PERSON}"))
    profile = await sim.get("profile/101")
    filed = await sim.post("profile/101/datarequest")
    subprofile = await sim.get("subprofile/2101")
    filed_sub = await sim.post("subprofile/2101/datarequest")
    other = await sim.post("profile/201/datarequest")

    assert ids(listed) == ["101"]
    assert profile == (400, {"error": {"message": "No entity with supplied ID"}})
    assert (filed[0], json.loads(filed[2])) == profile
    assert subprofile == (400, {"error": {"message": "No subprofile with supplied ID"}})
    assert (filed_sub[0], json.loads(filed_sub[2])) == subprofile
    assert other[0] == 201


async def test_email_invalid_method_and_a_database_ignoring_the_filter(sim: Sim) -> None:
    await sim.load(account_with(PERSON))
    faults = {"email_invalid_method": True, "ignore_filter_databases": ["2"]}
    assert (await sim.control("faults", faults))[0] == 200

    email = await sim.post(f"email/{PERSON}/datarequest")
    _, ignored = await sim.get("database/2/profiles", ("fields[]", f"Email=={PERSON}"))
    _, honoured = await sim.get("database/1/profiles", ("fields[]", f"Email=={PERSON}"))
    refused = await sim.control("faults", {"gone_sources": "profile:1"})

    assert (email[0], json.loads(email[2])) == (400, {"error": {"message": "Invalid method"}})
    assert ids(ignored) == ["201", "210"]  # every live profile of Shop, not the address's
    assert ids(honoured) == ["101"]
    assert refused[0] == 400 and "gone_sources" in refused[1]["error"]["message"]


# -- profile and subprofile data requests --------------------------------------------------


async def test_a_profile_data_request_is_created_ready_fetched_and_delivered(sim: Sim) -> None:
    await sim.load(account_with(PERSON))
    sim.reports.clear()

    status, headers, _ = await sim.post("profile/101/datarequest", report=sim.report_url)
    copernica_id = headers["X-Created"]
    _, ready = await sim.get(f"datarequest/{copernica_id}/status")
    async with sim.http.get(
        f"{sim.url}/v2/datarequest/{copernica_id}/data", params={"access_token": TOKEN}
    ) as answer:
        fetched = await answer.read()
    delivered = await eventually(lambda: list(sim.reports), what="the delivery to report")
    removed = await sim.post("profile/111/datarequest")
    unknown = await sim.post("subprofile/999/datarequest")

    assert status == 201
    assert ready["status"] == "available" and ready["available"] == len(fetched)
    payload = json.loads(fetched)
    assert payload["info"] == {"type": "profile", "id": 101}
    assert b'"id":101}' in fetched  # a JSON number, not a string
    messages = [group[0] for group in payload["data"]]
    assert messages and all(
        f"To: <{PERSON}>\r\n" in m and "MIME-Version: 1.0" in m for m in messages
    )
    assert delivered == [fetched]
    assert sim.state.snapshot()["requests"][copernica_id]["subject"] == "profile/101"
    assert json.loads(removed[2]) == {"error": {"message": "This profile has already been removed"}}
    assert json.loads(unknown[2]) == {"error": {"message": "No subprofile with supplied ID"}}


async def served(sim: Sim, proc: asyncio.subprocess.Process, port: int) -> dict[str, Any] | None:
    """What a `simulate` process on `port` lists of collection 21; {} if it did not start (its
    port was taken: the caller tries another)."""
    if proc.returncode is not None:
        return {}
    try:
        url = f"http://127.0.0.1:{port}/v2/collection/21/subprofiles"
        query = {"access_token": TOKEN, "fields[]": f"email=={PERSON}"}
        async with sim.http.get(url, params=query) as answer:
            return dict(await answer.json())
    except aiohttp.ClientConnectionError:
        return None


async def test_simulate_account_file_serves_that_account(sim: Sim, tmp_path: Path) -> None:
    account = tmp_path / "account.json"
    account.write_text(json.dumps(account_with(PERSON, ["Orders"], others=0)))
    for _ in range(5):  # a child binds its own port: another one if that was taken meanwhile
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "service", "simulate", "--port", str(port)),
            *("--access-token", TOKEN, "--account", str(account)),
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            banner = await asyncio.wait_for(proc.stdout.readline(), 20)

            listed = await eventually(
                functools.partial(served, sim, proc, port),
                timeout=10,
                what="the simulator with the account",
            )
        finally:
            if proc.returncode is None:
                proc.terminate()
            await asyncio.wait_for(proc.wait(), 5)
        if listed:
            break

    assert banner.startswith(b"Copernica simulator account: 2 databases, 1 collections")
    assert listed is not None and ids(listed) == ["2101"]
