"""`prefloop demo`: demo accounts and a small campaign written for the demo.

The sample (`demo_sample.jsonl`) uses the import format `{"prompt" | "messages", "completions"}`:
prompts with completions of clearly different quality, a multi-turn chat, code, and one
completion that tries to run a script (it must show as text).
"""

from __future__ import annotations

import io
import json
import random
import secrets
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.auth import service as auth_service
from app.auth.models import Role
from app.campaigns.models import Campaign, CampaignGuidelines, CampaignMode
from app.labeling.importer import import_stream

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


def seed_demo_campaign(session: Session) -> tuple[Campaign, bool]:
    """Create the demo campaign with one task per sample prompt; (campaign, created).

    The sample goes through the dataset importer, like any file an admin uploads.
    """
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
    audit.record(
        session,
        actor_id=None,
        action="campaign.create",
        entity_type="campaign",
        entity_id=campaign.id,
        after={"slug": DEMO_SLUG},
        reason="prefloop demo",
    )
    import_stream(session, campaign, io.BytesIO(_demo_rows()), file_name=SAMPLE_PATH.name)
    return campaign, True


def _demo_rows() -> bytes:
    """The sample as import lines, each task's completions shuffled: the sample lists the
    best answer first, and the stored task order must not give that away."""
    rng = random.Random(0)  # noqa: S311  (shuffling demo data, not security)
    lines = []
    for line in SAMPLE_PATH.read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        rng.shuffle(item["completions"])
        item["metadata"] = {"source": "prefloop demo"}
        lines.append(json.dumps(item, ensure_ascii=False))
    return "\n".join(lines).encode()
