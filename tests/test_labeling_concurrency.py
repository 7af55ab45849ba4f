"""Many labelers claiming and submitting at once, on PostgreSQL: the invariants hold.

Each labeler is a thread with its own connection, so claims really race in the database
(FOR UPDATE SKIP LOCKED); the checks afterwards read the tables directly.
"""

from __future__ import annotations

import random
import threading
from collections import Counter

import pytest
from sqlalchemy import func, select

from app.auth.models import User
from app.campaigns.models import Campaign
from app.db import Database
from app.labeling import service
from app.labeling.models import (
    Assignment,
    AssignmentState,
    Comparison,
    Judgment,
    Task,
    TaskStatus,
)
from app.labeling.schemas import JudgmentIn
from tests.factories import make_campaign, make_labeler, make_task

LABELERS = 12
TASKS = 40
OVERLAP = 3
K = 4


def labeler_loop(database: Database, user_id: int, campaign_id: int, seed: int, log: list) -> None:
    """Claim and answer until nothing is left; record every acknowledged submit."""
    rng = random.Random(seed)
    while True:
        with database.session() as db:
            user = db.get_one(User, user_id)
            campaign = db.get_one(Campaign, campaign_id)
            lease = service.next_task(db, user=user, campaign=campaign, rng=rng)
            db.commit()
            if lease is None:
                return
            key, order = lease.submit_key, list(lease.display_order)
        if rng.random() < 0.1:
            with database.session() as db:
                service.skip(db, user=db.get_one(User, user_id), submit_key=key, reason="test")
                db.commit()
            continue
        rng.shuffle(order)
        answer = JudgmentIn(ranking=[[cid] for cid in order], time_on_task_ms=5)
        repeats = 2 if rng.random() < 0.2 else 1  # a double submit, sent concurrently
        results: list[int] = []

        def send(answer: JudgmentIn = answer, key: str = key, results: list[int] = results) -> None:
            with database.session() as db:
                judgment, _ = service.submit(
                    db, user=db.get_one(User, user_id), submit_key=key, answer=answer
                )
                judgment_id = judgment.id
                db.commit()
            results.append(judgment_id)

        senders = [threading.Thread(target=send) for _ in range(repeats)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        assert len(set(results)) == 1, f"a double submit gave two judgments: {results}"
        log.append((user_id, results[0], answer.ranking))


@pytest.mark.postgres_only
def test_racing_labelers_keep_exact_overlap_and_lose_nothing(fresh_database_url):
    database = Database(fresh_database_url)
    with database.session() as db:
        campaign = make_campaign(db, overlap=OVERLAP, k=K)
        for _ in range(TASKS):
            make_task(db, campaign)
        user_ids = [make_labeler(db).id for _ in range(LABELERS)]
        campaign_id = campaign.id
        db.commit()

    log: list = []
    errors: list[BaseException] = []

    def run(user_id: int, seed: int) -> None:
        try:
            labeler_loop(database, user_id, campaign_id, seed, log)
        except BaseException as exc:  # surfaced below with the thread's traceback text
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(uid, i)) for i, uid in enumerate(user_ids)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a labeler thread hung (deadlock?)"
    assert errors == []

    with database.session() as db:
        slots = Counter(
            db.scalars(
                select(Assignment.task_id).where(
                    Assignment.state.in_([AssignmentState.active, AssignmentState.submitted])
                )
            )
        )
        tasks = db.scalars(select(Task)).all()
        for task in tasks:
            assert slots[task.id] <= task.required_judgments, f"task {task.id} over-assigned"
            assert task.assigned_count == slots[task.id]
            current = db.scalar(
                select(func.count()).where(Judgment.task_id == task.id, Judgment.is_current)
            )
            assert task.judgment_count == current
            # Everyone ran until nothing was left: every task that could fill, filled.
            assert task.status is TaskStatus.complete or slots[task.id] < task.required_judgments

        pairs = Counter(db.execute(select(Assignment.task_id, Assignment.user_id)).tuples().all())
        assert max(pairs.values()) == 1, "a task was served twice to one labeler"

        stored = {j.id: j for j in db.scalars(select(Judgment))}
        assert sorted(stored) == sorted(judgment_id for _, judgment_id, _ in log)
        for user_id, judgment_id, ranking in log:
            assert (stored[judgment_id].user_id, stored[judgment_id].ranking) == (user_id, ranking)
        per_judgment = Counter(db.scalars(select(Comparison.judgment_id)))
        assert set(per_judgment.values()) == {K * (K - 1) // 2}
        assert len(per_judgment) == len(stored)
        # With 12 labelers and overlap 3, nearly all work got done (skips leave a few gaps).
        assert sum(t.status is TaskStatus.complete for t in tasks) >= TASKS * 0.6
    database.dispose()
