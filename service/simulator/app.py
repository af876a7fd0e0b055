"""The Copernica fake: the data-request API over HTTP, with switches for every known fault.

Faithful to what SPEC and the seed document say of the real API: create answers 201 with
an empty body and the id in `X-Created` (or Location / X-Location / a JSON body, to test
clients against each); readiness through `datarequest/{id}/status`, `datarequest/{id}/data`
(404 until ready) and the old `datarequest/{id}` ("Data not available (yet)"); errors as
`{"error": {"message": ...}}`, including `400 "Invalid method"` for paths it does not serve;
and delivery of the result by POST to the `report` web address, signed as Copernica signs its
webhook calls when given a key (`sign_key`, `account_id`). v1 events and the v4 bearer
authentication are served too. A control API under `/_sim/` (no auth) lets tests and
operators switch faults and read what happened: calls, deliveries, the observed call rate.

It also holds an account to find people in (account.py: databases, collections, fields,
profiles and subprofiles; the list calls and their `fields[]` filter as the live API behaves),
loaded by `POST /_sim/account` or `simulate --account FILE`:

    {"databases": [{"id": "1", "name": "Newsletter",
                    "fields": [{"name": "Email", "type": "email"}, {"name": "Name"}],
                    "interests": [{"ID": "1", "name": "news"}],
                    "collections": [{"id": "11", "name": "Orders",
                                     "fields": [{"name": "Email", "type": "email"}]}]}],
     "profiles": [{"id": "101", "database": "1", "interests": ["news"],
                   "fields": {"Email": "alice@example.com", "Name": "Alice"}}],
     "subprofiles": [{"id": "1001", "profile": "101", "collection": "11",
                      "fields": {"Email": "alice@example.com"}}]}

(ids are strings of digits; a field's type defaults to text; `created`, `modified` as
`YYYY-MM-DD HH:MM:SS`, `removed` (true or a time) and `secret` are optional). Once an account
is loaded, a profile or subprofile data request must name one of its records.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import email.utils
import hashlib
import json
import random
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from yarl import URL

from service.simulator.account import (
    Account,
    AccountError,
    Collection,
    Database,
    Page,
    Record,
    filter_texts,
    php_json,
    query_records,
)
from service.simulator.payloads import (
    PayloadSpec,
    payload_bytes,
    payload_chunks,
    payload_digest,
    payload_size,
)

NOT_AVAILABLE = "Data not available (yet)"
_EMAIL = re.compile(r"^[^@\s/]+@[^@\s/]+\.[^@\s/]+$")
READINESS_FORMS = frozenset({"status", "data", "old"})
CREATE_ID_FORMS = ("X-Created", "Location", "X-Location", "body")
COPERNICA_KEY_ID = "one._domainkey.copernica.com"
# What Copernica's signature covers, in this order (copernica/webhook-security's verifier
# insists on host, date, digest, x-nonce and x-copernica-id).
SIGNED_HEADERS = ("(request-target)", "host", "date", "digest", "x-nonce", "x-copernica-id")


@dataclass
class Faults:
    """Switches, changeable at run time (in process, or by POST /_sim/faults)."""

    lose_callback: bool = False  # ready, but never POSTed to `report`
    duplicate_callback: int = 0  # this many extra deliveries of the payload
    duplicate_concurrent: bool = False  # send the copies at once rather than one after another
    wrong_subject: bool = False  # payload's info.id is someone else
    malformed_json: bool = False  # payload cut short: invalid JSON
    not_available_callback: bool = False  # first POST a "Data not available (yet)" body
    status_5xx_rate: float = 0.0  # fraction of API calls answered 503
    status_429_rate: float = 0.0  # fraction of API calls answered 429 + Retry-After
    fail_next: int = 0  # the next N API calls answer 503
    garbage_next: int = 0  # the next N API calls answer 200 with an HTML page (a bad proxy)
    slow_seconds: float = 0.0  # delay before every API answer
    reject_create: bool = False  # create answers 400 "No entity with supplied ID"
    # The account's faults (global only):
    email_invalid_method: bool = False  # POST email/{x}/datarequest: 400 "Invalid method"
    # "profile:101", "subprofile:1001": still listed, but GET and data request answer 400
    gone_sources: list[str] = field(default_factory=list)
    list_errors: int = 0  # the next N account calls answer 503 "Loadbalancer Error"
    ignore_filter_databases: list[str] = field(default_factory=list)  # profiles: fields[] ignored


# Faults that make sense for one request; the others concern API calls as a whole.
REQUEST_FAULTS = frozenset(
    {
        "lose_callback",
        "duplicate_callback",
        "duplicate_concurrent",
        "wrong_subject",
        "malformed_json",
        "not_available_callback",
    }
)


@dataclass
class SubjectPlan:
    """What one subject's requests look like, where it differs from the configuration:
    set before the request is filed (in process: `state.plans[subject_key] = ...`)."""

    ready_after: float | None = None  # seconds from create to ready
    payload_size: int | None = None  # bytes, at least


def subject_key(subject_type: str, subject_id: str) -> str:
    """The subject as the API path names it: `email/ann@x.test`, `profile/7`."""
    subject = subject_id.casefold() if subject_type == "email" else subject_id
    return f"{subject_type}/{subject}"


@dataclass
class SimulatorConfig:
    access_token: str = "dev-token"  # noqa: S105 - the fake's own, for local use
    ready_after: float = 0.2  # seconds from create to ready (late readiness: make it large)
    expire_after: float | None = None  # seconds from ready to gone; None: never
    payload_size: int = 20_000  # bytes, at least; any size streams in bounded memory
    payload_seed: int = 0
    readiness_forms: set[str] = field(default_factory=lambda: set(READINESS_FORMS))
    create_id_header: str = "X-Created"  # or Location, X-Location, body
    delivery_retries: int = 3  # after a connection error or 5xx
    delivery_retry_delay: float = 0.2
    delivery_chunked: bool = False  # False: Content-Length; True: chunked transfer encoding
    retry_after_seconds: int = 1
    first_id: int = 1000
    jwt_lifetime: float = 24 * 3600.0
    events_shape: str = "nested"  # or "flat": {"type": ..., **data}
    seed: int = 7  # for the injected 429/5xx answers
    sign_key: str | None = None  # PEM of an RSA private key: callbacks are signed with it
    account_id: str | None = None  # sent as X-Copernica-Id; needed with sign_key
    key_id: str = COPERNICA_KEY_ID  # the signature's keyId (Copernica: a DNS TXT name)
    control: bool = False  # serve the /_sim/ control API (no auth: tests and local use only)


@dataclass
class Delivery:
    """One POST to a `report` address (or the e-mail Copernica would have sent)."""

    copernica_id: str
    url: str
    status: int | None  # None: connection error, or an e-mail report
    bytes: int
    sha256: str
    at: float  # Unix time the attempt ended
    kind: str  # payload | not_available | email


@dataclass
class SimRequest:
    copernica_id: str
    subject_type: str
    subject_id: str
    report: str | None
    created: float  # monotonic clock, like ready_at
    ready_at: float
    status_gets: int = 0
    data_gets: int = 0  # data and old-form GETs, pending or not
    old_gets: int = 0
    open_fetches: int = 0
    max_open_fetches: int = 0
    spec: PayloadSpec | None = None
    size: int | None = None  # of the payload, once its spec is fixed
    sha256: bytes | None = None  # of the payload, once a signed delivery needed it
    woken: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    waiting: asyncio.Task[None] | None = field(default=None, repr=False)  # delivery not yet due

    def ready(self, now: float) -> bool:
        return now >= self.ready_at

    def gone(self, now: float, expire_after: float | None) -> bool:
        return expire_after is not None and now >= self.ready_at + expire_after

    @property
    def subject_key(self) -> str:
        return subject_key(self.subject_type, self.subject_id)


class CopernicaSigner:
    """Signs a webhook call the way Copernica does (its http-signatures-php Signer):
    draft-cavage HTTP Signatures v10, `rsa-sha256` (PKCS#1 v1.5), the signing string being
    the lower-cased names of SIGNED_HEADERS with their trimmed values, `name: value` joined by
    "\\n", `(request-target)` as `post /path?query`. Written here, not taken from the
    service's verifier, so that a bug shared by both sides cannot pass unnoticed."""

    def __init__(self, pem: str) -> None:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("sign_key is not an RSA private key")
        self._key = key

    def headers(self, url: str, sha256: bytes, key_id: str, account_id: str) -> dict[str, str]:
        """The signed headers of one delivery of a body hashing to `sha256`: a new Date and
        nonce each time; a retry of the same delivery must send these again, not new ones."""
        target = URL(url)
        values = {
            "(request-target)": f"post {target.raw_path_qs}",
            # The Host header as sent (set explicitly with the others, so they cannot differ).
            "host": target.raw_authority.rpartition("@")[2],
            "date": email.utils.formatdate(usegmt=True),  # RFC 7231 IMF-fixdate
            # Lower case: Copernica's own verifier (webhook-security) knows no other.
            "digest": "sha-256=" + base64.b64encode(sha256).decode(),
            "x-nonce": secrets.token_hex(16),
            "x-copernica-id": account_id,
        }
        text = "\n".join(f"{name}: {values[name].strip()}" for name in SIGNED_HEADERS)
        signature = self._key.sign(text.encode(), padding.PKCS1v15(), hashes.SHA256())
        sent = {
            "Host": values["host"],
            "Date": values["date"],
            "Digest": values["digest"],
            "X-Nonce": values["x-nonce"],
            "X-Copernica-Id": account_id,
        }
        sent["Signature"] = (
            f'keyId="{key_id}",algorithm="rsa-sha256",headers="{" ".join(SIGNED_HEADERS)}",'
            f'signature="{base64.b64encode(signature).decode()}"'
        )
        return sent


class SimState:
    """Everything the simulator knows, readable by tests in process or over /_sim/state."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.signer: CopernicaSigner | None = None
        if config.sign_key:
            if not config.account_id:
                raise ValueError("a sign key needs an account id (sent as X-Copernica-Id)")
            self.signer = CopernicaSigner(config.sign_key)
        self.reset()

    def reset(self) -> None:
        """Forget requests, deliveries, counters and faults; keep the configuration."""
        self.faults = Faults()
        # Per-request fault overrides, keyed by copernica id or subject key (`profile/7`).
        self.overrides: dict[str, dict[str, Any]] = {}
        self.plans: dict[str, SubjectPlan] = {}  # keyed by subject key
        self.requests: dict[str, SimRequest] = {}
        self.deliveries: list[Delivery] = []
        self.api_calls = 0
        self.max_rps = 0
        self._window: collections.deque[float] = collections.deque()
        self._next_id = self.config.first_id
        self.random = random.Random(self.config.seed)
        self.jwts: dict[str, float] = {}  # issued v4 tokens and when they expire
        self.events: list[dict[str, Any]] = []  # {"event", "data": {id, time, email, ...}}
        self.events_calls: list[tuple[str, str, date, date]] = []
        self.account = Account()
        self.account_calls: collections.Counter[str] = collections.Counter()

    def count_call(self) -> None:
        """One API call; keeps the most calls seen in any one-second window."""
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
        plan = self.plans.get(subject_key(subject_type, subject_id), SubjectPlan())
        ready_after = self.config.ready_after if plan.ready_after is None else plan.ready_after
        request = SimRequest(copernica_id, subject_type, subject_id, report, now, now + ready_after)
        self.requests[copernica_id] = request
        return request

    def faults_for(self, request: SimRequest) -> Faults:
        """The global faults, overridden by those set for the subject, then for the id."""
        return dataclasses.replace(
            self.faults,
            **self.overrides.get(request.subject_key, {}),
            **self.overrides.get(request.copernica_id, {}),
        )

    def payload_spec(self, copernica_id: str) -> PayloadSpec:
        """What the request's payload is made of; fixed at first use, so faults switched
        afterwards do not change bytes a client may already hold."""
        request = self.requests[copernica_id]
        if request.spec is None:
            faults = self.faults_for(request)
            plan = self.plans.get(request.subject_key, SubjectPlan())
            request.spec = PayloadSpec(
                request.subject_type,
                request.subject_id,
                copernica_id,
                plan.payload_size or self.config.payload_size,
                wrong_subject=faults.wrong_subject,
                malformed=faults.malformed_json,
                seed=self.config.payload_seed,
                to=self.account.email_of(request.subject_type, request.subject_id),
            )
        return request.spec

    def payload_size(self, copernica_id: str) -> int:
        """Exact payload length, kept: counting a GiB payload's mailings takes a while."""
        request = self.requests[copernica_id]
        if request.size is None:
            request.size = payload_size(self.payload_spec(copernica_id))
        return request.size

    def payload_bytes(self, copernica_id: str) -> bytes:
        return payload_bytes(self.payload_spec(copernica_id))

    def payload_digest(self, copernica_id: str) -> tuple[int, str]:
        return payload_digest(self.payload_spec(copernica_id))

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        config = dataclasses.asdict(self.config)
        del config["access_token"]
        config["sign_key"] = "***" if self.config.sign_key else None
        config["readiness_forms"] = sorted(self.config.readiness_forms)
        return {
            "config": config,
            "faults": dataclasses.asdict(self.faults),
            "overrides": self.overrides,
            "api_calls": self.api_calls,
            "max_rps": self.max_rps,
            "account": self.account.summary(),
            "account_calls": dict(self.account_calls),
            "requests": {
                cid: {
                    "copernica_id": cid,
                    "subject": r.subject_key,
                    "subject_type": r.subject_type,
                    "subject_id": r.subject_id,
                    "report": r.report,
                    "ready": r.ready(now),
                    "expired": r.gone(now, self.config.expire_after),
                    "ready_in": max(0.0, r.ready_at - now),
                    "status_gets": r.status_gets,
                    "data_gets": r.data_gets,
                    "old_gets": r.old_gets,
                    "max_open_fetches": r.max_open_fetches,
                }
                for cid, r in self.requests.items()
            },
            "deliveries": [dataclasses.asdict(d) for d in self.deliveries],
        }


SIM_STATE = web.AppKey("sim_state", SimState)
_HTTP = web.AppKey("sim_http", aiohttp.ClientSession)
_TASKS = web.AppKey("sim_tasks", set[asyncio.Task[None]])  # deliveries, waiting or under way


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status, headers=headers)


# -- every API call: auth, rate observation, injected faults ---------------------------------


def _authorized(request: web.Request, state: SimState) -> bool:
    """v1-v3: the `access_token` parameter; v4: a bearer JWT from POST /authenticate."""
    if request.match_info.get("version") == "v4":
        given = request.headers.get("Authorization", "").removeprefix("Bearer ")
        issued = state.jwts.get(given)
        return issued is not None and time.monotonic() < issued
    return request.query.get("access_token") == state.config.access_token


@web.middleware
async def _api_calls(request: web.Request, handler: Any) -> web.StreamResponse:
    """Auth, rate observation and injected faults for every API call (not /_sim/)."""
    if request.path.startswith("/_sim/") or request.path == "/authenticate":
        return await handler(request)
    state = request.app[SIM_STATE]
    state.count_call()
    faults = state.faults
    if faults.slow_seconds:
        await asyncio.sleep(faults.slow_seconds)
    account_route = request.match_info.route.name
    if account_route in ACCOUNT_ROUTES:
        state.account_calls[account_route] += 1
    if not _authorized(request, state):
        return _error(401, "Invalid access token")
    if account_route in ACCOUNT_ROUTES and faults.list_errors > 0:
        faults.list_errors -= 1
        return _error(503, "Loadbalancer Error")
    if faults.fail_next > 0:
        faults.fail_next -= 1
        return _error(503, "Service temporarily unavailable")
    if faults.garbage_next > 0:
        faults.garbage_next -= 1
        return web.Response(
            text="<html><body>Gateway says hello</body></html>", content_type="text/html"
        )
    roll = state.random.random()
    if roll < faults.status_429_rate:
        return _error(
            429, "Too many requests", **{"Retry-After": str(state.config.retry_after_seconds)}
        )
    if roll < faults.status_429_rate + faults.status_5xx_rate:
        return _error(503, "Service temporarily unavailable")
    try:
        return await handler(request)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
        return _error(400, "Invalid method")  # how Copernica answers paths it does not serve


# -- create --------------------------------------------------------------------------------


async def _report_of(request: web.Request) -> str | None:
    """`report` as URL parameter (v2/v3) or JSON body field; the body may be absent."""
    report = request.query.get("report")
    if report is None and request.can_read_body:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("report"), str):
            report = body["report"]
    return report or None


def _unknown(kind: str) -> str:
    return (
        "No subprofile with supplied ID" if kind == "subprofile" else "No entity with supplied ID"
    )


def _refusal(kind: str, subject_id: str, state: SimState | None = None) -> str | None:
    """Copernica's message for a subject it will not take, or None. With an account loaded,
    a profile or subprofile must be one of its records, not removed, not switched gone."""
    if kind == "email":
        if state is not None and state.faults.email_invalid_method:
            return "Invalid method"
        return None if _EMAIL.match(subject_id) else "Invalid email address"
    if not (subject_id.isdigit() and int(subject_id) > 0):
        return _unknown(kind)
    if state is None:
        return None
    if f"{kind}:{subject_id}" in state.faults.gone_sources:
        return _unknown(kind)
    if not state.account.loaded:
        return None
    record = state.account.record(kind, subject_id)
    if record is None:
        return _unknown(kind)
    return f"This {kind} has already been removed" if record.removed else None


async def create(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    kind = request.match_info["kind"]
    subject_id = request.match_info["subject"]  # aiohttp has percent-decoded it
    if request.method != "POST":
        return _error(400, "Invalid method")
    refusal = _refusal(kind, subject_id, state)
    if refusal is None and state.faults.reject_create:
        refusal = _refusal(kind, "0")
    if refusal is not None:
        return _error(400, refusal)
    sim_request = state.new_request(kind, subject_id, await _report_of(request))
    _schedule_delivery(request.app, sim_request)
    cid = sim_request.copernica_id
    form = state.config.create_id_header
    if form == "body":
        return web.json_response({"id": cid}, status=201)
    if form == "X-Created":
        return web.Response(status=201, headers={form: cid})
    version = request.match_info["version"]
    return web.Response(
        status=201, headers={form: f"https://api.copernica.com/{version}/datarequest/{cid}"}
    )


# -- readiness: status, data, old form -----------------------------------------------------


def _find(request: web.Request, form: str) -> SimRequest | web.Response:
    state = request.app[SIM_STATE]
    if form not in state.config.readiness_forms:
        return _error(400, "Invalid method")  # this deployment does not know the path
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
        answer, available = "not available", 0
    elif not found.ready(now):
        answer, available = "pending", 0
    else:
        answer, available = "available", state.payload_size(found.copernica_id)
    return web.json_response(
        {"status": answer, "available": available, "content-type": "application/json"}
    )


async def _stream_payload(request: web.Request, found: SimRequest) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    spec = state.payload_spec(found.copernica_id)
    found.open_fetches += 1
    found.max_open_fetches = max(found.max_open_fetches, found.open_fetches)
    try:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = state.payload_size(found.copernica_id)
        await response.prepare(request)
        for chunk in payload_chunks(spec):
            await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        found.open_fetches -= 1


async def data(request: web.Request) -> web.StreamResponse:
    found = _find(request, "data")
    if isinstance(found, web.Response):
        return found
    found.data_gets += 1
    state, now = request.app[SIM_STATE], time.monotonic()
    if found.gone(now, state.config.expire_after):
        return _error(410, "Data expired")
    if not found.ready(now):
        return _error(404, NOT_AVAILABLE)
    return await _stream_payload(request, found)


def _info(found: SimRequest) -> dict[str, Any]:
    subject: str | int = found.subject_id
    if found.subject_type != "email":
        subject = int(found.subject_id)
    return {"type": found.subject_type, "id": subject}


async def old_form(request: web.Request) -> web.StreamResponse:
    found = _find(request, "old")
    if isinstance(found, web.Response):
        return found
    found.data_gets += 1
    found.old_gets += 1
    state, now = request.app[SIM_STATE], time.monotonic()
    if found.gone(now, state.config.expire_after):
        return _error(410, "Data expired")
    if not found.ready(now):
        return web.json_response({"info": _info(found), "data": NOT_AVAILABLE})
    return await _stream_payload(request, found)


# -- delivery to `report` ------------------------------------------------------------------


def _schedule_delivery(app: web.Application, sim_request: SimRequest, forced: bool = False) -> None:
    """Deliver once the request is ready. A forced (re)delivery replaces a task still waiting
    for readiness, so it is not delivered twice; one already sending is left to finish."""
    if not sim_request.report:
        return
    if sim_request.waiting is not None:
        sim_request.waiting.cancel()
    task = asyncio.create_task(_deliver_when_ready(app, sim_request, forced))
    sim_request.waiting = task
    app[_TASKS].add(task)
    task.add_done_callback(app[_TASKS].discard)


async def _deliver_when_ready(app: web.Application, sim_request: SimRequest, forced: bool) -> None:
    state = app[SIM_STATE]
    while not sim_request.ready(now := time.monotonic()):
        sim_request.woken.clear()
        with contextlib.suppress(TimeoutError):  # /_sim/requests/{id}/ready wakes us early
            await asyncio.wait_for(sim_request.woken.wait(), sim_request.ready_at - now)
    if sim_request.waiting is asyncio.current_task():
        sim_request.waiting = None
    faults = state.faults_for(sim_request)
    if faults.lose_callback and not forced:
        return
    report = sim_request.report
    assert report is not None
    if not report.startswith(("http://", "https://")):
        # An e-mail report: Copernica mails the file; we only note what it would have sent.
        spec = state.payload_spec(sim_request.copernica_id)
        size, sha256 = await asyncio.to_thread(payload_digest, spec)
        state.deliveries.append(
            Delivery(sim_request.copernica_id, report, None, size, sha256, time.time(), "email")
        )
        return
    if faults.not_available_callback:
        body = json.dumps({"info": _info(sim_request), "data": NOT_AVAILABLE}).encode()
        digest = hashlib.sha256(body).digest()
        await _post(app, sim_request, lambda: [body], len(body), "not_available", digest)
    spec = state.payload_spec(sim_request.copernica_id)
    size = state.payload_size(sim_request.copernica_id)
    payload_sha256 = await _payload_sha256(sim_request, spec) if state.signer else None

    async def deliver() -> None:
        await _post(app, sim_request, lambda: payload_chunks(spec), size, "payload", payload_sha256)

    copies = 1 + faults.duplicate_callback
    if faults.duplicate_concurrent:
        await asyncio.gather(*(deliver() for _ in range(copies)))
    else:
        for _ in range(copies):
            await deliver()


async def _payload_sha256(sim_request: SimRequest, spec: PayloadSpec) -> bytes:
    """The payload's sha256, for the Digest header a signed delivery sends before its first
    body byte: a first streaming pass over the (deterministic) payload, in a thread, never
    the whole payload in memory; kept for repeated deliveries."""
    if sim_request.sha256 is None:
        _size, hexdigest = await asyncio.to_thread(payload_digest, spec)
        sim_request.sha256 = bytes.fromhex(hexdigest)
    return sim_request.sha256


class _Counted:
    """Chunks on their way out, hashed and counted so the delivery log says what was sent."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = chunks
        self.digest = hashlib.sha256()
        self.sent = 0

    async def stream(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            self.digest.update(chunk)
            self.sent += len(chunk)
            yield chunk


async def _post(
    app: web.Application,
    sim_request: SimRequest,
    body: Callable[[], Iterable[bytes] | Iterator[bytes]],
    size: int,
    kind: str,
    sha256: bytes | None = None,
) -> None:
    """POST one body to `report`; retry a connection error or 5xx, stop at 2xx/4xx. With a
    sign key the delivery is signed once (`sha256` is the body's) and every retry sends the
    same signed headers, nonce included, as Copernica's retries do."""
    state = app[SIM_STATE]
    url = sim_request.report
    assert url is not None
    headers = {"Content-Type": "application/json"}
    if not state.config.delivery_chunked:
        headers["Content-Length"] = str(size)  # aiohttp then sends the stream unchunked
    if state.signer is not None:
        assert sha256 is not None and state.config.account_id is not None
        headers.update(
            state.signer.headers(url, sha256, state.config.key_id, state.config.account_id)
        )
    for attempt in range(1 + state.config.delivery_retries):
        if attempt:
            await asyncio.sleep(state.config.delivery_retry_delay)
        counted = _Counted(body())  # a fresh generator each time: a stream cannot be replayed
        status: int | None
        try:
            async with app[_HTTP].post(url, data=counted.stream(), headers=headers) as answer:
                status = answer.status
        except (aiohttp.ClientError, TimeoutError):
            status = None
        state.deliveries.append(
            Delivery(
                sim_request.copernica_id,
                url,
                status,
                counted.sent,
                counted.digest.hexdigest(),
                time.time(),
                kind,
            )
        )
        if status is not None and status < 500:
            return


# -- v4 authentication ---------------------------------------------------------------------


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


# -- events (REST API v1, GET events) -------------------------------------------------------
# The seed's window rules, implemented on their own here (not through the service's planner):
# start only -> one month from start; end only -> the month before end; both more than a
# month apart -> one month from start, end ignored; neither -> the last month.
SIM_WINDOW_MONTHS = 1


def _months_later(day: date, months: int) -> date:
    """The same day number `months` later (or earlier), or the month's last day if it has
    none: the simulator's own calendar arithmetic, so a bug in the service's is not shared."""
    month0 = day.month - 1 + months
    year, month = day.year + month0 // 12, month0 % 12 + 1
    following = date(year + (month == 12), month % 12 + 1, 1)
    return date(year, month, min(day.day, (following - timedelta(days=1)).day))


def _events_window(start: str | None, end: str | None) -> tuple[date, date]:
    begin = date.fromisoformat(start) if start else None
    stop = date.fromisoformat(end) if end else None
    if begin and stop:
        limit = _months_later(begin, SIM_WINDOW_MONTHS)
        return begin, stop if stop <= limit else limit
    if begin:
        return begin, _months_later(begin, SIM_WINDOW_MONTHS)
    if stop:
        return _months_later(stop, -SIM_WINDOW_MONTHS), stop
    today = datetime.now(UTC).date()
    return _months_later(today, -SIM_WINDOW_MONTHS), today + timedelta(days=1)


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


# -- the account: finding the person -------------------------------------------------------
# Every handler here is an account call: counted per route in `account_calls` and subject to
# `list_errors` (in _api_calls, by route name), besides the faults of every API call.
ACCOUNT_ROUTES = frozenset(
    {
        "databases",
        "database",
        "database_fields",
        "database_collections",
        "collection_fields",
        "profiles",
        "subprofiles",
        "profile",
        "subprofile",
    }
)


def _answer(value: Any) -> web.Response:
    return web.Response(body=php_json(value), content_type="application/json")


def _database(request: web.Request) -> Database:
    found = request.app[SIM_STATE].account.databases.get(request.match_info["id"])
    if found is None:
        raise _Refused("No database with supplied ID")
    return found


def _collection(request: web.Request) -> Collection:
    found = request.app[SIM_STATE].account.collections.get(request.match_info["id"])
    if found is None:
        raise _Refused("No collection with given ID")
    return found


class _Refused(Exception):
    """A 400 `{"error": {"message": ...}}` from an account handler (turned into the answer
    by _account_errors)."""


@web.middleware
async def _account_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except _Refused as refused:
        return _error(400, str(refused))


async def databases(request: web.Request) -> web.Response:
    found = sorted(request.app[SIM_STATE].account.databases.values(), key=lambda d: int(d.id))
    return _answer(Page.of(request.query).wrap(found, Database.json))


async def database(request: web.Request) -> web.Response:
    return _answer(_database(request).json())


async def database_fields(request: web.Request) -> web.Response:
    return _answer(Page.of(request.query).wrap(_database(request).fields, lambda f: f.json()))


async def database_collections(request: web.Request) -> web.Response:
    return _answer(Page.of(request.query).wrap(_database(request).collections, Collection.json))


async def collection_fields(request: web.Request) -> web.Response:
    return _answer(Page.of(request.query).wrap(_collection(request).fields, lambda f: f.json()))


def _dataonly(request: web.Request) -> bool:
    return request.query.get("dataonly", "").casefold() in ("true", "yes", "1")


async def profiles(request: web.Request) -> web.Response:
    """`fields[]` applied as the live API does; a database in `ignore_filter_databases`
    ignores it (every live profile comes back)."""
    state, found = request.app[SIM_STATE], _database(request)
    texts = filter_texts(request.query.items())
    if found.id in state.faults.ignore_filter_databases:
        texts = []
    records = query_records(state.account.members("profile", found.id), texts, found.fields)
    dataonly = _dataonly(request)
    render: Callable[[Record], Any] = lambda r: r.profile_json(dataonly)  # noqa: E731
    return _answer(Page.of(request.query).wrap(records, render))


async def subprofiles(request: web.Request) -> web.Response:
    state, found = request.app[SIM_STATE], _collection(request)
    texts = filter_texts(request.query.items())
    records = query_records(state.account.members("subprofile", found.id), texts, found.fields)
    dataonly = _dataonly(request)
    render: Callable[[Record], Any] = lambda r: r.subprofile_json(dataonly)  # noqa: E731
    return _answer(Page.of(request.query).wrap(records, render))


def _record(request: web.Request, kind: str) -> Record:
    state, rid = request.app[SIM_STATE], request.match_info["id"]
    if f"{kind}:{rid}" in state.faults.gone_sources or not (rid.isdigit() and int(rid) > 0):
        raise _Refused(_unknown(kind))
    if not state.account.loaded:
        # No account loaded: every positive id is a record, as the data requests take any
        # (the suites that file profiles without an account keep working).
        return Record(rid, "1", (("Email", f"{kind}-{rid}@example.com"),), "0" * 32,
                      "2026-01-01 00:00:00", "2026-01-01 00:00:00", None, profile="1")  # fmt: skip
    found = state.account.record(kind, rid)
    if found is None:
        raise _Refused(_unknown(kind))
    return found


async def profile(request: web.Request) -> web.Response:
    return _answer(_record(request, "profile").profile_json())


async def subprofile(request: web.Request) -> web.Response:
    return _answer(_record(request, "subprofile").subprofile_json())


def _setup_account(app: web.Application, version: str) -> None:
    """The account's routes, each named as `account_calls` counts it."""
    routes = {
        "/databases": databases,
        "/database/{id}": database,
        "/database/{id}/fields": database_fields,
        "/database/{id}/collections": database_collections,
        "/collection/{id}/fields": collection_fields,
        "/database/{id}/profiles": profiles,
        "/collection/{id}/subprofiles": subprofiles,
        "/profile/{id}": profile,
        "/subprofile/{id}": subprofile,
    }
    for path, handler in routes.items():
        app.router.add_get(version + path, handler, name=handler.__name__)


# -- control API (/_sim/, no auth) ---------------------------------------------------------


def _checked(changes: Any, current: object, allowed: Iterable[str]) -> dict[str, Any]:
    """The changes, validated against the current values' types; ValueError names the
    first bad one."""
    if not isinstance(changes, dict):
        raise ValueError("expected a JSON object")
    allowed = set(allowed)
    unknown = set(changes) - allowed
    if unknown:
        raise ValueError(f"unknown fields: {sorted(unknown)}")
    checked: dict[str, Any] = {}
    for name, value in changes.items():
        old = getattr(current, name)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if isinstance(old, bool):
            ok = isinstance(value, bool)
        elif isinstance(old, int) and name != "expire_after":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(old, float) or name == "expire_after":
            ok = number or (value is None and name == "expire_after")
            value = float(value) if number else value
        elif isinstance(old, set):
            ok = isinstance(value, list) and set(value) <= READINESS_FORMS
            value = set(value) if ok else value
        elif isinstance(old, list):
            ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
        else:
            ok = isinstance(value, str)
        if name == "create_id_header":
            ok = value in CREATE_ID_FORMS
        if not ok:
            raise ValueError(f"bad value for {name}: {value!r}")
        checked[name] = value
    return checked


async def sim_state(request: web.Request) -> web.Response:
    return web.json_response(request.app[SIM_STATE].snapshot())


async def sim_faults(request: web.Request) -> web.Response:
    """A partial Faults object, merged; with `copernica_id` or `subject` (`profile/7`,
    `email/ann@x.test`) it applies to that request or subject only."""
    state = request.app[SIM_STATE]
    try:
        changes = await request.json()
        if not isinstance(changes, dict):
            raise ValueError("expected a JSON object")
        target = changes.pop("copernica_id", None) or changes.pop("subject", None)
        if target is None:
            checked = _checked(changes, state.faults, (f.name for f in dataclasses.fields(Faults)))
            for name, value in checked.items():
                setattr(state.faults, name, value)
            return web.json_response(dataclasses.asdict(state.faults))
        checked = _checked(changes, state.faults, REQUEST_FAULTS)
    except ValueError as exc:
        return web.json_response({"error": {"message": str(exc)}}, status=400)
    key = str(target)
    if key.startswith("email/"):
        key = key.casefold()
    state.overrides.setdefault(key, {}).update(checked)
    return web.json_response(state.overrides[key])


async def sim_config(request: web.Request) -> web.Response:
    """A partial SimulatorConfig (ready_after, expire_after, payload_size, ...), merged."""
    state = request.app[SIM_STATE]
    names = {f.name for f in dataclasses.fields(SimulatorConfig)} - {
        "access_token",
        "seed",
        "sign_key",
    }
    try:
        checked = _checked(await request.json(), state.config, names)
    except ValueError as exc:
        return web.json_response({"error": {"message": str(exc)}}, status=400)
    for name, value in checked.items():
        setattr(state.config, name, value)
    return web.json_response(state.snapshot()["config"])


async def sim_reset(request: web.Request) -> web.Response:
    for task in request.app[_TASKS]:
        task.cancel()
    request.app[SIM_STATE].reset()
    return web.json_response({"status": "reset"})


async def sim_account(request: web.Request) -> web.Response:
    """Replace the account (the JSON of this module's docstring); 400 says what is wrong."""
    try:
        account = Account.from_json(await request.json())
    except ValueError as exc:  # not JSON, or AccountError
        return _error(400, f"account: {exc}" if not isinstance(exc, AccountError) else str(exc))
    request.app[SIM_STATE].account = account
    return web.json_response({"account": account.summary()})


def _sim_request(request: web.Request) -> SimRequest:
    found = request.app[SIM_STATE].requests.get(request.match_info["id"])
    if found is None:
        raise web.HTTPNotFound()
    return found


async def sim_ready(request: web.Request) -> web.Response:
    found = _sim_request(request)
    found.ready_at = min(found.ready_at, time.monotonic())
    found.woken.set()
    return web.json_response({"status": "ready"})


async def sim_deliver(request: web.Request) -> web.Response:
    """Make the request ready and deliver it now, even when `lose_callback` is on."""
    found = _sim_request(request)
    if not found.report:
        return web.json_response({"error": {"message": "no report address"}}, status=409)
    found.ready_at = min(found.ready_at, time.monotonic())
    _schedule_delivery(request.app, found, forced=True)
    return web.json_response({"status": "delivering"})


# -- the application -----------------------------------------------------------------------


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    """The delivery client and the delivery tasks: made here, cancelled and closed here."""
    tasks: set[asyncio.Task[None]] = set()
    app[_TASKS] = tasks
    # No total timeout: a payload can be hundreds of MB; a stalled receiver still times out.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        app[_HTTP] = http
        yield
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def create_simulator_app(config: SimulatorConfig | None = None) -> web.Application:
    # Room for a large account posted to /_sim/account.
    app = web.Application(middlewares=[_api_calls, _account_errors], client_max_size=256 * 2**20)
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
    _setup_account(app, version)
    if app[SIM_STATE].config.control:
        _setup_control(app)
    return app


def _setup_control(app: web.Application) -> None:
    app.router.add_get("/_sim/state", sim_state)
    app.router.add_post("/_sim/faults", sim_faults)
    app.router.add_post("/_sim/config", sim_config)
    app.router.add_post("/_sim/reset", sim_reset)
    app.router.add_post("/_sim/account", sim_account)
    app.router.add_post("/_sim/requests/{id}/ready", sim_ready)
    app.router.add_post("/_sim/requests/{id}/deliver", sim_deliver)


def _account_from(path: str) -> Account:
    try:
        return Account.from_json(json.loads(Path(path).read_text()))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"simulate: cannot load the account {path}: {exc}") from None


def run_simulator(
    host: str,
    port: int,
    access_token: str,
    sign_key_file: str | None = None,
    account_file: str | None = None,
    **config: Any,
) -> None:
    """`python -m service simulate`: serve the fake until interrupted. With `sign_key_file`
    (a PEM RSA private key) its callbacks are signed as Copernica signs them; with
    `account_file` (JSON, see the module docstring) it holds that account."""
    account = _account_from(account_file) if account_file is not None else None
    try:
        if sign_key_file is not None:
            config["sign_key"] = Path(sign_key_file).read_text()
        app = create_simulator_app(SimulatorConfig(access_token=access_token, **config))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"simulate: cannot sign callbacks: {exc}") from None
    if account is not None:
        app[SIM_STATE].account = account
        counts = ", ".join(f"{n} {name}" for name, n in account.summary().items())
        print(f"Copernica simulator account: {counts}", flush=True)
    settings = app[SIM_STATE].config
    signing = (
        f", callbacks signed (keyId {settings.key_id}, X-Copernica-Id {settings.account_id})"
        if settings.sign_key
        else ""
    )
    control = " (state: /_sim/state)" if settings.control else ""
    print(f"Copernica simulator on http://{host}:{port}/v2{control}{signing}", flush=True)
    web.run_app(app, host=host, port=port, print=None)
