"""Accounts, sessions, API tokens and login throttling. Services flush; callers commit."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import bindparam, delete, func, select, update
from sqlalchemy.orm import Session, joinedload

from app.audit import service as audit
from app.auth.models import ApiToken, LoginAttempt, Role, User, UserSession
from app.auth.passwords import (
    burn_verification_time,
    check_password_policy,
    hash_password,
    needs_rehash,
    verify_password,
)
from app.config import Settings
from app.db import utcnow

log = logging.getLogger("prefloop.auth")
USERNAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{1,63}$")
TOKEN_PREFIX = "pfl_"  # noqa: S105 (a public marker, not a secret)
# Writing last_seen_at on every request would turn each page view into a write.
SESSION_TOUCH_INTERVAL = dt.timedelta(seconds=60)


class AuthError(Exception):
    """A refusal the user may see; the message is safe to show."""


class WrongCredentialsError(AuthError):
    def __init__(self) -> None:
        # One message for every cause, so the page does not confirm which accounts exist.
        super().__init__("Wrong username or password.")


class ThrottledError(AuthError):
    def __init__(self, retry_after: int) -> None:
        super().__init__("Too many failed logins. Try again later.")
        self.retry_after = retry_after


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def normalize_username(username: str) -> str:
    return username.strip().lower()


def validate_username(username: str) -> str:
    name = normalize_username(username)
    if not USERNAME_RE.fullmatch(name):
        raise AuthError(
            "Username must be 2-64 characters: letters, digits, '.', '_' or '-', starting with a letter or digit."
        )
    return name


# --- users -----------------------------------------------------------------------------------


def get_user_by_username(session: Session, username: str) -> User | None:
    return session.scalar(select(User).where(User.username == normalize_username(username)))


def create_user(
    session: Session,
    *,
    username: str,
    role: Role,
    password: str | None,
    display_name: str = "",
    email: str | None = None,
    actor_id: int | None = None,
) -> User:
    """Create an account; `password=None` makes one that cannot log in (an AI labeler)."""
    name = validate_username(username)
    if get_user_by_username(session, name) is not None:
        raise AuthError(f"User '{name}' already exists.")
    if password is not None:
        check_password_policy(password, username=name)
    user = User(
        username=name,
        role=role,
        display_name=display_name or name,
        email=email,
        password_hash=hash_password(password) if password is not None else None,
    )
    session.add(user)
    session.flush()
    audit.record(
        session,
        actor_id=actor_id,
        action="user.create",
        entity_type="user",
        entity_id=user.id,
        after={"username": name, "role": role.value},
    )
    return user


def set_password(session: Session, user: User, password: str, *, actor_id: int | None) -> None:
    check_password_policy(password, username=user.username)
    user.password_hash = hash_password(password)
    session.execute(delete(UserSession).where(UserSession.user_id == user.id))
    audit.record(
        session, actor_id=actor_id, action="user.password", entity_type="user", entity_id=user.id
    )
    session.flush()


def set_active(
    session: Session, user: User, active: bool, *, actor_id: int | None, reason: str | None = None
) -> None:
    """Disable or re-enable an account. Disabling ends its sessions and stops its tokens."""
    before = {"is_active": user.is_active}
    user.is_active = active
    user.disabled_at = None if active else utcnow()
    if not active:
        session.execute(delete(UserSession).where(UserSession.user_id == user.id))
    audit.record(
        session,
        actor_id=actor_id,
        action="user.enable" if active else "user.disable",
        entity_type="user",
        entity_id=user.id,
        before=before,
        after={"is_active": active},
        reason=reason,
    )
    session.flush()


# --- login and throttling ---------------------------------------------------------------------


def _failures_since(
    session: Session, column: object, value: str, since: dt.datetime
) -> tuple[int, dt.datetime | None]:
    count, oldest = session.execute(
        select(func.count(), func.min(LoginAttempt.at)).where(
            column == value, LoginAttempt.succeeded.is_(False), LoginAttempt.at >= since
        )
    ).one()
    return count, oldest


def check_throttle(session: Session, settings: Settings, *, username: str, ip: str) -> None:
    """Raise ThrottledError when the account or the address has failed too often lately."""
    window = dt.timedelta(minutes=settings.login_window_minutes)
    now = utcnow()
    for column, value, limit in (
        (LoginAttempt.username, normalize_username(username), settings.login_max_failures_per_user),
        (LoginAttempt.ip, ip, settings.login_max_failures_per_ip),
    ):
        count, oldest = _failures_since(session, column, value, now - window)
        if count >= limit and oldest is not None:
            retry_after = math.ceil((oldest + window - now).total_seconds())
            raise ThrottledError(max(retry_after, 1))


def authenticate(
    session: Session, settings: Settings, *, username: str, password: str, ip: str
) -> User:
    """Check a password login and log the attempt. Raises AuthError with a generic message."""
    name = normalize_username(username)[:64]
    try:
        check_throttle(session, settings, username=name, ip=ip)
    except ThrottledError:
        log.warning("login throttled for %r from %s", name, ip)
        session.add(LoginAttempt(username=name, ip=ip, succeeded=False, reason="throttled"))
        session.flush()
        raise
    user = get_user_by_username(session, name)
    reason = None
    if user is None or user.password_hash is None:
        burn_verification_time(password)
        reason = "unknown user"
    elif not verify_password(user.password_hash, password):
        reason = "wrong password"
    elif not user.is_active:
        reason = "disabled"
    session.add(LoginAttempt(username=name, ip=ip, succeeded=reason is None, reason=reason))
    log.info(
        "login %s for %r from %s%s",
        "failed" if reason else "succeeded",
        name,
        ip,
        f" ({reason})" if reason else "",
    )
    if reason is not None:
        session.flush()
        if reason == "disabled":
            raise AuthError("This account is disabled. Ask an admin to re-enable it.")
        raise WrongCredentialsError()
    assert user is not None and user.password_hash is not None
    if needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    user.last_login_at = utcnow()
    session.flush()
    return user


# --- sessions ---------------------------------------------------------------------------------


def create_session(
    session: Session, settings: Settings, user: User, *, ip: str | None, user_agent: str | None
) -> str:
    """Start a browser session and return the cookie token (only its hash is stored)."""
    token = secrets.token_urlsafe(32)  # 256 bits
    now = utcnow()
    session.add(
        UserSession(
            id=sha256_hex(token),
            user_id=user.id,
            csrf_token=secrets.token_urlsafe(32),
            created_at=now,
            last_seen_at=now,
            expires_at=now + dt.timedelta(hours=settings.session_max_hours),
            ip=ip,
            user_agent=(user_agent or "")[:256],
        )
    )
    session.flush()
    return token


def resolve_session(session: Session, settings: Settings, token: str) -> UserSession | None:
    """The live session for a cookie token, or None if unknown, expired or its user disabled."""
    if not token or len(token) > 128:
        return None
    row = session.get(UserSession, sha256_hex(token), options=[joinedload(UserSession.user)])
    if row is None:
        return None
    now = utcnow()
    idle_limit = row.last_seen_at + dt.timedelta(minutes=settings.session_idle_minutes)
    # Changes here are left unflushed: the caller commits only when there are any.
    if now >= row.expires_at or now >= idle_limit or not row.user.is_active:
        session.delete(row)
        return None
    if now - row.last_seen_at >= SESSION_TOUCH_INTERVAL:
        row.last_seen_at = now
    return row


def end_session(session: Session, token: str) -> None:
    session.execute(delete(UserSession).where(UserSession.id == sha256_hex(token)))
    session.flush()


# --- API tokens -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewToken:
    token: ApiToken
    secret: str  # shown once, never stored


def create_api_token(
    session: Session,
    user: User,
    *,
    name: str,
    expires_in_days: int | None = None,
    actor_id: int | None = None,
) -> NewToken:
    name = name.strip()[:128] or "token"
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(
        user_id=user.id,
        name=name,
        prefix=secret[: len(TOKEN_PREFIX) + 6],
        token_hash=sha256_hex(secret),
        expires_at=utcnow() + dt.timedelta(days=expires_in_days) if expires_in_days else None,
    )
    session.add(token)
    session.flush()
    audit.record(
        session,
        actor_id=actor_id if actor_id is not None else user.id,
        action="token.create",
        entity_type="api_token",
        entity_id=token.id,
        after={"user": user.username, "name": name},
    )
    return NewToken(token=token, secret=secret)


# Every API call runs this: built once, and the user comes in the same round trip.
_TOKEN_WITH_USER = (
    select(ApiToken)
    .where(ApiToken.token_hash == bindparam("token_hash"))
    .options(joinedload(ApiToken.user))
)


def resolve_api_token(session: Session, secret: str) -> User | None:
    """The user a bearer token belongs to, or None if it is unknown, revoked or expired."""
    if not secret.startswith(TOKEN_PREFIX) or len(secret) > 128:
        return None
    token = session.scalar(_TOKEN_WITH_USER, {"token_hash": sha256_hex(secret)})
    now = utcnow()
    if (
        token is None
        or token.revoked_at is not None
        or (token.expires_at and token.expires_at <= now)
    ):
        return None
    if not token.user.is_active:
        return None
    if token.last_used_at is None or now - token.last_used_at >= SESSION_TOUCH_INTERVAL:
        token.last_used_at = now  # flushed by the caller's commit
    return token.user


def list_api_tokens(session: Session, user: User) -> list[ApiToken]:
    return list(
        session.scalars(
            select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id.desc())
        )
    )


def revoke_api_token(session: Session, user: User, token_id: int) -> bool:
    """Revoke one of the user's own tokens; False when there is no such live token."""
    result = session.execute(
        update(ApiToken)
        .where(ApiToken.id == token_id, ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    if result.rowcount != 1:
        return False
    audit.record(
        session,
        actor_id=user.id,
        action="token.revoke",
        entity_type="api_token",
        entity_id=token_id,
    )
    return True
