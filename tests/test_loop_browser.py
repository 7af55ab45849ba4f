"""The loop in a real browser: an admin goes from a campaign to its Loop page, is refused a
bad option, starts the loop, pauses and resumes it; on the policy versions page a version the
reward model prefers while people do not is flagged Goodhart, and its page shows the win
rate. (The loop's jobs running end to end is tests/test_loop.py; here the audit pairs and
judgments are written directly.)"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from app.auth.models import Role
from app.jobs.models import ModelKind, ModelVersion
from app.labeling.models import Judgment
from app.loop.audits import add_audit_task
from app.loop.models import PolicyLoop
from tests.factories import make_campaign, make_labeler, make_task

if TYPE_CHECKING:
    from tests.browser import Browsing, LiveServer

pytest_plugins = ["tests.browser"]
pytestmark = pytest.mark.browser

PAIRS = 12


def seed(server: LiveServer, slug: str) -> tuple[int, int, int]:
    """A campaign, a base policy and a child of it with PAIRS judged audit pairs: people
    split evenly, the reward model always prefers the child."""
    with server.database.session() as db:
        campaign = make_campaign(db, slug=slug, name="Browser loop", k=2, overlap=1)
        base = ModelVersion(name="base", kind=ModelKind.policy, path="models/b", algorithm="base")
        rm = ModelVersion(name="rm one", kind=ModelKind.reward, path="models/r", algorithm="reward")
        db.add_all([base, rm])
        db.flush()
        child = ModelVersion(
            name="verbose child",
            kind=ModelKind.policy,
            path="models/c",
            algorithm="ppo",
            parent_id=base.id,
            campaign_id=campaign.id,
        )
        db.add(child)
        db.flush()
        labeler = make_labeler(db, f"{slug}-labeler")
        for n in range(PAIRS):
            old = make_task(db, campaign, completions=[f"short answer {n}"]).prompt.completions[0]
            old.model_version_id = base.id
            task = add_audit_task(
                db,
                campaign=campaign,
                prompt_id=old.prompt_id,
                new=(f"a much longer answer {n} " * 5, {"reward": 2.0}),
                new_model_id=child.id,
                old=old,
                old_model_id=base.id,
                job_id=None,
                reward_model_id=rm.id,
                scores=(2.0, 1.0),
            )
            new_id = next(i.completion_id for i in task.items if i.completion_id != old.id)
            ranking = [[new_id], [old.id]] if n % 2 else [[old.id], [new_id]]
            db.add(
                Judgment(
                    task_id=task.id,
                    campaign_id=campaign.id,
                    user_id=labeler.id,
                    ranking=ranking,
                    idempotency_key=f"{slug}-{n}",
                    payload_hash="-",
                )
            )
        db.commit()
        return base.id, rm.id, child.id


def test_an_admin_runs_a_loop_and_sees_goodhart_flagged(
    server: LiveServer, browsing: Browsing
) -> None:
    slug = "browser-loop"
    base_id, rm_id, child_id = seed(server, slug)
    server.create_user("loop-admin", Role.admin)
    page = browsing.new_page()
    browsing.login(page, "loop-admin")

    page.goto(f"/admin/campaigns/{slug}")
    page.get_by_test_id("loop-link").click()
    page.wait_for_url(f"**/admin/campaigns/{slug}/loop")
    form = page.get_by_test_id("loop-form")
    form.get_by_label("Start from policy").select_option(str(base_id))
    form.get_by_label("Warm-start the reward model from").select_option(str(rm_id))
    form.get_by_label("New human comparisons per iteration").fill("50")
    form.get_by_label("Policy job", exact=True).fill('{"training": {"total_steps": -3}}')
    with page.expect_navigation():
        form.get_by_role("button", name="Start the loop").click()
    assert "total_steps" in page.get_by_test_id("loop-errors").inner_text()
    with server.database.session() as db:
        assert db.query(PolicyLoop).count() == 0  # nothing saved
    form = page.get_by_test_id("loop-form")
    form.get_by_label("Policy job", exact=True).fill('{"training": {"total_steps": 3}}')
    with page.expect_navigation():
        form.get_by_role("button", name="Start the loop").click()
    assert page.get_by_test_id("loop-state").inner_text() == "active"
    assert "of 50 needed" in page.get_by_test_id("loop-pending").inner_text()

    with page.expect_navigation():
        page.get_by_role("button", name="Pause").click()
    assert page.get_by_test_id("loop-state").inner_text() == "paused"
    assert "paused by an admin" in page.get_by_test_id("loop-paused-reason").inner_text()
    with page.expect_navigation():
        page.get_by_role("button", name="Resume").click()
    assert page.get_by_test_id("loop-state").inner_text() == "active"

    page.get_by_test_id("policies-link").click()
    page.wait_for_url(f"**/policies?campaign={slug}")
    child_row = page.locator(f'tr[data-model="{child_id}"]')
    assert child_row.get_attribute("data-depth") == "1"
    assert "50 %" in child_row.get_by_test_id("win-rate").inner_text()
    assert "no better" in child_row.get_by_test_id("win-rate").inner_text()
    assert child_row.get_by_test_id("goodhart").is_visible()
    assert page.locator(f'tr[data-model="{base_id}"]').get_attribute("data-depth") == "0"

    child_row.get_by_role("link", name=f"#{child_id} verbose child").click()
    win = page.get_by_test_id("model-win-rate").inner_text()
    assert "50 % against" in win and f"{PAIRS} judgments" in win
    assert browsing.page_errors == []
