"""The stack the docs' pictures are taken of: the real service, a local S3 (moto's server, in
its own process) and the Copernica simulator, all on free local ports and gone afterwards.

Used by render_console.py and render_report.py (run them from the repository root; they need
chromium: `make browser`). `run(account, render)` loads `account` (the JSON POST /_sim/account
takes) into the simulator, gives the simulator events for MAIN_SUBJECT over the last
EVENT_DAYS days, starts the service with discovery on (DISCOVERY_FIELDS =
SAMPLE_TEXT_FIELD), and awaits `render(stack)` with the running stack.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from aiobotocore.session import get_session
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for service and tests

from service.app import create_app, create_public_app  # noqa: E402
from service.config import Settings  # noqa: E402
from service.logs import configure_logging  # noqa: E402
from service.simulator.account import (  # noqa: E402
    SAMPLE_TEXT_FIELD,
    Account,
    sample_account,
)
from service.simulator.app import (  # noqa: E402
    SIM_STATE,
    SimState,
    SimulatorConfig,
    create_simulator_app,
)
from service.simulator.payloads import make_events  # noqa: E402
from tests.conftest import free_port, wait_for_port  # noqa: E402

API_TOKEN = "docs-screenshots"  # noqa: S105 - a throwaway stack: made-up secrets
BUCKET = "copernica-archive"
CONTROLLER = "Koffiebranderij Zoë B.V."
TODAY = datetime.now(UTC).date()
MAIN_SUBJECT = "ann.de.vries@example.com"
EVENT_DAYS = 120  # the simulator's events for MAIN_SUBJECT, and what her request asks for


def person_account() -> dict[str, Any]:
    """The simulator's sample account with MAIN_SUBJECT in Newsletter (profile 101, by its
    e-mail field), Shop (profile 201, by SAMPLE_TEXT_FIELD) and Shop's Orders (subprofile
    2101), her name in her profiles and a date on her order."""
    document = sample_account(MAIN_SUBJECT)
    names = {"101": "Ann de Vries", "201": "A. de Vries"}
    for profile in document["profiles"]:
        if profile["id"] in names:
            profile["fields"]["Name"] = names[profile["id"]]
    order = next(s for s in document["subprofiles"] if s["id"] == "2101")
    order["created"] = "2025-10-14 20:31:05"
    return document


@dataclass
class Stack:
    """The running stack: the service's operator port (`base`, with an authorised `http`
    session) and the simulator's state (its faults and config may be changed between
    filings)."""

    base: str
    http: aiohttp.ClientSession
    simulator: SimState

    async def file(self, body: dict[str, Any]) -> str:
        """The id of a request filed through the operator API with `body`."""
        async with self.http.post(f"{self.base}/v1/data-requests", json=body) as answer:
            assert answer.status == 202, await answer.text()
            return str((await answer.json())["id"])

    async def file_main(self, days_ago: int) -> str:
        """MAIN_SUBJECT's request, received `days_ago` days ago, with her events."""
        since = TODAY - timedelta(days=EVENT_DAYS)
        return await self.file(
            {
                "email": MAIN_SUBJECT,
                "received_on": (TODAY - timedelta(days=days_ago)).isoformat(),
                "events": {"since": since.isoformat()},
            }
        )

    async def show(self, request_id: str) -> dict[str, Any]:
        async with self.http.get(f"{self.base}/v1/data-requests/{request_id}") as answer:
            assert answer.status == 200, await answer.text()
            return dict(await answer.json())

    async def packaged(self, request_id: str) -> dict[str, Any]:
        """The request once its access package is built (within a minute)."""

        async def probe() -> dict[str, Any] | None:
            shown = await self.show(request_id)
            return shown if shown.get("package") is not None else None

        return dict(await until(probe, f"the package of {request_id}"))

    async def package(self, request_id: str) -> bytes:
        """The access package's bytes, as `download` gets them."""
        url = f"{self.base}/v1/data-requests/{request_id}/package"
        async with self.http.get(url) as answer:
            assert answer.status == 200, await answer.text()
            return await answer.read()


async def until(probe: Callable[[], Awaitable[Any]], what: str) -> Any:
    """What `probe` returns once it is truthy; within a minute."""
    for _ in range(300):
        if value := await probe():
            return value
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{what}: not reached in a minute")


def run(account: dict[str, Any], render: Callable[[Stack], Awaitable[None]]) -> None:
    """Starts the stack over `account`, awaits `render(stack)`, stops it all."""
    s3_port = free_port()
    moto = subprocess.Popen(  # noqa: S603 - this interpreter, fixed arguments
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(s3_port)
        asyncio.run(_render(f"http://127.0.0.1:{s3_port}", account, render))
    finally:
        moto.terminate()
        moto.wait(10)


async def _render(
    s3_url: str, account: dict[str, Any], render: Callable[[Stack], Awaitable[None]]
) -> None:
    async with _stack(s3_url, account) as stack:
        await render(stack)


@asynccontextmanager
async def _stack(s3_url: str, account: dict[str, Any]) -> AsyncIterator[Stack]:
    sim_port, port, admin_port = (free_port() for _ in range(3))
    for name, value in (("AWS_ACCESS_KEY_ID", "local"), ("AWS_SECRET_ACCESS_KEY", "local")):
        os.environ.setdefault(name, value)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    async with get_session().create_client("s3", endpoint_url=s3_url) as s3:
        await s3.create_bucket(Bucket=BUCKET)

    simulator = create_simulator_app(
        SimulatorConfig(access_token="sim", ready_after=0.3, payload_size=40_000)  # noqa: S106
    )
    state = simulator[SIM_STATE]
    state.events = make_events(
        TODAY - timedelta(days=EVENT_DAYS), TODAY, per_day=2, email=MAIN_SUBJECT
    )
    state.account = Account.from_json(account)
    settings = Settings.from_env(
        {
            "COPERNICA_ACCESS_TOKEN": "sim",
            "COPERNICA_API_URL": f"http://127.0.0.1:{sim_port}/v2",
            "CALLBACK_SECRET": "docs-screenshots-callbacks",
            "API_TOKEN": API_TOKEN,
            "ARCHIVE_BUCKET": BUCKET,
            "S3_ENDPOINT_URL": s3_url,
            "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
            "ADMIN_PORT": str(admin_port),
            "POLL_INTERVAL_SECONDS": "0.2",
            "DISCOVERY_FIELDS": SAMPLE_TEXT_FIELD,
            "REPORT_CONTROLLER_NAME": CONTROLLER,
            "LOG_LEVEL": "error",
            "LOG_FORMAT": "console",
        },
        dotenv=None,
    )
    configure_logging(settings)
    admin = create_app(settings)
    runners: list[web.AppRunner] = []
    try:
        for app, app_port in ((simulator, sim_port), (admin, admin_port)):
            runners.append(await _start(app, app_port))
        runners.append(await _start(create_public_app(admin), port))
        auth = {"Authorization": f"Bearer {API_TOKEN}"}
        async with aiohttp.ClientSession(headers=auth) as http:
            yield Stack(f"http://127.0.0.1:{admin_port}", http, state)
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


async def _start(app: web.Application, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner
