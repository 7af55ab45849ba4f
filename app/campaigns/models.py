"""Campaigns: what is labeled, how, by how many people, under which guidelines."""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import Boolean, CheckConstraint, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, BigId, CreatedAt, IdPK, JSONType, str_enum, utcnow

DEFAULT_FLAGS = ["harmful", "factually wrong", "off-topic", "unreadable"]


class CampaignMode(enum.StrEnum):
    rank = "rank"  # order K completions, ties allowed if the campaign says so
    pairwise = "pairwise"  # choose between two, on a strength scale
    demonstration = "demonstration"  # write the answer yourself (SFT data)


class CampaignStatus(enum.StrEnum):
    draft = "draft"
    active = "active"
    paused = "paused"
    archived = "archived"


class Campaign(Base):
    __tablename__ = "campaigns"
    __table_args__ = (
        CheckConstraint("k BETWEEN 2 AND 9", name="k_range"),
        CheckConstraint("overlap >= 1", name="overlap_positive"),
        CheckConstraint("gold_rate >= 0 AND gold_rate <= 1", name="gold_rate_range"),
        CheckConstraint("recheck_rate >= 0 AND recheck_rate <= 0.5", name="recheck_rate_range"),
        CheckConstraint("lease_minutes >= 1", name="lease_positive"),
        CheckConstraint("guidelines_version >= 1", name="guidelines_version_positive"),
    )

    id: Mapped[IdPK]
    slug: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    guidelines_md: Mapped[str] = mapped_column(Text, default="")
    # Bumped on every guidelines edit and recorded on each judgment.
    guidelines_version: Mapped[int] = mapped_column(Integer, default=1)
    k: Mapped[int] = mapped_column(Integer, default=4)  # completions per task
    mode: Mapped[CampaignMode] = mapped_column(
        str_enum(CampaignMode, "campaign_mode"), default=CampaignMode.rank
    )
    overlap: Mapped[int] = mapped_column(Integer, default=3)  # judgments required per task
    gold_rate: Mapped[float] = mapped_column(
        Float, default=0.0
    )  # share of served tasks that are gold
    # Share of served tasks that re-serve one of the labeler's own past tasks (self-consistency).
    recheck_rate: Mapped[float] = mapped_column(Float, default=0.0)
    lease_minutes: Mapped[int] = mapped_column(Integer, default=30)
    allow_ties: Mapped[bool] = mapped_column(Boolean, default=True)
    flags: Mapped[list[str]] = mapped_column(JSONType, default=lambda: list(DEFAULT_FLAGS))
    status: Mapped[CampaignStatus] = mapped_column(
        str_enum(CampaignStatus, "campaign_status"), default=CampaignStatus.active
    )
    # Room for settings later issues add (loop mode, self-consistency share, ...).
    settings: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_by_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("users.id"))
    created_at: Mapped[CreatedAt]
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class CampaignGuidelines(Base):
    """Every version of a campaign's guidelines, so a judgment's version can be read back."""

    __tablename__ = "campaign_guidelines"

    campaign_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("campaigns.id", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    guidelines_md: Mapped[str] = mapped_column(Text)
    created_by_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("users.id"))
    created_at: Mapped[CreatedAt]
