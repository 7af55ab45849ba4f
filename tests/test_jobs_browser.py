"""The jobs pages in a real browser: an admin goes from a campaign to "Train reward model",
queues a job with the form, watches its page turn from queued to succeeded while a worker
runs it (the status panel polls itself; the charts fill from the metrics API), and opens the
model version with its held-out tasks. Cancel and retry work on the page.

The server is a real `prefloop serve`; the worker runs in this process on the same database
and data folder, with a tiny reward model built from config as the backbone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from sqlalchemy import select

from app.auth.models import Role
from app.jobs.models import Job, JobState
from tests.conftest import make_settings
from tests.factories import make_campaign, make_labeler, make_task
from tests.test_reward_job import FAST, answers, rank_by_truth, tiny_backbone
from trainer.worker import run_worker

if TYPE_CHECKING:
    from tests.browser import Browsing, LiveServer

pytest_plugins = ["tests.browser"]
pytestmark = pytest.mark.browser

TASKS = 16


def seed(server: LiveServer, slug: str) -> None:
    with server.database.session() as db:
        campaign = make_campaign(db, slug=slug, name="Browser reward", k=3, overlap=2)
        truth = {}
        for n in range(TASKS):
            task = make_task(db, campaign, prompt=f"question {n}", completions=answers(n))
            truth[task.id] = [item.completion_id for item in task.items]
        labelers = [make_labeler(db, f"{slug}-{i}") for i in range(2)]
        rank_by_truth(db, campaign, labelers, truth)
        db.commit()


def test_an_admin_trains_a_reward_model_from_the_browser(
    server: LiveServer, browsing: Browsing, tmp_path
) -> None:
    slug = "browser-reward"
    seed(server, slug)
    server.create_user("jobs-admin", Role.admin)
    page = browsing.new_page()
    browsing.login(page, "jobs-admin")

    page.goto(f"/admin/campaigns/{slug}")
    page.get_by_test_id("train-reward").click()
    page.wait_for_url(f"**/jobs/new?campaign={slug}")
    form = page.get_by_test_id("reward-form")
    assert form.get_by_label(slug).is_checked()
    # A bad option shows the form again and queues nothing.
    form.get_by_label("Backbone").fill(tiny_backbone(tmp_path / "backbone"))
    form.get_by_label("Learning rate").fill("0")
    with page.expect_navigation():
        form.get_by_role("button", name="Queue training").click()
    assert "learning_rate" in page.get_by_test_id("job-errors").inner_text()
    with server.database.session() as db:
        assert db.scalar(select(Job.id)) is None
    form = page.get_by_test_id("reward-form")
    assert form.get_by_label(slug).is_checked()
    form.get_by_label("Learning rate").fill("0.003")
    form.get_by_label("Max tokens").fill("64")
    form.get_by_label("Judgments per batch").fill("4")
    form.get_by_label("Held-out prompts (0-0.5)").fill("0.5")  # a held-out task, surely
    with page.expect_navigation():
        form.get_by_role("button", name="Queue training").click()

    status = page.get_by_test_id("job-status")
    assert status.get_attribute("data-state") == "queued"
    assert "is queued" in page.locator(".flash").inner_text()
    page.evaluate("window.__samePage = true")

    settings = make_settings(
        database_url=server.database_url, data_dir=server.log_path.parent / "data"
    )
    assert run_worker(settings, "browser-worker", once=True, **FAST, install_signals=False) == 1

    # The panel polls itself into the finished state, without a reload.
    page.locator('[data-testid="job-status"][data-state="succeeded"]').wait_for(timeout=15_000)
    assert page.evaluate("window.__samePage") is True
    assert page.get_by_test_id("job-progress").inner_text() == "100 %"
    assert '"train_groups"' in page.get_by_test_id("job-log").inner_text()  # the handler's log
    page.reload()
    page.locator("#job-charts canvas").first.wait_for()
    assert page.locator("#job-charts canvas").count() >= 2  # loss and accuracy at least

    page.get_by_test_id("job-models").get_by_role("link").first.click()
    page.wait_for_url("**/models/*")
    assert page.get_by_test_id("model-eval").inner_text().count("%") >= 1
    assert page.get_by_test_id("task-compare").count() >= 1

    # The list shows the job and its model; a queued job is cancelled and retried in place.
    page.goto("/jobs")
    assert "succeeded" in page.get_by_test_id("jobs-table").inner_text()
    with server.database.session() as db:
        from app.jobs.specs import RewardJobSpec
        from app.jobs.training import queue_reward_training

        spec = RewardJobSpec(backbone="/nowhere", campaigns=[slug])
        second = queue_reward_training(db, spec, actor_id=None).id
        db.commit()
    page.goto(f"/jobs/{second}")
    page.get_by_role("button", name="Cancel").click()
    page.locator('[data-testid="job-status"][data-state="cancelled"]').wait_for()
    page.get_by_role("button", name="Retry").click()
    page.locator('[data-testid="job-status"][data-state="queued"]').wait_for()
    with server.database.session() as db:
        assert db.get_one(Job, second).state is JobState.queued
