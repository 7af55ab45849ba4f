"""The JSON API (bearer tokens or a browser session) and the health check."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from sqlalchemy import text
from starlette.responses import JSONResponse

from app import __version__
from app.web import ANY_ROLE, CurrentPrincipal, DbSession, public, require_roles

router = APIRouter(prefix="/api/v1", dependencies=[Depends(require_roles(*ANY_ROLE))])
health_router = APIRouter(dependencies=[Depends(public)])


@router.get("/me")
def me(principal: CurrentPrincipal) -> dict[str, object]:
    """Who the token or session belongs to."""
    user = principal.user
    return {
        "id": user.id,
        "username": user.username,
        "role": user.role.value,
        "via_token": principal.via_token,
    }


@health_router.get("/healthz")
def healthz(db: DbSession) -> JSONResponse:
    """Liveness and database reachability, for load balancers and compose healthchecks."""
    db.execute(text("SELECT 1"))
    return JSONResponse({"status": "ok", "version": __version__})
