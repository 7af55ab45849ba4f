"""Label quality: the campaign dashboard (admins) and the same figures as JSON."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.responses import RedirectResponse, Response

from app.audit.models import AuditEvent
from app.auth.models import Role, User
from app.campaigns import service as campaigns
from app.campaigns.models import Campaign
from app.labeling import service as labeling
from app.labeling.models import Completion, Judgment, Task
from app.quality import metrics
from app.quality.service import (
    Filters,
    disagreements,
    labeler_stats,
    load_judgments,
    quality_report,
    send_back,
    set_gold,
)
from app.rendering import render_markdown
from app.web import CurrentPrincipal, DbSession, flash, render, require_roles

api_router = APIRouter(
    prefix="/api/v1",
    tags=["quality"],
    dependencies=[Depends(require_roles(Role.admin, Role.researcher))],
)
router = APIRouter(dependencies=[Depends(require_roles(Role.admin))])

SORTABLE = {
    "username",
    "judgments",
    "median_seconds",
    "agreement_with_others",
    "gold_accuracy",
    "tie_rate",
    "skip_rate",
    "flag_rate",
}
Since = Annotated[dt.date | None, Query(description="First day included (UTC).")]
Until = Annotated[dt.date | None, Query(description="Last day included (UTC).")]
Labelers = Annotated[list[int] | None, Query(description="Only these labeler ids (repeatable).")]


def _campaign(db: Session, slug: str) -> Campaign:
    campaign = campaigns.get_by_slug(db, slug)
    if campaign is None:
        raise HTTPException(404, f"There is no campaign '{slug}'.")
    return campaign


def _filters(since: dt.date | None, until: dt.date | None, labeler: list[int]) -> Filters:
    def midnight(day: dt.date) -> dt.datetime:
        return dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)

    return Filters(
        since=midnight(since) if since else None,
        until=midnight(until + dt.timedelta(days=1)) if until else None,
        labeler_ids=frozenset(labeler),
    )


@api_router.get("/campaigns/{slug}/quality")
def quality_json(
    slug: str, db: DbSession, since: Since = None, until: Until = None, labeler: Labelers = None
) -> dict[str, Any]:
    """Agreement (with bootstrap 95 % intervals) and per-labeler statistics for a campaign."""
    return quality_report(db, _campaign(db, slug), _filters(since, until, labeler or []))


@router.get("/admin/campaigns/{slug}/quality")
def dashboard(
    slug: str,
    request: Request,
    db: DbSession,
    since: Since = None,
    until: Until = None,
    labeler: Labelers = None,
    sort: str = "username",
) -> Response:
    """The campaign's quality dashboard: agreement beside InstructGPT's, and the labelers."""
    campaign = _campaign(db, slug)
    report = quality_report(db, campaign, _filters(since, until, labeler or []))
    key = sort.lstrip("-") if sort.lstrip("-") in SORTABLE else "username"
    descending = sort.startswith("-")
    report["labelers"].sort(
        key=lambda row: (row[key] is None, row[key] if row[key] is not None else 0),
        reverse=descending,
    )
    return render(
        request,
        "quality/dashboard.html",
        {
            "campaign": campaign,
            "report": report,
            "sort": sort,
            "since": since,
            "until": until,
        },
        db=db,
    )


@router.get("/admin/campaigns/{slug}/disagreements")
def disagreement_queue(slug: str, request: Request, db: DbSession) -> Response:
    """Tasks with the lowest agreement, their judgments side by side, and what to do."""
    campaign = _campaign(db, slug)
    items = disagreements(db, campaign, limit=30)
    completions = {
        c.id: c
        for c in db.scalars(
            select(Completion).where(
                Completion.id.in_({tc.completion_id for d in items for tc in d.task.items})
            )
        )
    }
    names = dict(
        db.execute(
            select(User.id, User.username).where(
                User.id.in_({j.user_id for d in items for j in d.judgments})
            )
        )
        .tuples()
        .all()
    )
    return render(
        request,
        "quality/disagreements.html",
        {
            "campaign": campaign,
            "items": items,
            "completions": completions,
            "names": names,
            "places": metrics.places,
            "render_markdown": render_markdown,
        },
        db=db,
    )


def _task(db: Session, task_id: int) -> Task:
    task = db.get(Task, task_id)
    if task is None:
        raise HTTPException(404, "There is no such task.")
    return task


def _back_to_queue(db: Session, task: Task) -> RedirectResponse:
    slug = db.get_one(Campaign, task.campaign_id).slug
    return RedirectResponse(f"/admin/campaigns/{slug}/disagreements", status_code=303)


@router.post("/admin/tasks/{task_id}/send-back")
def send_task_back(task_id: int, db: DbSession, principal: CurrentPrincipal) -> Response:
    """One more judgment for a disputed task."""
    task = send_back(db, task=_task(db, task_id), actor_id=principal.user.id)
    flash(db, principal, f"Task {task.id} now asks for {task.required_judgments} judgments.")
    db.commit()
    return _back_to_queue(db, task)


@router.post("/admin/tasks/{task_id}/gold")
def make_gold(task_id: int, db: DbSession, principal: CurrentPrincipal) -> Response:
    """Turn a task into a gold task whose answer is its current consensus."""
    task = _task(db, task_id)
    rankings = [
        j.ranking
        for j in db.scalars(
            select(Judgment).where(
                Judgment.task_id == task.id,
                Judgment.is_current.is_(True),
                Judgment.ranking.is_not(None),
            )
        )
    ]
    if not rankings:
        raise HTTPException(409, "This task has no judgments to take a consensus from.")
    set_gold(db, task=task, actor_id=principal.user.id, ranking=metrics.consensus(rankings).ranking)
    flash(db, principal, f"Task {task.id} is now a gold task (its answer is the consensus).")
    db.commit()
    return _back_to_queue(db, task)


@router.post("/admin/tasks/{task_id}/ungold")
def unmake_gold(task_id: int, db: DbSession, principal: CurrentPrincipal) -> Response:
    """Undo: a gold task becomes a regular task again."""
    task = set_gold(db, task=_task(db, task_id), actor_id=principal.user.id, ranking=None)
    flash(db, principal, f"Task {task.id} is a regular task again.")
    db.commit()
    return _back_to_queue(db, task)


@router.get("/admin/campaigns/{slug}/labelers/{user_id}")
def labeler_page(slug: str, user_id: int, request: Request, db: DbSession) -> Response:
    """One labeler in one campaign: their figures beside the campaign's, their latest work."""
    campaign = _campaign(db, slug)
    labeler = db.get(User, user_id)
    if labeler is None:
        raise HTTPException(404, "There is no such user.")
    # Only the labeler table: the campaign's agreement intervals are not shown here.
    rows = load_judgments(db, campaign, Filters())
    everyone = labeler_stats(db, campaign, rows)
    mine = next((row for row in everyone if row["labeler_id"] == user_id), None)
    recent = db.scalars(
        select(Judgment)
        .where(Judgment.campaign_id == campaign.id, Judgment.user_id == user_id)
        .order_by(Judgment.id.desc())
        .limit(25)
    ).all()
    return render(
        request,
        "quality/labeler.html",
        {
            "campaign": campaign,
            "labeler": labeler,
            "row": mine,
            "everyone": everyone,
            "judgments_in_campaign": len(rows),
            "recent": recent,
        },
        db=db,
    )


@router.get("/admin/judgments/{judgment_id}")
def judgment_audit(judgment_id: int, request: Request, db: DbSession) -> Response:
    """A judgment's history: every version, and the audit events about them (who, when)."""
    judgment = db.get(Judgment, judgment_id)
    if judgment is None:
        raise HTTPException(404, "There is no such judgment.")
    chain = labeling.versions(db, judgment)
    while True:  # and any later versions
        newer = db.scalar(select(Judgment).where(Judgment.supersedes_id == chain[-1].id))
        if newer is None:
            break
        chain.append(newer)
    events = db.scalars(
        select(AuditEvent)
        .where(
            AuditEvent.entity_type == "judgment",
            AuditEvent.entity_id.in_([str(j.id) for j in chain]),
        )
        .order_by(AuditEvent.id)
    ).all()
    people = dict(
        db.execute(
            select(User.id, User.username).where(
                User.id.in_({j.user_id for j in chain} | {e.actor_id for e in events})
            )
        )
        .tuples()
        .all()
    )
    return render(
        request,
        "quality/judgment.html",
        {
            "judgment": judgment,
            "chain": chain,
            "events": events,
            "people": people,
            "campaign": db.get_one(Campaign, judgment.campaign_id),
        },
        db=db,
    )
