"""Exports over the JSON API (researchers and admins, bearer tokens): create a snapshot, list
and read them, download their files, and the comparisons feed the trainer reads.

A snapshot is built on a background thread (`ExportBuilder`) in its own REPEATABLE READ
session; the API answers 202 at once with the snapshot's URL, to poll until its `state` is
`ready` (or `failed`, with its `error`). Files are streamed from disk: no database session is
held while a download runs, and a client that disconnects changes nothing.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.responses import FileResponse, JSONResponse, Response

from app.auth.models import Role, User
from app.campaigns import service as campaigns
from app.campaigns.models import Campaign
from app.config import Settings
from app.db import MAX_ID, Database
from app.exports import feed
from app.exports import service as exports
from app.exports.models import ExportSnapshot
from app.exports.schemas import ExportError, ExportParams
from app.web import CurrentPrincipal, DbSession, RowId, SettingsDep, require_roles

log = logging.getLogger("prefloop.exports")

router = APIRouter(
    prefix="/api/v1",
    tags=["exports"],
    dependencies=[Depends(require_roles(Role.admin, Role.researcher))],
)

LIST_LIMIT = 50
# Builds share the web app's connection pool: at most this many run at once, the rest wait
# their turn (still one thread per snapshot), so exports never starve the pages.
MAX_CONCURRENT_BUILDS = 2
MEDIA_TYPES = {
    ".jsonl": "application/jsonl",
    ".gz": "application/gzip",
    ".parquet": "application/vnd.apache.parquet",
    ".json": "application/json",
    ".md": "text/markdown; charset=utf-8",
}


class ExportBuilder:
    """Builds snapshots on background threads, one thread per snapshot, each with its own
    database sessions (`service.build_snapshot`), at most `MAX_CONCURRENT_BUILDS` at a time.
    A snapshot whose build dies with the process (a restart) stays `pending`; a new snapshot
    with the same parameters gives the same data."""

    def __init__(self, database: Database, settings: Settings) -> None:
        self._database = database
        self._settings = settings
        self._lock = threading.Lock()
        self._running: set[int] = set()
        self._slots = threading.BoundedSemaphore(MAX_CONCURRENT_BUILDS)

    def schedule(self, snapshot_id: int) -> bool:
        with self._lock:
            if snapshot_id in self._running:
                return False
            self._running.add(snapshot_id)
        threading.Thread(
            target=self._run, args=(snapshot_id,), name=f"export-{snapshot_id}", daemon=True
        ).start()
        return True

    def busy(self) -> bool:
        with self._lock:
            return bool(self._running)

    def building(self, snapshot_id: int) -> bool:
        with self._lock:
            return snapshot_id in self._running

    def _run(self, snapshot_id: int) -> None:
        try:
            with self._slots:
                snapshot = exports.build_snapshot(self._database, snapshot_id, self._settings)
            log.info("export snapshot %s is %s", snapshot_id, snapshot.state)
        except Exception:
            log.exception("export snapshot %s failed", snapshot_id)
        finally:
            with self._lock:
                self._running.discard(snapshot_id)


def builder(request: Request) -> ExportBuilder:
    """The app's builder, made on first use."""
    state = request.app.state
    if getattr(state, "export_builder", None) is None:
        state.export_builder = ExportBuilder(state.db, state.settings)
    return state.export_builder


# --- shared with the pages ---------------------------------------------------------------------


def get_snapshot(db: Session, snapshot_id: int) -> ExportSnapshot:
    snapshot = db.get(ExportSnapshot, snapshot_id)
    if snapshot is None:
        raise HTTPException(404, f"There is no export snapshot {snapshot_id}.")
    return snapshot


def create(request: Request, db: Session, params: ExportParams, *, actor_id: int) -> ExportSnapshot:
    """Record a pending snapshot, commit it, and start its build. ExportError (an unknown
    campaign, say) leaves nothing behind."""
    try:
        snapshot = exports.create_snapshot(db, params, actor_id=actor_id)
    except ExportError:
        db.rollback()
        raise
    db.commit()  # the build thread reads the row in its own session
    builder(request).schedule(snapshot.id)
    return snapshot


def creators(db: Session, snapshots: list[ExportSnapshot]) -> dict[int, str]:
    ids = {s.created_by_id for s in snapshots if s.created_by_id is not None}
    if not ids:
        return {}
    return dict(db.execute(select(User.id, User.username).where(User.id.in_(ids))).tuples().all())


def file_url(snapshot_id: int, name: str) -> str:
    return f"/api/v1/exports/{snapshot_id}/files/{name}"


def snapshot_json(snapshot: ExportSnapshot, created_by: str | None) -> dict[str, Any]:
    """A snapshot and its manifest: parameters, row counts, files with their SHA-256."""
    return {
        "id": snapshot.id,
        "url": f"/api/v1/exports/{snapshot.id}",
        "state": snapshot.state,
        "format": snapshot.format,
        "created_at": snapshot.created_at.isoformat(),
        "created_by": created_by,
        "parameters": snapshot.parameters,
        "row_counts": snapshot.row_counts,
        "files": [
            {**entry, "url": file_url(snapshot.id, entry["name"])}
            for entry in (snapshot.files or [])
        ]
        if snapshot.state == "ready"
        else [],
        "manifest_sha256": snapshot.manifest_sha256,
        "error": snapshot.error,
    }


def recorded_file(settings: Settings, snapshot: ExportSnapshot, name: str) -> tuple[Path, dict]:
    """The path of one of a ready snapshot's recorded files. Only names the snapshot recorded
    are served, and only inside its folder: anything else is 404, a pending snapshot 409."""
    entry = next((f for f in snapshot.files or [] if f.get("name") == name), None)
    if snapshot.state != "ready":
        if snapshot.state == "failed":
            raise HTTPException(409, f"Snapshot {snapshot.id} failed: {snapshot.error}")
        raise HTTPException(409, f"Snapshot {snapshot.id} is still being built; try again soon.")
    if entry is None or "/" in name or "\\" in name or name in {"", ".", ".."}:
        raise HTTPException(404, f"Snapshot {snapshot.id} has no file '{name}'.")
    folder = exports.snapshot_folder(settings, snapshot).resolve()
    path = (folder / name).resolve()
    if path.parent != folder or not path.is_file():
        raise HTTPException(404, f"Snapshot {snapshot.id} has no file '{name}'.")
    return path, entry


def download(path: Path, entry: dict[str, Any]) -> FileResponse:
    media_type = MEDIA_TYPES.get(path.suffix, "application/octet-stream")
    return FileResponse(
        path,
        media_type=media_type,
        filename=path.name,
        headers={"ETag": f'"{entry.get("sha256", "")}"', "Cache-Control": "private, no-store"},
    )


def campaign_by_slug(db: Session, slug: str) -> Campaign:
    campaign = campaigns.get_by_slug(db, slug)
    if campaign is None:
        raise HTTPException(404, f"There is no campaign '{slug}'.")
    return campaign


# --- routes ------------------------------------------------------------------------------------


@router.post("/exports", status_code=202)
def create_export(
    params: ExportParams, request: Request, db: DbSession, principal: CurrentPrincipal
) -> JSONResponse:
    """Start a snapshot: 202 with its id and URL; poll the URL until `state` is `ready`."""
    try:
        snapshot = create(request, db, params, actor_id=principal.user.id)
    except ExportError as error:
        raise HTTPException(error.status_code, str(error)) from error
    url = f"/api/v1/exports/{snapshot.id}"
    return JSONResponse(
        {"id": snapshot.id, "state": snapshot.state, "url": url},
        status_code=202,
        headers={"Location": url, "Retry-After": "2"},
    )


@router.get("/exports")
def list_exports(
    db: DbSession,
    limit: Annotated[int, Query(ge=1, le=200)] = LIST_LIMIT,
    before: Annotated[
        int | None, Query(ge=1, le=MAX_ID, description="Only snapshots with a lower id.")
    ] = None,
) -> dict[str, Any]:
    """Snapshots, newest first; pass `next_before` as `before` for the next page."""
    query = select(ExportSnapshot).order_by(ExportSnapshot.id.desc()).limit(limit + 1)
    if before is not None:
        query = query.where(ExportSnapshot.id < before)
    snapshots = list(db.scalars(query))
    page = snapshots[:limit]
    names = creators(db, page)
    return {
        "exports": [snapshot_json(s, names.get(s.created_by_id or 0)) for s in page],
        "next_before": page[-1].id if len(snapshots) > limit else None,
    }


@router.get("/exports/{snapshot_id}")
def show_export(snapshot_id: RowId, db: DbSession) -> dict[str, Any]:
    """One snapshot with its manifest: parameters, rows, files and their SHA-256, state."""
    snapshot = get_snapshot(db, snapshot_id)
    return snapshot_json(snapshot, creators(db, [snapshot]).get(snapshot.created_by_id or 0))


@router.get("/exports/{snapshot_id}/files/{name}")
def download_file(snapshot_id: RowId, name: str, db: DbSession, settings: SettingsDep) -> Response:
    """Stream one file of a ready snapshot from disk (409 while it is being built)."""
    path, entry = recorded_file(settings, get_snapshot(db, snapshot_id), name)
    db.close()  # give the connection back before the (possibly slow) download starts
    return download(path, entry)


@router.get("/campaigns/{slug}/comparisons")
def comparisons_feed(
    slug: str,
    db: DbSession,
    settings: SettingsDep,
    since: Annotated[int, Query(ge=0, description="Only comparisons with a higher id.")] = 0,
    limit: Annotated[int, Query(ge=1, le=feed.MAX_LIMIT)] = feed.DEFAULT_LIMIT,
    include_text: Annotated[bool, Query(description="Add the prompt and both texts.")] = False,
) -> dict[str, Any]:
    """The campaign's active comparisons after the cursor `since`, in id order. Call again
    with `next_since` while `has_more`; when `held_back` is true, newer comparisons wait for an
    older transaction to finish (PostgreSQL): ask again in a few seconds. Every comparison is
    served once; see `app.exports.feed` for the guarantee and its limits."""
    campaign = campaign_by_slug(db, slug)
    page = feed.comparisons_since(
        db,
        campaign,
        since=since,
        limit=limit,
        secret_key=settings.secret_key,
        include_text=include_text,
    )
    return page.as_json()
