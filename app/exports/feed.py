"""The comparisons feed: a campaign's active comparisons after a cursor, for the trainer.

`GET /api/v1/campaigns/{slug}/comparisons?since=<id>&limit=<n>` answers the comparisons with
an id above `since`, in id order, and `next_since`, the cursor for the next call. A client
that keeps calling with the `next_since` it got sees every comparison exactly once:

- **Only what counts:** active comparisons (not of a superseded judgment) of current
  judgments, leaving out labelers an admin excluded (`not_excluded`). The feed only
  appends: a comparison deactivated (its judgment edited) or excluded *after* it was served
  is not taken back, and lifting an exclusion does not replay what was skipped meanwhile.
  A trainer that needs exactly today's data reads a snapshot instead.
- **Ids are handed out in order, but not committed in order.** On SQLite every transaction
  takes the write lock (`BEGIN IMMEDIATE`), so rows commit in id order and the feed serves
  everything it sees. On PostgreSQL a sequence value is taken at INSERT time, so a
  transaction that took id 100 can commit after one that took id 101: a cursor that moved
  to 101 would skip 100 for ever. The feed therefore holds back every comparison created
  after the start of the oldest transaction still open on the database (minus a settle
  window, `SETTLE`, that absorbs clock skew between the app servers and the database, and
  the moment between a writer stamping `created_at` and taking its id), and it stops at the
  first comparison it holds back, so the cursor never passes one. An open transaction may
  hold an id below every row created after it began, and nothing older; once it ends, the
  held rows are served. The cost: the feed lags by the length of the longest open
  transaction (labeling submits are milliseconds; an import or a large export build holds it
  back until it commits).
- **Limits of that guarantee.** It trusts `created_at` to be the writer's clock (every
  writer in `app/` stamps rows with the current time) and clocks to agree within `SETTLE`;
  and PostgreSQL only shows another role's `xact_start` to superusers and members of
  `pg_read_all_stats`, so every process that writes comparisons must connect as the same
  role as the web app (the usual deployment), or that role needs `pg_read_all_stats`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from sqlalchemy import or_, select, text
from sqlalchemy.orm import Session, aliased

from app.campaigns.models import Campaign
from app.labeling.models import Comparison, Completion, Judgment, Prompt
from app.quality.service import not_excluded

MAX_LIMIT = 10_000
DEFAULT_LIMIT = 1_000
# Rows stamped later than (start of the oldest open transaction - SETTLE) are held back.
SETTLE = dt.timedelta(seconds=5)


def annotator_pseudonym(secret_key: str, user_id: int | None) -> str | None:
    """A stable pseudonym for a labeler: an HMAC of the user id under the server's secret key,
    truncated; never the username. It is the annotator id of snapshots exported with
    `pseudonyms=stable` (`app.exports.query.Context.pseudonym`), so feed and snapshots join."""
    if user_id is None:
        return None
    digest = hmac.new(secret_key.encode(), f"stable:{user_id}".encode(), hashlib.sha256)
    return "s-" + digest.hexdigest()[:12]


@dataclass(frozen=True)
class FeedPage:
    comparisons: list[dict[str, Any]]
    next_since: int
    has_more: bool
    # Newer comparisons exist but wait for an older open transaction (PostgreSQL).
    held_back: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "comparisons": self.comparisons,
            "next_since": self.next_since,
            "has_more": self.has_more,
            "held_back": self.held_back,
        }


def settled_before(db: Session, settle: dt.timedelta = SETTLE) -> dt.datetime | None:
    """On PostgreSQL: rows stamped at or after this time may still have an older id in an
    open transaction, so they wait. None when nothing needs to wait (SQLite, or no other
    transaction is open on this database)."""
    if db.get_bind().dialect.name != "postgresql":
        return None
    # pg_stat_activity is read once per transaction and cached; read it afresh.
    db.execute(text("SELECT pg_stat_clear_snapshot()"))
    oldest = db.scalar(
        text(
            "SELECT min(xact_start) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND xact_start IS NOT NULL"
        )
    )
    return oldest - settle if oldest is not None else None


def comparisons_since(
    db: Session,
    campaign: Campaign,
    *,
    since: int,
    limit: int,
    secret_key: str,
    include_text: bool = False,
    settle: dt.timedelta = SETTLE,
) -> FeedPage:
    """One page of the feed (see the module docstring for what is served and when)."""
    horizon = settled_before(db, settle)
    columns: list[Any] = [
        Comparison.id,
        Comparison.prompt_id,
        Comparison.chosen_id,
        Comparison.rejected_id,
        Comparison.is_tie,
        Comparison.margin,
        Comparison.source,
        Comparison.user_id,
        Comparison.judgment_id,
        Comparison.created_at,
    ]
    query = (
        select(*columns)
        .outerjoin(Judgment, Judgment.id == Comparison.judgment_id)
        .where(
            Comparison.campaign_id == campaign.id,
            Comparison.id > since,
            Comparison.is_active.is_(True),
            or_(Comparison.judgment_id.is_(None), Judgment.is_current.is_(True)),
            not_excluded(Comparison.user_id, Comparison.campaign_id),
        )
        .order_by(Comparison.id)
        .limit(limit + 1)
    )
    if include_text:
        chosen, rejected = aliased(Completion), aliased(Completion)
        query = (
            query.add_columns(Prompt.text, Prompt.messages, chosen.text, rejected.text)
            .join(Prompt, Prompt.id == Comparison.prompt_id)
            .join(chosen, chosen.id == Comparison.chosen_id)
            .join(rejected, rejected.id == Comparison.rejected_id)
        )
    rows = db.execute(query).all()
    served: list[dict[str, Any]] = []
    held_back = False
    for row in rows[:limit]:
        if horizon is not None and row.created_at >= horizon:
            held_back = True  # and everything after it: the cursor must not pass it
            break
        item: dict[str, Any] = {
            "id": row.id,
            "prompt_id": row.prompt_id,
            "chosen_id": row.chosen_id,
            "rejected_id": row.rejected_id,
            "is_tie": row.is_tie,
            "margin": row.margin,
            "source": row.source.value,
            "annotator": annotator_pseudonym(secret_key, row.user_id),
            "judgment_id": row.judgment_id,
            "created_at": row.created_at.isoformat(),
        }
        if include_text:
            prompt_text, messages, chosen_text, rejected_text = row[len(columns) :]
            item["prompt"] = messages if messages else prompt_text
            item["chosen"] = chosen_text
            item["rejected"] = rejected_text
        served.append(item)
    return FeedPage(
        comparisons=served,
        next_since=served[-1]["id"] if served else since,
        has_more=not held_back and len(rows) > limit,
        held_back=held_back,
    )
