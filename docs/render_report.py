"""Renders docs/report.png: the top of a data subject's report for a simulator payload.

Run from the repository root: `.venv/bin/python docs/render_report.py`. It needs chromium
(`make browser`): the picture is what a real browser shows, at 1200 x 1600 pixels.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, date, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests.browser

from service.answer.report.builder import ReportBuilder  # noqa: E402
from service.answer.report.context import ReportContext  # noqa: E402
from service.simulator.payloads import PayloadSpec, make_events, payload_chunks  # noqa: E402
from tests.browser import chromium  # noqa: E402

SUBJECT = "ann.de.vries@example.com"
SINCE, UNTIL = date(2026, 1, 1), date(2026, 7, 1)


def report_html() -> bytes:
    context = ReportContext(
        request_id="01J2Z8Q4W6X3V5K7M9N1P3R5T7",
        subject_type="email",
        subject_label=SUBJECT,
        controller="Koffiebranderij Zoë B.V.",
        received_on=date(2026, 6, 20),
        due_by=date(2026, 7, 20),
        generated_at=datetime(2026, 6, 22, 9, 41, tzinfo=UTC),
        events_range=(SINCE, UNTIL),
    )
    builder = ReportBuilder(context)
    for chunk in payload_chunks(PayloadSpec("email", SUBJECT, "4711", 300_000)):
        builder.feed(chunk)
    month = SINCE
    while month < UNTIL:  # one call per month window, as the package builder does
        following = date(month.year + month.month // 12, month.month % 12 + 1, 1)
        builder.add_events(
            make_events(month, following, 2, email=SUBJECT, first_id=month.month * 100)
        )
        month = following
    return builder.render()


async def main() -> None:
    picture = ROOT / "docs" / "report.png"
    async with chromium() as browser:
        page = await browser.new_page(viewport={"width": 1200, "height": 1600})
        await page.set_content(report_html().decode())
        await page.screenshot(path=str(picture))
    print(f"wrote {picture}")


if __name__ == "__main__":
    asyncio.run(main())
