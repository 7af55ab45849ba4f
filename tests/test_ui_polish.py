"""Small page fixes: a job links back to its campaign and shows its result; a model version's
long paths wrap on a phone instead of widening the page (checked in a real browser)."""

from __future__ import annotations

import html
import json
import re
from typing import TYPE_CHECKING

import pytest

from app.auth.models import Role
from app.jobs import service as jobs
from app.jobs.models import JobState, ModelKind, ModelVersion
from tests.factories import make_campaign

if TYPE_CHECKING:
    from tests.browser import Browsing, LiveServer

pytest_plugins = ["tests.browser"]

LONG_PATH = (
    "models/reward-campaign-quality-2026-05-01T12-00-00-a-rather-long-run-name-nobody-"
    "shortened/checkpoint-final-merged-with-its-value-head"
)


def job_of(db, kind: str, config: dict, campaign=None, result=None):
    job = jobs.enqueue(db, kind=kind, config=config, campaign_id=campaign and campaign.id)
    if result is not None:
        job.state, job.result = JobState.succeeded, result
    db.commit()
    return job


def campaign_cell(page: str) -> str:
    found = re.search(r'<dd data-testid="job-campaign">(.*?)</dd>', page, re.S)
    assert found, "the job page names no campaign"
    return found.group(1)


def test_a_job_links_to_its_campaign_for_each_role(client, as_role, db) -> None:
    campaign = make_campaign(db, slug="polish")
    generate = job_of(db, "generate", {"campaign": "polish", "model_id": 1}, campaign)
    reward = job_of(db, "train_reward", {"campaigns": ["polish", "polish-b"]}, campaign)
    loose = job_of(db, "train_reward", {"campaigns": ["polish"]})  # no campaign_id: nothing shown

    as_role("admin")
    cell = campaign_cell(client.get(f"/jobs/{generate.id}").text)
    assert '<a href="/admin/campaigns/polish">polish</a>' in cell
    cell = campaign_cell(client.get(f"/jobs/{reward.id}").text)
    assert 'href="/admin/campaigns/polish"' in cell and 'href="/admin/campaigns/polish-b"' in cell

    as_role("researcher")  # cannot open /admin/campaigns/SLUG: the exports form for it
    page = client.get(f"/jobs/{generate.id}").text
    cell = campaign_cell(page)
    assert "/admin/campaigns" not in cell and "<code>polish</code>" in cell
    assert 'href="/research/exports?campaign=polish"' in cell
    assert client.get("/admin/campaigns/polish").status_code == 403
    assert client.get("/research/exports?campaign=polish").status_code == 200
    assert 'data-testid="job-campaign"' not in client.get(f"/jobs/{loose.id}").text


def test_a_job_shows_its_result_escaped(client, as_role, db) -> None:
    result = {"model_id": 7, "eval": {"eval_accuracy": 0.75}, "note": "<script>x</script>"}
    done = job_of(db, "train_reward", {"campaigns": []}, result=result)
    waiting = job_of(db, "train_reward", {"campaigns": []})
    as_role("researcher")
    page = client.get(f"/jobs/{done.id}").text
    found = re.search(
        r'<details class="job-result" data-testid="job-result">(.*?)</details>', page, re.S
    )
    assert found, "the job page shows no result"
    shown = re.search(r'<pre class="log">(.*?)</pre>', found.group(1), re.S)
    assert shown and "<script>" not in shown.group(1)
    assert json.loads(html.unescape(shown.group(1))) == result
    assert '\n  "eval": {\n    "eval_accuracy": 0.75\n  },' in shown.group(1)  # pretty, sorted
    assert 'data-testid="job-result"' not in client.get(f"/jobs/{waiting.id}").text


# --- a phone's width, in a real browser --------------------------------------------------------

PHONE = {"width": 390, "height": 844}
SCROLL_WIDTH = "() => document.documentElement.scrollWidth"


@pytest.mark.browser
def test_pages_fit_a_phone_even_with_long_paths(server: LiveServer, browsing: Browsing) -> None:
    with server.database.session() as db:
        campaign = make_campaign(db, slug="phone-polish")
        model = ModelVersion(name="phone-reward", kind=ModelKind.reward, path=LONG_PATH, metrics={})
        policy = ModelVersion(
            name="phone-policy", kind=ModelKind.policy, path=LONG_PATH, metrics={}
        )
        db.add_all([model, policy])
        db.flush()
        job = job_of(
            db, "train_reward", {"campaigns": ["phone-polish"]}, campaign, {"path": LONG_PATH}
        )
        ids, job_id = (model.id, policy.id), job.id
    server.create_user("phone-researcher", Role.researcher)
    page = browsing.new_page()
    page.set_viewport_size(PHONE)
    browsing.login(page, "phone-researcher")

    pages = (*(f"/models/{i}" for i in ids), f"/jobs/{job_id}", "/jobs", "/policies")
    for path in (*pages, "/research/exports"):
        page.goto(path)
        assert page.evaluate(SCROLL_WIDTH) <= PHONE["width"], f"{path} scrolls sideways"
    page.goto(f"/models/{ids[0]}")
    files = page.get_by_test_id("model-files")
    assert LONG_PATH in files.inner_text().replace("\n", "")

    api = page.get_by_text(f"GET /api/v1/models/{ids[0]}", exact=True)
    page.set_viewport_size({"width": 1280, "height": 800})  # a desktop's short code: one line
    box = api.bounding_box()
    assert box is not None and box["height"] < 30, box
    assert page.evaluate(SCROLL_WIDTH) <= 1280
