"""Who agrees with whom, and how agreement and throughput move day by day.

Both views score pairs of judgments: two labelers' current judgments of one non-gold task,
scored with `metrics.pairwise_agreement` (the share of completion pairs they order the same
way, a tie against a strict order counting half).

A campaign can hold 100,000 judgments, so the scoring is done on arrays rather than one pair
at a time: every ranking is flattened once into its completions (sorted by id) and their
places, the pairs are drawn task by task from one sort by task, and all pairs over the same
K completions are scored together from their place vectors. Pairs of rankings over different
completion sets (a rare edit of a task between two judgments) go through
`metrics.pairwise_agreement` one by one. `tests/test_quality_trends.py` checks the arrays
against that function on random rankings with ties.

With 100,000 judgments (K=4, overlap 3, ~33k tasks, 30 labelers) on a 2-core machine,
`labeler_matrix` takes ~0.16 s and `daily_trend` ~0.2 s; `matrix_and_trend` gives both in
~0.2 s, since most of the time goes into reading the rows and scoring the pairs.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter, methodcaller
from typing import TYPE_CHECKING, Any

import numpy as np

from app.quality import metrics

if TYPE_CHECKING:
    from collections.abc import Sequence

    from app.quality.service import JudgmentRow


def _round(x: float) -> float | None:
    """Like service._value: 4 places, None for an undefined figure."""
    return None if math.isnan(x) else round(float(x), 4)


@dataclass(frozen=True)
class _Places:
    """Every ranking flattened: completion ids sorted by id within each ranking, their
    places (1 = best, ties share the mean place), and where each ranking starts and ends."""

    completion: np.ndarray
    place: np.ndarray
    offset: np.ndarray
    length: np.ndarray

    @classmethod
    def of(cls, rankings: Sequence[metrics.Ranking]) -> _Places:
        n = len(rankings)
        tier_count = np.fromiter(map(len, rankings), np.int64, n)
        completion = np.fromiter(chain.from_iterable(chain.from_iterable(rankings)), np.int64)
        tier_row = np.repeat(np.arange(n), tier_count)
        tier_size = np.fromiter(map(len, chain.from_iterable(rankings)), np.int64, len(tier_row))
        length = np.bincount(tier_row, weights=tier_size, minlength=n).astype(np.int64)
        offset = np.cumsum(length) - length
        before = np.cumsum(tier_size) - tier_size  # completions ahead of the tier, all rankings
        tier_place = before - offset[tier_row] + 1 + (tier_size - 1) / 2  # as metrics.places
        place = np.repeat(tier_place, tier_size)
        if n and (length == length[0]).all():  # the usual case: K completions each
            k = int(length[0])
            order = (np.argsort(completion.reshape(n, k), axis=1) + offset[:, None]).ravel()
        else:
            order = np.lexsort((completion, np.repeat(np.arange(n), length)))
        return cls(completion[order], place[order], offset, length)


def _scores(
    rows: Sequence[JudgmentRow], places: _Places, first: np.ndarray, second: np.ndarray
) -> np.ndarray:
    """`metrics.pairwise_agreement` of each pair of rows, vectorised over rankings of the
    same K completions."""
    score = np.full(len(first), np.nan)
    done = np.zeros(len(first), bool)
    k_first, k_second = places.length[first], places.length[second]
    for k in np.unique(k_first):
        k = int(k)
        which = np.flatnonzero((k_first == k) & (k_second == k))
        if k < 2 or not len(which):
            continue
        columns = np.arange(k)
        a = places.offset[first[which]][:, None] + columns  # (pairs, K) positions
        b = places.offset[second[which]][:, None] + columns
        same = (places.completion[a] == places.completion[b]).all(axis=1)
        which, a, b = which[same], a[same], b[same]
        i, j = np.triu_indices(k, 1)  # completion pairs (i, j), i < j by id
        # metrics.pair_preferences: 1 if i ranks above j, 0 if below, 0.5 if tied.
        left = 0.5 + 0.5 * np.sign(places.place[a][:, j] - places.place[a][:, i])
        right = 0.5 + 0.5 * np.sign(places.place[b][:, j] - places.place[b][:, i])
        score[which] = (1.0 - np.abs(left - right)).mean(axis=1)
        done[which] = True
    for index in np.flatnonzero(~done):  # different completion sets, or fewer than two
        score[index] = metrics.pairwise_agreement(
            rows[first[index]].ranking, rows[second[index]].ranking
        )
    return score


class _Judgments:
    """The rows as arrays (one entry per row, in the rows' order) and every pair of
    judgments on one non-gold task by two labelers, scored: what both views are made of.

    Rows are taken to be in id order, as `service.load_judgments` gives them: of two
    current judgments by one labeler of one task (an edit supersedes, so there should not
    be two) the later in the list counts.
    """

    def __init__(self, rows: Sequence[JudgmentRow]) -> None:
        n = len(rows)
        self.rows = rows
        self.task = np.fromiter(map(attrgetter("task_id"), rows), np.int64, n)
        self.user = np.fromiter(map(attrgetter("user_id"), rows), np.int64, n)
        gold = np.fromiter(map(attrgetter("is_gold"), rows), bool, n)
        # The rows that take part, sorted by task: one per labeler and non-gold task.
        order = np.lexsort((self.user, self.task))  # stable: the rows' order within a labeler
        order = order[~gold[order]]
        task, user = self.task[order], self.user[order]
        last = np.ones(len(order), bool)
        last[:-1] = (task[1:] != task[:-1]) | (user[1:] != user[:-1])
        self.judged = order[last]
        self.first, self.second = self._pair_indexes()
        places = _Places.of(list(map(attrgetter("ranking"), rows)))
        # nan where the two rankings share no pair of completions
        self.score = _scores(rows, places, self.first, self.second)

    def _pair_indexes(self) -> tuple[np.ndarray, np.ndarray]:
        """Every two judged rows of one task."""
        tasks = self.task[self.judged]
        starts = np.flatnonzero(np.r_[True, tasks[1:] != tasks[:-1]]) if len(tasks) else tasks
        sizes = np.diff(np.r_[starts, len(tasks)])
        firsts, seconds = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
        for size in np.unique(sizes[sizes >= 2]):  # usually one size: the campaign's overlap
            base = starts[sizes == size][:, None]
            i, j = np.triu_indices(int(size), 1)
            firsts.append(self.judged[(base + i).ravel()])
            seconds.append(self.judged[(base + j).ravel()])
        return np.concatenate(firsts), np.concatenate(seconds)


def labeler_matrix(rows: list[JudgmentRow], names: dict[int, str]) -> dict[str, Any]:
    """Mean pairwise agreement between every two labelers over the non-gold tasks both judged.

    `cells[i][j]` is `{"agreement": mean or None, "tasks": shared tasks}`, symmetric, in the
    order of `labelers` (by username, then id). On the diagonal agreement is None and `tasks`
    counts the labeler's own non-gold tasks: the most they can share with anyone. A task
    whose two rankings share no pair of completions counts in `tasks` but not in the mean;
    agreement is None when no shared task has a score.
    """
    return _matrix(_Judgments(rows), names)


def daily_trend(rows: list[JudgmentRow]) -> list[dict[str, Any]]:
    """One entry per UTC day from the first judgment's to the last's, gaps filled.

    - `judgments`, `labelers`: judgments made that day (gold included) and by how many people;
    - `median_seconds`: their median time on task (1 decimal), None on a day without any;
    - `agreement`, `pairs`: two labelers' judgments of one non-gold task form a pair, scored
      with `metrics.pairwise_agreement` and counted once, on the day the later of the two was
      made (the day the pair came to exist). `agreement` is the day's mean, None without
      pairs. A pair whose rankings share no pair of completions is not counted.
    """
    return _trend(_Judgments(rows))


def matrix_and_trend(
    rows: list[JudgmentRow], names: dict[int, str]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`labeler_matrix` and `daily_trend` at once, scoring the pairs of judgments once."""
    judgments = _Judgments(rows)
    return _matrix(judgments, names), _trend(judgments)


def _matrix(judgments: _Judgments, names: dict[int, str]) -> dict[str, Any]:
    user_ids, user_row = np.unique(judgments.user, return_inverse=True)
    ordered = sorted(user_ids.tolist(), key=lambda uid: (names.get(uid, str(uid)), uid))
    position = {uid: i for i, uid in enumerate(ordered)}
    index = np.array([position[uid] for uid in user_ids.tolist()], np.int64)[user_row]
    m = len(ordered)

    i, j = index[judgments.first], index[judgments.second]
    cell = np.minimum(i, j) * m + np.maximum(i, j)  # in the upper triangle
    scored = ~np.isnan(judgments.score)

    def per_cell(keys: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        upper = np.bincount(keys, weights, minlength=m * m).reshape(m, m)
        return upper + upper.T  # symmetric; the diagonal stays 0

    shared = per_cell(cell)
    count = per_cell(cell[scored])
    total = per_cell(cell[scored], judgments.score[scored])
    own = np.bincount(index[judgments.judged], minlength=m)
    cells = [
        [
            {"agreement": None, "tasks": int(own[a])}
            if a == b
            else {
                "agreement": _round(total[a, b] / count[a, b]) if count[a, b] else None,
                "tasks": int(shared[a, b]),
            }
            for b in range(m)
        ]
        for a in range(m)
    ]
    return {
        "labelers": [{"id": uid, "username": names.get(uid, str(uid))} for uid in ordered],
        "cells": cells,
    }


def _utc_days(rows: Sequence[JudgmentRow]) -> np.ndarray:
    """The proleptic ordinal of each row's UTC day (a naive created_at is taken as UTC)."""
    moments = list(map(attrgetter("created_at"), rows))
    if not set(map(attrgetter("tzinfo"), moments)) <= {dt.UTC, None}:
        moments = [m.astimezone(dt.UTC) if m.tzinfo else m for m in moments]
    return np.fromiter(map(methodcaller("toordinal"), moments), np.int64, len(moments))


def _trend(judgments: _Judgments) -> list[dict[str, Any]]:
    rows = judgments.rows
    if not rows:
        return []
    n = len(rows)
    ordinal = _utc_days(rows)
    first_day = int(ordinal.min())
    day = ordinal - first_day
    days = int(day.max()) + 1

    count = np.bincount(day, minlength=days)
    _, user_row = np.unique(judgments.user, return_inverse=True)
    users = int(user_row.max()) + 1
    labelers = np.bincount(np.unique(day * users + user_row) // users, minlength=days)
    millis = np.fromiter(map(attrgetter("time_on_task_ms"), rows), np.int64, n)
    sorted_millis = millis[np.lexsort((millis, day))].tolist()  # by day, then by time
    starts = (np.cumsum(count) - count).tolist()

    # A pair comes to exist with the later of its two judgments: on the later day.
    pair_day = np.maximum(day[judgments.first], day[judgments.second])
    scored = ~np.isnan(judgments.score)
    pairs = np.bincount(pair_day[scored], minlength=days)
    total = np.bincount(pair_day[scored], judgments.score[scored], minlength=days)

    out = []
    for d in range(days):
        made, start, size = int(pairs[d]), starts[d], int(count[d])
        if size:  # the median of the day's slice, as statistics.median takes it
            middle = sorted_millis[start + (size - 1) // 2] + sorted_millis[start + size // 2]
            median = round(middle / 2 / 1000, 1)
        else:
            median = None
        out.append(
            {
                "day": dt.date.fromordinal(first_day + d).isoformat(),
                "judgments": size,
                "labelers": int(labelers[d]),
                "median_seconds": median,
                "agreement": _round(total[d] / made) if made else None,
                "pairs": made,
            }
        )
    return out
