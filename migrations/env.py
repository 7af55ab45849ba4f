"""Alembic environment: one migration chain for PostgreSQL and SQLite."""

from __future__ import annotations

import os
from typing import Any

from alembic import context
from sqlalchemy import pool

from app import models  # noqa: F401  (registers every table on Base.metadata)
from app.config import Settings, normalize_database_url
from app.db import Base, UTCDateTime, make_engine
from app.migrate import include_object_for

config = context.config
target_metadata = Base.metadata


def database_url() -> str:
    """The URL from `-x url=...`, the config (set by the CLI), or PREFLOOP_DATABASE_URL."""
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        # Not Settings(): migrations must run without the web server's secret key.
        url = (
            os.environ.get("PREFLOOP_DATABASE_URL") or Settings.model_fields["database_url"].default
        )
    return normalize_database_url(url)


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    # Migrations must not import app code that may change later: render plain SQLAlchemy types.
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def run_migrations_offline() -> None:
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
        render_item=render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # handed in by tests or the CLI
        _run(connection)
        return
    engine = make_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        _run(connection)
    engine.dispose()


def _run(connection: Any) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite rebuilds tables to ALTER
        render_item=render_item,
        include_object=include_object_for(connection.dialect.name),
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
