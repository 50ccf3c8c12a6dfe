"""The headless browser the page tests share: Debian's chromium driven by Playwright's sync API.

One Playwright session serves the whole test session (`browser` fixture in conftest.py): its sync API runs an
event loop, and a second `sync_playwright()` started while the first is open fails ("using Playwright Sync API
inside the asyncio loop"), so no test starts its own.

Set-up (no download): `apt-get install -y chromium` and `pip install playwright` (never `playwright install`);
the chromium binary can be moved with EXTRACTOR_CHROMIUM.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("EXTRACTOR_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
INSTALL_HINT = (
    "install the browser test tools: `apt-get install -y chromium` (Debian package, /usr/bin/chromium) and "
    "`.venv/bin/pip install playwright` (do NOT run `playwright install`)"
)


def launched_chromium() -> Iterator[Any]:
    """A launched chromium for the session, closed with its Playwright session at the end; a missing tool fails
    the test with how to install it (never a skip)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"playwright is missing: {INSTALL_HINT}", pytrace=False)
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no chromium at {CHROMIUM}: {INSTALL_HINT}", pytrace=False)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
