"""Pages, errors and headers: what a person sees when things go right and wrong."""

from __future__ import annotations

import pytest
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import func, select

from app.auth.models import User, UserSession
from app.main import create_app
from app.middleware import CONTENT_SECURITY_POLICY
from app.validation import humane_errors
from app.web import SESSION_COOKIE, inline_code
from tests.conftest import PASSWORD, csrf_from, make_settings


def test_security_headers_on_pages(client):
    response = client.get("/login")
    assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert (
        "unsafe-inline" not in CONTENT_SECURITY_POLICY
        and "unsafe-eval" not in CONTENT_SECURITY_POLICY
    )
    assert "frame-ancestors 'none'" in CONTENT_SECURITY_POLICY
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == "no-store"


def test_static_files_are_cacheable_and_htmx_is_vendored(client):
    response = client.get("/static/vendor/htmx.min.js")
    assert response.status_code == 200 and "htmx" in response.text[:2000]
    assert response.headers.get("Cache-Control") != "no-store"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_pages_have_no_inline_script_or_style(client, as_role):
    for role, path in (
        ("admin", "/admin"),
        ("admin", "/admin/users"),
        ("researcher", "/tokens"),
        ("labeler", "/label"),
    ):
        as_role(role)
        html = client.get(path).text
        assert "<script>" not in html and "<style" not in html and " style=" not in html
        assert " onclick=" not in html and "javascript:" not in html


@pytest.mark.parametrize(
    ("role", "home"), [("labeler", "/label"), ("admin", "/admin"), ("researcher", "/research")]
)
def test_root_sends_each_role_home(client, as_role, role, home):
    as_role(role)
    response = client.get("/", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == home


def test_labeler_opening_an_admin_page_gets_a_friendly_403(client, as_role):
    as_role("labeler")
    response = client.get("/admin")
    assert response.status_code == 403
    assert "Not allowed" in response.text and "Traceback" not in response.text
    assert 'href="/label"' in response.text  # the page still has the labeler's navigation


def test_unknown_page_is_a_friendly_404(client):
    response = client.get("/no/such/page")
    assert response.status_code == 404
    assert "There is nothing at this address." in response.text and "<html" in response.text


def test_api_errors_are_json(client, as_role):
    as_role("labeler")
    response = client.get("/api/v1/nothing")
    assert response.status_code == 404 and response.json()["error"] == "Not found"


def test_htmx_errors_are_fragments(client, as_role):
    as_role("labeler")
    response = client.get("/admin", headers={"HX-Request": "true"})
    assert response.status_code == 403
    assert "<html" not in response.text and 'role="alert"' in response.text


def test_unexpected_errors_show_no_traceback(settings, database):
    app = create_app(settings, database)
    boom = APIRouter()

    @boom.get("/boom")
    def explode() -> None:
        raise RuntimeError("secret internal detail")

    app.include_router(boom)
    from fastapi.testclient import TestClient

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom")
    assert response.status_code == 500
    assert "Something went wrong" in response.text
    assert "secret internal detail" not in response.text and "Traceback" not in response.text


def test_database_down_gives_503_not_a_crash():
    settings = make_settings(database_url="postgresql+psycopg://postgres:pw@127.0.0.1:1/nothing")
    from fastapi.testclient import TestClient

    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        form = client.get("/login")
        login = client.post(
            "/login", data={"username": "a", "password": "b", "csrf_token": csrf_from(form.text)}
        )
        health = client.get("/healthz")
    assert form.status_code == 200  # the login page itself needs no database
    assert login.status_code == 503 and "database is not answering" in login.text
    assert health.status_code == 503 and "pw" not in health.text and "Traceback" not in login.text


def test_oversized_bodies_are_refused_before_parsing(client, as_role, settings, db):
    csrf = as_role("admin")
    big = "x" * (settings.max_request_bytes + 1)
    response = client.post(
        "/admin/users",
        data={"username": "big", "role": "labeler", "password": big, "csrf_token": csrf},
    )
    assert response.status_code == 413
    assert db.scalar(select(func.count()).select_from(User).where(User.username == "big")) == 0


def test_admin_creates_and_disables_a_user(client, as_role, db):
    csrf = as_role("admin")
    created = client.post(
        "/admin/users",
        data={
            "username": "Carol",
            "role": "labeler",
            "password": PASSWORD,
            "display_name": "Carol C.",
            "csrf_token": csrf,
        },
    )
    assert created.status_code == 200 and "Created labeler &#39;carol&#39;." in created.text
    carol = db.scalar(select(User).where(User.username == "carol"))
    assert carol.role.value == "labeler" and carol.password_hash.startswith("$argon2id$")
    disabled = client.post(
        f"/admin/users/{carol.id}/active", data={"active": "false", "csrf_token": csrf}
    )
    assert disabled.status_code == 200
    db.expire_all()
    assert db.get(User, carol.id).is_active is False


def test_admin_user_form_reports_bad_input_and_writes_nothing(client, as_role, db):
    csrf = as_role("admin")
    before = db.scalar(select(func.count()).select_from(User))
    weak = client.post(
        "/admin/users",
        data={"username": "dave", "role": "labeler", "password": "password", "csrf_token": csrf},
    )
    assert weak.status_code == 422 and "too common" in weak.text
    bad_role = client.post(
        "/admin/users",
        data={"username": "dave", "role": "root", "password": PASSWORD, "csrf_token": csrf},
    )
    assert bad_role.status_code == 422 and "role" in bad_role.text
    duplicate = client.post(
        "/admin/users",
        data={"username": "test-admin", "role": "admin", "password": PASSWORD, "csrf_token": csrf},
    )
    assert duplicate.status_code == 422 and "already exists" in duplicate.text
    everything = client.post(
        "/admin/users",
        data={"username": "-x", "role": "root", "password": "short", "csrf_token": csrf},
    )
    assert everything.status_code == 422
    shown = everything.text.split('data-testid="user-errors"', 1)[1].split("</div>", 1)[0]
    assert "Username must be" in shown and "listed roles" in shown and "at least 8" in shown
    assert everything.text.count('aria-invalid="true"') == 3
    assert 'value="-x"' in everything.text, "the form keeps what was typed"
    assert db.scalar(select(func.count()).select_from(User)) == before


def test_admin_cannot_disable_themself(client, as_role, users, db):
    csrf = as_role("admin")
    response = client.post(
        f"/admin/users/{users.admin.id}/active", data={"active": "false", "csrf_token": csrf}
    )
    assert response.status_code == 400
    db.expire_all()
    assert db.get(User, users.admin.id).is_active


def test_user_text_is_escaped_in_pages(client, as_role, users, db):
    users.labeler.display_name = "<img src=x onerror=alert(1)>{{7*7}}"
    db.commit()
    as_role("admin")
    html = client.get("/admin/users").text
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;{{7*7}}" in html


def test_htmx_toggle_returns_just_the_updated_row(client, as_role, users, db):
    csrf = as_role("admin")
    response = client.post(
        f"/admin/users/{users.labeler.id}/active",
        data={"active": "false"},
        headers={"HX-Request": "true", "X-CSRF-Token": csrf},
    )
    assert response.status_code == 200
    html = response.text.strip()
    assert html.startswith(f'<tr id="user-{users.labeler.id}"') and "<html" not in html
    assert "disabled" in html and ">Enable<" in html
    db.expire_all()
    assert db.get(User, users.labeler.id).is_active is False


def change_password(client, csrf, current, new, confirm=None):
    return client.post(
        "/account/password",
        data={
            "current_password": current,
            "new_password": new,
            "confirm_password": new if confirm is None else confirm,
            "csrf_token": csrf,
        },
        follow_redirects=False,
    )


def test_account_page_shows_who_you_are(client, as_role, users):
    as_role("researcher")
    page = client.get("/account")
    assert (
        page.status_code == 200
        and users.researcher.username in page.text
        and "Change password" in page.text
    )


def test_changing_your_password_keeps_this_session_and_ends_the_others(
    app, client, as_role, users, db
):
    from fastapi.testclient import TestClient

    from tests.conftest import login

    with TestClient(app) as other_browser:
        login(other_browser, users.labeler.username)
        csrf = as_role("labeler")
        new = "a brand new passphrase"
        response = change_password(client, csrf, PASSWORD, new)
        assert response.status_code == 303 and response.headers["location"] == "/account?changed=1"
        assert "Password changed" in client.get("/account?changed=1").text  # still signed in here
        assert (
            other_browser.get("/label", follow_redirects=False).status_code == 303
        )  # signed out there
    client.cookies.clear()
    login(client, users.labeler.username, new)


@pytest.mark.parametrize(
    ("current", "new", "confirm", "message"),
    [
        ("not my password", "a brand new passphrase", None, "current password is wrong"),
        (PASSWORD, "a brand new passphrase", "something else entirely", "differ"),
        (PASSWORD, "password1", None, "too common"),
    ],
)
def test_bad_password_changes_change_nothing(
    client, as_role, users, db, current, new, confirm, message
):
    csrf = as_role("labeler")
    before = db.get(User, users.labeler.id).password_hash
    response = change_password(client, csrf, current, new, confirm)
    assert response.status_code == 422 and message in response.text
    db.expire_all()
    assert db.get(User, users.labeler.id).password_hash == before
    assert client.get("/label").status_code == 200  # still signed in


class _Form(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    campaigns: list[str] = Field(min_length=1)
    labels: list[str] = Field(default_factory=list, min_length=2)


def test_validation_errors_read_as_sentences_and_all_are_kept() -> None:
    with pytest.raises(ValidationError) as caught:
        _Form.model_validate({"campaigns": [], "labels": ["a"], "colour": "red"})
    assert humane_errors(caught.value) == (
        "name: required; campaigns: choose at least one; labels: choose at least 2; "
        "unknown option colour"
    )


def test_inline_code_escapes_everything_but_its_own_code_tags() -> None:
    assert inline_code("a worker (`prefloop worker`) will") == (
        "a worker (<code>prefloop worker</code>) will"
    )
    hostile = inline_code("`<img src=x onerror=alert(1)>` and <script>x</script> `")
    assert hostile == (
        "<code>&lt;img src=x onerror=alert(1)&gt;</code> and &lt;script&gt;x&lt;/script&gt; `"
    )


def test_flashes_show_backtick_spans_as_code(client, as_role, users, db) -> None:
    as_role("admin")
    token = client.cookies.get(SESSION_COOKIE)
    row = db.scalar(select(UserSession).where(UserSession.user_id == users.admin.id))
    assert token and row is not None
    row.flashes = [{"level": "success", "text": "Queued: a worker (`prefloop worker`) <b>x</b>"}]
    db.commit()
    page = client.get("/admin")
    assert "Queued: a worker (<code>prefloop worker</code>) &lt;b&gt;x&lt;/b&gt;" in page.text
    assert "`" not in page.text.split('role="status">', 1)[1].split("</div>", 1)[0]
