"""One migration chain for both databases, with no drift from the models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import DatabaseError

from app.db import Base, make_engine
from app.migrate import alembic_config, current_revision, head_revision, include_object_for
from app.models import AuditEvent

ROOT = Path(__file__).resolve().parent.parent


def test_upgrade_head_leaves_no_drift(fresh_database_url):
    """What `alembic check` does: the migrated schema matches the models exactly."""
    engine = make_engine(fresh_database_url)
    with engine.connect() as connection:
        opts = {
            "compare_type": True,
            "include_object": include_object_for(connection.dialect.name),
        }
        context = MigrationContext.configure(connection, opts=opts)
        assert compare_metadata(context, Base.metadata) == []
    assert current_revision(engine) == head_revision()
    engine.dispose()


def test_alembic_cli_upgrade_then_check_is_clean(backend):
    """The literal commands: `alembic upgrade head` then `alembic check`, on an empty database."""
    url = backend.clone()
    alembic = [str(Path(sys.executable).with_name("alembic")), "-x", f"url={url}"]
    try:
        engine = make_engine(url)
        with engine.begin() as connection:  # start from nothing, not from the migrated template
            config = alembic_config()
            config.attributes["connection"] = connection
            command.downgrade(config, "base")
        engine.dispose()
        for args in (["upgrade", "head"], ["check"]):
            result = subprocess.run(
                [*alembic, *args], cwd=ROOT, capture_output=True, text=True, check=False
            )
            assert result.returncode == 0, result.stdout + result.stderr
        assert "No new upgrade operations detected." in result.stdout + result.stderr
    finally:
        backend.drop(url)


def test_downgrade_to_base_and_back(fresh_database_url):
    engine = make_engine(fresh_database_url)
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    assert set(inspect(engine).get_table_names()) >= set(Base.metadata.tables)
    engine.dispose()


def test_hot_paths_are_indexed(connection):
    inspector = inspect(connection)

    def indexed_columns(table: str) -> list[list[str]]:
        return [index["column_names"] for index in inspector.get_indexes(table)]

    claim = ["campaign_id", "status", "is_gold", "priority", "id"]
    assert claim in indexed_columns("tasks")  # next task
    assert ["campaign_id", "id"] in indexed_columns("comparisons")  # comparisons since an id
    assert ["state", "priority", "run_after", "id"] in indexed_columns("jobs")  # job claim
    assert ["user_id", "state"] in indexed_columns("assignments")


@pytest.mark.parametrize(
    "statement", ["UPDATE audit_events SET action = 'forged'", "DELETE FROM audit_events"]
)
def test_audit_trail_is_append_only(db, statement):
    db.add(AuditEvent(action="test.event", entity_type="test", entity_id="1"))
    db.commit()
    with pytest.raises(DatabaseError, match="append-only"), db.begin_nested():
        db.execute(text(statement))
    assert db.scalar(text("SELECT action FROM audit_events")) == "test.event"
