"""The loop's pages: a campaign's loop (admins: configure, pause, resume, check now, abandon an
iteration) and the policy versions page (admins and researchers: lineage, what the reward
model says and what people say of each version), with its JSON twin."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from sqlalchemy import select
from starlette.responses import RedirectResponse, Response

from app.auth.models import Role
from app.campaigns import service as campaigns
from app.campaigns.models import Campaign
from app.jobs.models import Job, ModelKind, ModelVersion
from app.jobs.specs import bundled_backbone
from app.loop import lineage
from app.loop import service as loops
from app.loop.audits import MIN_JUDGMENTS, win_rates
from app.loop.models import PolicyLoop
from app.web import CurrentPrincipal, DbSession, flash, render, require_roles

admin_router = APIRouter(
    prefix="/admin/campaigns", dependencies=[Depends(require_roles(Role.admin))]
)
research_router = APIRouter(dependencies=[Depends(require_roles(Role.admin, Role.researcher))])

LOOP_TEMPLATE = "loop/loop.html"
OPTION_GROUPS = ("reward", "policy", "generate")


def _campaign(db: Any, slug: str) -> Campaign:
    campaign = campaigns.get_by_slug(db, slug)
    if campaign is None:
        raise HTTPException(404, "no such campaign")
    return campaign


def form_of(loop: PolicyLoop | None) -> dict[str, Any]:
    if loop is None:
        return {
            "algorithm": "ppo",
            "reward_backbone": bundled_backbone() or "",
            "min_new_comparisons": "200",
            "audit_share": "0.2",
            **{f"{group}_options": "{}" for group in OPTION_GROUPS},
        }
    return {
        "algorithm": loop.algorithm,
        "policy_id": str(loop.policy_id),
        "reward_model_id": str(loop.reward_model_id or ""),
        "reward_backbone": loop.reward_backbone or "",
        "min_new_comparisons": str(loop.min_new_comparisons),
        "audit_share": str(loop.audit_share),
        **{
            f"{group}_options": json.dumps((loop.config or {}).get(group, {}), indent=1)
            for group in OPTION_GROUPS
        },
    }


def config_input(form: dict[str, str]) -> dict[str, Any]:
    """The form as LoopConfig's input; a step's options that are not a JSON object are a
    LoopError naming the field."""
    raw: dict[str, Any] = {
        "algorithm": form.get("algorithm") or "ppo",
        "policy_id": form.get("policy_id") or None,
        "reward_model_id": form.get("reward_model_id") or None,
        "reward_backbone": form.get("reward_backbone") or None,
        "min_new_comparisons": form.get("min_new_comparisons") or 200,
        "audit_share": form.get("audit_share") or 0,
    }
    for group in OPTION_GROUPS:
        text = (form.get(f"{group}_options") or "").strip() or "{}"
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise loops.LoopError(
                f"{group} options: not JSON ({error.msg} at line {error.lineno})"
            ) from None
        if not isinstance(value, dict):
            raise loops.LoopError(f"{group} options: give a JSON object, like {{}}")
        raw[group] = value
    return raw


def loop_context(
    db: Any, campaign: Campaign, form: dict[str, Any] | None = None, error: str | None = None
) -> dict[str, Any]:
    loop = loops.get_loop(db, campaign.id)
    rows = loops.iterations(db, loop) if loop else []
    pending = None
    if loop is not None:
        pending = loops.human_comparisons_after(db, campaign.id, loop.comparison_mark)[0]
    model_ids = {m for it in rows for m in (it.policy_id, it.reward_model_id, it.parent_policy_id)}
    if loop is not None:
        model_ids |= {loop.policy_id, loop.reference_id, loop.reward_model_id}
    model_ids.discard(None)
    names = dict(
        db.execute(
            select(ModelVersion.id, ModelVersion.name).where(ModelVersion.id.in_(model_ids))
        ).all()
    )
    job_ids = {j for it in rows for j in (it.reward_job_id, it.policy_job_id, it.generate_job_id)}
    job_ids.discard(None)
    job_states = dict(
        db.execute(select(Job.id, Job.state).where(Job.id.in_(job_ids))).tuples().all()
    )
    # What each finished generate step wrote: tasks, of which audit pairs.
    generate_ids = {it.generate_job_id for it in rows if it.generate_job_id}
    results = db.execute(select(Job.id, Job.result).where(Job.id.in_(generate_ids))).all()
    written = {
        job_id: (result.get("tasks_created", 0), result.get("audit_tasks", 0))
        for job_id, result in results
        if result and "tasks_created" in result
    }
    return {
        "campaign": campaign,
        "loop": loop,
        "iterations": rows,
        "pending": pending,
        "names": names,
        "job_states": {k: v.value for k, v in job_states.items()},
        "written": written,
        "wins": win_rates(db, [it.policy_id for it in rows if it.policy_id]),
        "policies": _versions(db, ModelKind.policy),
        "reward_models": _versions(db, ModelKind.reward),
        "form": form or form_of(loop),
        "error": error,
        "min_judgments": MIN_JUDGMENTS,
    }


def _versions(db: Any, kind: ModelKind) -> list[ModelVersion]:
    return list(
        db.scalars(
            select(ModelVersion)
            .where(ModelVersion.kind == kind)
            .order_by(ModelVersion.id.desc())
            .limit(200)
        )
    )


def _page(
    request: Request, db: Any, campaign: Campaign, *, form=None, error=None, status_code=200
) -> Response:
    context = loop_context(db, campaign, form, error)
    return render(request, LOOP_TEMPLATE, context, status_code=status_code, db=db)


def _back(campaign: Campaign) -> RedirectResponse:
    return RedirectResponse(f"/admin/campaigns/{campaign.slug}/loop", status_code=303)


@admin_router.get("/{slug}/loop")
def loop_page(request: Request, db: DbSession, slug: str) -> Response:
    """A campaign's loop: its settings, where it stands, and its iterations."""
    return _page(request, db, _campaign(db, slug))


@admin_router.post("/{slug}/loop")
async def configure_loop(
    request: Request, db: DbSession, principal: CurrentPrincipal, slug: str
) -> Response:
    """Start the loop, or change it."""
    campaign = _campaign(db, slug)
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    try:
        config = loops.parse_config(config_input(form))
        loops.configure(db, campaign, config, actor_id=principal.user.id)
    except loops.LoopError as error:
        db.rollback()
        campaign = _campaign(db, slug)
        return _page(request, db, campaign, form=form, error=str(error), status_code=422)
    flash(db, principal, "Loop saved. It starts an iteration when enough new comparisons arrive.")
    db.commit()
    return _back(campaign)


def _loop_or_404(db: Any, campaign: Campaign) -> PolicyLoop:
    loop = loops.get_loop(db, campaign.id)
    if loop is None:
        raise HTTPException(404, "this campaign has no loop")
    return loop


@admin_router.post("/{slug}/loop/{action}")
def change_loop(
    request: Request,
    db: DbSession,
    principal: CurrentPrincipal,
    slug: str,
    action: Literal["pause", "resume", "tick", "abandon"],
) -> Response:
    """Pause (a running job finishes, nothing new starts), resume (a dead or cancelled step
    gets a new job from the loop's current options), tick (check now, as a worker does
    between jobs), or abandon the open iteration (its job cancelled, the loop back where it
    started) so a new one can start."""
    campaign = _campaign(db, slug)
    message = loops.act(db, _loop_or_404(db, campaign), action, actor_id=principal.user.id)
    flash(db, principal, message)
    db.commit()
    return _back(campaign)


# --- policy versions ---------------------------------------------------------------------------


def _campaign_filter(db: Any, slug: str | None) -> Campaign | None:
    return _campaign(db, slug) if slug else None


@research_router.get("/policies")
def policies_page(
    request: Request, db: DbSession, campaign: Annotated[str | None, Query()] = None
) -> Response:
    """Every policy version in its lineage, with the reward model's and the humans' verdicts."""
    found = _campaign_filter(db, campaign)
    rows = lineage.lineage(db, campaign_id=found.id if found else None)
    return render(
        request,
        "loop/policies.html",
        {
            "rows": rows,
            "campaign": found,
            "campaigns": campaigns.list_campaigns(db),
            "min_judgments": MIN_JUDGMENTS,
        },
    )


@research_router.get("/api/v1/policies")
def policies_json(db: DbSession, campaign: Annotated[str | None, Query()] = None) -> dict:
    """The policy versions page as JSON."""
    found = _campaign_filter(db, campaign)
    rows = lineage.lineage(db, campaign_id=found.id if found else None)
    return {"versions": [row.as_json() for row in rows]}
