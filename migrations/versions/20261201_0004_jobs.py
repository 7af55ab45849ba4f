"""Job queue: attempts that do not count toward max_attempts, and the log tail.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "jobs", sa.Column("uncounted_attempts", sa.Integer(), server_default="0", nullable=False)
    )
    op.add_column("jobs", sa.Column("log_tail", sa.Text(), server_default="", nullable=False))


def downgrade() -> None:
    # Plain ALTER TABLE ... DROP COLUMN (SQLite 3.35+), not a batch rebuild: rebuilding `jobs`
    # drops the old table, and with foreign keys on that cascades into job_metrics.
    op.drop_column("jobs", "log_tail")
    op.drop_column("jobs", "uncounted_attempts")
