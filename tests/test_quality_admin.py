"""The admin's levers on label quality (exclude a labeler, record a consensus, change the
campaign's overlap and gold rate, deactivate a labeler), and the stored reports behind the
dashboard. Both backends."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from app.audit.models import AuditEvent
from app.auth import service as auth_service
from app.auth.models import User
from app.labeling.models import Judgment, Task, TaskStatus
from app.quality import service as quality
from app.quality.models import LabelerExclusion, QualityReport
from app.quality.service import Filters, cached_report, quality_report


def audit_actions(db, entity_type: str, entity_id: int) -> list[str]:
    return db.scalars(
        select(AuditEvent.action)
        .where(AuditEvent.entity_type == entity_type, AuditEvent.entity_id == str(entity_id))
        .order_by(AuditEvent.id)
    ).all()


def test_excluding_a_labeler_removes_their_judgments_from_the_figures_and_is_undone(
    client, db, judged, as_role
):
    campaign, careful, lazy = judged
    before = quality_report(db, campaign, resamples=10)
    assert before["agreement"]["labelers"] == 4
    csrf = as_role("admin")
    refused = client.post(
        f"/admin/campaigns/quality/labelers/{lazy.id}/exclude",
        data={"csrf_token": csrf, "reason": "   "},
    )
    assert refused.status_code == 422 and "reason" in refused.text
    done = client.post(
        f"/admin/campaigns/quality/labelers/{lazy.id}/exclude",
        data={"csrf_token": csrf, "reason": "ranks what is shown first", "scope": "campaign"},
        follow_redirects=False,
    )
    assert done.status_code == 303
    again = client.post(
        f"/admin/campaigns/quality/labelers/{lazy.id}/exclude",
        data={"csrf_token": csrf, "reason": "twice"},
    )
    assert again.status_code == 409

    after = quality_report(db, campaign, resamples=10)
    assert after["agreement"]["labelers"] == 3
    assert "lazy" not in {row["username"] for row in after["labelers"]}
    # The three careful labelers rank alike: without the lazy one they agree completely.
    assert after["agreement"]["pairwise_agreement"]["value"] == 1.0
    counted = quality_report(db, campaign, Filters(include_excluded=True), resamples=10)
    lazy_row = next(row for row in counted["labelers"] if row["username"] == "lazy")
    assert lazy_row["excluded"]["reason"] == "ranks what is shown first"
    # The SQL clause exports and the trainer use agrees.
    kept = db.scalars(
        select(Judgment.user_id).where(
            Judgment.campaign_id == campaign.id,
            quality.not_excluded(Judgment.user_id, Judgment.campaign_id),
        )
    ).all()
    assert lazy.id not in kept and careful[0].id in kept

    page = client.get(f"/admin/campaigns/quality/labelers/{lazy.id}")
    assert 'data-testid="excluded-notice"' in page.text
    dashboard = client.get("/admin/campaigns/quality/quality")
    assert 'data-excluded="lazy"' in dashboard.text

    exclusion = db.scalar(select(LabelerExclusion).where(LabelerExclusion.user_id == lazy.id))
    client.post(
        f"/admin/exclusions/{exclusion.id}/lift",
        data={"csrf_token": csrf, "next": "https://evil.example/"},
    )
    db.refresh(exclusion)
    assert exclusion.revoked_at is not None
    assert quality_report(db, campaign, resamples=10)["agreement"]["labelers"] == 4
    assert audit_actions(db, "user", lazy.id)[-2:] == ["labeler.exclude", "labeler.include"]
    assert (
        client.post(f"/admin/exclusions/{exclusion.id}/lift", data={"csrf_token": csrf}).status_code
        == 409
    )


def test_an_exclusion_from_every_campaign_applies_here(db, judged, users):
    campaign, _, lazy = judged
    quality.exclude(db, user=lazy, campaign=None, reason="left the team", actor_id=users.admin.id)
    db.flush()
    assert quality.excluded_labelers(db, campaign.id)[lazy.id]["all_campaigns"] is True
    assert quality_report(db, campaign, resamples=10)["agreement"]["labelers"] == 3


def test_recording_the_consensus_takes_a_task_out_of_the_queue_and_back(
    client, db, judged, as_role
):
    campaign, _, _ = judged
    report = quality_report(db, campaign, resamples=10)
    worst = quality.disagreements(db, campaign, report, limit=1)[0].task
    ids = [item.completion_id for item in worst.items]
    csrf = as_role("admin")
    bad = client.post(
        f"/admin/tasks/{worst.id}/resolve",
        data={"csrf_token": csrf, **{f"place_{cid}": "1" for cid in ids[:-1]}},
    )
    assert bad.status_code == 422
    places = {f"place_{ids[0]}": "2", f"place_{ids[1]}": "1", f"place_{ids[2]}": "3"}
    places[f"place_{ids[3]}"] = "3"  # a tie for last
    ok = client.post(
        f"/admin/tasks/{worst.id}/resolve",
        data={"csrf_token": csrf, **places},
        follow_redirects=False,
    )
    assert ok.status_code == 303
    db.refresh(worst)
    assert worst.resolved_ranking == [[ids[1]], [ids[0]], sorted([ids[2], ids[3]])]
    assert worst.id not in {
        d.task.id for d in quality.disagreements(db, campaign, report, limit=50)
    }
    queue = client.get("/admin/campaigns/quality/disagreements").text
    assert 'data-testid="resolved"' in queue and f'data-task="{worst.id}"' in queue

    # Making it gold now takes the recorded answer, not the computed one.
    client.post(f"/admin/tasks/{worst.id}/gold", data={"csrf_token": csrf})
    db.refresh(worst)
    assert worst.gold_ranking == worst.resolved_ranking
    client.post(f"/admin/tasks/{worst.id}/ungold", data={"csrf_token": csrf})
    client.post(f"/admin/tasks/{worst.id}/unresolve", data={"csrf_token": csrf})
    db.refresh(worst)
    assert worst.resolved_ranking is None and worst.resolved_by_id is None
    assert audit_actions(db, "task", worst.id) == [
        "task.resolve",
        "task.gold",
        "task.ungold",
        "task.unresolve",
    ]


def test_changing_overlap_gold_and_recheck_rate_from_the_dashboard(client, db, judged, as_role):
    campaign, _, _ = judged
    csrf = as_role("admin")
    bad = client.post(
        "/admin/campaigns/quality/quality/settings",
        data={"csrf_token": csrf, "overlap": "5", "gold_percent": "10", "recheck_percent": "80"},
    )
    assert bad.status_code == 422
    db.refresh(campaign)
    assert campaign.overlap == 4  # nothing half-applied
    ok = client.post(
        "/admin/campaigns/quality/quality/settings",
        data={"csrf_token": csrf, "overlap": "5", "gold_percent": "12.5", "recheck_percent": "5"},
        follow_redirects=False,
    )
    assert ok.status_code == 303
    db.refresh(campaign)
    assert (campaign.overlap, campaign.gold_rate, campaign.recheck_rate) == (5, 0.125, 0.05)
    reopened = db.scalars(
        select(Task.status).where(Task.campaign_id == campaign.id, Task.is_gold.is_(False))
    ).all()
    assert set(reopened) == {TaskStatus.open}  # four judgments each, five wanted now
    event = db.scalar(
        select(AuditEvent)
        .where(AuditEvent.action == "campaign.update", AuditEvent.entity_id == str(campaign.id))
        .order_by(AuditEvent.id.desc())
    )
    assert event.before["overlap"] == 4 and event.after["overlap"] == 5


def test_deactivating_a_labeler_from_their_page(client, db, judged, as_role):
    _, _, lazy = judged
    csrf = as_role("admin")
    client.post(
        f"/admin/campaigns/quality/labelers/{lazy.id}/active",
        data={"csrf_token": csrf, "active": "false"},
    )
    db.expire_all()
    assert db.get(User, lazy.id).is_active is False
    page = client.get(f"/admin/campaigns/quality/labelers/{lazy.id}").text
    assert "Reactivate lazy" in page
    client.post(
        f"/admin/campaigns/quality/labelers/{lazy.id}/active",
        data={"csrf_token": csrf, "active": "true"},
    )
    db.expire_all()
    assert db.get(User, lazy.id).is_active is True
    assert audit_actions(db, "user", lazy.id)[-2:] == ["user.disable", "user.enable"]


def test_stored_report_is_fresh_until_a_judgment_or_decision_changes_the_stamp(db, judged):
    campaign, careful, _ = judged
    filters = Filters()
    first = cached_report(db, campaign, filters)
    assert first.fresh
    stored = db.get(QualityReport, (campaign.id, filters.key()))
    assert stored.stamp == quality.stamp(db, campaign)
    again = cached_report(db, campaign, filters)
    assert again.computed_at == first.computed_at  # served, not recomputed

    # A large campaign (threshold lowered) with a new judgment: the stale report is served
    # and a background computation is asked for.
    judgment = db.scalar(select(Judgment).where(Judgment.user_id == careful[0].id).limit(1))
    db.add(
        Judgment(
            task_id=judgment.task_id,
            campaign_id=campaign.id,
            user_id=careful[0].id,
            ranking=judgment.ranking,
            display_order=judgment.display_order,
            idempotency_key="stamp-test-0123456789",
            payload_hash="0" * 64,
            is_current=False,
        )
    )
    db.flush()
    asked: list[tuple[int, Filters]] = []
    original = quality.INLINE_MAX_JUDGMENTS
    quality.INLINE_MAX_JUDGMENTS = 0
    try:
        stale = cached_report(
            db, campaign, filters, schedule=lambda *request: asked.append(request)
        )
    finally:
        quality.INLINE_MAX_JUDGMENTS = original
    assert stale.fresh is False and stale.computed_at == first.computed_at
    assert asked == [(campaign.id, filters)]
    refreshed = quality.refresh_report(db, campaign, filters)
    assert refreshed.fresh and cached_report(db, campaign, filters).fresh

    # An admin decision on a task changes the stamp too.
    before = quality.stamp(db, campaign)
    quality.send_back(db, task=db.get(Task, judgment.task_id), actor_id=careful[0].id)
    assert quality.stamp(db, campaign) != before
    assert cached_report(db, campaign, filters, schedule=lambda *_: None).fresh  # small: inline


def test_large_campaign_first_view_polls_until_the_report_is_ready(
    client, db, judged, as_role, monkeypatch
):
    campaign, _, _ = judged
    monkeypatch.setattr(quality, "INLINE_MAX_JUDGMENTS", 0)
    # The background thread cannot see this test's uncommitted data, so record the request
    # and compute it here, as the thread would.
    asked: list = []
    monkeypatch.setattr(
        quality.ReportRefresher, "schedule", lambda self, cid, filters: asked.append(filters)
    )
    as_role("admin")
    page = client.get("/admin/campaigns/quality/quality")
    assert page.status_code == 200 and 'data-testid="quality-computing"' in page.text
    poll = client.get(
        "/admin/campaigns/quality/quality",
        headers={"HX-Request": "true", "HX-Trigger": "quality-poll"},
    )
    assert 'id="quality-poll"' in poll.text and "<html" not in poll.text
    assert client.get("/api/v1/campaigns/quality/quality").status_code == 202
    assert asked and asked[0] == Filters()

    quality.refresh_report(db, campaign, Filters())
    db.commit()
    ready = client.get(
        "/admin/campaigns/quality/quality",
        headers={"HX-Request": "true", "HX-Trigger": "quality-poll"},
    )
    assert ready.headers.get("HX-Refresh") == "true"
    body = client.get("/api/v1/campaigns/quality/quality").json()
    assert body["fresh"] is True and body["agreement"]["tasks_compared"] == 30


@pytest.mark.parametrize("section", ["labelers", "matrix", "trend", "disagreements"])
def test_every_section_has_its_json_endpoint_for_researchers(client, db, users, judged, section):
    token = auth_service.create_api_token(db, users.researcher, name="sections").secret
    db.commit()
    response = client.get(
        f"/api/v1/campaigns/quality/quality/{section}",
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 200
    body = response.json()
    assert body["fresh"] is True
    if section == "disagreements":
        assert body["tasks"] and all(len(t["judgments"]) == 4 for t in body["tasks"])
        first = body["tasks"][0]
        assert len(first["pair_agreement"]) == 6  # K = 4: every consensus-ordered pair
        assert all(0 <= p["agreement"] <= 1 for p in first["pair_agreement"])
    else:
        assert section in body
    assert (
        client.get(
            "/api/v1/campaigns/nope/quality/trend", headers={"Authorization": f"Bearer {token}"}
        ).status_code
        == 404
    )


def test_a_json_column_set_to_none_is_sql_null(db, judged):
    """Demonstrations (ranking None) must stay out of `ranking IS NOT NULL` queries."""
    campaign, careful, _ = judged
    task_id = db.scalar(select(Judgment.task_id).where(Judgment.campaign_id == campaign.id))
    db.add(
        Judgment(
            task_id=task_id,
            campaign_id=campaign.id,
            user_id=careful[0].id,
            ranking=None,
            idempotency_key="none-is-null-0123456789",
            payload_hash="0" * 64,
        )
    )
    db.flush()
    assert db.scalar(
        select(Judgment.id).where(
            Judgment.idempotency_key == "none-is-null-0123456789", Judgment.ranking.is_(None)
        )
    )
    rows = quality.load_judgments(db, campaign, Filters())
    assert all(row.ranking is not None for row in rows)


def test_the_labeler_table_shows_self_consistency_from_rechecks(client, db, judged, as_role):
    from app.labeling import service as labeling
    from app.labeling.schemas import JudgmentIn
    from tests.test_recheck import ALWAYS, Draws

    campaign, careful, _ = judged
    campaign.recheck_rate = 0.5
    db.flush()
    labeler = careful[0]
    lease = labeling.next_task(db, user=labeler, campaign=campaign, rng=Draws(ALWAYS))
    assert lease is not None and lease.is_recheck
    first = db.scalar(
        select(Judgment).where(
            Judgment.task_id == lease.task_id,
            Judgment.user_id == labeler.id,
            Judgment.is_current.is_(True),
        )
    )
    reversed_ranking = [tier for tier in reversed(first.ranking)]  # disagrees on every pair
    labeling.submit(
        db,
        user=labeler,
        submit_key=lease.submit_key,
        answer=JudgmentIn(ranking=reversed_ranking, time_on_task_ms=1000),
    )
    db.commit()
    rows = {row["username"]: row for row in quality_report(db, campaign, resamples=10)["labelers"]}
    assert rows[labeler.username]["self_consistency"] == {"rechecks": 1, "agreement": 0.0}
    assert rows[careful[1].username]["self_consistency"] == {"rechecks": 0, "agreement": None}
    as_role("admin")
    page = client.get(f"/admin/campaigns/quality/labelers/{labeler.id}").text
    assert "(1 re-check)" in page
