"""Assignment, leases, submits, skips and edits at the service level, on both backends."""

from __future__ import annotations

import datetime as dt
import random

import pytest
from sqlalchemy import func, select

from app.audit.models import AuditEvent
from app.campaigns.models import CampaignMode, CampaignStatus
from app.db import utcnow
from app.labeling import service
from app.labeling.models import (
    Assignment,
    AssignmentState,
    Comparison,
    Completion,
    CompletionSource,
    Judgment,
    Task,
    TaskStatus,
)
from app.labeling.schemas import EditIn, JudgmentIn
from tests.factories import make_campaign, make_labeler, make_task


def rank_all(assignment: Assignment) -> JudgmentIn:
    """Rank the completions in the order shown, no ties."""
    return JudgmentIn(ranking=[[cid] for cid in assignment.display_order], time_on_task_ms=1500)


def test_exact_overlap_counts_leases_and_never_repeats_a_labeler(db):
    campaign = make_campaign(db, overlap=2)
    task = make_task(db, campaign)
    a, b, c = (make_labeler(db) for _ in range(3))

    lease_a = service.next_task(db, user=a, campaign=campaign)
    lease_b = service.next_task(db, user=b, campaign=campaign)
    assert lease_a.task_id == lease_b.task_id == task.id
    # Two live leases fill the task: the third labeler gets nothing.
    assert service.next_task(db, user=c, campaign=campaign) is None
    # A reload gives the same lease back, not a second one.
    assert service.next_task(db, user=a, campaign=campaign).id == lease_a.id

    service.submit(db, user=a, submit_key=lease_a.submit_key, answer=rank_all(lease_a))
    # The labeler who submitted never sees the task again.
    assert service.next_task(db, user=a, campaign=campaign) is None
    db.refresh(task)
    assert (task.assigned_count, task.judgment_count, task.status) == (2, 1, TaskStatus.open)

    service.submit(db, user=b, submit_key=lease_b.submit_key, answer=rank_all(lease_b))
    db.refresh(task)
    assert (task.judgment_count, task.status) == (2, TaskStatus.complete)


def test_display_order_is_a_shuffle_per_labeler_and_recorded(db):
    campaign = make_campaign(db, overlap=20, k=6)
    task = make_task(db, campaign)
    canonical = [item.completion_id for item in task.items]
    orders = set()
    for seed in range(12):
        lease = service.next_task(
            db, user=make_labeler(db), campaign=campaign, rng=random.Random(seed)
        )
        assert sorted(lease.display_order) == sorted(canonical)
        orders.add(tuple(lease.display_order))
    assert len(orders) > 6  # 720 orders: twelve draws that mostly differ


def test_priority_then_age_decides_what_is_served(db):
    campaign = make_campaign(db, overlap=1)
    low = make_task(db, campaign, priority=0)
    high = make_task(db, campaign, priority=5)
    also_low = make_task(db, campaign, priority=0)
    served = [
        service.next_task(db, user=make_labeler(db), campaign=campaign).task_id for _ in range(3)
    ]
    assert served == [high.id, low.id, also_low.id]


def test_expired_lease_frees_the_slot_and_a_late_submit_is_refused(db):
    campaign = make_campaign(db, overlap=1, lease_minutes=10)
    make_task(db, campaign)
    slow, quick = make_labeler(db), make_labeler(db)
    start = utcnow()
    lease = service.next_task(db, user=slow, campaign=campaign, now=start)
    assert service.next_task(db, user=quick, campaign=campaign, now=start) is None

    later = start + dt.timedelta(minutes=11)
    taken = service.next_task(db, user=quick, campaign=campaign, now=later)
    assert taken is not None and taken.task_id == lease.task_id
    db.refresh(lease)
    assert lease.state is AssignmentState.expired

    with pytest.raises(service.Conflict, match="went to another labeler"):
        service.submit(
            db, user=slow, submit_key=lease.submit_key, answer=rank_all(lease), now=later
        )


def test_expired_lease_whose_slot_is_still_free_may_submit(db):
    campaign = make_campaign(db, overlap=1, lease_minutes=10)
    task = make_task(db, campaign)
    labeler = make_labeler(db)
    start = utcnow()
    lease = service.next_task(db, user=labeler, campaign=campaign, now=start)
    later = start + dt.timedelta(minutes=30)
    assert service.expire_leases(db, now=later) == 1
    db.refresh(task)
    assert task.assigned_count == 0

    _, created = service.submit(
        db, user=labeler, submit_key=lease.submit_key, answer=rank_all(lease), now=later
    )
    assert created
    db.refresh(task)
    assert (task.assigned_count, task.status) == (1, TaskStatus.complete)


def test_skip_frees_the_slot_and_the_task_does_not_come_back(db):
    campaign = make_campaign(db, overlap=1)
    task = make_task(db, campaign)
    skipper, other = make_labeler(db), make_labeler(db)
    lease = service.next_task(db, user=skipper, campaign=campaign)
    service.skip(db, user=skipper, submit_key=lease.submit_key, reason="Outside my expertise")
    assert lease.state is AssignmentState.skipped and lease.skip_reason == "Outside my expertise"
    assert service.next_task(db, user=skipper, campaign=campaign) is None
    assert service.next_task(db, user=other, campaign=campaign).task_id == task.id
    with pytest.raises(service.Conflict, match="skipped"):
        service.submit(db, user=skipper, submit_key=lease.submit_key, answer=rank_all(lease))


def test_submit_is_idempotent_and_a_different_answer_under_the_same_key_is_refused(db):
    campaign = make_campaign(db, overlap=1, k=3)
    make_task(db, campaign)
    labeler = make_labeler(db)
    lease = service.next_task(db, user=labeler, campaign=campaign)
    answer = rank_all(lease)
    first, created = service.submit(db, user=labeler, submit_key=lease.submit_key, answer=answer)
    retry = answer.model_copy(update={"time_on_task_ms": 1700})  # a retry may re-measure time
    again, created_again = service.submit(
        db, user=labeler, submit_key=lease.submit_key, answer=retry
    )
    assert created and not created_again and again.id == first.id
    assert db.scalar(select(func.count()).select_from(Judgment)) == 1

    reversed_answer = JudgmentIn(ranking=list(reversed(answer.ranking)))
    with pytest.raises(service.Conflict, match="different answer"):
        service.submit(db, user=labeler, submit_key=lease.submit_key, answer=reversed_answer)


def test_a_judgment_writes_all_pairs_ties_and_an_audit_event(db):
    campaign = make_campaign(db, overlap=1, k=4)
    make_task(db, campaign)
    labeler = make_labeler(db)
    lease = service.next_task(db, user=labeler, campaign=campaign)
    a, b, c, d = lease.display_order
    judgment, _ = service.submit(
        db,
        user=labeler,
        submit_key=lease.submit_key,
        answer=JudgmentIn(
            ranking=[[b], [a, d], [c]],
            flags={c: ["harmful"]},
            ratings={b: 7, c: 1},
            comment="  c is rude ",
            confidence=4,
        ),
    )
    pairs = {
        (row.chosen_id, row.rejected_id, row.is_tie)
        for row in db.scalars(select(Comparison).where(Comparison.judgment_id == judgment.id))
    }
    tie = tuple(sorted((a, d)))
    assert pairs == {
        (b, a, False), (b, d, False), (b, c, False), (a, c, False), (d, c, False),
        (tie[0], tie[1], True),
    }  # fmt: skip
    assert judgment.flags == {str(c): ["harmful"]} and judgment.ratings == {str(b): 7, str(c): 1}
    assert (judgment.comment, judgment.confidence) == ("c is rude", 4)
    assert judgment.display_order == lease.display_order
    assert judgment.guidelines_version == campaign.guidelines_version
    event = db.scalar(select(AuditEvent).where(AuditEvent.action == "judgment.create"))
    assert event.entity_id == str(judgment.id) and event.actor_id == labeler.id


@pytest.mark.parametrize(
    ("make_answer", "message"),
    [
        (lambda ids: JudgmentIn(ranking=[[i] for i in ids[:-1]]), "missing completions"),
        (lambda ids: JudgmentIn(ranking=[[i] for i in ids] + [[ids[0]]]), "twice"),
        (lambda ids: JudgmentIn(ranking=[[i] for i in ids] + [[999999]]), "not in this task"),
        (lambda ids: JudgmentIn(ranking=[[ids[0], ids[1]], *[[i] for i in ids[2:]]]), "ties"),
        (lambda ids: JudgmentIn(ranking=[[]] + [[i] for i in ids]), "empty tier"),
        (lambda ids: JudgmentIn(strength=1), "ranking is required"),
        (
            lambda ids: JudgmentIn(ranking=[[i] for i in ids], flags={ids[0]: ["rude"]}),
            "unknown flags",
        ),
        (lambda ids: JudgmentIn(ranking=[[i] for i in ids], ratings={ids[0]: 9}), "1 to 7"),
    ],
)
def test_malformed_rankings_are_refused_and_nothing_is_written(db, make_answer, message):
    campaign = make_campaign(db, overlap=1, k=3, allow_ties=False)
    make_task(db, campaign)
    labeler = make_labeler(db)
    lease = service.next_task(db, user=labeler, campaign=campaign)
    with pytest.raises(service.InvalidAnswer, match=message):
        service.submit(
            db, user=labeler, submit_key=lease.submit_key, answer=make_answer(lease.display_order)
        )
    assert db.scalar(select(func.count()).select_from(Judgment)) == 0
    assert lease.state is AssignmentState.active


def test_another_labelers_task_is_forbidden(db):
    campaign = make_campaign(db, overlap=2)
    make_task(db, campaign)
    owner, intruder = make_labeler(db), make_labeler(db)
    lease = service.next_task(db, user=owner, campaign=campaign)
    with pytest.raises(service.Forbidden):
        service.submit(db, user=intruder, submit_key=lease.submit_key, answer=rank_all(lease))
    with pytest.raises(service.NotFound):
        service.submit(db, user=intruder, submit_key="no-such-key", answer=rank_all(lease))


def test_pairwise_strength_is_stored_in_task_order_with_a_margin(db):
    campaign = make_campaign(db, overlap=1, k=2, mode=CampaignMode.pairwise)
    task = make_task(db, campaign)
    first, second = (item.completion_id for item in task.items)
    labeler = make_labeler(db)
    lease = service.next_task(db, user=labeler, campaign=campaign, rng=random.Random(3))
    shown_a, shown_b = lease.display_order
    judgment, _ = service.submit(
        db, user=labeler, submit_key=lease.submit_key, answer=JudgmentIn(strength=-2)
    )
    # "A is better" by 2: A is whichever was shown first.
    assert judgment.ranking == [[shown_a], [shown_b]]
    expected = -2 if (shown_a, shown_b) == (first, second) else 2
    assert judgment.pairwise_strength == expected
    assert service.shown_strength(judgment, task) == -2
    pair = db.scalar(select(Comparison).where(Comparison.judgment_id == judgment.id))
    assert (pair.chosen_id, pair.rejected_id, pair.margin, pair.is_tie) == (
        shown_a,
        shown_b,
        2.0,
        False,
    )


def test_demonstration_is_saved_as_a_human_completion(db):
    campaign = make_campaign(db, overlap=1, mode=CampaignMode.demonstration)
    make_task(db, campaign, completions=["A suggested draft."])
    labeler = make_labeler(db)
    lease = service.next_task(db, user=labeler, campaign=campaign)
    with pytest.raises(service.InvalidAnswer, match="write a response"):
        service.submit(
            db, user=labeler, submit_key=lease.submit_key, answer=JudgmentIn(demonstration="  ")
        )
    judgment, _ = service.submit(
        db,
        user=labeler,
        submit_key=lease.submit_key,
        answer=JudgmentIn(demonstration="The ideal answer."),
    )
    written = db.get(Completion, judgment.demonstration_id)
    assert (written.text, written.source, written.author_id) == (
        "The ideal answer.",
        CompletionSource.human,
        labeler.id,
    )
    assert db.scalar(select(func.count()).select_from(Comparison)) == 0


def test_edit_is_a_new_version_and_history_keeps_the_old_one(db):
    campaign = make_campaign(db, overlap=1, k=3)
    make_task(db, campaign)
    labeler = make_labeler(db)
    lease = service.next_task(db, user=labeler, campaign=campaign)
    old, _ = service.submit(db, user=labeler, submit_key=lease.submit_key, answer=rank_all(lease))
    flipped = [[cid] for cid in reversed(lease.display_order)]
    edit = EditIn(ranking=flipped, idempotency_key="edit-key-0123456789abcdef")
    new, created = service.edit(db, user=labeler, judgment_id=old.id, answer=edit)
    again, created_again = service.edit(db, user=labeler, judgment_id=old.id, answer=edit)
    assert created and not created_again and again.id == new.id
    assert (old.is_current, new.is_current, new.supersedes_id) == (False, True, old.id)
    active = db.scalars(select(Comparison).where(Comparison.is_active.is_(True))).all()
    assert {row.judgment_id for row in active} == {new.id}
    assert [j.id for j in service.versions(db, new)] == [old.id, new.id]
    assert [j.id for j in service.history(db, user_id=labeler.id)] == [new.id]
    # The task still counts one judgment from this labeler.
    task = db.get(Task, lease.task_id)
    assert task.judgment_count == 1
    with pytest.raises(service.Conflict, match="newer version"):
        service.edit(
            db,
            user=labeler,
            judgment_id=old.id,
            answer=EditIn(ranking=flipped, idempotency_key="another-key-0123456789ab"),
        )
    with pytest.raises(service.Forbidden):
        service.edit(db, user=make_labeler(db), judgment_id=new.id, answer=edit)


def test_gold_tasks_are_mixed_in_at_the_rate_and_reach_every_labeler(db):
    campaign = make_campaign(db, overlap=1, gold_rate=1.0)
    gold = make_task(db, campaign, is_gold=True, gold_ranking_positions=[[0], [1], [2], [3]])
    regular = make_task(db, campaign)
    first, second = make_labeler(db), make_labeler(db)
    assert service.next_task(db, user=first, campaign=campaign).task_id == gold.id
    assert service.next_task(db, user=second, campaign=campaign).task_id == gold.id
    # Once a labeler has seen the gold task, the regular one comes next.
    lease = service.next_task(db, user=first, campaign=campaign)  # the same lease again
    assert lease.task_id == gold.id
    service.submit(db, user=first, submit_key=lease.submit_key, answer=rank_all(lease))
    assert service.next_task(db, user=first, campaign=campaign).task_id == regular.id
    db.refresh(gold)
    assert gold.status is TaskStatus.open  # gold tasks never complete


def test_progress_counts_today_total_and_what_is_left(db):
    campaign = make_campaign(db, overlap=1)
    for _ in range(3):
        make_task(db, campaign)
    labeler = make_labeler(db)
    lease = service.next_task(db, user=labeler, campaign=campaign)
    service.submit(db, user=labeler, submit_key=lease.submit_key, answer=rank_all(lease))
    mine = service.progress(db, user_id=labeler.id, campaign_ids=[campaign.id])[campaign.id]
    assert (mine.today, mine.total, mine.available) == (1, 1, 2)


def test_a_paused_campaign_serves_nothing(db):
    campaign = make_campaign(db, status=CampaignStatus.paused)
    make_task(db, campaign)
    with pytest.raises(service.Conflict, match="paused"):
        service.next_task(db, user=make_labeler(db), campaign=campaign)
