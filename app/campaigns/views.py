"""Admin pages for campaigns: list, create, edit settings and guidelines, change status."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from markupsafe import Markup
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.responses import RedirectResponse, Response

from app.auth.models import Role, User
from app.campaigns import service
from app.campaigns.models import Campaign, CampaignMode, CampaignStatus
from app.campaigns.schemas import (
    FLAG_MAX_LENGTH,
    GUIDELINES_MAX,
    K_MAX,
    K_MIN,
    LEASE_MAX_MINUTES,
    OVERLAP_MAX,
    RECHECK_RATE_MAX,
    CampaignCreate,
    InvalidCampaign,
    parse_create,
    parse_settings,
)
from app.rendering import render_markdown
from app.web import CurrentPrincipal, DbSession, flash, render, render_block, require_roles

router = APIRouter(prefix="/admin/campaigns", dependencies=[Depends(require_roles(Role.admin))])

# What each status button does, in the words the page uses.
STATUS_ACTIONS = {
    CampaignStatus.active: "Activate",
    CampaignStatus.paused: "Pause",
    CampaignStatus.archived: "Archive",
    CampaignStatus.draft: "Back to draft",
}
LIMITS = {
    "k_min": K_MIN,
    "k_max": K_MAX,
    "overlap_max": OVERLAP_MAX,
    "lease_max": LEASE_MAX_MINUTES,
    "guidelines_max": GUIDELINES_MAX,
    "flag_max": FLAG_MAX_LENGTH,
    "recheck_max_percent": f"{RECHECK_RATE_MAX * 100:g}",
}
# Rates the form takes as percentages: form field -> schema field.
PERCENT_FIELDS = {"gold_percent": "gold_rate", "recheck_percent": "recheck_rate"}


def form_fields(
    name: Annotated[str, Form()] = "",
    description: Annotated[str, Form()] = "",
    guidelines_md: Annotated[str, Form()] = "",
    k: Annotated[str, Form()] = "",
    mode: Annotated[str, Form()] = "",
    overlap: Annotated[str, Form()] = "",
    gold_percent: Annotated[str, Form()] = "",
    recheck_percent: Annotated[str, Form()] = "",
    lease_minutes: Annotated[str, Form()] = "",
    allow_ties: Annotated[str | None, Form()] = None,
    flags: Annotated[str, Form()] = "",
) -> dict[str, Any]:
    """The settings form as sent (strings), to validate and to show again on an error."""
    return {
        "name": name,
        "description": description,
        "guidelines_md": guidelines_md,
        "k": k,
        "mode": mode,
        "overlap": overlap,
        "gold_percent": gold_percent,
        "recheck_percent": recheck_percent,
        "lease_minutes": lease_minutes,
        "allow_ties": allow_ties is not None,
        "flags": flags,
    }


FormFields = Annotated[dict[str, Any], Depends(form_fields)]


def _percent(value: float) -> str:
    return f"{value * 100:.10g}"


def _to_input(form: dict[str, Any]) -> dict[str, Any]:
    """Form strings to schema input: the gold and re-check rates are entered as percentages."""
    values = {key: value for key, value in form.items() if key not in {*PERCENT_FIELDS, "slug"}}
    for field, rate in PERCENT_FIELDS.items():
        percent = str(form.get(field, "")).strip().rstrip("%").strip()
        try:
            values[rate] = float(percent or 0) / 100
        except ValueError:
            values[rate] = percent  # rejected by the schema as "Enter a number."
    return values


def form_of(campaign: Campaign | None) -> dict[str, Any]:
    """The form's initial values: the campaign's, or the defaults for a new one."""
    # model_construct fills in every default without validating the empty name and slug.
    source: Any = campaign or CampaignCreate.model_construct(name="", slug="")
    return {
        "slug": campaign.slug if campaign else "",
        "name": source.name or "",
        "description": source.description,
        "guidelines_md": source.guidelines_md,
        "k": str(source.k),
        "mode": source.mode.value,
        "overlap": str(source.overlap),
        "gold_percent": _percent(source.gold_rate),
        "recheck_percent": _percent(source.recheck_rate),
        "lease_minutes": str(source.lease_minutes),
        "allow_ties": source.allow_ties,
        "flags": "\n".join(source.flags),
        "status": source.status.value,
    }


def _get(db: Session, slug: str) -> Campaign:
    campaign = service.get_by_slug(db, slug)
    if campaign is None:
        raise HTTPException(404, f"There is no campaign '{slug}'.")
    return campaign


def _rendered(form: dict[str, Any]) -> Markup | None:
    text = str(form.get("guidelines_md", ""))
    return render_markdown(text) if text.strip() else None


def _form_context(form: dict[str, Any], errors: dict[str, str]) -> dict[str, Any]:
    return {
        "form": form,
        "errors": errors,
        "rendered": _rendered(form),
        "modes": list(CampaignMode),
        "limits": LIMITS,
    }


@router.get("")
def list_campaigns(request: Request, db: DbSession) -> Response:
    """Every campaign with its settings and progress."""
    return render(request, "campaigns/list.html", {"rows": service.list_campaigns(db)}, db=db)


@router.get("/new")
def new_campaign(request: Request, db: DbSession) -> Response:
    """The form for a new campaign."""
    return render(
        request,
        "campaigns/new.html",
        _form_context(form_of(None), {}),
        db=db,
    )


@router.post("")
def create_campaign(
    request: Request,
    db: DbSession,
    principal: CurrentPrincipal,
    form: FormFields,
    slug: Annotated[str, Form()] = "",
    status: Annotated[str, Form()] = CampaignStatus.active.value,
) -> Response:
    """Create a campaign; invalid input shows the form again with a message per field."""
    form = {**form, "slug": slug.strip(), "status": status}
    try:
        data = parse_create({**_to_input(form), "slug": slug, "status": status})
        campaign = service.create(db, data=data, actor=principal.user)
    except InvalidCampaign as exc:
        db.rollback()
        return render(
            request,
            "campaigns/new.html",
            _form_context(form, exc.errors),
            status_code=422,
            db=db,
        )
    flash(db, principal, f"Created campaign '{campaign.slug}'. Import data to give it tasks.")
    db.commit()
    return RedirectResponse(f"/admin/campaigns/{campaign.slug}", status_code=303)


@router.post("/preview")
def preview(
    request: Request, guidelines_md: Annotated[str, Form(max_length=GUIDELINES_MAX * 2)] = ""
) -> Response:
    """The guidelines as labelers will see them (sanitized Markdown), for the editor."""
    return render_block(
        request,
        "campaigns/_preview.html",
        "preview",
        {"rendered": _rendered({"guidelines_md": guidelines_md})},
    )


def _campaign_page(
    request: Request,
    db: Session,
    campaign: Campaign,
    *,
    form: dict[str, Any] | None = None,
    errors: dict[str, str] | None = None,
    status_code: int = 200,
) -> Response:
    versions = service.guidelines_versions(db, campaign)
    authors = {
        user.id: user.username
        for user in db.scalars(
            select(User).where(User.id.in_({v.created_by_id for v in versions} - {None}))
        )
    }
    return render(
        request,
        "campaigns/show.html",
        {
            "campaign": campaign,
            "counts": service.counts(db, [campaign.id])[campaign.id],
            "versions": versions,
            "authors": authors,
            "render_markdown": render_markdown,
            "status_actions": {
                status: label
                for status, label in STATUS_ACTIONS.items()
                if status != campaign.status
            },
            "has_tasks": service.has_tasks(db, campaign),
            **_form_context(form or form_of(campaign), errors or {}),
        },
        status_code=status_code,
        db=db,
    )


@router.get("/{slug}")
def show_campaign(request: Request, db: DbSession, slug: str) -> Response:
    """One campaign: progress, settings, guidelines and their versions, status."""
    return _campaign_page(request, db, _get(db, slug))


@router.post("/{slug}")
def update_campaign(
    request: Request, db: DbSession, principal: CurrentPrincipal, slug: str, form: FormFields
) -> Response:
    """Save the settings and guidelines (a guidelines edit becomes a new version)."""
    campaign = _get(db, slug)
    version = campaign.guidelines_version
    try:
        data = parse_settings(_to_input(form))
        changed = service.changes(campaign, data)
        service.update(db, campaign=campaign, data=data, actor=principal.user)
    except InvalidCampaign as exc:
        db.rollback()
        campaign = _get(db, slug)
        return _campaign_page(
            request, db, campaign, form={**form, "slug": slug}, errors=exc.errors, status_code=422
        )
    if not changed:
        message = "Nothing changed."
    elif campaign.guidelines_version != version:
        message = f"Saved. The guidelines are now version {campaign.guidelines_version}."
    else:
        message = "Saved."
    flash(db, principal, message)
    db.commit()
    return RedirectResponse(f"/admin/campaigns/{campaign.slug}", status_code=303)


@router.post("/{slug}/status")
def change_status(
    request: Request,
    db: DbSession,
    principal: CurrentPrincipal,
    slug: str,
    status: Annotated[CampaignStatus, Form()],
) -> Response:
    """Activate, pause, archive, or return the campaign to draft."""
    campaign = _get(db, slug)
    before = campaign.status
    service.set_status(db, campaign=campaign, status=status, actor=principal.user)
    if before != status:
        flash(db, principal, f"'{campaign.slug}' is now {status.value}.")
    db.commit()
    return RedirectResponse(f"/admin/campaigns/{campaign.slug}", status_code=303)
