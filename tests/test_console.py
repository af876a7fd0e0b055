"""The operator console (`/ui/`), driven in a real headless chromium over the real service,
moto's S3 and the simulator; the refusals over plain HTTP, where a browser would hide them."""

from __future__ import annotations

import re
import ssl
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from playwright.async_api import Page, expect
from ulid import ULID
from yarl import URL

from service.app import POLLER
from service.clock import isoformat
from service.config import Secret
from service.requests.deadline import due_by
from service.requests.records import AccessRequest, DataRequest, Discovery, DiscoveryStatus, Status
from service.web.console.session import SESSION, SESSION_SECONDS, Sessions, set_cookie
from tests.browser import chromium
from tests.conftest import (
    API_TOKEN,
    Bucket,
    Service,
    ServiceFactory,
    Simulator,
    TcpProxy,
    sha256,
)
from tests.support import eventually, filed, metric, metric_counts, wait_until_packaged
from tests.test_api import PERSON, seeded, whole_person

# Over ~20 s in all: left out of the quick subset, `pytest -m "not slow"`.
pytestmark = pytest.mark.slow

FAST = {"POLL_INTERVAL_SECONDS": "0.2", "POLL_LEASE_SECONDS": "5"}
TODAY = datetime.now(UTC).date()
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


# -- helpers -----------------------------------------------------------------------------


async def sign_in(page: Page, service: Service) -> None:
    await page.goto(f"{service.admin_url}/ui/login")
    await page.get_by_label("API token").fill(API_TOKEN)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url(f"{service.admin_url}/ui/")


class Visitor:
    """A plain HTTP client with its own cookie jar: what a browser sends, without one."""

    def __init__(self, service: Service) -> None:
        self.base = service.admin_url
        # aiohttp keeps no cookies for IP addresses unless told to.
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def get(self, path: str) -> tuple[int, str, Any]:
        async with self.http.get(self.base + path, allow_redirects=False) as answer:
            return answer.status, await answer.text(), answer.headers

    async def post(self, path: str, form: dict[str, str]) -> tuple[int, str, Any]:
        async with self.http.post(self.base + path, data=form, allow_redirects=False) as answer:
            return answer.status, await answer.text(), answer.headers

    async def sign_in(self) -> str:
        """Signs in; returns the session's CSRF token (from a page's form)."""
        _, html, _ = await self.get("/ui/login")
        status, _, headers = await self.post(
            "/ui/login", {"csrf": csrf_in(html), "token": API_TOKEN, "next": "/ui/"}
        )
        assert status == 303 and headers["Location"] == "/ui/"
        status, html, _ = await self.get("/ui/")
        assert status == 200
        return csrf_in(html)

    async def close(self) -> None:
        await self.http.close()


def csrf_in(html: str) -> str:
    found = CSRF.search(html)
    assert found, "no CSRF token in the page"
    return found.group(1)


async def nothing_filed(store: Bucket, simulator: Simulator) -> bool:
    return await store.keys() == [] and simulator.state.requests == {}


# -- the whole story in a browser ----------------------------------------------------------


async def test_an_operator_files_a_request_and_answers_it_in_the_browser(
    make_service: ServiceFactory, store: Bucket, simulator: Simulator, tmp_path: Path
) -> None:
    service = await make_service(**FAST, PACKAGE_LINK_SECONDS="3600")
    received = TODAY - timedelta(days=3)
    async with chromium() as browser:
        context = await browser.new_context(accept_downloads=True)
        page = await context.new_page()
        await sign_in(page, service)

        # File a request through the form.
        await page.get_by_role("link", name="File a request").first.click()
        await page.get_by_label("E-mail address", exact=True).check()
        await page.get_by_label("E-mail address or id").fill("lena@example.com")
        await page.get_by_label("Received on").fill(received.isoformat())
        await page.get_by_role("button", name="File the request").click()
        await page.wait_for_url(re.compile(r"/ui/requests/[0-9A-Z]{26}\?done=filed$"))
        request_id = page.url.split("/ui/requests/")[1].split("?")[0]
        await expect(page.get_by_role("status")).to_contain_text("The request was filed")
        await expect(page.get_by_role("heading", level=1)).to_have_text("lena@example.com")
        assert (await service.show(request_id))["received_on"] == received.isoformat()

        # Watch it become archived and packaged (the page reloaded, as a person would).
        async def packaged() -> bool:
            await page.reload()
            return await page.get_by_role("link", name="Download package").count() == 1

        await eventually(packaged, what="the package on the request's page")
        await expect(page.locator("h1 + .sub .badge")).to_have_text("Archived")
        timeline = page.locator(".timeline")
        await expect(timeline).to_contain_text("Filed with Copernica")
        await expect(timeline).to_contain_text("archived")
        await expect(timeline).to_contain_text("Access package built")
        shown = await service.show(request_id)
        await expect(page.get_by_text(shown["package"]["sha256"])).to_have_count(1)

        # Extend its deadline: without a reason the form says so beside the field.
        async with page.expect_navigation() as refused:
            await page.get_by_role("button", name="Extend deadline").click()
        assert (await refused.value).status == 400  # type: ignore[union-attr]
        await expect(page.locator("#reason-error")).to_contain_text("'reason' is required")
        await expect(page.get_by_label("Reason")).to_have_attribute("aria-invalid", "true")
        assert (await service.show(request_id))["extension"] is None
        await page.get_by_label("Extend by").select_option("1")
        await page.get_by_label("Reason").fill("1,200 messages to review <b>first</b>")
        await page.get_by_role("button", name="Extend deadline").click()
        await page.wait_for_url(re.compile(r"\?done=extended$"))
        new_due = due_by(received, 1).isoformat()
        await expect(page.get_by_role("status")).to_contain_text(new_due)
        await expect(timeline).to_contain_text("1,200 messages to review <b>first</b>")
        shown = await service.show(request_id)
        assert shown["due_by"] == new_due and shown["extension"]["months"] == 1

        # Download the package: the bytes are the recorded package's, and it answers.
        async with page.expect_download() as downloading:
            await page.get_by_role("link", name="Download package").click()
        download = await downloading.value
        assert download.suggested_filename == f"access-package-{request_id}.zip"
        saved = tmp_path / download.suggested_filename
        await download.save_as(saved)
        assert sha256(saved.read_bytes()) == shown["package"]["sha256"]
        answered = await eventually(
            lambda: service.show(request_id), lambda s: s["answered_at"] is not None
        )

        # Create a link: shown with its expiry; it serves the same bytes.
        await page.get_by_role("button", name="Create link").click()
        url = await page.get_by_label("Link for the data subject").input_value()
        assert (
            url.startswith(service.settings.s3_endpoint_url or "") and "X-Amz-Expires=3600" in url
        )
        expires = datetime.now(UTC) + timedelta(hours=1)
        await expect(page.locator(".link-box")).to_contain_text(
            re.compile(rf"Valid until {expires:%Y-%m-%d} \d\d:\d\d UTC")
        )
        async with service.http.get(url) as fetched:
            assert sha256(await fetched.read()) == shown["package"]["sha256"]
        assert (await service.show(request_id))["answered_at"] == answered["answered_at"]
        # Answered: the deadline can no longer move.
        await expect(page.get_by_role("button", name="Extend deadline")).to_have_count(0)

        # Open the report, under a policy that runs and loads nothing.
        async with context.expect_page() as opening:
            await page.get_by_role("link", name="Open report").click()
        report = await opening.value
        await report.wait_for_load_state()
        await expect(report.get_by_role("heading", level=1)).to_have_text("Your personal data")
        response = await report.goto(f"{service.admin_url}/ui/requests/{request_id}/report")
        assert response is not None and response.status == 200
        policy = response.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "sandbox" in policy
        assert "script-src" not in policy  # so scripts fall under default-src 'none'

        # Sign out: the console is closed again.
        await page.get_by_role("button", name="Sign out").click()
        await page.wait_for_url(re.compile(r"/ui/login\?signed_out=1$"))
        await expect(page.get_by_role("status")).to_have_text("You are signed out.")
        await page.goto(f"{service.admin_url}/ui/")
        assert page.url == f"{service.admin_url}/ui/login?next=%2Fui%2F"


async def test_a_wrong_filing_form_marks_each_field_and_files_nothing(
    service: Service, store: Bucket, simulator: Simulator
) -> None:
    async with chromium() as browser:
        page = await browser.new_page()
        await sign_in(page, service)
        await page.goto(f"{service.admin_url}/ui/requests/new")
        await page.get_by_label("E-mail address or id").fill("not an address")
        await page.get_by_label("Received on").fill((TODAY + timedelta(days=2)).isoformat())
        await page.get_by_label("From").fill("2026-05-10")
        await page.get_by_label("Until (not included)").fill("2026-05-01")
        async with page.expect_navigation() as sent:
            await page.get_by_role("button", name="File the request").click()

        assert (await sent.value).status == 400  # type: ignore[union-attr]
        await expect(page.get_by_role("alert")).to_contain_text("The request was not filed")
        await expect(page.locator("#subject-error")).to_contain_text("must be an e-mail address")
        await expect(page.locator("#received_on-error")).to_contain_text("in the future")
        await expect(page.locator("#events_until-error")).to_contain_text("must be after since")
        for label in ("E-mail address or id", "Received on", "Until (not included)"):
            await expect(page.get_by_label(label)).to_have_attribute("aria-invalid", "true")
        await expect(page.get_by_label("E-mail address or id")).to_have_value("not an address")
        # A profile id that is not a number, and no subject at all.
        await page.get_by_label("Profile id", exact=True).check()
        await page.get_by_label("E-mail address or id").fill("12a")
        await page.get_by_label("Received on").fill("")
        await page.get_by_label("From").fill("")
        await page.get_by_label("Until (not included)").fill("")
        await page.get_by_role("button", name="File the request").click()
        await expect(page.locator("#subject-error")).to_contain_text("positive integer")
        await expect(page.locator("#received_on-error")).to_have_count(0)
    assert await nothing_filed(store, simulator)


async def test_the_requests_page_sorts_marks_filters_and_pages(
    make_service: ServiceFactory, store: Bucket
) -> None:
    seeded = await seed_requests(store)
    service = await make_service(POLL_INTERVAL_SECONDS="600")  # the poller stays out of it
    open_ones = [r for r in seeded if r.answered_at is None]
    overdue = [r for r in open_ones if r.deadline.due_by < TODAY]
    soon = [r for r in open_ones if TODAY <= r.deadline.due_by <= TODAY + timedelta(days=7)]
    assert len(open_ones) > 100 and 0 < len(overdue) < 50 and soon  # every case, 3 pages
    # The poller's census counts the overdue ones once at start-up.
    await eventually(
        lambda: metric(service, "receiver_requests_overdue"), lambda n: n == len(overdue)
    )

    async with chromium() as browser:
        page = await browser.new_page()
        await sign_in(page, service)
        await expect(page.locator(".tile.alert .tile-number")).to_have_text(str(len(overdue)))

        # Open requests, by due date, over pages of 50.
        seen: list[tuple[str, str]] = []
        while True:
            rows = page.locator("table.list tbody tr")
            for i in range(await rows.count()):
                cells = rows.nth(i).locator("td")
                seen.append((await cells.nth(0).inner_text(), await cells.nth(6).inner_text()))
                is_late = "overdue" in (await rows.nth(i).get_attribute("class") or "")
                assert is_late == (date.fromisoformat(seen[-1][0]) < TODAY)
                if is_late:
                    await expect(cells.nth(1)).to_contain_text("Overdue")
            if await page.get_by_role("link", name="Next 50 →").count() == 0:
                break
            await page.get_by_role("link", name="Next 50 →").click()
        assert [due for due, _ in seen] == sorted(due for due, _ in seen)
        assert sorted(i for _, i in seen) == sorted(r.id for r in open_ones)

        # Only the overdue ones; only those due within a week.
        await page.goto(f"{service.admin_url}/ui/")
        await page.get_by_label("Show").select_option("overdue")
        await page.get_by_role("button", name="Apply").click()
        await expect(page.locator("table.list tbody tr")).to_have_count(len(overdue))
        await expect(page.locator("table.list tbody tr.overdue")).to_have_count(len(overdue))
        await page.get_by_label("Show").select_option("soon")
        await page.get_by_role("button", name="Apply").click()
        await expect(page.locator("table.list tbody tr")).to_have_count(len(soon))
        await expect(page.locator("table.list tbody tr.overdue")).to_have_count(0)

        # All of them in filing order, with the counts per status of the page read.
        await page.get_by_label("Show").select_option("all")
        await page.get_by_label("Status", exact=True).select_option("failed")
        await page.get_by_role("button", name="Apply").click()
        first_page = sorted(seeded, key=lambda r: r.id)[:50]
        failed = [r for r in first_page if r.status == "failed"]
        await expect(page.locator("table.list tbody tr")).to_have_count(len(failed))
        counts = page.locator(".counts")
        for status, label in (("failed", "Failed"), ("archived", "Archived")):
            number = sum(1 for r in first_page if r.status == status)
            await expect(counts.get_by_role("link", name=f"{label} {number}")).to_have_count(1)

        # Every value is escaped: a hostile subject is text, not markup.
        await page.goto(f"{service.admin_url}/ui/?view=all")
        await expect(page.get_by_text("<img src=x onerror=alert(1)>@example.com")).to_have_count(1)
        assert await page.locator("table img").count() == 0


async def test_a_page_of_requests_reads_one_page_of_records(
    make_service: ServiceFactory, store: Bucket
) -> None:
    """Paging over many requests costs a LIST and one read per row shown, never a scan."""
    seeded = await seed_requests(store)
    service = await make_service(POLL_INTERVAL_SECONDS="600")
    overdue = [r for r in seeded if r.answered_at is None and r.deadline.overdue(TODAY)]
    await eventually(
        lambda: metric(service, "receiver_requests_overdue"), lambda n: n == len(overdue)
    )
    visitor = Visitor(service)
    try:
        await visitor.sign_in()
        for query in ("view=all", "view=open", "view=all&status=failed"):
            before = await metric_counts(service)
            status, _, _ = await visitor.get(f"/ui/?{query}")
            after = await metric_counts(service)
            assert status == 200
            reads = after.get("s3:get_object", 0) - before.get("s3:get_object", 0)
            lists = after.get("s3:list_objects_v2", 0) - before.get("s3:list_objects_v2", 0)
            assert reads == 50, query
            assert lists <= 2, query
    finally:
        await visitor.close()


async def seed_requests(store: Bucket) -> list[AccessRequest]:
    """Requests received over the last 45 days, three a day, in three statuses; one in five
    already answered. Written as the ledger writes them: a record, and a deadline marker
    while the request is not answered."""
    records = []
    statuses = ("pending", "archived", "failed")
    for n in range(135):
        received = TODAY - timedelta(days=n // 3)
        created = datetime.now(UTC) - timedelta(days=n // 3, minutes=n)
        subject = f"person{n}@example.com"
        if n == 130:  # among the oldest: on the first page of "all"
            subject = "<img src=x onerror=alert(1)>@example.com"
        record = AccessRequest.new(
            str(ULID.from_datetime(created)),
            DataRequest(
                "email",
                subject,
                status=Status(statuses[n % 3]),
                copernica_id=str(1000 + n),
                attempts=1,
            ),
            created_at=isoformat(created),
            updated_at=isoformat(created),
            received_on=received.isoformat(),
            answered_at=isoformat(created + timedelta(days=1)) if n % 5 == 4 else None,
        )
        records.append(record)
        await store.client.put_object(
            Bucket=store.name,
            Key=f"copernica/requests/{record.id}.json",
            Body=record.to_bytes(),
        )
        if record.answered_at is None:
            await store.client.put_object(
                Bucket=store.name,
                Key=f"copernica/deadlines/{record.deadline.due_by}/{record.id}",
                Body=b"",
            )
    return records


async def test_every_field_has_a_label_and_the_keyboard_does_everything(
    make_service: ServiceFactory,
) -> None:
    service = await make_service(**FAST)
    created = await filed(service, {"email": "kai@example.com"})
    await wait_until_packaged(service, created["id"])
    async with chromium() as browser:
        page = await browser.new_page()
        await page.goto(f"{service.admin_url}/ui/login")
        await expect(page.get_by_label("API token")).to_be_focused()
        await page.keyboard.type(API_TOKEN)
        await page.keyboard.press("Enter")
        await page.wait_for_url(f"{service.admin_url}/ui/")
        for path in ("/ui/", "/ui/requests/new", f"/ui/requests/{created['id']}"):
            await page.goto(service.admin_url + path)
            unlabelled = await page.evaluate(
                """[...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
                   .filter(field => field.labels.length === 0).map(field => field.outerHTML)"""
            )
            assert unlabelled == [], path
            await page.keyboard.press("Tab")  # the first stop skips to the content
            assert await page.evaluate("document.activeElement.textContent") == "Skip to content"
        # From the request's page, the keyboard alone reaches and presses "Create link".
        for _ in range(30):
            await page.keyboard.press("Tab")
            if await page.evaluate("document.activeElement.textContent") == "Create link":
                break
        await page.keyboard.press("Enter")
        await expect(page.get_by_label("Link for the data subject")).to_be_visible()


async def test_the_sources_card_shows_each_source_and_raises_discoverys_limit(
    make_service: ServiceFactory,
) -> None:
    service = await make_service(DISCOVERY_MAX_SOURCES="3", POLL_INTERVAL_SECONDS="600")
    service.app[POLLER].stop()  # the record stays as the page changes it
    hostile = "<img src=x onerror=alert(1)>"
    over = Discovery(
        DiscoveryStatus.OVER_LIMIT,
        address=PERSON,
        databases=2,
        collections=1,
        queries=3,
        matches=4,
        calls=12,
        last_error=f"more than 3 sources {hostile}",
    )
    record = await seeded(service, whole_person(over, hostile, "Orders & <b>returns</b>"))
    async with chromium() as browser:
        page = await browser.new_page()
        await sign_in(page, service)
        await page.goto(f"{service.admin_url}/ui/?view=all")
        row = page.locator("table.list tbody tr", has_text=PERSON)
        await expect(row.locator("td.sources-count")).to_have_text("4")

        await page.goto(f"{service.admin_url}/ui/requests/{record.id}")
        card = page.locator("section", has=page.get_by_role("heading", name="Sources"))
        rows = card.locator("table.sources tbody tr")
        await expect(rows).to_have_count(4)
        await expect(rows.nth(0)).to_contain_text("The address itself")
        await expect(rows.nth(0)).to_contain_text("As filed")
        await expect(rows.nth(0)).to_contain_text("20.5 KB")
        await expect(rows.nth(1)).to_contain_text(f"Database {hostile}")
        await expect(rows.nth(1)).to_contain_text("31.0 KB")
        await expect(rows.nth(1)).to_contain_text("512 bytes")  # its details
        await expect(rows.nth(2)).to_contain_text("Subprofile 1001 (of profile 101)")
        await expect(rows.nth(2)).to_contain_text(
            f"Collection Orders & <b>returns</b> in {hostile}"
        )
        await expect(rows.nth(2)).to_contain_text("Gone: removed from Copernica")
        await expect(rows.nth(2)).to_contain_text("Copernica said: No subprofile with supplied ID")
        await expect(rows.nth(3)).to_contain_text("Waiting for Copernica")
        await expect(card).to_contain_text("Stopped at its limit")
        await expect(card).to_contain_text(f"more than 3 sources {hostile}")
        await expect(card).to_contain_text("4 profiles and subprofiles holding the address")
        assert await page.locator("main img, main b").count() == 0  # text, not markup

        # The limit must go up; then discovery goes on.
        await page.get_by_label("New limit").fill("3")
        async with page.expect_navigation() as refused:
            await page.get_by_role("button", name="Raise the limit").click()
        assert (await refused.value).status == 400  # type: ignore[union-attr]
        await expect(page.locator("#max_sources-error")).to_contain_text("current limit (3)")
        await page.get_by_label("New limit").fill("40")
        await page.get_by_role("button", name="Raise the limit").click()
        await page.wait_for_url(re.compile(r"\?done=discovery$"))
        await expect(page.get_by_role("status")).to_contain_text("up to 40 sources")
        await expect(card).to_contain_text("Looking in every database and collection")
        await expect(page.get_by_role("button", name="Raise the limit")).to_have_count(0)
    shown = await service.show(record.id)
    assert shown["discovery"]["status"] == "running"
    assert shown["discovery"]["max_sources"] == 40


async def test_the_filing_form_looks_in_every_database_as_discovery_says(
    make_service: ServiceFactory, simulator: Simulator
) -> None:
    simulator.state.faults.lose_callback = True
    box = re.compile(r'<input type="checkbox" name="discover" value="on"[^>]*>')
    for setting, ticked in (("off", False), ("on", True)):
        visitor = Visitor(await make_service(DISCOVERY=setting))
        try:
            csrf = await visitor.sign_in()
            _, html, _ = await visitor.get("/ui/requests/new")
            found = box.search(html)
            assert found and ("checked" in found.group(0)) == ticked, setting
            if ticked:  # the box is part of the request: sent again unticked, it is another
                form = {"subject_type": "profile", "subject": "8", "idempotency_key": "k1"}
                status, _, _ = await visitor.post(
                    "/ui/requests", {**form, "discover": "on", "csrf": csrf}
                )
                assert status == 303
                status, page, _ = await visitor.post("/ui/requests", {**form, "csrf": csrf})
                assert status == 409 and "already used to file a different request" in page
        finally:
            await visitor.close()


# -- refusals ------------------------------------------------------------------------------


async def test_the_console_is_not_on_the_public_listener(service: Service) -> None:
    for path in ("/ui/", "/ui/login", "/ui/static/console.css"):
        async with service.http.get(service.url + path, allow_redirects=False) as answer:
            assert answer.status == 404, path
    async with service.http.get(f"{service.admin_url}/ui/static/console.css") as answer:
        assert answer.status == 200 and answer.content_type == "text/css"


async def test_a_wrong_token_is_refused_in_the_browser(service: Service) -> None:
    async with chromium() as browser:
        context = await browser.new_context()
        page = await context.new_page()
        await page.goto(f"{service.admin_url}/ui/")
        assert page.url == f"{service.admin_url}/ui/login?next=%2Fui%2F"
        await page.get_by_label("API token").fill("not-the-token")
        async with page.expect_navigation() as sent:
            await page.get_by_role("button", name="Sign in").click()
        assert (await sent.value).status == 401  # type: ignore[union-attr]
        await expect(page.locator("#token-error")).to_contain_text("Wrong token")
        assert SESSION.cookie not in {c["name"] for c in await context.cookies()}


async def test_signing_in_refuses_a_missing_or_wrong_form_token(service: Service) -> None:
    visitor, stranger = Visitor(service), Visitor(service)
    try:
        status, _, headers = await visitor.get("/ui/")
        assert status == 303 and headers["Location"] == "/ui/login?next=%2Fui%2F"
        _, html, _ = await visitor.get("/ui/login")
        for form in (
            {"token": API_TOKEN},  # no CSRF token
            {"token": API_TOKEN, "csrf": "x" + csrf_in(html)[1:]},  # a wrong one
        ):
            status, page, _ = await visitor.post("/ui/login", form)
            assert status == 403 and "security token" in page
        # A form token is worth nothing without its own pre-session cookie.
        status, page, _ = await stranger.post(
            "/ui/login", {"token": API_TOKEN, "csrf": csrf_in(html)}
        )
        assert status == 403
        status, _, _ = await visitor.get("/ui/")
        assert status == 303  # still not signed in
    finally:
        await visitor.close()
        await stranger.close()


async def test_forged_or_expired_session_cookies_are_refused(
    service: Service, store: Bucket, simulator: Simulator
) -> None:
    signed_elsewhere, _ = Sessions(Secret("another-token")).issue(SESSION)
    expired, _ = Sessions(
        Secret(API_TOKEN), clock=lambda: time.time() - SESSION_SECONDS - 60
    ).issue(SESSION)
    genuine, _ = Sessions(Secret(API_TOKEN)).issue(SESSION)
    tampered = genuine.replace(genuine.split(".")[1], str(int(time.time()) + 10 * SESSION_SECONDS))
    for cookie in ("forged", "a.9999999999.b", signed_elsewhere, expired, tampered):
        visitor = Visitor(service)
        visitor.http.cookie_jar.update_cookies({SESSION.cookie: cookie}, URL(service.admin_url))
        try:
            status, _, headers = await visitor.get("/ui/requests/new")
            assert status == 303, cookie
            assert headers["Location"] == "/ui/login?next=%2Fui%2Frequests%2Fnew&expired=1"
            assert f'{SESSION.cookie}=""' in headers["Set-Cookie"]  # the bad cookie is deleted
            status, page, _ = await visitor.post(
                "/ui/requests", {"csrf": "x", "subject_type": "profile", "subject": "5"}
            )
            assert status == 401 and "not signed in" in page
        finally:
            await visitor.close()
    assert await nothing_filed(store, simulator)
    # The genuine one, for comparison, gets in.
    visitor = Visitor(service)
    visitor.http.cookie_jar.update_cookies({SESSION.cookie: genuine}, URL(service.admin_url))
    try:
        assert (await visitor.get("/ui/"))[0] == 200
    finally:
        await visitor.close()


async def test_every_form_needs_this_sessions_csrf_token(
    service: Service, store: Bucket, simulator: Simulator
) -> None:
    visitor, other = Visitor(service), Visitor(service)
    try:
        token = await visitor.sign_in()
        others_token = await other.sign_in()
        assert token != others_token
        request_id = str(ULID())
        filing = {"subject_type": "profile", "subject": "5"}
        for path, form in (
            ("/ui/requests", filing),
            (f"/ui/requests/{request_id}/extend", {"months": "1", "reason": "r"}),
            (f"/ui/requests/{request_id}/link", {}),
            (f"/ui/requests/{request_id}/discovery", {"max_sources": "500"}),
            ("/ui/logout", {}),
        ):
            for csrf in (None, "", token[:-2] + "xx", others_token):
                sent = form if csrf is None else {**form, "csrf": csrf}
                status, page, _ = await visitor.post(path, sent)
                assert status == 403, (path, csrf)
                assert "security token (CSRF)" in page
        assert await nothing_filed(store, simulator)
        assert (await visitor.get("/ui/"))[0] == 200  # the refused sign-out did not sign out
        # With the token, the same form files the request.
        status, _, headers = await visitor.post("/ui/requests", {**filing, "csrf": token})
        assert status == 303 and headers["Location"].endswith("?done=filed")
    finally:
        await visitor.close()
        await other.close()


async def test_the_session_cookie_is_httponly_strict_and_expiring(service: Service) -> None:
    visitor = Visitor(service)
    try:
        _, html, _ = await visitor.get("/ui/login")
        status, _, headers = await visitor.post(
            "/ui/login", {"csrf": csrf_in(html), "token": API_TOKEN}
        )
        assert status == 303
        cookie = next(c for c in headers.getall("Set-Cookie") if c.startswith(SESSION.cookie + "="))
        attributes = {a.strip().split("=")[0].lower(): a for a in cookie.split(";")[1:]}
        assert "httponly" in attributes
        assert attributes["samesite"].strip() == "SameSite=Strict"
        assert attributes["path"].strip() == "Path=/ui/"
        assert attributes["max-age"].strip() == f"Max-Age={SESSION_SECONDS}"
        assert "secure" not in attributes  # plain http here
    finally:
        await visitor.close()
    # Over https the cookie is Secure.
    request = make_mocked_request("POST", "/ui/login", sslcontext=ssl.create_default_context())
    response = web.Response()
    set_cookie(response, request, SESSION, "value")
    assert "Secure" in response.cookies[SESSION.cookie].output()


async def test_no_package_yet_is_said_on_the_page(
    make_service: ServiceFactory, simulator: Simulator
) -> None:
    simulator.state.faults.lose_callback = True
    simulator.state.config.ready_after = 3600
    service = await make_service(**FAST)
    created = await filed(service, {"profile": 5})
    visitor = Visitor(service)
    try:
        await visitor.sign_in()
        for path in ("package", "report"):
            status, page, _ = await visitor.get(f"/ui/requests/{created['id']}/{path}")
            assert status == 409 and "not built yet" in page
        status, page, _ = await visitor.get(f"/ui/requests/{created['id']}")
        assert status == 200 and "Waiting for Copernica" in page
        status, _, _ = await visitor.get(f"/ui/requests/{ULID()}")
        assert status == 404
    finally:
        await visitor.close()
    assert (await service.show(created["id"]))["answered_at"] is None


async def test_an_input_error_is_shown_beside_the_field_it_names(
    service: Service, store: Bucket, simulator: Simulator
) -> None:
    """The field comes from the error (`InvalidInput.field`), not from its wording."""
    simulator.state.faults.lose_callback = True
    created = await filed(service, {"profile": 6})
    visitor = Visitor(service)
    try:
        csrf = await visitor.sign_in()
        status, page, _ = await visitor.post(
            f"/ui/requests/{created['id']}/extend", {"months": "3", "reason": "r", "csrf": csrf}
        )
        assert status == 400
        assert re.search(r'id="months-error">[^<]*months&#39; must be 1 or 2', page)
        assert 'id="reason-error"' not in page
        status, page, _ = await visitor.post(
            "/ui/requests",
            {
                "subject_type": "profile",
                "subject": "7",
                "events_since": "2026-13-01",
                "csrf": csrf,
            },
        )
        assert status == 400
        assert re.search(r'id="events_since-error">[^<]*events.since must be a date', page)
        assert 'id="events_until-error"' not in page
    finally:
        await visitor.close()
    assert len(simulator.state.requests) == 1  # only the request filed above


async def test_errors_no_page_shows_itself_get_the_error_page(
    make_service: ServiceFactory, s3_proxy: TcpProxy
) -> None:
    service = await make_service(S3_ENDPOINT_URL=s3_proxy.url, S3_TIMEOUT_SECONDS="1")
    visitor = Visitor(service)
    try:
        await visitor.sign_in()
        status, page, _ = await visitor.get("/ui/?view=nope")
        assert status == 400 and "No such page" in page and "There is no view" in page
        assert "Sign out" in page  # the signed-in header, as on every page
        status, page, _ = await visitor.get(f"/ui/requests/{ULID()}")
        assert status == 404 and "There is no request with this id." in page
        status, _, _ = await visitor.get("/ui/requests/not-a-ulid")
        assert status == 404
        s3_proxy.down()
        status, page, headers = await visitor.get(f"/ui/requests/{ULID()}")
        assert status == 503 and "Storage is not answering" in page
        assert headers["Retry-After"] == "5"
    finally:
        await visitor.close()
