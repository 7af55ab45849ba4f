"""Self-consistency re-checks: serving a labeler's own past task again, storing the second
answer beside the first, and the per-labeler agreement between the two; on both backends."""

from __future__ import annotations

import datetime as dt
import json
import random
import re

import pytest
from sqlalchemy import event, func, select

from app.audit.models import AuditEvent
from app.auth import service as auth_service
from app.campaigns import service as campaigns
from app.campaigns.models import CampaignMode
from app.campaigns.schemas import InvalidCampaign, parse_create, parse_settings, settings_of
from app.db import utcnow
from app.labeling import service
from app.labeling.models import Assignment, AssignmentState, Comparison, Task
from app.labeling.schemas import EditIn, JudgmentIn
from app.quality.consistency import SelfConsistency, self_consistency
from tests.factories import make_campaign, make_labeler, make_task

GAP = service.RECHECK_MIN_GAP


class Draws(random.Random):
    """Seeded shuffles and choices, but `random()` is fixed: 0.0 takes every re-check (and
    gold) draw, 0.99 none."""

    getrandbits = random.Random.getrandbits  # keep shuffle and choice on the seeded bits

    def __init__(self, value: float, seed: int = 7) -> None:
        super().__init__(seed)
        self.value = value

    def random(self) -> float:
        return self.value


ALWAYS, NEVER = 0.0, 0.99


def in_shown_order(lease: Assignment) -> JudgmentIn:
    return JudgmentIn(ranking=[[cid] for cid in lease.display_order], time_on_task_ms=1000)


def judge(db, user, campaign, *, draw=NEVER, answer=in_shown_order, now=None):
    """Lease the next task and answer it; returns (assignment, judgment)."""
    lease = service.next_task(db, user=user, campaign=campaign, rng=Draws(draw), now=now)
    assert lease is not None, "nothing was served"
    judgment, created = service.submit(
        db, user=user, submit_key=lease.submit_key, answer=answer(lease), now=now
    )
    assert created
    return lease, judgment


def counters(db, campaign) -> dict[int, tuple]:
    """Every task's slot and judgment counters and status, read from the database."""
    rows = db.execute(
        select(Task.id, Task.assigned_count, Task.judgment_count, Task.status).where(
            Task.campaign_id == campaign.id
        )
    )
    return {task_id: (assigned, judged, status) for task_id, assigned, judged, status in rows}


def rank_campaign(db, *, tasks: int, overlap: int = 2, k: int = 4, **fields):
    campaign = make_campaign(db, overlap=overlap, k=k, recheck_rate=0.5, **fields)
    return campaign, [make_task(db, campaign) for _ in range(tasks)]


# --- serving --------------------------------------------------------------------------------


def test_no_recheck_until_more_than_the_gap_then_an_old_task_in_a_new_order(db):
    campaign, tasks = rank_campaign(db, tasks=GAP + 5)
    labeler = make_labeler(db)
    first = [judge(db, labeler, campaign, draw=ALWAYS) for _ in range(GAP + 1)]
    # With 10 judgments (the 11th lease) nothing is old enough yet: all normal tasks.
    assert [lease.is_recheck for lease, _ in first] == [False] * (GAP + 1)
    assert [lease.task_id for lease, _ in first] == [t.id for t in tasks[: GAP + 1]]
    before = counters(db, campaign)

    # Eleven judgments: the oldest is the only one outside the last ten.
    recheck = service.lease(db, user=labeler, campaign=campaign, rng=Draws(ALWAYS))
    original_lease, original = first[0]
    assert recheck.assignment.is_recheck and recheck.task_id == original_lease.task_id
    assert recheck.assignment.display_order != original.display_order
    assert sorted(recheck.assignment.display_order) == sorted(original.display_order)
    assert [c.id for c in recheck.completions] == recheck.assignment.display_order
    assert counters(db, campaign) == before  # it takes no slot
    # A reload gives the same re-check back.
    again = service.next_task(db, user=labeler, campaign=campaign, rng=Draws(ALWAYS))
    assert again.id == recheck.assignment.id


def test_recheck_rate_zero_never_reserves_and_adds_no_query(db, connection):
    campaign, _ = rank_campaign(db, tasks=GAP + 5)
    campaign.recheck_rate = 0.0
    labeler = make_labeler(db)
    for _ in range(GAP + 3):
        judge(db, labeler, campaign)

    statements: list[str] = []

    def record(conn, cursor, statement, *args):
        statements.append(statement)

    event.listen(connection, "before_cursor_execute", record)
    try:
        lease = service.next_task(db, user=labeler, campaign=campaign, rng=Draws(ALWAYS))
    finally:
        event.remove(connection, "before_cursor_execute", record)
    assert not lease.is_recheck
    # The hot path never reads judgments: no re-check lookup ran.
    assert statements and not [s for s in statements if re.search(r"\bjudgments\b", s)]


def test_demonstration_campaigns_are_never_rechecked(db):
    campaign = make_campaign(db, mode=CampaignMode.demonstration, overlap=1, recheck_rate=0.5)
    for _ in range(GAP + 3):
        make_task(db, campaign, completions=[])
    labeler = make_labeler(db)
    for _ in range(GAP + 2):
        judge(db, labeler, campaign, draw=ALWAYS, answer=lambda _: JudgmentIn(demonstration="A."))
    assert not service.next_task(db, user=labeler, campaign=campaign, rng=Draws(ALWAYS)).is_recheck


def test_gold_and_already_rechecked_tasks_are_never_reserved(db):
    campaign, normal = rank_campaign(db, tasks=GAP + 2, overlap=1, gold_rate=1.0)
    gold = [make_task(db, campaign, is_gold=True) for _ in range(3)]
    labeler = make_labeler(db)
    # Gold is drawn first (and no re-check yet), so the gold tasks are the oldest judgments.
    served = [judge(db, labeler, campaign)[0] for _ in range(len(normal) + len(gold))]
    assert {lease.task_id for lease in served[:3]} == {t.id for t in gold}
    assert not any(lease.is_recheck for lease in served)

    rechecked = []
    while lease := service.next_task(db, user=labeler, campaign=campaign, rng=Draws(ALWAYS)):
        assert lease.is_recheck
        rechecked.append(lease.task_id)
        service.submit(db, user=labeler, submit_key=lease.submit_key, answer=in_shown_order(lease))
    # Every normal task once, no gold task, none twice; then nothing is left at all.
    assert sorted(rechecked) == sorted(t.id for t in normal)


def test_recheck_falls_through_to_a_normal_task_when_none_is_eligible(db):
    campaign, tasks = rank_campaign(db, tasks=GAP + 3, overlap=1)
    labeler = make_labeler(db)
    for _ in range(GAP + 1):
        judge(db, labeler, campaign)
    lease = service.next_task(db, user=labeler, campaign=campaign, rng=Draws(ALWAYS))
    assert lease.is_recheck and lease.task_id == tasks[0].id
    service.skip(db, user=labeler, submit_key=lease.submit_key, reason="Other")
    # The only old-enough task was re-served (skipped counts): the next lease is a normal task.
    lease = service.next_task(db, user=labeler, campaign=campaign, rng=Draws(ALWAYS))
    assert not lease.is_recheck and lease.task_id == tasks[GAP + 1].id


def test_a_pairwise_recheck_shows_the_pair_reversed_and_strength_follows_it(db):
    campaign, _ = rank_campaign(db, tasks=GAP + 2, k=2, mode=CampaignMode.pairwise)
    labeler = make_labeler(db)

    def first_better(lease):  # A, the first shown, is better
        return JudgmentIn(strength=-2)

    judged = [judge(db, labeler, campaign, answer=first_better) for _ in range(GAP + 1)]
    lease = service.next_task(db, user=labeler, campaign=campaign, rng=Draws(ALWAYS))
    original_lease, original = judged[0]
    assert lease.is_recheck and lease.display_order == original_lease.display_order[::-1]
    # Preferring the same completion, now shown second, is the same ranking.
    recheck, _ = service.submit(
        db, user=labeler, submit_key=lease.submit_key, answer=JudgmentIn(strength=2)
    )
    assert recheck.ranking == original.ranking
    assert recheck.pairwise_strength == original.pairwise_strength  # both in task order
    assert self_consistency(db, campaign.id) == {labeler.id: SelfConsistency(1, 1.0)}


# --- submitting, skipping, expiring, editing ---------------------------------------------------


def test_recheck_submit_stores_a_second_answer_and_counts_nothing(db):
    campaign, tasks = rank_campaign(db, tasks=GAP + 3, overlap=2)
    labeler, second, third = make_labeler(db), make_labeler(db), make_labeler(db)
    judged = [judge(db, labeler, campaign) for _ in range(GAP + 1)]
    _, original = judged[0]
    comparisons = db.scalar(select(func.count()).select_from(Comparison))
    lease = service.next_task(db, user=labeler, campaign=campaign, rng=Draws(ALWAYS))
    before = counters(db, campaign)

    answer = JudgmentIn(ranking=[[cid] for cid in reversed(lease.display_order)], comment="hm")
    recheck, created = service.submit(
        db, user=labeler, submit_key=lease.submit_key, answer=answer, ip="10.0.0.9"
    )
    assert created and lease.state is AssignmentState.submitted
    assert (recheck.recheck_of_id, recheck.is_current) == (original.id, False)
    assert (recheck.task_id, recheck.assignment_id) == (original.task_id, lease.id)
    assert recheck.display_order == lease.display_order
    db.refresh(original)
    assert original.is_current  # the first answer is still the one that counts
    assert counters(db, campaign) == before
    assert db.scalar(select(func.count()).select_from(Comparison)) == comparisons
    [audited] = db.scalars(select(AuditEvent).where(AuditEvent.action == "judgment.recheck"))
    assert (audited.entity_id, audited.actor_id, audited.ip) == (
        str(recheck.id),
        labeler.id,
        "10.0.0.9",
    )
    assert audited.after["recheck_of_id"] == original.id

    # Idempotent like any submit.
    replayed, created = service.submit(db, user=labeler, submit_key=lease.submit_key, answer=answer)
    assert (replayed.id, created) == (recheck.id, False)
    with pytest.raises(service.Conflict, match="different answer"):
        service.submit(db, user=labeler, submit_key=lease.submit_key, answer=in_shown_order(lease))

    # Other labelers are served as if nothing happened: the re-checked task still has its
    # second slot, and once that is taken it is full.
    assert service.next_task(db, user=second, campaign=campaign).task_id == original.task_id
    assert service.next_task(db, user=third, campaign=campaign).task_id == tasks[1].id
    # The labeler's history lists the task once, with the first answer, still editable.
    assert original.id in [j.id for j in service.history(db, user_id=labeler.id)]
    assert recheck.id not in [j.id for j in service.history(db, user_id=labeler.id)]


def test_skipping_or_expiring_a_recheck_frees_no_slot(db):
    campaign, _ = rank_campaign(db, tasks=GAP + 4, overlap=1, lease_minutes=10)
    labeler, other = make_labeler(db), make_labeler(db)
    start = utcnow()
    for _ in range(GAP + 2):
        judge(db, labeler, campaign, now=start)
    before = counters(db, campaign)

    skipped = service.next_task(db, user=labeler, campaign=campaign, rng=Draws(ALWAYS), now=start)
    assert skipped.is_recheck
    service.skip(db, user=labeler, submit_key=skipped.submit_key, reason="Other", now=start)
    assert skipped.state is AssignmentState.skipped
    assert counters(db, campaign) == before

    expiring = service.next_task(db, user=labeler, campaign=campaign, rng=Draws(ALWAYS), now=start)
    assert expiring.is_recheck and expiring.task_id != skipped.task_id
    normal = service.next_task(db, user=other, campaign=campaign, rng=Draws(NEVER), now=start)
    before = counters(db, campaign)
    later = start + dt.timedelta(minutes=11)
    assert service.expire_leases(db, now=later) == 2
    after = counters(db, campaign)
    # The normal lease gave its slot back; the re-check lease had none to give.
    assert after[normal.task_id][0] == before[normal.task_id][0] - 1
    assert after[expiring.task_id] == before[expiring.task_id]
    assert {t: v for t, v in after.items() if t != normal.task_id} == {
        t: v for t, v in before.items() if t != normal.task_id
    }
    # A late answer to an expired re-check needs no slot, so it is still taken.
    late, created = service.submit(
        db, user=labeler, submit_key=expiring.submit_key, answer=in_shown_order(expiring), now=later
    )
    assert created and late.recheck_of_id is not None
    assert counters(db, campaign) == after


def test_a_recheck_cannot_be_edited_but_the_first_answer_can(db):
    campaign, _ = rank_campaign(db, tasks=GAP + 3)
    labeler = make_labeler(db)
    judged = [judge(db, labeler, campaign) for _ in range(GAP + 1)]
    _, recheck = judge(db, labeler, campaign, draw=ALWAYS)
    assert recheck.recheck_of_id == judged[0][1].id

    def edit_of(judgment, key):
        ranking = [[cid] for cid in reversed(judgment.display_order)]
        return EditIn(ranking=ranking, idempotency_key=key)

    with pytest.raises(service.Conflict, match="cannot be edited"):
        service.edit(db, user=labeler, judgment_id=recheck.id, answer=edit_of(recheck, "k" * 20))
    original = judged[0][1]
    new, created = service.edit(
        db, user=labeler, judgment_id=original.id, answer=edit_of(original, "e" * 20)
    )
    assert created and new.is_current and new.recheck_of_id is None
    # The re-check still points at the version it repeated.
    db.refresh(recheck)
    assert recheck.recheck_of_id == original.id


# --- the metric -------------------------------------------------------------------------------


def test_self_consistency_per_labeler_with_hand_computed_agreement(db):
    campaign, _ = rank_campaign(db, tasks=GAP + 3, overlap=3)
    steady, wobbly, never = make_labeler(db), make_labeler(db), make_labeler(db)
    originals = {}
    for labeler in (steady, wobbly, never):
        judged = [judge(db, labeler, campaign)[1] for _ in range(GAP + 1)]
        originals[labeler.id] = judged[0]

    def same(lease):
        return JudgmentIn(ranking=originals[steady.id].ranking)

    def one_adjacent_swap(lease):
        first, second, *rest = originals[wobbly.id].ranking
        return JudgmentIn(ranking=[second, first, *rest])

    judge(db, steady, campaign, draw=ALWAYS, answer=same)
    _, wobble = judge(db, wobbly, campaign, draw=ALWAYS, answer=one_adjacent_swap)

    found = self_consistency(db, campaign.id)
    assert found == {
        steady.id: SelfConsistency(rechecks=1, agreement=1.0),
        wobbly.id: SelfConsistency(rechecks=1, agreement=pytest.approx(5 / 6)),
    }
    assert self_consistency(db, campaign.id, labeler_ids=[wobbly.id, never.id]) == {
        wobbly.id: SelfConsistency(1, pytest.approx(5 / 6))
    }
    created = wobble.created_at
    assert self_consistency(db, campaign.id, since=created + dt.timedelta(seconds=1)) == {}
    assert set(self_consistency(db, campaign.id, until=created + dt.timedelta(seconds=1))) == {
        steady.id,
        wobbly.id,
    }
    assert self_consistency(db, campaign.id, until=created - dt.timedelta(days=1)) == {}
    other = make_campaign(db)
    assert self_consistency(db, other.id) == {}


# --- what the labeler sees --------------------------------------------------------------------


def test_a_recheck_looks_like_any_other_task_in_the_api_and_page(
    client, db, users, as_role, monkeypatch
):
    campaign, _ = rank_campaign(db, tasks=GAP + 4, slug="steady")
    for _ in range(GAP):
        judge(db, users.labeler, campaign)
    token = auth_service.create_api_token(db, users.labeler, name="script")
    headers = {"Authorization": f"Bearer {token.secret}"}
    db.commit()
    # The views lease with a fresh SystemRandom: make every draw take the re-check.
    monkeypatch.setattr(service.random, "SystemRandom", lambda: Draws(ALWAYS))

    def next_task() -> dict:
        response = client.post("/api/v1/campaigns/steady/next", headers=headers)
        assert response.status_code == 200
        return response.json()

    normal = next_task()  # the 11th: nothing old enough yet
    client.post(
        f"/api/v1/assignments/{normal['submit_key']}/judgment",
        json={"ranking": [[c["id"]] for c in normal["completions"]]},
        headers=headers,
    ).raise_for_status()
    recheck = next_task()
    lease = db.scalar(select(Assignment).where(Assignment.submit_key == recheck["submit_key"]))
    assert lease.is_recheck
    assert recheck.keys() == normal.keys()
    assert "recheck" not in json.dumps(recheck).lower()
    as_role("labeler")
    page = client.get("/label/steady").text
    assert recheck["submit_key"] in page
    assert "recheck" not in page.lower() and "re-check" not in page.lower()

    # Once answered, the second answer is not listed as more work, and cannot be edited.
    answer = {"ranking": [[c["id"]] for c in recheck["completions"]]}
    stored = client.post(
        f"/api/v1/assignments/{recheck['submit_key']}/judgment", json=answer, headers=headers
    )
    assert stored.status_code == 201 and stored.json()["judgment"]["comparisons"] == 0
    second = stored.json()["judgment"]["id"]
    listed = client.get("/api/v1/judgments", headers=headers).json()
    assert len(listed) == GAP + 1 and second not in [j["id"] for j in listed]
    assert f'data-judgment="{second}"' not in client.get("/label/history").text
    refused = client.post(
        f"/api/v1/judgments/{second}/edit",
        json={**answer, "idempotency_key": "x" * 20},
        headers=headers,
    )
    assert refused.status_code == 409 and "cannot be edited" in refused.json()["detail"]
    shown = client.get(f"/label/judgments/{second}").text
    assert "second answer to a task you had already judged" in shown
    assert 'id="answer-form"' not in shown


# --- the campaign setting ---------------------------------------------------------------------


def test_the_recheck_rate_is_validated():
    assert parse_create({"slug": "ok", "name": "N"}).recheck_rate == 0.0
    assert parse_settings({"name": "N", "recheck_rate": "0.5"}).recheck_rate == 0.5
    for value in (0.51, -0.01, 1.0, "nan"):
        with pytest.raises(InvalidCampaign) as caught:
            parse_settings({"name": "N", "recheck_rate": value})
        assert caught.value.errors == {
            "recheck_rate": "The re-check rate must be between 0 and 0.5 (0 % to 50 %)."
        }
    with pytest.raises(InvalidCampaign) as caught:
        parse_settings({"name": "N", "mode": "demonstration", "recheck_rate": 0.1})
    assert "rank and pairwise campaigns only" in caught.value.errors["recheck_rate"]
    assert parse_settings({"name": "N", "mode": "demonstration"}).recheck_rate == 0.0


def test_the_recheck_rate_is_audited_on_create_and_update(db, users):
    data = parse_create({"slug": "rechecked", "name": "R", "recheck_rate": "0.1"})
    campaign = campaigns.create(db, data=data, actor=users.admin)
    assert campaign.recheck_rate == 0.1
    campaigns.update(
        db,
        campaign=campaign,
        data=parse_settings({**settings_of(campaign), "recheck_rate": 0.25}),
        actor=users.admin,
    )
    assert campaign.recheck_rate == 0.25
    events = {
        e.action: e
        for e in db.scalars(select(AuditEvent).where(AuditEvent.entity_id == str(campaign.id)))
    }
    assert events["campaign.create"].after["recheck_rate"] == 0.1
    update = events["campaign.update"]
    assert (update.before, update.after) == ({"recheck_rate": 0.1}, {"recheck_rate": 0.25})
