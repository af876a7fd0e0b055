"""Renders docs/console-requests.png, docs/console-request.png and docs/console-file.png: the
operator console's three pages, as a real chromium shows them, over the real service, a local
S3 (moto's server) and the Copernica simulator.

Run from the repository root: `.venv/bin/python docs/render_console.py` (needs chromium:
`make browser`). The simulator holds an account where the main subject is found in three
places (a profile by its e-mail field, one by a DISCOVERY_FIELDS text field, a subprofile),
so her request's page shows four sources. It files a dozen requests through the operator API
(some received weeks ago, so they are overdue; one refused by the simulator; some still
waiting), waits for the main one to be packaged, extends its deadline, and takes the pictures
at 1280 pixels wide. Dates are relative to the day it runs; everything else is the same each
time.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from aiobotocore.session import get_session
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests.browser

from service.app import create_app, create_public_app  # noqa: E402
from service.config import Settings  # noqa: E402
from service.logs import configure_logging  # noqa: E402
from service.simulator.account import (  # noqa: E402
    SAMPLE_TEXT_FIELD,
    Account,
    sample_account,
)
from service.simulator.app import SIM_STATE, SimulatorConfig, create_simulator_app  # noqa: E402
from service.simulator.payloads import make_events  # noqa: E402
from tests.browser import chromium  # noqa: E402
from tests.conftest import free_port, wait_for_port  # noqa: E402

API_TOKEN = "console-screenshots"  # noqa: S105 - a throwaway stack: made-up secrets
BUCKET = "copernica-archive"
TODAY = datetime.now(UTC).date()
MAIN_SUBJECT = "ann.de.vries@example.com"
# (subject, days since received, simulator behaviour)
REQUESTS: list[tuple[dict[str, Any], int, str]] = [
    ({"email": "j.bakker@example.com"}, 45, "ready"),
    ({"profile": 20417}, 38, "waiting"),
    ({"email": "noor.el.amrani@example.net"}, 34, "ready"),
    ({"subprofile": 88123}, 27, "ready"),
    ({"email": "pieter.smit@example.org"}, 25, "waiting"),
    ({"profile": 99999}, 20, "refused"),
    ({"email": "lotte.visser@example.com"}, 12, "ready"),
    ({"email": "m.jansen@example.com"}, 6, "waiting"),
    ({"subprofile": 4410}, 2, "ready"),
    ({"email": "sem.de.boer@example.com"}, 1, "ready"),
]


def account() -> dict[str, Any]:
    """The simulator's account: MAIN_SUBJECT in Newsletter (profile 101), Shop (profile 201,
    by its SAMPLE_TEXT_FIELD) and Shop's Orders (subprofile 2101); the other requests'
    profiles and subprofiles exist too, holding other people."""
    document = sample_account(MAIN_SUBJECT)
    document["profiles"].append(
        {"id": "20417", "database": "1", "fields": {"Email": "r.mulder@example.com"}}
    )
    for subprofile in ("88123", "4410"):
        document["subprofiles"].append(
            {
                "id": subprofile,
                "profile": "210",
                "collection": "21",
                "fields": {"Email": "customer0@example.net", "Order": f"ORD-{subprofile}"},
            }
        )
    return document


async def start(app: web.Application, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def until(probe: Any, what: str) -> Any:
    """What `probe` returns once it is truthy; within a minute."""
    for _ in range(300):
        if value := await probe():
            return value
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{what}: not reached in a minute")


def main() -> None:
    """A local S3 in its own process for the life of the run; the rest in this one."""
    s3_port = free_port()
    moto = subprocess.Popen(  # noqa: S603 - this interpreter, fixed arguments
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(s3_port)
        asyncio.run(render(f"http://127.0.0.1:{s3_port}"))
    finally:
        moto.terminate()
        moto.wait(10)


async def render(s3_url: str) -> None:
    sim_port, port, admin_port = (free_port() for _ in range(3))
    runners: list[web.AppRunner] = []
    try:
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
            TODAY - timedelta(days=120), TODAY, per_day=2, email=MAIN_SUBJECT
        )
        state.account = Account.from_json(account())
        runners.append(await start(simulator, sim_port))

        settings = Settings.from_env(
            {
                "COPERNICA_ACCESS_TOKEN": "sim",
                "COPERNICA_API_URL": f"http://127.0.0.1:{sim_port}/v2",
                "CALLBACK_SECRET": "console-screenshots-callbacks",
                "API_TOKEN": API_TOKEN,
                "ARCHIVE_BUCKET": BUCKET,
                "S3_ENDPOINT_URL": s3_url,
                "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
                "ADMIN_PORT": str(admin_port),
                "POLL_INTERVAL_SECONDS": "0.2",
                "DISCOVERY_FIELDS": SAMPLE_TEXT_FIELD,
                "REPORT_CONTROLLER_NAME": "Koffiebranderij Zoë B.V.",
                "LOG_LEVEL": "warning",
                "LOG_FORMAT": "console",
            },
            dotenv=None,
        )
        configure_logging(settings)
        admin = create_app(settings)
        runners.append(await start(admin, admin_port))
        runners.append(await start(create_public_app(admin), port))
        base = f"http://127.0.0.1:{admin_port}"
        auth = {"Authorization": f"Bearer {API_TOKEN}"}

        async with aiohttp.ClientSession(headers=auth) as http:

            async def file(body: dict[str, Any]) -> str:
                async with http.post(f"{base}/v1/data-requests", json=body) as answer:
                    assert answer.status == 202, await answer.text()
                    return str((await answer.json())["id"])

            async def show(request_id: str) -> dict[str, Any]:
                async with http.get(f"{base}/v1/data-requests/{request_id}") as answer:
                    return dict(await answer.json())

            for body, days, behaviour in REQUESTS:
                state.faults.reject_create = behaviour == "refused"
                state.config.ready_after = 10**6 if behaviour == "waiting" else 0.3
                received = (TODAY - timedelta(days=days)).isoformat()
                await file({**body, "received_on": received})
            state.faults.reject_create, state.config.ready_after = False, 0.3
            main_id = await file(
                {
                    "email": MAIN_SUBJECT,
                    "received_on": (TODAY - timedelta(days=9)).isoformat(),
                    "events": {"since": (TODAY - timedelta(days=120)).isoformat()},
                }
            )
            await until(lambda: _packaged(show, main_id), "the package")
            async with http.post(
                f"{base}/v1/data-requests/{main_id}/extend",
                json={"months": 1, "reason": "14,000 messages to check for third parties"},
            ) as answer:
                assert answer.status == 200, await answer.text()
            # The tiles show the poller's census: wait for it to count the overdue ones.
            await until(lambda: _census_counted(http, base), "the poller's census")

        async with chromium() as browser:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            await page.goto(f"{base}/ui/login")
            await page.get_by_label("API token").fill(API_TOKEN)
            await page.get_by_role("button", name="Sign in").click()
            await page.wait_for_url(f"{base}/ui/")
            for name, path in (
                ("console-requests.png", "/ui/"),
                ("console-request.png", f"/ui/requests/{main_id}"),
                ("console-file.png", "/ui/requests/new"),
            ):
                await page.goto(base + path)
                picture = ROOT / "docs" / name
                await page.screenshot(path=str(picture), full_page=True)
                print(f"wrote {picture}")
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


async def _packaged(show: Any, request_id: str) -> bool:
    return (await show(request_id)).get("package") is not None


async def _census_counted(http: aiohttp.ClientSession, base: str) -> bool:
    async with http.get(f"{base}/metrics") as answer:
        text = await answer.text()
    return any(
        line.startswith("receiver_requests_overdue ") and float(line.split()[1]) >= 2
        for line in text.splitlines()
    )


if __name__ == "__main__":
    main()
