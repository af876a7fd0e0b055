"""Renders docs/console-requests.png, docs/console-request.png and docs/console-file.png: the
operator console's three pages, as a real chromium shows them, over the real service, a local
S3 (moto's server) and the Copernica simulator (render_stack.py).

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

from datetime import timedelta
from typing import Any

from render_stack import API_TOKEN, ROOT, TODAY, Stack, person_account, run, until

from tests.browser import chromium

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
    document = person_account()
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


async def render(stack: Stack) -> None:
    state = stack.simulator
    for body, days, behaviour in REQUESTS:
        state.faults.reject_create = behaviour == "refused"
        state.config.ready_after = 10**6 if behaviour == "waiting" else 0.3
        await stack.file({**body, "received_on": (TODAY - timedelta(days=days)).isoformat()})
    state.faults.reject_create, state.config.ready_after = False, 0.3
    main_id = await stack.file_main(days_ago=9)
    await stack.packaged(main_id)
    async with stack.http.post(
        f"{stack.base}/v1/data-requests/{main_id}/extend",
        json={"months": 1, "reason": "14,000 messages to check for third parties"},
    ) as answer:
        assert answer.status == 200, await answer.text()
    # The tiles show the poller's census: wait for it to count the overdue ones.
    await until(lambda: _census_counted(stack), "the poller's census")

    async with chromium() as browser:
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        await page.goto(f"{stack.base}/ui/login")
        await page.get_by_label("API token").fill(API_TOKEN)
        await page.get_by_role("button", name="Sign in").click()
        await page.wait_for_url(f"{stack.base}/ui/")
        for name, path in (
            ("console-requests.png", "/ui/"),
            ("console-request.png", f"/ui/requests/{main_id}"),
            ("console-file.png", "/ui/requests/new"),
        ):
            await page.goto(stack.base + path)
            picture = ROOT / "docs" / name
            await page.screenshot(path=str(picture), full_page=True)
            print(f"wrote {picture}")


async def _census_counted(stack: Stack) -> bool:
    async with stack.http.get(f"{stack.base}/metrics") as answer:
        text = await answer.text()
    return any(
        line.startswith("receiver_requests_overdue ") and float(line.split()[1]) >= 2
        for line in text.splitlines()
    )


if __name__ == "__main__":
    run(account(), render)
