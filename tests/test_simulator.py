"""The Copernica simulator itself: it must answer the way Copernica does, or tests prove nothing.

Everything is checked over real HTTP, as a client sees it: status codes, headers, exact
bytes and their sha256.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import hashlib
import json
import socket
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.simulator.app import _TASKS as SIM_TASKS
from service.simulator.app import (
    SIM_STATE,
    SimState,
    SimulatorConfig,
    SubjectPlan,
    create_simulator_app,
    subject_key,
)
from service.simulator.payloads import (
    CHUNK,
    PayloadSpec,
    make_events,
    payload_bytes,
    payload_chunks,
    payload_digest,
    payload_size,
)
from tests.conftest import sha256
from tests.support import eventually

TOKEN = "sim-test-token"
NOT_AVAILABLE = "Data not available (yet)"
MIB = 1024 * 1024


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Sim:
    """A running simulator and a client session to talk to it."""

    url: str
    state: SimState
    http: aiohttp.ClientSession
    app: web.Application

    async def call(
        self,
        method: str,
        path: str,
        *,
        version: str = "v2",
        token: str | None = TOKEN,
        json_body: Any = None,
        **params: str,
    ) -> Answer:
        query = {"access_token": token, **params} if token is not None else params
        async with self.http.request(
            method, f"{self.url}/{version}/{path}", params=query, json=json_body
        ) as answer:
            return Answer(answer.status, dict(answer.headers), await answer.read())

    async def control(self, method: str, path: str, body: Any = None) -> Answer:
        async with self.http.request(method, f"{self.url}/_sim/{path}", json=body) as answer:
            return Answer(answer.status, dict(answer.headers), await answer.read())

    async def create(self, path: str = "profile/42/datarequest", **params: str) -> str:
        answer = await self.call("POST", path, **params)
        assert answer.status == 201, answer.body
        return answer.headers["X-Created"]


async def settled(sim: Sim) -> None:
    """Until the simulator has no delivery waiting or under way: a negative check after this
    sees everything it was going to deliver."""
    await eventually(lambda: not sim.app[SIM_TASKS], timeout=5, what="no delivery under way")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


SimFactory = Callable[..., Awaitable[Sim]]


@pytest.fixture
def make_sim(aiohttp_server: Any, http: aiohttp.ClientSession) -> SimFactory:
    async def make(**config: Any) -> Sim:
        defaults: dict[str, Any] = {
            "access_token": TOKEN,
            "ready_after": 0.0,
            "delivery_retry_delay": 0.01,
            "control": True,
        }
        app = create_simulator_app(SimulatorConfig(**(defaults | config)))
        server = await aiohttp_server(app, host="127.0.0.1")
        return Sim(str(server.make_url("")).rstrip("/"), app[SIM_STATE], http, app)

    return make


@dataclass
class Receiver:
    """A `report` web address: records every POST, answers from a script (then 200)."""

    url: str
    script: list[int] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    hold: float = 0.0  # seconds each POST takes, to see concurrent deliveries overlap
    in_flight: int = 0
    max_in_flight: int = 0


@pytest.fixture
async def receiver(aiohttp_server: Any) -> Receiver:
    got = Receiver("")

    async def report(request: web.Request) -> web.Response:
        got.in_flight += 1
        got.max_in_flight = max(got.max_in_flight, got.in_flight)
        try:
            await asyncio.sleep(got.hold)
            got.headers.append(dict(request.headers))
            got.bodies.append(await request.read())
            return web.Response(status=got.script.pop(0) if got.script else 200)
        finally:
            got.in_flight -= 1

    app = web.Application(client_max_size=64 * MIB)
    app.router.add_post("/report", report)
    server = await aiohttp_server(app, host="127.0.0.1")
    got.url = str(server.make_url("/report"))
    return got


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- payloads ------------------------------------------------------------------------------


def test_payload_is_copernicas_shape_with_realistic_content() -> None:
    spec = PayloadSpec("email", "ann@example.com", "1000", 200_000)
    parsed = json.loads(payload_bytes(spec))

    assert parsed["info"] == {"type": "email", "id": "ann@example.com"}
    groups = parsed["data"]
    assert all(isinstance(group, list) and group for group in groups)
    mime = groups[0][0]
    assert "MIME-Version: 1.0\r\n" in mime and "To: <ann@example.com>\r\n" in mime
    assert "multipart/alternative" in mime
    assert "Content-Type: text/plain" in mime and "Content-Type: text/html" in mime
    assert any("Content-Transfer-Encoding: base64" in group[0] for group in groups)
    found = [item for group in groups for item in group[1:]]
    assert {"open", "click", "survey"} <= {item["type"] for item in found}
    assert all(
        {"time", "ip", "useragent"} <= item.keys() for item in found if item["type"] == "open"
    )
    assert all(item["url"].startswith("https://") for item in found if item["type"] == "click")


def test_payload_messages_are_mime_as_newsletters_send_it() -> None:
    """RFC 2047 subjects and senders (Q and B), multipart/alternative, HTML-only and text-only
    messages in 8bit, quoted-printable and base64: what a report has to read and decode."""
    spec = PayloadSpec("email", "ann@example.com", "1000", 400_000)
    groups = json.loads(payload_bytes(spec))["data"]
    messages = [
        email.message_from_string(group[0], policy=email.policy.default) for group in groups
    ]

    subjects = {str(message["subject"]) for message in messages}
    assert any("=?utf-8?q?" in group[0] for group in groups)
    assert any("=?utf-8?b?" in group[0] for group in groups)
    assert "Grüße aus dem Café: unsere Herbstauswahl #1" in subjects
    assert "Your order is on its way 🎉 #3" in subjects
    assert all(f"#{n}" in str(m["subject"]) for n, m in enumerate(messages))  # the counter
    assert {str(m["from"]) for m in messages} >= {"Café Zoë <news@shop.test>"}

    kinds = {
        (
            m.get_content_type(),
            m.get_body(("plain",)) is not None,
            m.get_body(("html",)) is not None,
        )
        for m in messages
    }
    assert ("text/html", False, True) in kinds  # HTML only
    assert ("text/plain", True, False) in kinds  # text only
    assert any(kind[1] and kind[2] for kind in kinds)  # both, as alternatives
    encodings = {part.get("content-transfer-encoding") for m in messages for part in m.walk()}
    assert {"8bit", "quoted-printable", "base64"} <= encodings
    for message in messages:  # every body decodes to text that names the shop
        body = message.get_body(("plain", "html"))
        assert body is not None and "shop.test" in body.get_content()
    assert b"~N~" not in payload_bytes(spec)


@pytest.mark.parametrize(("kind", "ident"), [("profile", 42), ("subprofile", 7)])
def test_numeric_subjects_are_numbers_in_info(kind: str, ident: int) -> None:
    body = payload_bytes(PayloadSpec(kind, str(ident), "1", 1000))
    assert json.loads(body)["info"] == {"type": kind, "id": ident}


def test_payload_is_deterministic_and_its_size_and_digest_are_known_in_advance() -> None:
    spec = PayloadSpec("email", "ann@example.com", "1000", 300_000)
    body = payload_bytes(spec)

    assert body == payload_bytes(PayloadSpec("email", "ann@example.com", "1000", 300_000))
    assert payload_size(spec) == len(body)
    assert payload_digest(spec) == (len(body), sha256(body))
    for other in (
        PayloadSpec("email", "ann@example.com", "1001", 300_000),
        PayloadSpec("email", "ann@example.com", "1000", 300_000, seed=1),
        PayloadSpec("email", "bob@example.com", "1000", 300_000),
    ):
        assert payload_bytes(other) != body
    assert 300_000 <= len(body) < 300_000 + 30_000


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(min_value=0, max_value=400_000),
    kind=st.sampled_from(["email", "profile", "subprofile"]),
    wrong=st.booleans(),
    malformed=st.booleans(),
    seed=st.integers(min_value=0, max_value=3),
)
def test_any_payload_has_its_announced_size_and_is_json_unless_malformed(
    size: int, kind: str, wrong: bool, malformed: bool, seed: int
) -> None:
    subject = "a.b+c@example.com" if kind == "email" else "12"
    spec = PayloadSpec(kind, subject, "77", size, wrong, malformed, seed)
    chunks = list(payload_chunks(spec))
    body = b"".join(chunks)

    assert len(body) == payload_size(spec) >= size
    assert all(len(chunk) == CHUNK for chunk in chunks[:-1]) and 0 < len(chunks[-1]) <= CHUNK
    if malformed:
        with pytest.raises(ValueError):
            json.loads(body)
    else:
        assert json.loads(body)["info"] == {"type": kind, "id": spec.info_id}
        assert (spec.info_id == (subject if kind == "email" else int(subject))) != wrong


def test_wrong_subject_names_someone_else() -> None:
    body = payload_bytes(PayloadSpec("email", "ann@example.com", "1", 1000, wrong_subject=True))
    assert json.loads(body)["info"]["id"] != "ann@example.com"


def test_a_50_mb_payload_streams_in_bounded_memory() -> None:
    spec = PayloadSpec("email", "big@example.com", "9", 50 * MIB)
    digest, total, largest = hashlib.sha256(), 0, 0
    tracemalloc.start()
    try:
        for chunk in payload_chunks(spec):
            digest.update(chunk)
            total += len(chunk)
            largest = max(largest, len(chunk))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert total == payload_size(spec) >= 50 * MIB
    assert largest == CHUNK
    assert peak < 20 * MIB, f"peak {peak / MIB:.1f} MiB: the payload was materialised"


# -- create --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "kind", "subject"),
    [
        ("email/ann%2Bgdpr%40example.com/datarequest", "email", "ann+gdpr@example.com"),
        ("profile/42/datarequest", "profile", "42"),
        ("subprofile/7/datarequest", "subprofile", "7"),
    ],
)
async def test_create_answers_201_empty_with_the_id_in_x_created(
    make_sim: SimFactory, path: str, kind: str, subject: str
) -> None:
    sim = await make_sim(first_id=5000)

    first = await sim.call("POST", path)
    second = await sim.call("POST", path)

    assert (first.status, first.body, first.headers["X-Created"]) == (201, b"", "5000")
    assert second.headers["X-Created"] == "5001"
    assert (sim.state.requests["5000"].subject_type, sim.state.requests["5000"].subject_id) == (
        kind,
        subject,
    )


async def test_a_subject_plan_sets_that_subjects_readiness_and_payload_size(
    make_sim: SimFactory,
) -> None:
    sim = await make_sim(ready_after=0.0, payload_size=2000)
    sim.state.plans[subject_key("email", "Big@Example.com")] = SubjectPlan(
        ready_after=3600, payload_size=300_000
    )

    big = await sim.create("email/big%40example.com/datarequest")
    small = await sim.create("email/small%40example.com/datarequest")

    now = time.monotonic()
    assert not sim.state.requests[big].ready(now) and sim.state.requests[small].ready(now)
    assert 300_000 <= sim.state.payload_size(big) < 400_000
    assert 2000 <= sim.state.payload_size(small) < 100_000


@pytest.mark.parametrize(
    ("form", "header", "value", "body"),
    [
        ("X-Created", "X-Created", "1000", b""),
        ("Location", "Location", "https://api.copernica.com/v2/datarequest/1000", b""),
        ("X-Location", "X-Location", "https://api.copernica.com/v2/datarequest/1000", b""),
        ("body", None, None, b'{"id": "1000"}'),
    ],
)
async def test_each_created_id_form(
    make_sim: SimFactory, form: str, header: str | None, value: str | None, body: bytes
) -> None:
    sim = await make_sim(create_id_header=form)

    answer = await sim.call("POST", "profile/1/datarequest")

    assert (answer.status, answer.body) == (201, body)
    others = {"X-Created", "Location", "X-Location"} - {header}
    assert not others & answer.headers.keys()
    if header:
        assert answer.headers[header] == value


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
async def test_report_comes_as_parameter_or_json_body_under_every_version(
    make_sim: SimFactory, version: str
) -> None:
    sim = await make_sim(ready_after=60)

    by_param = await sim.call(
        "POST", "profile/1/datarequest", version=version, report="https://r.test/a"
    )
    by_body = await sim.call(
        "POST", "profile/1/datarequest", version=version, json_body={"report": "https://r.test/b"}
    )
    without = await sim.call("POST", "profile/1/datarequest", version=version)

    ids = [a.headers["X-Created"] for a in (by_param, by_body, without)]
    assert [sim.state.requests[i].report for i in ids] == [
        "https://r.test/a",
        "https://r.test/b",
        None,
    ]


async def test_v4_wants_a_bearer_token_from_the_authentication_server(
    make_sim: SimFactory,
) -> None:
    sim = await make_sim()
    assert (await sim.call("POST", "profile/1/datarequest", version="v4")).status == 401

    async with sim.http.post(f"{sim.url}/authenticate", data={"access_token": TOKEN}) as answer:
        jwt = await answer.text()
    async with sim.http.post(
        f"{sim.url}/v4/profile/1/datarequest", headers={"Authorization": f"Bearer {jwt}"}
    ) as answer:
        assert answer.status == 201


@pytest.mark.parametrize("token", [None, "wrong"])
async def test_a_missing_or_wrong_token_is_401_and_files_nothing(
    make_sim: SimFactory, token: str | None
) -> None:
    sim = await make_sim()

    answer = await sim.call("POST", "profile/1/datarequest", token=token)

    assert answer.status == 401
    assert answer.json() == {"error": {"message": "Invalid access token"}}
    assert sim.state.requests == {} and sim.state.api_calls == 1


@pytest.mark.parametrize(
    ("method", "path", "message"),
    [
        ("GET", "profile/5/datarequest", "Invalid method"),
        ("GET", "email/a%40b.cd/datarequest", "Invalid method"),
        ("POST", "profile/0/datarequest", "No entity with supplied ID"),
        ("POST", "profile/abc/datarequest", "No entity with supplied ID"),
        ("POST", "subprofile/x/datarequest", "No subprofile with supplied ID"),
        ("POST", "subprofile/-3/datarequest", "No subprofile with supplied ID"),
        ("POST", "email/not-an-address/datarequest", "Invalid email address"),
        ("GET", "datarequest/999999/status", "No entity with supplied ID"),
        ("GET", "datarequest/999999/data", "No entity with supplied ID"),
        ("GET", "datarequest/999999", "No entity with supplied ID"),
        ("GET", "no/such/path", "Invalid method"),
    ],
)
async def test_errors_look_like_copernicas(
    make_sim: SimFactory, method: str, path: str, message: str
) -> None:
    sim = await make_sim()

    answer = await sim.call(method, path)

    assert answer.status == 400
    assert answer.json() == {"error": {"message": message}}
    assert sim.state.requests == {}


# -- readiness -----------------------------------------------------------------------------


async def test_every_readiness_form_while_pending(make_sim: SimFactory) -> None:
    sim = await make_sim(ready_after=60)
    cid = await sim.create("profile/42/datarequest")

    status = await sim.call("GET", f"datarequest/{cid}/status")
    data = await sim.call("GET", f"datarequest/{cid}/data")
    old = await sim.call("GET", f"datarequest/{cid}")

    assert (status.status, status.json()) == (
        200,
        {"status": "pending", "available": 0, "content-type": "application/json"},
    )
    assert (data.status, data.json()) == (404, {"error": {"message": NOT_AVAILABLE}})
    assert (old.status, old.json()) == (
        200,
        {"info": {"type": "profile", "id": 42}, "data": NOT_AVAILABLE},
    )


async def test_every_readiness_form_when_ready_gives_the_exact_payload(
    make_sim: SimFactory,
) -> None:
    sim = await make_sim(ready_after=60, payload_size=300_000)
    cid = await sim.create("email/ann%40example.com/datarequest")
    assert (await sim.control("POST", f"requests/{cid}/ready")).status == 200
    expected = sim.state.payload_bytes(cid)

    status = await sim.call("GET", f"datarequest/{cid}/status")
    data = await sim.call("GET", f"datarequest/{cid}/data")
    old = await sim.call("GET", f"datarequest/{cid}")

    assert status.json() == {
        "status": "available",
        "available": len(expected),
        "content-type": "application/json",
    }
    for answer in (data, old):
        assert answer.status == 200
        assert answer.body == expected
        assert answer.headers["Content-Length"] == str(len(expected))
        assert answer.headers["Content-Type"] == "application/json"
        assert "Transfer-Encoding" not in answer.headers
    assert sha256(data.body) == sim.state.payload_digest(cid)[1]
    counts = sim.state.requests[cid]
    assert (counts.status_gets, counts.data_gets, counts.old_gets) == (1, 2, 1)


async def test_readiness_comes_ready_after_seconds_after_create(make_sim: SimFactory) -> None:
    sim = await make_sim(ready_after=0.2)
    cid = await sim.create()

    before = (await sim.call("GET", f"datarequest/{cid}/status")).json()["status"]
    await asyncio.sleep(0.25)  # the time that passes is the scenario: ready 0.2 s after create
    after = (await sim.call("GET", f"datarequest/{cid}/status")).json()["status"]

    assert (before, after) == ("pending", "available")


@pytest.mark.parametrize(
    ("disabled", "path"), [("status", "/status"), ("data", "/data"), ("old", "")]
)
async def test_a_disabled_readiness_form_is_an_invalid_method(
    make_sim: SimFactory, disabled: str, path: str
) -> None:
    sim = await make_sim(readiness_forms={"status", "data", "old"} - {disabled})
    cid = await sim.create()

    answers = {
        suffix: await sim.call("GET", f"datarequest/{cid}{suffix}")
        for suffix in ("/status", "/data", "")
    }

    assert answers.pop(path).json() == {"error": {"message": "Invalid method"}}
    assert [answer.status for answer in answers.values()] == [200, 200]


async def test_expired_data_is_gone(make_sim: SimFactory) -> None:
    sim = await make_sim(expire_after=0.3)
    cid = await sim.create()
    assert (await sim.call("GET", f"datarequest/{cid}/data")).status == 200

    await asyncio.sleep(0.35)  # the time that passes is the scenario: gone 0.3 s after ready

    status = await sim.call("GET", f"datarequest/{cid}/status")
    assert status.json() == {
        "status": "not available",
        "available": 0,
        "content-type": "application/json",
    }
    assert (await sim.call("GET", f"datarequest/{cid}/data")).status == 410
    assert (await sim.call("GET", f"datarequest/{cid}")).status == 410
    state = (await sim.control("GET", "state")).json()
    assert (state["requests"][cid]["ready"], state["requests"][cid]["expired"]) == (True, True)


# -- delivery to `report` ------------------------------------------------------------------


async def test_delivery_posts_the_exact_payload_with_content_length(
    make_sim: SimFactory, receiver: Receiver
) -> None:
    sim = await make_sim(payload_size=2 * MIB)
    created = time.time()

    cid = await sim.create("email/ann%40example.com/datarequest", report=receiver.url)
    await eventually(lambda: len(sim.state.deliveries) == 1)

    size, digest = payload_digest(sim.state.payload_spec(cid))
    assert receiver.bodies == [sim.state.payload_bytes(cid)]
    assert sha256(receiver.bodies[0]) == digest
    assert receiver.headers[0]["Content-Length"] == str(size)
    assert receiver.headers[0]["Content-Type"] == "application/json"
    assert "Transfer-Encoding" not in receiver.headers[0]
    delivery = sim.state.deliveries[0]
    assert (delivery.copernica_id, delivery.url, delivery.status, delivery.kind) == (
        cid,
        receiver.url,
        200,
        "payload",
    )
    assert (delivery.bytes, delivery.sha256) == (size, digest)
    assert created <= delivery.at <= time.time()  # Unix time, when the attempt ended


async def test_delivery_can_be_chunked(make_sim: SimFactory, receiver: Receiver) -> None:
    sim = await make_sim(delivery_chunked=True, payload_size=200_000)

    cid = await sim.create(report=receiver.url)
    await eventually(lambda: len(receiver.bodies) == 1)

    assert receiver.headers[0]["Transfer-Encoding"] == "chunked"
    assert "Content-Length" not in receiver.headers[0]
    assert receiver.bodies == [sim.state.payload_bytes(cid)]


async def test_a_5xx_answer_is_retried_and_a_4xx_ends_delivery(
    make_sim: SimFactory, receiver: Receiver
) -> None:
    sim = await make_sim()
    receiver.script = [503, 500, 200, 422]

    first = await sim.create(report=receiver.url)
    await eventually(lambda: len(sim.state.deliveries) == 3)
    second = await sim.create(report=receiver.url)
    await eventually(lambda: len(sim.state.deliveries) == 4)
    await settled(sim)  # then no wrong extra attempt can come

    assert [(d.copernica_id, d.status) for d in sim.state.deliveries] == [
        (first, 503),
        (first, 500),
        (first, 200),
        (second, 422),
    ]
    assert receiver.bodies[:3] == [sim.state.payload_bytes(first)] * 3


async def test_an_unreachable_report_is_tried_retries_plus_one_times(
    make_sim: SimFactory,
) -> None:
    sim = await make_sim(delivery_retries=2)

    await sim.create(report=f"http://127.0.0.1:{closed_port()}/report")
    await eventually(lambda: len(sim.state.deliveries) == 3)
    await settled(sim)  # then no wrong extra attempt can come

    assert [d.status for d in sim.state.deliveries] == [None, None, None]


async def test_an_email_report_is_noted_not_posted(make_sim: SimFactory) -> None:
    sim = await make_sim()

    cid = await sim.create(report="dpo@example.com")
    await eventually(lambda: len(sim.state.deliveries) == 1)

    delivery = sim.state.deliveries[0]
    assert (delivery.url, delivery.status, delivery.kind) == ("dpo@example.com", None, "email")
    assert (delivery.bytes, delivery.sha256) == sim.state.payload_digest(cid)


# -- faults --------------------------------------------------------------------------------


async def test_a_lost_callback_is_never_posted_until_forced(
    make_sim: SimFactory, receiver: Receiver
) -> None:
    sim = await make_sim()
    assert (await sim.control("POST", "faults", {"lose_callback": True})).status == 200

    cid = await sim.create(report=receiver.url)
    await settled(sim)  # ready at once: its delivery was due and is done with
    assert (await sim.call("GET", f"datarequest/{cid}/status")).json()["status"] == "available"
    assert receiver.bodies == [] and sim.state.deliveries == []

    assert (await sim.control("POST", f"requests/{cid}/deliver")).status == 200
    await eventually(lambda: len(receiver.bodies) == 1)
    assert receiver.bodies == [sim.state.payload_bytes(cid)]


@pytest.mark.parametrize("action", ["ready", "deliver"])
async def test_forcing_readiness_or_delivery_delivers_once_at_once(
    make_sim: SimFactory, receiver: Receiver, action: str
) -> None:
    sim = await make_sim(ready_after=60)
    cid = await sim.create(report=receiver.url)

    assert (await sim.control("POST", f"requests/{cid}/{action}")).status == 200

    await eventually(lambda: len(receiver.bodies) == 1, timeout=1)
    await settled(sim)  # then no second delivery can come
    assert len(receiver.bodies) == 1


@pytest.mark.parametrize(("concurrent", "overlap"), [(False, 1), (True, 3)])
async def test_duplicate_callbacks_repeat_the_same_bytes(
    make_sim: SimFactory, receiver: Receiver, concurrent: bool, overlap: int
) -> None:
    sim = await make_sim()
    sim.state.faults.duplicate_callback = 2
    sim.state.faults.duplicate_concurrent = concurrent
    receiver.hold = 0.05

    cid = await sim.create(report=receiver.url)
    # A delivery is recorded once its answer is back, a moment after the body arrived.
    await eventually(lambda: len(receiver.bodies) == 3 and len(sim.state.deliveries) == 3)

    assert receiver.bodies == [sim.state.payload_bytes(cid)] * 3
    assert receiver.max_in_flight == overlap
    assert [d.status for d in sim.state.deliveries] == [200] * 3


async def test_wrong_subject_and_malformed_payloads_are_delivered_as_specified(
    make_sim: SimFactory, receiver: Receiver
) -> None:
    sim = await make_sim()
    sim.state.faults.wrong_subject = True
    wrong = await sim.create("email/ann%40example.com/datarequest", report=receiver.url)
    await eventually(lambda: len(receiver.bodies) == 1)
    sim.state.faults.wrong_subject = False
    sim.state.faults.malformed_json = True
    broken = await sim.create("email/ann%40example.com/datarequest", report=receiver.url)
    await eventually(lambda: len(receiver.bodies) == 2)

    assert json.loads(receiver.bodies[0])["info"]["id"] != "ann@example.com"
    assert receiver.bodies[0] == sim.state.payload_bytes(wrong)
    with pytest.raises(ValueError):
        json.loads(receiver.bodies[1])
    assert receiver.bodies[1] == sim.state.payload_bytes(broken)


async def test_not_available_callback_comes_before_the_payload(
    make_sim: SimFactory, receiver: Receiver
) -> None:
    sim = await make_sim()
    sim.state.faults.not_available_callback = True

    cid = await sim.create("subprofile/7/datarequest", report=receiver.url)
    await eventually(lambda: len(receiver.bodies) == 2 and len(sim.state.deliveries) == 2)

    assert json.loads(receiver.bodies[0]) == {
        "info": {"type": "subprofile", "id": 7},
        "data": NOT_AVAILABLE,
    }
    assert receiver.bodies[1] == sim.state.payload_bytes(cid)
    assert [d.kind for d in sim.state.deliveries] == ["not_available", "payload"]


async def test_faults_can_target_one_request_or_one_subject(
    make_sim: SimFactory, receiver: Receiver
) -> None:
    sim = await make_sim(ready_after=0.1)
    lost = await sim.create("profile/1/datarequest", report=receiver.url)
    kept = await sim.create("profile/2/datarequest", report=receiver.url)
    assert (
        await sim.control("POST", "faults", {"copernica_id": lost, "lose_callback": True})
    ).status == 200
    assert (
        await sim.control(
            "POST", "faults", {"subject": "email/ANN@example.com", "wrong_subject": True}
        )
    ).status == 200
    wrong = await sim.create("email/ann%40example.com/datarequest", report=receiver.url)

    await eventually(lambda: len(receiver.bodies) == 2)
    await settled(sim)  # the lost callback's delivery is done with too

    assert receiver.bodies == [sim.state.payload_bytes(kept), sim.state.payload_bytes(wrong)]
    assert json.loads(receiver.bodies[1])["info"]["id"] != "ann@example.com"
    assert sim.state.faults.lose_callback is False


async def test_fail_next_answers_503_then_recovers(make_sim: SimFactory) -> None:
    sim = await make_sim()
    await sim.control("POST", "faults", {"fail_next": 2})

    answers = [await sim.call("POST", "profile/1/datarequest") for _ in range(3)]

    assert [a.status for a in answers] == [503, 503, 201]
    assert answers[0].json() == {"error": {"message": "Service temporarily unavailable"}}
    assert list(sim.state.requests) == [answers[2].headers["X-Created"]]


async def test_429_comes_with_retry_after(make_sim: SimFactory) -> None:
    sim = await make_sim()
    sim.state.faults.status_429_rate = 1.0

    answer = await sim.call("GET", "datarequest/1/status")

    assert (answer.status, answer.headers["Retry-After"]) == (429, "1")
    assert answer.json() == {"error": {"message": "Too many requests"}}


async def test_injected_error_rates_are_reproducible(make_sim: SimFactory) -> None:
    async def statuses() -> list[int]:
        sim = await make_sim(seed=3)
        await sim.control("POST", "faults", {"status_5xx_rate": 0.3, "status_429_rate": 0.3})
        return [(await sim.call("GET", "datarequest/1/status")).status for _ in range(30)]

    first, second = await statuses(), await statuses()

    assert first == second
    assert {400, 429, 503} == set(first)


async def test_slow_answers(make_sim: SimFactory) -> None:
    sim = await make_sim()
    sim.state.faults.slow_seconds = 0.2
    started = time.monotonic()

    await sim.call("GET", "datarequest/1/status")

    assert time.monotonic() - started >= 0.2


# -- control API ---------------------------------------------------------------------------


async def test_state_shows_requests_deliveries_counts_and_peak_rate(
    make_sim: SimFactory, receiver: Receiver
) -> None:
    sim = await make_sim(ready_after=0.05)
    cid = await sim.create("email/ann%40example.com/datarequest", report=receiver.url)
    for _ in range(9):
        await sim.call("GET", f"datarequest/{cid}/status")
    await eventually(lambda: len(sim.state.deliveries) == 1)

    state = (await sim.control("GET", "state")).json()

    assert state["api_calls"] == 10 and state["max_rps"] == 10
    request = state["requests"][cid]
    assert request["subject_type"] == "email" and request["subject_id"] == "ann@example.com"
    assert request["report"] == receiver.url and request["status_gets"] == 9
    assert request["ready"] is True and request["expired"] is False
    assert state["deliveries"][0]["sha256"] == sim.state.payload_digest(cid)[1]
    assert "access_token" not in state["config"]


@pytest.mark.parametrize(
    "body",
    [{"bogus": 1}, {"fail_next": "2"}, {"lose_callback": 1}, ["fail_next"]],
)
async def test_faults_are_validated(make_sim: SimFactory, body: Any) -> None:
    sim = await make_sim()
    answer = await sim.control("POST", "faults", body)
    assert answer.status == 400 and "message" in answer.json()["error"]


async def test_config_changes_apply_to_new_requests(make_sim: SimFactory) -> None:
    sim = await make_sim()

    answer = await sim.control("POST", "config", {"ready_after": 60, "payload_size": 100_000})
    cid = await sim.create()

    assert answer.status == 200
    assert (await sim.call("GET", f"datarequest/{cid}/status")).json()["status"] == "pending"
    await sim.control("POST", f"requests/{cid}/ready")
    assert len((await sim.call("GET", f"datarequest/{cid}/data")).body) >= 100_000
    assert (await sim.control("POST", "config", {"create_id_header": "nope"})).status == 400


async def test_reset_forgets_everything_but_the_configuration(make_sim: SimFactory) -> None:
    sim = await make_sim(first_id=10)
    await sim.create()
    sim.state.faults.lose_callback = True

    await sim.control("POST", "reset")

    assert sim.state.requests == {} and sim.state.api_calls == 0
    assert sim.state.faults.lose_callback is False
    assert await sim.create() == "10"
    assert (await sim.control("POST", "requests/999/ready")).status == 404


async def test_waiting_deliveries_are_cancelled_when_the_app_stops(
    aiohttp_server: Any, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    app = create_simulator_app(SimulatorConfig(access_token=TOKEN, ready_after=60))
    server = await aiohttp_server(app, host="127.0.0.1")
    async with http.post(
        server.make_url("/v2/profile/1/datarequest"),
        params={"access_token": TOKEN, "report": receiver.url},
    ) as answer:
        assert answer.status == 201

    await server.close()

    waiting = [t for t in asyncio.all_tasks() if "_deliver_when_ready" in repr(t.get_coro())]
    assert waiting == []
    assert app[SIM_STATE].deliveries == []


async def test_run_simulator_serves_standalone(http: aiohttp.ClientSession) -> None:
    port = closed_port()
    script = (
        "from service.simulator.app import run_simulator; "
        f"run_simulator('127.0.0.1', {port}, 'standalone', ready_after=0)"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        assert b"Copernica simulator on" in await proc.stdout.readline()

        async def create() -> tuple[int, str] | None:
            try:
                async with http.post(
                    f"http://127.0.0.1:{port}/v3/profile/1/datarequest",
                    params={"access_token": "standalone"},
                ) as answer:
                    return answer.status, answer.headers["X-Created"]
            except aiohttp.ClientConnectionError:
                return None  # the banner comes just before the port is bound

        created = await eventually(create, timeout=10, what="the standalone simulator")
        assert created == (201, "1000")
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 5)


# -- events (v1) ---------------------------------------------------------------------------


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
    make_sim: SimFactory, query: dict[str, str], first: str, last: str
) -> None:
    sim = await make_sim()
    sim.state.events = make_events(date(2024, 12, 1), date(2025, 4, 1), per_day=1, profile=5)

    answer = await sim.call("GET", "profile/5/events", version="v1", **query)

    assert answer.status == 200
    found = [e["data"]["time"][:10] for e in answer.json()]
    assert (found[0], found[-1]) == (first, last)
    assert len(found) == len(set(found))


def test_the_control_api_is_off_unless_asked_for() -> None:
    def control_routes(config: SimulatorConfig) -> set[str]:
        app = create_simulator_app(config)
        return {
            r.resource.canonical
            for r in app.router.routes()
            if r.resource is not None and r.resource.canonical.startswith("/_sim/")
        }

    assert control_routes(SimulatorConfig()) == set()
    assert "/_sim/faults" in control_routes(SimulatorConfig(control=True))
