"""Self-consistency: how often a labeler agrees with themselves on a task served twice.

A campaign with a `recheck_rate` re-serves a share of each labeler's own past tasks in a new
order (see app.labeling.service). Each answer to such a re-check is stored as a judgment
pointing at the one it repeats (`recheck_of_id`); here both rankings are compared with the
same pairwise agreement the campaign's agreement uses (a tie against a strict order counts
half), and averaged per labeler.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from app.labeling.models import Judgment
from app.quality.metrics import pairwise_agreement


@dataclass(frozen=True)
class SelfConsistency:
    """One labeler's re-checks: how many, and their mean agreement with the first answers."""

    rechecks: int
    agreement: float  # 0..1; nan when no re-check could be compared


def self_consistency(
    db: Session,
    campaign_id: int,
    *,
    labeler_ids: Iterable[int] | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> dict[int, SelfConsistency]:
    """Per labeler id: their re-checks in the campaign and the mean pairwise agreement of
    each with the judgment it repeats. `since` (inclusive) and `until` (exclusive) filter on
    when the re-check was answered. Labelers without re-checks are left out. One query."""
    original = aliased(Judgment)
    query = (
        select(Judgment.user_id, Judgment.ranking, original.ranking)
        .join(original, original.id == Judgment.recheck_of_id)
        .where(Judgment.campaign_id == campaign_id, Judgment.recheck_of_id.is_not(None))
    )
    if labeler_ids is not None:
        query = query.where(Judgment.user_id.in_(list(labeler_ids)))
    if since is not None:
        query = query.where(Judgment.created_at >= since)
    if until is not None:
        query = query.where(Judgment.created_at < until)
    scores: dict[int, list[float]] = defaultdict(list)
    for user_id, again, first in db.execute(query):
        scores[user_id].append(pairwise_agreement(again, first) if again and first else math.nan)
    result = {}
    for user_id, values in scores.items():
        defined = [value for value in values if not math.isnan(value)]
        mean = sum(defined) / len(defined) if defined else math.nan
        result[user_id] = SelfConsistency(rechecks=len(values), agreement=mean)
    return result
