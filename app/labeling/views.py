"""The labeler's pages: the queue, the task page (htmx swaps the next task in), history, edits.

One URL serves the full page or, for htmx, the `task` fragment. A submit commits first, then
leases the next task, so "Saved" is only ever shown for an answer that is stored.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.datastructures import FormData
from starlette.responses import RedirectResponse, Response

from app.auth.models import Role, User
from app.campaigns import service as campaigns
from app.campaigns.models import Campaign, CampaignGuidelines
from app.labeling import service
from app.labeling.models import Completion, Judgment, Prompt, Task
from app.labeling.schemas import SKIP_REASONS, STRENGTH_LABELS, EditIn, JudgmentIn
from app.rendering import render_markdown
from app.validation import humane_errors
from app.web import (
    CurrentPrincipal,
    CurrentUser,
    DbSession,
    RowId,
    client_ip,
    flash,
    is_htmx,
    render,
    render_block,
    require_roles,
)

router = APIRouter(dependencies=[Depends(require_roles(Role.labeler))])


def _campaign(db: Session, slug: str) -> Campaign:
    campaign = campaigns.get_by_slug(db, slug)
    if campaign is None:
        raise HTTPException(404, f"There is no campaign '{slug}'.")
    return campaign


def _guidelines(db: Session, campaign: Campaign, version: int) -> str:
    if version == campaign.guidelines_version:
        return campaign.guidelines_md
    row = db.get(CampaignGuidelines, (campaign.id, version))
    return row.guidelines_md if row else campaign.guidelines_md


def parse_answer(form: FormData) -> dict[str, Any]:
    """The task form's fields as a JudgmentIn payload (validated by the caller)."""
    payload: dict[str, Any] = {"flags": {}, "ratings": {}}
    if ranking := form.get("ranking"):
        try:
            payload["ranking"] = json.loads(str(ranking))
        except json.JSONDecodeError:
            payload["ranking"] = "not JSON"
    if (strength := form.get("strength")) not in (None, ""):
        payload["strength"] = strength
    if (demonstration := form.get("demonstration")) is not None:
        payload["demonstration"] = str(demonstration)
    for key, value in form.multi_items():
        if key.startswith("flag-"):
            payload["flags"].setdefault(key.removeprefix("flag-"), []).append(value)
        elif key.startswith("rating-") and value:
            payload["ratings"][key.removeprefix("rating-")] = value
    payload["comment"] = str(form.get("comment") or "")
    if confidence := form.get("confidence"):
        payload["confidence"] = confidence
    payload["time_on_task_ms"] = form.get("time_on_task_ms") or 0
    return payload


def _refused(exc: service.LabelingError) -> HTTPException:
    """The service's message, as a sentence for a person."""
    return HTTPException(exc.status_code, exc.message[:1].upper() + exc.message[1:] + ".")


def _invalid(exc: ValidationError) -> HTTPException:
    return HTTPException(422, humane_errors(exc))


def _task_context(db: Session, served: service.ServedTask, user: User) -> dict[str, Any]:
    mine = service.progress(db, user_id=user.id, campaign_ids=[served.campaign.id])
    return {
        "served": served,
        "campaign": served.campaign,
        "guidelines_html": render_markdown(served.campaign.guidelines_md),
        "progress": mine[served.campaign.id],
        "labels": [chr(ord("A") + i) for i in range(len(served.completions))],
        "strengths": STRENGTH_LABELS,
        "skip_reasons": SKIP_REASONS,
        "render_markdown": render_markdown,
        "answer": None,
    }


def _task_response(
    request: Request, db: Session, user: User, campaign: Campaign, *, saved: str | None = None
) -> Response:
    """Lease (or re-serve) the next task and render it: a page, or the fragment for htmx."""
    try:
        served = service.lease(db, user=user, campaign=campaign)
    except service.Conflict as exc:
        db.commit()
        context = {"campaign": campaign, "message": exc.message, "saved": saved}
        if is_htmx(request):
            return render_block(request, "labeling/task.html", "task", context)
        return render(request, "labeling/task.html", context, db=db)
    if served is None:
        db.commit()
        context = {"campaign": campaign, "served": None, "saved": saved}
    else:
        context = _task_context(db, served, user) | {"saved": saved}
        db.commit()
    if is_htmx(request):
        return render_block(request, "labeling/task.html", "task", context)
    return render(request, "labeling/task.html", context, db=db)


@router.get("/label")
def queue(request: Request, db: DbSession, user: CurrentUser) -> Response:
    """My campaigns: what I did today and overall, what is left, and a Start button."""
    active = service.active_campaigns(db)
    mine = service.progress(db, user_id=user.id, campaign_ids=[c.id for c in active])
    rows = [{"campaign": c, "progress": mine[c.id]} for c in active]
    return render(request, "labeling/queue.html", {"rows": rows}, db=db)


@router.get("/label/history")
def history(
    request: Request, db: DbSession, user: CurrentUser, before: int | None = None
) -> Response:
    """My recent judgments, newest first, each with a link to edit it."""
    judgments = service.history(db, user_id=user.id, limit=50, before_id=before)
    tasks = {
        t.id: t for t in db.scalars(select(Task).where(Task.id.in_({j.task_id for j in judgments})))
    }
    prompts = {
        p.id: p
        for p in db.scalars(
            select(Prompt).where(Prompt.id.in_({t.prompt_id for t in tasks.values()}))
        )
    }
    campaign_names = dict(
        db.execute(
            select(Campaign.id, Campaign.name).where(
                Campaign.id.in_({j.campaign_id for j in judgments})
            )
        )
        .tuples()
        .all()
    )
    rows = [
        {
            "judgment": j,
            "campaign": campaign_names.get(j.campaign_id, ""),
            "prompt": prompts[tasks[j.task_id].prompt_id],
        }
        for j in judgments
    ]
    return render(
        request,
        "labeling/history.html",
        {"rows": rows, "next_before": judgments[-1].id if len(judgments) == 50 else None},
        db=db,
    )


@router.get("/label/{slug}")
def task_page(slug: str, request: Request, db: DbSession, user: CurrentUser) -> Response:
    """The task page: my current lease in the campaign, or a new one."""
    return _task_response(request, db, user, _campaign(db, slug))


@router.post("/label/{slug}/submit/{submit_key}")
async def submit(
    slug: str, submit_key: str, request: Request, db: DbSession, user: CurrentUser
) -> Response:
    """Store the answer, then swap the next task in. Errors leave the page as it is."""
    campaign = _campaign(db, slug)
    try:
        answer = JudgmentIn.model_validate(parse_answer(await request.form()))
    except ValidationError as exc:
        raise _invalid(exc) from None
    try:
        _, created = service.submit(
            db, user=user, submit_key=submit_key, answer=answer, ip=client_ip(request)
        )
    except service.LabelingError as exc:
        raise _refused(exc) from None
    db.commit()
    return _task_response(
        request, db, user, campaign, saved="Saved." if created else "Already saved."
    )


@router.post("/label/{slug}/skip/{submit_key}")
async def skip(
    slug: str, submit_key: str, request: Request, db: DbSession, user: CurrentUser
) -> Response:
    """Give the task back with a reason and move on."""
    campaign = _campaign(db, slug)
    form = await request.form()
    reason = " — ".join(
        part
        for part in (str(form.get("reason") or ""), str(form.get("detail") or "").strip())
        if part
    )[:500]
    try:
        service.skip(db, user=user, submit_key=submit_key, reason=reason)
    except service.LabelingError as exc:
        raise _refused(exc) from None
    db.commit()
    return _task_response(request, db, user, campaign, saved="Skipped.")


def _edit_context(db: Session, judgment: Judgment, user: User) -> dict[str, Any]:
    task = db.get_one(Task, judgment.task_id)
    campaign = db.get_one(Campaign, task.campaign_id)
    prompt = db.get_one(Prompt, task.prompt_id)
    by_id = {
        c.id: c
        for c in db.scalars(select(Completion).where(Completion.id.in_(judgment.display_order)))
    }
    demonstration = (
        db.get_one(Completion, judgment.demonstration_id).text
        if judgment.demonstration_id
        else None
    )
    return {
        "judgment": judgment,
        "campaign": campaign,
        "prompt": prompt,
        "completions": [by_id[cid] for cid in judgment.display_order],
        "labels": [chr(ord("A") + i) for i in range(len(judgment.display_order))],
        "guidelines_html": render_markdown(_guidelines(db, campaign, judgment.guidelines_version)),
        "strengths": STRENGTH_LABELS,
        "render_markdown": render_markdown,
        "answer": {
            "ranking": judgment.ranking,
            "strength": service.shown_strength(judgment, task),
            "demonstration": demonstration,
            "flags": judgment.flags,
            "ratings": judgment.ratings,
            "comment": judgment.comment,
            "confidence": judgment.confidence,
        },
        "versions": service.versions(db, judgment),
        "edit_key": secrets.token_urlsafe(24),
    }


@router.get("/label/judgments/{judgment_id}")
def edit_page(judgment_id: RowId, request: Request, db: DbSession, user: CurrentUser) -> Response:
    """One of my judgments, ready to edit, with its earlier versions."""
    try:
        judgment = service.get_judgment(db, user=user, judgment_id=judgment_id)
    except service.LabelingError as exc:
        raise _refused(exc) from None
    return render(request, "labeling/edit.html", _edit_context(db, judgment, user), db=db)


@router.post("/label/judgments/{judgment_id}")
async def save_edit(
    judgment_id: RowId,
    request: Request,
    db: DbSession,
    user: CurrentUser,
    principal: CurrentPrincipal,
) -> Response:
    """Save an edit as a new version, then go back to the history."""
    form = await request.form()
    try:
        answer = EditIn.model_validate(
            parse_answer(form) | {"idempotency_key": str(form.get("idempotency_key") or "")}
        )
    except ValidationError as exc:
        raise _invalid(exc) from None
    try:
        service.edit(db, user=user, judgment_id=judgment_id, answer=answer, ip=client_ip(request))
    except service.LabelingError as exc:
        raise _refused(exc) from None
    flash(db, principal, "Your edit was saved as a new version.")
    db.commit()
    if is_htmx(request):
        return Response(status_code=204, headers={"HX-Redirect": "/label/history"})
    return RedirectResponse("/label/history", status_code=303)
