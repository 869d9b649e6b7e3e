"""Fixtures for the web pages: the app with its pages, served on a real socket, and Chromium.

The browser is Debian's Chromium (``apt-get install chromium``) driven by the Python
Playwright package; nothing is downloaded. Browser tests run on PostgreSQL only (a second
real worker for SQLite would cost another ~30 s, and the pages only call /v1, whose SQLite
behaviour tests/api covers); set WEB_TESTS_ALL_DATABASES=1 to run them on SQLite too.
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from werkzeug.serving import make_server

from tests import support

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
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
SCREENSHOTS = support.OUTPUT / "screenshots"
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
EXPECT_TIMEOUT_MS = 30_000


def pytest_collection_modifyitems(config, items):
    """Browser tests run on PostgreSQL only: they are deselected on SQLite (a second
    worker start costs ~30 s; the pages' SQL is the same). WEB_TESTS_ALL_DATABASES=1
    runs them on both."""
    if os.environ.get("WEB_TESTS_ALL_DATABASES") == "1":
        return
    here = Path(__file__).parent
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_sqlite_browser = (
            here in Path(item.fspath).parents
            and "browser" in item.fixturenames
            and callspec is not None
            and callspec.params.get("db_url") == "sqlite"
        )
        (drop if on_sqlite_browser else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def web_app_for(config):
    """A fresh app on ``config`` (create_app registers the pages)."""
    from api import create_app

    return create_app(config)


class LiveServer:
    """The app on 127.0.0.1 in a thread, like the real server the browser needs."""

    def __init__(self, app) -> None:
        self.app = app
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def new_user(self) -> dict:
        """A user made through POST /v1/users (the pages' own sign-up is tested separately)."""
        username = f"web{uuid.uuid4().hex[:10]}"
        resp = requests.post(
            f"{self.url}/v1/users",
            json={"username": username, "password": "correct-horse"},
            timeout=30,
        )
        assert resp.status_code == 201, resp.text
        return {"username": username, "password": "correct-horse", "key": resp.json()["api_key"]}

    def new_admin(self) -> dict:
        username = f"admin{uuid.uuid4().hex[:8]}"
        result = self.app.test_cli_runner().invoke(
            args=["create-admin", username, "--password", "admin-secret"]
        )
        assert result.exit_code == 0, result.output
        return {"username": username, "password": "admin-secret"}


@pytest.fixture(scope="session")
def live(stack) -> Iterator[LiveServer]:
    """The pages and /v1 with the stack's real worker and model behind them."""
    server = LiveServer(web_app_for(stack.config))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def idle(api_stack) -> Iterator[LiveServer]:
    """The same, with no worker: jobs stay queued (queued states, cancel, running dry)."""
    server = LiveServer(web_app_for(api_stack.config))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists() and not shutil.which(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Session:
    """One browser context (its own cookies) with checks that run on every page."""

    def __init__(self, browser, base_url: str, viewport: dict) -> None:
        self.context = browser.new_context(
            base_url=base_url,
            viewport=viewport,
            accept_downloads=True,
            locale="en-US",
            reduced_motion="reduce",  # no transitions half-way through in screenshots
        )
        self.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base_url)
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("console", self._console)
        self.page.on("dialog", lambda d: d.accept())

    def _console(self, message) -> None:
        # Chromium logs every 4xx answer as "Failed to load resource"; the pages expect
        # some (402, 415, ...) and show them as messages, which the tests check.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.errors.append(f"console: {message.text}")

    def log_in(self, user: dict) -> None:
        page = self.page
        page.goto("/app/login")
        page.get_by_label("Username").fill(user["username"])
        page.get_by_label("Password").fill(user["password"])
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url("**/app/classify")

    def shot(self, name: str, viewport: dict | None = None) -> None:
        """Save a full-page screenshot after checking labels, alt text and width.

        With ``viewport``, the window is resized for this one screenshot.
        """
        before = self.page.viewport_size
        if viewport:
            self.page.set_viewport_size(viewport)
        check_accessible(self.page)
        self.page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)
        if viewport:
            self.page.set_viewport_size(before)

    def close(self) -> None:
        self.context.close()


def check_accessible(page) -> None:
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input:not([type=hidden]), textarea, select')]
            .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                          && !el.getAttribute('aria-labelledby'))
            .map(el => el.id || el.name || el.outerHTML)"""
    )
    assert unlabelled == [], f"inputs without a label on {page.url}: {unlabelled}"
    no_alt = page.evaluate(
        "() => [...document.images].filter(i => !i.hasAttribute('alt')).map(i => i.src)"
    )
    assert no_alt == [], f"images without alt text on {page.url}: {no_alt}"
    width = page.evaluate("() => document.documentElement.scrollWidth")
    viewport = page.viewport_size["width"]
    assert width <= viewport, f"{page.url} is {width}px wide in a {viewport}px window"


def _local(url: str) -> bool:
    if url.startswith("data:"):
        return True
    if url.startswith("blob:"):  # an object URL carries the origin that made it
        url = url[len("blob:") :]
    return urlsplit(url).hostname == "127.0.0.1"


@pytest.fixture
def sessions(browser) -> Iterator[Callable[..., Session]]:
    """Open browser sessions; at the end, none may have errors or reached another host."""
    opened: list[Session] = []

    def open_session(server: LiveServer, viewport: dict = DESKTOP) -> Session:
        session = Session(browser, server.url, viewport)
        opened.append(session)
        return session

    yield open_session
    for session in opened:
        session.close()
    for session in opened:
        assert session.errors == [], session.errors
        outside = [u for u in session.requests if not _local(u)]
        assert outside == [], f"requests to other hosts: {outside}"
