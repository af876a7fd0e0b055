"""The data subject's report, checked for what its reader sees: counts, decoded subjects,
message text, tables for shapes nobody documented, notes where it stops, and nothing from the
payload that a browser would run or load (the last one in a real headless chromium)."""

from __future__ import annotations

import json
import random
import re
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp import web

from service.answer.report.builder import ReportBuilder
from service.answer.report.caps import CELL_CHARS, MESSAGE_CAP, ROW_CAP
from service.answer.report.context import ReportContext, SourceFact
from service.answer.statement import DEFAULT_STATEMENT
from service.simulator.payloads import PayloadSpec, make_events, payload_bytes, payload_chunks
from tests.browser import chromium

MIB = 1024 * 1024
HOSTILE_SCRIPT = "<script>window.pwned=1</script>"
HOSTILE_IMG = '"><img src=x onerror="window.pwned=2">'
HOSTILE_LINK = "javascript:window.pwned=3"
AUTHORITY_URL = DEFAULT_STATEMENT.authority.url


def context(**changes: Any) -> ReportContext:
    fields: dict[str, Any] = {
        "request_id": "01J2Z8Q4W6X3V5K7M9N1P3R5T7",
        "subject_type": "email",
        "subject_label": "ann@example.com",
        "controller": "Koffie B.V.",
        "received_on": date(2026, 6, 20),
        "due_by": date(2026, 7, 20),
        "generated_at": datetime(2026, 6, 22, 9, 41, tzinfo=UTC),
        "events_range": None,
    }
    return ReportContext(**(fields | changes))


def payload(*groups: Any, **members: Any) -> bytes:
    return json.dumps(
        {"info": {"type": "email", "id": "ann@example.com"}, "data": list(groups)} | members
    ).encode()


def render(
    body: bytes,
    *,
    chunk: int | None = None,
    events: list[list[dict[str, Any]]] | None = None,
    **changes: Any,
) -> str:
    builder = ReportBuilder(context(**changes))
    step = chunk or max(len(body), 1)
    for start in range(0, len(body), step):
        builder.feed(body[start : start + step])
    for window in events or []:
        builder.add_events(window)
    return builder.render().decode("utf-8")


class _Text(HTMLParser):
    """The page's visible text, as a reader sees it (no head, no styles)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._hidden += tag in ("head", "style", "title")
        self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        self._hidden -= tag in ("head", "style", "title")
        self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.parts.append(data)


def text_of(html: str) -> str:
    reader = _Text()
    reader.feed(html)
    return " ".join("".join(reader.parts).split())


def elements_of(html: str) -> tuple[set[str], set[str], str]:
    """Every tag name and attribute name in the page, and the text of its style sheets."""
    tags: set[str] = set()
    attributes: set[str] = set()
    styles: list[str] = []

    class Elements(HTMLParser):
        in_style = False

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            tags.add(tag)
            attributes.update(name for name, _ in attrs)
            self.in_style = tag == "style"

        def handle_endtag(self, tag: str) -> None:
            self.in_style = False

        def handle_data(self, data: str) -> None:
            if self.in_style:
                styles.append(data)

    Elements().feed(html)
    return tags, attributes, "".join(styles)


def links_of(html: str) -> list[str | None]:
    """The target of every element with an `href`."""
    found: list[str | None] = []

    class Links(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            found.extend(value for name, value in attrs if name == "href")

    Links().feed(html)
    return found


def mime(
    subject: str = "Hello",
    body: str = "Hello there, this is the text.",
    *,
    sender: str = "Shop <news@shop.test>",
    date_header: str = "Tue, 06 Jan 2026 10:00:00 +0100",
    content_type: str = "text/plain; charset=utf-8",
    encoding: str = "8bit",
) -> str:
    return "\r\n".join(
        [
            f"Date: {date_header}",
            f"From: {sender}",
            "To: <ann@example.com>",
            f"Subject: {subject}",
            "MIME-Version: 1.0",
            f"Content-Type: {content_type}",
            f"Content-Transfer-Encoding: {encoding}",
            "",
            body,
        ]
    )


def opened(time: str = "2026-01-06 11:00:00", **extra: Any) -> dict[str, Any]:
    return {"type": "open", "time": time, "ip": "192.0.2.1", "useragent": "Thunderbird"} | extra


# -- what a reader sees ---------------------------------------------------------------------


def test_a_simulator_payload_is_counted_and_every_message_shown_decoded() -> None:
    body = payload_bytes(PayloadSpec("email", "ann@example.com", "7", 300_000))
    groups = json.loads(body)["data"]
    kinds = Counter(item["type"] for group in groups for item in group[1:])

    text = text_of(render(body))

    assert f"{len(groups)} Messages sent to you" in text
    assert f"{kinds['open']} Times a message was opened" in text
    assert f"{kinds['click']} Links clicked" in text
    assert f"{kinds['survey']} Survey answers" in text
    assert "0 Other records" in text
    # The simulator's subjects in Q and B encoded-words, as the reader should see them.
    assert "Grüße aus dem Café: unsere Herbstauswahl #1" in text
    assert "Summer sale ☀️ up to 50% off #2" in text
    assert "Your order is on its way 🎉 #3" in text
    assert "From Café Zoë <news@shop.test>" in text
    assert "=?utf-8?" not in text
    assert "Attachments offer.pdf" in text
    assert "From the HTML version of the message, shown as text:" in text  # HTML-only ones
    assert "Customer satisfaction" in text  # a survey row


def test_subjects_and_senders_in_rfc_2047_encoded_words_are_decoded() -> None:
    body = payload(
        [
            mime("=?utf-8?q?Gr=C3=BC=C3=9Fe?="),
            mime("=?UTF-8?B?Q2Fmw6kg4piV?= for you", sender="=?utf-8?q?Zo=C3=AB?= <z@shop.test>"),
            mime("=?utf-8?q?Cr=C3=A8me_br=C3=BB?=\r\n =?utf-8?q?l=C3=A9e?= inside"),
            mime("=?iso-8859-1?q?na=EFve?="),
        ]
    )

    text = text_of(render(body))

    assert "Grüße" in text
    assert "Café ☕ for you" in text
    assert "From Zoë <z@shop.test>" in text
    assert "Crème brûlée inside" in text
    assert "naïve" in text
    assert "=?" not in text


def test_an_html_only_message_is_shown_as_text_never_as_html() -> None:
    html = (
        "<html><head><title>Ignored title</title><style>p{font-family:Arial}</style></head>"
        "<body><h1>Autumn&nbsp;sale</h1><p>Dear <b>Ann</b>, our =E2=82=AC10 voucher"
        ' <a href=3D"https://shop.test/v">awaits</a>.</p>'
        "<script>document.title=3D'x'</script><img src=3D\"https://track.test/p.gif\"></body></html>"
    )
    body = payload(
        [
            mime(
                "Voucher",
                html,
                content_type="text/html; charset=utf-8",
                encoding="quoted-printable",
            )
        ]
    )

    page = render(body)
    text = text_of(page)

    shown = "From the HTML version of the message, shown as text: Autumn sale Dear Ann,"
    assert f"{shown} our €10 voucher awaits." in text
    assert (
        "font-family" not in text and "Ignored title" not in text and "document.title" not in text
    )
    assert "<b>" not in page and "track.test" not in page


def test_the_text_part_is_preferred_and_cut_to_an_excerpt() -> None:
    words = " ".join(f"word{n}" for n in range(400))
    message = "\r\n".join(
        [
            "Subject: Both",
            "From: news@shop.test",
            'Content-Type: multipart/alternative; boundary="b"',
            "",
            "--b",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: base64",
            "",
            __import__("base64").encodebytes(words.encode()).decode(),
            "--b",
            "Content-Type: text/html",
            "",
            "<p>the html version</p>",
            "--b--",
        ]
    )
    text = text_of(render(payload([message])))

    assert "word0 word1 word2" in text and "word399" not in text and "…" in text
    assert "the html version" not in text


def test_hostile_values_are_escaped_and_nothing_can_load_or_run() -> None:
    body = payload(
        [
            mime(HOSTILE_SCRIPT, f"Hi {HOSTILE_SCRIPT}", sender=f"{HOSTILE_IMG} <x@shop.test>"),
            {"type": "click", "time": "2026-01-06", "url": HOSTILE_LINK},
            opened(useragent=HOSTILE_IMG),
            {HOSTILE_SCRIPT: HOSTILE_IMG, "style": "<style>*{background:url(//evil.test)}</style>"},
        ]
    )

    page = render(body, subject_label=HOSTILE_SCRIPT, controller=HOSTILE_IMG)
    text = text_of(page)

    assert HOSTILE_SCRIPT in text and HOSTILE_IMG in text and HOSTILE_LINK in text
    assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in page
    tags, attributes, styles = elements_of(page)
    assert not tags & {"script", "img", "link", "iframe", "object", "embed", "base"}
    assert not attributes & {"src", "srcset", "action", "background"}
    assert links_of(page) == [AUTHORITY_URL]  # the one link: the statement's, not the payload's
    assert not any(name.startswith("on") for name in attributes)
    assert "url(" not in styles and "@import" not in styles


def test_shapes_nobody_documented_are_shown_as_tables_never_dropped() -> None:
    in_a_dict = mime("Wrapped in a record", "The body.")
    body = payload(
        [
            {"mime": in_a_dict, "time": "2026-02-01 10:00:00", "mailing": 17},
            {"event": "open", "time": "2026-02-01 11:00:00"},
            {"kind": "Click", "time": "2026-02-01 12:00:00", "url": "https://shop.test/a"},
            {"foo": 1, "bar": {"x": [1, 2]}},
            {"foo": 2, "bar": None},
            {"type": "sms", "to": "+31600000000", "sent": True},
            42,
            "just a note",
            None,
            [[["deep down"]]],
        ],
        {"kind": "survey", "survey": "Not in an array", "time": "2026-03-01"},
        "a bare value",
        extra={"type": "loyalty", "points": 120},
    )

    page = render(body)
    text = text_of(page)

    assert "1 Messages sent to you" in text and "Wrapped in a record" in text
    assert "mailing 17" in text  # the record's other fields beside the message
    assert "1 Times a message was opened" in text and "1 Links clicked" in text
    assert "1 Survey answers" in text and "Not in an array" in text
    assert "Records with the fields: foo, bar." in text
    assert '{"x":[1,2]}' in text and "—" in text  # nested as compact JSON, null as a dash
    assert "Records of type “sms”" in text and "+31600000000" in text and "yes" in text
    assert "Single values" in text
    for value in ("42", "just a note", "deep down", "a bare value"):
        assert f" {value} " in text
    assert "Records of type “loyalty”" in text and "120" in text
    assert "data.json also holds parts named extra" in text
    assert "9 Other records" in text  # foo/bar twice, sms, 42, note, null, deep, bare, loyalty


def test_wide_and_deep_records_are_cut_with_a_pointer_to_the_data() -> None:
    wide = {f"field{n:03d}": f"value{n}" for n in range(100)}
    deep: Any = "bottom"
    for _ in range(100):
        deep = [deep]
    body = payload([wide, {"deep": deep}, {"many": list(range(5000))}])

    text = text_of(render(body))

    assert "field000" in text and "field038 Other fields" in text  # 39 columns, then the rest
    assert "field039: value39; field040: value40" in text
    assert "… 1 more value, see data.json" in text and "bottom" not in text
    assert "[0,1,2,3,4,5" in text and ",1000" not in text  # a long list: its cell is cut


def test_data_that_is_not_an_array_is_an_item() -> None:
    text = text_of(render(json.dumps({"info": {}, "data": {"type": "open", "time": "x"}}).encode()))
    assert "1 Times a message was opened" in text


def test_caps_are_noted_and_counts_still_cover_everything() -> None:
    extra = 3
    messages = [
        mime(f"Number {n}", date_header="Mon, 02 Feb 2026 10:00:00 +0000")
        for n in range(MESSAGE_CAP + extra)
    ]
    opens = [opened(f"2026-02-03 10:00:{n % 60:02d}") for n in range(ROW_CAP + extra)]
    long_value = "x" * (CELL_CHARS * 3)
    body = payload(messages, opens, [{"note": long_value}])

    text = text_of(render(body))

    assert f"{MESSAGE_CAP + extra:,} Messages sent to you" in text
    assert f"{extra} more messages are in data.json beside this report." in text
    assert f"{ROW_CAP + extra:,} Times a message was opened" in text
    assert f"{extra} more opens are in data.json beside this report." in text
    assert (
        f"February 2026 {MESSAGE_CAP + extra:,} {ROW_CAP + extra:,} 0 0" in text
    )  # the month table
    assert "x" * CELL_CHARS + "…" in text and "x" * (CELL_CHARS + 1) not in text


@pytest.mark.parametrize("seed", [1, 2])
def test_chunk_boundaries_anywhere_give_the_same_report(seed: int) -> None:
    body = payload(
        [mime("=?utf-8?q?Gr=C3=BC=C3=9Fe?=", 'Grüße, café ☕ "quoted" \\ slash/'), opened()],
        [{"type": "survey", "answers": {"q": "a"}}, 1.5, None, True, [1, [2]]],
    )
    whole = render(body)
    sizes = random.Random(seed)

    def bytewise(block_bytes: int) -> str:
        builder = ReportBuilder(context(), block_bytes=block_bytes)
        position = 0
        while position < len(body):
            step = sizes.randint(1, 7)
            builder.feed(body[position : position + step])
            position += step
        return builder.render().decode()

    assert bytewise(1) == whole  # every piece goes to the parser on its own
    assert bytewise(64) == whole
    assert render(body, chunk=1) == whole


def test_broken_json_shows_what_was_read_and_says_so() -> None:
    body = payload([mime("First one"), opened()], [mime("Second one"), opened()])
    cut = body[: body.index(b"Second one") + 200]

    text = text_of(render(cut))

    assert "This report is incomplete. The file data.json ends too early" in text
    assert "First one" in text and "Second one" in text
    # The open the file breaks off in is shown with what was read of it.
    assert "2 Messages sent to you" in text and "2 Times a message was opened" in text


def test_damaged_json_and_bad_utf8_and_emptiness_are_reported_not_raised() -> None:
    damaged = payload([mime("Before the damage")]).replace(b"]]", b"]],,oops")
    text = text_of(render(damaged))
    assert "The file data.json is damaged" in text and "Before the damage" in text

    text = text_of(render(b'{"info":{},"data":[["caf\xe9"]]}'))
    assert "The file data.json is damaged" in text and "invalid bytes in UTF8" in text

    assert "The file data.json is empty." in text_of(render(b""))


def test_events_are_counted_per_type_unknown_types_included() -> None:
    windows = [
        make_events(date(2026, 1, 1), date(2026, 2, 1), 2, email="ann@example.com"),
        make_events(date(2026, 2, 1), date(2026, 3, 1), 2, first_id=1000),
        [{"event": "open", "time": "2026-02-10 10:00:00", "data": {}}, {"data": {"x": 1}}],
    ]
    every = [event for window in windows for event in window]
    per_type = Counter(event.get("event", "unknown") for event in every)

    page = render(payload(), events=windows, events_range=(date(2026, 1, 1), date(2026, 3, 1)))
    text = text_of(page)

    assert "recorded from 1 January 2026 to 28 February 2026" in text
    assert (
        f"Delivery attempts a mail server tried to deliver a message to you {per_type['attempt']}"
        in text
    )
    assert f"Opens a message was opened (its images were loaded) {per_type['open']}" in text
    assert (
        f"bounce-later a kind of event Copernica does not describe {per_type['bounce-later']}"
        in text
    )
    assert f"unknown a kind of event Copernica does not describe {per_type['unknown']}" in text
    assert f"All events {len(every)}" in text and f"{len(every)} Events" in text
    assert f"January 2026 0 0 0 {31 * 2}" in text and f"February 2026 0 0 0 {28 * 2 + 1}" in text
    assert "events.jsonl" in text
    assert "<svg" in page and "Bar chart; the same numbers are in the table" in text


def test_without_events_or_controller_the_report_says_so_plainly() -> None:
    text = text_of(render(payload([mime()]), controller=None))
    assert "Who holds the data The company that sent you e-mail" in text
    assert (
        "Events (deliveries, opens and clicks as the mail system logged them) were not part" in text
    )
    assert "events.jsonl" not in text


def test_the_page_is_html5_with_balanced_elements() -> None:
    page = render(payload_bytes(PayloadSpec("email", "ann@example.com", "7", 100_000)))
    assert page.startswith('<!DOCTYPE html>\n<html lang="en">')
    assert '<meta charset="utf-8">' in page

    void = {"meta", "br", "hr", "img", "input", "link"}
    open_tags: list[str] = []

    class Balance(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            if tag not in void:
                open_tags.append(tag)

        def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            pass

        def handle_endtag(self, tag: str) -> None:
            assert open_tags and open_tags.pop() == tag, tag

    Balance().feed(page)
    assert open_tags == []


def test_memory_stays_bounded_for_a_large_archive() -> None:
    """120 MiB of 1 MiB messages, fed in 64 KiB chunks: the report never holds the archive,
    nor a whole message more than briefly."""
    message = mime("Big", "text " * 200) + "\r\n" + "A" * MIB

    def chunks() -> Iterator[bytes]:
        yield b'{"info":{"type":"email","id":"ann@example.com"},"data":['
        one = json.dumps([message, opened()]).encode()
        for n in range(120):
            yield (b"," if n else b"") + one
        yield b"]}"

    builder = ReportBuilder(context())
    tracemalloc.start()
    try:
        for piece in chunks():
            for start in range(0, len(piece), 64 * 1024):
                builder.feed(piece[start : start + 64 * 1024])
        page = builder.render()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert "120 Messages sent to you" in text_of(page.decode())
    assert peak < 24 * MIB, f"peak {peak / MIB:.0f} MiB"


# -- in a real browser ----------------------------------------------------------------------


async def test_a_hostile_report_in_a_real_browser_runs_nothing_and_loads_nothing(
    aiohttp_server: Any,
) -> None:
    tracker = "http://evil.example/t.gif"
    html_body = (
        f'<p>Hello</p><img src="{tracker}"><script>window.pwned=4</script>'
        f'<link rel="stylesheet" href="http://evil.example/s.css">'
    )
    body = payload(
        [
            mime(HOSTILE_SCRIPT, html_body, content_type="text/html", sender=HOSTILE_IMG),
            {"type": "click", "time": "2026-01-06 12:00:00", "url": HOSTILE_LINK},
            opened(useragent=f'{HOSTILE_IMG}<img src="{tracker}">'),
            {"css": f"<style>body{{background:url({tracker})}}</style>", HOSTILE_SCRIPT: 1},
        ]
    )
    page_bytes = render(body, subject_label=HOSTILE_SCRIPT).encode()

    async def report(request: web.Request) -> web.Response:
        return web.Response(body=page_bytes, content_type="text/html", charset="utf-8")

    app = web.Application()
    app.router.add_get("/report.html", report)
    server = await aiohttp_server(app, host="127.0.0.1")

    async with chromium() as browser:
        page = await browser.new_page()
        requested: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        await page.goto(str(server.make_url("/report.html")))
        await page.wait_for_load_state("networkidle")
        visible = await page.inner_text("body")
        pwned = await page.evaluate("window.pwned")
        # The one link allowed: the supervisory authority's, from the article-15 statement.
        elements = await page.evaluate(
            "document.querySelectorAll('script, img, link, iframe, [src], "
            f'a[href]:not([href="{AUTHORITY_URL}"])\').length'
        )

    assert HOSTILE_SCRIPT in visible and HOSTILE_LINK in visible and HOSTILE_IMG in visible
    assert pwned is None and elements == 0
    assert requested and all(urlsplit(url).hostname == "127.0.0.1" for url in requested), requested


async def test_the_report_prints_without_cutting_tables() -> None:
    unbroken = "https://shop.test/" + "a" * 600
    body = payload(
        [mime("Long link")] + [{"type": "click", "time": "2026-01-06", "url": unbroken}] * 30,
        [{f"field{n}": "value " * 10 for n in range(12)}],
    )
    html = render(body)

    async with chromium() as browser:
        page = await browser.new_page(viewport={"width": 700, "height": 1000})
        await page.set_content(html)
        await page.emulate_media(media="print")
        too_wide = await page.evaluate(
            "[...document.querySelectorAll('table')]"
            ".filter(t => t.getBoundingClientRect().right > document.documentElement.clientWidth)"
            ".length"
        )
        pdf = await page.pdf(format="A4")

    assert too_wide == 0
    assert pdf.startswith(b"%PDF") and len(re.findall(rb"/Type\s*/Page\b", pdf)) >= 2


def test_simulator_chunks_of_any_size_give_one_report() -> None:
    spec = PayloadSpec("email", "ann@example.com", "9", 150_000)
    whole = render(payload_bytes(spec))
    builder = ReportBuilder(context(), block_bytes=4096)
    for chunk in payload_chunks(spec):
        builder.feed(chunk)
    assert builder.render().decode() == whole


# -- the whole person ---------------------------------------------------------------------------

HOSTILE_FIELD = '<img src=x onerror="window.pwned=6">'


async def test_the_whole_person_in_a_real_browser() -> None:
    """Two sources' data with one message in both, a profile with a subprofile, a subprofile
    whose profile is no source, a gone profile and an unsupported address: what a reader sees."""
    facts = (
        SourceFact("email", "email", "", "unsupported"),
        SourceFact("profile:101", "profile", "101", "archived", "Newsletter", found_by="Email"),
        SourceFact("subprofile:1001", "subprofile", "1001", "archived", "Newsletter", "Orders",
                   profile="101"),
        SourceFact("subprofile:2002", "subprofile", "2002", "archived", "Shop", "Returns",
                   profile="303"),
        SourceFact("profile:202", "profile", "202", "gone", "Archive"),
    )  # fmt: skip
    builder = ReportBuilder(context(sources=facts))
    builder.begin("sources/profile-101/data.json", last=False)
    builder.feed(payload([mime("Shared news"), opened()], [mime("Only in the profile")]))
    builder.begin("sources/subprofile-1001/data.json")
    builder.feed(payload([mime("Shared news"), opened()]))
    details = {
        "profile:101": {
            "ID": "101",
            "fields": {"Name": "Ann", "City": HOSTILE_SCRIPT, "Note": HOSTILE_FIELD},
            "interests": ["news", "offers"],
            "created": "2025-01-02 10:00:00",
            "modified": "2026-03-04 11:00:00",
        },
        "subprofile:1001": {"ID": "1001", "profile": "101", "fields": {"Order": "A-17"}},
        "subprofile:2002": {"ID": "2002", "profile": "303", "fields": {"Reason": "too small"}},
    }
    for source, record in details.items():
        builder.add_details(source, json.dumps(record).encode())
    html = builder.render().decode()

    async with chromium() as browser:
        page = await browser.new_page()
        await page.set_content(html)
        first_h2 = await page.inner_text("main h2")
        person = await page.inner_text("#details article:first-of-type > h3")
        fields = await page.inner_text("#details article:first-of-type")
        nested = await page.inner_text("#details article:first-of-type .sub")
        loose = await page.inner_text("#details article:nth-of-type(2)")
        found = await page.inner_text("#found")
        subjects = await page.eval_on_selector_all(".message h3", "hs => hs.map(h => h.innerText)")
        looked = await page.inner_text("#looked")
        statement = await page.inner_text("#statement")
        authority = await page.get_attribute("#statement a", "href")
        pwned = await page.evaluate("window.pwned")
        images = await page.evaluate("document.querySelectorAll('img, script').length")

    assert first_h2 == "Your details"
    assert person.startswith("Newsletter") and "profile 101" in person
    assert "Name\nAnn" in fields and f"City\n{HOSTILE_SCRIPT}" in fields
    assert f"Note\n{HOSTILE_FIELD}" in fields and "Interests\nnews, offers" in fields
    assert "Created\n2025-01-02 10:00:00" in fields
    assert nested.startswith("Orders") and "Order\nA-17" in nested
    assert loose.startswith("Returns (in database Shop)") and "Reason\ntoo small" in loose
    assert "2\nMessages sent to you" in found and "1\nTimes a message was opened" in found
    assert sorted(subjects) == ["Only in the profile", "Shared news"]
    assert "your e-mail address: this kind of request is not offered by our e-mail provider" in (
        looked
    )
    assert (
        "profile 101 in database Newsletter (your address is in its field “Email”): collected"
        in (looked)
    )
    assert "subprofile 1001 in collection Orders of database Newsletter: collected" in looked
    assert "profile 202 in database Archive: removed before we could collect it" in looked
    assert "article 77" in statement and "Autoriteit Persoonsgegevens" in statement
    assert "article 16" in statement and "Copernica" in statement
    assert authority == AUTHORITY_URL == "https://autoriteitpersoonsgegevens.nl"
    assert pwned is None and images == 0
