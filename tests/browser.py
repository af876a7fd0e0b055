"""A real headless browser for tests: Debian's chromium, driven by playwright.

Playwright's own browser download is not used (`make browser` installs the distribution's
package instead), so the executable is given explicitly. The flags keep chromium from
calling home, so a test that watches requests sees only the page's own.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from playwright.async_api import Browser, async_playwright

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    found = shutil.which("chromium")
    if found:
        return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """A launched headless chromium, closed on exit; skips the test if none is installed."""
    path = chromium_path()
    if path is None:
        pytest.skip("chromium is not installed; `make browser` (run by `make test`) installs it")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=path, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()
