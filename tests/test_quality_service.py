"""The quality report from real judgments (made through the labeling service), both backends."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select

from app.audit.models import AuditEvent
from app.auth import service as auth_service
from app.labeling import service as labeling
from app.labeling.models import Judgment, TaskStatus
from app.labeling.schemas import EditIn
from app.quality import metrics
from app.quality.service import Filters, disagreements, load_judgments, quality_report
from tests.conftest import QUALITY_TASKS as TASKS


def test_agreement_matches_the_metrics_on_the_same_votes(db, judged):
    campaign, _, _ = judged
    report = quality_report(db, campaign, resamples=50)
    rows = load_judgments(db, campaign, Filters())
    votes = [metrics.Vote(r.task_id, r.user_id, r.ranking) for r in rows if not r.is_gold]
    agreement = report["agreement"]
    assert agreement["tasks_compared"] == TASKS
    assert agreement["pairwise_agreement"]["value"] == pytest.approx(
        metrics.mean_pairwise_agreement(votes), abs=1e-4
    )
    low, high = agreement["pairwise_agreement"]["interval"]
    assert low <= agreement["pairwise_agreement"]["value"] <= high
    assert agreement["krippendorff_alpha"]["value"] == pytest.approx(
        metrics.krippendorff_alpha(votes), abs=1e-4
    )
    # Three of four labelers agree perfectly: agreement is well above chance but below 1.
    assert 0.6 < agreement["pairwise_agreement"]["value"] < 1.0


def test_labeler_table_flags_position_bias_and_scores_gold(db, judged):
    campaign, careful, _ = judged
    rows = {row["username"]: row for row in quality_report(db, campaign, resamples=20)["labelers"]}
    assert rows["lazy"]["position_bias"]["flagged"] is True
    assert rows["lazy"]["position_bias"]["rate"] == 1.0
    for labeler in careful:
        row = rows[labeler.username]
        assert row["position_bias"]["flagged"] is False
        assert row["agreement_with_others"] > rows["lazy"]["agreement_with_others"]
        assert row["gold_accuracy"] == 1.0
        assert row["judgments"] == TASKS + 1
        assert row["median_seconds"] == pytest.approx(2.0, abs=0.1)


def test_filters_by_labeler_and_date(db, judged):
    campaign, _, lazy = judged
    only_lazy = quality_report(db, campaign, Filters(labeler_ids=frozenset({lazy.id})))
    assert [row["username"] for row in only_lazy["labelers"]] == ["lazy"]
    assert only_lazy["agreement"]["tasks_compared"] == 0
    future = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)
    assert quality_report(db, campaign, Filters(since=future))["agreement"]["judgments"] == 0


def test_json_endpoint_for_researchers_and_dashboard_for_admins(client, db, users, judged, as_role):
    _, careful, _ = judged
    token = auth_service.create_api_token(db, users.researcher, name="quality").secret
    db.commit()
    body = client.get(
        "/api/v1/campaigns/quality/quality", headers={"Authorization": f"Bearer {token}"}
    ).json()
    assert body["campaign"] == "quality"
    assert {row["username"] for row in body["labelers"]} == {"lazy", *(u.username for u in careful)}
    as_role("admin")
    page = client.get("/admin/campaigns/quality/quality?sort=-judgments")
    assert page.status_code == 200
    assert 'data-testid="position-bias-flag"' in page.text
    assert "InstructGPT: 72.6" in page.text


def test_disagreement_queue_sends_back_and_makes_gold_with_audit(client, db, judged, as_role):
    campaign, _, _ = judged
    items = disagreements(db, campaign, quality_report(db, campaign, resamples=10), limit=5)
    assert items
    assert [d.agreement for d in items] == sorted(d.agreement for d in items)
    worst = items[0].task
    csrf = as_role("admin")
    page = client.get("/admin/campaigns/quality/disagreements")
    assert page.status_code == 200 and f'data-task="{worst.id}"' in page.text
    assert 'data-testid="pair-agreement"' in page.text and " over #" in page.text

    required = worst.required_judgments
    back = client.post(
        f"/admin/tasks/{worst.id}/send-back", data={"csrf_token": csrf}, follow_redirects=False
    )
    assert back.status_code == 303
    db.refresh(worst)
    assert (worst.required_judgments, worst.status) == (required + 1, TaskStatus.open)

    client.post(f"/admin/tasks/{worst.id}/gold", data={"csrf_token": csrf})
    db.refresh(worst)
    assert worst.is_gold and worst.gold_ranking == items[0].consensus.ranking
    client.post(f"/admin/tasks/{worst.id}/ungold", data={"csrf_token": csrf})
    db.refresh(worst)
    assert not worst.is_gold and worst.gold_ranking is None
    actions = db.scalars(
        select(AuditEvent.action)
        .where(AuditEvent.entity_type == "task", AuditEvent.entity_id == str(worst.id))
        .order_by(AuditEvent.id)
    ).all()
    assert actions == ["task.send_back", "task.gold", "task.ungold"]


def test_labeler_page_and_judgment_history_with_its_audit_trail(client, db, judged, as_role):
    _, careful, lazy = judged
    as_role("admin")
    page = client.get(f"/admin/campaigns/quality/labelers/{lazy.id}")
    assert page.status_code == 200 and 'data-testid="position-bias-flag"' in page.text
    assert "biased" not in client.get(f"/admin/campaigns/quality/labelers/{careful[0].id}").text

    judgment = db.scalar(select(Judgment).where(Judgment.user_id == lazy.id).limit(1))
    flipped = [[cid] for tier in reversed(judgment.ranking) for cid in tier]
    new, _ = labeling.edit(
        db,
        user=lazy,
        judgment_id=judgment.id,
        answer=EditIn(ranking=flipped, idempotency_key="audit-view-0123456789"),
    )
    db.commit()
    history = client.get(f"/admin/judgments/{judgment.id}").text
    assert f"<td>{judgment.id}" in history and f"<td>{new.id}" in history
    assert "judgment.create" in history and "judgment.edit" in history
