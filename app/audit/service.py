"""Write audit events. Call inside the transaction that makes the change."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.audit.models import AuditEvent


def record(
    session: Session,
    *,
    actor_id: int | None,
    action: str,
    entity_type: str,
    entity_id: int | str | None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    reason: str | None = None,
    ip: str | None = None,
) -> AuditEvent:
    """Append one event; it commits or rolls back with the change it describes."""
    event = AuditEvent(
        actor_id=actor_id,
        action=action,
        entity_type=entity_type,
        entity_id=None if entity_id is None else str(entity_id),
        before=before,
        after=after,
        reason=reason,
        ip=ip,
    )
    session.add(event)
    session.flush()
    return event
