"""The quality metrics over a whole campaign at once, as numpy arrays.

`app.quality.metrics` states each metric plainly, one ranking or one task at a time, and is
checked against the reference libraries. This module computes the same numbers for 100,000
judgments in a second or two: every judgment becomes a row of pair preferences, every task a
block of sufficient statistics (sums, a coincidence matrix, a count table), so a bootstrap
resample is a weighted sum of blocks instead of a recomputation. The tests hold the two
modules equal on random campaigns.

Shapes: J judgments, T tasks, K completions per task (the largest, when they differ),
P = K(K-1)/2 completion pairs, V = 2K-1 possible places (ties give half places), R resamples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np

# Strengths are rounded before ordering, so that float noise never decides between two
# completions the votes rate equally (the tie goes to the lower completion id).
STRENGTH_DECIMALS = 9


@dataclass
class Judged:
    """A campaign's judgments as arrays. Completions are numbered per task in id order."""

    k: int
    pair_a: np.ndarray  # (P,) first completion of each pair (local index)
    pair_b: np.ndarray  # (P,) second completion, pair_a < pair_b
    task_ids: np.ndarray  # (T,) database ids
    completion_ids: np.ndarray  # (T, K) database ids, -1 where a task has fewer
    is_gold: np.ndarray  # (T,) bool
    gold_pref: np.ndarray  # (T, P) the gold answer's preferences, nan without one
    task: np.ndarray  # (J,) index into the task arrays
    places: np.ndarray  # (J, K) 1 = best, ties share the mean place, nan = not ranked
    pref: np.ndarray  # (J, P) 1.0 a above b, 0.5 tied, 0.0 below, nan not both ranked
    first_shown: np.ndarray  # (J,) local index of the completion shown first, -1 unknown
    shown_count: np.ndarray  # (J,) how many completions were shown


def _fill_places(row: np.ndarray, ranking: Sequence[Sequence[int]], local: dict[int, int]) -> None:
    start = 1
    for tier in ranking:
        place = start + (len(tier) - 1) / 2
        for cid in tier:
            row[local[cid]] = place
        start += len(tier)


def preferences(places: np.ndarray, pair_a: np.ndarray, pair_b: np.ndarray) -> np.ndarray:
    """(N, K) places -> (N, P) preferences: 1.0 a above b, 0.5 tied, 0.0 below, nan."""
    a, b = places[:, pair_a], places[:, pair_b]
    with np.errstate(invalid="ignore"):
        pref = np.where(a < b, 1.0, np.where(a > b, 0.0, 0.5))
    pref[np.isnan(a) | np.isnan(b)] = np.nan
    return pref


def build(
    tasks: Sequence[int],
    rankings: Sequence[Sequence[Sequence[int]]],
    display_orders: Sequence[Sequence[int]],
    gold: dict[int, Sequence[Sequence[int]] | None],
) -> Judged:
    """Arrays from parallel sequences (one item per judgment), and the gold tasks as
    {task id: their answer, or None when a gold task has none recorded}."""
    members: dict[int, set[int]] = {}
    for task_id, ranking in zip(tasks, rankings, strict=True):
        members.setdefault(task_id, set()).update(cid for tier in ranking for cid in tier)
    for task_id, ranking in gold.items():
        if ranking and task_id in members:
            members[task_id].update(cid for tier in ranking for cid in tier)
    task_ids = np.array(sorted(members), dtype=np.int64)
    position = {int(t): i for i, t in enumerate(task_ids)}
    k = max((len(m) for m in members.values()), default=2)
    pairs = list(combinations(range(k), 2))
    pair_a = np.array([a for a, _ in pairs], dtype=np.int64)
    pair_b = np.array([b for _, b in pairs], dtype=np.int64)
    completion_ids = np.full((len(task_ids), k), -1, dtype=np.int64)
    local: list[dict[int, int]] = []
    for i, task_id in enumerate(task_ids):
        ids = sorted(members[int(task_id)])
        completion_ids[i, : len(ids)] = ids
        local.append({cid: n for n, cid in enumerate(ids)})

    task = np.fromiter((position[t] for t in tasks), dtype=np.int64, count=len(tasks))
    places = np.full((len(tasks), k), np.nan)
    first_shown = np.full(len(tasks), -1, dtype=np.int64)
    shown_count = np.zeros(len(tasks), dtype=np.int64)
    for j, (t, ranking, shown) in enumerate(zip(task, rankings, display_orders, strict=True)):
        numbering = local[t]
        _fill_places(places[j], ranking, numbering)
        if shown and shown[0] in numbering:
            first_shown[j] = numbering[shown[0]]
            shown_count[j] = len(shown)
    gold_places = np.full((len(task_ids), k), np.nan)
    is_gold = np.zeros(len(task_ids), dtype=bool)
    for i, task_id in enumerate(task_ids):
        answer = gold.get(int(task_id))
        is_gold[i] = int(task_id) in gold
        if answer:
            _fill_places(gold_places[i], answer, local[i])
    return Judged(
        k=k,
        pair_a=pair_a,
        pair_b=pair_b,
        task_ids=task_ids,
        completion_ids=completion_ids,
        is_gold=is_gold,
        gold_pref=preferences(gold_places, pair_a, pair_b),
        task=task,
        places=places,
        pref=preferences(places, pair_a, pair_b),
        first_shown=first_shown,
        shown_count=shown_count,
    )


# --- pairs of judgments on the same task ----------------------------------------------


def same_task_pairs(task: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every two of the judgments `members` (indexes) that share a task: (first, second)."""
    members = members[np.argsort(task[members], kind="stable")]
    grouped_task = task[members]
    starts = np.flatnonzero(np.r_[True, grouped_task[1:] != grouped_task[:-1]])
    sizes = np.diff(np.r_[starts, len(members)])
    firsts, seconds = [], []
    for size in np.unique(sizes[sizes >= 2]):
        block = starts[sizes == size][:, None] + np.arange(size)  # (tasks, size)
        for x, y in combinations(range(size), 2):
            firsts.append(members[block[:, x]])
            seconds.append(members[block[:, y]])
    if not firsts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    return np.concatenate(firsts), np.concatenate(seconds)


def agreement(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Row-wise pairwise agreement of two (N, P) preference arrays; a tie against a strict
    order counts half; nan where no pair is ranked in both."""
    score = 1.0 - np.abs(left - right)
    shared = ~np.isnan(score)
    count = shared.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.where(shared, score, 0.0).sum(axis=1) / count, np.nan)


def kendall_tau(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Row-wise Kendall's tau-b: sum(sx * sy) / sqrt(#(sx != 0) * #(sy != 0)) over the pairs
    ranked in both (a pair tied in both counts in neither term)."""
    shared = ~(np.isnan(left) | np.isnan(right))
    sx = np.where(shared, np.sign(np.nan_to_num(left) - 0.5), 0.0)
    sy = np.where(shared, np.sign(np.nan_to_num(right) - 0.5), 0.0)
    denominator = np.sqrt((sx != 0).sum(axis=1) * (sy != 0).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (sx * sy).sum(axis=1) / denominator, np.nan)


def per_group_mean(values: np.ndarray, group: np.ndarray, groups: int) -> np.ndarray:
    """Mean of the finite `values` in each group; nan for a group without one."""
    finite = ~np.isnan(values)
    total = np.bincount(group[finite], weights=values[finite], minlength=groups)
    count = np.bincount(group[finite], minlength=groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


# --- Krippendorff's alpha (ordinal) from per-task coincidence matrices -----------------


def value_counts(judged: Judged, members: np.ndarray) -> np.ndarray:
    """(T*K, V) how many of `members` gave each (task, completion) unit each place."""
    v = 2 * judged.k - 1
    rows = np.repeat(judged.task[members] * judged.k, judged.k) + np.tile(
        np.arange(judged.k), len(members)
    )
    places = judged.places[members].ravel()
    ranked = ~np.isnan(places)
    codes = np.rint(2 * places[ranked] - 2).astype(np.int64)  # place 1, 1.5, 2 ... -> 0, 1, 2
    counts = np.zeros((len(judged.task_ids) * judged.k, v))
    np.add.at(counts, (rows[ranked], codes), 1.0)
    return counts


def coincidence_blocks(counts: np.ndarray, k: int) -> np.ndarray:
    """(T, V, V): each task's share of the coincidence matrix. A unit with m values adds
    (n n^T - diag(n)) / (m - 1); units with fewer than two values add nothing."""
    m = counts.sum(axis=1)
    pairable = m >= 2
    outer = counts[:, :, None] * counts[:, None, :]
    outer -= counts[:, :, None] * np.eye(counts.shape[1])
    scale = np.where(pairable, 1.0 / np.where(pairable, m - 1, 1), 0.0)
    per_unit = outer * scale[:, None, None]
    v = counts.shape[1]
    return per_unit.reshape(-1, k, v, v).sum(axis=1)


def alpha_from_coincidences(o: np.ndarray) -> np.ndarray:
    """Ordinal Krippendorff's alpha of (..., V, V) coincidence matrices (nan if undefined).

    delta^2(c, k) = (sum of n_g for g from c to k - (n_c + n_k) / 2)^2, and
    alpha = 1 - (n - 1) * sum(o * delta^2) / sum(n_c n_k delta^2).
    """
    n_c = o.sum(axis=-1)
    n = n_c.sum(axis=-1)
    cumulative = np.cumsum(n_c, axis=-1)
    delta = (
        cumulative[..., None, :]
        - cumulative[..., :, None]
        + (n_c[..., :, None] - n_c[..., None, :]) / 2
    )
    delta2 = delta**2
    observed = (o * delta2).sum(axis=(-2, -1))
    expected = (n_c[..., :, None] * n_c[..., None, :] * delta2).sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(expected > 0, 1.0 - (n - 1) * observed / expected, np.nan)


def alpha_reference(counts: np.ndarray, k: int) -> float:
    """The same alpha from the `krippendorff` package, on the pairable units."""
    from krippendorff import alpha

    pairable = counts[counts.sum(axis=1) >= 2]
    if len(pairable) == 0 or (pairable.sum(axis=0) > 0).sum() < 2:
        return math.nan
    domain = 1 + np.arange(2 * k - 1) / 2  # the places the codes stand for
    return float(alpha(value_counts=pairable, value_domain=domain, level_of_measurement="ordinal"))


# --- Fleiss' kappa on pairwise choices, from per-task sums ----------------------------


def choice_counts(judged: Judged, members: np.ndarray) -> np.ndarray:
    """(T, P, 3): per task and pair, how many chose (a better, tie, b better)."""
    pref = judged.pref[members]
    ranked = ~np.isnan(pref)
    category = np.where(pref == 1.0, 0, np.where(pref == 0.5, 1, 2))
    t = np.broadcast_to(judged.task[members][:, None], pref.shape)
    p = np.broadcast_to(np.arange(pref.shape[1]), pref.shape)
    counts = np.zeros((len(judged.task_ids), pref.shape[1], 3))
    np.add.at(counts, (t[ranked], p[ranked], category[ranked]), 1.0)
    return counts


def modal_raters(counts: np.ndarray) -> int | None:
    """The most common number of raters per (task, pair) subject, at least 2 (ties: fewer)."""
    raters = counts.sum(axis=-1).ravel().astype(np.int64)
    raters = raters[raters >= 2]
    if len(raters) == 0:
        return None
    return int(np.argmax(np.bincount(raters)))


def kappa_blocks(counts: np.ndarray, raters: int) -> tuple[np.ndarray, np.ndarray]:
    """(T, 5) per task: subjects, sum of P_i, and the three category totals over the subjects
    rated by exactly `raters`; and the (subjects, 3) table itself."""
    kept = counts.sum(axis=-1) == raters  # (T, P)
    agreement = ((counts**2).sum(axis=-1) - raters) / (raters * (raters - 1))
    blocks = np.column_stack(
        [
            kept.sum(axis=1),
            np.where(kept, agreement, 0.0).sum(axis=1),
            (counts * kept[..., None]).sum(axis=1),
        ]
    )
    return blocks, counts[kept]


def kappa_from_blocks(sums: np.ndarray, raters: int) -> np.ndarray:
    """Fleiss' kappa from (..., 5) summed blocks (nan if undefined)."""
    subjects, agreement_sum, totals = sums[..., 0], sums[..., 1], sums[..., 2:]
    with np.errstate(invalid="ignore", divide="ignore"):
        p_bar = agreement_sum / subjects
        p_j = totals / (subjects[..., None] * raters)
        p_e = (p_j**2).sum(axis=-1)
        categories = (totals > 0).sum(axis=-1)
        return np.where((subjects > 0) & (categories >= 2), (p_bar - p_e) / (1 - p_e), np.nan)


def kappa_reference(table: np.ndarray) -> float:
    """The same kappa from statsmodels."""
    from statsmodels.stats.inter_rater import fleiss_kappa

    if len(table) == 0 or (table.sum(axis=0) > 0).sum() < 2:
        return math.nan
    return float(fleiss_kappa(table, method="fleiss"))


# --- Bradley-Terry consensus, many tasks at once ----------------------------------------


def win_matrices(pref: np.ndarray, pair_a: np.ndarray, pair_b: np.ndarray, k: int) -> np.ndarray:
    """(N, P) preferences -> (N, K, K) wins: [a, b] = votes for a over b (a tie: half each)."""
    wins = np.zeros((len(pref), k, k))
    clean = np.nan_to_num(pref)
    ranked = ~np.isnan(pref)
    wins[:, pair_a, pair_b] = clean
    wins[:, pair_b, pair_a] = np.where(ranked, 1.0 - clean, 0.0)
    return wins


def bradley_terry(
    wins: np.ndarray, *, prior: float = 0.5, iterations: int = 200, tolerance: float = 1e-11
) -> np.ndarray:
    """(G, K, K) win counts -> (G, K) strengths, geometric mean 1 per group.

    Minorisation-maximisation (Hunter 2004) with `prior` virtual wins each way for every
    pair, as `metrics.bradley_terry`; stops early once no strength moves more than
    `tolerance`.
    """
    g, k, _ = wins.shape
    off_diagonal = 1.0 - np.eye(k)
    total = (wins + prior) * off_diagonal
    won = total.sum(axis=2)  # (G, K)
    games = total + total.transpose(0, 2, 1)  # (G, K, K)
    strength = np.ones((g, k))
    for _ in range(iterations):
        denominator = (games / (strength[:, :, None] + strength[:, None, :])).sum(axis=2)
        updated = np.where(denominator > 0, won / np.where(denominator > 0, denominator, 1), 1.0)
        updated /= np.exp(np.log(updated).mean(axis=1, keepdims=True))
        moved = np.abs(updated - strength).max() if g else 0.0
        strength = updated
        if moved < tolerance:
            break
    return strength


def consensus_places(strength: np.ndarray, present: np.ndarray) -> np.ndarray:
    """(G, K) strengths -> (G, K) places of the consensus order (strongest first, equal
    strengths in completion order); nan for completions a task does not have."""
    rounded = np.round(np.where(present, strength, -np.inf), STRENGTH_DECIMALS)
    order = np.argsort(-rounded, axis=1, kind="stable")
    places = np.empty_like(strength)
    np.put_along_axis(places, order, np.arange(1, strength.shape[1] + 1, dtype=float), axis=1)
    return np.where(present, places, np.nan)


# --- the bootstrap -----------------------------------------------------------------------


def resample_weights(n: int, resamples: int, seed: int) -> np.ndarray:
    """(R, n): how often each of n tasks is drawn in each resample (drawing n with
    replacement)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(float)


def interval(
    weights: np.ndarray,
    blocks: np.ndarray,
    statistic: Callable[[np.ndarray], np.ndarray],
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of `statistic` over resampled sums of per-task `blocks`."""
    if weights.size == 0 or len(blocks) == 0:
        return (math.nan, math.nan)
    flat = blocks.reshape(len(blocks), -1)
    sums = (weights @ flat).reshape((len(weights), *blocks.shape[1:]))
    values = np.asarray(statistic(sums), dtype=float)
    values = np.sort(values[~np.isnan(values)])
    if len(values) == 0:
        return (math.nan, math.nan)
    tail = (1 - confidence) / 2
    low = values[min(len(values) - 1, int(tail * len(values)))]
    high = values[min(len(values) - 1, int((1 - tail) * len(values)))]
    return (float(low), float(high))


def mean_blocks(values: np.ndarray) -> np.ndarray:
    """(T, 2) blocks [value, 1] for a per-task mean, [0, 0] where the value is nan."""
    finite = ~np.isnan(values)
    return np.column_stack([np.where(finite, values, 0.0), finite.astype(float)])


def mean_of_blocks(sums: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sums[..., 1] > 0, sums[..., 0] / sums[..., 1], np.nan)


def finite_or_none(value: Any) -> float | None:
    value = float(value)
    return None if math.isnan(value) else round(value, 4)
