"""Accounts, server-side sessions, API tokens and the login-attempt log."""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import Boolean, ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db import Base, BigId, CreatedAt, IdPK, JSONType, str_enum, utcnow


class Role(enum.StrEnum):
    labeler = "labeler"
    admin = "admin"
    researcher = "researcher"


class UserKind(enum.StrEnum):
    human = "human"
    ai = "ai"  # an AI labeler (LLM judge) whose judgments are kept apart from human ones


class User(Base):
    __tablename__ = "users"

    id: Mapped[IdPK]
    # Stored lower-case: "Alice" and "alice" are one account.
    username: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str] = mapped_column(String(128), default="")
    email: Mapped[str | None] = mapped_column(String(254))
    role: Mapped[Role] = mapped_column(str_enum(Role, "user_role"))
    kind: Mapped[UserKind] = mapped_column(str_enum(UserKind, "user_kind"), default=UserKind.human)
    # NULL for accounts that cannot log in with a password (AI labelers).
    password_hash: Mapped[str | None] = mapped_column(String(255))
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[CreatedAt]
    last_login_at: Mapped[dt.datetime | None]
    disabled_at: Mapped[dt.datetime | None]

    sessions: Mapped[list[UserSession]] = relationship(
        back_populates="user", cascade="all, delete-orphan", passive_deletes=True
    )

    def __repr__(self) -> str:
        return f"<User {self.username} {self.role.value}>"


class UserSession(Base):
    """A logged-in browser. The cookie holds a random token; only its SHA-256 is stored."""

    __tablename__ = "user_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 hex of the cookie token
    user_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[CreatedAt]
    last_seen_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime]  # the absolute timeout, fixed at login
    ip: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(String(256))
    # Flash messages waiting for the next page: [{"level": "success", "text": "..."}].
    flashes: Mapped[list[dict[str, str]]] = mapped_column(JSONType, default=list)

    user: Mapped[User] = relationship(back_populates="sessions")


class ApiToken(Base):
    """A bearer token for scripts. Shown once at creation; only its SHA-256 is kept."""

    __tablename__ = "api_tokens"

    id: Mapped[IdPK]
    user_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(128))
    prefix: Mapped[str] = mapped_column(String(16))  # the first characters, to tell tokens apart
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[CreatedAt]
    last_used_at: Mapped[dt.datetime | None]
    expires_at: Mapped[dt.datetime | None]
    revoked_at: Mapped[dt.datetime | None]

    user: Mapped[User] = relationship()


class LoginAttempt(Base):
    """Every login attempt, kept in the database so throttling holds across server processes."""

    __tablename__ = "login_attempts"
    __table_args__ = (
        Index("ix_login_attempts_username_at", "username", "at"),
        Index("ix_login_attempts_ip_at", "ip", "at"),
    )

    id: Mapped[IdPK]
    username: Mapped[str] = mapped_column(String(64))
    ip: Mapped[str] = mapped_column(String(64))
    succeeded: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str | None] = mapped_column(Text)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
