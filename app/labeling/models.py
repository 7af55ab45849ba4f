"""Prompts, completions, tasks, assignments, judgments and the comparisons derived from them."""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db import Base, BigId, CreatedAt, IdPK, JSONType, str_enum


class Prompt(Base):
    """A prompt: plain text, or a list of chat messages ({"role", "content"})."""

    __tablename__ = "prompts"
    __table_args__ = (
        UniqueConstraint("campaign_id", "external_id"),
        Index("ix_prompts_campaign_id_content_hash", "campaign_id", "content_hash"),
        CheckConstraint("text IS NOT NULL OR messages IS NOT NULL", name="text_or_messages"),
    )

    id: Mapped[IdPK]
    campaign_id: Mapped[int] = mapped_column(BigId, ForeignKey("campaigns.id", ondelete="CASCADE"))
    external_id: Mapped[str | None] = mapped_column(String(255))
    text: Mapped[str | None] = mapped_column(Text)
    messages: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONType)
    content_hash: Mapped[str] = mapped_column(
        String(64)
    )  # sha256 of the normalised content, for dedup
    # "metadata" is reserved on declarative classes, hence the attribute name.
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType, default=dict)
    created_at: Mapped[CreatedAt]

    completions: Mapped[list[Completion]] = relationship(
        back_populates="prompt", order_by="Completion.id"
    )


class CompletionSource(enum.StrEnum):
    imported = "import"
    model = "model"  # sampled from a registered model version
    human = "human"  # written by a labeler (demonstration)


class Completion(Base):
    __tablename__ = "completions"

    id: Mapped[IdPK]
    prompt_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("prompts.id", ondelete="CASCADE"), index=True
    )
    text: Mapped[str] = mapped_column(Text)
    source: Mapped[CompletionSource] = mapped_column(
        str_enum(CompletionSource, "completion_source"), default=CompletionSource.imported
    )
    model_version_id: Mapped[int | None] = mapped_column(
        BigId, ForeignKey("model_versions.id"), index=True
    )
    author_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("users.id"))
    generation_params: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    content_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[CreatedAt]

    prompt: Mapped[Prompt] = relationship(back_populates="completions")


class TaskStatus(enum.StrEnum):
    open = "open"  # still needs judgments
    complete = "complete"  # has all the judgments it needs
    retired = "retired"  # withdrawn by an admin


class Task(Base):
    """A prompt and its ordered completions, to be judged `required_judgments` times."""

    __tablename__ = "tasks"
    __table_args__ = (
        # The claim query walks this index in serving order: highest priority, then oldest.
        Index("ix_tasks_claim", "campaign_id", "status", "is_gold", text("priority DESC"), "id"),
        Index("ix_tasks_campaign_id_content_hash", "campaign_id", "content_hash"),
        CheckConstraint("required_judgments >= 1", name="required_positive"),
        CheckConstraint("judgment_count >= 0", name="judgment_count_nonnegative"),
        CheckConstraint("assigned_count >= 0", name="assigned_count_nonnegative"),
    )

    id: Mapped[IdPK]
    campaign_id: Mapped[int] = mapped_column(BigId, ForeignKey("campaigns.id", ondelete="CASCADE"))
    prompt_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("prompts.id", ondelete="CASCADE"), index=True
    )
    status: Mapped[TaskStatus] = mapped_column(
        str_enum(TaskStatus, "task_status"), default=TaskStatus.open
    )
    priority: Mapped[int] = mapped_column(Integer, default=0)  # higher is served first
    required_judgments: Mapped[int] = mapped_column(Integer, default=1)
    judgment_count: Mapped[int] = mapped_column(Integer, default=0)  # current, non-superseded
    # Labelers holding a slot: live leases plus submitted judgments. Exact overlap means
    # a task is claimable only while assigned_count < required_judgments.
    assigned_count: Mapped[int] = mapped_column(Integer, default=0)
    # sha256 of the prompt and its completions, so a re-import skips what exists.
    content_hash: Mapped[str | None] = mapped_column(String(64))
    is_gold: Mapped[bool] = mapped_column(Boolean, default=False)
    # The expected ranking for gold tasks: tiers of completion ids, best first.
    gold_ranking: Mapped[list[list[int]] | None] = mapped_column(JSONType)
    # A disputed task's answer as an admin recorded it; it overrides the computed consensus.
    resolved_ranking: Mapped[list[list[int]] | None] = mapped_column(JSONType)
    resolved_by_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("users.id"))
    resolved_at: Mapped[dt.datetime | None]
    created_at: Mapped[CreatedAt]

    items: Mapped[list[TaskCompletion]] = relationship(
        order_by="TaskCompletion.position", cascade="all, delete-orphan", passive_deletes=True
    )
    prompt: Mapped[Prompt] = relationship()


class TaskCompletion(Base):
    """The completions of a task, in their canonical order (display order is per labeler)."""

    __tablename__ = "task_completions"
    __table_args__ = (UniqueConstraint("task_id", "completion_id"),)

    task_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    completion_id: Mapped[int] = mapped_column(BigId, ForeignKey("completions.id"), index=True)

    completion: Mapped[Completion] = relationship()


class AssignmentState(enum.StrEnum):
    active = "active"  # leased to the labeler until lease_expires_at
    submitted = "submitted"
    skipped = "skipped"
    expired = "expired"  # the lease ran out; the task went back to the pool
    released = "released"  # given back by the labeler or an admin


class Assignment(Base):
    """A lease of one task to one labeler."""

    __tablename__ = "assignments"
    __table_args__ = (
        # Never the same task twice to one labeler, whatever happened to the first lease,
        # except once more as a self-consistency re-check.
        UniqueConstraint("task_id", "user_id", "is_recheck"),
        Index("ix_assignments_user_id_state", "user_id", "state"),
        Index("ix_assignments_task_id_state", "task_id", "state"),
        Index("ix_assignments_state_lease_expires_at", "state", "lease_expires_at"),
    )

    id: Mapped[IdPK]
    task_id: Mapped[int] = mapped_column(BigId, ForeignKey("tasks.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(BigId, ForeignKey("users.id"))
    state: Mapped[AssignmentState] = mapped_column(
        str_enum(AssignmentState, "assignment_state"), default=AssignmentState.active
    )
    # The order the completions were shown in (completion ids), random per labeler.
    display_order: Mapped[list[int]] = mapped_column(JSONType, default=list)
    # Rendered into the task page; a submit carrying it twice counts once.
    submit_key: Mapped[str] = mapped_column(String(64), unique=True)
    leased_at: Mapped[CreatedAt]
    lease_expires_at: Mapped[dt.datetime]
    finished_at: Mapped[dt.datetime | None]
    skip_reason: Mapped[str | None] = mapped_column(Text)
    # A labeler's own past task served again in a new order, to measure self-consistency.
    # It takes no slot on the task and its judgment does not count towards the overlap.
    is_recheck: Mapped[bool] = mapped_column(Boolean, default=False)


class Judgment(Base):
    """One labeler's answer on one task. Edits add a new row that supersedes the old one."""

    __tablename__ = "judgments"
    __table_args__ = (
        Index("ix_judgments_campaign_id_id", "campaign_id", "id"),
        Index("ix_judgments_user_id_created_at", "user_id", "created_at"),
        CheckConstraint("pairwise_strength BETWEEN -3 AND 3", name="strength_range"),
        CheckConstraint("time_on_task_ms >= 0", name="time_nonnegative"),
        CheckConstraint("confidence BETWEEN 1 AND 5", name="confidence_range"),
    )

    id: Mapped[IdPK]
    task_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("tasks.id", ondelete="CASCADE"), index=True
    )
    campaign_id: Mapped[int] = mapped_column(BigId, ForeignKey("campaigns.id", ondelete="CASCADE"))
    assignment_id: Mapped[int | None] = mapped_column(
        BigId, ForeignKey("assignments.id"), index=True
    )
    user_id: Mapped[int] = mapped_column(BigId, ForeignKey("users.id"))
    # Tiers of completion ids, best first; a tier with several ids is a tie: [[3], [1, 4], [2]].
    ranking: Mapped[list[list[int]] | None] = mapped_column(JSONType)
    # Pairwise mode: -3 (first much better) .. 0 (tie) .. 3 (second much better), in task order.
    pairwise_strength: Mapped[int | None] = mapped_column(Integer)
    ratings: Mapped[dict[str, int]] = mapped_column(JSONType, default=dict)  # completion id -> 1..7
    flags: Mapped[dict[str, list[str]]] = mapped_column(
        JSONType, default=dict
    )  # completion id -> flags
    comment: Mapped[str] = mapped_column(Text, default="")
    confidence: Mapped[int | None] = mapped_column(Integer)  # 1 (guess) .. 5 (certain)
    # Demonstration mode: the completion the labeler wrote.
    demonstration_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("completions.id"))
    time_on_task_ms: Mapped[int] = mapped_column(Integer, default=0)
    display_order: Mapped[list[int]] = mapped_column(JSONType, default=list)
    guidelines_version: Mapped[int] = mapped_column(Integer, default=1)
    idempotency_key: Mapped[str] = mapped_column(String(64), unique=True)
    payload_hash: Mapped[str] = mapped_column(String(64))  # same key, other payload -> rejected
    supersedes_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("judgments.id"), index=True)
    is_current: Mapped[bool] = mapped_column(Boolean, default=True)
    # A self-consistency re-check answers the same task again: it points at the judgment it
    # re-checks, is never current, and yields no comparisons.
    recheck_of_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("judgments.id"), index=True)
    created_at: Mapped[CreatedAt]


class ComparisonSource(enum.StrEnum):
    human = "human"
    imported = "import"
    ai = "ai"


class Comparison(Base):
    """One ordered pair derived from a judgment (or imported): what reward models train on."""

    __tablename__ = "comparisons"
    __table_args__ = (
        # The trainer's feed reads "comparisons since id N" per campaign.
        Index("ix_comparisons_campaign_id_id", "campaign_id", "id"),
        CheckConstraint("chosen_id <> rejected_id", name="distinct_pair"),
    )

    id: Mapped[IdPK]
    campaign_id: Mapped[int] = mapped_column(BigId, ForeignKey("campaigns.id", ondelete="CASCADE"))
    prompt_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("prompts.id", ondelete="CASCADE"), index=True
    )
    judgment_id: Mapped[int | None] = mapped_column(
        BigId, ForeignKey("judgments.id", ondelete="CASCADE"), index=True
    )
    user_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("users.id"))
    chosen_id: Mapped[int] = mapped_column(BigId, ForeignKey("completions.id"))
    rejected_id: Mapped[int] = mapped_column(BigId, ForeignKey("completions.id"))
    is_tie: Mapped[bool] = mapped_column(Boolean, default=False)
    margin: Mapped[float | None] = mapped_column(Float)  # from pairwise strength, when given
    source: Mapped[ComparisonSource] = mapped_column(
        str_enum(ComparisonSource, "comparison_source"), default=ComparisonSource.human
    )
    # False once the judgment is superseded; kept for the record. Excluded labelers are
    # filtered when read (see app.quality.service.not_excluded), so an exclusion is reversible.
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[CreatedAt]
