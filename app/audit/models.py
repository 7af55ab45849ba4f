"""The audit trail: append-only events, written in the same transaction as the change."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, BigId, IdPK, JSONType, utcnow


class AuditEvent(Base):
    """Who did what to which entity, and the values before and after.

    The migration installs triggers that refuse UPDATE and DELETE on this table.
    """

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_entity", "entity_type", "entity_id", "id"),
        Index("ix_audit_events_actor_id_at", "actor_id", "at"),
    )

    id: Mapped[IdPK]
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    actor_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("users.id"))  # None: the system
    action: Mapped[str] = mapped_column(String(64))  # e.g. user.create, judgment.supersede
    entity_type: Mapped[str] = mapped_column(String(32))
    entity_id: Mapped[str | None] = mapped_column(String(64))
    before: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    reason: Mapped[str | None] = mapped_column(Text)
    ip: Mapped[str | None] = mapped_column(String(64))
