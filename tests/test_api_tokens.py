"""API tokens: shown once, hashed at rest, revocable, and no CSRF needed for bearer calls."""

from __future__ import annotations

import datetime as dt
import re

from sqlalchemy import select

from app.audit.models import AuditEvent
from app.auth import service
from app.auth.models import ApiToken

SECRET_ON_PAGE = re.compile(r'value="(pfl_[A-Za-z0-9_-]+)"')


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def test_token_is_shown_once_and_only_its_hash_is_stored(client, as_role, db, users):
    csrf = as_role("researcher")
    page = client.post("/tokens", data={"name": "laptop", "csrf_token": csrf})
    secret = SECRET_ON_PAGE.search(page.text).group(1)
    stored = db.scalars(select(ApiToken)).one()
    assert stored.token_hash == service.sha256_hex(secret) and secret not in (
        stored.token_hash,
        stored.prefix,
    )
    assert secret.startswith(stored.prefix)
    assert secret not in client.get("/tokens").text  # never shown again
    assert stored.prefix in client.get("/tokens").text
    assert (
        db.scalar(select(AuditEvent.action).where(AuditEvent.entity_type == "api_token"))
        == "token.create"
    )


def test_bearer_token_authenticates_the_api(client, users, db):
    new = service.create_api_token(db, users.researcher, name="script")
    db.commit()
    client.cookies.clear()
    response = client.get("/api/v1/me", headers=bearer(new.secret))
    assert response.status_code == 200
    assert response.json() == {
        "id": users.researcher.id,
        "username": users.researcher.username,
        "role": "researcher",
        "via_token": True,
    }
    db.expire_all()
    assert db.get(ApiToken, new.token.id).last_used_at is not None


def test_api_without_credentials_is_401_json(client):
    response = client.get("/api/v1/me")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.json()["error"] == "Unauthorized"


def test_bad_revoked_and_expired_tokens_are_refused(client, users, db):
    revoked = service.create_api_token(db, users.admin, name="old")
    expired = service.create_api_token(db, users.admin, name="short", expires_in_days=1)
    db.flush()
    assert service.revoke_api_token(db, users.admin, revoked.token.id)
    expired.token.expires_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    db.commit()
    for secret in (revoked.secret, expired.secret, "pfl_not-a-real-token", "not-even-the-prefix"):
        assert client.get("/api/v1/me", headers=bearer(secret)).status_code == 401, secret


def test_a_bearer_token_wins_over_a_cookie(client, as_role, users, db):
    as_role("admin")
    new = service.create_api_token(db, users.labeler, name="x")
    db.commit()
    assert client.get("/api/v1/me", headers=bearer(new.secret)).json()["role"] == "labeler"


def test_bearer_calls_need_no_csrf_but_keep_role_checks(client, users, db):
    researcher = service.create_api_token(db, users.researcher, name="r").secret
    labeler = service.create_api_token(db, users.labeler, name="l").secret
    db.commit()
    client.cookies.clear()
    created = client.post("/tokens", data={"name": "from-a-script"}, headers=bearer(researcher))
    assert created.status_code == 200
    assert client.post("/tokens", data={"name": "nope"}, headers=bearer(labeler)).status_code == 403
    names = set(db.scalars(select(ApiToken.name)))
    assert "from-a-script" in names and "nope" not in names


def test_users_revoke_only_their_own_tokens(client, as_role, users, db):
    theirs = service.create_api_token(db, users.admin, name="admin's")
    db.commit()
    csrf = as_role("researcher")
    response = client.post(f"/tokens/{theirs.token.id}/revoke", data={"csrf_token": csrf})
    assert response.status_code == 404
    db.expire_all()
    assert db.get(ApiToken, theirs.token.id).revoked_at is None


def test_revoking_from_the_page(client, as_role, users, db):
    csrf = as_role("researcher")
    mine = service.create_api_token(db, users.researcher, name="mine")
    db.commit()
    response = client.post(f"/tokens/{mine.token.id}/revoke", data={"csrf_token": csrf})
    assert (
        response.status_code == 200 and "Token revoked." in response.text
    )  # the flash, after redirect
    assert "Token revoked." not in client.get("/tokens").text  # shown once
    assert client.get("/api/v1/me", headers=bearer(mine.secret)).status_code == 401
