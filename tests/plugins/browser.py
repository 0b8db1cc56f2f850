"""Debian's Chromium, headless, driven by Playwright (the PyPI package). Playwright's own browser
download cannot run here, so the system browser is launched by path. One browser per test module;
each test gets a fresh context (no shared sessionStorage) whose console errors and uncaught page
errors fail the test, and `shot(page, name)` saves a screenshot under test-artifacts/."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
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
DESKTOP = {"width": 1280, "height": 900}
NARROW = {"width": 390, "height": 844}


def chromium_path() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        raise RuntimeError(f"browser tests need Debian's chromium at {path}: apt-get install chromium")
    return path


_FAILED_LOAD = re.compile(r"Failed to load resource: the server responded with a status of (\d{3})")


class ConsoleErrors:
    """Everything the page reported as an error: console.error, uncaught exceptions, failed loads.

    Chromium itself logs every HTTP error answer as a console error. A test that provokes one on
    purpose (a refused spec is a 422) says so with `allow(422)`; any other status still fails."""

    def __init__(self, page):
        self.items: list[str] = []
        self.allowed: set[int] = set()
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.items.append(f"uncaught: {e}"))

    def allow(self, *statuses: int) -> None:
        self.allowed.update(statuses)

    def _console(self, message) -> None:
        if message.type != "error":
            return
        m = _FAILED_LOAD.search(message.text)
        if m and int(m.group(1)) in self.allowed:
            return
        self.items.append(f"console: {message.text} ({message.location.get('url', '')})")


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    """A new tab at 1280 px in its own context; the test fails on any console error."""
    context = browser.new_context(viewport=DESKTOP, accept_downloads=True)
    context.set_default_timeout(15_000)
    p = context.new_page()
    errors = ConsoleErrors(p)
    p.console_errors = errors
    try:
        yield p
    finally:
        context.close()
    assert errors.items == [], "the page logged errors:\n" + "\n".join(errors.items)


def shot(page, name: str) -> Path:
    """Save a full-page screenshot as a test artifact; returns its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
