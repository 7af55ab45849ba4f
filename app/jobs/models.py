"""The job queue the trainer workers claim from, their metrics, and the models they produce."""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import CheckConstraint, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, BigId, CreatedAt, IdPK, JSONType, str_enum, utcnow


class JobState(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"  # this attempt failed; requeued with backoff while attempts remain
    dead = "dead"  # out of attempts: an admin must look
    cancelled = "cancelled"


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        # A worker claims the best queued job whose run_after has passed.
        Index("ix_jobs_claim", "state", "priority", "run_after", "id"),
        Index("ix_jobs_state_lease_expires_at", "state", "lease_expires_at"),
        CheckConstraint("attempt >= 0", name="attempt_nonnegative"),
        CheckConstraint("max_attempts >= 1", name="max_attempts_positive"),
        CheckConstraint("progress >= 0 AND progress <= 1", name="progress_range"),
    )

    id: Mapped[IdPK]
    kind: Mapped[str] = mapped_column(
        String(32)
    )  # generate, train_reward, sft, ppo, dpo, rloo, ...
    campaign_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("campaigns.id"), index=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    state: Mapped[JobState] = mapped_column(
        str_enum(JobState, "job_state"), default=JobState.queued
    )
    priority: Mapped[int] = mapped_column(Integer, default=0)
    # Processes the job trains in (its config's `processes`): a worker claims only the jobs
    # it has devices for.
    processes: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # Attempts started so far. Never goes down: with worker_id it fences a worker's writes.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    # Attempts that do not count toward max_attempts: handed back at a worker's shutdown
    # (SIGTERM), or made before an admin's retry. Counted attempts = attempt - this.
    uncounted_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    run_after: Mapped[dt.datetime] = mapped_column(default=utcnow)  # backoff between attempts
    worker_id: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[dt.datetime | None]
    heartbeat_at: Mapped[dt.datetime | None]
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    progress_message: Mapped[str] = mapped_column(Text, default="")
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    error: Mapped[str | None] = mapped_column(Text)
    # The last lines of the current (or last) attempt's log.txt, sent with each heartbeat.
    log_tail: Mapped[str] = mapped_column(Text, default="", server_default="")
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_by_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("users.id"))
    created_at: Mapped[CreatedAt]
    started_at: Mapped[dt.datetime | None]  # when the current (or last) attempt started
    finished_at: Mapped[dt.datetime | None]


class JobMetric(Base):
    """A scalar logged by a job at a step (loss, accuracy, learning rate, KL, ...)."""

    __tablename__ = "job_metrics"
    __table_args__ = (Index("ix_job_metrics_job_id_name_step", "job_id", "name", "step"),)

    id: Mapped[IdPK]
    job_id: Mapped[int] = mapped_column(BigId, ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    created_at: Mapped[CreatedAt]


class ModelKind(enum.StrEnum):
    policy = "policy"
    reward = "reward"
    reference = "reference"


class ModelVersion(Base):
    """A model the system knows: a base checkpoint or one a job trained from its parent."""

    __tablename__ = "model_versions"

    id: Mapped[IdPK]
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[ModelKind] = mapped_column(str_enum(ModelKind, "model_kind"))
    # A Hugging Face model id or a directory under PREFLOOP_DATA_DIR.
    path: Mapped[str] = mapped_column(Text)
    parent_id: Mapped[int | None] = mapped_column(
        BigId, ForeignKey("model_versions.id"), index=True
    )
    campaign_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("campaigns.id"), index=True)
    job_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("jobs.id"), index=True)
    algorithm: Mapped[str | None] = mapped_column(String(32))  # base, sft, ppo, dpo, rloo, reward
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[CreatedAt]
