"""Shared pieces for real-browser tests: a live `prefloop serve` process and Playwright pages.

Use from a test module with

    pytest_plugins = ["tests.browser"]

and import this module's names only under `if TYPE_CHECKING:` (importing it at run time
before pytest registers it as a plugin stops pytest from rewriting its asserts). Tests that use them should carry `@pytest.mark.browser`. The browser is Debian's chromium
(`apt-get install chromium`, or `make browser`), never Playwright's download: without it the
tests skip, except under CI=true where they fail.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    Response,
    sync_playwright,
)
from playwright.sync_api import Error as PlaywrightError
from sqlalchemy import delete

from app.auth import service as auth_service
from app.auth.models import Role, User, UserSession
from app.db import Database
from tests.conftest import IN_CI, PASSWORD
from tests.databases import Backend, free_port

# The machine has no internet: keep chromium from trying to reach Google.
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SERVER_START_TIMEOUT = 30.0
# Playwright waits (milliseconds): long enough for a loaded 2-core CI box, short enough to fail.
TIMEOUT_MS = 15_000


def chromium_path() -> str | None:
    return shutil.which("chromium")


# --- the server -------------------------------------------------------------------------------


@dataclass
class LiveServer:
    """A `prefloop serve` process on its own fresh database."""

    backend: str
    url: str  # http://127.0.0.1:PORT
    database_url: str
    log_path: Path
    process: subprocess.Popen[bytes]
    database: Database

    def create_user(
        self, username: str, role: Role, *, password: str = PASSWORD, display_name: str = ""
    ) -> User:
        """Create an account directly in the server's database (committed)."""
        with self.database.session() as session:
            user = auth_service.create_user(
                session,
                username=username,
                role=role,
                password=password,
                display_name=display_name,
            )
            session.commit()
            return user

    def end_sessions(self, user: User) -> int:
        """Delete the user's login sessions server-side; returns how many there were."""
        with self.database.session() as session:
            result = session.execute(delete(UserSession).where(UserSession.user_id == user.id))
            session.commit()
            return result.rowcount

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_text(self, offset: int = 0) -> str:
        with self.log_path.open("rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")


def _prefloop_command() -> str:
    beside_python = Path(sys.executable).parent / "prefloop"
    return (
        str(beside_python) if beside_python.exists() else (shutil.which("prefloop") or "prefloop")
    )


def start_server(database_url: str, workdir: Path, backend: str = "") -> LiveServer:
    """Start `prefloop serve` on a free port and wait until it answers."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFLOOP_")}
    env.update(
        PREFLOOP_DATABASE_URL=database_url,
        PREFLOOP_ENV="dev",
        PREFLOOP_DATA_DIR=str(workdir / "data"),
        PYTHONUNBUFFERED="1",
    )
    log_path = workdir / "server.log"
    with log_path.open("wb") as log:
        # cwd is the temp folder, so a developer's ./.env cannot leak into the test server.
        process = subprocess.Popen(
            [_prefloop_command(), "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = LiveServer(
        backend=backend,
        url=f"http://127.0.0.1:{port}",
        database_url=database_url,
        log_path=log_path,
        process=process,
        database=Database(database_url),
    )
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while True:
        if process.poll() is not None:
            stop_server(server)
            pytest.fail(
                f"prefloop serve exited with {process.returncode} before listening:\n"
                + server.log_text()
            )
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return server
        if time.monotonic() > deadline:
            stop_server(server)
            pytest.fail(
                f"prefloop serve did not listen on {port} within {SERVER_START_TIMEOUT}s:\n"
                + server.log_text()
            )
        time.sleep(0.05)


def stop_server(server: LiveServer) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=10)
    server.database.dispose()


@pytest.fixture(scope="module")
def live_server(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server per test module and backend, on a fresh migrated database (like
    `fresh_database_url`, but shared by the module's tests to keep browser tests quick).

    Tests sharing it create the accounts they need with `live_server.create_user(...)`,
    under names no other test of the module uses.
    """
    url = backend.clone()
    server = start_server(url, tmp_path_factory.mktemp(f"server-{backend.name}"), backend.name)
    try:
        yield server
    finally:
        stop_server(server)
        backend.drop(url)


def _report(config: pytest.Config, title: str, text: str) -> None:
    """Write past pytest's output capture: output of a passing teardown is never shown."""
    capture = config.pluginmanager.get_plugin("capturemanager")
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        if reporter is not None:
            reporter.write_line("")
            reporter.write_sep("-", title)
            reporter.write_line(text.rstrip() or "(empty)")
        else:
            sys.stderr.write(f"\n--- {title} ---\n{text}\n")


@pytest.fixture
def server(live_server: LiveServer, request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    """The module's live server, checked alive; its log is printed when the test fails."""
    if live_server.process.poll() is not None:
        pytest.fail(
            f"prefloop serve has exited ({live_server.process.returncode}):\n"
            + live_server.log_text()
        )
    offset = live_server.log_size()
    failed_before = request.session.testsfailed
    yield live_server
    if request.session.testsfailed > failed_before:
        _report(
            request.config,
            f"prefloop serve output during {request.node.nodeid}",
            live_server.log_text(offset),
        )


# --- the browser ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """Debian's chromium, headless, started once per test session."""
    executable = chromium_path()
    if executable is None:
        message = "chromium is not installed: apt-get install chromium (or `make browser`)"
        if IN_CI:
            pytest.fail(f"browser tests need chromium under CI=true; {message}")
        pytest.skip(message)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_ARGS, headless=True
        )
        yield chromium
        chromium.close()


@dataclass
class Browsing:
    """Contexts and pages on one server, with everything the pages said recorded.

    Every page opened through `new_page` reports its console messages, uncaught errors and
    requests here, so a test (or this fixture's teardown) can insist there were none.
    """

    browser: Browser
    base_url: str
    console: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    contexts: list[BrowserContext] = field(default_factory=list)

    def new_context(self) -> BrowserContext:
        context = self.browser.new_context(base_url=self.base_url)
        context.set_default_timeout(TIMEOUT_MS)
        context.set_default_navigation_timeout(TIMEOUT_MS)
        self.contexts.append(context)
        return context

    def new_page(self, context: BrowserContext | None = None) -> Page:
        page = (context or self.new_context()).new_page()
        page.on("console", self._on_console)
        page.on("pageerror", lambda error: self.page_errors.append(f"{page.url}: {error}"))
        page.on("request", lambda request: self.requests.append(request.url))
        return page

    def _on_console(self, message: ConsoleMessage) -> None:
        self.console.append(f"[{message.type}] {message.text}")

    def csp_violations(self) -> list[str]:
        return [line for line in self.console if "Content Security Policy" in line]

    def console_errors(self) -> list[str]:
        """Console errors other than the browser noting a 4xx/5xx answer (expected in tests
        that open forbidden pages, and for the absent favicon)."""
        return [
            line
            for line in self.console
            if line.startswith("[error]")
            and "Failed to load resource" not in line
            and "Content Security Policy" not in line
        ]

    def problems(self) -> list[str]:
        return list(
            dict.fromkeys(
                [
                    *(f"CSP: {line}" for line in self.csp_violations()),
                    *(f"JS error: {line}" for line in self.page_errors),
                    *(f"console: {line}" for line in self.console_errors()),
                ]
            )
        )

    def requested_paths(self) -> list[str]:
        return [urlsplit(url).path for url in self.requests]

    def clear(self) -> None:
        self.console.clear()
        self.page_errors.clear()
        self.requests.clear()

    def close(self) -> None:
        for context in self.contexts:
            with contextlib.suppress(PlaywrightError):
                context.close()
        self.contexts.clear()

    @staticmethod
    def submit_login(page: Page, username: str, password: str = PASSWORD) -> Response:
        """Fill and submit the login form on the current page; returns the final response."""
        page.get_by_label("Username").fill(username)
        page.get_by_label("Password").fill(password)
        with page.expect_navigation() as navigation:
            page.get_by_role("button", name="Sign in").click()
        response = navigation.value
        assert response is not None, "submitting the login form did not load a page"
        return response

    def login(self, page: Page, username: str, password: str = PASSWORD) -> Response:
        """Open /login and sign in through the form."""
        page.goto("/login")
        return self.submit_login(page, username, password)


@pytest.fixture
def browsing(browser: Browser, server: LiveServer) -> Iterator[Browsing]:
    """Pages on the live server. Fails the test if any page broke the CSP or threw."""
    session = Browsing(browser, server.url)
    yield session
    problems = session.problems()
    session.close()
    if problems:
        pytest.fail("the browser reported problems:\n" + "\n".join(problems))
