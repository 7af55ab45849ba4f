"""The researcher's exports page: create a snapshot with filters, see every snapshot (who, when,
parameters, rows, state, checksums) and download its files. A snapshot being built polls
itself (htmx, the same URL as its page) until it is ready."""

from __future__ import annotations

from typing import Annotated, Any, get_args

from fastapi import APIRouter, Depends, Query, Request
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.responses import RedirectResponse, Response

from app.auth.models import Role
from app.campaigns import service as campaigns_service
from app.db import MAX_ID
from app.exports import api
from app.exports.models import ExportSnapshot
from app.exports.schemas import ExportError, ExportParams
from app.validation import humane_message
from app.web import (
    CurrentPrincipal,
    DbSession,
    Principal,
    RowId,
    flash,
    is_htmx,
    render,
    render_block,
    require_roles,
)

router = APIRouter(
    prefix="/research/exports",
    dependencies=[Depends(require_roles(Role.researcher, Role.admin))],
)

PAGE_SIZE = 50
LIST_TEMPLATE = "exports/list.html"
DETAIL_TEMPLATE = "exports/detail.html"
CHECKBOXES = ("include_excluded", "include_inactive", "dedupe")
LISTS = ("campaigns", "sources")
# What the form starts with, and what the list leaves out of a snapshot's parameters.
DEFAULTS: dict[str, Any] = {
    name: field.get_default(call_default_factory=True)
    for name, field in ExportParams.model_fields.items()
    if not field.is_required()
} | {"format": "trl", "campaigns": []}


def choices(field: str) -> tuple[str, ...]:
    """The values a Literal field (or a list of one) allows, read from ExportParams."""
    annotation = ExportParams.model_fields[field].annotation
    args = get_args(annotation)
    if args and get_args(args[0]):  # list[Literal[...]]
        args = get_args(args[0])
    return tuple(str(a) for a in args if a is not type(None))


def summary(parameters: dict[str, Any]) -> list[tuple[str, str]]:
    """The parameters that differ from the defaults, for the list (campaigns, format and
    file type are shown in their own columns)."""
    shown = []
    for key, value in parameters.items():
        if key in {"campaigns", "format", "file_format", "as_of"} or DEFAULTS.get(key) == value:
            continue
        shown.append((key, ", ".join(map(str, value)) if isinstance(value, list) else str(value)))
    return shown


def form_values(form: FormData) -> dict[str, Any]:
    """The submitted form as ExportParams input: empty fields take their defaults,
    checkboxes are true when sent."""
    values: dict[str, Any] = {}
    for key in LISTS:
        values[key] = [str(v) for v in form.getlist(key)]
    for key in CHECKBOXES:
        values[key] = form.get(key) is not None
    for key in ExportParams.model_fields:
        if key in values or key == "as_of":
            continue
        raw = form.get(key)
        if isinstance(raw, str) and raw.strip():
            values[key] = raw.strip()
    return values


def field_errors(exc: ValidationError) -> dict[str, str]:
    errors: dict[str, str] = {}
    for error in exc.errors():
        loc = error.get("loc", ())
        field = str(loc[0]) if loc and str(loc[0]) in ExportParams.model_fields else "form"
        errors.setdefault(field, humane_message(error))
    return errors


def preselected(rows: list[Any], wanted: str | None) -> list[str]:
    """The campaigns the new-snapshot form starts with ticked: `?campaign=SLUG` when it names
    one, else the only campaign there is (else none)."""
    slugs = [row.campaign.slug for row in rows]
    if wanted in slugs:
        return [wanted]
    return slugs if len(slugs) == 1 else []


def list_context(
    db: Session, *, before: int | None = None, form: dict[str, Any] | None = None
) -> dict[str, Any]:
    query = select(ExportSnapshot).order_by(ExportSnapshot.id.desc()).limit(PAGE_SIZE + 1)
    if before is not None:
        query = query.where(ExportSnapshot.id < before)
    found = list(db.scalars(query))
    snapshots = found[:PAGE_SIZE]
    return {
        "snapshots": snapshots,
        "older": snapshots[-1].id if len(found) > PAGE_SIZE else None,
        "names": api.creators(db, snapshots),
        "summaries": {s.id: summary(s.parameters or {}) for s in snapshots},
        "campaigns": campaigns_service.list_campaigns(db),
        "form": {**DEFAULTS, **(form or {})},
        "errors": {},
        "choices": {
            name: choices(name)
            for name in ("format", "file_format", "pairs", "flagged", "ties", "pseudonyms")
        }
        | {"sources": choices("sources"), "sft_style": choices("sft_style")},
    }


@router.get("")
def exports_page(
    request: Request,
    db: DbSession,
    before: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    campaign: Annotated[str | None, Query(max_length=100)] = None,
) -> Response:
    """The form to create a snapshot and the list of snapshots, newest first. `?campaign=SLUG`
    ticks that campaign in the form; with a single campaign it is ticked anyway."""
    context = list_context(db, before=before)
    context["form"]["campaigns"] = preselected(context["campaigns"], campaign)
    return render(request, LIST_TEMPLATE, context, db=db)


def _create(
    request: Request,
    db: Session,
    principal: Principal,
    values: dict[str, Any],
) -> Response:
    errors: dict[str, str] = {}
    try:
        params = ExportParams.model_validate(values)
        snapshot = api.create(request, db, params, actor_id=principal.user.id)
    except ValidationError as exc:
        errors = field_errors(exc)
    except ExportError as error:
        errors = {"campaigns" if error.status_code == 404 else "form": str(error)}
    if errors:
        db.rollback()
        context = list_context(db, form=values)
        context["errors"] = errors
        return render(request, LIST_TEMPLATE, context, status_code=422, db=db)
    flash(
        db, principal, f"Snapshot #{snapshot.id} is being built; this page shows when it is ready."
    )
    db.commit()
    return RedirectResponse("/research/exports", status_code=303)


@router.post("")
async def create_export(request: Request, db: DbSession, principal: CurrentPrincipal) -> Response:
    """Create a snapshot from the form; bad input shows the form again, with a message per
    field, and creates nothing."""
    values = form_values(await request.form())  # already parsed (and CSRF-checked)
    return await run_in_threadpool(_create, request, db, principal, values)


@router.get("/{snapshot_id}")
def snapshot_page(snapshot_id: RowId, request: Request, db: DbSession) -> Response:
    """One snapshot: its manifest, files and checksums. htmx asks the same URL for the
    snapshot's row in the list (`HX-Target: snapshot-<id>`) or its state box while it is
    built; once it is ready the page reloads itself."""
    snapshot = api.get_snapshot(db, snapshot_id)
    names = api.creators(db, [snapshot])
    context = {
        "snap": snapshot,
        "names": names,
        "summaries": {snapshot.id: summary(snapshot.parameters or {})},
        "json": api.snapshot_json(snapshot, names.get(snapshot.created_by_id or 0)),
    }
    if is_htmx(request):
        if request.headers.get("hx-target") == f"snapshot-{snapshot.id}":
            return render_block(request, LIST_TEMPLATE, "row", context)
        if snapshot.state == "pending":
            return render_block(request, DETAIL_TEMPLATE, "state", context)
        return Response(status_code=200, headers={"HX-Refresh": "true"})
    return render(request, DETAIL_TEMPLATE, context, db=db)
