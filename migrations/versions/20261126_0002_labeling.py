"""Labeling: exact-overlap slots, task content hashes, skip reasons, judgment confidence.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 16:26:26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Batch mode so SQLite (which cannot ALTER constraints) rebuilds the tables.
    with op.batch_alter_table("assignments") as batch:
        batch.add_column(sa.Column("skip_reason", sa.Text(), nullable=True))
        batch.create_unique_constraint(
            op.f("uq_assignments_task_id_user_id"), ["task_id", "user_id"]
        )
    with op.batch_alter_table("judgments") as batch:
        batch.add_column(sa.Column("confidence", sa.Integer(), nullable=True))
        batch.create_check_constraint("confidence_range", "confidence BETWEEN 1 AND 5")
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(
            sa.Column("assigned_count", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("content_hash", sa.String(length=64), nullable=True))
        batch.create_check_constraint("assigned_count_nonnegative", "assigned_count >= 0")
        batch.drop_index(op.f("ix_tasks_next"))
    # Existing leases and judgments hold slots.
    op.execute(
        "UPDATE tasks SET assigned_count = (SELECT count(*) FROM assignments a"
        " WHERE a.task_id = tasks.id AND a.state IN ('active', 'submitted'))"
    )
    with op.batch_alter_table("tasks") as batch:
        batch.alter_column("assigned_count", server_default=None)
    op.create_index(
        "ix_tasks_campaign_id_content_hash", "tasks", ["campaign_id", "content_hash"], unique=False
    )
    op.create_index(
        "ix_tasks_claim",
        "tasks",
        ["campaign_id", "status", "is_gold", sa.literal_column("priority DESC"), "id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_claim", table_name="tasks")
    op.drop_index("ix_tasks_campaign_id_content_hash", table_name="tasks")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_constraint(op.f("ck_tasks_assigned_count_nonnegative"), type_="check")
        batch.drop_column("content_hash")
        batch.drop_column("assigned_count")
        batch.create_index("ix_tasks_next", ["campaign_id", "status", "priority", "id"])
    with op.batch_alter_table("judgments") as batch:
        batch.drop_constraint(op.f("ck_judgments_confidence_range"), type_="check")
        batch.drop_column("confidence")
    with op.batch_alter_table("assignments") as batch:
        batch.drop_constraint(op.f("uq_assignments_task_id_user_id"), type_="unique")
        batch.drop_column("skip_reason")
