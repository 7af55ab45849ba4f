"""Test data builders: campaigns, tasks with completions, labelers."""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

from sqlalchemy.orm import Session

from app.auth import service as auth_service
from app.auth.models import Role, User
from app.campaigns.models import Campaign, CampaignGuidelines, CampaignMode, CampaignStatus
from app.labeling.models import Completion, CompletionSource, Prompt, Task, TaskCompletion

_serial = itertools.count(1)


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def make_campaign(db: Session, **fields: Any) -> Campaign:
    n = next(_serial)
    values: dict[str, Any] = {
        "slug": f"campaign-{n}",
        "name": f"Campaign {n}",
        "k": 4,
        "mode": CampaignMode.rank,
        "overlap": 2,
        "status": CampaignStatus.active,
        "guidelines_md": "Prefer the **helpful** answer.",
        "lease_minutes": 30,
    }
    values.update(fields)
    campaign = Campaign(**values)
    db.add(campaign)
    db.flush()
    db.add(
        CampaignGuidelines(campaign_id=campaign.id, version=1, guidelines_md=campaign.guidelines_md)
    )
    db.flush()
    return campaign


def make_task(
    db: Session,
    campaign: Campaign,
    *,
    completions: list[str] | None = None,
    prompt: str | None = None,
    messages: list[dict[str, str]] | None = None,
    priority: int = 0,
    is_gold: bool = False,
    gold_ranking_positions: list[list[int]] | None = None,
) -> Task:
    n = next(_serial)
    if completions is None:
        count = 0 if campaign.mode is CampaignMode.demonstration else campaign.k
        completions = [f"Completion {i} of task {n}" for i in range(count)]
    text = prompt if prompt is not None or messages is not None else f"Prompt number {n}?"
    row = Prompt(
        campaign_id=campaign.id,
        text=text,
        messages=messages,
        content_hash=sha(f"{text}{messages}{n}"),
    )
    db.add(row)
    db.flush()
    made = [
        Completion(
            prompt_id=row.id, text=body, source=CompletionSource.imported, content_hash=sha(body)
        )
        for body in completions
    ]
    db.add_all(made)
    db.flush()
    task = Task(
        campaign_id=campaign.id,
        prompt_id=row.id,
        priority=priority,
        required_judgments=campaign.overlap,
        is_gold=is_gold,
        gold_ranking=(
            [[made[i].id for i in tier] for tier in gold_ranking_positions]
            if gold_ranking_positions
            else None
        ),
    )
    db.add(task)
    db.flush()
    db.add_all(
        TaskCompletion(task_id=task.id, position=i, completion_id=c.id) for i, c in enumerate(made)
    )
    db.flush()
    db.refresh(task)
    return task


def make_labeler(db: Session, username: str | None = None) -> User:
    name = username or f"labeler-{next(_serial)}"
    return auth_service.create_user(db, username=name, role=Role.labeler, password=None)
