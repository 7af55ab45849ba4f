"""Labeling over JSON: next task, submit, skip, history, edit (session or bearer token).

Other front ends and load generators drive labeling through these; the HTML views call the
same service functions.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from pydantic import BaseModel
from sqlalchemy.orm import Session
from starlette.responses import JSONResponse, Response

from app.auth.models import Role
from app.campaigns import service as campaigns
from app.campaigns.models import Campaign
from app.labeling import service
from app.labeling.models import Completion, Judgment, Task
from app.labeling.schemas import (
    CompletionOut,
    EditIn,
    JudgmentIn,
    JudgmentOut,
    PromptOut,
    SkipIn,
    SubmitOut,
    TaskOut,
)
from app.web import CurrentUser, DbSession, RowId, client_ip, require_roles

router = APIRouter(
    prefix="/api/v1", tags=["labeling"], dependencies=[Depends(require_roles(Role.labeler))]
)
LABELING_ERRORS: dict[int | str, dict[str, Any]] = {
    403: {"description": "The task or judgment belongs to someone else."},
    404: {"description": "No such task key or judgment."},
    409: {"description": "The lease went to someone else, or the key was used differently."},
    422: {"description": "The answer does not fit the task (see `detail`)."},
}
SubmitKey = Annotated[str, Path(min_length=16, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class CampaignProgressOut(BaseModel):
    slug: str
    name: str
    mode: str
    k: int
    judged_today: int
    judged_total: int
    available: int


def _campaign(db: Session, slug: str) -> Campaign:
    campaign = campaigns.get_by_slug(db, slug)
    if campaign is None:
        raise HTTPException(404, f"no campaign '{slug}'")
    return campaign


def _fail(exc: service.LabelingError) -> HTTPException:
    return HTTPException(exc.status_code, exc.message)


def task_out(served: service.ServedTask) -> TaskOut:
    return TaskOut(
        submit_key=served.assignment.submit_key,
        task_id=served.task_id,
        campaign=served.campaign.slug,
        mode=served.campaign.mode.value,
        allow_ties=served.campaign.allow_ties,
        flags=list(served.campaign.flags),
        guidelines_version=served.campaign.guidelines_version,
        lease_expires_at=served.assignment.lease_expires_at,
        prompt=PromptOut(text=served.prompt.text, messages=served.prompt.messages),
        completions=[
            CompletionOut(id=c.id, label=chr(ord("A") + i), text=c.text)
            for i, c in enumerate(served.completions)
        ],
    )


def judgment_out(db: Session, judgment: Judgment) -> JudgmentOut:
    # Right after a submit these are all in the session already: no queries.
    campaign = db.get_one(Campaign, judgment.campaign_id)
    strength = None
    if judgment.pairwise_strength is not None:
        strength = service.shown_strength(judgment, db.get_one(Task, judgment.task_id))
    demonstration = None
    if judgment.demonstration_id is not None:
        demonstration = db.get_one(Completion, judgment.demonstration_id).text
    return JudgmentOut(
        id=judgment.id,
        task_id=judgment.task_id,
        campaign=campaign.slug,
        ranking=judgment.ranking,
        strength=strength,
        demonstration=demonstration,
        ratings={int(k): v for k, v in judgment.ratings.items()},
        flags={int(k): v for k, v in judgment.flags.items()},
        comment=judgment.comment,
        confidence=judgment.confidence,
        time_on_task_ms=judgment.time_on_task_ms,
        display_order=judgment.display_order,
        guidelines_version=judgment.guidelines_version,
        supersedes_id=judgment.supersedes_id,
        is_current=judgment.is_current,
        created_at=judgment.created_at,
        # A re-check's answer is kept for self-consistency only: it yields no comparisons.
        comparisons=(
            0
            if judgment.recheck_of_id is not None
            else len(service.pairs_from_ranking(judgment.ranking or []))
        ),
    )


def _stored(db: Session, judgment: Judgment, created: bool) -> JSONResponse:
    """Commit, then answer 201 for a new judgment or 200 for a replayed one."""
    body = SubmitOut(judgment=judgment_out(db, judgment), created=created)
    db.commit()
    return JSONResponse(body.model_dump(mode="json"), status_code=201 if created else 200)


@router.get("/labeling/campaigns", response_model=list[CampaignProgressOut])
def my_campaigns(db: DbSession, user: CurrentUser) -> list[CampaignProgressOut]:
    """Active campaigns, with what I judged today and overall and what is left for me."""
    active = service.active_campaigns(db)
    mine = service.progress(db, user_id=user.id, campaign_ids=[c.id for c in active])
    return [
        CampaignProgressOut(
            slug=c.slug,
            name=c.name,
            mode=c.mode.value,
            k=c.k,
            judged_today=mine[c.id].today,
            judged_total=mine[c.id].total,
            available=mine[c.id].available,
        )
        for c in active
    ]


@router.post(
    "/campaigns/{slug}/next",
    response_model=TaskOut,
    responses={204: {"description": "Nothing left for you in this campaign."}, **LABELING_ERRORS},
)
def next_task(slug: str, db: DbSession, user: CurrentUser) -> Any:
    """Lease the next task (or get my current lease back); 204 when nothing is left."""
    campaign = _campaign(db, slug)
    try:
        served = service.lease(db, user=user, campaign=campaign)
    except service.LabelingError as exc:
        raise _fail(exc) from None
    if served is None:
        db.commit()
        return Response(status_code=204)
    body = task_out(served).model_dump(mode="json")
    db.commit()
    return JSONResponse(body)


@router.post(
    "/assignments/{submit_key}/judgment",
    response_model=SubmitOut,
    status_code=201,
    responses={200: {"description": "This key was already submitted: the same judgment."}}
    | LABELING_ERRORS,
)
def submit(
    submit_key: SubmitKey, answer: JudgmentIn, request: Request, db: DbSession, user: CurrentUser
) -> Any:
    """Submit the answer to a leased task. Retrying with the same key and answer is safe."""
    try:
        judgment, created = service.submit(
            db, user=user, submit_key=submit_key, answer=answer, ip=client_ip(request)
        )
    except service.LabelingError as exc:
        raise _fail(exc) from None
    return _stored(db, judgment, created)


@router.post(
    "/assignments/{submit_key}/skip",
    responses=LABELING_ERRORS,
)
def skip(submit_key: SubmitKey, body: SkipIn, db: DbSession, user: CurrentUser) -> dict[str, Any]:
    """Give a leased task back with a reason; it is not served to me again."""
    try:
        assignment = service.skip(db, user=user, submit_key=submit_key, reason=body.reason)
    except service.LabelingError as exc:
        raise _fail(exc) from None
    db.commit()
    return {"skipped": True, "task_id": assignment.task_id}


@router.get("/judgments", response_model=list[JudgmentOut])
def history(
    db: DbSession,
    user: CurrentUser,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    before: Annotated[int | None, Query(description="Page back: ids below this one.")] = None,
) -> list[JudgmentOut]:
    """My current judgments, newest first."""
    return [
        judgment_out(db, j)
        for j in service.history(db, user_id=user.id, limit=limit, before_id=before)
    ]


@router.get("/judgments/{judgment_id}", response_model=JudgmentOut, responses=LABELING_ERRORS)
def get_judgment(judgment_id: RowId, db: DbSession, user: CurrentUser) -> JudgmentOut:
    """One of my judgments (any version)."""
    try:
        return judgment_out(db, service.get_judgment(db, user=user, judgment_id=judgment_id))
    except service.LabelingError as exc:
        raise _fail(exc) from None


@router.post(
    "/judgments/{judgment_id}/edit",
    response_model=SubmitOut,
    status_code=201,
    responses=LABELING_ERRORS,
)
def edit(
    judgment_id: RowId, answer: EditIn, request: Request, db: DbSession, user: CurrentUser
) -> Any:
    """Replace one of my judgments with a new version; the old one stays in the history."""
    try:
        judgment, created = service.edit(
            db, user=user, judgment_id=judgment_id, answer=answer, ip=client_ip(request)
        )
    except service.LabelingError as exc:
        raise _fail(exc) from None
    return _stored(db, judgment, created)
