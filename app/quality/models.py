"""What admins decide about label quality, and the dashboard's stored figures."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Float, ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, BigId, CreatedAt, IdPK, JSONType


class LabelerExclusion(Base):
    """An admin's decision to keep one labeler's judgments out of exports and training.

    Scoped to one campaign, or (campaign_id None) to every campaign. Revoking keeps the row
    for the record; a labeler is excluded while any unrevoked row covers the campaign.
    """

    __tablename__ = "labeler_exclusions"
    __table_args__ = (Index("ix_labeler_exclusions_user_id_campaign_id", "user_id", "campaign_id"),)

    id: Mapped[IdPK]
    user_id: Mapped[int] = mapped_column(BigId, ForeignKey("users.id"))
    campaign_id: Mapped[int | None] = mapped_column(
        BigId, ForeignKey("campaigns.id", ondelete="CASCADE")
    )
    reason: Mapped[str] = mapped_column(Text)
    created_by_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("users.id"))
    created_at: Mapped[CreatedAt]
    revoked_at: Mapped[dt.datetime | None]
    revoked_by_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("users.id"))


class QualityReport(Base):
    """A computed quality report, kept so the dashboard answers at once on large campaigns.

    `stamp` fingerprints the data the report was computed from (judgments, exclusions, gold
    and resolved tasks); a report whose stamp no longer matches is shown as stale while a
    fresh one is computed.
    """

    __tablename__ = "quality_reports"

    campaign_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("campaigns.id", ondelete="CASCADE"), primary_key=True
    )
    filters_key: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of filters
    stamp: Mapped[str] = mapped_column(String(200))
    report: Mapped[dict[str, Any]] = mapped_column(JSONType)
    computed_at: Mapped[CreatedAt]
    compute_seconds: Mapped[float] = mapped_column(Float)
