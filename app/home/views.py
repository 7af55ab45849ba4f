"""Each role's home page. Later capabilities fill them; today they show what exists."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.responses import Response

from app.audit.models import AuditEvent
from app.auth.models import Role, User
from app.campaigns.models import Campaign, CampaignStatus
from app.exports.models import ExportSnapshot
from app.labeling.models import Comparison, Task, TaskStatus
from app.web import DbSession, render, require_roles

admin_router = APIRouter(dependencies=[Depends(require_roles(Role.admin))])
research_router = APIRouter(dependencies=[Depends(require_roles(Role.researcher, Role.admin))])


def campaign_rows(db: Session, *, active_only: bool) -> list[dict[str, object]]:
    """Campaigns with their open-task and comparison counts, newest first."""
    open_tasks = (
        select(func.count())
        .where(Task.campaign_id == Campaign.id, Task.status == TaskStatus.open)
        .scalar_subquery()
    )
    comparisons = (
        select(func.count()).where(Comparison.campaign_id == Campaign.id).scalar_subquery()
    )
    query = select(Campaign, open_tasks, comparisons).order_by(Campaign.id.desc())
    if active_only:
        query = query.where(Campaign.status == CampaignStatus.active)
    return [
        {"campaign": campaign, "open_tasks": n_open, "comparisons": n_comparisons}
        for campaign, n_open, n_comparisons in db.execute(query)
    ]


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
            "campaigns": campaign_rows(db, active_only=False),
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
        {"campaigns": campaign_rows(db, active_only=False), "snapshots": snapshots},
        db=db,
    )
