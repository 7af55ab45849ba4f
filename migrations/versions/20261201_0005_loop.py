"""The loop: a campaign's online-RLHF loop, its iterations, and audit pairs (new policy's
sample against its parent's, for the human win rate); and the processes a job trains in.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 22:51:41
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("processes", sa.Integer(), server_default="1", nullable=False))
    op.create_table(
        "policy_loops",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "campaign_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "state",
            sa.Enum(
                "active",
                "paused",
                name="loop_state",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("paused_reason", sa.Text(), nullable=True),
        sa.Column("algorithm", sa.String(length=16), nullable=False),
        sa.Column(
            "policy_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "reference_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "reward_model_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("reward_backbone", sa.Text(), nullable=True),
        sa.Column("min_new_comparisons", sa.Integer(), nullable=False),
        sa.Column("audit_share", sa.Float(), nullable=False),
        sa.Column(
            "comparison_mark", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "config",
            sa.JSON(none_as_null=True).with_variant(
                postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), "postgresql"
            ),
            nullable=False,
        ),
        sa.Column(
            "created_by_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "audit_share >= 0 AND audit_share <= 1", name=op.f("ck_policy_loops_audit_share_range")
        ),
        sa.CheckConstraint(
            "min_new_comparisons >= 1", name=op.f("ck_policy_loops_min_new_comparisons_positive")
        ),
        sa.ForeignKeyConstraint(
            ["campaign_id"],
            ["campaigns.id"],
            name=op.f("fk_policy_loops_campaign_id_campaigns"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["created_by_id"], ["users.id"], name=op.f("fk_policy_loops_created_by_id_users")
        ),
        sa.ForeignKeyConstraint(
            ["policy_id"],
            ["model_versions.id"],
            name=op.f("fk_policy_loops_policy_id_model_versions"),
        ),
        sa.ForeignKeyConstraint(
            ["reference_id"],
            ["model_versions.id"],
            name=op.f("fk_policy_loops_reference_id_model_versions"),
        ),
        sa.ForeignKeyConstraint(
            ["reward_model_id"],
            ["model_versions.id"],
            name=op.f("fk_policy_loops_reward_model_id_model_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_policy_loops")),
        sa.UniqueConstraint("campaign_id", name=op.f("uq_policy_loops_campaign_id")),
    )
    op.create_table(
        "audit_pairs",
        sa.Column("task_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "new_model_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "old_model_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "new_completion_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=False,
        ),
        sa.Column(
            "old_completion_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=False,
        ),
        sa.Column("job_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column(
            "reward_model_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("new_score", sa.Float(), nullable=True),
        sa.Column("old_score", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_audit_pairs_job_id_jobs")),
        sa.ForeignKeyConstraint(
            ["new_completion_id"],
            ["completions.id"],
            name=op.f("fk_audit_pairs_new_completion_id_completions"),
        ),
        sa.ForeignKeyConstraint(
            ["new_model_id"],
            ["model_versions.id"],
            name=op.f("fk_audit_pairs_new_model_id_model_versions"),
        ),
        sa.ForeignKeyConstraint(
            ["old_completion_id"],
            ["completions.id"],
            name=op.f("fk_audit_pairs_old_completion_id_completions"),
        ),
        sa.ForeignKeyConstraint(
            ["old_model_id"],
            ["model_versions.id"],
            name=op.f("fk_audit_pairs_old_model_id_model_versions"),
        ),
        sa.ForeignKeyConstraint(
            ["reward_model_id"],
            ["model_versions.id"],
            name=op.f("fk_audit_pairs_reward_model_id_model_versions"),
        ),
        sa.ForeignKeyConstraint(
            ["task_id"], ["tasks.id"], name=op.f("fk_audit_pairs_task_id_tasks"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("task_id", name=op.f("pk_audit_pairs")),
    )
    with op.batch_alter_table("audit_pairs", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_audit_pairs_new_model_id"), ["new_model_id"], unique=False
        )

    op.create_table(
        "loop_iterations",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("loop_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column(
            "stage",
            sa.Enum(
                "reward",
                "policy",
                "generate",
                "done",
                "failed",
                name="loop_stage",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column(
            "comparison_mark", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("new_comparisons", sa.Integer(), nullable=False),
        sa.Column(
            "parent_policy_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "reward_job_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column(
            "reward_model_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column(
            "policy_job_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("policy_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column(
            "generate_job_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["generate_job_id"], ["jobs.id"], name=op.f("fk_loop_iterations_generate_job_id_jobs")
        ),
        sa.ForeignKeyConstraint(
            ["loop_id"],
            ["policy_loops.id"],
            name=op.f("fk_loop_iterations_loop_id_policy_loops"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["parent_policy_id"],
            ["model_versions.id"],
            name=op.f("fk_loop_iterations_parent_policy_id_model_versions"),
        ),
        sa.ForeignKeyConstraint(
            ["policy_id"],
            ["model_versions.id"],
            name=op.f("fk_loop_iterations_policy_id_model_versions"),
        ),
        sa.ForeignKeyConstraint(
            ["policy_job_id"], ["jobs.id"], name=op.f("fk_loop_iterations_policy_job_id_jobs")
        ),
        sa.ForeignKeyConstraint(
            ["reward_job_id"], ["jobs.id"], name=op.f("fk_loop_iterations_reward_job_id_jobs")
        ),
        sa.ForeignKeyConstraint(
            ["reward_model_id"],
            ["model_versions.id"],
            name=op.f("fk_loop_iterations_reward_model_id_model_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_loop_iterations")),
        sa.UniqueConstraint("loop_id", "number", name=op.f("uq_loop_iterations_loop_id_number")),
    )


def downgrade() -> None:
    op.drop_table("loop_iterations")
    with op.batch_alter_table("audit_pairs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_pairs_new_model_id"))

    op.drop_table("audit_pairs")
    op.drop_table("policy_loops")
    # Plain ALTER TABLE ... DROP COLUMN (SQLite 3.35+), as in 0004: a batch rebuild of `jobs`
    # would cascade into job_metrics.
    op.drop_column("jobs", "processes")
