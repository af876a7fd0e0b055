"""The Copernica simulator itself: it must answer the way Copernica does, or tests prove nothing."""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from typing import Any

import aiohttp
import pytest

from service.simulator import PayloadSpec, payload_bytes, payload_chunks, payload_digest
from tests.conftest import ACCESS_TOKEN, Simulator, sha256


def test_payload_is_valid_deterministic_and_about_the_asked_size() -> None:
    spec = PayloadSpec("email", "ann@example.com", "1000", 200_000)
    body = payload_bytes(spec)
    parsed = json.loads(body)
    assert parsed["info"] == {"type": "email", "id": "ann@example.com"}
    assert isinstance(parsed["data"], list) and all(isinstance(x, list) for x in parsed["data"])
    assert "MIME-Version: 1.0" in parsed["data"][0][0]
    assert body == payload_bytes(spec)
    assert payload_digest(spec) == (len(body), sha256(body))
    assert 200_000 <= len(body) < 200_000 + 100_000


def test_profile_payload_and_faulty_variants() -> None:
    assert json.loads(payload_bytes(PayloadSpec("profile", "42", "1", 1000)))["info"]["id"] == 42
    wrong = PayloadSpec("email", "ann@example.com", "1", 1000, wrong_subject=True)
    assert json.loads(payload_bytes(wrong))["info"]["id"] != "ann@example.com"
    with pytest.raises(ValueError):
        json.loads(payload_bytes(PayloadSpec("email", "a@b.cd", "1", 1000, malformed=True)))


def test_a_big_payload_is_generated_in_bounded_memory() -> None:
    tracemalloc.start()
    total = sum(
        len(chunk)
        for chunk in payload_chunks(PayloadSpec("email", "a@b.cd", "9", 50 * 1024 * 1024))
    )
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert total >= 50 * 1024 * 1024
    assert peak < 5 * 1024 * 1024


async def api(
    http: aiohttp.ClientSession, simulator: Simulator, method: str, path: str, **params: str
) -> tuple[int, dict[str, str], bytes]:
    async with http.request(
        method, f"{simulator.url}/v2/{path}", params={"access_token": ACCESS_TOKEN, **params}
    ) as answer:
        return answer.status, dict(answer.headers), await answer.read()


async def test_create_and_every_readiness_form(simulator: Simulator) -> None:
    simulator.state.faults.lose_callback = True
    simulator.state.config.ready_after = 0.3
    async with aiohttp.ClientSession() as http:
        status, headers, body = await api(
            http, simulator, "POST", "email/ann%40example.com/datarequest"
        )
        assert (status, body) == (201, b"")
        cid = headers["X-Created"]
        assert simulator.state.requests[cid].subject_id == "ann@example.com"

        pending = {
            "status": (200, {"status": "pending"}),
            "data": (404, {"error": {"message": "Data not available (yet)"}}),
            "": (200, {"data": "Data not available (yet)"}),
        }
        for form, (code, fragment) in pending.items():
            status, _, body = await api(
                http, simulator, "GET", f"datarequest/{cid}" + (f"/{form}" if form else "")
            )
            assert status == code
            assert fragment.items() <= json.loads(body).items()

        await asyncio.sleep(0.35)
        expected = simulator.state.payload_bytes(cid)
        assert (
            json.loads((await api(http, simulator, "GET", f"datarequest/{cid}/status"))[2])[
                "status"
            ]
            == "available"
        )
        assert (await api(http, simulator, "GET", f"datarequest/{cid}/data"))[2] == expected
        assert (await api(http, simulator, "GET", f"datarequest/{cid}"))[2] == expected


@pytest.mark.parametrize(
    ("method", "path", "message"),
    [
        ("GET", "profile/5/datarequest", "Invalid method"),
        ("POST", "profile/0/datarequest", "No entity with supplied ID"),
        ("POST", "subprofile/x/datarequest", "No subprofile with supplied ID"),
        ("GET", "datarequest/999999/status", "No entity with supplied ID"),
    ],
)
async def test_errors_look_like_copernicas(
    simulator: Simulator, method: str, path: str, message: str
) -> None:
    async with aiohttp.ClientSession() as http:
        status, _, body = await api(http, simulator, method, path)
    assert status == 400
    assert json.loads(body) == {"error": {"message": message}}


async def test_wrong_token_is_401(simulator: Simulator) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{simulator.url}/v2/profile/1/datarequest", params={"access_token": "nope"}
        ) as answer,
    ):
        assert answer.status == 401


async def test_delivery_duplicates_and_expiry(simulator: Simulator, aiohttp_server: Any) -> None:
    from aiohttp import web

    received: list[bytes] = []

    async def report(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/report", report)
    target = await aiohttp_server(app)
    simulator.state.faults.duplicate_callback = 2
    simulator.state.config.expire_after = 0.2
    async with aiohttp.ClientSession() as http:
        _, headers, _ = await api(
            http, simulator, "POST", "profile/7/datarequest", report=str(target.make_url("/report"))
        )
        cid = headers["X-Created"]
        for _ in range(50):
            if len(received) == 3:
                break
            await asyncio.sleep(0.05)
        assert received == [simulator.state.payload_bytes(cid)] * 3
        assert {d.sha256 for d in simulator.state.deliveries} == {sha256(received[0])}
        await asyncio.sleep(0.3)
        status, _, body = await api(http, simulator, "GET", f"datarequest/{cid}/status")
        assert (status, json.loads(body)["status"]) == (200, "not available")
        assert (await api(http, simulator, "GET", f"datarequest/{cid}/data"))[0] == 410


async def test_control_api_switches_faults(simulator: Simulator) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{simulator.url}/_sim/faults", json={"fail_next": 1}) as answer:
            assert answer.status == 200
        assert (await api(http, simulator, "POST", "profile/1/datarequest"))[0] == 503
        assert (await api(http, simulator, "POST", "profile/1/datarequest"))[0] == 201
        async with http.post(f"{simulator.url}/_sim/faults", json={"bogus": 1}) as answer:
            assert answer.status == 400
        async with http.get(f"{simulator.url}/_sim/state") as answer:
            state = await answer.json()
    assert state["api_calls"] == 2 and len(state["requests"]) == 1


@pytest.mark.parametrize(
    ("query", "first", "last"),
    [
        ({"start": "2025-01-10", "end": "2025-01-20"}, "2025-01-10", "2025-01-19"),
        ({"start": "2025-01-10", "end": "2025-03-01"}, "2025-01-10", "2025-02-09"),  # end ignored
        ({"start": "2025-01-31"}, "2025-01-31", "2025-02-27"),
        ({"end": "2025-03-01"}, "2025-02-01", "2025-02-28"),
    ],
)
async def test_events_follow_the_seeds_window_rules(
    simulator: Simulator, query: dict[str, str], first: str, last: str
) -> None:
    from datetime import date

    from service.simulator import make_events

    simulator.state.events = make_events(date(2024, 12, 1), date(2025, 4, 1), per_day=1, profile=5)
    async with aiohttp.ClientSession() as http:
        status, _, body = await api(http, simulator, "GET", "profile/5/events", **query)
    assert status == 200
    found = [e["data"]["time"][:10] for e in json.loads(body)]
    assert (found[0], found[-1]) == (first, last)
    assert len(found) == len(set(found))
