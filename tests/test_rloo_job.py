"""The `rloo` job: a registered policy and reward model version become a queued job (API, form
or CLI), a worker runs RLOO on the campaign's prompts, and the new policy version comes back
with its parent and its metrics on the job, warned about on its page like PPO's. Also: the
spec held equal to the trainer's config, and what the spec refuses."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import app.cli
from app.config import get_settings
from app.jobs.models import Job
from app.jobs.specs import RLOOJobSpec, RLOOTraining, SpecError, parse_rloo_spec
from app.main import create_app
from tests.rl_jobs import PROMPTS, defaults_unlike_the_trainers, register_models, work_once
from trainer.rloo import RLOOConfig
from trainer.rloo_job import rloo_config


def test_the_spec_mirrors_the_trainers_config():
    trainer_fields = {f.name for f in dataclasses.fields(RLOOConfig)}
    assert trainer_fields - set(RLOOTraining.model_fields) == {"policy", "reward_model"}
    assert set(RLOOTraining.model_fields) - trainer_fields == set()
    assert defaults_unlike_the_trainers(RLOOConfig, RLOOTraining) == []
    spec = RLOOJobSpec(policy_id=1, reward_model_id=2, campaigns=["x"], training={"k": 3})
    made = rloo_config(spec, "/p", "/r")
    assert (made.policy, made.reward_model, made.k, made.checkpoint_every) == ("/p", "/r", 3, 10)


def test_the_spec_refuses_what_rloo_cannot_run():
    base = {"policy_id": 1, "reward_model_id": 2, "campaigns": ["x"]}
    with pytest.raises(SpecError, match=r"training\.k"):
        parse_rloo_spec({**base, "training": {"k": 1}})
    with pytest.raises(SpecError, match="minibatch_size"):
        parse_rloo_spec({**base, "training": {"prompts_per_step": 2, "k": 2, "minibatch_size": 5}})
    with pytest.raises(SpecError, match="value_init"):  # PPO's option: RLOO has no value model
        parse_rloo_spec({**base, "training": {"value_init": "policy"}})
    with pytest.raises(SpecError, match="campaigns"):
        parse_rloo_spec({**base, "campaigns": []})
    assert parse_rloo_spec({**base, "training": {"k": 2}}).training.k == 2
    # each of the processes takes whole prompts (all k answers) and an equal minibatch share
    assert parse_rloo_spec({**base, "processes": 4}).processes == 4  # 16 prompts per step
    with pytest.raises(SpecError, match=r"prompts_per_step \(16\) must be a multiple"):
        parse_rloo_spec({**base, "processes": 3})
    with pytest.raises(SpecError, match=r"minibatch_size \(6\) must be a multiple"):
        parse_rloo_spec({**base, "processes": 4, "training": {"minibatch_size": 6}})


def test_an_rloo_job_makes_a_new_policy_version(live, monkeypatch):
    database, settings = live  # tests/conftest.py: a database of its own, a data folder
    # A random head's scores differ by ~0.01: the stored std scales them up to a signal.
    registered = register_models(database, settings, "rloo", reward_std=0.002)
    base_id, rm_id, auth = registered.base_id, registered.rm_id, registered.auth
    client = TestClient(create_app(settings, database))
    config = {
        "policy_id": base_id,
        "reward_model_id": rm_id,
        "campaigns": ["rloo-live"],
        "kl_budget": 1e-6,  # any drift passes it: the page must say so
        "training": {
            "total_steps": 3,
            "prompts_per_step": 2,
            "k": 2,
            "max_new_tokens": 4,
            "max_prompt_length": 16,
            "epochs": 4,  # 8 updates per step, big ones: the policy must drift
            "minibatch_size": 2,
            "learning_rate": 5e-2,
            "temperature": 1.0,
            "checkpoint_every": 1,
        },
    }
    wrong = {**config, "reward_model_id": base_id}
    refused = client.post("/api/v1/jobs", json={"kind": "rloo", "config": wrong}, headers=auth)
    assert refused.status_code == 404 and "no reward model version" in refused.json()["detail"]
    bad = {**config, "training": {**config["training"], "k": 1}}
    refused = client.post("/api/v1/jobs", json={"kind": "rloo", "config": bad}, headers=auth)
    assert refused.status_code == 422 and "training.k" in refused.json()["detail"]
    created = client.post("/api/v1/jobs", json={"kind": "rloo", "config": config}, headers=auth)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]

    assert work_once(settings, database, "rloo-worker") == 1
    job = client.get(f"/api/v1/jobs/{job_id}", headers=auth).json()
    assert job["state"] == "succeeded", job["error"]
    [model] = job["models"]
    assert model["kind"] == "policy" and model["algorithm"] == "rloo"
    assert model["parent_id"] == base_id and model["metrics"]["data"]["prompts"] == PROMPTS
    assert model["metrics"]["training"]["config"]["k"] == 2
    assert "reward/raw" in model["metrics"]["eval"] and "kl/k1" in model["metrics"]["eval"]
    series = client.get(f"/api/v1/jobs/{job_id}/metrics", headers=auth).json()["series"]
    assert len(series["kl/k1"]) == 3 and len(series["reward/normalized"]) == 3
    assert {"rloo/baseline_std", "reward/std_within_prompt", "policy/clip_frac"} <= series.keys()
    assert not any(name.startswith("value/") for name in series)

    from transformers import AutoModelForCausalLM

    folder = Path(settings.data_dir) / model["path"]
    assert folder.name == f"rloo-{job_id:06d}-1" and (folder / "prefloop_rloo.json").is_file()
    assert AutoModelForCausalLM.from_pretrained(folder).config.vocab_size > 0
    page = client.get(f"/jobs/{job_id}", headers=auth)
    assert page.status_code == 200 and f"/models/{model['id']}/generate" in page.text
    assert 'data-testid="job-warning"' in page.text and "past its budget" in page.text
    model_page = client.get(f"/models/{model['id']}", headers=auth)
    assert f"/jobs/new/rloo?policy={model['id']}" in model_page.text
    assert "/jobs/new/rloo" in client.get("/jobs", headers=auth).text

    # the form: a bad field queues nothing; a good one queues RLOO from the new version
    form = client.get(f"/jobs/new/rloo?policy={model['id']}&campaign=rloo-live", headers=auth)
    assert form.status_code == 200 and f'value="{model["id"]}" selected' in form.text
    assert 'name="k" type="number" step="any" value="4"' in form.text  # the default k
    fields = {
        "policy_id": str(model["id"]),
        "reward_model_id": str(rm_id),
        "campaigns": "rloo-live",
    }
    before = client.get("/api/v1/jobs", headers=auth).json()
    bad_form = client.post("/jobs/new/rloo", data={**fields, "k": "1"}, headers=auth)
    assert bad_form.status_code == 422 and "training.k" in bad_form.text
    assert client.get("/api/v1/jobs", headers=auth).json() == before  # nothing queued
    good = client.post(
        "/jobs/new/rloo",
        data={**fields, "total_steps": "7", "k": "3", "whiten_advantages": "true"},
        headers=auth,
        follow_redirects=False,
    )
    assert good.status_code == 303, good.text
    with database.session() as db:
        queued = db.get_one(Job, int(good.headers["location"].rsplit("/", 1)[1]))
        assert queued.kind == "rloo" and queued.config["policy_id"] == model["id"]
        assert queued.config["training"]["total_steps"] == 7
        assert queued.config["training"]["k"] == 3
        assert queued.config["training"]["whiten_advantages"] is True
        assert queued.config["training"]["adaptive_kl"] is False

    # the command line: a bad option exits 2 before touching the database; a good one queues
    monkeypatch.setenv("PREFLOOP_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("PREFLOOP_ENV", "dev")
    monkeypatch.setenv("PREFLOOP_DATA_DIR", str(settings.data_dir))
    get_settings.cache_clear()
    runner = CliRunner()
    args = ["train", "rloo", "--policy", "base", "--reward-model", str(rm_id)]
    try:
        refused_cli = runner.invoke(app.cli.cli, [*args, "--campaign", "rloo-live", "--k", "1"])
        assert refused_cli.exit_code == 2 and "training.k" in refused_cli.output
        unknown = runner.invoke(app.cli.cli, [*args[:3], "nope", *args[4:], "--campaign", "x"])
        assert unknown.exit_code == 1 and "--policy: no model version 'nope'" in unknown.output
        uneven = runner.invoke(app.cli.cli, [*args, "--campaign", "rloo-live", "--processes", "3"])
        assert uneven.exit_code == 2 and "prompts_per_step (16) must be a multiple" in uneven.output
        scale = ["--processes", "2", "--sharding", "fsdp"]
        queued_cli = runner.invoke(
            app.cli.cli, [*args, "--campaign", "rloo-live", "--k", "5", "--steps", "2", *scale]
        )
        assert queued_cli.exit_code == 0, queued_cli.output
        assert "(rloo, k=5, on rloo-live)" in queued_cli.output
    finally:
        get_settings.cache_clear()
    with database.session() as db:
        newest = db.get_one(Job, int(queued_cli.output.split()[2]))
        assert newest.kind == "rloo" and newest.config["policy_id"] == base_id
        assert newest.config["training"]["k"] == 5 and newest.config["training"]["total_steps"] == 2
        assert newest.processes == 2 and newest.config["sharding"] == "fsdp"
