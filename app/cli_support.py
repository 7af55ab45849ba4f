"""What every CLI command shares: one-line failures, settings and the database."""

from __future__ import annotations

from typing import NoReturn

import typer
from pydantic import ValidationError
from sqlalchemy.exc import ArgumentError, OperationalError

from app.config import Settings, get_settings
from app.db import Database, redact_url


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def load_settings() -> Settings:
    try:
        return get_settings()
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error.get("loc", ()))
        message = error["msg"].removeprefix("Value error, ")
        fail(f"{'PREFLOOP_' + field.upper() + ': ' if field else ''}{message}", 2)


def open_database(settings: Settings, *, require_schema: bool = True) -> Database:
    """Connect, or exit with one line naming the database and the reason."""
    from app import migrate

    try:
        database = Database(settings.database_url)
        current = migrate.current_revision(database.engine)
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        fail(f"cannot connect to the database at {redact_url(settings.database_url)}: {reason}")
    except (ArgumentError, ImportError, ValueError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        fail(f"cannot use the database at {redact_url(settings.database_url)}: {reason}")
    if require_schema and current != migrate.head_revision():
        fail(
            f"the database schema is at {current or 'nothing'}, not {migrate.head_revision()}: "
            "run `prefloop db upgrade` first"
        )
    return database
