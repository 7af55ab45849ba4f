"""Campaigns: create, update (guidelines are versioned), change status, look up, list.

Functions only add and flush; the request or CLI command that opened the session commits.
Every change writes one audit event holding only the fields that changed.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, case, func, select
from sqlalchemy import update as sql_update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.auth.models import User
from app.campaigns.models import Campaign, CampaignGuidelines, CampaignStatus
from app.campaigns.schemas import (
    SETTINGS_FIELDS,
    CampaignCreate,
    CampaignSettings,
    InvalidCampaign,
)
from app.labeling.models import Comparison, Judgment, Task, TaskStatus

# Not copied into audit events: the text is kept per version in campaign_guidelines, and the
# event records the version number instead.
_NOT_AUDITED = frozenset({"guidelines_md"})
# Fixed by the tasks already made: their completions were imported for this K and mode.
_FIXED_ONCE_TASKS_EXIST = {"k": "K", "mode": "The mode"}


_BY_SLUG = select(Campaign).where(Campaign.slug == bindparam("slug"))  # on every labeling call


def get_by_slug(db: Session, slug: str) -> Campaign | None:
    """The campaign with this slug, or None."""
    return db.scalar(_BY_SLUG, {"slug": slug})


def _plain(value: Any) -> Any:
    """A value as it goes into an audit event's JSON."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list):
        return list(value)
    return value


def _actor_id(actor: User | None) -> int | None:
    return actor.id if actor is not None else None


def create(db: Session, *, data: CampaignCreate, actor: User | None) -> Campaign:
    """Create a campaign with version 1 of its guidelines. A taken slug is InvalidCampaign."""
    if get_by_slug(db, data.slug) is not None:
        raise InvalidCampaign({"slug": f"A campaign with the slug '{data.slug}' already exists."})
    values = data.model_dump()
    campaign = Campaign(**values, guidelines_version=1, created_by_id=_actor_id(actor))
    try:
        # A savepoint, so that losing a race for the slug leaves the caller's session usable.
        with db.begin_nested():
            db.add(campaign)
            db.flush()
    except IntegrityError:
        raise InvalidCampaign(
            {"slug": f"A campaign with the slug '{data.slug}' already exists."}
        ) from None
    db.add(
        CampaignGuidelines(
            campaign_id=campaign.id,
            version=1,
            guidelines_md=campaign.guidelines_md,
            created_by_id=_actor_id(actor),
        )
    )
    audit.record(
        db,
        actor_id=_actor_id(actor),
        action="campaign.create",
        entity_type="campaign",
        entity_id=campaign.id,
        after={
            **{k: _plain(v) for k, v in values.items() if k not in _NOT_AUDITED},
            "guidelines_version": 1,
        },
    )
    return campaign


def changes(campaign: Campaign, data: CampaignSettings) -> dict[str, tuple[Any, Any]]:
    """The settings `data` would change: field -> (current value, new value)."""
    found = {}
    for name in SETTINGS_FIELDS:
        old, new = getattr(campaign, name), getattr(data, name)
        if isinstance(old, float) and math.isclose(old, new, rel_tol=0, abs_tol=1e-9):
            continue  # a rate shown as a rounded percentage and sent back unchanged
        if _plain(old) != _plain(new):
            found[name] = (old, new)
    return found


def has_tasks(db: Session, campaign: Campaign) -> bool:
    return db.scalar(select(Task.id).where(Task.campaign_id == campaign.id).limit(1)) is not None


def update(
    db: Session, *, campaign: Campaign, data: CampaignSettings, actor: User | None
) -> Campaign:
    """Apply new settings. New guidelines become a new version; a new overlap applies to the
    campaign's open and complete (non-gold) tasks at once. K and the mode are fixed once
    the campaign has tasks."""
    changed = changes(campaign, data)
    if not changed:
        return campaign
    fixed = [name for name in _FIXED_ONCE_TASKS_EXIST if name in changed]
    if fixed and has_tasks(db, campaign):
        raise InvalidCampaign(
            {
                name: f"{_FIXED_ONCE_TASKS_EXIST[name]} cannot change once the campaign has tasks."
                for name in fixed
            }
        )
    before = {k: _plain(old) for k, (old, _new) in changed.items() if k not in _NOT_AUDITED}
    after = {k: _plain(new) for k, (_old, new) in changed.items() if k not in _NOT_AUDITED}
    for name, (_old, new) in changed.items():
        setattr(campaign, name, new)
    if "guidelines_md" in changed:
        before["guidelines_version"] = campaign.guidelines_version
        campaign.guidelines_version += 1
        after["guidelines_version"] = campaign.guidelines_version
        db.add(
            CampaignGuidelines(
                campaign_id=campaign.id,
                version=campaign.guidelines_version,
                guidelines_md=campaign.guidelines_md,
                created_by_id=_actor_id(actor),
            )
        )
    db.flush()
    if "overlap" in changed:
        _apply_overlap(db, campaign)
    audit.record(
        db,
        actor_id=_actor_id(actor),
        action="campaign.update",
        entity_type="campaign",
        entity_id=campaign.id,
        before=before,
        after=after,
    )
    return campaign


def _apply_overlap(db: Session, campaign: Campaign) -> None:
    """Require `overlap` judgments of every live non-gold task; re-derive open/complete."""
    db.execute(
        sql_update(Task)
        .where(
            Task.campaign_id == campaign.id,
            Task.is_gold.is_(False),
            Task.status != TaskStatus.retired,
        )
        .values(
            required_judgments=campaign.overlap,
            status=case(
                (Task.judgment_count >= campaign.overlap, TaskStatus.complete.value),
                else_=TaskStatus.open.value,
            ),
        )
        .execution_options(synchronize_session="fetch")
    )
    db.flush()


def set_status(
    db: Session, *, campaign: Campaign, status: CampaignStatus, actor: User | None
) -> Campaign:
    """Activate, pause, archive or return a campaign to draft (no event when unchanged)."""
    status = CampaignStatus(status)
    if campaign.status == status:
        return campaign
    before = {"status": campaign.status.value}
    campaign.status = status
    db.flush()
    audit.record(
        db,
        actor_id=_actor_id(actor),
        action="campaign.status",
        entity_type="campaign",
        entity_id=campaign.id,
        before=before,
        after={"status": status.value},
    )
    return campaign


@dataclass
class CampaignCounts:
    open_tasks: int = 0
    complete_tasks: int = 0
    retired_tasks: int = 0
    gold_tasks: int = 0
    judgments: int = 0  # current ones: an edit replaces, it does not add
    comparisons: int = 0  # active ones: what an export would contain


@dataclass
class CampaignRow:
    campaign: Campaign
    counts: CampaignCounts


def counts(db: Session, campaign_ids: list[int] | None = None) -> dict[int, CampaignCounts]:
    """Task, judgment and comparison counts per campaign id (all campaigns when None)."""

    def scoped(query: Any, column: Any) -> Any:
        return query if campaign_ids is None else query.where(column.in_(campaign_ids))

    result: dict[int, CampaignCounts] = {}
    if campaign_ids is not None:
        result = {campaign_id: CampaignCounts() for campaign_id in campaign_ids}

    def row(campaign_id: int) -> CampaignCounts:
        return result.setdefault(campaign_id, CampaignCounts())

    task_rows = db.execute(
        scoped(
            select(
                Task.campaign_id,
                Task.status,
                func.count(),
                func.sum(case((Task.is_gold.is_(True), 1), else_=0)),
            ).group_by(Task.campaign_id, Task.status),
            Task.campaign_id,
        )
    )
    for campaign_id, status, number, gold in task_rows:
        entry = row(campaign_id)
        setattr(entry, f"{TaskStatus(status).value}_tasks", number)
        entry.gold_tasks += int(gold or 0)
    judgments = db.execute(
        scoped(
            select(Judgment.campaign_id, func.count())
            .where(Judgment.is_current.is_(True))
            .group_by(Judgment.campaign_id),
            Judgment.campaign_id,
        )
    )
    for campaign_id, number in judgments:
        row(campaign_id).judgments = number
    comparisons = db.execute(
        scoped(
            select(Comparison.campaign_id, func.count())
            .where(Comparison.is_active.is_(True))
            .group_by(Comparison.campaign_id),
            Comparison.campaign_id,
        )
    )
    for campaign_id, number in comparisons:
        row(campaign_id).comparisons = number
    return result


def list_campaigns(db: Session) -> list[CampaignRow]:
    """Every campaign, newest first, with its counts."""
    campaigns = db.scalars(select(Campaign).order_by(Campaign.id.desc())).all()
    by_id = counts(db)
    return [
        CampaignRow(campaign, by_id.get(campaign.id, CampaignCounts())) for campaign in campaigns
    ]


def guidelines_versions(db: Session, campaign: Campaign) -> list[CampaignGuidelines]:
    """Every version of the campaign's guidelines, newest first."""
    return list(
        db.scalars(
            select(CampaignGuidelines)
            .where(CampaignGuidelines.campaign_id == campaign.id)
            .order_by(CampaignGuidelines.version.desc())
        )
    )
