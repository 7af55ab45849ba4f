"""Label quality: labeler exclusions, stored reports, self-consistency re-checks, resolved tasks.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 19:37:16
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "labeler_exclusions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("user_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "campaign_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column(
            "created_by_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "revoked_by_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.ForeignKeyConstraint(
            ["campaign_id"],
            ["campaigns.id"],
            name=op.f("fk_labeler_exclusions_campaign_id_campaigns"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["created_by_id"], ["users.id"], name=op.f("fk_labeler_exclusions_created_by_id_users")
        ),
        sa.ForeignKeyConstraint(
            ["revoked_by_id"], ["users.id"], name=op.f("fk_labeler_exclusions_revoked_by_id_users")
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_labeler_exclusions_user_id_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_labeler_exclusions")),
    )
    op.create_index(
        "ix_labeler_exclusions_user_id_campaign_id",
        "labeler_exclusions",
        ["user_id", "campaign_id"],
        unique=False,
    )
    op.create_table(
        "quality_reports",
        sa.Column(
            "campaign_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("filters_key", sa.String(length=64), nullable=False),
        sa.Column("stamp", sa.String(length=200), nullable=False),
        sa.Column(
            "report",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("compute_seconds", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["campaign_id"],
            ["campaigns.id"],
            name=op.f("fk_quality_reports_campaign_id_campaigns"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("campaign_id", "filters_key", name=op.f("pk_quality_reports")),
    )
    # Batch mode so SQLite (which cannot ALTER constraints) rebuilds the tables.
    with op.batch_alter_table("assignments") as batch:
        batch.add_column(
            sa.Column("is_recheck", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.drop_constraint(op.f("uq_assignments_task_id_user_id"), type_="unique")
        batch.create_unique_constraint(
            op.f("uq_assignments_task_id_user_id_is_recheck"), ["task_id", "user_id", "is_recheck"]
        )
    with op.batch_alter_table("assignments") as batch:
        batch.alter_column("is_recheck", server_default=None)
    with op.batch_alter_table("campaigns") as batch:
        batch.add_column(sa.Column("recheck_rate", sa.Float(), nullable=False, server_default="0"))
        batch.create_check_constraint(
            "recheck_rate_range", "recheck_rate >= 0 AND recheck_rate <= 0.5"
        )
    with op.batch_alter_table("campaigns") as batch:
        batch.alter_column("recheck_rate", server_default=None)
    with op.batch_alter_table("judgments") as batch:
        batch.add_column(sa.Column("recheck_of_id", BIG_ID, nullable=True))
        batch.create_index(op.f("ix_judgments_recheck_of_id"), ["recheck_of_id"], unique=False)
        batch.create_foreign_key(
            op.f("fk_judgments_recheck_of_id_judgments"), "judgments", ["recheck_of_id"], ["id"]
        )
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("resolved_ranking", JSON_TYPE, nullable=True))
        batch.add_column(sa.Column("resolved_by_id", BIG_ID, nullable=True))
        batch.add_column(sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_foreign_key(
            op.f("fk_tasks_resolved_by_id_users"), "users", ["resolved_by_id"], ["id"]
        )

    # Until now an explicit None in a JSON column was stored as the JSON value null; make
    # those SQL NULL, which the code now writes and tests for.
    null = "'null'::jsonb" if op.get_bind().dialect.name == "postgresql" else "'null'"
    for table, column in (
        ("judgments", "ranking"),
        ("tasks", "gold_ranking"),
        ("prompts", "messages"),
        ("jobs", "result"),
    ):
        op.execute(f"UPDATE {table} SET {column} = NULL WHERE {column} = {null}")  # noqa: S608


def downgrade() -> None:
    # Re-checks would break the old one-assignment-per-task-and-labeler rule.
    op.execute("DELETE FROM judgments WHERE recheck_of_id IS NOT NULL")
    op.execute("DELETE FROM assignments WHERE is_recheck")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_constraint(op.f("fk_tasks_resolved_by_id_users"), type_="foreignkey")
        batch.drop_column("resolved_at")
        batch.drop_column("resolved_by_id")
        batch.drop_column("resolved_ranking")
    with op.batch_alter_table("judgments") as batch:
        batch.drop_constraint(op.f("fk_judgments_recheck_of_id_judgments"), type_="foreignkey")
        batch.drop_index(op.f("ix_judgments_recheck_of_id"))
        batch.drop_column("recheck_of_id")
    with op.batch_alter_table("campaigns") as batch:
        batch.drop_constraint(op.f("ck_campaigns_recheck_rate_range"), type_="check")
        batch.drop_column("recheck_rate")
    with op.batch_alter_table("assignments") as batch:
        batch.drop_constraint(op.f("uq_assignments_task_id_user_id_is_recheck"), type_="unique")
        batch.create_unique_constraint(
            op.f("uq_assignments_task_id_user_id"), ["task_id", "user_id"]
        )
        batch.drop_column("is_recheck")
    op.drop_table("quality_reports")
    op.drop_index("ix_labeler_exclusions_user_id_campaign_id", table_name="labeler_exclusions")
    op.drop_table("labeler_exclusions")
