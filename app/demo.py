"""`prefloop demo`: demo accounts and a small campaign written for the demo.

The sample (`demo_sample.jsonl`) uses the import format `{"prompt" | "messages", "completions"}`:
prompts with completions of clearly different quality, a multi-turn chat, code, and one
completion that tries to run a script (it must show as text).
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.auth import service as auth_service
from app.auth.models import Role
from app.campaigns.models import Campaign, CampaignGuidelines, CampaignMode
from app.labeling.models import Completion, CompletionSource, Prompt, Task, TaskCompletion

SAMPLE_PATH = Path(__file__).with_name("demo_sample.jsonl")
DEMO_SLUG = "demo-helpfulness"
DEMO_ACCOUNTS = [
    ("admin", Role.admin),
    ("alice", Role.labeler),
    ("bob", Role.labeler),
    ("rita", Role.researcher),
]
DEMO_GUIDELINES = """\
# Rank by helpfulness, then honesty, then harmlessness

1. **Helpful**: does it answer what was asked, completely and clearly?
2. **Honest**: is everything it says true? A confident wrong answer ranks below a short right one.
3. **Harmless**: would following it put someone at risk? Safety advice beats a "helpful" hazard.

Tie two answers only when you truly cannot choose. Flag anything harmful or unreadable.
"""


def _new_password() -> str:
    return secrets.token_urlsafe(12)


def reset_demo_accounts(session: Session) -> list[tuple[str, str, str]]:
    """Create the demo accounts, or give existing ones fresh passwords. Returns (name, role, password)."""
    accounts = []
    for username, role in DEMO_ACCOUNTS:
        password = _new_password()
        user = auth_service.get_user_by_username(session, username)
        if user is None:
            user = auth_service.create_user(
                session, username=username, role=role, password=password
            )
        else:
            auth_service.set_password(session, user, password, actor_id=None)  # ends its sessions
            if not user.is_active:
                auth_service.set_active(session, user, True, actor_id=None, reason="demo reset")
        accounts.append((username, user.role.value, password))
    return accounts


def content_hash(value: Any) -> str:
    return hashlib.sha256(
        json.dumps(value, sort_keys=True, ensure_ascii=False).encode()
    ).hexdigest()


def seed_demo_campaign(session: Session) -> tuple[Campaign, bool]:
    """Create the demo campaign with one task per sample prompt; (campaign, created)."""
    existing = session.scalar(select(Campaign).where(Campaign.slug == DEMO_SLUG))
    if existing is not None:
        return existing, False
    campaign = Campaign(
        slug=DEMO_SLUG,
        name="Demo: helpful, honest, harmless",
        description="Rank four answers per prompt. Written for the prefloop demo.",
        guidelines_md=DEMO_GUIDELINES,
        k=4,
        mode=CampaignMode.rank,
        overlap=2,
        gold_rate=0.0,
        lease_minutes=30,
        allow_ties=True,
    )
    session.add(campaign)
    session.flush()
    session.add(
        CampaignGuidelines(campaign_id=campaign.id, version=1, guidelines_md=DEMO_GUIDELINES)
    )
    rng = random.Random(0)  # noqa: S311  (shuffling demo data, not security)
    for line in SAMPLE_PATH.read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        content = item.get("messages") or item["prompt"]
        prompt = Prompt(
            campaign_id=campaign.id,
            external_id=item.get("id"),
            text=item.get("prompt"),
            messages=item.get("messages"),
            content_hash=content_hash(content),
            meta={"source": "prefloop demo"},
        )
        session.add(prompt)
        session.flush()
        completions = [
            Completion(
                prompt_id=prompt.id,
                text=text,
                source=CompletionSource.imported,
                content_hash=content_hash(text),
            )
            for text in item["completions"]
        ]
        session.add_all(completions)
        session.flush()
        # The sample lists the best answer first; the stored task order must not give that away.
        rng.shuffle(completions)
        task = Task(
            campaign_id=campaign.id, prompt_id=prompt.id, required_judgments=campaign.overlap
        )
        task.items = [
            TaskCompletion(position=i, completion_id=c.id) for i, c in enumerate(completions)
        ]
        session.add(task)
    session.flush()
    audit.record(
        session,
        actor_id=None,
        action="campaign.create",
        entity_type="campaign",
        entity_id=campaign.id,
        after={"slug": DEMO_SLUG},
        reason="prefloop demo",
    )
    return campaign, True
