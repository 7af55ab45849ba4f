"""Agreement metrics on hand-made rankings, published worked examples and reference libraries."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from krippendorff import alpha as reference_alpha
from scipy.stats import kendalltau as reference_tau
from statsmodels.stats.inter_rater import fleiss_kappa

from app.quality.metrics import (
    Vote,
    bootstrap_interval,
    bradley_terry,
    consensus,
    fleiss_kappa_pairs,
    kendall_tau,
    krippendorff_alpha,
    mean_kendall_tau,
    mean_pairwise_agreement,
    pair_choice_table,
    pair_preferences,
    pairwise_agreement,
    places,
    position_bias,
)

NAN = np.nan


def test_places_give_tied_completions_their_mean_place():
    assert places([[3], [1, 4], [2]]) == {3: 1.0, 1: 2.5, 4: 2.5, 2: 4.0}


def test_pair_preferences_cover_every_pair_once():
    assert pair_preferences([[3], [1, 4], [2]]) == {
        (1, 2): 1.0, (1, 3): 0.0, (1, 4): 0.5, (2, 3): 0.0, (2, 4): 0.0, (3, 4): 1.0,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ([[1], [2], [3]], [[1], [2], [3]], 1.0),
        ([[1], [2]], [[2], [1]], 0.0),
        ([[1], [2]], [[1, 2]], 0.5),  # a tie against a strict order counts half
        ([[1, 2]], [[1, 2]], 1.0),
        # Pairs: (1,2) same, (1,3) same, (2,3) reversed -> 2 of 3.
        ([[1], [2], [3]], [[1], [3], [2]], 2 / 3),
    ],
)
def test_pairwise_agreement_by_hand(first, second, expected):
    assert pairwise_agreement(first, second) == pytest.approx(expected)


def random_ranking(rng: random.Random, ids: list[int], tie_rate: float = 0.3) -> list[list[int]]:
    order = ids[:]
    rng.shuffle(order)
    tiers: list[list[int]] = []
    for cid in order:
        if tiers and rng.random() < tie_rate:
            tiers[-1].append(cid)
        else:
            tiers.append([cid])
    return tiers


def test_kendall_tau_b_matches_scipy_on_random_rankings_with_ties():
    rng = random.Random(7)
    ids = list(range(10, 16))
    checked = 0
    for _ in range(200):
        first, second = random_ranking(rng, ids), random_ranking(rng, ids)
        x, y = places(first), places(second)
        expected = reference_tau([x[i] for i in ids], [y[i] for i in ids], variant="b").statistic
        if math.isnan(expected):
            assert math.isnan(kendall_tau(first, second))
        else:
            assert kendall_tau(first, second) == pytest.approx(expected)
            checked += 1
    assert checked > 150


def test_krippendorff_worked_example_from_his_paper():
    """Krippendorff (2011), 'Computing Krippendorff's alpha-reliability', 4 coders x 12 units."""
    data = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, NAN, NAN, NAN],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, NAN, 3],
        [NAN, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, NAN],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, NAN],
    ]
    assert reference_alpha(reliability_data=data, level_of_measurement="ordinal") == (
        pytest.approx(0.815, abs=5e-4)
    )


def test_krippendorff_alpha_puts_each_labelers_ranks_in_one_row():
    votes = [
        Vote("t1", "ann", [[1], [2], [3]]),
        Vote("t1", "bob", [[1], [3], [2]]),
        Vote("t2", "ann", [[4], [5, 6]]),
        Vote("t2", "cid", [[5], [4], [6]]),
    ]
    # Rows: ann, bob, cid. Columns: (t1,1) (t1,2) (t1,3) (t2,4) (t2,5) (t2,6).
    data = [
        [1, 2, 3, 1, 2.5, 2.5],
        [1, 3, 2, NAN, NAN, NAN],
        [NAN, NAN, NAN, 2, 1, 3],
    ]
    expected = reference_alpha(reliability_data=data, level_of_measurement="ordinal")
    assert krippendorff_alpha(votes) == pytest.approx(expected)
    same = [Vote(t, who, [[1], [2], [3]]) for t in ("a", "b") for who in ("x", "y")]
    assert krippendorff_alpha(same) == pytest.approx(1.0)


def test_fleiss_kappa_wikipedia_example():
    """The worked example on Wikipedia's 'Fleiss' kappa' page: 10 subjects, 14 raters."""
    table = np.array(
        [
            [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
            [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
        ]
    )  # fmt: skip
    assert fleiss_kappa(table, method="fleiss") == pytest.approx(0.210, abs=5e-4)


def test_fleiss_kappa_pairs_counts_choices_per_task_pair():
    votes = [
        Vote("t", "a", [[1], [2]]),
        Vote("t", "b", [[1], [2]]),
        Vote("t", "c", [[2], [1]]),
        Vote("u", "a", [[3, 4]]),
        Vote("u", "b", [[3], [4]]),
        Vote("u", "c", [[3], [4]]),
        Vote("lonely", "a", [[5], [6]]),  # one rater: says nothing about agreement
    ]
    table = pair_choice_table(votes)
    assert sorted(map(list, table)) == [[2, 0, 1], [2, 1, 0]]
    assert fleiss_kappa_pairs(votes) == pytest.approx(fleiss_kappa(table, method="fleiss"))


def test_bradley_terry_orders_by_wins_and_consensus_scores_each_pair():
    strengths = bradley_terry({(1, 2): 9, (2, 1): 1, (2, 3): 8, (3, 2): 2, (1, 3): 10})
    assert strengths[1] > strengths[2] > strengths[3]
    assert math.prod(strengths.values()) == pytest.approx(1.0)

    result = consensus([[[1], [2], [3]], [[1], [2], [3]], [[2], [1], [3]]])
    assert result.ranking == [[1], [2], [3]]
    assert result.pair_agreement[(1, 2)] == pytest.approx(2 / 3)
    assert result.pair_agreement[(1, 3)] == pytest.approx(1.0)


def simulate(accuracy: float, tasks: int, labelers: int, seed: int) -> list[Vote]:
    """K=2 tasks; each labeler picks the better completion with probability `accuracy`."""
    rng = random.Random(seed)
    votes = []
    for task in range(tasks):
        for labeler in range(labelers):
            right = rng.random() < accuracy
            votes.append(Vote(task, labeler, [[1], [2]] if right else [[2], [1]]))
    return votes


def test_simulated_labelers_agree_as_the_analytic_expectation_says():
    accuracy = 0.8
    votes = simulate(accuracy, tasks=400, labelers=3, seed=11)
    expected = accuracy**2 + (1 - accuracy) ** 2  # both right, or both wrong: 0.68
    by_task: dict[int, list[Vote]] = {}
    for vote in votes:
        by_task.setdefault(vote.task, []).append(vote)
    groups = list(by_task.values())
    # A resample may draw a task twice: score each draw on its own, then average.
    low, high = bootstrap_interval(
        groups, lambda sample: float(np.mean([mean_pairwise_agreement(g) for g in sample])), seed=3
    )
    assert low <= expected <= high
    assert high - low < 0.1
    assert mean_kendall_tau(votes) == pytest.approx(2 * mean_pairwise_agreement(votes) - 1)


def test_bootstrap_interval_contains_the_estimate_and_is_repeatable():
    values = [0.2, 0.4, 0.5, 0.6, 0.9, 0.7, 0.3]
    mean = sum(values) / len(values)

    def statistic(sample):
        return sum(sample) / len(sample)

    interval = bootstrap_interval(values, statistic, seed=5)
    assert interval[0] <= mean <= interval[1]
    assert bootstrap_interval(values, statistic, seed=5) == interval
    assert all(math.isnan(x) for x in bootstrap_interval([], statistic))


def test_a_labeler_who_always_picks_the_first_shown_is_flagged():
    rng = random.Random(2)
    ids = [1, 2, 3, 4]
    lazy, careful = [], []
    for _ in range(60):
        shown = ids[:]
        rng.shuffle(shown)
        lazy.append((shown, [[shown[0]], *[[c] for c in shown[1:]]]))
        careful.append((shown, random_ranking(rng, ids, tie_rate=0.0)))
    biased = position_bias(lazy)
    assert (biased.rate, biased.chance, biased.flagged) == (1.0, 0.25, True)
    fair = position_bias(careful)
    assert not fair.flagged and abs(fair.rate - 0.25) < 0.15
