"""Inter-labeler agreement: the numbers behind the quality dashboards.

Pure functions over plain data, so they are tested on hand-made examples and against the
reference libraries. A ranking is a list of tiers of completion ids, best first
(`[[3], [1, 4], [2]]`: 3 is best, 1 and 4 tie, 2 is last), as stored on judgments.

- `pairwise_agreement`: the share of completion pairs two labelers order the same way, a tie
  against a strict order counting half (InstructGPT reports 72.6 +/- 1.5 % between its
  labelers on this measure).
- `kendall_tau`: Kendall's tau-b between two rankings (ties handled).
- `krippendorff_alpha`: ordinal alpha on the ranks (the `krippendorff` package).
- `fleiss_kappa_pairs`: Fleiss' kappa on pairwise choices (statsmodels).
- `bradley_terry` / `consensus`: a consensus ranking per task, and how strongly the votes
  agree on each pair.
- `bootstrap_interval`: a 95 % interval for any of them, resampling tasks.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any, TypeVar

Ranking = Sequence[Sequence[int]]
T = TypeVar("T")


def places(ranking: Ranking) -> dict[int, float]:
    """Each completion's rank, 1 = best; tied completions share the mean of their places."""
    out: dict[int, float] = {}
    start = 1
    for tier in ranking:
        mean_place = start + (len(tier) - 1) / 2
        for cid in tier:
            out[cid] = mean_place
        start += len(tier)
    return out


def pair_preferences(ranking: Ranking) -> dict[tuple[int, int], float]:
    """For each pair (a, b) with a < b: 1.0 if a ranks above b, 0.0 if below, 0.5 if tied."""
    rank = places(ranking)
    return {
        (a, b): 1.0 if rank[a] < rank[b] else 0.0 if rank[a] > rank[b] else 0.5
        for a, b in combinations(sorted(rank), 2)
    }


def pairwise_agreement(first: Ranking, second: Ranking) -> float:
    """Share of shared pairs ordered the same way; a tie against a strict order counts half."""
    left, right = pair_preferences(first), pair_preferences(second)
    shared = left.keys() & right.keys()
    if not shared:
        return math.nan
    return sum(1.0 - abs(left[pair] - right[pair]) for pair in shared) / len(shared)


def kendall_tau(first: Ranking, second: Ranking) -> float:
    """Kendall's tau-b over the completions both rankings contain (nan if undefined)."""
    x, y = places(first), places(second)
    common = sorted(x.keys() & y.keys())
    concordant = discordant = tied_x = tied_y = 0
    for a, b in combinations(common, 2):
        dx, dy = x[a] - x[b], y[a] - y[b]
        if dx == 0 and dy == 0:
            continue  # tied in both: counts in neither denominator term
        if dx == 0:
            tied_x += 1
        elif dy == 0:
            tied_y += 1
        elif (dx > 0) == (dy > 0):
            concordant += 1
        else:
            discordant += 1
    denominator = math.sqrt((concordant + discordant + tied_x) * (concordant + discordant + tied_y))
    return (concordant - discordant) / denominator if denominator else math.nan


@dataclass(frozen=True)
class Vote:
    """One labeler's ranking of one task."""

    task: Hashable
    labeler: Hashable
    ranking: Ranking


def _by_task(votes: Iterable[Vote]) -> dict[Hashable, list[Vote]]:
    grouped: dict[Hashable, list[Vote]] = {}
    for vote in votes:
        grouped.setdefault(vote.task, []).append(vote)
    return grouped


def mean_pairwise_agreement(votes: Iterable[Vote]) -> float:
    """Pairwise agreement averaged over every two labelers who judged the same task."""
    scores = [
        pairwise_agreement(a.ranking, b.ranking)
        for task_votes in _by_task(votes).values()
        for a, b in combinations(task_votes, 2)
    ]
    scores = [s for s in scores if not math.isnan(s)]
    return sum(scores) / len(scores) if scores else math.nan


def mean_kendall_tau(votes: Iterable[Vote]) -> float:
    """Kendall's tau-b averaged over every two labelers who judged the same task."""
    scores = [
        kendall_tau(a.ranking, b.ranking)
        for task_votes in _by_task(votes).values()
        for a, b in combinations(task_votes, 2)
    ]
    scores = [s for s in scores if not math.isnan(s)]
    return sum(scores) / len(scores) if scores else math.nan


def rank_matrix(votes: Iterable[Vote], labelers: Sequence[Hashable]) -> Any:
    """Krippendorff's reliability data: one row per labeler (in `labelers` order), one column
    per (task, completion) unit, holding the completion's place; nan where not judged."""
    import numpy as np

    votes = list(votes)
    units = sorted({(v.task, cid) for v in votes for cid in places(v.ranking)}, key=str)
    row = {labeler: i for i, labeler in enumerate(labelers)}
    column = {unit: j for j, unit in enumerate(units)}
    data = np.full((len(labelers), len(units)), np.nan)
    for vote in votes:
        for cid, place in places(vote.ranking).items():
            data[row[vote.labeler], column[(vote.task, cid)]] = place
    return data


def alpha_from_matrix(data: Any) -> float:
    """Ordinal Krippendorff's alpha of a reliability matrix (the `krippendorff` package)."""
    import numpy as np
    from krippendorff import alpha

    if data.shape[0] < 2 or data.shape[1] == 0:
        return math.nan
    paired = data[:, np.sum(~np.isnan(data), axis=0) >= 2]  # a unit seen once says nothing
    if paired.shape[1] == 0 or len(np.unique(paired[~np.isnan(paired)])) < 2:
        return math.nan
    return float(alpha(reliability_data=paired, level_of_measurement="ordinal"))


def krippendorff_alpha(votes: Iterable[Vote]) -> float:
    """Ordinal Krippendorff's alpha; units are (task, completion), values the ranks."""
    votes = list(votes)
    labelers = sorted({v.labeler for v in votes}, key=str)
    return alpha_from_matrix(rank_matrix(votes, labelers))


def pair_choice_counts(votes: Iterable[Vote]) -> dict[tuple[Hashable, tuple[int, int]], list[int]]:
    """Per (task, pair): how many labelers chose (first better, tie, second better)."""
    counts: dict[tuple[Hashable, tuple[int, int]], list[int]] = {}
    for vote in votes:
        for pair, preference in pair_preferences(vote.ranking).items():
            bucket = counts.setdefault((vote.task, pair), [0, 0, 0])
            bucket[0 if preference == 1.0 else 1 if preference == 0.5 else 2] += 1
    return counts


def modal_raters(counts: Iterable[Sequence[int]]) -> int | None:
    """The most common number of raters per subject (at least 2), or None."""
    sizes = [sum(c) for c in counts if sum(c) >= 2]
    return max(sorted(set(sizes)), key=sizes.count) if sizes else None


def pair_choice_table(votes: Iterable[Vote]) -> Any:
    """Fleiss' table for pairwise choices: one row per (task, pair), counts of
    (first better, tie, second better).

    Fleiss' kappa assumes the same number of raters per subject, so only the pairs rated by
    the most common number of labelers (at least 2) are kept.
    """
    import numpy as np

    counts = pair_choice_counts(votes)
    raters = modal_raters(counts.values())
    if raters is None:
        return np.zeros((0, 3), dtype=int)
    return np.array([c for c in counts.values() if sum(c) == raters], dtype=int)


def kappa_from_table(table: Any) -> float:
    """Fleiss' kappa of a subjects x categories count table (statsmodels)."""
    from statsmodels.stats.inter_rater import fleiss_kappa

    if len(table) == 0 or (table.sum(axis=0) > 0).sum() < 2:
        return math.nan  # no subjects, or one category only: kappa is undefined
    return float(fleiss_kappa(table, method="fleiss"))


def fleiss_kappa_pairs(votes: Iterable[Vote]) -> float:
    """Fleiss' kappa on pairwise choices, over `pair_choice_table`."""
    return kappa_from_table(pair_choice_table(votes))


def bradley_terry(
    wins: Mapping[tuple[int, int], float], *, iterations: int = 200, prior: float = 0.5
) -> dict[int, float]:
    """Bradley-Terry strengths from pairwise win counts {(winner, loser): count}.

    Minorisation-maximisation (Hunter 2004) with `prior` virtual half-wins for each pair in
    both directions, so a completion that never lost keeps a finite strength. Strengths are
    normalised to a geometric mean of 1.
    """
    items = sorted({i for pair in wins for i in pair})
    if not items:
        return {}
    total: dict[tuple[int, int], float] = {}
    for (a, b), count in wins.items():
        total[(a, b)] = total.get((a, b), 0.0) + count
    for a, b in combinations(items, 2):
        total[(a, b)] = total.get((a, b), 0.0) + prior
        total[(b, a)] = total.get((b, a), 0.0) + prior
    strength = dict.fromkeys(items, 1.0)
    won = {i: sum(c for (w, _), c in total.items() if w == i) for i in items}
    for _ in range(iterations):
        updated = {}
        for i in items:
            denominator = sum(
                (total.get((i, j), 0.0) + total.get((j, i), 0.0)) / (strength[i] + strength[j])
                for j in items
                if j != i
            )
            updated[i] = won[i] / denominator if denominator else strength[i]
        scale = math.exp(sum(math.log(v) for v in updated.values()) / len(updated))
        strength = {i: v / scale for i, v in updated.items()}
    return strength


@dataclass(frozen=True)
class Consensus:
    ranking: list[list[int]]  # best first; no ties
    strengths: dict[int, float]
    # For each consensus-ordered pair (better, worse): the share of votes agreeing with it,
    # ties counting half.
    pair_agreement: dict[tuple[int, int], float]


def consensus(rankings: Sequence[Ranking]) -> Consensus:
    """The Bradley-Terry consensus of several rankings of one task."""
    wins: dict[tuple[int, int], float] = {}
    for ranking in rankings:
        for (a, b), preference in pair_preferences(ranking).items():
            wins[(a, b)] = wins.get((a, b), 0.0) + preference
            wins[(b, a)] = wins.get((b, a), 0.0) + 1.0 - preference
    strengths = bradley_terry(wins)
    # Rounded, so float noise never decides between completions the votes rate equally.
    order = sorted(strengths, key=lambda i: (-round(strengths[i], 9), i))
    votes = len(rankings)
    agreement = {
        (better, worse): wins.get((better, worse), 0.0) / votes
        for index, better in enumerate(order)
        for worse in order[index + 1 :]
    }
    return Consensus([[i] for i in order], strengths, agreement)


def bootstrap_interval(
    tasks: Sequence[T],
    statistic: Callable[[Sequence[T]], float],
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """A percentile bootstrap interval for `statistic`, resampling whole tasks.

    A resample may draw one task several times; `statistic` must count each draw apart
    (score per task, then average), not merge the draws back into one task.
    """
    if not tasks:
        return (math.nan, math.nan)
    rng = random.Random(seed)  # noqa: S311 (statistics, not secrets: seeded to be repeatable)
    values = []
    for _ in range(resamples):
        value = statistic([tasks[rng.randrange(len(tasks))] for _ in tasks])
        if not math.isnan(value):
            values.append(value)
    if not values:
        return (math.nan, math.nan)
    values.sort()
    tail = (1 - confidence) / 2
    low = values[min(len(values) - 1, int(tail * len(values)))]
    high = values[min(len(values) - 1, int((1 - tail) * len(values)))]
    return (low, high)


@dataclass(frozen=True)
class PositionBias:
    """How often a labeler ranked first the completion shown first, against chance."""

    first_shown_ranked_first: int
    judgments: int
    rate: float
    chance: float  # 1/K for K completions (ties at the top share the credit)
    p_value: float  # two-sided binomial test against chance
    flagged: bool  # p < alpha and the rate above chance


def position_bias(
    judgments: Iterable[tuple[Sequence[int], Ranking]], *, alpha: float = 0.01
) -> PositionBias:
    """From (display order, ranking) per judgment: is the first-shown completion favoured?"""
    hits = 0.0
    count = 0
    chance_sum = 0.0
    for shown, ranking in judgments:
        if not shown or not ranking:
            continue
        top = ranking[0]
        count += 1
        chance_sum += 1 / len(shown)
        if shown[0] in top:
            hits += 1 / len(top)  # a tie at the top shares the credit
    return position_bias_from_counts(hits, count, chance_sum, alpha=alpha)


def position_bias_from_counts(
    hits: float, count: int, chance_sum: float, *, alpha: float = 0.01
) -> PositionBias:
    """`position_bias` from its sums: first-shown-at-the-top credit, judgments, and the sum
    of each judgment's chance (1/K)."""
    from scipy.stats import binomtest

    if count == 0:
        return PositionBias(0, 0, math.nan, math.nan, math.nan, False)
    chance = chance_sum / count
    successes = round(hits)
    p_value = float(binomtest(successes, count, chance).pvalue)
    rate = hits / count
    return PositionBias(successes, count, rate, chance, p_value, p_value < alpha and rate > chance)
