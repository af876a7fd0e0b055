"""The application factory: `create_app(settings)` wires clients, routes and background work."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from .api import Health, OperatorApi, bearer_middleware
from .archive import ArchiveStore, s3_client
from .callbacks import ROUTE, CallbackReceiver, CallbackView
from .config import Settings
from .copernica import CopernicaClient
from .filing import Filing
from .intake import Intake
from .ledger import Ledger
from .metrics import Metrics
from .poller import Poller

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
HEALTH = web.AppKey("health", Health)
STORE = web.AppKey("store", ArchiveStore)
LEDGER = web.AppKey("ledger", Ledger)
COPERNICA = web.AppKey("copernica", CopernicaClient)
CALLBACKS = web.AppKey("callbacks", CallbackView)
OPERATOR = web.AppKey("operator", OperatorApi)
POLLER = web.AppKey("poller", Poller)

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
    settings, metrics = app[SETTINGS], app[METRICS]
    key = hash_key(settings)
    async with s3_client(settings) as s3, aiohttp.ClientSession() as http:
        store = ArchiveStore(s3, settings, metrics)
        ledger = Ledger(store)
        copernica = CopernicaClient(http, settings, metrics)
        app[STORE], app[LEDGER], app[COPERNICA] = store, ledger, copernica
        app[HEALTH] = Health(store, metrics)
        intake = Intake(store, ledger, settings)
        app[CALLBACKS] = CallbackView(CallbackReceiver(intake, ledger), settings, metrics, key)
        filing = Filing(store, ledger, copernica, settings, metrics, key)
        app[OPERATOR] = OperatorApi(filing, ledger, store)
        # Events live in API v1 only; the same rate limit covers both clients.
        events = CopernicaClient(
            http,
            settings,
            metrics,
            limiter=copernica.limiter,
            base_url=settings.copernica_events_url,
        )
        app[POLLER] = Poller(
            store, ledger, copernica, events, intake, filing, settings, metrics, key
        )
        yield
        await store.close()


async def _polling(app: web.Application) -> AsyncIterator[None]:
    """The fallback loop runs in every replica for the life of the app."""
    poller = app[POLLER]
    task = asyncio.create_task(poller.run(), name="poller")
    yield
    poller.stop()
    await task


async def _drain(app: web.Application) -> None:
    """First step of shutdown: the load balancer must stop sending us new work, and the
    poller takes no new item (the one in progress finishes and releases its lease)."""
    app[HEALTH].draining = True
    app[METRICS].draining.set(1)
    app[POLLER].stop()


# Thin route functions: the objects behind them exist once `_clients` has run.
async def _callback(request: web.Request) -> web.StreamResponse:
    return await request.app[CALLBACKS].handle(request)


async def _callback_expect(request: web.Request) -> web.StreamResponse | None:
    return await request.app[CALLBACKS].expect(request)


async def _create(request: web.Request) -> web.StreamResponse:
    return await request.app[OPERATOR].create(request)


async def _show(request: web.Request) -> web.StreamResponse:
    return await request.app[OPERATOR].show(request)


async def _list(request: web.Request) -> web.StreamResponse:
    return await request.app[OPERATOR].list(request)


async def _healthz(request: web.Request) -> web.StreamResponse:
    return await request.app[HEALTH].healthz(request)


async def _readyz(request: web.Request) -> web.StreamResponse:
    return await request.app[HEALTH].readyz(request)


async def _metrics(request: web.Request) -> web.StreamResponse:
    return await request.app[HEALTH].metrics(request)


def create_app(settings: Settings) -> web.Application:
    assert settings.api_token is not None, "API_TOKEN is required"
    app = web.Application(
        client_max_size=OPERATOR_MAX_BODY, middlewares=[bearer_middleware(settings.api_token)]
    )
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app.cleanup_ctx.append(_clients)
    app.cleanup_ctx.append(_polling)
    app.on_shutdown.append(_drain)
    app.router.add_post(ROUTE, _callback, expect_handler=_callback_expect)
    app.router.add_post("/v1/data-requests", _create)
    app.router.add_get("/v1/data-requests", _list)
    app.router.add_get("/v1/data-requests/{id}", _show)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app
