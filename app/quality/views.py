"""Label quality: the campaign dashboard (admins) and the same figures as JSON."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from sqlalchemy.orm import Session
from starlette.responses import Response

from app.auth.models import Role
from app.campaigns import service as campaigns
from app.campaigns.models import Campaign
from app.quality.service import Filters, quality_report
from app.web import DbSession, render, require_roles

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
