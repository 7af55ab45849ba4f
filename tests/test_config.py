"""Settings: the production secret check, dev-mode relaxations, URL normalisation, defaults."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from app.config import Settings, normalize_database_url
from tests.test_cli import cli_env, one_error_line, run_cli


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No PREFLOOP_* variable from the caller, and no .env file in the working directory."""
    for key in list(os.environ):
        if key.startswith("PREFLOOP_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize(
    "secret",
    [
        None,  # not set at all
        "",
        "changeme",
        "CHANGEME",
        " " * 40,  # long enough, but blank
        "x" * 31,  # one short
        secrets.token_urlsafe(16),  # random but short (22 characters)
    ],
    ids=["unset", "empty", "changeme", "CHANGEME", "blank", "31-chars", "short-random"],
)
def test_prod_refuses_a_missing_placeholder_or_short_secret(
    monkeypatch: pytest.MonkeyPatch, secret: str | None
) -> None:
    if secret is not None:
        monkeypatch.setenv("PREFLOOP_SECRET_KEY", secret)
    # Production is the default: nothing says env=prod, and it is still refused.
    with pytest.raises(ValueError, match="PREFLOOP_SECRET_KEY"):
        Settings()
    monkeypatch.setenv("PREFLOOP_ENV", "prod")
    with pytest.raises(ValueError, match="PREFLOOP_SECRET_KEY"):
        Settings()


def test_prod_refuses_a_placeholder_given_in_code() -> None:
    with pytest.raises(ValueError, match="PREFLOOP_SECRET_KEY"):
        Settings(env="prod", secret_key="changeme")


def test_prod_accepts_a_long_random_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    key = secrets.token_urlsafe(36)
    assert len(key) == 48
    monkeypatch.setenv("PREFLOOP_SECRET_KEY", key)
    settings = Settings()
    assert settings.env == "prod"
    assert settings.secret_key == key
    assert settings.cookie_secure is True


def test_dev_generates_a_random_secret_and_turns_off_secure_cookies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PREFLOOP_ENV", "dev")
    monkeypatch.setenv("PREFLOOP_COOKIE_SECURE", "true")
    first, second = Settings(), Settings()
    assert len(first.secret_key) >= 32 and len(second.secret_key) >= 32
    assert first.secret_key != second.secret_key
    assert first.cookie_secure is False and second.cookie_secure is False
    # A secret that is given is kept, even in dev.
    assert Settings(secret_key="given").secret_key == "given"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u:p@db:5432/prefloop", "postgresql+psycopg://u:p@db:5432/prefloop"),
        ("postgresql://u:p@db/prefloop", "postgresql+psycopg://u:p@db/prefloop"),
        ("postgresql+psycopg://u:p@db/prefloop", "postgresql+psycopg://u:p@db/prefloop"),
        ("sqlite:///./var/other.db", "sqlite:///./var/other.db"),
    ],
)
def test_database_urls_are_normalised(
    monkeypatch: pytest.MonkeyPatch, given: str, expected: str
) -> None:
    assert normalize_database_url(given) == expected
    monkeypatch.setenv("PREFLOOP_DATABASE_URL", given)
    assert Settings(env="dev").database_url == expected
    assert Settings(env="dev", database_url=given).database_url == expected


def test_defaults() -> None:
    settings = Settings(env="dev")
    assert settings.database_url == "sqlite:///./var/prefloop.db"
    assert settings.data_dir == Path("./var")
    assert settings.is_sqlite


def test_cli_in_prod_without_a_secret_is_one_line(tmp_path: Path) -> None:
    database = tmp_path / "never.db"
    env = cli_env(f"sqlite:///{database}", tmp_path / "data", env="prod")
    assert "PREFLOOP_SECRET_KEY" not in env
    result = run_cli("user", "list", env=env, cwd=tmp_path)
    line = one_error_line(result)
    assert line.startswith("error: PREFLOOP_SECRET_KEY"), line
    assert result.stdout == ""
    assert not database.exists()  # refused before touching the database


def test_cli_names_a_bad_setting(tmp_path: Path) -> None:
    env = cli_env(f"sqlite:///{tmp_path / 'x.db'}", tmp_path / "data", session_idle_minutes="0")
    line = one_error_line(run_cli("user", "list", env=env, cwd=tmp_path))
    assert line.startswith("error: PREFLOOP_SESSION_IDLE_MINUTES"), line
