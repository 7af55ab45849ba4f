"""The one settings object. Every knob is an environment variable with the PREFLOOP_ prefix."""

from __future__ import annotations

import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

# The checkout (or /app in the image): templates/, static/, alembic.ini and migrations/ live here.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Values people paste from examples; a production secret must not be one of these.
PLACEHOLDER_SECRETS = frozenset(
    {
        "",
        "changeme",
        "change-me",
        "changethis",
        "secret",
        "secret-key",
        "dev",
        "development",
        "prefloop",
        "password",
        "xxx",
        "todo",
    }
)
MIN_SECRET_LENGTH = 32


class ConfigError(ValueError):
    """A setting is missing or unusable; the message is one line a person can act on."""


def normalize_database_url(url: str) -> str:
    """Accept the common spellings of a PostgreSQL URL and point them at psycopg 3."""
    for scheme in ("postgres://", "postgresql://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PREFLOOP_", env_file=".env", extra="ignore")

    env: Literal["dev", "prod"] = Field(
        "prod",
        description="`dev` relaxes the secret-key check and cookie security; never in production.",
    )
    database_url: str = Field(
        "sqlite:///./var/prefloop.db",
        description="SQLAlchemy URL. PostgreSQL in production: postgresql+psycopg://user:pw@host/db.",
    )
    secret_key: str = Field(
        "", description="Random 32+ characters. Signs pre-login CSRF cookies; required outside dev."
    )
    data_dir: Path = Field(Path("./var"), description="Checkpoints, exports and uploads live here.")
    cookie_secure: bool = Field(
        True, description="Send cookies only over HTTPS. Forced off in dev mode."
    )
    session_idle_minutes: int = Field(
        8 * 60, ge=1, description="Log out after this much inactivity."
    )
    session_max_hours: int = Field(
        72, ge=1, description="Log out this long after login, active or not."
    )
    login_max_failures_per_user: int = Field(
        5, ge=1, description="Failed logins per account per window."
    )
    login_max_failures_per_ip: int = Field(30, ge=1, description="Failed logins per IP per window.")
    login_window_minutes: int = Field(15, ge=1, description="The login-throttling window.")
    max_request_bytes: int = Field(
        2 * 1024 * 1024, ge=1024, description="Largest request body outside upload routes."
    )
    max_upload_bytes: int = Field(
        512 * 1024 * 1024, ge=1024, description="Largest upload (imports)."
    )
    statement_timeout_ms: int = Field(
        30_000, ge=0, description="PostgreSQL statement_timeout for web requests (0 = none)."
    )
    db_pool_size: int = Field(
        8,
        ge=1,
        le=200,
        description="Database connections per server process, and threads for request handlers.",
    )
    log_level: str = Field("info", description="Python logging level.")

    @model_validator(mode="after")
    def _check(self) -> Settings:
        self.database_url = normalize_database_url(self.database_url)
        try:
            url = make_url(self.database_url)
        except (ArgumentError, ValueError):
            raise ConfigError(
                "PREFLOOP_DATABASE_URL is not a database URL: use sqlite:///path/to.db or "
                "postgresql+psycopg://user:password@host:5432/name"
            ) from None
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ConfigError(
                f"PREFLOOP_DATABASE_URL: prefloop runs on PostgreSQL or SQLite, not {url.get_backend_name()}"
            )
        if self.env == "dev":
            self.cookie_secure = False
            if not self.secret_key:
                # Sessions are server-side rows, so a per-process key only resets pre-login forms.
                self.secret_key = secrets.token_urlsafe(48)
        elif (
            self.secret_key.strip().lower() in PLACEHOLDER_SECRETS
            or len(self.secret_key) < MIN_SECRET_LENGTH
        ):
            raise ConfigError(
                "PREFLOOP_SECRET_KEY is missing or a placeholder: set it to a random value of at least "
                f"{MIN_SECRET_LENGTH} characters (python -c 'import secrets; print(secrets.token_urlsafe(48))'), "
                "or set PREFLOOP_ENV=dev for local development"
            )
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    return Settings()
