"""Audit pairs: a new policy's sample against its parent's on the same prompt, judged by
people as an ordinary pairwise task, and the win rate those judgments give.

A judgment counts a win for the new version when it ranks the new sample above the old
one, a loss below, and half a win when it ties them. The interval is Wilson's score
interval on the win share (ties as halves); judgments, not tasks, are the trials, so a task
judged by three labelers counts three times (the interval is then somewhat too narrow when
labelers agree more than chance, which the page says).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth.models import User, UserKind
from app.campaigns.models import Campaign
from app.jobs import registry
from app.labeling.models import Completion, Judgment, Task
from app.loop.models import AuditPair

Z_95 = 1.959963984540054
# Fewer judgments than this and the page says "pending" instead of a verdict.
MIN_JUDGMENTS = 10


def _draw(*parts: Any) -> random.Random:
    """A generator seeded by its purpose, seed and prompt: repeatable, not secret."""
    return random.Random(":".join(str(p) for p in parts))  # noqa: S311


def is_audit_prompt(prompt_id: int, share: float, seed: int) -> bool:
    """Whether a prompt gets an audit pair: a fixed, seeded draw per prompt, so a resumed
    generation job picks the same prompts."""
    if share <= 0:
        return False
    return _draw("audit", seed, prompt_id).random() < share


def old_sample(db: Session, prompt_id: int, model_id: int, seed: int) -> Completion | None:
    """A completion the old version already wrote for this prompt (seeded pick), if any."""
    found = list(
        db.scalars(
            select(Completion)
            .where(Completion.prompt_id == prompt_id, Completion.model_version_id == model_id)
            .order_by(Completion.id)
        )
    )
    return _draw("old", seed, prompt_id).choice(found) if found else None


def add_audit_task(
    db: Session,
    *,
    campaign: Campaign,
    prompt_id: int,
    new: tuple[str, dict[str, Any]],
    new_model_id: int,
    old: Completion | tuple[str, dict[str, Any]],
    old_model_id: int,
    job_id: int | None,
    reward_model_id: int | None = None,
    scores: tuple[float | None, float | None] = (None, None),
    seed: int = 0,
    priority: int = 0,
) -> Task:
    """A two-completion task of the new sample and the old one, in a seeded random order
    (nothing in the task tells them apart), and its audit pair. `old` is a stored completion
    of the old version, or a fresh sample of it (text, generation params)."""
    made = registry.sampled_completion(prompt_id, new[0], new[1], new_model_id)
    db.add(made)
    if isinstance(old, Completion):
        old_completion = old
    else:
        old_completion = registry.sampled_completion(prompt_id, old[0], old[1], old_model_id)
        db.add(old_completion)
    db.flush()
    shown = [made, old_completion]
    _draw("sides", seed, prompt_id).shuffle(shown)
    task = registry.open_task(db, campaign, prompt_id, shown, priority=priority)
    db.add(
        AuditPair(
            task_id=task.id,
            new_model_id=new_model_id,
            old_model_id=old_model_id,
            new_completion_id=made.id,
            old_completion_id=old_completion.id,
            job_id=job_id,
            reward_model_id=reward_model_id,
            new_score=scores[0],
            old_score=scores[1],
        )
    )
    db.flush()
    return task


def outcome(ranking: Sequence[Sequence[int]] | None, new_id: int, old_id: int) -> float | None:
    """1 when the ranking puts the new completion above the old, 0 below, 0.5 tied; None
    when it does not rank both (a skipped or malformed judgment)."""
    if not ranking:
        return None
    tier = {cid: level for level, group in enumerate(ranking) for cid in group}
    if new_id not in tier or old_id not in tier:
        return None
    if tier[new_id] == tier[old_id]:
        return 0.5
    return 1.0 if tier[new_id] < tier[old_id] else 0.0


def wilson(wins: float, n: float, z: float = Z_95) -> tuple[float, float]:
    """Wilson's score interval for a share of wins among n trials (wins may be fractional)."""
    if n <= 0:
        return (0.0, 1.0)
    p = wins / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class WinRate:
    """The human verdict on a version against the one it was audited against."""

    new_model_id: int
    old_model_id: int
    judgments: int = 0
    wins: float = 0.0  # ties count half
    ties: int = 0
    pairs: int = 0  # audit tasks made
    reward_wins: float = 0.0  # the reward model's verdict on the same pairs (scored ones)
    scored_pairs: int = 0
    new_score: float | None = None  # mean reward-model score of the new samples
    old_score: float | None = None  # ... and of the old ones, under the same reward model

    @property
    def rate(self) -> float | None:
        return self.wins / self.judgments if self.judgments else None

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.wins, self.judgments)

    @property
    def reward_rate(self) -> float | None:
        return self.reward_wins / self.scored_pairs if self.scored_pairs else None

    @property
    def reward_rose(self) -> bool | None:
        """Whether the reward model scores the new samples higher than the old ones."""
        if self.new_score is None or self.old_score is None:
            return None
        return self.new_score > self.old_score

    @property
    def verdict(self) -> str:
        """better / worse / no better / pending (too few judgments to say)."""
        if self.judgments < MIN_JUDGMENTS:
            return "pending"
        low, high = self.interval
        if low > 0.5:
            return "better"
        if high < 0.5:
            return "worse"
        return "no better"

    @property
    def goodhart(self) -> bool:
        """The reward model scores the new samples higher while people, with at least
        MIN_JUDGMENTS judgments, prefer them at most half the time. An interval that merely
        reaches 50 % is not enough: 8 wins of 10 is "no better" yet clearly preferred."""
        if not self.reward_rose or self.judgments < MIN_JUDGMENTS:
            return False
        # A "worse" verdict (interval below 50 %) always has its point estimate below too.
        return (self.rate or 0.0) <= 0.5


def win_rates(db: Session, new_model_ids: Iterable[int]) -> dict[int, WinRate]:
    """Each version's win rate against the version its audit pairs were made against (its
    parent, in the loop), from the current judgments of its audit tasks."""
    wanted = sorted(set(new_model_ids))
    out: dict[int, WinRate] = {}
    if not wanted:
        return out
    pairs = list(db.scalars(select(AuditPair).where(AuditPair.new_model_id.in_(wanted))))
    score_sums: dict[int, list[float]] = {}
    by_task: dict[int, AuditPair] = {}
    for pair in pairs:
        rate = out.setdefault(pair.new_model_id, WinRate(pair.new_model_id, pair.old_model_id))
        rate.pairs += 1
        by_task[pair.task_id] = pair
        if pair.new_score is not None and pair.old_score is not None:
            rate.scored_pairs += 1
            rate.reward_wins += (
                1.0
                if pair.new_score > pair.old_score
                else 0.5
                if pair.new_score == pair.old_score
                else 0.0
            )
            sums = score_sums.setdefault(pair.new_model_id, [0.0, 0.0])
            sums[0] += pair.new_score
            sums[1] += pair.old_score
    for model_id, (new_sum, old_sum) in score_sums.items():
        rate = out[model_id]
        rate.new_score = new_sum / rate.scored_pairs
        rate.old_score = old_sum / rate.scored_pairs
    task_ids = sorted(by_task)
    for start in range(0, len(task_ids), 500):
        chunk = task_ids[start : start + 500]
        for task_id, ranking in db.execute(
            select(Judgment.task_id, Judgment.ranking)
            .join(User, User.id == Judgment.user_id)
            .where(
                Judgment.task_id.in_(chunk),
                Judgment.is_current.is_(True),
                User.kind == UserKind.human,  # AI labelers' verdicts are not the humans'
            )
        ):
            pair = by_task[task_id]
            result = outcome(ranking, pair.new_completion_id, pair.old_completion_id)
            if result is None:
                continue
            rate = out[pair.new_model_id]
            rate.judgments += 1
            rate.wins += result
            rate.ties += result == 0.5
    return out
