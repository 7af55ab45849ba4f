"""Accounts and sessions: argon2id, server-side sessions, throttling, CSRF, bad input."""

from __future__ import annotations

import datetime as dt

import pytest
from argon2 import extract_parameters
from sqlalchemy import func, select

from app.auth import service
from app.auth.models import ApiToken, LoginAttempt, User, UserSession
from app.auth.passwords import (
    PasswordPolicyError,
    check_password_policy,
    hash_password,
    verify_password,
)
from app.web import LOGIN_CSRF_COOKIE, SESSION_COOKIE
from tests.conftest import PASSWORD, csrf_from, login


def post_login(client, username, password, **extra):
    page = client.get("/login")
    data = {"username": username, "password": password, "csrf_token": csrf_from(page.text), **extra}
    return client.post("/login", data=data, follow_redirects=False)


# --- passwords -----------------------------------------------------------------------------


def test_password_hashes_are_argon2id_with_owasp_parameters():
    hashed = hash_password("a long enough passphrase")
    params = extract_parameters(hashed)
    assert hashed.startswith("$argon2id$")
    assert params.memory_cost >= 19 * 1024 and params.time_cost >= 2 and params.parallelism >= 1
    assert verify_password(hashed, "a long enough passphrase")
    assert not verify_password(hashed, "a long enough passphrasE")
    assert not verify_password("not a hash", "anything")


@pytest.mark.parametrize(
    ("password", "message"),
    [
        ("short", "at least 8"),
        ("x" * 257, "at most 256"),
        ("Password123", "too common"),
        ("test-user", "username"),
    ],
)
def test_password_policy_refuses(password, message):
    with pytest.raises(PasswordPolicyError, match=message):
        check_password_policy(password, username="test-user")


def test_password_policy_allows_any_composition():
    check_password_policy("all lower case words", username="someone")
    check_password_policy("ÄÖÜ ü 漢字 emoji 🙂", username="someone")


# --- login ---------------------------------------------------------------------------------


def test_login_starts_a_server_side_session(client, users, db):
    response = post_login(client, users.labeler.username, PASSWORD)
    assert response.status_code == 303 and response.headers["location"] == "/label"
    cookie = response.cookies[SESSION_COOKIE]
    set_cookie = response.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "samesite=lax" in set_cookie
    stored = db.scalars(select(UserSession).where(UserSession.user_id == users.labeler.id)).one()
    assert stored.id == service.sha256_hex(cookie) and stored.id != cookie  # only the hash is kept
    assert len(cookie) >= 43  # 256 random bits, url-safe
    assert db.scalar(
        select(LoginAttempt.succeeded).where(LoginAttempt.username == users.labeler.username)
    )


def test_login_issues_a_new_session_id_each_time(client, users, db):
    first = post_login(client, users.admin.username, PASSWORD).cookies[SESSION_COOKIE]
    second = post_login(client, users.admin.username, PASSWORD).cookies[SESSION_COOKIE]
    assert first != second
    # The old session is ended, not left alive beside the new one (session fixation).
    assert db.scalar(select(func.count()).select_from(UserSession)) == 1


def test_usernames_are_case_insensitive(client, users):
    assert post_login(client, users.admin.username.upper(), PASSWORD).status_code == 303


@pytest.mark.parametrize("username", ["test-admin", "nobody"])
def test_wrong_password_or_unknown_user_gets_one_message(client, users, db, username):
    response = post_login(client, username, "wrong password here")
    assert response.status_code == 401
    assert "Wrong username or password." in response.text
    assert SESSION_COOKIE not in response.cookies
    assert db.scalar(select(func.count()).select_from(UserSession)) == 0
    attempt = db.scalars(select(LoginAttempt).where(LoginAttempt.username == username)).one()
    assert not attempt.succeeded


def test_disabled_account_cannot_log_in(client, users, db):
    service.set_active(db, users.labeler, False, actor_id=None)
    db.commit()
    response = post_login(client, users.labeler.username, PASSWORD)
    assert response.status_code == 401 and "disabled" in response.text
    assert db.scalar(select(func.count()).select_from(UserSession)) == 0


def test_login_without_csrf_token_is_refused(client, users, db):
    client.get("/login")
    response = client.post(
        "/login",
        data={"username": users.admin.username, "password": PASSWORD},
        follow_redirects=False,
    )
    assert response.status_code == 403
    assert db.scalar(select(func.count()).select_from(LoginAttempt)) == 0


def test_login_token_is_bound_to_its_cookie(client, users):
    token = csrf_from(client.get("/login").text)
    client.cookies.clear()
    client.cookies.set(LOGIN_CSRF_COOKIE, "another-browsers-cookie")
    response = client.post(
        "/login",
        data={"username": users.admin.username, "password": PASSWORD, "csrf_token": token},
        follow_redirects=False,
    )
    assert response.status_code == 403


def test_after_login_only_local_next_urls_are_followed(client, users):
    assert (
        post_login(client, users.admin.username, PASSWORD, next="/tokens").headers["location"]
        == "/tokens"
    )
    for evil in ("https://evil.example/", "//evil.example/x", "/\\evil.example"):
        response = post_login(client, users.admin.username, PASSWORD, next=evil)
        assert response.headers["location"] == "/admin", evil


def test_login_page_redirects_when_signed_in(client, as_role):
    as_role("researcher")
    response = client.get("/login", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/research"


# --- throttling ----------------------------------------------------------------------------


def test_repeated_failures_lock_the_account_for_a_while(client, users, settings, db):
    for _ in range(settings.login_max_failures_per_user):
        assert post_login(client, users.admin.username, "wrong password!").status_code == 401
    # Even the right password is refused while the account is throttled.
    response = post_login(client, users.admin.username, PASSWORD)
    assert response.status_code == 429
    retry_after = int(response.headers["Retry-After"])
    assert 0 < retry_after <= settings.login_window_minutes * 60
    assert db.scalar(select(func.count()).select_from(UserSession)) == 0
    # Other accounts from elsewhere are not affected.
    assert post_login(client, users.labeler.username, PASSWORD).status_code == 303


def test_throttle_expires_with_the_window(client, users, settings, db):
    old = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=settings.login_window_minutes + 1)
    db.add_all(
        LoginAttempt(username=users.admin.username, ip="testclient", succeeded=False, at=old)
        for _ in range(settings.login_max_failures_per_user)
    )
    db.commit()
    assert post_login(client, users.admin.username, PASSWORD).status_code == 303


def test_failures_from_one_address_are_throttled_across_accounts(client, users, settings, db):
    db.add_all(
        LoginAttempt(username=f"guess{i}", ip="testclient", succeeded=False)
        for i in range(settings.login_max_failures_per_ip)
    )
    db.commit()
    assert post_login(client, users.admin.username, PASSWORD).status_code == 429


# --- sessions ------------------------------------------------------------------------------


def test_logout_kills_the_session_and_the_cookie_cannot_be_replayed(client, as_role, db):
    csrf = as_role("admin")
    cookie = client.cookies.get(SESSION_COOKIE)
    response = client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/login?signed_out=1"
    assert "You are signed out." in client.get("/login?signed_out=1").text
    assert db.scalar(select(func.count()).select_from(UserSession)) == 0
    client.cookies.clear()
    client.cookies.set(SESSION_COOKIE, cookie)  # an attacker replays the old cookie
    replay = client.get("/admin", follow_redirects=False)
    assert replay.status_code == 303 and replay.headers["location"].startswith("/login")
    assert client.get("/api/v1/me").status_code == 401


def test_logout_needs_csrf(client, as_role, db):
    as_role("labeler")
    assert client.post("/logout", follow_redirects=False).status_code == 403
    assert db.scalar(select(func.count()).select_from(UserSession)) == 1


@pytest.mark.parametrize("which", ["idle", "absolute"])
def test_expired_sessions_end(client, as_role, db, settings, which):
    as_role("labeler")
    row = db.scalars(select(UserSession)).one()
    now = dt.datetime.now(dt.UTC)
    if which == "idle":
        row.last_seen_at = now - dt.timedelta(minutes=settings.session_idle_minutes + 1)
    else:
        row.expires_at = now - dt.timedelta(seconds=1)
    db.commit()
    response = client.get("/label", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/login?next=/label"
    assert db.scalar(select(func.count()).select_from(UserSession)) == 0


def test_disabling_a_user_ends_their_sessions_and_tokens(client, as_role, users, db):
    as_role("researcher")
    secret = service.create_api_token(db, users.researcher, name="t").secret
    db.commit()
    assert client.get("/research").status_code == 200
    service.set_active(db, users.researcher, False, actor_id=users.admin.id)
    db.commit()
    assert client.get("/research", follow_redirects=False).status_code == 303
    client.cookies.clear()
    assert (
        client.get("/api/v1/me", headers={"Authorization": f"Bearer {secret}"}).status_code == 401
    )


def test_htmx_request_with_dead_session_is_told_to_redirect(client):
    response = client.get("/admin", headers={"HX-Request": "true"}, follow_redirects=False)
    assert response.status_code == 401 and response.headers["HX-Redirect"] == "/login"


# --- CSRF on state changes -----------------------------------------------------------------


def test_state_change_without_token_writes_nothing(client, as_role, db):
    as_role("researcher")
    assert client.post("/tokens", data={"name": "no-token"}).status_code == 403
    assert client.post("/tokens", data={"name": "bad", "csrf_token": "forged"}).status_code == 403
    assert (
        client.post("/tokens", data={"name": "bad", "csrf_token": "föörged ✓"}).status_code == 403
    )
    assert db.scalar(select(func.count()).select_from(ApiToken)) == 0


def test_csrf_header_works_for_htmx(client, as_role, db):
    csrf = as_role("researcher")
    response = client.post("/tokens", data={"name": "via-header"}, headers={"X-CSRF-Token": csrf})
    assert response.status_code == 200
    assert db.scalar(select(ApiToken.name)) == "via-header"


def test_cross_site_requests_are_refused_even_with_a_token(client, as_role, db):
    csrf = as_role("researcher")
    response = client.post(
        "/tokens", data={"name": "x", "csrf_token": csrf}, headers={"Sec-Fetch-Site": "cross-site"}
    )
    assert response.status_code == 403 and "Cross-site" in response.text
    assert db.scalar(select(func.count()).select_from(ApiToken)) == 0


def test_one_sessions_token_does_not_work_for_another(client, as_role, users, db):
    labeler_csrf = as_role("labeler")
    as_role("researcher")
    assert client.post("/tokens", data={"name": "x", "csrf_token": labeler_csrf}).status_code == 403


def test_rehash_on_login_when_parameters_change(client, users, db):
    from argon2 import PasswordHasher

    weak = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1).hash(PASSWORD)
    users.labeler.password_hash = weak
    db.commit()
    login(client, users.labeler.username)
    db.expire_all()
    upgraded = db.get(User, users.labeler.id).password_hash
    assert upgraded != weak and extract_parameters(upgraded).memory_cost >= 19 * 1024
