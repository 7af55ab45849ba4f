"""Generating from a trained version as its run sampled, scored and audited (the one click and
the /generate form), no duplicate generation jobs, the notice of a job that found nothing to
do, and the jobs and models pages' preselected choices, actions, labels and breadcrumbs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.campaigns.models import CampaignMode
from app.jobs import registry, training
from app.jobs.models import Job, JobState, ModelKind, ModelVersion
from app.jobs.specs import GenerateJobSpec, PPOJobSpec
from app.labeling.models import TaskStatus
from app.loop.models import LoopIteration, PolicyLoop
from app.main import create_app
from tests.factories import make_campaign, make_task
from trainer.worker import run_worker

FAST = {"lease_seconds": 30.0, "heartbeat_seconds": 0.3, "poll_interval": 0.05}
SAMPLING = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 8}


def version(db, name: str, kind: ModelKind = ModelKind.policy, **fields) -> ModelVersion:
    made = ModelVersion(name=name, kind=kind, path=f"org/{name}", **{"metrics": {}, **fields})
    db.add(made)
    db.flush()
    return made


def ppo_version(db, campaign, base: ModelVersion, reward: ModelVersion) -> ModelVersion:
    """A PPO result as the worker publishes it: its job, the run's config in its metrics."""
    spec = PPOJobSpec(
        policy_id=base.id,
        reward_model_id=reward.id,
        campaigns=[campaign.slug],
        training=SAMPLING,
    )
    job = training.queue_ppo(db, spec, actor_id=None)
    job.state = JobState.succeeded
    summary = {"config": spec.training.model_dump(), "reward_model_id": reward.id}
    return version(
        db,
        "ppo-result",
        algorithm="ppo",
        parent_id=base.id,
        campaign_id=campaign.id,
        job_id=job.id,
        metrics={"training": summary, "eval": {"reward/raw": 0.5}},
    )


def queued(response) -> Job | None:
    return None if response.status_code != 303 else int(response.headers["location"].split("/")[-1])


def select_of(page: str, name: str) -> str:
    return re.search(rf'<select id="g-{name}".*?</select>', page, re.S).group(0)


def test_one_click_from_a_ppo_version_samples_scores_and_audits_as_its_run(client, as_role, db):
    campaign = make_campaign(db, slug="gen-defaults", k=2, mode=CampaignMode.pairwise)
    base = version(db, "base", algorithm="base")
    reward = version(db, "rm", ModelKind.reward, algorithm="reward", campaign_id=campaign.id)
    ppo = ppo_version(db, campaign, base, reward)
    plain = version(db, "registered", algorithm="base", campaign_id=campaign.id)
    db.commit()
    csrf = as_role("researcher")

    made = client.post(
        f"/models/{ppo.id}/generate", data={"csrf_token": csrf}, follow_redirects=False
    )
    job = db.get_one(Job, queued(made))
    assert job.kind == "generate" and job.config["model_id"] == ppo.id
    assert job.config["reward_model_id"] == reward.id
    assert job.config["reference_id"] == base.id and job.config["audit_against_id"] == base.id
    assert job.config["audit_share"] == 0.2  # the loop's default share
    assert {name: job.config[name] for name in SAMPLING} == SAMPLING

    # A second click while the first job waits queues nothing and says so.
    again = client.post(
        f"/models/{ppo.id}/generate", data={"csrf_token": csrf}, follow_redirects=False
    )
    assert queued(again) == job.id
    assert "Nothing new was queued" in client.get(again.headers["location"]).text
    assert db.scalar(select(func.count(Job.id)).where(Job.kind == "generate")) == 1
    # ... and once it has finished, a new one is queued.
    job.state = JobState.succeeded
    db.commit()
    third = client.post(
        f"/models/{ppo.id}/generate", data={"csrf_token": csrf}, follow_redirects=False
    )
    assert queued(third) not in (None, job.id)

    # A registered version (no run, no parent) keeps the spec's defaults and links nothing.
    other = db.get_one(
        Job,
        queued(
            client.post(
                f"/models/{plain.id}/generate", data={"csrf_token": csrf}, follow_redirects=False
            )
        ),
    )
    defaults = GenerateJobSpec(campaign="x", model_id=1)
    assert other.config["temperature"] == defaults.temperature
    assert other.config["max_new_tokens"] == defaults.max_new_tokens
    assert not {"reward_model_id", "reference_id", "audit_against_id"} & other.config.keys()


def test_a_loop_made_version_generates_as_its_loop_would(client, as_role, db):
    campaign = make_campaign(db, slug="gen-loop", k=2, mode=CampaignMode.pairwise)
    start = version(db, "start", algorithm="base")
    middle = version(db, "middle", algorithm="dpo", parent_id=start.id, campaign_id=campaign.id)
    reward = version(db, "loop-rm", ModelKind.reward, algorithm="reward")
    newest = version(db, "newest", algorithm="dpo", parent_id=middle.id, campaign_id=campaign.id)
    loop = PolicyLoop(
        campaign_id=campaign.id,
        algorithm="dpo",
        policy_id=newest.id,
        reference_id=start.id,
        audit_share=0.5,
        comparison_mark=0,
        config={"generate": {"max_prompts": 3}},
    )
    db.add(loop)
    db.flush()
    db.add(
        LoopIteration(
            loop_id=loop.id,
            number=2,
            comparison_mark=0,
            new_comparisons=0,
            parent_policy_id=middle.id,
            reward_model_id=reward.id,
            policy_id=newest.id,
        )
    )
    db.commit()
    csrf = as_role("researcher")
    made = client.post(
        f"/models/{newest.id}/generate", data={"csrf_token": csrf}, follow_redirects=False
    )
    config = db.get_one(Job, queued(made)).config
    assert config["reference_id"] == start.id  # the loop's starting policy, not the parent
    assert config["audit_against_id"] == middle.id and config["audit_share"] == 0.5
    assert config["reward_model_id"] == reward.id and config["max_prompts"] == 3


def test_the_form_is_filled_from_the_version_and_counts_as_the_selects_change(client, as_role, db):
    campaign = make_campaign(db, slug="gen-form-defaults", k=2, mode=CampaignMode.pairwise)
    empty = make_campaign(db, slug="gen-form-empty", k=2, mode=CampaignMode.pairwise)
    for _ in range(3):
        make_task(db, campaign, completions=[]).status = TaskStatus.complete
    base = version(db, "form-base", algorithm="base")
    reward = version(db, "form-rm", ModelKind.reward, algorithm="reward")
    ppo = ppo_version(db, campaign, base, reward)
    db.commit()
    csrf = as_role("researcher")

    page = client.get(f"/generate?model={ppo.id}").text
    assert f'value="{campaign.slug}" selected' in select_of(page, "campaign")
    assert f'value="{reward.id}" selected' in select_of(page, "reward_model_id")
    assert f'value="{base.id}" selected' in select_of(page, "reference_id")
    assert f'value="{base.id}" selected' in select_of(page, "audit_against_id")
    assert 'id="g-temperature" name="temperature" type="number" step="any" value="0.7"' in page
    assert 'value="8"' in page and "<strong>3</strong> prompt(s)" in page
    assert 'hx-get="/generate"' in select_of(page, "campaign")

    # htmx: the count alone, for what the selects now say.
    fragment = client.get(
        f"/generate?campaign={empty.slug}&model_id={ppo.id}&source=model",
        headers={"HX-Request": "true"},
    )
    assert fragment.status_code == 200 and "<html" not in fragment.text
    assert 'id="generate-due"' in fragment.text and "<strong>0</strong>" in fragment.text
    assert (
        "<strong>3</strong>"
        in client.get(
            f"/generate?campaign={campaign.slug}&model_id={ppo.id}", headers={"HX-Request": "true"}
        ).text
    )

    fields = {
        "campaign": campaign.slug,
        "source": "model",
        "model_id": str(ppo.id),
        "reward_model_id": str(reward.id),
        "reference_id": str(base.id),
        "audit_against_id": "",
        "audit_share": "0.2",  # no audits chosen: the share is dropped, not refused
        "csrf_token": csrf,
    }
    done = client.post("/generate", data=fields, follow_redirects=False)
    config = db.get_one(Job, queued(done)).config
    assert config["reward_model_id"] == reward.id and config["reference_id"] == base.id
    assert "audit_against_id" not in config and config.get("audit_share", 0) == 0
    again = client.post("/generate", data=fields, follow_redirects=False)
    assert queued(again) == queued(done)


def test_a_job_that_found_nothing_to_do_says_why(live, tmp_path):
    database, settings = live
    from app.auth import service as auth_service
    from app.auth.models import Role

    with database.session() as db:
        campaign = make_campaign(db, slug="gen-none", k=2, mode=CampaignMode.pairwise)
        policy = registry.register(
            db, name="p", path="org/p", data_dir=settings.data_dir, actor_id=None
        )
        make_task(db, campaign, completions=["a", "b"])  # labelers are on it
        answered = make_task(db, campaign, completions=["c", "d"])
        answered.status = TaskStatus.complete
        for item in answered.items:
            item.completion.model_version_id = policy.id
        job = registry.queue_generation(
            db, GenerateJobSpec(campaign="gen-none", model_id=policy.id), actor_id=None
        )
        researcher = auth_service.create_user(
            db, username="none-r", role=Role.researcher, password=None
        )
        token = auth_service.create_api_token(db, researcher, name="t").secret
        db.commit()
        job_id = job.id
    run_worker(settings, "gen-none", once=True, database=database, install_signals=False, **FAST)
    with database.session() as db:
        done = db.get_one(Job, job_id)
        assert done.state is JobState.succeeded, done.error
        assert done.result["none_due"] == {
            "prompts": 2,
            "open_task": 1,
            "answered": 1,
            "per_task": 2,
        }
    client = TestClient(create_app(settings, database))
    page = client.get(f"/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"})
    notice = re.search(r'data-testid="generate-none-due">(.*?)</div>', page.text, re.S).group(1)
    assert "No prompts needed completions" in notice
    assert "1 have an open task" in notice and "1 already have 2 completion(s)" in notice


def test_job_forms_preselect_the_only_choice(client, as_role, db):
    demo = make_campaign(db, slug="only-demo", mode=CampaignMode.demonstration)
    first = make_campaign(db, slug="pairs-a", k=2, mode=CampaignMode.pairwise)
    make_campaign(db, slug="pairs-b", k=2, mode=CampaignMode.pairwise)
    policy = version(db, "pre-policy", algorithm="base", campaign_id=first.id)
    reward = version(db, "pre-rm", ModelKind.reward, algorithm="reward")
    db.commit()
    as_role("researcher")

    def checked(page: str) -> list[str]:
        return re.findall(r'name="campaigns" type="checkbox" value="([^"]+)" checked', page)

    sft = client.get(f"/jobs/new/sft?model={policy.id}").text
    assert checked(sft) == [demo.slug]  # the only demonstration campaign
    for kind in ("ppo", "rloo"):
        page = client.get(f"/jobs/new/{kind}?policy={policy.id}").text
        assert f'<option value="{reward.id}" selected>' in page  # the only reward model
        assert checked(page) == [first.slug]  # two offered: the policy's own
    dpo = client.get(f"/jobs/new/dpo?model={policy.id}").text
    assert checked(dpo) == [first.slug]
    # the only policy, with nothing asked; an optional warm start stays empty
    assert f'<option value="{policy.id}" selected>' in client.get("/jobs/new/ppo").text
    assert f'<option value="{reward.id}" selected>' not in client.get("/jobs/new").text
    # a reward model's page starts PPO with it
    rm_page = client.get(f"/models/{reward.id}").text
    assert f'href="/jobs/new/ppo?reward={reward.id}"' in rm_page
    second = version(db, "pre-rm-2", ModelKind.reward, algorithm="reward")
    db.commit()
    chosen = client.get(f"/jobs/new/ppo?reward={reward.id}").text
    assert f'<option value="{reward.id}" selected>' in chosen
    assert f'<option value="{second.id}" selected>' not in chosen
    assert 'href="/generate"' in client.get("/jobs").text


def test_cancelling_a_running_job_asks_first(client, as_role, db):
    campaign = make_campaign(db, slug="cancel-confirm", k=2, mode=CampaignMode.pairwise)
    policy = version(db, "cc", algorithm="base")
    job = registry.queue_generation(
        db, GenerateJobSpec(campaign=campaign.slug, model_id=policy.id), actor_id=None
    )
    db.commit()
    as_role("researcher")
    assert "hx-confirm" not in client.get(f"/jobs/{job.id}").text  # queued: nothing to lose
    job.state = JobState.running
    db.commit()
    page = client.get(f"/jobs/{job.id}").text
    assert re.search(r'hx-post="/jobs/\d+/cancel"[^>]*hx-confirm="Cancel job', page)


@pytest.mark.parametrize("local", [True, False])
def test_the_model_page_reads_well(client, as_role, db, settings, local):
    path = "models/sft-000003-1" if local else "org/hub-model"
    if local:
        folder = Path(settings.data_dir) / path
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    model = ModelVersion(
        name="sft result",
        kind=ModelKind.policy,
        algorithm="sft",
        path=path,
        metrics={
            "eval": {"eval_loss": 1.25, "eval/perplexity": 3.5},
            "export_parameters": {"include_inactive": False, "campaigns": ["a"]},
        },
    )
    db.add(model)
    db.commit()
    as_role("researcher")
    page = client.get(f"/models/{model.id}").text
    evals = re.search(r'data-testid="model-eval">(.*?)</dl>', page, re.S).group(1)
    assert "eval loss" in evals and "eval / perplexity" in evals and "eval_loss</" not in evals
    exported = re.search(r'data-testid="model-export-parameters">(.*?)</dl>', page, re.S).group(1)
    assert "include inactive</dt><dd>no" in exported
    files = re.search(r'data-testid="model-files">(.*?)</dd>', page, re.S).group(1)
    if local:
        assert f"<code>{(Path(settings.data_dir) / path).resolve()}</code>" in files
        assert "hub id" not in files
    else:
        assert "org/hub-model" in files and "hub id" in files


def test_jobs_and_models_pages_share_their_breadcrumbs(client, as_role, db):
    campaign = make_campaign(db, slug="crumbs", k=2, mode=CampaignMode.pairwise)
    policy = version(db, "crumb", algorithm="base")
    job = registry.queue_generation(
        db, GenerateJobSpec(campaign=campaign.slug, model_id=policy.id), actor_id=None
    )
    db.commit()
    as_role("researcher")
    expected = {
        "/jobs": "jobs",
        "/models": "models",
        f"/models/{policy.id}": f'<a href="/models">models</a> / #{policy.id}',
        f"/jobs/{job.id}": f'<a href="/jobs">jobs</a> / #{job.id}',
        "/jobs/new/ppo": '<a href="/jobs">jobs</a> / new PPO run',
        "/generate": '<a href="/models">models</a> / generate completions',
    }
    for url, rest in expected.items():
        crumb = re.search(r'class="breadcrumb">(.*?)</p>', client.get(url).text).group(1)
        assert crumb == f'<a href="/research">Research</a> / {rest}', url


def test_choosing_another_version_refills_the_form_from_it(client, as_role, db):
    """htmx, HX-Target generate-panel: the whole form again, filled in from the version the
    select now names (its run's sampling settings and links), with a CSRF token to post."""
    campaign = make_campaign(db, slug="gen-refill", k=2, mode=CampaignMode.pairwise)
    base = version(db, "refill-base", algorithm="base")
    reward = version(db, "refill-rm", ModelKind.reward, algorithm="reward")
    ppo = ppo_version(db, campaign, base, reward)
    db.commit()
    as_role("researcher")
    headers = {"HX-Request": "true", "HX-Target": "generate-panel"}
    panel = client.get(f"/generate?campaign={campaign.slug}&model_id={ppo.id}", headers=headers)
    assert panel.status_code == 200 and "<html" not in panel.text
    assert panel.text.startswith('<div id="generate-panel">')
    assert f'value="{reward.id}" selected' in select_of(panel.text, "reward_model_id")
    assert f'value="{base.id}" selected' in select_of(panel.text, "audit_against_id")
    assert 'name="temperature" type="number" step="any" value="0.7"' in panel.text
    assert 'name="csrf_token"' in panel.text and "autofocus" in select_of(panel.text, "model")
    plain = client.get(f"/generate?campaign={campaign.slug}&model_id={base.id}", headers=headers)
    assert f'value="{reward.id}" selected' not in select_of(plain.text, "reward_model_id")


def test_odd_ids_in_the_query_are_refused_or_ignored_not_a_server_error(client, as_role):
    as_role("researcher")
    too_big = str(2**64)
    for url in (
        f"/generate?model={too_big}",
        f"/jobs/new/ppo?policy={too_big}",
        f"/jobs/new/sft?model={too_big}",
        f"/jobs/new/rloo?reward={too_big}",
    ):
        assert client.get(url).status_code == 422, url
    # The selects' own field: anything but a plain id is no choice at all.
    for value in ("%C2%B2", too_big, "-3", "abc"):
        page = client.get(f"/generate?model_id={value}", headers={"HX-Request": "true"})
        assert page.status_code == 200, value


def test_a_campaign_alone_preselects_the_newest_policy_trained_on_it(client, as_role, db):
    ours = make_campaign(db, slug="gen-ours", k=2, mode=CampaignMode.pairwise)
    theirs = make_campaign(db, slug="gen-theirs", k=2, mode=CampaignMode.pairwise)
    mine = version(db, "ours-sft", algorithm="sft", campaign_id=ours.id)
    newer = version(db, "theirs-sft", algorithm="sft", campaign_id=theirs.id)
    db.commit()
    as_role("researcher")
    page = client.get(f"/generate?campaign={ours.slug}").text
    assert f'<option value="{mine.id}" selected>' in select_of(page, "model")
    page = client.get(f"/generate?campaign={theirs.slug}").text
    assert f'<option value="{newer.id}" selected>' in select_of(page, "model")
