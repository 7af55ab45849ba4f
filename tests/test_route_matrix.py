"""Every route, every role: who may use it, and CSRF on every state change.

The matrix must name every route the app serves: a new route that is not listed here fails
`test_matrix_covers_every_route`, so nobody adds an endpoint without deciding who may use it.
"""

from __future__ import annotations

import pytest
from starlette.routing import Mount

from app.auth import service as auth_service
from app.web import SESSION_COOKIE

ANON, LABELER, ADMIN, RESEARCHER = "anonymous", "labeler", "admin", "researcher"
EVERYONE = {ANON, LABELER, ADMIN, RESEARCHER}
SIGNED_IN = {LABELER, ADMIN, RESEARCHER}

# (method, path template) -> who is let through. Path parameters get harmless sample values.
MATRIX: dict[tuple[str, str], set[str]] = {
    ("GET", "/login"): EVERYONE,
    ("POST", "/login"): EVERYONE,
    ("GET", "/healthz"): EVERYONE,
    ("GET", "/api/openapi.json"): EVERYONE,
    ("GET", "/static"): EVERYONE,
    ("GET", "/"): SIGNED_IN,
    ("POST", "/logout"): SIGNED_IN,
    ("GET", "/api/v1/me"): SIGNED_IN,
    ("GET", "/account"): SIGNED_IN,
    ("POST", "/account/password"): SIGNED_IN,
    ("GET", "/label"): {LABELER},
    ("GET", "/admin"): {ADMIN},
    ("GET", "/admin/users"): {ADMIN},
    ("POST", "/admin/users"): {ADMIN},
    ("POST", "/admin/users/{user_id}/active"): {ADMIN},
    ("GET", "/research"): {RESEARCHER, ADMIN},
    ("GET", "/tokens"): {RESEARCHER, ADMIN},
    ("POST", "/tokens"): {RESEARCHER, ADMIN},
    ("POST", "/tokens/{token_id}/revoke"): {RESEARCHER, ADMIN},
    # campaigns (admin pages)
    ("GET", "/admin/campaigns"): {ADMIN},
    ("POST", "/admin/campaigns"): {ADMIN},
    ("GET", "/admin/campaigns/new"): {ADMIN},
    ("POST", "/admin/campaigns/preview"): {ADMIN},
    ("GET", "/admin/campaigns/{slug}"): {ADMIN},
    ("POST", "/admin/campaigns/{slug}"): {ADMIN},
    ("POST", "/admin/campaigns/{slug}/status"): {ADMIN},
    # imports (admin upload page, API)
    ("GET", "/admin/imports"): {ADMIN},
    ("POST", "/admin/imports"): {ADMIN},
    ("POST", "/api/v1/imports"): {ADMIN},
    # quality (dashboard and JSON)
    ("GET", "/admin/campaigns/{slug}/quality"): {ADMIN},
    ("GET", "/api/v1/campaigns/{slug}/quality"): {ADMIN, RESEARCHER},
    ("GET", "/admin/campaigns/{slug}/disagreements"): {ADMIN},
    ("POST", "/admin/tasks/{task_id}/send-back"): {ADMIN},
    ("POST", "/admin/tasks/{task_id}/gold"): {ADMIN},
    ("POST", "/admin/tasks/{task_id}/ungold"): {ADMIN},
    ("GET", "/admin/campaigns/{slug}/labelers/{user_id}"): {ADMIN},
    ("GET", "/admin/judgments/{judgment_id}"): {ADMIN},
    ("GET", "/api/v1/campaigns/{slug}/quality/labelers"): {ADMIN, RESEARCHER},
    ("GET", "/api/v1/campaigns/{slug}/quality/matrix"): {ADMIN, RESEARCHER},
    ("GET", "/api/v1/campaigns/{slug}/quality/trend"): {ADMIN, RESEARCHER},
    ("GET", "/api/v1/campaigns/{slug}/quality/disagreements"): {ADMIN, RESEARCHER},
    ("POST", "/admin/tasks/{task_id}/resolve"): {ADMIN},
    ("POST", "/admin/tasks/{task_id}/unresolve"): {ADMIN},
    ("POST", "/admin/campaigns/{slug}/quality/settings"): {ADMIN},
    ("POST", "/admin/campaigns/{slug}/labelers/{user_id}/exclude"): {ADMIN},
    ("POST", "/admin/campaigns/{slug}/labelers/{user_id}/active"): {ADMIN},
    ("POST", "/admin/exclusions/{exclusion_id}/lift"): {ADMIN},
    # exports (researcher page, API, the trainer's feed)
    ("GET", "/research/exports"): {RESEARCHER, ADMIN},
    ("POST", "/research/exports"): {RESEARCHER, ADMIN},
    ("GET", "/research/exports/{snapshot_id}"): {RESEARCHER, ADMIN},
    ("POST", "/api/v1/exports"): {RESEARCHER, ADMIN},
    ("GET", "/api/v1/exports"): {RESEARCHER, ADMIN},
    ("GET", "/api/v1/exports/{snapshot_id}"): {RESEARCHER, ADMIN},
    ("GET", "/api/v1/exports/{snapshot_id}/files/{name}"): {RESEARCHER, ADMIN},
    ("GET", "/api/v1/campaigns/{slug}/comparisons"): {RESEARCHER, ADMIN},
    # training jobs and model versions (pages and API)
    ("GET", "/jobs"): {RESEARCHER, ADMIN},
    ("POST", "/jobs"): {RESEARCHER, ADMIN},
    ("GET", "/jobs/new"): {RESEARCHER, ADMIN},
    ("GET", "/jobs/new/ppo"): {RESEARCHER, ADMIN},
    ("POST", "/jobs/new/ppo"): {RESEARCHER, ADMIN},
    ("GET", "/jobs/new/rloo"): {RESEARCHER, ADMIN},
    ("POST", "/jobs/new/rloo"): {RESEARCHER, ADMIN},
    ("GET", "/jobs/new/sft"): {RESEARCHER, ADMIN},
    ("POST", "/jobs/new/sft"): {RESEARCHER, ADMIN},
    ("GET", "/jobs/new/dpo"): {RESEARCHER, ADMIN},
    ("POST", "/jobs/new/dpo"): {RESEARCHER, ADMIN},
    ("GET", "/jobs/{job_id}"): {RESEARCHER, ADMIN},
    ("POST", "/jobs/{job_id}/cancel"): {RESEARCHER, ADMIN},
    ("POST", "/jobs/{job_id}/retry"): {RESEARCHER, ADMIN},
    ("GET", "/models/{model_id}"): {RESEARCHER, ADMIN},
    ("POST", "/models/{model_id}/score"): {RESEARCHER, ADMIN},
    ("POST", "/models/{model_id}/generate"): {RESEARCHER, ADMIN},
    ("POST", "/api/v1/models/{model_id}/score"): {RESEARCHER, ADMIN},
    ("POST", "/api/v1/jobs"): {RESEARCHER, ADMIN},
    ("GET", "/api/v1/jobs"): {RESEARCHER, ADMIN},
    ("GET", "/api/v1/jobs/{job_id}"): {RESEARCHER, ADMIN},
    ("GET", "/api/v1/jobs/{job_id}/metrics"): {RESEARCHER, ADMIN},
    ("POST", "/api/v1/jobs/{job_id}/cancel"): {RESEARCHER, ADMIN},
    ("POST", "/api/v1/jobs/{job_id}/retry"): {RESEARCHER, ADMIN},
    ("GET", "/api/v1/models"): {RESEARCHER, ADMIN},
    ("GET", "/api/v1/models/{model_id}"): {RESEARCHER, ADMIN},
    ("GET", "/api/v1/models/{model_id}/tasks/{task_id}"): {RESEARCHER, ADMIN},
    # the model registry and generation jobs
    ("GET", "/models"): {RESEARCHER, ADMIN},
    ("POST", "/models"): {ADMIN},
    ("POST", "/api/v1/models"): {ADMIN},
    ("GET", "/generate"): {RESEARCHER, ADMIN},
    ("POST", "/generate"): {RESEARCHER, ADMIN},
    # the loop (a campaign's loop, policy versions)
    ("GET", "/admin/campaigns/{slug}/loop"): {ADMIN},
    ("POST", "/admin/campaigns/{slug}/loop"): {ADMIN},
    ("POST", "/admin/campaigns/{slug}/loop/{action}"): {ADMIN},
    ("GET", "/policies"): {RESEARCHER, ADMIN},
    ("GET", "/api/v1/policies"): {RESEARCHER, ADMIN},
    # labeling (pages and API)
    ("GET", "/label/history"): {LABELER},
    ("GET", "/label/{slug}"): {LABELER},
    ("POST", "/label/{slug}/submit/{submit_key}"): {LABELER},
    ("POST", "/label/{slug}/skip/{submit_key}"): {LABELER},
    ("GET", "/label/judgments/{judgment_id}"): {LABELER},
    ("POST", "/label/judgments/{judgment_id}"): {LABELER},
    ("GET", "/api/v1/labeling/campaigns"): {LABELER},
    ("POST", "/api/v1/campaigns/{slug}/next"): {LABELER},
    ("POST", "/api/v1/assignments/{submit_key}/judgment"): {LABELER},
    ("POST", "/api/v1/assignments/{submit_key}/skip"): {LABELER},
    ("GET", "/api/v1/judgments"): {LABELER},
    ("GET", "/api/v1/judgments/{judgment_id}"): {LABELER},
    ("POST", "/api/v1/judgments/{judgment_id}/edit"): {LABELER},
}
SAMPLE_PARAMS = {
    "user_id": "999999",
    "token_id": "999999",
    "slug": "no-such-campaign",
    "submit_key": "no-such-key-0123456789",
    "judgment_id": "999999",
    "task_id": "999999",
    "exclusion_id": "999999",
    "snapshot_id": "999999",
    "job_id": "999999",
    "model_id": "999999",
    "name": "train.jsonl",
    "action": "pause",
}
UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}


def iter_routes(routes):
    """Flatten the app's routes, including routers FastAPI keeps as lazy includes."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from iter_routes(included.routes)
        else:
            yield route


def served_routes(app) -> set[tuple[str, str]]:
    found = set()
    for route in iter_routes(app.routes):
        if isinstance(route, Mount):
            found.add(("GET", route.path))
            continue
        for method in getattr(route, "methods", None) or ():
            if method != "HEAD":
                found.add((method, route.path))
    return found


def sample_url(path: str) -> str:
    if path == "/static":
        return "/static/app.css"
    return path.format(**SAMPLE_PARAMS)


def test_matrix_covers_every_route(app):
    served = served_routes(app)
    assert served - MATRIX.keys() == set(), (
        "routes missing from the matrix: decide who may use them"
    )
    assert MATRIX.keys() - served == set(), "the matrix lists routes the app no longer serves"


@pytest.fixture
def sign_in(client, users, db, settings):
    """Sign a role in by creating its session directly (no password hashing: fast)."""

    def _sign_in(role: str) -> str | None:
        client.cookies.clear()
        if role == ANON:
            return None
        user = users[role]
        token = auth_service.create_session(db, settings, user, ip=None, user_agent=None)
        db.commit()
        client.cookies.set(SESSION_COOKIE, token)
        row = auth_service.resolve_session(db, settings, token)
        return row.csrf_token

    return _sign_in


def call(client, method: str, path: str, csrf: str | None):
    data = {"csrf_token": csrf} if csrf else {}
    return client.request(
        method, sample_url(path), data=data if method in UNSAFE else None, follow_redirects=False
    )


def denied(response, role: str) -> bool:
    if role == ANON:
        to_login = response.status_code == 303 and response.headers["location"].startswith("/login")
        return response.status_code == 401 or to_login
    return response.status_code == 403


@pytest.mark.parametrize("role", sorted(EVERYONE))
def test_each_role_reaches_exactly_its_routes(client, sign_in, role):
    wrong = []
    for (method, path), allowed in sorted(MATRIX.items()):
        if (method, path) == ("POST", "/logout"):
            continue  # would end the session mid-loop; covered by its own test below
        if method in UNSAFE and role == ANON and path == "/login":
            continue  # the pre-login form has its own token: tested in test_auth
        csrf = sign_in(role)
        response = call(client, method, path, csrf)
        if (role in allowed) == denied(response, role) or response.status_code >= 500:
            wrong.append(f"{role} {method} {path} -> {response.status_code}")
    assert wrong == []


@pytest.mark.parametrize("role", sorted(SIGNED_IN))
def test_logout_is_open_to_every_signed_in_role(client, sign_in, role):
    csrf = sign_in(role)
    response = call(client, "POST", "/logout", csrf)
    assert response.status_code == 303 and response.headers["location"] == "/login?signed_out=1"


def test_anonymous_post_to_a_signed_in_route_gets_401(client, sign_in):
    sign_in(ANON)
    response = call(client, "POST", "/logout", None)
    assert response.status_code == 401 and "Sign in again" in response.text


@pytest.mark.parametrize("route", sorted(k for k in MATRIX if k[0] in UNSAFE))
def test_every_state_change_needs_a_csrf_token(client, sign_in, route):
    method, path = route
    allowed = MATRIX[route] - {ANON} or {ANON}
    role = sorted(allowed)[0]
    sign_in(role)
    if role == ANON:
        client.get("/login")  # the pre-login cookie is there, the token is not sent
    response = call(client, method, path, csrf=None)
    assert response.status_code == 403, (
        f"{method} {path} as {role} without a token -> {response.status_code}"
    )
    forged = call(client, method, path, csrf="forged-token")
    assert forged.status_code == 403


def test_an_id_no_database_could_hold_is_refused_not_a_server_error(client, sign_in):
    """Every route with a row id in its path: one past 2**63 - 1 (SQLite's and PostgreSQL's
    largest) is a 422 before any query, for every role allowed to call it."""
    checked = []
    for (method, path), allowed in sorted(MATRIX.items()):
        ids = [name for name in SAMPLE_PARAMS if name.endswith("_id") and f"{{{name}}}" in path]
        role = next((r for r in (ADMIN, RESEARCHER, LABELER) if r in allowed), None)
        if not ids or role is None:
            continue
        csrf = sign_in(role)
        url = path.format(**(SAMPLE_PARAMS | dict.fromkeys(ids, str(2**64))))
        data = {"csrf_token": csrf} if method in UNSAFE else None
        response = client.request(method, url, data=data, follow_redirects=False)
        checked.append(f"{method} {path} -> {response.status_code}")
    assert checked and all(line.endswith("-> 422") for line in checked), checked
