"""The array implementation (`app.quality.batch`) against the plain one (`app.quality.metrics`)
and the reference libraries, on random campaigns with ties, gold tasks and varied overlap."""

from __future__ import annotations

import datetime as dt
import math
import random

import numpy as np
import pytest

from app.quality import batch, metrics
from app.quality.service import JudgmentRow, _leave_one_out_agreement, task_agreement

T0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


def random_ranking(rng: random.Random, ids: list[int], tie_rate: float) -> list[list[int]]:
    order = rng.sample(ids, len(ids))
    tiers: list[list[int]] = []
    for cid in order:
        if tiers and rng.random() < tie_rate:
            tiers[-1].append(cid)
        else:
            tiers.append([cid])
    return tiers


def random_campaign(seed: int, *, tasks: int = 60, k: int = 4, tie_rate: float = 0.2):
    """Rows like load_judgments returns: 1-4 labelers per task, a few gold tasks."""
    rng = random.Random(seed)
    rows = []
    next_id = 1
    for task_id in range(100, 100 + tasks):
        ids = [task_id * 10 + c for c in range(k)]
        gold = rng.random() < 0.1
        answer = [[c] for c in rng.sample(ids, k)] if gold else None
        for user in rng.sample(range(1, 9), rng.randint(1, 4)):
            shown = rng.sample(ids, k)
            rows.append(
                JudgmentRow(
                    id=next_id,
                    task_id=task_id,
                    user_id=user,
                    ranking=random_ranking(rng, ids, tie_rate),
                    display_order=shown,
                    flags={},
                    time_on_task_ms=1000,
                    created_at=T0,
                    is_gold=gold,
                    gold_ranking=answer,
                )
            )
            next_id += 1
    return rows


def judged_of(rows):
    return batch.build(
        [r.task_id for r in rows],
        [r.ranking for r in rows],
        [r.display_order for r in rows],
        {r.task_id: r.gold_ranking for r in rows if r.is_gold},
    )


def by_task(rows, *, gold: bool = False):
    grouped: dict[int, list[JudgmentRow]] = {}
    for row in rows:
        if row.is_gold == gold:
            grouped.setdefault(row.task_id, []).append(row)
    return grouped


@pytest.mark.parametrize(("seed", "k"), [(1, 4), (2, 2), (3, 5), (4, 3)])
def test_per_task_agreement_and_tau_match_the_plain_metrics(seed, k):
    rows = random_campaign(seed, k=k)
    per_task = task_agreement(judged_of(rows))
    position = {int(t): i for i, t in enumerate(per_task.judged.task_ids)}
    checked = 0
    for task_id, task_rows in by_task(rows).items():
        votes = [metrics.Vote(task_id, r.user_id, r.ranking) for r in task_rows]
        expected_agreement = metrics.mean_pairwise_agreement(votes)
        expected_tau = metrics.mean_kendall_tau(votes)
        got_agreement = per_task.agreement[position[task_id]]
        got_tau = per_task.tau[position[task_id]]
        if len(task_rows) < 2:
            assert math.isnan(got_agreement)
            continue
        checked += 1
        assert got_agreement == pytest.approx(expected_agreement, abs=1e-12)
        if math.isnan(expected_tau):
            assert math.isnan(got_tau)
        else:
            assert got_tau == pytest.approx(expected_tau, abs=1e-12)
    assert checked > 20
    # Gold tasks never count in the agreement between labelers.
    for task_id in by_task(rows, gold=True):
        assert math.isnan(per_task.agreement[position[task_id]])


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_alpha_from_coincidences_matches_the_krippendorff_package(seed):
    rows = random_campaign(seed, tasks=80)
    per_task = task_agreement(judged_of(rows))
    judged = per_task.judged
    counts = batch.value_counts(judged, per_task.regular)
    blocks = batch.coincidence_blocks(counts, judged.k)
    ours = float(batch.alpha_from_coincidences(blocks.sum(axis=0)))
    votes = [
        metrics.Vote(r.task_id, r.user_id, r.ranking)
        for task_rows in by_task(rows).values()
        for r in task_rows
    ]
    assert ours == pytest.approx(batch.alpha_reference(counts, judged.k), abs=1e-9)
    assert ours == pytest.approx(metrics.krippendorff_alpha(votes), abs=1e-9)


@pytest.mark.parametrize("seed", [8, 9, 10])
def test_kappa_from_blocks_matches_statsmodels(seed):
    rows = random_campaign(seed, tasks=80)
    per_task = task_agreement(judged_of(rows))
    choices = batch.choice_counts(per_task.judged, per_task.regular)
    raters = batch.modal_raters(choices)
    blocks, table = batch.kappa_blocks(choices, raters)
    ours = float(batch.kappa_from_blocks(blocks.sum(axis=0), raters))
    votes = [
        metrics.Vote(r.task_id, r.user_id, r.ranking)
        for task_rows in by_task(rows).values()
        for r in task_rows
    ]
    assert ours == pytest.approx(batch.kappa_reference(table), abs=1e-9)
    assert ours == pytest.approx(metrics.fleiss_kappa_pairs(votes), abs=1e-9)


def test_a_bootstrap_resample_is_the_statistic_of_the_resampled_tasks():
    """One row of resample weights gives exactly what recomputing on those tasks (drawn with
    repetition, each draw its own task) gives."""
    rows = random_campaign(11, tasks=40)
    per_task = task_agreement(judged_of(rows))
    judged, shared = per_task.judged, per_task.shared
    counts = batch.value_counts(judged, per_task.regular)
    blocks = batch.coincidence_blocks(counts, judged.k)[shared]
    weights = batch.resample_weights(len(shared), 3, seed=0)
    grouped = by_task(rows)
    for draw in weights:
        sums = draw @ blocks.reshape(len(shared), -1)
        ours = float(batch.alpha_from_coincidences(sums.reshape(blocks.shape[1:])))
        # The same resample, spelled out: each drawn task copied `count` times as new units.
        matrix_blocks = []
        labelers = sorted({r.user_id for r in rows})
        for index, count in enumerate(draw.astype(int)):
            task_id = int(judged.task_ids[shared[index]])
            votes = [metrics.Vote(task_id, r.user_id, r.ranking) for r in grouped[task_id]]
            matrix_blocks += [metrics.rank_matrix(votes, labelers)] * count
        expected = metrics.alpha_from_matrix(np.hstack(matrix_blocks))
        assert ours == pytest.approx(expected, abs=1e-9)
        mean = batch.mean_of_blocks(draw @ batch.mean_blocks(per_task.agreement[shared]))
        direct = np.repeat(per_task.agreement[shared], draw.astype(int))
        assert float(mean) == pytest.approx(float(np.nanmean(direct)), abs=1e-12)


def test_bradley_terry_and_consensus_match_the_plain_version_task_by_task():
    rows = random_campaign(12, tasks=50, tie_rate=0.3)
    judged = judged_of(rows)
    wins = np.zeros((len(judged.task_ids), judged.k, judged.k))
    np.add.at(wins, judged.task, batch.win_matrices(judged.pref, judged.pair_a, judged.pair_b, 4))
    strengths = batch.bradley_terry(wins)
    places = batch.consensus_places(strengths, judged.completion_ids >= 0)
    grouped = {**by_task(rows), **by_task(rows, gold=True)}
    for index, task_id in enumerate(judged.task_ids.tolist()):
        rankings = [r.ranking for r in grouped[task_id]]
        plain = metrics.consensus(rankings)
        ids = judged.completion_ids[index].tolist()
        for local, cid in enumerate(ids):
            assert strengths[index, local] == pytest.approx(plain.strengths[cid], rel=1e-6)
        expected_places = metrics.places(plain.ranking)
        assert [expected_places[cid] for cid in ids] == places[index].tolist()


def test_leave_one_out_agreement_is_agreement_with_the_others_consensus():
    rows = random_campaign(13, tasks=50)
    per_task = task_agreement(judged_of(rows))
    got = _leave_one_out_agreement(per_task)
    grouped = by_task(rows)
    checked = 0
    for index, row in enumerate(rows):
        others = [o.ranking for o in grouped.get(row.task_id, []) if o.user_id != row.user_id]
        if row.is_gold or not others:
            assert math.isnan(got[index])
            continue
        expected = metrics.pairwise_agreement(row.ranking, metrics.consensus(others).ranking)
        assert got[index] == pytest.approx(expected, abs=1e-12)
        checked += 1
    assert checked > 50


def test_build_numbers_completions_per_task_and_reads_display_order():
    rows = random_campaign(14, tasks=3, k=3)
    judged = judged_of(rows)
    first = rows[0]
    index = {int(t): i for i, t in enumerate(judged.task_ids)}[first.task_id]
    ids = judged.completion_ids[index].tolist()
    assert ids == sorted(ids)
    assert judged.first_shown[0] == ids.index(first.display_order[0])
    place = metrics.places(first.ranking)
    assert judged.places[0].tolist() == [place[cid] for cid in ids]
