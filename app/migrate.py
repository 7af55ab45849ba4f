"""Run Alembic from code: `prefloop db upgrade`, the demo, and the tests use this."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from app.config import PROJECT_ROOT


def alembic_config() -> Config:
    return Config(str(PROJECT_ROOT / "alembic.ini"))


def upgrade(engine: Engine, revision: str = "head") -> None:
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


# Indexes with a sort direction (ix_tasks_claim: priority DESC). SQLite reflects them without
# the direction, so there a schema comparison would report them as changed on every run.
DIRECTIONAL_INDEXES = frozenset({"ix_tasks_claim"})


def _include_on_sqlite(obj: Any, name: str | None, type_: str, *_: Any) -> bool:
    return not (type_ == "index" and name in DIRECTIONAL_INDEXES)


def include_object_for(dialect: str) -> Callable[..., bool] | None:
    """The `include_object` hook for schema comparisons (`alembic check`) on this dialect."""
    return _include_on_sqlite if dialect == "sqlite" else None
