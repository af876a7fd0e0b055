"""The Copernica fake: the data-request API over HTTP, with switches for every known fault.

Faithful to what SPEC and the seed document say of the real API: create answers 201 with
an empty body and the id in `X-Created` (or Location / X-Location / a JSON body, to test
clients against each); readiness through `datarequest/{id}/status`, `datarequest/{id}/data`
(404 until ready) and the old `datarequest/{id}` ("Data not available (yet)"); errors as
`{"error": {"message": ...}}`, including `400 "Invalid method"` for paths it does not serve;
and delivery of the result by POST to the `report` web address. A control API under `/_sim/`
lets tests switch faults and read what happened (calls, deliveries, observed rate).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import hashlib
import json
import random
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import aiohttp
from aiohttp import web

from ..events import add_months
from .payloads import PayloadSpec, payload_bytes, payload_chunks

NOT_AVAILABLE = "Data not available (yet)"
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


@dataclass
class Faults:
    """Switches, changeable at run time (in process, or by POST /_sim/faults)."""

    lose_callback: bool = False  # ready, but never POSTed to `report`
    duplicate_callback: int = 0  # extra deliveries, sent concurrently with the first
    wrong_subject: bool = False  # payload's info.id is someone else
    malformed_json: bool = False  # payload cut short
    not_available_callback: bool = False  # first POST a "Data not available (yet)" body
    status_5xx_rate: float = 0.0  # fraction of API calls answered 503
    status_429_rate: float = 0.0  # fraction of API calls answered 429 + Retry-After
    fail_next: int = 0  # the next N API calls answer 503
    slow_seconds: float = 0.0  # delay before every API answer
    reject_create: bool = False  # create answers 400 "No entity with supplied ID"


@dataclass
class SimulatorConfig:
    access_token: str = "dev-token"  # noqa: S105 - the fake's own, for local use
    ready_after: float = 0.2  # seconds from create to ready (late readiness: make it large)
    expire_after: float | None = None  # seconds from ready to gone
    payload_size: int = 20_000
    readiness_forms: set[str] = field(default_factory=lambda: {"status", "data", "old"})
    create_id_header: str = "X-Created"  # or Location, X-Location, body
    delivery_retries: int = 3
    delivery_retry_delay: float = 0.2
    retry_after_seconds: int = 1
    first_id: int = 1000
    jwt_lifetime: float = 24 * 3600.0
    events_shape: str = "nested"  # or "flat": {"type": ..., **data}
    seed: int = 7


@dataclass
class Delivery:
    copernica_id: str
    status: int | None
    bytes: int
    sha256: str
    kind: str  # payload | not_available


@dataclass
class SimRequest:
    copernica_id: str
    subject_type: str
    subject_id: str
    report: str | None
    created: float
    ready_at: float
    status_gets: int = 0
    data_gets: int = 0
    open_fetches: int = 0
    max_open_fetches: int = 0
    spec: PayloadSpec | None = None

    def ready(self, now: float) -> bool:
        return now >= self.ready_at

    def gone(self, now: float, expire_after: float | None) -> bool:
        return expire_after is not None and now >= self.ready_at + expire_after


class SimState:
    """Everything the simulator knows, readable by tests in process or over /_sim/state."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.faults = Faults()
        self.requests: dict[str, SimRequest] = {}
        self.deliveries: list[Delivery] = []
        self.api_calls = 0
        self.max_rps = 0
        self._window: collections.deque[float] = collections.deque()
        self._next_id = config.first_id
        self.random = random.Random(config.seed)
        self.jwts: dict[str, float] = {}  # issued v4 tokens and when they expire
        self.events: list[dict[str, Any]] = []  # {"event", "data": {id, time, email, ...}}
        self.events_calls: list[tuple[str, str, date, date]] = []

    def reset(self) -> None:
        self.__init__(self.config)  # type: ignore[misc]

    def count_call(self) -> None:
        now = time.monotonic()
        self.api_calls += 1
        self._window.append(now)
        while self._window and self._window[0] <= now - 1.0:
            self._window.popleft()
        self.max_rps = max(self.max_rps, len(self._window))

    def new_request(self, subject_type: str, subject_id: str, report: str | None) -> SimRequest:
        copernica_id = str(self._next_id)
        self._next_id += 1
        now = time.monotonic()
        request = SimRequest(
            copernica_id, subject_type, subject_id, report, now, now + self.config.ready_after
        )
        self.requests[copernica_id] = request
        return request

    def payload_spec(self, copernica_id: str) -> PayloadSpec:
        request = self.requests[copernica_id]
        if request.spec is None:  # fixed at first use, so faults switched later do not apply
            request.spec = PayloadSpec(
                request.subject_type,
                request.subject_id,
                copernica_id,
                self.config.payload_size,
                wrong_subject=self.faults.wrong_subject,
                malformed=self.faults.malformed_json,
            )
        return request.spec

    def payload_bytes(self, copernica_id: str) -> bytes:
        return payload_bytes(self.payload_spec(copernica_id))

    def snapshot(self) -> dict[str, Any]:
        return {
            "faults": dataclasses.asdict(self.faults),
            "api_calls": self.api_calls,
            "max_rps": self.max_rps,
            "requests": {
                cid: {k: v for k, v in dataclasses.asdict(r).items() if k != "spec"}
                for cid, r in self.requests.items()
            },
            "deliveries": [dataclasses.asdict(d) for d in self.deliveries],
        }


SIM_STATE = web.AppKey("sim_state", SimState)
_HTTP = web.AppKey("sim_http", aiohttp.ClientSession)
_TASKS = web.AppKey("sim_tasks", set[asyncio.Task[None]])


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status, headers=headers)


def _authorized(request: web.Request, state: SimState) -> bool:
    """v1-v3: `access_token` parameter; v4: a bearer JWT from POST /authenticate."""
    if request.match_info.get("version") == "v4":
        given = request.headers.get("Authorization", "").removeprefix("Bearer ")
        issued = state.jwts.get(given)
        return issued is not None and time.monotonic() < issued
    return request.query.get("access_token") == state.config.access_token


@web.middleware
async def _api_faults(request: web.Request, handler: Any) -> web.StreamResponse:
    """Auth, rate observation and injected faults for every API call (not /_sim/)."""
    if request.path.startswith("/_sim/") or request.path == "/authenticate":
        return await handler(request)
    state = request.app[SIM_STATE]
    state.count_call()
    faults = state.faults
    if faults.slow_seconds:
        await asyncio.sleep(faults.slow_seconds)
    if not _authorized(request, state):
        return _error(401, "Invalid access token")
    if faults.fail_next > 0:
        faults.fail_next -= 1
        return _error(503, "Service temporarily unavailable")
    roll = state.random.random()
    if roll < faults.status_429_rate:
        return _error(
            429, "Too many requests", **{"Retry-After": str(state.config.retry_after_seconds)}
        )
    if roll < faults.status_429_rate + faults.status_5xx_rate:
        return _error(503, "Service temporarily unavailable")
    return await handler(request)


async def _report_of(request: web.Request) -> str | None:
    report = request.query.get("report")
    if report is None and request.can_read_body:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("report"), str):
            report = body["report"]
    return report or None


async def create(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    kind = request.match_info["kind"]
    subject_id = request.match_info["subject"]
    if request.method != "POST":
        return _error(400, "Invalid method")
    if kind == "email":
        if not _EMAIL.match(subject_id):
            return _error(400, "Invalid email address")
    elif not subject_id.isdigit() or int(subject_id) <= 0:
        return _error(
            400,
            "No subprofile with supplied ID"
            if kind == "subprofile"
            else "No entity with supplied ID",
        )
    if state.faults.reject_create:
        return _error(
            400,
            "No subprofile with supplied ID"
            if kind == "subprofile"
            else "No entity with supplied ID",
        )
    sim_request = state.new_request(kind, subject_id, await _report_of(request))
    _schedule_delivery(request.app, sim_request)
    cid = sim_request.copernica_id
    form = state.config.create_id_header
    if form == "body":
        return web.json_response({"id": cid}, status=201)
    value = cid if form == "X-Created" else f"https://api.copernica.com/v2/datarequest/{cid}"
    return web.Response(status=201, headers={form: value})


def _find(request: web.Request, form: str) -> SimRequest | web.Response:
    state = request.app[SIM_STATE]
    if form not in state.config.readiness_forms:
        return _error(400, "Invalid method")
    sim_request = state.requests.get(request.match_info["id"])
    if sim_request is None:
        return _error(400, "No entity with supplied ID")
    return sim_request


async def status(request: web.Request) -> web.Response:
    found = _find(request, "status")
    if isinstance(found, web.Response):
        return found
    found.status_gets += 1
    state, now = request.app[SIM_STATE], time.monotonic()
    if found.gone(now, state.config.expire_after):
        return web.json_response(
            {"status": "not available", "available": 0, "content-type": "application/json"}
        )
    if not found.ready(now):
        return web.json_response(
            {"status": "pending", "available": 0, "content-type": "application/json"}
        )
    size = len(state.payload_bytes(found.copernica_id)) if state.config.payload_size < 2**22 else 0
    return web.json_response(
        {"status": "available", "available": size, "content-type": "application/json"}
    )


async def _stream_payload(request: web.Request, found: SimRequest) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    found.data_gets += 1
    found.open_fetches += 1
    found.max_open_fetches = max(found.max_open_fetches, found.open_fetches)
    try:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for chunk in payload_chunks(state.payload_spec(found.copernica_id)):
            await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        found.open_fetches -= 1


async def data(request: web.Request) -> web.StreamResponse:
    found = _find(request, "data")
    if isinstance(found, web.Response):
        return found
    state, now = request.app[SIM_STATE], time.monotonic()
    if found.gone(now, state.config.expire_after):
        return _error(410, "Data expired")
    if not found.ready(now):
        found.data_gets += 1
        return _error(404, NOT_AVAILABLE)
    return await _stream_payload(request, found)


async def old_form(request: web.Request) -> web.StreamResponse:
    found = _find(request, "old")
    if isinstance(found, web.Response):
        return found
    state, now = request.app[SIM_STATE], time.monotonic()
    if found.gone(now, state.config.expire_after):
        return _error(410, "Data expired")
    if not found.ready(now):
        found.data_gets += 1
        info = {"type": found.subject_type, "id": found.subject_id}
        return web.json_response({"info": info, "data": NOT_AVAILABLE})
    return await _stream_payload(request, found)


# -- delivery to `report` -------------------------------------------------------------------


def _schedule_delivery(app: web.Application, sim_request: SimRequest) -> None:
    if not sim_request.report or not sim_request.report.startswith(("http://", "https://")):
        return
    task = asyncio.create_task(_deliver_when_ready(app, sim_request))
    app[_TASKS].add(task)
    task.add_done_callback(app[_TASKS].discard)


async def _deliver_when_ready(app: web.Application, sim_request: SimRequest) -> None:
    state = app[SIM_STATE]
    await asyncio.sleep(max(0.0, sim_request.ready_at - time.monotonic()))
    if state.faults.lose_callback:
        return
    if state.faults.not_available_callback:
        info = {"type": sim_request.subject_type, "id": sim_request.subject_id}
        body = json.dumps({"info": info, "data": NOT_AVAILABLE}).encode()
        await _post(app, sim_request, [body], "not_available")
    copies = 1 + state.faults.duplicate_callback
    await asyncio.gather(*(_deliver(app, sim_request) for _ in range(copies)))


async def _deliver(app: web.Application, sim_request: SimRequest) -> None:
    spec = app[SIM_STATE].payload_spec(sim_request.copernica_id)
    await _post(app, sim_request, payload_chunks(spec), "payload")


class _Counted:
    """Chunks on their way out, hashed and counted so the delivery log says what was sent."""

    def __init__(self, chunks: Any) -> None:
        self.chunks = chunks
        self.digest = hashlib.sha256()
        self.sent = 0

    async def stream(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            self.digest.update(chunk)
            self.sent += len(chunk)
            yield chunk


async def _post(app: web.Application, sim_request: SimRequest, chunks: Any, kind: str) -> None:
    state = app[SIM_STATE]
    assert sim_request.report is not None
    for attempt in range(1 + state.config.delivery_retries):
        counted = _Counted(chunks if attempt == 0 else _again(sim_request, app, kind, chunks))
        status: int | None
        try:
            async with app[_HTTP].post(
                sim_request.report,
                data=counted.stream(),
                headers={"Content-Type": "application/json"},
            ) as answer:
                status = answer.status
        except (aiohttp.ClientError, TimeoutError):
            status = None
        state.deliveries.append(
            Delivery(
                sim_request.copernica_id, status, counted.sent, counted.digest.hexdigest(), kind
            )
        )
        if status is not None and status < 500:
            return
        await asyncio.sleep(state.config.delivery_retry_delay)


def _again(sim_request: SimRequest, app: web.Application, kind: str, chunks: Any) -> Any:
    """The same body once more (a generator cannot be replayed; a list can)."""
    if kind == "payload":
        return payload_chunks(app[SIM_STATE].payload_spec(sim_request.copernica_id))
    return chunks


async def authenticate(request: web.Request) -> web.Response:
    """The v4 authentication server: form `access_token` in, a JWT string out."""
    state = request.app[SIM_STATE]
    form = await request.post()
    if form.get("access_token") != state.config.access_token:
        return _error(401, "Invalid access token")
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=").decode()
    claims = json.dumps({"sub": "sim", "n": len(state.jwts), "exp": int(time.time() + 86400)})
    body = base64.urlsafe_b64encode(claims.encode()).rstrip(b"=").decode()
    jwt = f"{header}.{body}.{secrets.token_urlsafe(16)}"
    state.jwts[jwt] = time.monotonic() + state.config.jwt_lifetime
    return web.Response(text=jwt)


# -- events (REST API v1, GET events) -----------------------------------------------------------
# The seed's window rules, implemented on their own here (not through the service's planner):
# start only -> one month from start; end only -> the month before end; both more than a
# month apart -> one month from start, end ignored; neither -> the last month.
SIM_WINDOW_MONTHS = 1


def _events_window(start: str | None, end: str | None) -> tuple[date, date]:
    begin = date.fromisoformat(start) if start else None
    stop = date.fromisoformat(end) if end else None
    if begin and stop:
        limit = add_months(begin, SIM_WINDOW_MONTHS)
        return begin, stop if stop <= limit else limit
    if begin:
        return begin, add_months(begin, SIM_WINDOW_MONTHS)
    if stop:
        return add_months(stop, -SIM_WINDOW_MONTHS), stop
    today = datetime.now(UTC).date()
    return add_months(today, -SIM_WINDOW_MONTHS), today + timedelta(days=1)


def _matches(event: dict[str, Any], kind: str, ident: str, tags: list[str]) -> bool:
    data = event["data"]
    if kind == "tags":
        wanted = [t for t in ident.split(";") if t]
        if not set(wanted) <= set(data.get("tags", [])):
            return False
    elif kind == "email":
        if str(data.get("email", "")).casefold() != ident.casefold():
            return False
    elif str(data.get(kind.removeprefix("old/"), "")) != ident:
        return False
    return set(tags) <= set(data.get("tags", []))


async def events(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    kind = request.match_info["kind"]
    if request.match_info.get("old"):
        kind = "old/" + kind
    try:
        begin, stop = _events_window(request.query.get("start"), request.query.get("end"))
    except ValueError:
        return _error(400, "Invalid date")
    tags = [t for t in request.query.get("tags", "").split(";") if t]
    state.events_calls.append((kind, request.match_info["id"], begin, stop))
    found = [
        e
        for e in state.events
        if begin <= date.fromisoformat(e["data"]["time"][:10]) < stop
        and _matches(e, kind, request.match_info["id"], tags)
    ]
    if state.config.events_shape == "flat":
        return web.json_response([{"type": e["event"], **e["data"]} for e in found])
    return web.json_response(found)


# -- control API ------------------------------------------------------------------------------


async def sim_state(request: web.Request) -> web.Response:
    return web.json_response(request.app[SIM_STATE].snapshot())


async def sim_faults(request: web.Request) -> web.Response:
    faults = request.app[SIM_STATE].faults
    changes = await request.json()
    known = {f.name for f in dataclasses.fields(Faults)}
    unknown = set(changes) - known
    if unknown:
        return web.json_response({"error": f"unknown faults: {sorted(unknown)}"}, status=400)
    for name, value in changes.items():
        setattr(faults, name, value)
    return web.json_response(dataclasses.asdict(faults))


async def sim_reset(request: web.Request) -> web.Response:
    request.app[SIM_STATE].reset()
    return web.json_response({"status": "reset"})


async def sim_ready(request: web.Request) -> web.Response:
    found = request.app[SIM_STATE].requests.get(request.match_info["id"])
    if found is None:
        raise web.HTTPNotFound()
    found.ready_at = time.monotonic()
    return web.json_response({"status": "ready"})


async def sim_deliver(request: web.Request) -> web.Response:
    found = request.app[SIM_STATE].requests.get(request.match_info["id"])
    if found is None:
        raise web.HTTPNotFound()
    found.ready_at = min(found.ready_at, time.monotonic())
    _schedule_delivery(request.app, found)
    return web.json_response({"status": "delivering"})


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    tasks: set[asyncio.Task[None]] = set()
    app[_TASKS] = tasks
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        app[_HTTP] = http
        yield
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def create_simulator_app(config: SimulatorConfig | None = None) -> web.Application:
    app = web.Application(middlewares=[_api_faults])
    app[SIM_STATE] = SimState(config or SimulatorConfig())
    app.cleanup_ctx.append(_lifecycle)
    version = "/{version:v[1-4]}"
    subject = version + "/{kind:email|profile|subprofile}/{subject}/datarequest"
    app.router.add_route("*", subject, create)
    app.router.add_get(version + "/datarequest/{id}/status", status)
    app.router.add_get(version + "/datarequest/{id}/data", data)
    app.router.add_get(version + "/datarequest/{id}", old_form)
    kinds = "{kind:message|email|tags|profile|subprofile|template}"
    app.router.add_get(version + "/" + kinds + "/{id}/events", events)
    app.router.add_get(version + "/{old:old}/{kind:message|template|document}/{id}/events", events)
    app.router.add_post("/authenticate", authenticate)
    app.router.add_get("/_sim/state", sim_state)
    app.router.add_post("/_sim/faults", sim_faults)
    app.router.add_post("/_sim/reset", sim_reset)
    app.router.add_post("/_sim/requests/{id}/ready", sim_ready)
    app.router.add_post("/_sim/requests/{id}/deliver", sim_deliver)
    return app


def run_simulator(host: str, port: int, access_token: str, **config: Any) -> None:
    """`python -m service simulate`: serve the fake until interrupted."""
    settings = SimulatorConfig(access_token=access_token, **config)
    print(f"Copernica simulator on http://{host}:{port}/v2 (state: /_sim/state)", flush=True)
    web.run_app(create_simulator_app(settings), host=host, port=port, print=None)
