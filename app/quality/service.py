"""A campaign's label quality: agreement figures and per-labeler statistics, from the database.

Reads current (non-superseded) judgments with a ranking, filtered by date range and
labelers, and hands them to the pure functions in `app.quality.metrics`. Works the same on
PostgreSQL and SQLite: the queries are plain selects, the arithmetic is Python.
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.auth.models import User
from app.campaigns.models import Campaign
from app.labeling.models import (
    Assignment,
    AssignmentState,
    Completion,
    Judgment,
    Task,
    TaskStatus,
)
from app.quality import metrics
from app.quality.metrics import Vote

# InstructGPT (Ouyang et al. 2022, appendix B.4): labelers agreed with each other on
# 72.6 +/- 1.5 % of comparisons.
INSTRUCTGPT_AGREEMENT = (0.726, 0.015)
# Krippendorff's alpha and Fleiss' kappa need the whole matrix per resample; above this many
# tasks their intervals are left out (the point estimates are still given).
HEAVY_INTERVAL_MAX_TASKS = 2_000


@dataclass(frozen=True)
class Filters:
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    labeler_ids: frozenset[int] = field(default_factory=frozenset)


@dataclass(frozen=True)
class JudgmentRow:
    id: int
    task_id: int
    user_id: int
    ranking: list[list[int]]
    display_order: list[int]
    flags: dict[str, list[str]]
    time_on_task_ms: int
    created_at: dt.datetime
    is_gold: bool
    gold_ranking: list[list[int]] | None


def load_judgments(db: Session, campaign: Campaign, filters: Filters) -> list[JudgmentRow]:
    """Current judgments with a ranking, in id order."""
    query = (
        select(
            Judgment.id,
            Judgment.task_id,
            Judgment.user_id,
            Judgment.ranking,
            Judgment.display_order,
            Judgment.flags,
            Judgment.time_on_task_ms,
            Judgment.created_at,
            Task.is_gold,
            Task.gold_ranking,
        )
        .join(Task, Task.id == Judgment.task_id)
        .where(
            Judgment.campaign_id == campaign.id,
            Judgment.is_current.is_(True),
            Judgment.ranking.is_not(None),
        )
        .order_by(Judgment.id)
    )
    if filters.since is not None:
        query = query.where(Judgment.created_at >= filters.since)
    if filters.until is not None:
        query = query.where(Judgment.created_at < filters.until)
    if filters.labeler_ids:
        query = query.where(Judgment.user_id.in_(filters.labeler_ids))
    return [JudgmentRow(*row) for row in db.execute(query)]


def _interval(low_high: tuple[float, float]) -> list[float | None]:
    return [None if math.isnan(x) else round(x, 4) for x in low_high]


def _value(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 4)


def campaign_agreement(
    rows: list[JudgmentRow], *, resamples: int = 200, seed: int = 0
) -> dict[str, Any]:
    """Agreement between labelers on the non-gold tasks judged more than once."""
    by_task: dict[int, list[Vote]] = defaultdict(list)
    for row in rows:
        if not row.is_gold:
            by_task[row.task_id].append(Vote(row.task_id, row.user_id, row.ranking))
    shared = [votes for votes in by_task.values() if len(votes) >= 2]
    # Per-task scores once; a resample averages them (a task drawn twice counts twice).
    agreement = [metrics.mean_pairwise_agreement(votes) for votes in shared]
    tau = [metrics.mean_kendall_tau(votes) for votes in shared]

    def mean_of(values: list[float]) -> float:
        finite = [v for v in values if not math.isnan(v)]
        return sum(finite) / len(finite) if finite else math.nan

    indexes = list(range(len(shared)))

    def resampled(scores: list[float]):
        return lambda sample: mean_of([scores[i] for i in sample])

    # Krippendorff's alpha and Fleiss' kappa need the whole sample at once: build each
    # task's share of the matrix and of the table once, and let a resample stack them.
    heavy = len(shared) <= HEAVY_INTERVAL_MAX_TASKS
    everything = [v for votes in shared for v in votes]
    labelers = sorted({v.labeler for v in everything}, key=str)
    blocks = [metrics.rank_matrix(votes, labelers) for votes in shared]
    task_counts = [list(metrics.pair_choice_counts(votes).values()) for votes in shared]
    raters = metrics.modal_raters(c for counts in task_counts for c in counts)
    table_rows = [
        np.array([c for c in counts if sum(c) == raters], dtype=int).reshape(-1, 3)
        for counts in task_counts
    ]

    def alpha_of(sample: list[int]) -> float:
        if not sample:
            return math.nan
        return metrics.alpha_from_matrix(np.hstack([blocks[i] for i in sample]))

    def kappa_of(sample: list[int]) -> float:
        if not sample:
            return math.nan
        return metrics.kappa_from_table(np.vstack([table_rows[i] for i in sample]))

    alpha = alpha_of(indexes)
    kappa = kappa_of(indexes)
    return {
        "tasks_compared": len(shared),
        "judgments": len(rows),
        "labelers": len({r.user_id for r in rows}),
        "pairwise_agreement": {
            "value": _value(mean_of(agreement)),
            "interval": _interval(
                metrics.bootstrap_interval(
                    indexes, resampled(agreement), resamples=resamples, seed=seed
                )
            ),
            "reference": {"instructgpt": INSTRUCTGPT_AGREEMENT[0], "plus_minus": 0.015},
        },
        "kendall_tau": {
            "value": _value(mean_of(tau)),
            "interval": _interval(
                metrics.bootstrap_interval(indexes, resampled(tau), resamples=resamples, seed=seed)
            ),
        },
        "krippendorff_alpha": {
            "value": _value(alpha),
            "interval": _interval(
                metrics.bootstrap_interval(indexes, alpha_of, resamples=resamples, seed=seed)
            )
            if heavy
            else None,
        },
        "fleiss_kappa": {
            "value": _value(kappa),
            "interval": _interval(
                metrics.bootstrap_interval(indexes, kappa_of, resamples=resamples, seed=seed)
            )
            if heavy
            else None,
        },
    }


def _lengths(db: Session, rows: list[JudgmentRow]) -> dict[int, int]:
    ids = {cid for row in rows for tier in row.ranking for cid in tier}
    lengths: dict[int, int] = {}
    id_list = sorted(ids)
    for start in range(0, len(id_list), 5_000):  # keep IN lists a sane size
        chunk = id_list[start : start + 5_000]
        lengths.update(
            db.execute(
                select(Completion.id, func.length(Completion.text)).where(Completion.id.in_(chunk))
            )
            .tuples()
            .all()
        )
    return lengths


def _longer_wins(ranking: list[list[int]], lengths: dict[int, int]) -> tuple[int, int]:
    """(strict pairs where the longer completion won, strict pairs of different lengths)."""
    wins = total = 0
    for (a, b), preference in metrics.pair_preferences(ranking).items():
        if preference == 0.5 or lengths.get(a) == lengths.get(b):
            continue
        total += 1
        winner = a if preference == 1.0 else b
        loser = b if winner == a else a
        wins += lengths.get(winner, 0) > lengths.get(loser, 0)
    return wins, total


def labeler_stats(db: Session, campaign: Campaign, rows: list[JudgmentRow]) -> list[dict[str, Any]]:
    """One row per labeler: volume, speed, agreement with the others, gold accuracy, biases."""
    by_task: dict[int, list[JudgmentRow]] = defaultdict(list)
    for row in rows:
        by_task[row.task_id].append(row)
    lengths = _lengths(db, rows)
    campaign_long = [_longer_wins(r.ranking, lengths) for r in rows]
    campaign_long_rate = (
        sum(w for w, _ in campaign_long) / sum(t for _, t in campaign_long)
        if sum(t for _, t in campaign_long)
        else math.nan
    )
    skips = dict(
        db.execute(
            select(Assignment.user_id, func.count())
            .join(Task, Task.id == Assignment.task_id)
            .where(Task.campaign_id == campaign.id, Assignment.state == AssignmentState.skipped)
            .group_by(Assignment.user_id)
        )
        .tuples()
        .all()
    )
    names = dict(
        db.execute(select(User.id, User.username).where(User.id.in_({r.user_id for r in rows})))
        .tuples()
        .all()
    )
    mine: dict[int, list[JudgmentRow]] = defaultdict(list)
    for row in rows:
        mine[row.user_id].append(row)

    table = []
    for user_id, own in sorted(mine.items(), key=lambda item: names.get(item[0], "")):
        loo = []
        for row in own:
            others = [o.ranking for o in by_task[row.task_id] if o.user_id != user_id]
            if others and not row.is_gold:
                loo.append(
                    metrics.pairwise_agreement(row.ranking, metrics.consensus(others).ranking)
                )
        gold = [
            metrics.pairwise_agreement(row.ranking, row.gold_ranking)
            for row in own
            if row.is_gold and row.gold_ranking
        ]
        long = [_longer_wins(r.ranking, lengths) for r in own]
        long_total = sum(t for _, t in long)
        bias = metrics.position_bias((r.display_order, r.ranking) for r in own)
        ties = sum(any(len(tier) > 1 for tier in r.ranking) for r in own)
        flagged = sum(bool(r.flags) for r in own)
        skipped = skips.get(user_id, 0)
        table.append(
            {
                "labeler_id": user_id,
                "username": names.get(user_id, str(user_id)),
                "judgments": len(own),
                "median_seconds": round(
                    statistics.median(r.time_on_task_ms for r in own) / 1000, 1
                ),
                "agreement_with_others": _value(sum(loo) / len(loo)) if loo else None,
                "gold_accuracy": _value(sum(gold) / len(gold)) if gold else None,
                "gold_judgments": len(gold),
                "tie_rate": _value(ties / len(own)),
                "skip_rate": _value(skipped / (skipped + len(own))),
                "flag_rate": _value(flagged / len(own)),
                "position_bias": {
                    "rate": _value(bias.rate),
                    "chance": _value(bias.chance),
                    "p_value": _value(bias.p_value),
                    "flagged": bias.flagged,
                },
                "length_bias": {
                    "longer_wins": _value(sum(w for w, _ in long) / long_total)
                    if long_total
                    else None,
                    "campaign_rate": _value(campaign_long_rate),
                },
            }
        )
    return table


def quality_report(
    db: Session, campaign: Campaign, filters: Filters | None = None, *, resamples: int = 200
) -> dict[str, Any]:
    """Everything the dashboard and the JSON endpoint show for one campaign."""
    filters = filters or Filters()
    rows = load_judgments(db, campaign, filters)
    return {
        "campaign": campaign.slug,
        "filters": {
            "since": filters.since.isoformat() if filters.since else None,
            "until": filters.until.isoformat() if filters.until else None,
            "labeler_ids": sorted(filters.labeler_ids),
        },
        "agreement": campaign_agreement(rows, resamples=resamples),
        "labelers": labeler_stats(db, campaign, rows),
    }


# --- disagreement review ----------------------------------------------------------------


@dataclass(frozen=True)
class Disagreement:
    task: Task
    agreement: float  # mean pairwise agreement between the task's labelers
    judgments: list[JudgmentRow]
    consensus: metrics.Consensus


def disagreements(db: Session, campaign: Campaign, *, limit: int = 50) -> list[Disagreement]:
    """Non-gold tasks judged twice or more, lowest agreement first."""
    by_task: dict[int, list[JudgmentRow]] = defaultdict(list)
    for row in load_judgments(db, campaign, Filters()):
        if not row.is_gold:
            by_task[row.task_id].append(row)
    scored = []
    for task_id, rows in by_task.items():
        if len(rows) < 2:
            continue
        votes = [Vote(task_id, r.user_id, r.ranking) for r in rows]
        scored.append((metrics.mean_pairwise_agreement(votes), task_id, rows))
    scored.sort(key=lambda item: (item[0], item[1]))
    tasks = {
        t.id: t
        for t in db.scalars(select(Task).where(Task.id.in_([tid for _, tid, _ in scored[:limit]])))
    }
    return [
        Disagreement(tasks[tid], score, rows, metrics.consensus([r.ranking for r in rows]))
        for score, tid, rows in scored[:limit]
    ]


def send_back(db: Session, *, task: Task, actor_id: int, extra: int = 1) -> Task:
    """Ask for `extra` more judgments on a task (it reopens)."""
    before = {"required_judgments": task.required_judgments, "status": task.status.value}
    task.required_judgments += extra
    if task.status is TaskStatus.complete:
        task.status = TaskStatus.open
    db.flush()
    audit.record(
        db,
        actor_id=actor_id,
        action="task.send_back",
        entity_type="task",
        entity_id=task.id,
        before=before,
        after={"required_judgments": task.required_judgments, "status": task.status.value},
    )
    return task


def set_gold(db: Session, *, task: Task, actor_id: int, ranking: list[list[int]] | None) -> Task:
    """Make a task gold with this known ranking, or (ranking None) a regular task again."""
    before = {"is_gold": task.is_gold, "gold_ranking": task.gold_ranking}
    task.is_gold = ranking is not None
    task.gold_ranking = ranking
    db.flush()
    audit.record(
        db,
        actor_id=actor_id,
        action="task.gold" if ranking is not None else "task.ungold",
        entity_type="task",
        entity_id=task.id,
        before=before,
        after={"is_gold": task.is_gold, "gold_ranking": task.gold_ranking},
    )
    return task
