"""The data model behaves the same on PostgreSQL and SQLite: constraints, times, JSON."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, StatementError

from app.campaigns.models import Campaign
from app.labeling.models import Comparison, Completion, Judgment, Prompt, Task, TaskCompletion


def make_campaign(db, **fields) -> Campaign:
    campaign = Campaign(slug=fields.pop("slug", "c1"), name="Campaign", **fields)
    db.add(campaign)
    db.flush()
    return campaign


def make_prompt_with_completions(db, campaign, n=3):
    prompt = Prompt(campaign_id=campaign.id, text="Why is the sky blue?", content_hash="h")
    db.add(prompt)
    db.flush()
    completions = [
        Completion(prompt_id=prompt.id, text=f"answer {i}", content_hash=f"c{i}") for i in range(n)
    ]
    db.add_all(completions)
    db.flush()
    return prompt, completions


@pytest.mark.parametrize(
    "fields",
    [
        {"k": 1},
        {"k": 10},
        {"overlap": 0},
        {"gold_rate": 1.5},
        {"gold_rate": -0.1},
        {"lease_minutes": 0},
    ],
)
def test_campaign_checks_reject_out_of_range_values(db, fields):
    with pytest.raises(IntegrityError), db.begin_nested():
        make_campaign(db, **fields)


def test_campaign_defaults(db):
    campaign = make_campaign(db)
    db.commit()
    db.expire_all()
    stored = db.get(Campaign, campaign.id)
    assert (stored.k, stored.overlap, stored.mode.value, stored.allow_ties) == (4, 3, "rank", True)
    assert stored.flags and all(isinstance(flag, str) for flag in stored.flags)
    assert stored.guidelines_version == 1


def test_slug_is_unique(db):
    make_campaign(db, slug="same")
    with pytest.raises(IntegrityError), db.begin_nested():
        make_campaign(db, slug="same")


def test_unknown_enum_value_is_refused(db):
    with pytest.raises(StatementError), db.begin_nested():
        make_campaign(db, mode="freestyle")


def test_timestamps_come_back_timezone_aware_utc(db):
    campaign = make_campaign(db)
    db.commit()
    db.expire_all()
    created = db.get(Campaign, campaign.id).created_at
    assert created.tzinfo is not None and created.utcoffset() == dt.timedelta(0)
    assert abs(dt.datetime.now(dt.UTC) - created) < dt.timedelta(minutes=1)


def test_naive_datetimes_are_refused(db):
    campaign = make_campaign(db)
    campaign.updated_at = dt.datetime(2026, 1, 1)
    with pytest.raises(StatementError, match="naive datetime"), db.begin_nested():
        db.flush()


def test_prompt_needs_text_or_messages(db):
    campaign = make_campaign(db)
    with pytest.raises(IntegrityError), db.begin_nested():
        db.add(Prompt(campaign_id=campaign.id, content_hash="h"))
        db.flush()


def test_chat_prompt_and_json_fields_round_trip(db):
    campaign = make_campaign(db)
    messages = [
        {"role": "user", "content": "Hi ünïcode ✓"},
        {"role": "assistant", "content": "Hello"},
    ]
    prompt = Prompt(
        campaign_id=campaign.id, messages=messages, content_hash="h", meta={"source": "x", "n": 2}
    )
    db.add(prompt)
    db.commit()
    db.expire_all()
    stored = db.get(Prompt, prompt.id)
    assert (
        stored.messages == messages
        and stored.meta == {"source": "x", "n": 2}
        and stored.text is None
    )


def test_external_id_is_unique_per_campaign(db):
    first, second = make_campaign(db, slug="a"), make_campaign(db, slug="b")
    db.add(Prompt(campaign_id=first.id, external_id="p1", text="x", content_hash="h"))
    db.add(Prompt(campaign_id=second.id, external_id="p1", text="x", content_hash="h"))
    db.flush()  # the same external id in two campaigns is fine
    with pytest.raises(IntegrityError), db.begin_nested():
        db.add(Prompt(campaign_id=first.id, external_id="p1", text="y", content_hash="h2"))
        db.flush()


def test_task_keeps_completion_order_and_ranking_with_ties(db, users):
    campaign = make_campaign(db)
    prompt, completions = make_prompt_with_completions(db, campaign)
    order = [completions[2], completions[0], completions[1]]
    task = Task(campaign_id=campaign.id, prompt_id=prompt.id, required_judgments=3)
    task.items = [TaskCompletion(position=i, completion_id=c.id) for i, c in enumerate(order)]
    db.add(task)
    db.flush()
    ranking = [[order[1].id], [order[0].id, order[2].id]]  # one best, two tied
    judgment = Judgment(
        task_id=task.id,
        campaign_id=campaign.id,
        user_id=users.labeler.id,
        ranking=ranking,
        display_order=[c.id for c in order],
        idempotency_key="k1",
        payload_hash="p",
    )
    db.add(judgment)
    db.commit()
    db.expire_all()
    stored = db.get(Task, task.id)
    assert [item.completion_id for item in stored.items] == [c.id for c in order]
    assert db.get(Judgment, judgment.id).ranking == ranking


def test_judgment_idempotency_key_is_unique(db, users):
    campaign = make_campaign(db)
    prompt, _ = make_prompt_with_completions(db, campaign)
    task = Task(campaign_id=campaign.id, prompt_id=prompt.id)
    db.add(task)
    db.flush()
    fields = {
        "task_id": task.id,
        "campaign_id": campaign.id,
        "user_id": users.labeler.id,
        "payload_hash": "p",
    }
    db.add(Judgment(idempotency_key="same", **fields))
    db.flush()
    with pytest.raises(IntegrityError), db.begin_nested():
        db.add(Judgment(idempotency_key="same", **fields))
        db.flush()


def test_comparison_pair_must_be_two_completions(db):
    campaign = make_campaign(db)
    prompt, completions = make_prompt_with_completions(db, campaign)
    with pytest.raises(IntegrityError), db.begin_nested():
        db.add(
            Comparison(
                campaign_id=campaign.id,
                prompt_id=prompt.id,
                chosen_id=completions[0].id,
                rejected_id=completions[0].id,
            )
        )
        db.flush()


def test_foreign_keys_are_enforced(db):
    """SQLite ignores foreign keys unless told; the engine turns them on."""
    with pytest.raises(IntegrityError), db.begin_nested():
        db.add(Prompt(campaign_id=999_999, text="orphan", content_hash="h"))
        db.flush()


def test_comparisons_since_an_id_in_order(db):
    campaign = make_campaign(db)
    prompt, completions = make_prompt_with_completions(db, campaign)
    for _ in range(3):
        db.add(
            Comparison(
                campaign_id=campaign.id,
                prompt_id=prompt.id,
                chosen_id=completions[0].id,
                rejected_id=completions[1].id,
            )
        )
    db.flush()
    ids = db.scalars(
        select(Comparison.id).where(Comparison.campaign_id == campaign.id).order_by(Comparison.id)
    ).all()
    newer = db.scalars(
        select(Comparison.id)
        .where(Comparison.campaign_id == campaign.id, Comparison.id > ids[0])
        .order_by(Comparison.id)
    ).all()
    assert newer == ids[1:] and len(ids) == 3
