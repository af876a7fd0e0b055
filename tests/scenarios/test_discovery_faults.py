"""Discovery's faults (issue 22, "Bad input and faults") over the real service, the simulator
holding an account, and S3: a profile removed between discovery and filing, an account without
the e-mail data request, Copernica's "Loadbalancer Error" for a while, malformed list answers,
a replica killed in the middle of discovery, and more matches than the limit allows. Each time
nothing is lost, nothing is filed twice, and nothing is packaged incomplete.

The account is tests/support.py's `account_with`: the address in the Newsletter profile 101,
the Shop profile 201 (by its text field `Contact`, DISCOVERY_FIELDS) and the Orders subprofile
2101. Discovery queries Newsletter on Email, Shop on Email and on Contact, Orders on Email."""

from __future__ import annotations

import asyncio
import collections
import io
import json
import re
import zipfile
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from tests.conftest import API_TOKEN, Bucket, Service, ServiceFactory, ServiceProcess, Simulator
from tests.support import (
    account_with,
    eventually,
    file_request,
    filed,
    metric,
    record_of,
    seed_account,
    wait_until_packaged,
)

# A scenario suite: left out of the quick subset, `pytest -m "not slow"`.
pytestmark = pytest.mark.slow

ALICE = "alice@example.com"
EVERY_SOURCE = ["email", "profile:101", "profile:201", "subprofile:2101"]
# SPEC's cost rule for this account: one listing page, a query per (place, field), the
# details of each of the three matches. A visit's work done twice (its record write lost)
# shows here.
ONE_DISCOVERY = {"databases": 1, "profiles": 3, "subprofiles": 1, "profile": 2, "subprofile": 1}
DISCOVERING = {
    "DISCOVERY": "on",
    "DISCOVERY_FIELDS": "Contact",
    "POLL_INTERVAL_SECONDS": "0.5",
    "POLL_LEASE_SECONDS": "3",
}


# -- what a user sees ----------------------------------------------------------------------


async def package_of(service: Service, request_id: str) -> dict[str, bytes]:
    """The access package as the operator downloads it: each file's bytes by name."""
    url = f"{service.admin_url}/v1/data-requests/{request_id}/package"
    async with service.http.get(url, headers=service.auth) as answer:
        assert answer.status == 200, await answer.text()
        body = await answer.read()
    with zipfile.ZipFile(io.BytesIO(body)) as package:
        return {name: package.read(name) for name in package.namelist()}


def where_we_looked(report: bytes) -> dict[str, str]:
    """The report's "Where we looked" list: each place's words, by its final status (the
    `status-{x}` class of its line); a status seen twice keeps both lines, joined."""
    html = report.decode()
    section = html[html.index('id="looked"') :]
    section = section[: section.index("</section>")]
    found: dict[str, str] = {}
    for status, line in re.findall(r'<li class="status-(\w+)">(.*?)</li>', section, re.S):
        text = re.sub(r"<[^>]+>", "", line).strip()
        found[status] = f"{found[status]}\n{text}" if status in found else text
    return found


def requests_by_subject(simulator: Simulator) -> collections.Counter[str]:
    """The data requests the simulator took, by subject (`profile/101`, `email/...`)."""
    return collections.Counter(r.subject_key for r in simulator.state.requests.values())


def account_calls(simulator: Simulator) -> dict[str, int]:
    return {route: n for route, n in simulator.state.account_calls.items() if n}


def sources_of(shown: dict[str, Any]) -> dict[str, dict[str, Any]]:
    listed = [s["source"] for s in shown["sources"]]
    assert len(listed) == len(set(listed)), f"a source twice: {listed}"
    return {s["source"]: s for s in shown["sources"]}


async def packaged_with(
    service: Service, simulator: Simulator, request_id: str, statuses: dict[str, str]
) -> dict[str, bytes]:
    """Wait for the package; the request shows `statuses` for its sources (in that order), each
    archived source's exact data is in the package and the manifest lists each source; the
    package's files by name."""
    shown = await wait_until_packaged(service, request_id)
    sources = sources_of(shown)
    assert {k: v["status"] for k, v in sources.items()} == statuses
    assert list(sources) == list(statuses)
    package = await package_of(service, request_id)
    manifest = json.loads(package["manifest.json"])
    listed = {s["source"]: s for s in manifest["sources"]}
    assert {k: v["status"] for k, v in listed.items()} == statuses
    for source, status in statuses.items():
        folder = "" if source == shown["sources"][0]["source"] else folder_of(source)
        if status == "archived":
            made = simulator.state.payload_bytes(sources[source]["copernica_id"])
            assert package[f"{folder}data.json"] == made, source
        else:
            assert listed[source]["files"] == [], source
            assert not [n for n in package if folder and n.startswith(folder)], source
    return package


def folder_of(source: str) -> str:
    kind, _, number = source.partition(":")
    return f"sources/{kind}-{number}/" if number else f"sources/{kind}/"


# -- a proxy in front of Copernica, for what the simulator has no switch for ----------------


async def passed(path: str) -> bytes | None:
    return None


_HOP = {"content-length", "transfer-encoding", "connection", "content-encoding", "keep-alive"}


class CopernicaProxy:
    """A tiny proxy between the service and the simulator (COPERNICA_API_URL points at it).
    Before each call passes, `hook(path)` may answer in Copernica's place (bytes: a 200 with
    them) or change the simulator's faults; None lets the call through as it is."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.hook: Callable[[str], Awaitable[bytes | None]] = passed
        self.url = ""
        self._http: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._forward)
        return app

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        instead = await self.hook(request.path)
        if instead is not None:
            return web.Response(body=instead, content_type="application/json")
        if self._http is None:
            self._http = aiohttp.ClientSession(auto_decompress=False)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP | {"host"}}
        async with self._http.request(
            request.method,
            URL(self.target + request.raw_path, encoded=True),  # the query as the service sent it
            headers=headers,
            data=await request.read(),
            allow_redirects=False,
        ) as answer:
            body = await answer.read()
            kept = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP}
            return web.Response(status=answer.status, body=body, headers=kept)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()


@pytest.fixture
async def proxy(aiohttp_server: Any, simulator: Simulator) -> Any:
    found = CopernicaProxy(simulator.url)
    server = await aiohttp_server(found.app(), host="127.0.0.1")
    found.url = str(server.make_url("")).rstrip("/")
    yield found
    await found.close()


# -- 1. a profile removed between discovery and filing ---------------------------------------


async def test_a_profile_removed_before_filing_is_gone_and_the_rest_is_packaged(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    await seed_account(simulator, account_with(ALICE))
    # Still listed (discovery finds it), but its record and data request: "No entity".
    simulator.state.faults.gone_sources = ["profile:101"]
    service = await make_service(**DISCOVERING)

    created = await filed(service, {"email": ALICE})
    statuses = dict.fromkeys(EVERY_SOURCE, "archived") | {"profile:101": "gone"}
    package = await packaged_with(service, simulator, created["id"], statuses)

    shown = sources_of(await service.show(created["id"]))
    assert shown["profile:101"]["copernica_id"] is None and shown["profile:101"]["details"] is None
    assert "profile/101" not in requests_by_subject(simulator)  # never filed
    assert account_calls(simulator) == ONE_DISCOVERY  # its details asked once, refused
    assert not [k for k in await store.keys("sources/") if "profile-101" in k]
    looked = where_we_looked(package["report.html"])
    assert looked["gone"] == (
        "profile 101 in database Newsletter (your address is in its field “Email”): "
        "removed before we could collect it"
    )
    assert "profile 201 in database Shop" in looked["archived"]


# -- 2. the e-mail data request is not offered -----------------------------------------------


async def test_an_account_without_the_email_request_is_answered_by_the_profiles(
    make_service: ServiceFactory, simulator: Simulator
) -> None:
    await seed_account(simulator, account_with(ALICE))
    simulator.state.faults.email_invalid_method = True
    service = await make_service(**DISCOVERING)

    created = await filed(service, {"email": ALICE})
    assert created["sources"][0]["status"] == "unsupported"
    assert "Invalid method" in created["sources"][0]["last_error"]  # Copernica's words
    statuses = dict.fromkeys(EVERY_SOURCE, "archived") | {"email": "unsupported"}
    package = await packaged_with(service, simulator, created["id"], statuses)

    filed_for = requests_by_subject(simulator)
    assert not [s for s in filed_for if s.startswith("email/")]
    assert filed_for == {"profile/101": 1, "profile/201": 1, "subprofile/2101": 1}
    assert account_calls(simulator) == ONE_DISCOVERY
    assert "data.json" not in package  # the address's own data: there is none
    for source in EVERY_SOURCE[1:]:
        assert folder_of(source) + "details.json" in package
    looked = where_we_looked(package["report.html"])
    assert looked["unsupported"] == (
        "your e-mail address: this kind of request is not offered by our e-mail provider"
    )


# -- 3. "Loadbalancer Error" for a while -----------------------------------------------------


async def test_a_loadbalancer_outage_mid_discovery_is_waited_out_and_nothing_is_found_twice(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket, proxy: CopernicaProxy
) -> None:
    await seed_account(simulator, account_with(ALICE))
    queries = collections.Counter[str]()

    async def outage_after_the_first_query(path: str) -> None:
        # The listing and Newsletter's query pass; from the next query on: 503 for a while.
        if path.endswith(("/profiles", "/subprofiles")):
            queries["seen"] += 1
            if queries["seen"] == 2:
                simulator.state.faults.list_errors = 100_000

    proxy.hook = outage_after_the_first_query
    service = await make_service(COPERNICA_API_URL=proxy.url + "/v2", **DISCOVERING)
    created = await filed(service, {"email": ALICE})

    retrying = await eventually(
        lambda: service.show(created["id"]),
        lambda shown: (
            shown["discovery"]["status"] == "retrying"
            and shown["sources"][0]["status"] == "archived"
        ),
        what="discovery retrying, the address's data archived",
    )
    assert "databases" not in retrying["discovery"]["last_error"]  # the listing was done
    assert "HTTP 503" in retrying["discovery"]["last_error"]
    # Profile 101, found before the outage, waits with its details not fetched: not filed.
    assert [s["source"] for s in retrying["sources"]] == ["email", "profile:101"]
    assert retrying["sources"][1]["status"] == "submitting"
    # Another failed visit, backing off; nothing packaged meanwhile.
    await eventually(
        lambda: metric(service, "receiver_poll_visits_total", outcome="discovery_retrying"),
        lambda visits: visits >= 2,
        what="two failed visits",
    )
    failed = await service.show(created["id"])
    assert failed["discovery"]["status"] == "retrying"
    assert failed["status"] == "pending" and failed["package"] is None
    assert await store.keys("packages/") == []
    simulator.state.faults.list_errors = 0

    await packaged_with(service, simulator, created["id"], dict.fromkeys(EVERY_SOURCE, "archived"))
    shown = await service.show(created["id"])
    assert shown["discovery"]["status"] == "done" and shown["discovery"]["last_error"] is None
    assert shown["discovery"]["matches"] == 3 and shown["discovery"]["queries"] == 4
    assert requests_by_subject(simulator) == {
        f"email/{ALICE}": 1,
        "profile/101": 1,
        "profile/201": 1,
        "subprofile/2101": 1,
    }
    assert simulator.state.account_calls["databases"] == 1  # resumed, not listed again


# -- 4. a replica killed in the middle of discovery ------------------------------------------

# One listing page and 131 queries: three visits' budgets (50 calls each), so the second visit
# files the first one's finds (the record written before each filing) while discovery runs on.
DATABASES = 130
HOLDING = ("8", "24", "40", "56", "72")  # the databases whose profile holds the address


def big_account() -> dict[str, Any]:
    """130 databases of two profiles each, the address in five of them and in one subprofile
    (collection 401 of database 40)."""
    email = [{"name": "Email", "type": "email"}]
    databases: list[dict[str, Any]] = [
        {"id": str(n), "name": f"List {n}", "fields": email} for n in range(1, DATABASES + 1)
    ]
    databases[39]["collections"] = [{"id": "401", "name": "Orders", "fields": email}]
    profiles = [
        {
            "id": f"{n}{i}",
            "database": str(n),
            "fields": {"Email": ALICE if i == 1 and str(n) in HOLDING else f"p{n}-{i}@example.net"},
        }
        for n in range(1, DATABASES + 1)
        for i in (1, 2)
    ]
    subprofiles = [
        {"id": "9001", "profile": "401", "collection": "401", "fields": {"Email": ALICE}}
    ]
    return {"databases": databases, "profiles": profiles, "subprofiles": subprofiles}


async def test_a_replica_killed_mid_discovery_leaves_every_source_found_once(
    service_processes: Callable[..., ServiceProcess], simulator: Simulator, store: Bucket
) -> None:
    await seed_account(simulator, big_account())
    settings = {**DISCOVERING, "COPERNICA_MAX_RPS": "12", "POLL_INTERVAL_SECONDS": "1"}
    first = service_processes(**settings)
    async with aiohttp.ClientSession() as http:
        created = await file_request(http, first.admin_url, {"email": ALICE})
        request_id = created["id"]

        async def shown(replica: ServiceProcess) -> dict[str, Any]:
            url = f"{replica.admin_url}/v1/data-requests/{request_id}"
            async with http.get(url, headers={"Authorization": f"Bearer {API_TOKEN}"}) as answer:
                assert answer.status == 200
                return dict(await answer.json())

        # One visit's discovery is in the record (its calls counted), more is under way ...
        saved = await eventually(
            lambda: shown(first),
            lambda it: it["discovery"]["calls"] > 0,
            timeout=30,
            what="a visit's discovery saved",
        )
        assert saved["discovery"]["status"] == "running"
        # ... and the next visit files the sources found so far: killed right after the first.
        await eventually(
            lambda: [s for s in requests_by_subject(simulator) if s.startswith("profile/")],
            timeout=30,
            what="a discovered source filed",
        )
        first.kill()
        assert (await record_of(store, request_id))["discovery"]["status"] == "running"

        second = service_processes(**settings)
        finished = await eventually(
            lambda: shown(second),
            lambda it: it["package"] is not None,
            timeout=60,
            what="the package",
        )
    expected = ["email", *(f"profile:{n}1" for n in HOLDING), "subprofile:9001"]
    sources = sources_of(finished)
    assert sorted(sources) == sorted(expected)
    assert {s["status"] for s in sources.values()} == {"archived"}
    assert finished["discovery"]["status"] == "done"
    assert finished["discovery"]["matches"] == len(expected) - 1
    record = await record_of(store, request_id)
    resubmitted = {d["source"]: d["resubmitted"] for d in record["data_requests"]}
    assert len(resubmitted) == len(expected)
    for subject, count in requests_by_subject(simulator).items():
        kind, number = subject.split("/")
        source = "email" if kind == "email" else f"{kind}:{number}"
        assert count <= 1 + resubmitted[source], (source, count, resubmitted[source])
    assert await asyncio.to_thread(second.stop) == 0


# -- 5. malformed list answers ----------------------------------------------------------------

NO_ID = b'{"start":0,"limit":1000,"count":1,"data":[{"name":"Newsletter"}]}'
CUT_SHORT = b'{"start":0,"limit":1000,"count":1,"data":[{"ID":"101","fie'


async def test_malformed_list_answers_are_retried_and_shown_never_taken_for_done(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket, proxy: CopernicaProxy
) -> None:
    await seed_account(simulator, account_with(ALICE))
    broken: dict[str, bytes] = {}  # by the path's ending: Copernica's answer replaced
    calls = collections.Counter[str]()

    async def rewrite(path: str) -> bytes | None:
        for ending, answer in broken.items():
            if path.endswith(ending):
                calls[ending] += 1
                return answer
        return None

    proxy.hook = rewrite
    service = await make_service(COPERNICA_API_URL=proxy.url + "/v2", **DISCOVERING)
    created = await filed(service, {"email": ALICE})

    async def failed_visits() -> float:
        return await metric(service, "receiver_poll_visits_total", outcome="discovery_retrying")

    before = 0.0
    for ending, answer, words in (
        ("/databases", NO_ID, "databases: malformed answer (a database without a usable ID)"),
        ("/profiles", CUT_SHORT, "profiles: malformed answer (not JSON)"),
    ):
        broken[ending] = answer
        failed = await eventually(
            failed_visits, lambda visits, at=before: visits >= at + 2, what=f"{ending} failing"
        )
        shown = await service.show(created["id"])
        assert shown["discovery"]["status"] == "retrying"
        assert words in shown["discovery"]["last_error"]
        assert [s["source"] for s in shown["sources"]] == ["email"]  # nothing made up
        assert shown["status"] == "pending" and shown["package"] is None
        # Backing off, not a crash loop: one call a failed visit (a 200 is not retried inside).
        assert calls[ending] <= failed - before + 1
        broken.clear()
        before = failed
    assert simulator.state.account_calls["databases"] == 1  # listed once, when it answered

    await packaged_with(service, simulator, created["id"], dict.fromkeys(EVERY_SOURCE, "archived"))
    assert await store.keys("packages/") != []


# -- 6. over the limit ----------------------------------------------------------------------


async def test_over_the_limit_waits_unpackaged_until_an_operator_raises_it(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    await seed_account(simulator, account_with(ALICE))
    service = await make_service(DISCOVERY_MAX_SOURCES="2", **DISCOVERING)
    created = await filed(service, {"email": ALICE})
    request_id = created["id"]

    waiting = await eventually(
        lambda: service.show(request_id),
        lambda it: (
            it["discovery"]["status"] == "over_limit" and it["sources"][0]["status"] == "archived"
        ),
        what="over the limit, the address's data archived",
    )
    # The sources found so far are recorded (filed once the limit is raised).
    assert [s["source"] for s in waiting["sources"]] == ["email", "profile:101", "profile:201"]
    assert waiting["discovery"]["matches"] == 2
    assert "more than 2" in waiting["discovery"]["last_error"]
    # A few more ticks of the poller: still nothing packaged.
    ticks = await metric(service, "receiver_poll_ticks_total")
    await eventually(
        lambda: metric(service, "receiver_poll_ticks_total"),
        lambda now: now >= ticks + 3,
        what="three more ticks",
    )
    still = await service.show(request_id)
    assert still["status"] == "pending" and still["package"] is None
    assert still["discovery"]["status"] == "over_limit"
    assert await store.keys("packages/") == []

    url = f"{service.admin_url}/v1/data-requests/{request_id}/discovery"
    async with service.http.post(url, json={"max_sources": 10}, headers=service.auth) as answer:
        assert answer.status == 200, await answer.text()
        raised = await answer.json()
    assert raised["discovery"]["status"] == "running" and raised["discovery"]["max_sources"] == 10

    await packaged_with(service, simulator, request_id, dict.fromkeys(EVERY_SOURCE, "archived"))
    shown = await service.show(request_id)
    assert shown["discovery"]["status"] == "done" and shown["discovery"]["matches"] == 3
    assert requests_by_subject(simulator)["profile/101"] == 1  # not filed again after the raise
