"""The whole person, end to end: the real service, the simulator holding an account, a real
S3 (moto and SeaweedFS). An access request for an address held by the e-mail source, two
profiles in two databases (one found by a DISCOVERY_FIELDS text field) and a subprofile is
answered with a package holding every source's exact bytes and details, and a report that
shows each profile under its database's name and the article-15 statement, escaped, in a
real browser."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from typing import Any

import aiohttp
import pytest

from tests.browser import chromium
from tests.conftest import ACCESS_TOKEN, Bucket, Service, ServiceFactory, Simulator
from tests.support import (
    account_with,
    archive_key,
    delivery_cost,
    eventually,
    filed,
    metric,
    seed_account,
    wait_until_packaged,
)

pytestmark = pytest.mark.both_stores

ALICE = "alice@example.com"
HOSTILE = '<img src=x onerror="window.pwned=1">'
WHOLE_PERSON = {"DISCOVERY": "on", "DISCOVERY_FIELDS": "Contact", "POLL_INTERVAL_SECONDS": "1"}


async def copernica_answer(simulator: Simulator, path: str) -> bytes:
    """What Copernica (the simulator) answers to a GET, byte for byte."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{simulator.url}/v2/{path}", params={"access_token": ACCESS_TOKEN}) as answer,
    ):
        assert answer.status == 200
        return await answer.read()


def sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


async def test_an_address_in_four_places_is_answered_with_all_of_them(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    account = account_with(ALICE)
    account["profiles"][0]["fields"]["Name"] = HOSTILE  # profile 101, database Newsletter
    await seed_account(simulator, account)
    service = await make_service(**WHOLE_PERSON)

    created = await filed(service, {"email": ALICE})
    answered = await wait_until_packaged(service, created["id"])

    sources = {s["source"]: s for s in answered["sources"]}
    assert list(sources) == ["email", "profile:101", "profile:201", "subprofile:2101"]
    assert {s["status"] for s in sources.values()} == {"archived"}
    assert sources["profile:101"]["database"] == {"id": "1", "name": "Newsletter"}
    assert sources["profile:201"]["database"] == {"id": "2", "name": "Shop"}
    assert sources["subprofile:2101"]["collection"] == {"id": "21", "name": "Orders"}
    assert answered["discovery"]["status"] == "done"
    assert answered["discovery"]["matches"] == 3

    package = await download(service, created["id"])
    manifest = json.loads(package["manifest.json"])
    listed = {f["name"]: f for f in manifest["files"]}
    for name, body in package.items():
        if name != "manifest.json":
            assert listed[name] == {"name": name, "size": len(body), "sha256": sha256(body)}
    # Every source's data, exact bytes: what Copernica made for its own data request.
    for source, folder in (
        ("email", ""),
        ("profile:101", "sources/profile-101/"),
        ("profile:201", "sources/profile-201/"),
        ("subprofile:2101", "sources/subprofile-2101/"),
    ):
        made = simulator.state.payload_bytes(sources[source]["copernica_id"])
        assert package[f"{folder}data.json"] == made, source
        assert sources[source]["archive"]["sha256"] == sha256(made)
        if source != "email":  # the profile's own record, as Copernica answers it
            kind, number = source.split(":")
            details = await copernica_answer(simulator, f"{kind}/{number}")
            assert package[f"{folder}details.json"] == details
            stored = await store.read(sources[source]["details"]["key"])
            assert stored == details
    assert [s["source"] for s in manifest["sources"]] == list(sources)

    await report_shows_the_person(package["report.html"].decode())


async def download(service: Service, request_id: str) -> dict[str, bytes]:
    url = f"{service.admin_url}/v1/data-requests/{request_id}/package"
    async with service.http.get(url, headers=service.auth) as answer:
        assert answer.status == 200
        body = await answer.read()
    with zipfile.ZipFile(io.BytesIO(body)) as package:
        return {name: package.read(name) for name in package.namelist()}


async def report_shows_the_person(html: str) -> None:
    async with chromium() as browser:
        page = await browser.new_page()
        await page.set_content(html)
        first_h2 = await page.inner_text("main h2")
        details = await page.inner_text("#details")
        articles = await page.eval_on_selector_all(
            "#details article > h3", "hs => hs.map(h => h.innerText)"
        )
        looked = await page.inner_text("#looked")
        statement = await page.inner_text("#statement")
        pwned: Any = await page.evaluate("window.pwned")
        images = await page.evaluate("document.querySelectorAll('img, script').length")
    assert first_h2 == "Your details"
    assert any(a.startswith("Newsletter") for a in articles)
    assert any(a.startswith("Shop") for a in articles)
    assert f"Name\n{HOSTILE}" in details  # shown as text, never run
    assert "City\nUtrecht" in details and "Orders" in details and "ORD-2025-0042" in details
    assert "profile 201 in database Shop" in looked
    assert "Autoriteit Persoonsgegevens" in statement
    assert pwned is None and images == 0


async def test_a_discovered_sources_callback_costs_one_write_on_any_replica(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    """A discovered source has a callback address of its own, and the replica it reaches
    knows from the address alone where its data goes: one S3 call, no record read."""
    await seed_account(simulator, account_with(ALICE, places=("Newsletter",)))
    simulator.state.faults.lose_callback = True
    simulator.state.config.ready_after = 3600  # nothing for the poller to fetch meanwhile
    quiet = {**WHOLE_PERSON, "POLL_INTERVAL_SECONDS": "600"}  # discovery's visits come at once
    filer = await make_service(**quiet)
    created = await filed(filer, {"email": ALICE})

    async def filed_profile() -> dict[str, Any] | None:
        shown = await filer.show(created["id"])
        found = [s for s in shown["sources"] if s["source"] == "profile:101"]
        return found[0] if found and found[0]["copernica_id"] else None

    profile = await eventually(filed_profile, what="profile 101 filed")
    at_copernica = simulator.state.requests[profile["copernica_id"]]
    assert at_copernica.report is not None
    other = await make_service(**quiet)  # has never read the record
    # Its start-up reads (the housekeeping lease, the first tick) done before we count.
    await eventually(lambda: metric(other, "receiver_poll_ticks_total"), what="a tick")
    url = other.url + "/callbacks" + at_copernica.report.split("/callbacks", 1)[1]
    body = simulator.state.payload_bytes(profile["copernica_id"])
    status, spent = await delivery_cost(other, url, body)
    assert (status, spent) == (200, {"s3:put_object": 1})
    # Under the source's own key, not the filed subject's archive.
    digest = at_copernica.report.split("/")[-2]
    assert await store.read(f"copernica/sources/{created['id']}/{digest}/data.json") == body
    assert archive_key(created["id"]) not in await store.keys("copernica/archive/")


async def test_a_large_callback_of_a_discovered_source_is_noted_on_that_source(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    """A body of several parts is uploaded multipart, whose metadata cannot carry its
    sha256: the record notes it, on the source it belongs to (not the filed subject)."""
    await seed_account(simulator, account_with(ALICE, places=("Newsletter",)))
    simulator.state.faults.lose_callback = True
    simulator.state.config.ready_after = 3600
    service = await make_service(**{**WHOLE_PERSON, "POLL_INTERVAL_SECONDS": "600"})
    created = await filed(service, {"email": ALICE})

    async def source(name: str) -> dict[str, Any]:
        shown = await service.show(created["id"])
        return next((s for s in shown["sources"] if s["source"] == name), {})

    profile = await eventually(lambda: source("profile:101"), lambda s: s.get("copernica_id"))
    report = simulator.state.requests[profile["copernica_id"]].report
    assert report is not None
    body = json.dumps({"info": {"type": "profile", "id": 101}, "data": [["x" * (9 << 20)]]})
    async with service.http.post(report, data=body.encode()) as answer:
        assert answer.status == 200
    noted = await eventually(lambda: source("profile:101"), lambda s: s.get("archive") is not None)
    assert noted["archive"]["sha256"] == sha256(body.encode())
    assert noted["status"] == "archived"
    assert (await source("email"))["archive"] is None
