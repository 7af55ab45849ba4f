"""The labeler x labeler agreement matrix and the daily trend, on hand-made judgments whose
figures are worked out below, against a one-pair-at-a-time reference on random ones, and
through the report and the dashboard on both backends."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import random
import statistics
from collections import defaultdict
from itertools import combinations

import pytest

from app.quality import metrics, trends
from app.quality.service import JudgmentRow, quality_report

UTC = dt.UTC
ALICE, BOB, CAROL = 3, 1, 2  # ids out of username order on purpose
NAMES = {ALICE: "alice", BOB: "bob", CAROL: "carol"}


def row(
    id_: int,
    task: int,
    user: int,
    ranking: list[list[int]],
    at: dt.datetime,
    *,
    ms: int = 1000,
    gold: bool = False,
) -> JudgmentRow:
    order = sorted(c for tier in ranking for c in tier)
    return JudgmentRow(id_, task, user, ranking, order, {}, ms, at, gold, None)


def at(day: int, hour: int = 12) -> dt.datetime:
    return dt.datetime(2026, 3, day, hour, tzinfo=UTC)


# Task 10 (completions 101..103): alice 101>102>103; bob 101>103>102; carol 101=102>103.
#   pairs (101,102) (101,103) (102,103):  alice 1 1 1 | bob 1 1 0 | carol .5 1 1
#   alice-bob 2/3; alice-carol (0.5+1+1)/3 = 5/6; bob-carol (0.5+1+0)/3 = 1/2.
# Task 11 (111..113): alice and bob both 113>112>111: 1.
# Task 12 is gold: alice and bob disagree completely, and that must not count anywhere.
ROWS = [
    row(1, 10, ALICE, [[101], [102], [103]], at(1, 10), ms=1000),
    row(2, 11, ALICE, [[113], [112], [111]], at(1, 8), ms=2000),
    row(3, 12, ALICE, [[121], [122], [123]], at(1, 11), ms=30000, gold=True),
    row(4, 10, BOB, [[101], [103], [102]], at(1, 12), ms=4000),
    row(5, 11, BOB, [[113], [112], [111]], at(3, 15), ms=2500),
    row(6, 12, BOB, [[123], [122], [121]], at(3, 16), ms=10000, gold=True),
    row(7, 10, CAROL, [[101, 102], [103]], at(3, 9), ms=1500),
]


def cell(matrix: dict, a: int, b: int) -> dict:
    ids = [labeler["id"] for labeler in matrix["labelers"]]
    return matrix["cells"][ids.index(a)][ids.index(b)]


def test_matrix_by_hand_ties_count_half_and_gold_is_ignored():
    matrix = trends.labeler_matrix(ROWS, NAMES)
    assert matrix["labelers"] == [
        {"id": ALICE, "username": "alice"},
        {"id": BOB, "username": "bob"},
        {"id": CAROL, "username": "carol"},
    ]
    assert cell(matrix, ALICE, BOB) == {"agreement": round((2 / 3 + 1) / 2, 4), "tasks": 2}
    assert cell(matrix, ALICE, CAROL) == {"agreement": 0.8333, "tasks": 1}
    assert cell(matrix, BOB, CAROL) == {"agreement": 0.5, "tasks": 1}
    # Diagonal: no agreement, and the labeler's own non-gold tasks.
    assert cell(matrix, ALICE, ALICE) == {"agreement": None, "tasks": 2}
    assert cell(matrix, CAROL, CAROL) == {"agreement": None, "tasks": 1}
    cells = matrix["cells"]
    assert all(cells[i][j] == cells[j][i] for i in range(3) for j in range(3))


def test_matrix_without_shared_tasks_and_unknown_names():
    rows = [
        row(1, 10, 7, [[1], [2]], at(1)),
        row(2, 11, 8, [[3], [4]], at(1)),
        row(3, 12, 7, [[5]], at(1)),  # one completion: no pair to agree on
        row(4, 12, 9, [[5]], at(1)),
    ]
    matrix = trends.labeler_matrix(rows, {8: "zed"})
    # Unnamed labelers go by their id, and sort as such.
    assert [labeler["username"] for labeler in matrix["labelers"]] == ["7", "9", "zed"]
    assert cell(matrix, 7, 8) == {"agreement": None, "tasks": 0}
    # They share task 12, but it has no pair of completions: counted, not scored.
    assert cell(matrix, 7, 9) == {"agreement": None, "tasks": 1}
    assert trends.labeler_matrix([], {}) == {"labelers": [], "cells": []}


def test_rankings_over_different_completions_compare_on_the_shared_pairs():
    rows = [
        row(1, 10, 1, [[1], [2], [3]], at(1)),
        row(2, 10, 2, [[2], [1]], at(1)),  # the task lost completion 3 in between
    ]
    assert cell(trends.labeler_matrix(rows, {}), 1, 2) == {"agreement": 0.0, "tasks": 1}


def test_one_judgment_per_labeler_and_task_the_last_counts():
    rows = [
        row(1, 10, 1, [[1], [2]], at(1)),
        row(2, 10, 2, [[2], [1]], at(1)),
        row(3, 10, 2, [[1], [2]], at(2)),  # should never both be current; if so, this one
    ]
    matrix = trends.labeler_matrix(rows, {})
    assert cell(matrix, 1, 2) == {"agreement": 1.0, "tasks": 1}
    assert cell(matrix, 2, 2) == {"agreement": None, "tasks": 1}


def test_daily_trend_by_hand_gap_filled_pairs_on_the_later_day():
    trend = trends.daily_trend(ROWS)
    assert trend == [
        {
            # alice 10, 11, gold 12 and bob 10; times 1, 2, 30, 4 s: median (2 + 4) / 2.
            "day": "2026-03-01",
            "judgments": 4,
            "labelers": 2,
            "median_seconds": 3.0,
            # alice-bob on task 10 exists once bob has judged it, the same day.
            "agreement": 0.6667,
            "pairs": 1,
        },
        {
            "day": "2026-03-02",
            "judgments": 0,
            "labelers": 0,
            "median_seconds": None,
            "agreement": None,
            "pairs": 0,
        },
        {
            # bob 11, gold 12 and carol 10; times 2.5, 10, 1.5 s.
            "day": "2026-03-03",
            "judgments": 3,
            "labelers": 2,
            "median_seconds": 2.5,
            # alice-bob on 11 (bob's day), alice-carol and bob-carol on 10 (carol's day).
            "agreement": round((1 + 5 / 6 + 0.5) / 3, 4),
            "pairs": 3,
        },
    ]


def test_daily_trend_takes_the_later_judgment_by_time_not_by_id():
    rows = [
        row(1, 10, 1, [[1], [2]], at(5)),
        row(2, 10, 2, [[1], [2]], at(2)),  # made earlier, stored later (an import, say)
    ]
    trend = trends.daily_trend(rows)
    assert [(d["day"], d["judgments"], d["pairs"]) for d in trend] == [
        ("2026-03-02", 1, 0),
        ("2026-03-03", 0, 0),
        ("2026-03-04", 0, 0),
        ("2026-03-05", 1, 1),
    ]
    assert trend[-1]["agreement"] == 1.0


def test_daily_trend_groups_by_utc_day():
    new_york = dt.timezone(dt.timedelta(hours=-5))
    rows = [
        # 23:30 in New York is 04:30 the next day in UTC.
        row(1, 10, 1, [[1], [2]], dt.datetime(2026, 3, 1, 23, 30, tzinfo=new_york)),
        row(2, 10, 2, [[2], [1]], dt.datetime(2026, 3, 2, 1, 0)),  # naive: taken as UTC
    ]
    trend = trends.daily_trend(rows)
    assert [(d["day"], d["judgments"], d["labelers"]) for d in trend] == [("2026-03-02", 2, 2)]
    assert (trend[0]["agreement"], trend[0]["pairs"]) == (0.0, 1)
    assert trends.daily_trend([]) == []


def test_matrix_and_trend_together_equal_the_two_apart():
    assert trends.matrix_and_trend(ROWS, NAMES) == (
        trends.labeler_matrix(ROWS, NAMES),
        trends.daily_trend(ROWS),
    )


# --- against a reference that scores one pair at a time -----------------------------------


def random_rows(seed: int) -> tuple[list[JudgmentRow], dict[int, str]]:
    rng = random.Random(seed)
    start = dt.datetime(2026, 1, 1, tzinfo=UTC)
    rows = []
    for task in range(rng.randint(1, 120)):
        k = rng.choice([2, 3, 4, 4, 5])
        completions = [task * 10 + i for i in range(k)]
        gold = rng.random() < 0.1
        for user in rng.sample(range(1, 9), rng.randint(1, 4)):
            shown = completions[:]
            if rng.random() < 0.05:
                shown.pop()  # now and then a ranking misses a completion
            rng.shuffle(shown)
            ranking: list[list[int]] = []
            for cid in shown:
                if ranking and rng.random() < 0.25:
                    ranking[-1].append(cid)
                else:
                    ranking.append([cid])
            moment = start + dt.timedelta(minutes=rng.randint(0, 60 * 24 * 9))
            rows.append(
                JudgmentRow(
                    0, task, user, ranking, shown, {}, rng.randint(0, 60_000), moment, gold, None
                )
            )
    rng.shuffle(rows)  # ids in the rows' order, times in any order
    rows = [dataclasses.replace(r, id=i + 1) for i, r in enumerate(rows)]
    names = {user: f"user-{rng.randint(0, 99):02d}" for user in range(1, 9)}
    return rows, names


def reference(rows: list[JudgmentRow], names: dict[int, str]) -> tuple[dict, list]:
    """The same figures, one pair at a time with metrics.pairwise_agreement."""
    by_task: dict[int, list[JudgmentRow]] = defaultdict(list)
    for r in rows:
        if not r.is_gold:
            by_task[r.task_id].append(r)
    shared: dict[frozenset, int] = defaultdict(int)
    scores: dict[frozenset, list[float]] = defaultdict(list)
    per_day: dict[dt.date, list[float]] = defaultdict(list)
    for task_rows in by_task.values():
        for a, b in combinations(task_rows, 2):
            key = frozenset((a.user_id, b.user_id))
            shared[key] += 1
            value = metrics.pairwise_agreement(a.ranking, b.ranking)
            if not math.isnan(value):
                scores[key].append(value)
                per_day[max(a.created_at, b.created_at).date()].append(value)
    users = sorted({r.user_id for r in rows}, key=lambda u: (names.get(u, str(u)), u))
    cells = [
        [
            {
                "agreement": None,
                "tasks": len({r.task_id for r in rows if r.user_id == a and not r.is_gold}),
            }
            if a == b
            else {
                "agreement": round(sum(s) / len(s), 4)
                if (s := scores[frozenset((a, b))])
                else None,
                "tasks": shared[frozenset((a, b))],
            }
            for b in users
        ]
        for a in users
    ]
    days = sorted({r.created_at.date() for r in rows})
    trend = []
    day = days[0]
    while day <= days[-1]:
        mine = [r for r in rows if r.created_at.date() == day]
        pairs = per_day[day]
        trend.append(
            {
                "day": day.isoformat(),
                "judgments": len(mine),
                "labelers": len({r.user_id for r in mine}),
                "median_seconds": round(
                    statistics.median(r.time_on_task_ms for r in mine) / 1000, 1
                )
                if mine
                else None,
                "agreement": round(sum(pairs) / len(pairs), 4) if pairs else None,
                "pairs": len(pairs),
            }
        )
        day += dt.timedelta(days=1)
    labelers = [{"id": u, "username": names.get(u, str(u))} for u in users]
    return {"labelers": labelers, "cells": cells}, trend


@pytest.mark.parametrize("seed", range(12))
def test_arrays_agree_with_one_pair_at_a_time(seed):
    rows, names = random_rows(seed)
    expected_matrix, expected_trend = reference(rows, names)
    matrix, trend = trends.labeler_matrix(rows, names), trends.daily_trend(rows)
    # Sums in another order may round a 4th decimal the other way: one unit is allowed.
    close = pytest.approx
    assert matrix["labelers"] == expected_matrix["labelers"]
    for line, expected_line in zip(matrix["cells"], expected_matrix["cells"], strict=True):
        for got, expected in zip(line, expected_line, strict=True):
            assert got["tasks"] == expected["tasks"]
            assert (got["agreement"] is None) == (expected["agreement"] is None)
            assert got["agreement"] == close(expected["agreement"], abs=1.01e-4)
    assert [{**d, "agreement": None} for d in trend] == [
        {**d, "agreement": None} for d in expected_trend
    ]
    for got, expected in zip(trend, expected_trend, strict=True):
        assert got["agreement"] == close(expected["agreement"], abs=1.01e-4)


# --- through the report and the dashboard (both backends) ---------------------------------


def test_report_carries_matrix_and_trend(db, judged):
    campaign, careful, lazy = judged
    report = quality_report(db, campaign, resamples=10)
    matrix = report["matrix"]
    assert [labeler["username"] for labeler in matrix["labelers"]] == sorted(
        [*(u.username for u in careful), lazy.username]
    )
    # The careful labelers rank by the true order: they agree on every task they share.
    first, second = (u.id for u in careful[:2])
    assert cell(matrix, first, second) == {"agreement": 1.0, "tasks": 30}
    assert cell(matrix, lazy.id, first)["agreement"] < 1.0
    assert sum(day["judgments"] for day in report["trend"]) == 4 * 31  # 30 tasks and a gold
    assert sum(day["pairs"] for day in report["trend"]) == 6 * 30  # four labelers a task


def test_dashboard_shows_the_heatmap_and_the_daily_table(client, db, judged, as_role):
    campaign, _, lazy = judged
    as_role("admin")
    page = client.get(f"/admin/campaigns/{campaign.slug}/quality")
    assert page.status_code == 200
    html = page.text
    assert 'data-testid="agreement-matrix"' in html
    assert f'href="/admin/campaigns/{campaign.slug}/labelers/{lazy.id}"' in html
    assert "100 %" in html  # careful x careful
    assert 'id="quality-data" type="application/json"' in html
    assert "/static/vendor/chart.umd.min.js" in html
    assert 'data-testid="daily-table"' in html
    assert 'style="' not in html  # the CSP forbids inline styles
