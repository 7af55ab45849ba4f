"""The jobs pages' scripts in a real browser: the metric charts step in whole steps, label a
learning rate compactly and keep the generation job's rate apart from its counts; cancelling a
running job asks first; the generate form's count follows the campaign select, and choosing
another version refills the form from it (htmx)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import pytest

from app.auth.models import Role
from app.campaigns.models import CampaignMode
from app.jobs import registry
from app.jobs.models import Job, JobMetric, JobState, ModelKind, ModelVersion
from app.jobs.specs import GenerateJobSpec
from app.labeling.models import TaskStatus
from tests.factories import make_campaign, make_task

if TYPE_CHECKING:
    from tests.browser import Browsing, LiveServer

pytest_plugins = ["tests.browser"]
pytestmark = pytest.mark.browser

TICKS = """(group) => {
  const chart = Chart.getChart(document.querySelector(`[data-chart="${group}"] canvas`));
  return {
    x: chart.scales.x.ticks.map((t) => String(t.label)),
    y: chart.scales.y.ticks.map((t) => String(t.label)),
    series: chart.data.datasets.map((d) => d.label),
  };
}"""


def seed(server: LiveServer, slug: str) -> dict[str, int]:
    with server.database.session() as db:
        campaign = make_campaign(db, slug=slug, k=2, mode=CampaignMode.pairwise)
        other = make_campaign(db, slug=f"{slug}-other", k=2, mode=CampaignMode.pairwise)
        for _ in range(2):
            make_task(db, other, completions=[]).status = TaskStatus.complete
        policy = ModelVersion(name=f"{slug}-p", kind=ModelKind.policy, path="org/p", metrics={})
        db.add(policy)
        db.flush()
        tuned = ModelVersion(  # a PPO version: the form samples it as its run did
            name=f"{slug}-ppo",
            kind=ModelKind.policy,
            path="org/ppo",
            algorithm="ppo",
            parent_id=policy.id,
            metrics={"training": {"config": {"temperature": 0.3, "max_new_tokens": 12}}},
        )
        db.add(tuned)
        db.flush()
        job = registry.queue_generation(
            db, GenerateJobSpec(campaign=slug, model_id=policy.id), actor_id=None
        )
        job.state, job.worker_id = JobState.running, "elsewhere"
        rows = [("train/learning_rate", step, 3e-6 / step) for step in (1, 2, 3)]
        rows += [("generate/completions_per_second", step, 40.0 + step) for step in (1, 2, 3)]
        rows += [("generate/tasks_created", step, 8.0 * step) for step in (1, 2, 3)]
        db.add_all(JobMetric(job_id=job.id, name=n, step=s, value=v) for n, s, v in rows)
        db.commit()
        return {"job": job.id, "policy": policy.id, "tuned": tuned.id, "campaign": campaign.id}


def test_charts_cancel_and_the_generate_count(server: LiveServer, browsing: Browsing) -> None:
    ids = seed(server, "ux-browser")
    server.create_user("ux-researcher", Role.researcher)
    page = browsing.new_page()
    browsing.login(page, "ux-researcher")

    page.goto(f"/jobs/{ids['job']}")
    for group in ("learning_rate", "generate_rate", "generate_counts"):
        page.locator(f'[data-chart="{group}"] canvas').wait_for()
    rate = page.evaluate(TICKS, "learning_rate")
    assert rate["x"] and all(re.fullmatch(r"\d+", label) for label in rate["x"]), rate["x"]
    assert all("E" not in label and len(label) <= 8 for label in rate["y"]), rate["y"]
    assert "3e-6" in rate["y"], rate["y"]
    assert page.evaluate(TICKS, "generate_rate")["series"] == ["generate/completions_per_second"]
    assert page.evaluate(TICKS, "generate_counts")["series"] == ["generate/tasks_created"]

    # Cancelling the running job asks first; saying no changes nothing.
    asked: list[str] = []

    def answer(dialog, accept: bool) -> None:
        asked.append(dialog.message)
        dialog.accept() if accept else dialog.dismiss()

    page.once("dialog", lambda dialog: answer(dialog, False))
    page.get_by_role("button", name="Cancel").click()
    page.wait_for_timeout(500)
    assert asked and "is running" in asked[0]
    with server.database.session() as db:
        assert db.get_one(Job, ids["job"]).cancel_requested is False
    page.once("dialog", lambda dialog: answer(dialog, True))
    page.get_by_role("button", name="Cancel").click()
    page.get_by_test_id("job-state").filter(has_text="stopping").wait_for()
    with server.database.session() as db:
        assert db.get_one(Job, ids["job"]).cancel_requested is True

    # The count of prompts that lack completions follows the campaign select.
    page.goto(f"/generate?model={ids['policy']}&campaign=ux-browser")
    assert "<strong>0</strong>" in page.locator("#generate-due").inner_html()
    page.locator("#g-campaign").select_option("ux-browser-other")
    page.locator("#generate-due", has_text="ux-browser-other").wait_for()
    assert "<strong>2</strong>" in page.locator("#generate-due").inner_html()

    # Choosing another version refills the form from it; the swapped-in selects still work.
    page.locator("#g-model").select_option(str(ids["tuned"]))
    page.locator("#g-temperature[value='0.3']").wait_for()
    # htmx binds the swapped-in selects' triggers as the swap settles (20 ms on): a change
    # before that is lost, as no person could be quick enough to make it.
    page.wait_for_function("() => !document.querySelector('.htmx-settling')")
    assert page.locator("#g-audit_against_id").input_value() == str(ids["policy"])
    assert page.locator("#g-campaign").input_value() == "ux-browser-other"
    page.locator("#g-campaign").select_option("ux-browser")
    page.locator("#generate-due", has_text="ux-browser").filter(has_not_text="other").wait_for()
