"""The web UI in a real browser (Debian's chromium through Playwright), on both databases.

One `prefloop serve` process per backend serves the whole module (see tests/browser.py);
each test signs in as accounts of its own.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Page

from app.auth.models import Role
from app.web import NAVIGATION, SESSION_COOKIE

if TYPE_CHECKING:
    from tests.browser import Browsing, LiveServer

pytest_plugins = ["tests.browser"]
pytestmark = pytest.mark.browser

XSS_NAME = '<img src=x onerror="window.__xss=1">{{7*7}}</textarea><script>window.__xss=2</script>'


def path_of(page: Page) -> str:
    return urlsplit(page.url).path


def nav_links(page: Page) -> list[tuple[str, str]]:
    return [
        (link.inner_text().strip(), link.get_attribute("href") or "")
        for link in page.locator("nav.nav a").all()
    ]


def foreign_pages(role: Role) -> list[str]:
    """Pages in other roles' navigation that this role's navigation does not offer."""
    own = {href for _, href in NAVIGATION[role]}
    return list(
        dict.fromkeys(
            href
            for other, links in NAVIGATION.items()
            if other != role
            for _, href in links
            if href not in own
        )
    )


@pytest.mark.parametrize("role", list(Role), ids=lambda role: role.value)
def test_role_signs_in_sees_its_pages_only_and_signs_out(
    role: Role, server: LiveServer, browsing: Browsing
) -> None:
    username = f"nav-{role.value}"
    server.create_user(username, role)
    context = browsing.new_context()
    page = browsing.new_page(context)

    response = page.goto("/")
    assert response is not None and response.status == 200
    assert path_of(page) == "/login", "an anonymous visitor must be sent to the login page"

    response = browsing.submit_login(page, username)
    home = NAVIGATION[role][0][1]
    assert response.status == 200, response.url
    assert path_of(page) == home
    assert nav_links(page) == NAVIGATION[role]
    assert page.locator(".role-badge").inner_text().strip() == role.value
    assert page.locator("nav.nav").get_attribute("data-role") == role.value

    forbidden = foreign_pages(role)
    assert forbidden, f"NAVIGATION gives {role.value} every page; nothing to refuse"
    for href in forbidden:
        response = page.goto(href)
        assert response is not None
        assert response.status == 403, f"{role.value} opening {href}: {response.status}"
        assert page.locator("h1").inner_text().strip() == "Not allowed"
        assert "Your role does not give access to this page." in page.locator("main").inner_text()
        content = page.content()
        assert "Traceback" not in content and 'File "' not in content, content
        assert nav_links(page) == NAVIGATION[role], "the 403 page keeps the user's own menu"

    cookies = [cookie for cookie in context.cookies() if cookie["name"] == SESSION_COOKIE]
    assert len(cookies) == 1, context.cookies()
    assert cookies[0]["httpOnly"], "the session cookie must be HttpOnly"

    # The saved cookie works in another browser while the session lives...
    replay = browsing.new_context()
    replay.add_cookies(cookies)
    replay_page = browsing.new_page(replay)
    replay_page.goto("/")
    assert path_of(replay_page) == home

    page.goto(home)
    with page.expect_navigation():
        page.get_by_role("button", name="Log out").click()
    assert path_of(page) == "/login"
    assert page.get_by_role("button", name="Sign in").is_visible()
    assert not [c for c in context.cookies() if c["name"] == SESSION_COOKIE]

    # ...and is dead everywhere after logging out.
    late = browsing.new_context()
    late.add_cookies(cookies)
    late_page = browsing.new_page(late)
    late_page.goto("/")
    assert path_of(late_page) == "/login"
    replay_page.goto(home)
    assert path_of(replay_page) == "/login"


def test_wrong_password_stays_on_login_with_401(server: LiveServer, browsing: Browsing) -> None:
    server.create_user("wrong-pw", Role.labeler)
    page = browsing.new_page()

    response = browsing.login(page, "wrong-pw", "not the right password at all")

    assert response.status == 401
    assert path_of(page) == "/login"
    assert page.get_by_role("alert").inner_text().strip() == "Wrong username or password."
    assert page.get_by_label("Username").input_value() == "wrong-pw"
    assert page.get_by_label("Password").input_value() == ""
    assert not [c for c in page.context.cookies() if c["name"] == SESSION_COOKIE]


def test_pages_run_under_the_csp_without_errors(server: LiveServer, browsing: Browsing) -> None:
    server.create_user("csp-admin", Role.admin)
    page = browsing.new_page()

    response = page.goto("/login")
    assert response is not None
    csp = response.headers.get("content-security-policy", "")
    assert "script-src 'self'" in csp and "unsafe-eval" not in csp and "unsafe-inline" not in csp

    browsing.login(page, "csp-admin")
    assert path_of(page) == "/admin"
    for _, href in NAVIGATION[Role.admin]:
        response = page.goto(href)
        assert response is not None and response.status == 200, href
    for href, status in (("/label", 403), ("/no-such-page", 404)):
        response = page.goto(href)
        assert response is not None and response.status == status, href
    page.goto("/admin")

    assert page.evaluate("typeof window.htmx") == "object", "htmx did not load"
    config = page.evaluate(
        "({allowEval: htmx.config.allowEval, allowScriptTags: htmx.config.allowScriptTags,"
        " selfRequestsOnly: htmx.config.selfRequestsOnly})"
    )
    assert config == {"allowEval": False, "allowScriptTags": False, "selfRequestsOnly": True}
    assert page.evaluate("typeof window.prefloopToast") == "function", "app.js did not run"

    assert browsing.csp_violations() == []
    assert browsing.page_errors == []
    assert browsing.console_errors() == []

    # The watch itself works: an inline script is refused and the refusal is seen.
    page.evaluate(
        "() => { const s = document.createElement('script');"
        " s.textContent = 'window.__inline = 1'; document.body.appendChild(s); }"
    )
    page.wait_for_timeout(100)
    assert page.evaluate("typeof window.__inline") == "undefined"
    assert browsing.csp_violations(), browsing.console
    browsing.clear()


def test_untrusted_display_name_renders_as_text(server: LiveServer, browsing: Browsing) -> None:
    server.create_user("xss-admin", Role.admin, display_name=XSS_NAME)
    page = browsing.new_page()

    browsing.login(page, "xss-admin")
    assert path_of(page) == "/admin"
    who = page.locator(".who").inner_text()
    assert XSS_NAME in who
    assert "49" not in who
    page.goto("/admin/users")
    assert page.locator("td", has_text=XSS_NAME).count() == 1

    assert page.evaluate("typeof window.__xss") == "undefined"
    assert page.locator(".who img, .who script, td img, td script").count() == 0
    requested = browsing.requested_paths()
    assert "/admin/users" in requested, "the request log is empty: the listener is not working"
    assert not [path for path in requested if path.endswith("/x")], requested


def test_htmx_request_after_session_ends_goes_to_login(
    server: LiveServer, browsing: Browsing
) -> None:
    user = server.create_user("expiry-admin", Role.admin)
    page = browsing.new_page()
    browsing.login(page, "expiry-admin")
    assert path_of(page) == "/admin"
    page.wait_for_function("typeof window.htmx === 'object'")

    assert server.end_sessions(user) == 1

    with page.expect_response(
        lambda r: r.request.headers.get("hx-request") == "true" and r.url.endswith("/admin")
    ) as answer:
        # Not awaited: the navigation that should follow destroys the page's JS context.
        page.evaluate("() => { htmx.ajax('GET', '/admin', {target: 'main', swap: 'innerHTML'}); }")
    assert answer.value.status == 401
    # Back to where the request came from, after signing in again.
    assert answer.value.headers.get("hx-redirect") == "/login?next=/admin"
    page.wait_for_url(re.compile(r"/login(\?|$)"))
    assert path_of(page) == "/login"
    assert page.get_by_role("button", name="Sign in").is_visible()
    assert page.locator("nav.nav").count() == 0


def test_admin_disables_a_user_in_place_with_htmx(server: LiveServer, browsing: Browsing) -> None:
    """The Disable button swaps just that row (CSRF header from <body>), then Enable undoes it."""
    server.create_user("row-admin", Role.admin)
    target = server.create_user("row-target", Role.labeler)
    page = browsing.new_page()
    browsing.login(page, "row-admin")
    page.goto("/admin/users")
    page.wait_for_function("typeof window.htmx === 'object'")
    row = page.locator(f"#user-{target.id}")
    navigations: list[str] = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url))

    with page.expect_response(
        lambda r: r.url.endswith(f"/admin/users/{target.id}/active")
    ) as answer:
        row.get_by_role("button", name="Disable").click()
    assert answer.value.status == 200
    assert answer.value.request.headers.get("x-csrf-token"), "htmx did not send the CSRF header"
    row.get_by_role("button", name="Enable").wait_for()
    assert "disabled" in row.inner_text()
    assert navigations == [], "the page reloaded instead of swapping the row"

    row.get_by_role("button", name="Enable").click()
    row.get_by_role("button", name="Disable").wait_for()
    assert "active" in row.inner_text()


def test_a_new_api_token_has_a_copy_button(server: LiveServer, browsing: Browsing) -> None:
    server.create_user("copy-researcher", Role.researcher)
    context = browsing.new_context()
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    page = browsing.new_page(context)
    browsing.login(page, "copy-researcher")
    page.goto("/tokens")
    assert page.get_by_test_id("copy-token").count() == 0, "no token, nothing to copy"
    page.get_by_label("Name").fill("training box")
    with page.expect_navigation():
        page.get_by_role("button", name="Create token").click()
    secret = page.get_by_label("New API token").input_value()
    assert len(secret) > 20

    page.get_by_test_id("copy-token").click()
    page.wait_for_function(
        "() => document.getElementById('copy-status').textContent.includes('Copied')"
    )
    assert page.evaluate("() => navigator.clipboard.readText()") == secret
