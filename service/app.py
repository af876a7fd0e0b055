"""The application factory: `create_app(settings)` wires clients, routes and background work."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import structlog
from aiohttp import web

from service.answer.package import PackageBuilder
from service.answer.retention import Retention
from service.answer.statement import Statement, load_statement
from service.clock import Clock
from service.collect.discovery import Discoverer
from service.collect.filing import Filing
from service.collect.housekeeping import Housekeeping, count_s3_calls
from service.collect.visits import Poller
from service.collect.work import RequestWork
from service.config import Settings
from service.copernica.account import Account
from service.copernica.client import CopernicaClient
from service.intake.body import Intake
from service.intake.callback import CallbackReceiver, CallbackView
from service.intake.signatures import KeyStore, SignatureVerifier
from service.intake.urls import ROUTE, ROUTE_BY_ID
from service.metrics import Metrics
from service.requests.deadline_index import DeadlineIndex
from service.requests.ledger import Ledger
from service.requests.migrations import Migrations
from service.requests.schedule import Schedule
from service.storage.proof import prove_store
from service.storage.s3 import ArchiveStore, s3_client
from service.web.api import ROUTE_ID, Health, OperatorApi
from service.web.console.routes import CONSOLE, Console, setup_console
from service.web.middlewares import api_errors, bearer_middleware, console_errors

log = structlog.get_logger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class InFlight:
    """Counts requests being handled, so shutdown can wait for them before closing
    connections (aiohttp's own shutdown stops reading request bodies at once, which would
    cut an upload in progress)."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.count += 1
        self._idle.clear()
        try:
            return await handler(request)
        finally:
            self.count -= 1
            if self.count == 0:
                self._idle.set()

    async def wait_idle(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), seconds)
        except TimeoutError:
            return False
        return True


class Shutdown:
    """When a shutdown began and by when everything must have stopped."""

    def __init__(self, settings: Settings) -> None:
        self._budget = settings.shutdown_drain_seconds + settings.shutdown_grace_seconds
        self.deadline: float | None = None

    def begin(self) -> None:
        if self.deadline is None:
            self.deadline = asyncio.get_running_loop().time() + self._budget


SETTINGS = web.AppKey("settings", Settings)
CLOCK = web.AppKey("clock", Clock)
METRICS = web.AppKey("metrics", Metrics)
HEALTH = web.AppKey("health", Health)
STORE = web.AppKey("store", ArchiveStore)
LEDGER = web.AppKey("ledger", Ledger)
COPERNICA = web.AppKey("copernica", CopernicaClient)
CALLBACKS = web.AppKey("callbacks", CallbackView)
OPERATOR = web.AppKey("operator", OperatorApi)
IN_FLIGHT = web.AppKey("in_flight", InFlight)
POLLER = web.AppKey("poller", Poller)
WORK = web.AppKey("work", RequestWork)
HOUSEKEEPING = web.AppKey("housekeeping", Housekeeping)
SHUTDOWN = web.AppKey("shutdown", Shutdown)
STATEMENT = web.AppKey("statement", Statement)

# Operator requests are small JSON documents; callbacks stream and are bounded separately.
OPERATOR_MAX_BODY = 64 * 1024


def hash_key(settings: Settings) -> bytes:
    """Key for the keyed hashes of subjects in logs, derived from the shared callback secret."""
    assert settings.callback_secret is not None
    return hmac.new(
        settings.callback_secret.reveal().encode(), b"subject-hash", hashlib.sha256
    ).digest()


async def _clients(app: web.Application) -> AsyncIterator[None]:
    """S3 and Copernica clients, and the domain objects built on them: one of each per app."""
    settings, metrics, clock = app[SETTINGS], app[METRICS], app[CLOCK]
    key = hash_key(settings)
    async with s3_client(settings) as s3, aiohttp.ClientSession() as http:
        store = ArchiveStore(s3, settings, metrics)
        count_s3_calls(s3, metrics)  # housekeeping's share of S3 calls, on /metrics
        await prove_store(store, clock)  # UnsafeStore: the process does not start
        ledger = Ledger(store, key, clock=clock)
        schedule = Schedule(store, clock)
        deadlines = DeadlineIndex(store, ledger, clock)
        copernica = CopernicaClient(http, settings, metrics)
        app[STORE], app[LEDGER], app[COPERNICA] = store, ledger, copernica
        app[HEALTH] = Health(store, metrics)
        intake = Intake(store, ledger, settings)
        verifier = SignatureVerifier(
            settings.signature_mode,
            settings.copernica_account_id,
            KeyStore(settings.signature_public_key_file, settings.signature_dns_server),
            settings.signature_max_skew_seconds,
        )
        app[CALLBACKS] = CallbackView(CallbackReceiver(intake, ledger), verifier, settings, metrics)
        discoverer = Discoverer(Account(copernica), store, settings, ledger.digest_of)
        filing = Filing(
            store, ledger, schedule, deadlines, copernica, discoverer, settings, metrics, key, clock
        )
        app[OPERATOR] = OperatorApi(filing, ledger, schedule, deadlines, store, settings, metrics)
        app[CONSOLE] = Console(app[OPERATOR], filing, ledger, deadlines, store, settings, metrics)
        retention = Retention(
            store, ledger, deadlines, settings.retention_days, metrics, key, clock
        )
        migrations = Migrations(store, ledger, deadlines, schedule, clock)
        work = _work(app, http, store, ledger, copernica, intake, filing, discoverer)
        app[WORK] = work
        app[POLLER] = Poller(ledger, schedule, work.do, settings, metrics, key, clock)
        app[HOUSEKEEPING] = Housekeeping(
            store, schedule, deadlines, migrations, retention, settings, metrics, clock
        )
        yield
        await store.close()


def _work(
    app: web.Application,
    http: aiohttp.ClientSession,
    store: ArchiveStore,
    ledger: Ledger,
    copernica: CopernicaClient,
    intake: Intake,
    filing: Filing,
    discoverer: Discoverer,
) -> RequestWork:
    """What a visit of the poller does, on the clients it needs."""
    settings, metrics, clock = app[SETTINGS], app[METRICS], app[CLOCK]
    # Events live in API v1 only; the same rate limit covers both clients.
    events = CopernicaClient(
        http, settings, metrics, limiter=copernica.limiter, base_url=settings.copernica_events_url
    )
    packages = PackageBuilder(
        store,
        settings.report_controller_name,
        hash_key=hash_key(settings),
        statement=app[STATEMENT],
    )
    return RequestWork(
        store, ledger, copernica, events, intake, filing, discoverer, packages, settings, metrics,
        clock,
    )  # fmt: skip


async def _polling(app: web.Application) -> AsyncIterator[None]:
    """The fallback loop runs in every replica for the life of the app. At shutdown its
    visits in progress may finish until the shutdown deadline (drain + grace after the
    signal); whatever still runs then (a poll waiting on a Copernica that never answers, an
    upload, a package build) is cancelled: its lease simply runs out, nothing is lost."""
    poller = app[POLLER]
    task = asyncio.create_task(poller.run(), name="poller")
    yield
    poller.stop()
    if not await _finished_by_deadline(app, task):
        log.warning("poller_cancelled", reason="shutdown deadline (drain + grace) reached")
        await _cancel(task)


async def _housekeeping(app: web.Application) -> AsyncIterator[None]:
    """Janitor, census, backfill and retention's sweep: a task of their own beside the
    poller, run while this replica holds the housekeeping lease, stopped with the poller (the
    round in progress may finish until the shutdown deadline, then it is cancelled: a round
    is only ever repeated, nothing is lost). A stopped task has released the lease; a
    cancelled one releases it here, so the next replica need not wait it out."""
    housekeeping = app[HOUSEKEEPING]
    task = asyncio.create_task(housekeeping.run(), name="housekeeping")
    yield
    housekeeping.stop()
    if not await _finished_by_deadline(app, task):
        log.warning("housekeeping_cancelled", reason="shutdown deadline (drain + grace) reached")
        await _cancel(task)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(housekeeping.release(), app[SETTINGS].s3_timeout_seconds)


async def _finished_by_deadline(app: web.Application, task: asyncio.Task[None]) -> bool:
    """Wait for a stopping background task, at most until the shutdown deadline."""
    deadline = app[SHUTDOWN].deadline or asyncio.get_running_loop().time()
    try:
        await asyncio.wait_for(
            asyncio.shield(task), max(0.0, deadline - asyncio.get_running_loop().time())
        )
    except TimeoutError:
        return False
    return True


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _drain(app: web.Application) -> None:
    """First step of shutdown: the load balancer must stop sending us new work, and the
    poller takes no new item (the one in progress finishes and releases its lease), nor
    housekeeping a new round."""
    app[SHUTDOWN].begin()
    app[HEALTH].draining = True
    app[METRICS].draining.set(1)
    app[POLLER].stop()
    app[HOUSEKEEPING].stop()


def _route(
    app: web.Application,
    key: web.AppKey[T],
    method: Callable[[T, web.Request], Awaitable[R]],
) -> Callable[[web.Request], Awaitable[R]]:
    """The handler that calls `method` (e.g. `OperatorApi.create`) on the object under
    `app[key]`: those objects are made by `_clients` at start-up, after the routes are
    registered."""

    async def handler(request: web.Request) -> R:
        return await method(app[key], request)

    return handler


def create_app(settings: Settings) -> web.Application:
    """The operator application (ADMIN_PORT): `/v1/*`, `/metrics`, health. It owns the
    clients and the poller; `create_public_app` serves callbacks from the same objects."""
    assert settings.api_token is not None, "API_TOKEN is required"
    in_flight = InFlight()
    app = web.Application(
        client_max_size=OPERATOR_MAX_BODY,
        middlewares=[
            in_flight.middleware,
            bearer_middleware(settings.api_token),
            api_errors,  # /v1: errors as JSON
            console_errors,  # /ui: errors as the console's page
        ],
    )
    app[SETTINGS] = settings
    app[CLOCK] = Clock()  # the one clock of every component; a test may set another first
    app[IN_FLIGHT] = in_flight
    app[METRICS] = Metrics()
    app[SHUTDOWN] = Shutdown(settings)
    # The article-15 texts, read once; an incomplete file stops start-up (ConfigError).
    app[STATEMENT] = load_statement(settings.controller_statement)
    app.cleanup_ctx.append(_clients)
    app.cleanup_ctx.append(_polling)
    app.cleanup_ctx.append(_housekeeping)
    app.on_shutdown.append(_drain)
    setup_admin_routes(app)
    return app


def create_public_app(admin: web.Application) -> web.Application:
    """The public application (PORT, behind the load balancer): callbacks and health only;
    anything else is 404, so the operator surface never faces the internet."""
    public = web.Application(
        client_max_size=OPERATOR_MAX_BODY, middlewares=[admin[IN_FLIGHT].middleware]
    )
    setup_public_routes(public, admin)
    return public


def setup_admin_routes(app: web.Application) -> None:
    app.router.add_post("/v1/data-requests", _route(app, OPERATOR, OperatorApi.create))
    app.router.add_get("/v1/data-requests", _route(app, OPERATOR, OperatorApi.list))
    one = f"/v1/data-requests/{ROUTE_ID}"  # a malformed id is the router's 404
    app.router.add_get(one, _route(app, OPERATOR, OperatorApi.show))
    app.router.add_post(f"{one}/extend", _route(app, OPERATOR, OperatorApi.extend))
    app.router.add_post(f"{one}/discovery", _route(app, OPERATOR, OperatorApi.discovery))
    app.router.add_get(f"{one}/package", _route(app, OPERATOR, OperatorApi.package))
    app.router.add_post(f"{one}/package/link", _route(app, OPERATOR, OperatorApi.package_link))
    app.router.add_get("/healthz", _route(app, HEALTH, Health.healthz))
    app.router.add_get("/readyz", _route(app, HEALTH, Health.readyz))
    app.router.add_get("/metrics", _route(app, HEALTH, Health.metrics))
    setup_console(app)


def setup_public_routes(public: web.Application, admin: web.Application) -> None:
    public.router.add_post(
        ROUTE_BY_ID,
        _route(admin, CALLBACKS, CallbackView.handle),
        expect_handler=_route(admin, CALLBACKS, CallbackView.expect),
    )
    public.router.add_post(
        ROUTE,
        _route(admin, CALLBACKS, CallbackView.handle),
        expect_handler=_route(admin, CALLBACKS, CallbackView.expect),
    )
    public.router.add_get("/healthz", _route(admin, HEALTH, Health.healthz))
    public.router.add_get("/readyz", _route(admin, HEALTH, Health.readyz))


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then shut down without losing an in-flight callback.

    Two listeners: PORT (public: callbacks, health) and ADMIN_PORT (operator API, metrics,
    health). On a signal:
    1. `/readyz` answers 503 at once and the poller takes no new item (its current visit
       finishes and releases its lease); requests are still served, so a load balancer that
       has not yet noticed loses nothing;
    2. after `SHUTDOWN_DRAIN_SECONDS` the listeners close;
    3. in-flight requests get up to `SHUTDOWN_GRACE_SECONDS` to finish (an upload completes
       or is aborted), then clients close and the process exits 0.
    """
    admin = create_app(settings)
    public = create_public_app(admin)
    # The grace period is waited for below (in-flight requests, then the poller); what
    # still runs after it is cancelled at once by the runners' cleanup.
    runners = [
        web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
        for app in (admin, public)
    ]
    for runner in runners:
        await runner.setup()
    sites = [
        web.TCPSite(runners[1], settings.host, settings.port, reuse_address=True),
        web.TCPSite(runners[0], settings.admin_host, settings.admin_port, reuse_address=True),
    ]
    stop = asyncio.Event()
    try:
        for site in sites:
            await site.start()
        log.info(
            "serving",
            host=settings.host,
            port=settings.port,
            admin_host=settings.admin_host,
            admin_port=settings.admin_port,
        )
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info(
            "draining",
            drain_s=settings.shutdown_drain_seconds,
            grace_s=settings.shutdown_grace_seconds,
        )
        await _drain(admin)
        await asyncio.sleep(settings.shutdown_drain_seconds)
        for site in sites:
            await site.stop()  # no new connections; open ones keep streaming their bodies
        if not await admin[IN_FLIGHT].wait_idle(settings.shutdown_grace_seconds):
            log.warning("grace_period_over", in_flight=admin[IN_FLIGHT].count)
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
        log.info("stopped")
