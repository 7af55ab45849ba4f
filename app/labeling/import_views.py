"""Dataset imports: the admin upload page and the API endpoint.

Both hand a byte stream to `app.labeling.importer`: the page the uploaded file (Starlette
spools it to disk), the API the multipart `file` field or the raw request body, copied to a
spooled temporary file as it arrives. The import itself runs in a worker thread (the
database session is synchronous), then the request commits once.
"""

from __future__ import annotations

import gzip
import tempfile
import zlib
from typing import Annotated, Any, BinaryIO, cast

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.datastructures import FormData, UploadFile
from starlette.responses import JSONResponse, RedirectResponse, Response

from app.audit.models import AuditEvent
from app.auth.models import Role, User
from app.campaigns import service as campaigns
from app.campaigns.models import Campaign
from app.labeling.importer import (
    FORMAT_LABELS,
    MAX_REPORTED_ERRORS,
    ImportFormat,
    ImportRejected,
    ImportResult,
    LineError,
    file_kind,
    import_stream,
)
from app.web import (
    CurrentPrincipal,
    DbSession,
    Principal,
    client_ip,
    flash,
    render,
    require_roles,
)

router = APIRouter(dependencies=[Depends(require_roles(Role.admin))])

SPOOL_BYTES = 8 << 20  # request bodies up to this size stay in memory, larger ones go to disk
GZIP_MAGIC = b"\x1f\x8b"


class _InflatedTooLarge(Exception):
    pass


class _Gunzipped:
    """The lines of a gzip stream, refusing to unpack more than `limit` bytes (a few KiB of
    gzip can unpack to gigabytes). The importer only calls readline()."""

    def __init__(self, raw: BinaryIO, limit: int) -> None:
        self._gzip = gzip.GzipFile(fileobj=raw, mode="rb")  # a spooled file says "w+b"
        self._left = limit

    def readline(self, size: int = -1) -> bytes:
        line = self._gzip.readline(size)
        self._left -= len(line)
        if self._left < 0:
            raise _InflatedTooLarge()
        return line


def _unpacked(stream: BinaryIO, limit: int) -> BinaryIO:
    """The stream itself, or its unpacked lines when it is gzip (known by its first bytes,
    whatever the file is called). Uploads are spooled, so peeking and seeking back is free."""
    head = stream.read(2)
    stream.seek(0)
    return cast(BinaryIO, _Gunzipped(stream, limit)) if head == GZIP_MAGIC else stream


def _unreadable(message: str) -> ImportRejected:
    return ImportRejected([LineError(line=None, message=message)], more=0, lines=0)


TRUE_VALUES = {"1", "true", "on", "yes"}


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


# --- the page -------------------------------------------------------------------------------


def _recent_imports(db: Session) -> list[dict[str, Any]]:
    rows = db.execute(
        select(AuditEvent, User.username)
        .outerjoin(User, User.id == AuditEvent.actor_id)
        .where(AuditEvent.action == "import.create")
        .order_by(AuditEvent.id.desc())
        .limit(10)
    ).all()
    return [
        {"event": event, "who": username or "command line", **(event.after or {})}
        for event, username in rows
    ]


def _page(
    request: Request,
    db: Session,
    *,
    form: dict[str, Any],
    errors: list[LineError] | None = None,
    more_errors: int = 0,
    error: str | None = None,
    status_code: int = 200,
) -> Response:
    campaigns = db.scalars(select(Campaign).order_by(Campaign.name, Campaign.slug)).all()
    return render(
        request,
        "imports/index.html",
        {
            "campaigns": campaigns,
            "formats": FORMAT_LABELS,
            "form": form,
            "errors": errors or [],
            "more_errors": more_errors,
            "error": error,
            "recent": _recent_imports(db),
        },
        status_code=status_code,
        db=db,
    )


@router.get("/admin/imports")
def imports_page(request: Request, db: DbSession, campaign: str | None = None) -> Response:
    """The upload form (`?campaign=SLUG` preselects a campaign) and the latest imports."""
    return _page(request, db, form={"campaign": campaign or "", "format": "auto"})


def _run(
    db: Session,
    campaign: Campaign,
    stream: BinaryIO,
    *,
    file_name: str,
    fmt: ImportFormat,
    as_judged: bool,
    skip_invalid: bool,
    actor_id: int,
    ip: str,
    max_bytes: int,
    kind: str | None = None,
) -> ImportResult | ImportRejected:
    """The import and its commit, in a worker thread; a rejected file is returned, not raised.
    A gzip file (.jsonl.gz, .csv.gz) is unpacked on the fly, as the CLI does, to at most
    `max_bytes` (the upload limit: gzip is no way around it)."""
    try:
        result = import_stream(
            db,
            campaign,
            _unpacked(stream, max_bytes),
            file_name=file_name,
            fmt=fmt,
            as_judged=as_judged,
            skip_invalid=skip_invalid,
            actor_id=actor_id,
            ip=ip,
            kind=kind,
        )
    except ImportRejected as exc:
        db.rollback()
        return exc
    except (OSError, EOFError, zlib.error):  # a truncated or corrupt .gz file
        db.rollback()
        return _unreadable("the file is not a readable gzip file (truncated or corrupt?)")
    except _InflatedTooLarge:
        db.rollback()
        return _unreadable(
            f"the file unpacks to more than the upload limit "
            f"(PREFLOOP_MAX_UPLOAD_BYTES = {max_bytes:,} bytes)"
        )
    db.commit()
    return result


@router.post("/admin/imports")
async def upload(request: Request, db: DbSession, principal: CurrentPrincipal) -> Response:
    """Import an uploaded file; redirect with the counts, or show the bad lines (422)."""
    data = await request.form()  # already parsed (and its CSRF token checked) by require_roles
    # Everything that touches the database runs on one worker thread, never on the event loop.
    return await run_in_threadpool(_upload, request, db, principal, data)


def _upload(request: Request, db: Session, principal: Principal, data: FormData) -> Response:
    upload_file = data.get("file")
    form = {
        "campaign": str(data.get("campaign") or ""),
        "format": str(data.get("format") or "auto"),
        "as_judged": str(data.get("as_judged") or "").lower() in TRUE_VALUES,
        "skip_invalid": str(data.get("skip_invalid") or "").lower() in TRUE_VALUES,
    }

    def refuse(message: str) -> Response:
        return _page(request, db, form=form, error=message, status_code=422)

    campaign = campaigns.get_by_slug(db, form["campaign"])
    if campaign is None:
        return refuse("Choose the campaign to import into.")
    if form["format"] not in ImportFormat.__members__:
        return refuse("Choose one of the listed formats.")
    if not isinstance(upload_file, UploadFile) or not upload_file.filename:
        return refuse("Choose a file to upload.")
    outcome = _run(
        db,
        campaign,
        upload_file.file,
        file_name=upload_file.filename,
        fmt=ImportFormat(form["format"]),
        as_judged=form["as_judged"],
        skip_invalid=form["skip_invalid"],
        actor_id=principal.user.id,
        ip=client_ip(request),
        max_bytes=request.app.state.settings.max_upload_bytes,
    )
    if isinstance(outcome, ImportRejected):
        return _page(
            request,
            db,
            form=form,
            errors=outcome.errors,
            more_errors=outcome.more,
            error=_sentence(str(outcome)),
            status_code=422,
        )
    flash(db, principal, outcome.summary())
    for problem in outcome.errors:
        flash(db, principal, f"Skipped {problem}", level="warning")
    if outcome.more_errors:
        flash(db, principal, f"Skipped {outcome.more_errors} more bad lines.", level="warning")
    db.commit()
    return RedirectResponse(f"/admin/imports?campaign={campaign.slug}", status_code=303)


# --- the API --------------------------------------------------------------------------------


class LineErrorOut(BaseModel):
    line: int | None = Field(description="1-based line number; null for the file as a whole.")
    message: str


class ImportResultOut(BaseModel):
    """What the import created. Duplicates are lines whose content was already there."""

    campaign: str
    file_name: str
    as_judged: bool
    lines: int = Field(description="Data lines read (blank lines are not counted).")
    prompts: int
    completions: int
    tasks: int
    comparisons: int
    duplicates: int
    invalid: int = Field(description="Bad lines left out (only with skip_invalid).")
    formats: dict[str, int] = Field(description="Lines per detected row format.")
    errors: list[LineErrorOut] = Field(
        description=f"With skip_invalid: the first {MAX_REPORTED_ERRORS} lines left out."
    )
    more_errors: int


class ImportErrorOut(BaseModel):
    """The file was refused and nothing was written."""

    detail: str
    errors: list[LineErrorOut] = Field(
        description=f"The first {MAX_REPORTED_ERRORS} bad lines and why."
    )
    more_errors: int = Field(description="How many more bad lines there were.")


API_BODY = {
    "required": True,
    "content": {
        "application/x-ndjson": {
            "schema": {"type": "string", "format": "binary"},
            "example": '{"prompt": "Why is the sky blue?", "completions": ["Rayleigh ...", "..."]}\n',
        },
        "text/csv": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            }
        },
    },
}


def _campaign_or_404(db: Session, slug: str) -> Campaign:
    campaign = campaigns.get_by_slug(db, slug)
    db.commit()  # end the read: no connection (or SQLite lock) is held while the body arrives
    if campaign is None:
        raise HTTPException(404, f"No campaign '{slug}'.")
    return campaign


async def _spool_body(request: Request) -> BinaryIO:
    """The raw request body in a temporary file (in memory up to SPOOL_BYTES)."""
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115  (closed by the caller)
    try:
        async for chunk in request.stream():
            spool.write(chunk)
    except RuntimeError:  # the body was already read as a form (a browser session's CSRF check)
        spool.close()
        raise HTTPException(
            415, "Send the file as the raw body (JSON Lines or CSV) or as a multipart file field."
        ) from None
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool  # type: ignore[return-value]


@router.post(
    "/api/v1/imports",
    summary="Import a dataset into a campaign",
    response_model=ImportResultOut,
    responses={
        404: {"description": "No campaign with that slug."},
        415: {"description": "A form-encoded body: send the file raw or as multipart."},
        413: {"description": "The body is over PREFLOOP_MAX_UPLOAD_BYTES."},
        422: {"model": ImportErrorOut, "description": "Bad lines; nothing was imported."},
    },
    openapi_extra={"requestBody": API_BODY},
)
async def api_import(
    request: Request,
    db: DbSession,
    principal: CurrentPrincipal,
    campaign: Annotated[str, Query(description="Slug of the campaign to import into.")],
    format: Annotated[
        ImportFormat, Query(description="Row format: auto detects it per line.")
    ] = ImportFormat.auto,
    as_judged: Annotated[
        bool, Query(description="Import chosen/rejected pairs as comparisons, not tasks.")
    ] = False,
    skip_invalid: Annotated[
        bool, Query(description="Import the good lines and list the bad ones.")
    ] = False,
    filename: Annotated[
        str | None, Query(max_length=255, description="A name for the audit trail.")
    ] = None,
) -> Any:
    """Import JSON Lines or CSV, sent as the raw body or as a multipart `file` field.

    Rows: `{"prompt" | "messages", "completions", "id", "metadata", "priority", "gold"}`,
    HH-RLHF `{"chosen", "rejected"}` or TRL `{"prompt", "chosen", "rejected"}`; CSV with a
    header of the same names (`completion_1`..`completion_N` for completions). UTF-8 only.
    One transaction: a body with any bad line imports nothing and answers 422 with the
    reasons. Lines already imported are skipped and counted as duplicates.

    `curl -H "Authorization: Bearer $TOKEN" -H "Content-Type: application/x-ndjson"
    --data-binary @data.jsonl "$URL/api/v1/imports?campaign=SLUG"`
    """
    target = await run_in_threadpool(_campaign_or_404, db, campaign)
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        upload_file = (await request.form()).get("file")
        if not isinstance(upload_file, UploadFile):
            return JSONResponse(
                {"detail": 'Send the file in a multipart field named "file".', "errors": []},
                status_code=422,
            )
        stream: BinaryIO = upload_file.file
        name = filename or upload_file.filename or "upload"
        kind = file_kind(name, upload_file.content_type)
    else:
        stream = await _spool_body(request)
        name = filename or "request body"
        kind = file_kind(name, request.headers.get("content-type"))
    try:
        outcome = await run_in_threadpool(
            _run,
            db,
            target,
            stream,
            file_name=name,
            fmt=format,
            as_judged=as_judged,
            skip_invalid=skip_invalid,
            actor_id=principal.user.id,
            ip=client_ip(request),
            max_bytes=request.app.state.settings.max_upload_bytes,
            kind=kind,
        )
    finally:
        stream.close()
    if isinstance(outcome, ImportRejected):
        return JSONResponse(
            ImportErrorOut(
                detail=_sentence(str(outcome)),
                errors=[LineErrorOut(line=e.line, message=e.message) for e in outcome.errors],
                more_errors=outcome.more,
            ).model_dump(),
            status_code=422,
        )
    return outcome.as_dict()
