"""A campaign's label quality: agreement figures and per-labeler statistics, from the database.

Reads current (non-superseded) judgments with a ranking, filtered by date range and
labelers, leaving out labelers an admin excluded, and computes the figures with
`app.quality.batch` (the same numbers as `app.quality.metrics`, as arrays). Works the same on
PostgreSQL and SQLite: the queries are plain selects, the arithmetic is numpy.

Large campaigns take seconds to compute, so the views read a stored report
(`quality_reports`): fresh when its stamp (the newest judgment, exclusion and task decision)
still matches, otherwise shown as stale while a background thread computes a new one.

Admin decisions live here too, each audited and reversible: excluding a labeler, sending a
task back, making it gold, recording its consensus.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import ColumnElement, Text, cast, exists, func, or_, select
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.audit.models import AuditEvent
from app.auth.models import User
from app.campaigns.models import Campaign
from app.db import utcnow
from app.labeling.models import (
    Assignment,
    AssignmentState,
    Completion,
    Judgment,
    Task,
    TaskCompletion,
    TaskStatus,
)
from app.quality import batch, metrics, trends
from app.quality.consistency import self_consistency
from app.quality.models import LabelerExclusion, QualityReport

log = logging.getLogger("prefloop.quality")

# InstructGPT (Ouyang et al. 2022, appendix B.4): labelers agreed with each other on
# 72.6 +/- 1.5 % of comparisons.
INSTRUCTGPT_AGREEMENT = (0.726, 0.015)
# The disagreement queue reads the report's lowest-agreement tasks; this many are kept.
LOWEST_AGREEMENT_KEPT = 200
# Up to this many judgments a stale report is recomputed in the request (well under a
# second); above it, the stale one is shown while a background thread computes.
INLINE_MAX_JUDGMENTS = 5_000


class QualityError(Exception):
    status_code = 400


class NotFound(QualityError):
    status_code = 404


class Conflict(QualityError):
    status_code = 409


class Invalid(QualityError):
    status_code = 422


@dataclass(frozen=True)
class Filters:
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    labeler_ids: frozenset[int] = field(default_factory=frozenset)
    # Excluded labelers' judgments are left out unless asked for.
    include_excluded: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "labeler_ids": sorted(self.labeler_ids),
            "include_excluded": self.include_excluded,
        }

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.as_json(), sort_keys=True).encode()).hexdigest()


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


def not_excluded(user_id: Any, campaign_id: Any) -> ColumnElement[bool]:
    """SQL: no unrevoked exclusion covers this labeler in this campaign. Exports and the
    trainer read comparisons through it, so an exclusion (and its undo) applies at once."""
    return ~exists().where(
        LabelerExclusion.user_id == user_id,
        LabelerExclusion.revoked_at.is_(None),
        or_(LabelerExclusion.campaign_id.is_(None), LabelerExclusion.campaign_id == campaign_id),
    )


def _judgment_columns() -> tuple[Any, ...]:
    # JSON columns come back as text and are parsed together (`_parse_rows`): one json.loads
    # of a joined string is many times faster than the driver decoding 400,000 small ones.
    return (
        Judgment.id,
        Judgment.task_id,
        Judgment.user_id,
        cast(Judgment.ranking, Text),
        cast(Judgment.display_order, Text),
        cast(Judgment.flags, Text),
        Judgment.time_on_task_ms,
        Judgment.created_at,
        Task.is_gold,
        cast(Task.gold_ranking, Text),
    )


def _parse_rows(rows: Sequence[Any]) -> list[JudgmentRow]:
    texts = ",".join(f"[{r[3]},{r[4]},{r[5]},{r[9] if r[9] is not None else 'null'}]" for r in rows)
    parsed = json.loads(f"[{texts}]")
    return [
        JudgmentRow(r[0], r[1], r[2], ranking, shown, flags, r[6], r[7], r[8], gold)
        for r, (ranking, shown, flags, gold) in zip(rows, parsed, strict=True)
    ]


def load_judgments(db: Session, campaign: Campaign, filters: Filters) -> list[JudgmentRow]:
    """Current judgments with a ranking, in id order."""
    query = (
        select(*_judgment_columns())
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
    if not filters.include_excluded:
        query = query.where(not_excluded(Judgment.user_id, Judgment.campaign_id))
    return _parse_rows(db.execute(query).all())


def _value(x: float) -> float | None:
    return batch.finite_or_none(x)


def _interval(low_high: tuple[float, float]) -> list[float | None]:
    return [batch.finite_or_none(x) for x in low_high]


def arrays(rows: list[JudgmentRow]) -> batch.Judged:
    return batch.build(
        [r.task_id for r in rows],
        [r.ranking for r in rows],
        [r.display_order for r in rows],
        {r.task_id: r.gold_ranking for r in rows if r.is_gold},
    )


@dataclass(frozen=True)
class TaskAgreement:
    """Per task: the mean agreement of every two labelers who judged it (non-gold tasks)."""

    judged: batch.Judged
    regular: np.ndarray  # judgment indexes on non-gold tasks
    agreement: np.ndarray  # (T,) nan where fewer than two judged
    tau: np.ndarray  # (T,)
    shared: np.ndarray  # indexes of the tasks judged twice or more


def task_agreement(judged: batch.Judged) -> TaskAgreement:
    regular = np.flatnonzero(~judged.is_gold[judged.task])
    first, second = batch.same_task_pairs(judged.task, regular)
    pair_task = judged.task[first]
    tasks = len(judged.task_ids)
    return TaskAgreement(
        judged=judged,
        regular=regular,
        agreement=batch.per_group_mean(
            batch.agreement(judged.pref[first], judged.pref[second]), pair_task, tasks
        ),
        tau=batch.per_group_mean(
            batch.kendall_tau(judged.pref[first], judged.pref[second]), pair_task, tasks
        ),
        shared=np.unique(pair_task),
    )


def campaign_agreement(
    rows: list[JudgmentRow],
    *,
    resamples: int = 200,
    seed: int = 0,
    tasks: TaskAgreement | None = None,
) -> dict[str, Any]:
    """Agreement between labelers on the non-gold tasks judged more than once, each figure
    with a bootstrap 95 % interval that resamples those tasks."""
    per_task = tasks or task_agreement(arrays(rows))
    judged, shared = per_task.judged, per_task.shared
    weights = (
        batch.resample_weights(len(shared), resamples, seed) if len(shared) else np.zeros((0, 0))
    )

    def mean_figure(values: np.ndarray) -> dict[str, Any]:
        blocks = batch.mean_blocks(values[shared])
        return {
            "value": _value(batch.mean_of_blocks(blocks.sum(axis=0))) if len(shared) else None,
            "interval": _interval(batch.interval(weights, blocks, batch.mean_of_blocks)),
        }

    counts = batch.value_counts(judged, per_task.regular)
    coincidences = batch.coincidence_blocks(counts, judged.k)[shared]
    choices = batch.choice_counts(judged, per_task.regular)
    raters = batch.modal_raters(choices)
    if raters is not None:
        kappa_blocks, table = batch.kappa_blocks(choices, raters)
        kappa_value = batch.kappa_reference(table)
        kappa_interval = batch.interval(
            weights, kappa_blocks[shared], lambda sums: batch.kappa_from_blocks(sums, raters)
        )
    else:
        kappa_value, kappa_interval = math.nan, (math.nan, math.nan)
    return {
        "tasks_compared": len(shared),
        "judgments": len(rows),
        "labelers": len({r.user_id for r in rows}),
        "pairwise_agreement": {
            **mean_figure(per_task.agreement),
            "reference": {"instructgpt": INSTRUCTGPT_AGREEMENT[0], "plus_minus": 0.015},
        },
        "kendall_tau": mean_figure(per_task.tau),
        "krippendorff_alpha": {
            "value": _value(batch.alpha_reference(counts, judged.k)),
            "interval": _interval(
                batch.interval(weights, coincidences, batch.alpha_from_coincidences)
            ),
        },
        "fleiss_kappa": {
            "value": _value(kappa_value),
            "interval": _interval(kappa_interval),
            "raters_per_pair": raters,
        },
    }


def _lengths(db: Session, campaign: Campaign, judged: batch.Judged) -> np.ndarray:
    """(T, K) character length of each task's completions (0 where a task has fewer)."""
    rows = db.execute(
        select(Completion.id, func.length(Completion.text))
        .join(TaskCompletion, TaskCompletion.completion_id == Completion.id)
        .join(Task, Task.id == TaskCompletion.task_id)
        .where(Task.campaign_id == campaign.id)
    ).all()
    found = np.fromiter(
        (value for row in rows for value in row), dtype=np.int64, count=2 * len(rows)
    ).reshape(-1, 2)
    found = found[np.argsort(found[:, 0], kind="stable")]
    wanted = judged.completion_ids
    at = np.clip(np.searchsorted(found[:, 0], wanted), 0, max(len(found) - 1, 0))
    if len(found) == 0:
        return np.zeros_like(wanted)
    return np.where((wanted >= 0) & (found[at, 0] == wanted), found[at, 1], 0)


def _leave_one_out_agreement(per_task: TaskAgreement) -> np.ndarray:
    """(J,) each regular judgment's agreement with the Bradley-Terry consensus of the other
    judgments of its task; nan for gold tasks and tasks nobody else judged."""
    judged = per_task.judged
    out = np.full(len(judged.task), np.nan)
    regular = per_task.regular
    if len(regular) == 0:
        return out
    own = batch.win_matrices(judged.pref[regular], judged.pair_a, judged.pair_b, judged.k)
    per_task_wins = np.zeros((len(judged.task_ids), judged.k, judged.k))
    np.add.at(per_task_wins, judged.task[regular], own)
    others = np.bincount(judged.task[regular], minlength=len(judged.task_ids))[judged.task[regular]]
    has_others = others >= 2
    chosen = regular[has_others]
    tasks = judged.task[chosen]
    strengths = batch.bradley_terry(per_task_wins[tasks] - own[has_others])
    present = judged.completion_ids[tasks] >= 0
    consensus = batch.preferences(
        batch.consensus_places(strengths, present), judged.pair_a, judged.pair_b
    )
    out[chosen] = batch.agreement(judged.pref[chosen], consensus)
    return out


def labeler_stats(
    db: Session,
    campaign: Campaign,
    rows: list[JudgmentRow],
    per_task: TaskAgreement | None = None,
    *,
    filters: Filters | None = None,
) -> list[dict[str, Any]]:
    """One row per labeler: volume, speed, agreement with the others, gold accuracy, biases,
    self-consistency, and whether an admin excluded them."""
    if not rows:
        return []
    filters = filters or Filters()
    per_task = per_task or task_agreement(arrays(rows))
    judged = per_task.judged
    user_ids = np.array([r.user_id for r in rows], dtype=np.int64)
    people, who = np.unique(user_ids, return_inverse=True)
    n_people = len(people)

    def per_person(values: np.ndarray) -> np.ndarray:
        return batch.per_group_mean(values.astype(float), who, n_people)

    def per_person_sum(values: np.ndarray) -> np.ndarray:
        return np.bincount(who, weights=values.astype(float), minlength=n_people)

    loo = _leave_one_out_agreement(per_task)
    gold_answer = judged.gold_pref[judged.task]
    on_gold = judged.is_gold[judged.task] & ~np.all(np.isnan(gold_answer), axis=1)
    gold = np.where(on_gold, batch.agreement(judged.pref, gold_answer), np.nan)

    ties = np.any(judged.pref == 0.5, axis=1)
    flagged = np.array([bool(r.flags) for r in rows])
    seconds = np.array([r.time_on_task_ms for r in rows], dtype=float) / 1000

    # Position bias: the completion shown first at the top (a tie at the top shares it).
    best = np.nanmin(np.where(np.isnan(judged.places), np.inf, judged.places), axis=1)
    at_top = judged.places == best[:, None]
    known = judged.first_shown >= 0
    first_place = judged.places[np.arange(len(rows)), np.maximum(judged.first_shown, 0)]
    hits = np.where(known & (first_place == best), 1.0 / np.maximum(at_top.sum(axis=1), 1), 0.0)
    chance = np.where(known, 1.0 / np.maximum(judged.shown_count, 1), 0.0)

    # Length bias: strict pairs of different lengths, and whether the longer one won.
    lengths = _lengths(db, campaign, judged)[judged.task]
    longer_a = lengths[:, judged.pair_a] > lengths[:, judged.pair_b]
    longer_b = lengths[:, judged.pair_b] > lengths[:, judged.pair_a]
    strict = (judged.pref == 1.0) | (judged.pref == 0.0)
    decided = strict & (longer_a | longer_b)
    longer_won = (judged.pref == 1.0) & longer_a | (judged.pref == 0.0) & longer_b
    long_wins, long_total = longer_won.sum(axis=1), decided.sum(axis=1)
    campaign_long_rate = long_wins.sum() / long_total.sum() if long_total.sum() else math.nan

    skips = dict(
        db.execute(
            select(Assignment.user_id, func.count())
            .join(Task, Task.id == Assignment.task_id)
            .where(
                Task.campaign_id == campaign.id,
                Assignment.state == AssignmentState.skipped,
                Assignment.is_recheck.is_(False),
                Assignment.user_id.in_(people.tolist()),
            )
            .group_by(Assignment.user_id)
        )
        .tuples()
        .all()
    )
    names = dict(
        db.execute(select(User.id, User.username).where(User.id.in_(people.tolist())))
        .tuples()
        .all()
    )
    excluded = excluded_labelers(db, campaign.id)
    consistency = self_consistency(
        db,
        campaign.id,
        labeler_ids=filters.labeler_ids or None,
        since=filters.since,
        until=filters.until,
    )

    judgments = np.bincount(who, minlength=n_people)
    agreement_with_others = per_person(loo)
    gold_accuracy = per_person(gold)
    gold_count = per_person_sum(~np.isnan(gold))
    tie_rate = per_person_sum(ties) / judgments
    flag_rate = per_person_sum(flagged) / judgments
    hit_sum, chance_sum, known_count = (
        per_person_sum(hits),
        per_person_sum(chance),
        per_person_sum(known),
    )
    wins_sum, total_sum = per_person_sum(long_wins), per_person_sum(long_total)
    table = []
    for i, user_id in enumerate(people.tolist()):
        count = int(known_count[i])
        bias = metrics.position_bias_from_counts(float(hit_sum[i]), count, float(chance_sum[i]))
        skipped = skips.get(user_id, 0)
        mine = consistency.get(user_id)
        table.append(
            {
                "labeler_id": user_id,
                "username": names.get(user_id, str(user_id)),
                "judgments": int(judgments[i]),
                "median_seconds": round(float(np.median(seconds[who == i])), 1),
                "agreement_with_others": _value(agreement_with_others[i]),
                "gold_accuracy": _value(gold_accuracy[i]),
                "gold_judgments": int(gold_count[i]),
                "tie_rate": _value(tie_rate[i]),
                "skip_rate": _value(skipped / (skipped + judgments[i])),
                "flag_rate": _value(flag_rate[i]),
                "position_bias": {
                    "rate": _value(bias.rate),
                    "chance": _value(bias.chance),
                    "p_value": _value(bias.p_value),
                    "flagged": bool(bias.flagged),
                },
                "length_bias": {
                    "longer_wins": _value(wins_sum[i] / total_sum[i]) if total_sum[i] else None,
                    "campaign_rate": _value(campaign_long_rate),
                },
                "self_consistency": {
                    "rechecks": mine.rechecks if mine else 0,
                    "agreement": _value(mine.agreement) if mine else None,
                },
                "excluded": excluded.get(user_id),
            }
        )
    table.sort(key=lambda row: row["username"])
    return table


def compute_report(
    db: Session, campaign: Campaign, filters: Filters | None = None, *, resamples: int = 200
) -> dict[str, Any]:
    """Everything the dashboard and the JSON endpoint show for one campaign, computed now."""
    filters = filters or Filters()
    rows = load_judgments(db, campaign, filters)
    per_task = task_agreement(arrays(rows))
    order = per_task.shared[np.argsort(per_task.agreement[per_task.shared], kind="stable")]
    matrix, trend = trends.matrix_and_trend(rows, _names(db, rows))
    return {
        "campaign": campaign.slug,
        "filters": filters.as_json(),
        "agreement": campaign_agreement(rows, resamples=resamples, tasks=per_task),
        "labelers": labeler_stats(db, campaign, rows, per_task, filters=filters),
        "matrix": matrix,
        "trend": trend,
        "lowest_agreement_tasks": [
            {
                "task_id": int(per_task.judged.task_ids[t]),
                "agreement": _value(per_task.agreement[t]),
            }
            for t in order[:LOWEST_AGREEMENT_KEPT]
        ],
    }


quality_report = compute_report


def _names(db: Session, rows: list[JudgmentRow]) -> dict[int, str]:
    return dict(
        db.execute(select(User.id, User.username).where(User.id.in_({r.user_id for r in rows})))
        .tuples()
        .all()
    )


# --- stored reports ----------------------------------------------------------------------


def stamp(db: Session, campaign: Campaign) -> str:
    """A fingerprint of what the report depends on, read in one cheap statement: the newest
    judgment of the campaign (a submit, an edit or a re-check each add one), the newest task
    decision (gold, resolve, send back: audited on the task) and the newest exclusion change."""
    newest_judgment = (
        select(func.coalesce(func.max(Judgment.id), 0))
        .where(Judgment.campaign_id == campaign.id)
        .scalar_subquery()
    )
    newest_task_event = (
        select(func.coalesce(func.max(AuditEvent.id), 0))
        .where(AuditEvent.entity_type == "task")
        .scalar_subquery()
    )
    exclusions = select(
        func.coalesce(func.max(LabelerExclusion.id), 0), func.max(LabelerExclusion.revoked_at)
    ).subquery()
    row = db.execute(
        select(newest_judgment, newest_task_event, exclusions.c[0], exclusions.c[1])
    ).one()
    revoked = row[3].isoformat() if row[3] else "-"
    return f"j{row[0]}.t{row[1]}.x{row[2]}.{revoked}"


@dataclass(frozen=True)
class StoredReport:
    report: dict[str, Any]
    computed_at: dt.datetime
    compute_seconds: float
    fresh: bool


def _store(
    db: Session, campaign: Campaign, filters: Filters, current: str, report: dict, seconds: float
) -> QualityReport:
    row = db.get(QualityReport, (campaign.id, filters.key()))
    if row is None:
        row = QualityReport(campaign_id=campaign.id, filters_key=filters.key())
        db.add(row)
    row.stamp, row.report, row.compute_seconds = current, report, round(seconds, 3)
    row.computed_at = utcnow()
    db.flush()
    return row


def refresh_report(db: Session, campaign: Campaign, filters: Filters) -> StoredReport:
    """Compute the report now and store it (the caller commits)."""
    current = stamp(db, campaign)
    began = time.perf_counter()
    report = compute_report(db, campaign, filters)
    row = _store(db, campaign, filters, current, report, time.perf_counter() - began)
    return StoredReport(row.report, row.computed_at, row.compute_seconds, True)


def cached_report(
    db: Session,
    campaign: Campaign,
    filters: Filters,
    *,
    schedule: Callable[[int, Filters], None] | None = None,
) -> StoredReport | None:
    """The report to show now.

    Fresh stored report: returned. Stale or missing on a small campaign (or with no
    `schedule`): computed and stored here. Otherwise `schedule(campaign_id, filters)` asks
    for a background computation, and the stale report is returned (None if there is none
    yet: the caller shows that it is being computed).
    """
    stored = db.get(QualityReport, (campaign.id, filters.key()))
    if stored is not None and stored.stamp == stamp(db, campaign):
        return StoredReport(stored.report, stored.computed_at, stored.compute_seconds, True)
    if schedule is None or _judgment_count(db, campaign) <= INLINE_MAX_JUDGMENTS:
        return refresh_report(db, campaign, filters)
    schedule(campaign.id, filters)
    if stored is None:
        return None
    return StoredReport(stored.report, stored.computed_at, stored.compute_seconds, False)


def _judgment_count(db: Session, campaign: Campaign) -> int:
    return db.scalar(
        select(func.count()).select_from(Judgment).where(Judgment.campaign_id == campaign.id)
    )


class ReportRefresher:
    """Computes stale reports on background threads, one at a time per campaign and filters,
    each in its own database session. Losing one (a restart) loses nothing: the next view
    asks again."""

    def __init__(self, session_factory: Callable[[], Any]) -> None:
        self._sessions = session_factory
        self._lock = threading.Lock()
        self._running: set[tuple[int, str]] = set()

    def schedule(self, campaign_id: int, filters: Filters) -> bool:
        key = (campaign_id, filters.key())
        with self._lock:
            if key in self._running:
                return False
            self._running.add(key)
        threading.Thread(
            target=self._run, args=(key, campaign_id, filters), name="quality-report", daemon=True
        ).start()
        return True

    def busy(self) -> bool:
        with self._lock:
            return bool(self._running)

    def _run(self, key: tuple[int, str], campaign_id: int, filters: Filters) -> None:
        try:
            with self._sessions() as db:
                campaign = db.get(Campaign, campaign_id)
                if campaign is not None:
                    refreshed = refresh_report(db, campaign, filters)
                    db.commit()
                    log.info(
                        "quality report for %s computed in %.2f s",
                        campaign.slug,
                        refreshed.compute_seconds,
                    )
        except Exception:
            log.exception("quality report for campaign %s failed", campaign_id)
        finally:
            with self._lock:
                self._running.discard(key)


# --- disagreement review ----------------------------------------------------------------


@dataclass(frozen=True)
class Disagreement:
    task: Task
    agreement: float  # mean pairwise agreement between the task's labelers
    judgments: list[JudgmentRow]
    consensus: metrics.Consensus  # the admin's recorded answer when there is one


def disagreements(
    db: Session, campaign: Campaign, report: dict[str, Any], *, limit: int = 30
) -> list[Disagreement]:
    """The report's lowest-agreement tasks that are not resolved yet, with their judgments."""
    listed = [item for item in report.get("lowest_agreement_tasks", [])]
    tasks = {
        t.id: t
        for t in db.scalars(
            select(Task).where(
                Task.id.in_([item["task_id"] for item in listed]),
                Task.resolved_ranking.is_(None),
                Task.is_gold.is_(False),
            )
        )
    }
    listed = [item for item in listed if item["task_id"] in tasks][:limit]
    by_task: dict[int, list[JudgmentRow]] = {item["task_id"]: [] for item in listed}
    query = (
        select(*_judgment_columns())
        .join(Task, Task.id == Judgment.task_id)
        .where(
            Judgment.task_id.in_(list(by_task)),
            Judgment.is_current.is_(True),
            Judgment.ranking.is_not(None),
            not_excluded(Judgment.user_id, Judgment.campaign_id),
        )
        .order_by(Judgment.id)
    )
    for row in _parse_rows(db.execute(query).all()):
        by_task[row.task_id].append(row)
    return [
        Disagreement(
            tasks[item["task_id"]],
            item["agreement"] if item["agreement"] is not None else math.nan,
            by_task[item["task_id"]],
            metrics.consensus([r.ranking for r in by_task[item["task_id"]]]),
        )
        for item in listed
        if by_task[item["task_id"]]
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


def task_completion_ids(task: Task) -> list[int]:
    return [item.completion_id for item in task.items]


def validate_ranking(task: Task, ranking: list[list[int]], *, allow_ties: bool) -> None:
    """A full ranking of exactly this task's completions, each once."""
    flat = [cid for tier in ranking for cid in tier]
    if any(not tier for tier in ranking):
        raise Invalid("A tier of the ranking is empty.")
    if sorted(flat) != sorted(task_completion_ids(task)):
        raise Invalid("The ranking must place each of this task's completions exactly once.")
    if not allow_ties and any(len(tier) > 1 for tier in ranking):
        raise Invalid("This answer may not contain ties.")


def set_gold(db: Session, *, task: Task, actor_id: int, ranking: list[list[int]] | None) -> Task:
    """Make a task gold with this known ranking, or (ranking None) a regular task again."""
    if ranking is not None:
        validate_ranking(task, ranking, allow_ties=True)
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


def resolve(
    db: Session, *, task: Task, actor_id: int, ranking: list[list[int]] | None, reason: str = ""
) -> Task:
    """Record an admin's answer for a disputed task (it becomes the task's consensus for
    exports and training), or (ranking None) withdraw it."""
    if ranking is not None:
        validate_ranking(task, ranking, allow_ties=True)
    before = {"resolved_ranking": task.resolved_ranking}
    task.resolved_ranking = ranking
    task.resolved_by_id = actor_id if ranking is not None else None
    task.resolved_at = utcnow() if ranking is not None else None
    db.flush()
    audit.record(
        db,
        actor_id=actor_id,
        action="task.resolve" if ranking is not None else "task.unresolve",
        entity_type="task",
        entity_id=task.id,
        before=before,
        after={"resolved_ranking": ranking},
        reason=reason or None,
    )
    return task


# --- excluding a labeler -----------------------------------------------------------------


@dataclass(frozen=True)
class ExclusionView:
    id: int
    user_id: int
    username: str
    campaign_id: int | None
    reason: str
    by: str | None
    at: dt.datetime


def excluded_labelers(db: Session, campaign_id: int) -> dict[int, dict[str, Any]]:
    """{user id: {"reason", "since", "all_campaigns"}} for the labelers excluded here now."""
    rows = db.scalars(
        select(LabelerExclusion)
        .where(
            LabelerExclusion.revoked_at.is_(None),
            or_(
                LabelerExclusion.campaign_id.is_(None),
                LabelerExclusion.campaign_id == campaign_id,
            ),
        )
        .order_by(LabelerExclusion.id)
    )
    return {
        row.user_id: {
            "reason": row.reason,
            "since": row.created_at.isoformat(),
            "all_campaigns": row.campaign_id is None,
            "exclusion_id": row.id,
        }
        for row in rows
    }


def exclusions(db: Session, campaign_id: int) -> list[ExclusionView]:
    """The exclusions in force for this campaign, with names, newest first."""
    excluder = User.__table__.alias("excluder")
    rows = db.execute(
        select(LabelerExclusion, User.username, excluder.c.username)
        .join(User, User.id == LabelerExclusion.user_id)
        .outerjoin(excluder, excluder.c.id == LabelerExclusion.created_by_id)
        .where(
            LabelerExclusion.revoked_at.is_(None),
            or_(
                LabelerExclusion.campaign_id.is_(None),
                LabelerExclusion.campaign_id == campaign_id,
            ),
        )
        .order_by(LabelerExclusion.id.desc())
    ).all()
    return [
        ExclusionView(x.id, x.user_id, name, x.campaign_id, x.reason, by, x.created_at)
        for x, name, by in rows
    ]


def exclude(
    db: Session, *, user: User, campaign: Campaign | None, reason: str, actor_id: int
) -> LabelerExclusion:
    """Keep a labeler's judgments (in one campaign, or in all) out of the quality figures,
    exports and training, with a reason. Their work stays on record."""
    reason = reason.strip()
    if not reason:
        raise Invalid("Give a reason for excluding this labeler.")
    if len(reason) > 2000:
        raise Invalid("Keep the reason under 2,000 characters.")
    scope = campaign.id if campaign is not None else None
    existing = db.scalar(
        select(LabelerExclusion).where(
            LabelerExclusion.user_id == user.id,
            LabelerExclusion.revoked_at.is_(None),
            LabelerExclusion.campaign_id.is_(None)
            if scope is None
            else LabelerExclusion.campaign_id == scope,
        )
    )
    if existing is not None:
        raise Conflict(f"{user.username} is already excluded here.")
    row = LabelerExclusion(
        user_id=user.id, campaign_id=scope, reason=reason, created_by_id=actor_id
    )
    db.add(row)
    db.flush()
    audit.record(
        db,
        actor_id=actor_id,
        action="labeler.exclude",
        entity_type="user",
        entity_id=user.id,
        after={"exclusion_id": row.id, "campaign_id": scope},
        reason=reason,
    )
    return row


def include(db: Session, *, exclusion: LabelerExclusion, actor_id: int) -> LabelerExclusion:
    """Undo an exclusion: the labeler's judgments count again."""
    if exclusion.revoked_at is not None:
        raise Conflict("This exclusion was already lifted.")
    exclusion.revoked_at = utcnow()
    exclusion.revoked_by_id = actor_id
    db.flush()
    audit.record(
        db,
        actor_id=actor_id,
        action="labeler.include",
        entity_type="user",
        entity_id=exclusion.user_id,
        before={"exclusion_id": exclusion.id, "campaign_id": exclusion.campaign_id},
    )
    return exclusion
