"""Each role's home page. Later capabilities fill them; today they show what exists."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from sqlalchemy import func, select
from starlette.responses import Response

from app.audit.models import AuditEvent
from app.auth.models import Role, User
from app.campaigns import service as campaigns_service
from app.exports.models import ExportSnapshot
from app.web import DbSession, render, require_roles

admin_router = APIRouter(dependencies=[Depends(require_roles(Role.admin))])
research_router = APIRouter(dependencies=[Depends(require_roles(Role.researcher, Role.admin))])


@admin_router.get("/admin")
def admin_home(request: Request, db: DbSession) -> Response:
    """The admin overview: people by role, campaigns, and the latest audit events."""
    users_by_role = dict(
        db.execute(select(User.role, func.count()).group_by(User.role)).tuples().all()
    )
    events = db.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(20)).all()
    actors = {
        u.id: u.username
        for u in db.scalars(select(User).where(User.id.in_({e.actor_id for e in events})))
    }
    return render(
        request,
        "home/admin.html",
        {
            "users_by_role": {role: users_by_role.get(role, 0) for role in Role},
            "campaigns": campaigns_service.list_campaigns(db),
            "events": events,
            "actors": actors,
        },
        db=db,
    )


@research_router.get("/research")
def research_home(request: Request, db: DbSession) -> Response:
    """The researcher's desk: campaigns with comparisons, and export snapshots."""
    snapshots = db.scalars(
        select(ExportSnapshot).order_by(ExportSnapshot.id.desc()).limit(50)
    ).all()
    return render(
        request,
        "home/research.html",
        {"campaigns": campaigns_service.list_campaigns(db), "snapshots": snapshots},
        db=db,
    )
