"""The `ppo` job: a registered policy and a reward model version become a queued job (API), a
worker runs PPO on the campaign's prompts, and the new policy version comes back with its
parent, its metrics on the job and a one-click generation from it. Also: the spec held equal
to the trainer's config, and the page's warnings (KL past its budget, reward rising with
length alone) on hand-made metric series."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.jobs.models import Job, JobState
from app.jobs.service import attempt_dir
from app.jobs.specs import PPOJobSpec, PPOTraining, SpecError, parse_ppo_spec
from app.jobs.training import ppo_warnings
from app.main import create_app
from tests.factories import make_campaign, make_task
from tests.rl_jobs import (
    PROMPTS,
    TINY_PPO_TRAINING,
    defaults_unlike_the_trainers,
    register_models,
    work_once,
)
from trainer.ppo import PPOConfig
from trainer.ppo_job import campaign_prompts, ppo_config


def test_the_spec_mirrors_the_trainers_config():
    trainer_fields = {f.name for f in dataclasses.fields(PPOConfig)}
    assert trainer_fields - set(PPOTraining.model_fields) == {"policy", "reward_model"}
    assert defaults_unlike_the_trainers(PPOConfig, PPOTraining) == []
    spec = PPOJobSpec(policy_id=1, reward_model_id=2, campaigns=["x"])
    assert ppo_config(spec, "/p", "/r").reward_model == "/r"
    with pytest.raises(SpecError, match="minibatch_size"):
        parse_ppo_spec(
            {
                "policy_id": 1,
                "reward_model_id": 2,
                "campaigns": ["x"],
                "training": {"rollout_batch_size": 4, "minibatch_size": 8},
            }
        )


def test_each_process_takes_an_equal_share_of_every_batch():
    base = {"policy_id": 1, "reward_model_id": 2, "campaigns": ["x"]}
    two = {"rollout_batch_size": 8, "minibatch_size": 4}
    assert parse_ppo_spec({**base, "processes": 2, "training": two}).processes == 2
    assert parse_ppo_spec(base).processes == 1
    with pytest.raises(SpecError, match=r"rollout_batch_size \(9\) must be a multiple"):
        parse_ppo_spec({**base, "processes": 2, "training": {**two, "rollout_batch_size": 9}})
    with pytest.raises(SpecError, match=r"minibatch_size \(4\) must be a multiple"):
        parse_ppo_spec({**base, "processes": 8, "training": two | {"rollout_batch_size": 16}})
    with pytest.raises(SpecError, match="processes"):
        parse_ppo_spec({**base, "processes": 0})
    sharded = parse_ppo_spec({**base, "processes": 2, "sharding": "fsdp", "training": two})
    assert sharded.sharding == "fsdp" and parse_ppo_spec(base).sharding == "none"
    with pytest.raises(SpecError, match="needs processes >= 2"):
        parse_ppo_spec({**base, "sharding": "fsdp"})
    with pytest.raises(SpecError, match="sharding"):
        parse_ppo_spec({**base, "processes": 2, "sharding": "zero3", "training": two})


def steps(values: list[float]) -> list[tuple[int, float]]:
    return [(i + 1, v) for i, v in enumerate(values)]


def test_warnings_for_kl_past_budget_and_length_hacking():
    calm = {
        "kl/k1": steps([0.1, 0.5, 1.0, 1.2, 1.1, 1.0, 0.9]),
        "response/length": steps([20] * 7),
        "response/length_reward_corr": steps([0.9] * 7),  # correlated, but nothing grows
    }
    assert ppo_warnings(calm, {"kl_budget": 2.0}) == []
    drifting = {**calm, "kl/k1": steps([1, 2, 4, 6, 8, 9, 10])}
    [kl] = ppo_warnings(drifting, {"kl_budget": 2.0})
    assert "past its budget of 2" in kl
    # without a budget, the adaptive controller's target is the budget
    assert ppo_warnings(drifting, {"training": {"adaptive_kl": True, "kl_target": 6}})
    assert ppo_warnings(drifting, {"training": {"adaptive_kl": False, "kl_target": 6}}) == []
    verbose = {
        **calm,
        "response/length": steps([10, 10, 11, 12, 14, 18, 22, 26, 30, 34]),
        "response/length_reward_corr": steps([0.2, 0.4, 0.6, 0.7, 0.8, 0.8, 0.9, 0.9, 0.9, 0.9]),
    }
    [hack] = ppo_warnings(verbose, {})
    assert "Reward rises with length" in hack and "0.88" in hack
    honest = {**verbose, "response/length_reward_corr": steps([0.1] * 10)}
    assert ppo_warnings(honest, {}) == []


def test_campaign_prompts_are_each_text_once_oldest_first(db):
    campaign = make_campaign(db, slug="ppo-prompts", k=2)
    chat = [{"role": "user", "content": "hi"}]
    make_task(db, campaign, prompt="first", completions=["a", "b"])
    make_task(db, campaign, messages=chat, completions=["c", "d"])
    make_task(db, campaign, prompt="third", completions=["e", "f"])
    db.flush()
    assert campaign_prompts(db, [campaign.id], None) == ["first", chat, "third"]
    assert campaign_prompts(db, [campaign.id], 2) == ["first", chat]


def test_a_ppo_job_makes_a_new_policy_version(live):
    database, settings = live  # tests/conftest.py: a database of its own, a data folder
    registered = register_models(database, settings, "ppo", reward_std=1.0)
    base_id, rm_id, auth = registered.base_id, registered.rm_id, registered.auth
    client = TestClient(create_app(settings, database))
    config = {
        "policy_id": base_id,
        "reward_model_id": rm_id,
        "campaigns": ["ppo-live"],
        "kl_budget": 100.0,
        "training": TINY_PPO_TRAINING
        | {"total_steps": 3, "learning_rate": 1e-3, "checkpoint_every": 1},
    }
    wrong = {**config, "policy_id": rm_id}
    refused = client.post("/api/v1/jobs", json={"kind": "ppo", "config": wrong}, headers=auth)
    assert refused.status_code == 404 and "no policy model version" in refused.json()["detail"]
    created = client.post("/api/v1/jobs", json={"kind": "ppo", "config": config}, headers=auth)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]

    assert work_once(settings, database, "ppo-worker") == 1
    job = client.get(f"/api/v1/jobs/{job_id}", headers=auth).json()
    assert job["state"] == "succeeded", job["error"]
    [model] = job["models"]
    assert model["kind"] == "policy" and model["algorithm"] == "ppo"
    assert model["parent_id"] == base_id and model["metrics"]["data"]["prompts"] == PROMPTS
    assert "reward/raw" in model["metrics"]["eval"] and "kl/k1" in model["metrics"]["eval"]
    series = client.get(f"/api/v1/jobs/{job_id}/metrics", headers=auth).json()["series"]
    assert len(series["kl/k1"]) == 3 and len(series["reward/normalized"]) == 3
    assert {"policy/clip_frac", "value/explained_variance", "response/eos_rate"} <= series.keys()

    from transformers import AutoModelForCausalLM

    folder = Path(settings.data_dir) / model["path"]
    assert AutoModelForCausalLM.from_pretrained(folder).config.vocab_size > 0
    page = client.get(f"/jobs/{job_id}", headers=auth)
    assert page.status_code == 200 and 'data-testid="job-warning"' not in page.text
    assert f"/models/{model['id']}/generate" in page.text
    model_page = client.get(f"/models/{model['id']}", headers=auth)
    assert model_page.status_code == 200 and f"/models/{base_id}" in model_page.text

    # the form: a bad field queues nothing; a good one queues PPO from the new version
    form = client.get(f"/jobs/new/ppo?policy={model['id']}&campaign=ppo-live", headers=auth)
    assert form.status_code == 200 and f'value="{model["id"]}" selected' in form.text
    assert '<option value="auto" selected>' in form.text  # the value model's default
    fields = {"policy_id": str(model["id"]), "reward_model_id": str(rm_id), "campaigns": "ppo-live"}
    bad = client.post("/jobs/new/ppo", data={**fields, "learning_rate": "-1"}, headers=auth)
    assert bad.status_code == 422 and "learning_rate" in bad.text
    uneven = client.post("/jobs/new/ppo", data={**fields, "processes": "3"}, headers=auth)
    assert uneven.status_code == 422 and "must be a multiple of processes (3)" in uneven.text
    assert 'name="processes"' in form.text
    good = client.post(
        "/jobs/new/ppo",
        data={
            **fields,
            "total_steps": "7",
            "adaptive_kl": "true",
            "kl_budget": "3",
            "value_init": "policy",
            "processes": "2",
            "sharding": "fsdp",
        },
        headers=auth,
        follow_redirects=False,
    )
    assert good.status_code == 303, good.text
    with database.session() as db:
        queued = db.get_one(Job, int(good.headers["location"].rsplit("/", 1)[1]))
        assert queued.kind == "ppo" and queued.config["policy_id"] == model["id"]
        assert queued.config["training"]["total_steps"] == 7
        assert queued.config["training"]["adaptive_kl"] is True and queued.config["kl_budget"] == 3
        assert queued.config["training"]["value_init"] == "policy"
        assert queued.config["processes"] == 2 and queued.processes == 2
        assert queued.config["sharding"] == "fsdp"
    assert '<option value="fsdp"' in form.text
    page = client.get(good.headers["location"], headers=auth)
    assert (
        "2, data-parallel, one per GPU, the models sharded over them (FSDP2): only a worker "
        "that sees 2 GPUs claims it" in page.text
    )

    # one click: the new policy samples completions for its campaign
    made = client.post(f"/models/{model['id']}/generate", headers=auth, follow_redirects=False)
    assert made.status_code == 303 and made.headers["location"].startswith("/jobs/")
    with database.session() as db:
        generate = db.get_one(Job, int(made.headers["location"].rsplit("/", 1)[1]))
        assert generate.kind == "generate" and generate.state is JobState.queued
        assert generate.config["model_id"] == model["id"]
        assert generate.config["campaign"] == "ppo-live"


# PostgreSQL only: the processes never touch the database (the test above runs the same job
# in one process on both backends), and a launch costs some 10 s of the suite.
@pytest.mark.postgres_only
@pytest.mark.parametrize("sharding", ["none", "fsdp"])
def test_a_two_process_ppo_job_scores_with_its_reward_model_in_each(live, sharding):
    """Through the worker: `processes: 2` launches 2 ranks, each loading the registered
    reward model and sampling half of every batch, the policy, value model and reference
    replicated (DDP) or sharded (FSDP2); the job gets rank 0's global metrics and the new
    policy version."""
    database, settings = live
    registered = register_models(database, settings, f"ppo2-{sharding}", reward_std=1.0)
    client = TestClient(create_app(settings, database))
    config = {
        "policy_id": registered.base_id,
        "reward_model_id": registered.rm_id,
        "campaigns": [f"ppo2-{sharding}-live"],
        "processes": 2,
        "sharding": sharding,
        "training": TINY_PPO_TRAINING,
    }
    created = client.post(
        "/api/v1/jobs", json={"kind": "ppo", "config": config}, headers=registered.auth
    )
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    with database.session() as db:
        assert db.get_one(Job, job_id).processes == 2  # only a worker with 2 GPUs claims it

    assert work_once(settings, database, "ppo2-worker") == 1
    job = client.get(f"/api/v1/jobs/{job_id}", headers=registered.auth).json()
    assert job["state"] == "succeeded", job["error"]
    [model] = job["models"]
    assert model["algorithm"] == "ppo" and model["parent_id"] == registered.base_id
    assert model["metrics"]["training"]["processes"] == 2
    assert model["metrics"]["training"]["sharding"] == sharding
    series = client.get(f"/api/v1/jobs/{job_id}/metrics", headers=registered.auth).json()["series"]
    assert [step for step, _ in series["reward/raw"]] == [1, 2]
    # the global batch: 4 responses of 1 to 4 tokens each
    assert all(4 <= tokens <= 16 for _, tokens in series["tokens/response"])
    launch_dir = attempt_dir(settings.data_dir, job_id, 1) / "launch"
    assert (launch_dir / "launch.log").is_file()  # it ran in launched processes
