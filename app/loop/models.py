"""Online RLHF in a loop: a campaign's loop, its iterations, and the audit pairs that measure
each new policy against its parent with human judgments."""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import CheckConstraint, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, BigId, CreatedAt, IdPK, JSONType, str_enum, utcnow


class LoopState(enum.StrEnum):
    active = "active"  # the worker starts an iteration when enough new comparisons arrived
    paused = "paused"  # by an admin, or by the loop itself when a step's job failed


class Stage(enum.StrEnum):
    reward = "reward"  # train_reward: warm-start the reward model on the comparisons so far
    policy = "policy"  # ppo, dpo or rloo from the current policy
    generate = "generate"  # fresh completions (and audit pairs) from the new policy
    done = "done"
    failed = "failed"


class PolicyLoop(Base):
    """A campaign in loop mode: what to train, from which versions, and when."""

    __tablename__ = "policy_loops"
    __table_args__ = (
        CheckConstraint("min_new_comparisons >= 1", name="min_new_comparisons_positive"),
        CheckConstraint("audit_share >= 0 AND audit_share <= 1", name="audit_share_range"),
    )

    id: Mapped[IdPK]
    campaign_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("campaigns.id", ondelete="CASCADE"), unique=True
    )
    state: Mapped[LoopState] = mapped_column(
        str_enum(LoopState, "loop_state"), default=LoopState.active
    )
    paused_reason: Mapped[str | None] = mapped_column(Text)
    algorithm: Mapped[str] = mapped_column(String(16))  # ppo, dpo or rloo
    # The policy the next iteration starts from: the initial one, then each iteration's result.
    policy_id: Mapped[int] = mapped_column(BigId, ForeignKey("model_versions.id"))
    # The policy the loop started from: the KL of every later version is measured against it.
    reference_id: Mapped[int] = mapped_column(BigId, ForeignKey("model_versions.id"))
    # The reward model the next iteration warm-starts from (None: train one from the backbone).
    reward_model_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("model_versions.id"))
    reward_backbone: Mapped[str | None] = mapped_column(Text)
    min_new_comparisons: Mapped[int] = mapped_column(Integer, default=200)
    audit_share: Mapped[float] = mapped_column(Float, default=0.2)
    # The newest human comparison id the last iteration counted: newer ones are "new".
    comparison_mark: Mapped[int] = mapped_column(BigId, default=0)
    # Options of each step's job: {"reward": {...}, "policy": {...}, "generate": {...}}.
    config: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_by_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("users.id"))
    created_at: Mapped[CreatedAt]
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class LoopIteration(Base):
    """One turn of the loop: reward model, then policy, then generation, each an ordinary job."""

    __tablename__ = "loop_iterations"
    __table_args__ = (UniqueConstraint("loop_id", "number"),)

    id: Mapped[IdPK]
    loop_id: Mapped[int] = mapped_column(BigId, ForeignKey("policy_loops.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)  # 1, 2, ... within the loop
    stage: Mapped[Stage] = mapped_column(str_enum(Stage, "loop_stage"), default=Stage.reward)
    comparison_mark: Mapped[int] = mapped_column(BigId)  # comparisons up to this id
    new_comparisons: Mapped[int] = mapped_column(Integer)  # since the last iteration's mark
    parent_policy_id: Mapped[int] = mapped_column(BigId, ForeignKey("model_versions.id"))
    reward_job_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("jobs.id"))
    reward_model_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("model_versions.id"))
    policy_job_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("jobs.id"))
    policy_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("model_versions.id"))
    generate_job_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("jobs.id"))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[CreatedAt]
    finished_at: Mapped[dt.datetime | None]


class AuditPair(Base):
    """A task that shows a new policy's sample beside its parent's for the same prompt.

    Labelers see an ordinary pairwise task (the sides are shuffled and nothing marks it);
    the judgments on it are the new version's human win rate against its parent. The reward
    model's scores of both samples are kept, so the page can set what the reward model thinks
    beside what people think."""

    __tablename__ = "audit_pairs"

    task_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True
    )
    new_model_id: Mapped[int] = mapped_column(BigId, ForeignKey("model_versions.id"), index=True)
    old_model_id: Mapped[int] = mapped_column(BigId, ForeignKey("model_versions.id"))
    new_completion_id: Mapped[int] = mapped_column(BigId, ForeignKey("completions.id"))
    old_completion_id: Mapped[int] = mapped_column(BigId, ForeignKey("completions.id"))
    job_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("jobs.id"))
    reward_model_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("model_versions.id"))
    new_score: Mapped[float | None] = mapped_column(Float)
    old_score: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[CreatedAt]
