"""Label quality: the campaign dashboard, disagreement review and labeler pages (admins), the
same figures as JSON (admins and researchers), and the admin's audited levers."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, RedirectResponse, Response

from app.audit.models import AuditEvent
from app.auth import service as auth_service
from app.auth.models import Role, User
from app.campaigns import service as campaigns
from app.campaigns.models import Campaign
from app.campaigns.schemas import InvalidCampaign, parse_settings, settings_of
from app.labeling import service as labeling
from app.labeling.models import Completion, Judgment, Task
from app.quality import metrics
from app.quality import service as quality
from app.quality.models import LabelerExclusion
from app.quality.service import Filters
from app.rendering import render_markdown
from app.web import (
    CurrentPrincipal,
    DbSession,
    RowId,
    flash,
    is_htmx,
    render,
    render_block,
    require_roles,
)

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
IncludeExcluded = Annotated[
    bool, Query(description="Count the judgments of labelers an admin excluded.")
]


def _campaign(db: Session, slug: str) -> Campaign:
    campaign = campaigns.get_by_slug(db, slug)
    if campaign is None:
        raise HTTPException(404, f"There is no campaign '{slug}'.")
    return campaign


def _filters(
    since: dt.date | None,
    until: dt.date | None,
    labeler: list[int] | None,
    include_excluded: bool = False,
) -> Filters:
    def midnight(day: dt.date) -> dt.datetime:
        return dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)

    if since and until and until < since:
        raise HTTPException(422, "The range ends before it starts.")
    return Filters(
        since=midnight(since) if since else None,
        until=midnight(until + dt.timedelta(days=1)) if until else None,
        labeler_ids=frozenset(labeler or []),
        include_excluded=include_excluded,
    )


def _refresher(request: Request) -> quality.ReportRefresher:
    state = request.app.state
    if getattr(state, "quality_refresher", None) is None:
        state.quality_refresher = quality.ReportRefresher(state.db.session)
    return state.quality_refresher


def _report(
    request: Request, db: Session, campaign: Campaign, filters: Filters
) -> quality.StoredReport | None:
    stored = quality.cached_report(db, campaign, filters, schedule=_refresher(request).schedule)
    db.commit()  # keep a report computed here
    return stored


def _freshness(stored: quality.StoredReport) -> dict[str, Any]:
    return {
        "computed_at": stored.computed_at.isoformat(),
        "compute_seconds": stored.compute_seconds,
        "fresh": stored.fresh,
    }


def _pending() -> JSONResponse:
    return JSONResponse(
        {"status": "computing", "detail": "The report is being computed; ask again shortly."},
        status_code=202,
        headers={"Retry-After": "5"},
    )


@api_router.get("/campaigns/{slug}/quality")
def quality_json(
    slug: str,
    request: Request,
    db: DbSession,
    since: Since = None,
    until: Until = None,
    labeler: Labelers = None,
    include_excluded: IncludeExcluded = False,
) -> Response:
    """Agreement (with bootstrap 95 % intervals), per-labeler statistics, the labeler x
    labeler matrix, the daily trend and the lowest-agreement tasks of a campaign.

    Large campaigns answer from the stored report (`fresh` says whether it is up to date;
    a stale one is being recomputed). 202 while the first report is computed.
    """
    campaign = _campaign(db, slug)
    stored = _report(request, db, campaign, _filters(since, until, labeler, include_excluded))
    if stored is None:
        return _pending()
    return JSONResponse({**stored.report, **_freshness(stored)})


def _section_json(request: Request, db: Session, slug: str, section: str) -> Response:
    campaign = _campaign(db, slug)
    stored = _report(request, db, campaign, Filters())
    if stored is None:
        return _pending()
    return JSONResponse({section: stored.report[section], **_freshness(stored)})


@api_router.get("/campaigns/{slug}/quality/labelers")
def labelers_json(slug: str, request: Request, db: DbSession) -> Response:
    """The labeler table alone."""
    return _section_json(request, db, slug, "labelers")


@api_router.get("/campaigns/{slug}/quality/matrix")
def matrix_json(slug: str, request: Request, db: DbSession) -> Response:
    """Labeler x labeler agreement on the tasks each two of them shared."""
    return _section_json(request, db, slug, "matrix")


@api_router.get("/campaigns/{slug}/quality/trend")
def trend_json(slug: str, request: Request, db: DbSession) -> Response:
    """Judgments, labelers and agreement per day."""
    return _section_json(request, db, slug, "trend")


@api_router.get("/campaigns/{slug}/quality/disagreements")
def disagreements_json(slug: str, request: Request, db: DbSession) -> Response:
    """The lowest-agreement tasks (not yet resolved) with each judgment and the consensus."""
    campaign = _campaign(db, slug)
    stored = _report(request, db, campaign, Filters())
    if stored is None:
        return _pending()
    items = quality.disagreements(db, campaign, stored.report)
    return JSONResponse(
        {
            "tasks": [
                {
                    "task_id": item.task.id,
                    "agreement": quality._value(item.agreement),
                    "consensus": item.consensus.ranking,
                    # For each consensus-ordered pair: the share of votes that agree with it.
                    "pair_agreement": [
                        {"better": better, "worse": worse, "agreement": round(share, 4)}
                        for (better, worse), share in item.consensus.pair_agreement.items()
                    ],
                    "judgments": [
                        {"judgment_id": j.id, "labeler_id": j.user_id, "ranking": j.ranking}
                        for j in item.judgments
                    ],
                }
                for item in items
            ],
            **_freshness(stored),
        }
    )


@router.get("/admin/campaigns/{slug}/quality")
def dashboard(
    slug: str,
    request: Request,
    db: DbSession,
    since: Since = None,
    until: Until = None,
    labeler: Labelers = None,
    include_excluded: IncludeExcluded = False,
    sort: str = "username",
) -> Response:
    """The campaign's quality dashboard: agreement beside InstructGPT's, charts, the matrix,
    the labelers, and the admin's levers. While the first report of a large campaign is
    computed, a placeholder polls this same URL (htmx) until it is ready."""
    campaign = _campaign(db, slug)
    filters = _filters(since, until, labeler, include_excluded)
    stored = _report(request, db, campaign, filters)
    report = dict(stored.report) if stored else None
    key = sort.lstrip("-") if sort.lstrip("-") in SORTABLE else "username"
    if report is not None:
        descending = sort.startswith("-")
        report["labelers"] = sorted(
            report["labelers"],
            key=lambda row: (row[key] is None, row[key] if row[key] is not None else 0),
            reverse=descending,
        )
    context = {
        "campaign": campaign,
        "report": report,
        "stored": stored,
        "sort": sort,
        "since": since,
        "until": until,
        "include_excluded": include_excluded,
        "exclusions": quality.exclusions(db, campaign.id),
    }
    polling = is_htmx(request) and request.headers.get("hx-trigger") == "quality-poll"
    if report is None:
        context["poll_url"] = str(request.url.path) + (
            f"?{request.url.query}" if request.url.query else ""
        )
        if polling:
            return render_block(request, "quality/computing.html", "poll", context)
        return render(request, "quality/computing.html", context, db=db)
    if polling:  # the placeholder asked, and the report is ready: reload the whole page
        return Response(status_code=200, headers={"HX-Refresh": "true"})
    return render(request, "quality/dashboard.html", context, db=db)


@router.get("/admin/campaigns/{slug}/disagreements")
def disagreement_queue(slug: str, request: Request, db: DbSession) -> Response:
    """Tasks with the lowest agreement, their judgments side by side, and what to do."""
    campaign = _campaign(db, slug)
    stored = _report(request, db, campaign, Filters())
    items = quality.disagreements(db, campaign, stored.report) if stored else []
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
    resolved = db.scalars(
        select(Task)
        .where(Task.campaign_id == campaign.id, Task.resolved_ranking.is_not(None))
        .order_by(Task.resolved_at.desc())
        .limit(20)
    ).all()
    return render(
        request,
        "quality/disagreements.html",
        {
            "campaign": campaign,
            "items": items,
            "stored": stored,
            "resolved": resolved,
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


def _fail(error: quality.QualityError) -> HTTPException:
    return HTTPException(error.status_code, str(error))


@router.post("/admin/tasks/{task_id}/send-back")
def send_task_back(task_id: RowId, db: DbSession, principal: CurrentPrincipal) -> Response:
    """One more judgment for a disputed task."""
    task = quality.send_back(db, task=_task(db, task_id), actor_id=principal.user.id)
    flash(db, principal, f"Task {task.id} now asks for {task.required_judgments} judgments.")
    db.commit()
    return _back_to_queue(db, task)


def _current_rankings(db: Session, task: Task) -> list[list[list[int]]]:
    return [
        j.ranking
        for j in db.scalars(
            select(Judgment).where(
                Judgment.task_id == task.id,
                Judgment.is_current.is_(True),
                Judgment.ranking.is_not(None),
                quality.not_excluded(Judgment.user_id, Judgment.campaign_id),
            )
        )
    ]


@router.post("/admin/tasks/{task_id}/gold")
def make_gold(task_id: RowId, db: DbSession, principal: CurrentPrincipal) -> Response:
    """Turn a task into a gold task whose answer is its recorded or computed consensus."""
    task = _task(db, task_id)
    ranking = task.resolved_ranking
    if ranking is None:
        rankings = _current_rankings(db, task)
        if not rankings:
            raise HTTPException(409, "This task has no judgments to take a consensus from.")
        ranking = metrics.consensus(rankings).ranking
    quality.set_gold(db, task=task, actor_id=principal.user.id, ranking=ranking)
    flash(db, principal, f"Task {task.id} is now a gold task (its answer is the consensus).")
    db.commit()
    return _back_to_queue(db, task)


@router.post("/admin/tasks/{task_id}/ungold")
def unmake_gold(task_id: RowId, db: DbSession, principal: CurrentPrincipal) -> Response:
    """Undo: a gold task becomes a regular task again."""
    task = quality.set_gold(db, task=_task(db, task_id), actor_id=principal.user.id, ranking=None)
    flash(db, principal, f"Task {task.id} is a regular task again.")
    db.commit()
    return _back_to_queue(db, task)


async def _places_form(request: Request, task: Task) -> list[list[int]]:
    """A ranking from a form of `place_<completion id>` = 1..K fields (equal places tie)."""
    form = await request.form()
    places: dict[int, int] = {}
    for item in task.items:
        raw = str(form.get(f"place_{item.completion_id}", "")).strip()
        if not raw.isdigit() or not 1 <= int(raw) <= len(task.items):
            raise HTTPException(422, f"Give every completion a place from 1 to {len(task.items)}.")
        places[item.completion_id] = int(raw)
    tiers: dict[int, list[int]] = {}
    for cid, place in sorted(places.items(), key=lambda kv: (kv[1], kv[0])):
        tiers.setdefault(place, []).append(cid)
    return [tiers[place] for place in sorted(tiers)]


@router.post("/admin/tasks/{task_id}/resolve")
async def resolve_task(
    task_id: RowId, request: Request, db: DbSession, principal: CurrentPrincipal
) -> Response:
    """Record the admin's answer for a disputed task; it leaves the queue."""
    task = await run_in_threadpool(_task, db, task_id)
    ranking = await _places_form(request, task)
    try:
        await run_in_threadpool(
            quality.resolve, db, task=task, actor_id=principal.user.id, ranking=ranking
        )
    except quality.QualityError as error:
        raise _fail(error) from error
    await run_in_threadpool(flash, db, principal, f"Recorded the consensus of task {task.id}.")
    await run_in_threadpool(db.commit)
    return await run_in_threadpool(_back_to_queue, db, task)


@router.post("/admin/tasks/{task_id}/unresolve")
def unresolve_task(task_id: RowId, db: DbSession, principal: CurrentPrincipal) -> Response:
    """Undo: withdraw the recorded consensus; the task is disputed again."""
    task = quality.resolve(db, task=_task(db, task_id), actor_id=principal.user.id, ranking=None)
    flash(db, principal, f"Task {task.id} has no recorded consensus any more.")
    db.commit()
    return _back_to_queue(db, task)


@router.post("/admin/campaigns/{slug}/quality/settings")
def change_settings(
    slug: str,
    db: DbSession,
    principal: CurrentPrincipal,
    overlap: Annotated[int, Form()],
    gold_percent: Annotated[float, Form()],
    recheck_percent: Annotated[float, Form()],
) -> Response:
    """Change the overlap, gold rate or re-check rate from the dashboard (audited; change it
    back the same way)."""
    campaign = _campaign(db, slug)
    try:
        data = parse_settings(
            settings_of(campaign)
            | {
                "overlap": overlap,
                "gold_rate": gold_percent / 100,
                "recheck_rate": recheck_percent / 100,
            }
        )
        campaigns.update(db, campaign=campaign, data=data, actor=principal.user)
    except InvalidCampaign as error:
        raise HTTPException(422, "; ".join(error.errors.values())) from error
    flash(db, principal, "Saved the campaign's overlap, gold rate and re-check rate.")
    db.commit()
    return RedirectResponse(f"/admin/campaigns/{slug}/quality", status_code=303)


@router.post("/admin/campaigns/{slug}/labelers/{user_id}/exclude")
def exclude_labeler(
    slug: str,
    user_id: RowId,
    db: DbSession,
    principal: CurrentPrincipal,
    reason: Annotated[str, Form()] = "",
    scope: Annotated[str, Form()] = "campaign",
) -> Response:
    """Keep a labeler's judgments out of the figures, exports and training, with a reason."""
    campaign = _campaign(db, slug)
    labeler = _user(db, user_id)
    if scope not in {"campaign", "all"}:
        raise HTTPException(422, "Scope is 'campaign' or 'all'.")
    try:
        quality.exclude(
            db,
            user=labeler,
            campaign=campaign if scope == "campaign" else None,
            reason=reason,
            actor_id=principal.user.id,
        )
    except quality.QualityError as error:
        raise _fail(error) from error
    where = "every campaign" if scope == "all" else campaign.name
    flash(db, principal, f"Excluded {labeler.username}'s judgments from {where}.")
    db.commit()
    return RedirectResponse(f"/admin/campaigns/{slug}/labelers/{user_id}", status_code=303)


@router.post("/admin/exclusions/{exclusion_id}/lift")
def lift_exclusion(
    exclusion_id: RowId,
    db: DbSession,
    principal: CurrentPrincipal,
    next: Annotated[str, Form()] = "/admin/campaigns",
) -> Response:
    """Undo an exclusion: the labeler's judgments count again."""
    exclusion = db.get(LabelerExclusion, exclusion_id)
    if exclusion is None:
        raise HTTPException(404, "There is no such exclusion.")
    try:
        quality.include(db, exclusion=exclusion, actor_id=principal.user.id)
    except quality.QualityError as error:
        raise _fail(error) from error
    flash(db, principal, "Lifted the exclusion; those judgments count again.")
    db.commit()
    # Only back to a page of this site.
    target = next if next.startswith("/") and not next.startswith("//") else "/admin/campaigns"
    return RedirectResponse(target, status_code=303)


@router.post("/admin/campaigns/{slug}/labelers/{user_id}/active")
def set_labeler_active(
    slug: str,
    user_id: RowId,
    db: DbSession,
    principal: CurrentPrincipal,
    active: Annotated[bool, Form()],
) -> Response:
    """Deactivate a labeler (their sessions end, they get no more tasks) or reactivate."""
    _campaign(db, slug)
    labeler = _user(db, user_id)
    if labeler.id == principal.user.id and not active:
        raise HTTPException(400, "You cannot deactivate your own account.")
    if labeler.is_active != active:
        auth_service.set_active(db, labeler, active, actor_id=principal.user.id)
        flash(db, principal, f"{'Reactivated' if active else 'Deactivated'} {labeler.username}.")
    db.commit()
    return RedirectResponse(f"/admin/campaigns/{slug}/labelers/{user_id}", status_code=303)


def _user(db: Session, user_id: int) -> User:
    user = db.get(User, user_id)
    if user is None:
        raise HTTPException(404, "There is no such user.")
    return user


@router.get("/admin/campaigns/{slug}/labelers/{user_id}")
def labeler_page(slug: str, user_id: RowId, request: Request, db: DbSession) -> Response:
    """One labeler in one campaign: their figures beside the campaign's, their latest work,
    and the levers (exclude their judgments, deactivate them)."""
    campaign = _campaign(db, slug)
    labeler = _user(db, user_id)
    excluded = quality.excluded_labelers(db, campaign.id).get(user_id)
    # An excluded labeler's figures come from the report that still counts them.
    stored = _report(request, db, campaign, Filters(include_excluded=excluded is not None))
    everyone = stored.report["labelers"] if stored else []
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
            "stored": stored,
            "excluded": excluded,
            "judgments_in_campaign": stored.report["agreement"]["judgments"] if stored else 0,
            "recent": recent,
        },
        db=db,
    )


@router.get("/admin/judgments/{judgment_id}")
def judgment_audit(judgment_id: RowId, request: Request, db: DbSession) -> Response:
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
