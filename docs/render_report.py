"""Renders docs/report.png: the top of the report a data subject finds in her access package,
as a real chromium shows it, at 1200 x 1600 pixels.

Run from the repository root: `.venv/bin/python docs/render_report.py` (needs chromium:
`make browser`). Nothing is built by hand: the real service, a local S3 and the Copernica
simulator (render_stack.py) answer a request for an address found in several places (the
address itself, a profile in Newsletter by its e-mail field, one in Shop by a
DISCOVERY_FIELDS text field, and a subprofile in Shop's Orders), with four months of events;
the package is downloaded through the operator API, unpacked, and its report.html opened
from disk. Dates are relative to the day it runs.
"""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path

from render_stack import ROOT, Stack, person_account, run

from tests.browser import chromium


async def render(stack: Stack) -> None:
    request_id = await stack.file_main(days_ago=2)
    await stack.packaged(request_id)
    package = zipfile.ZipFile(io.BytesIO(await stack.package(request_id)))
    picture = ROOT / "docs" / "report.png"
    with tempfile.TemporaryDirectory() as folder:
        package.extractall(folder)
        report = Path(folder) / "report.html"
        async with chromium() as browser:
            page = await browser.new_page(viewport={"width": 1200, "height": 1600})
            await page.goto(report.as_uri())
            await page.screenshot(path=str(picture))
    print(f"wrote {picture}")


if __name__ == "__main__":
    run(person_account(), render)
