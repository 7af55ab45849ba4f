"""The `dpo` job end to end: labelers' rankings in a campaign become a queued job (API), a
worker runs DPO on a tiny Llama built from config, and a new policy version whose parent is
the starting one comes back with its implicit reward accuracy; its folder loads with plain
transformers. Also: what the job reads (the trl pairs, ties dropped, imported pairs, the split
by prompt, as_of), the spec held equal to the trainer's config, refusals, the form (CSRF and
roles) and the command."""

from __future__ import annotations

import io
import json
import random
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.auth import service as auth_service
from app.auth.models import Role
from app.campaigns.models import CampaignMode
from app.db import Database
from app.jobs import registry
from app.jobs.models import Job, JobState, ModelKind, ModelVersion
from app.jobs.specs import DPOJobSpec, DPOTraining, SpecError, parse_dpo_spec
from app.labeling import importer
from app.labeling import service as labeling
from app.labeling.schemas import JudgmentIn
from app.main import create_app
from tests.factories import make_campaign, make_labeler, make_task, sha
from tests.test_cli import cli_env, run_cli

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.training_helpers import (
    assert_spec_mirrors,
    live_fixture,  # noqa: F401 - the `live` fixture
    tiny_model,
)
from trainer.dpo import META_FILE, DPOConfig
from trainer.dpo_job import dpo_config, load_comparisons
from trainer.worker import run_worker

FAST = {"lease_seconds": 30.0, "heartbeat_seconds": 0.3, "poll_interval": 0.05}
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


def answers(n: int) -> list[str]:
    """The good answer says the prompt's word twice; the other says it and another word."""
    word, other = WORDS[n % len(WORDS)], WORDS[(n + 3) % len(WORDS)]
    return [f"{word} {word}", f"{word} {other}"]


def make_tasks(db, campaign, count: int) -> dict[int, list[int]]:
    """Tasks of two answers; task id -> its completion ids, best first."""
    truth = {}
    for n in range(count):
        text = f"say {WORDS[n % len(WORDS)]} {n}"
        task = make_task(db, campaign, prompt=text, completions=answers(n))
        # The factory's hash counts the tasks made so far in the session; the split by prompt
        # hashes this, so fix it to the text: the same prompts are held out in every run.
        task.prompt.content_hash = sha(f"{campaign.slug}:{text}")
        truth[task.id] = [item.completion_id for item in task.items]
    return truth


def rank_all(db, campaign, user, truth: dict[int, list[int]], *, tie: bool = False) -> int:
    rng, done = random.Random(2), 0
    while (lease := labeling.next_task(db, user=user, campaign=campaign, rng=rng)) is not None:
        ids = truth[lease.task_id]
        ranking = [ids] if tie else [[cid] for cid in ids]
        labeling.submit(
            db, user=user, submit_key=lease.submit_key, answer=JudgmentIn(ranking=ranking)
        )
        done += 1
    return done


# --- the spec -------------------------------------------------------------------------------


def test_the_spec_mirrors_the_trainers_config():
    assert_spec_mirrors(DPOTraining, DPOConfig)
    config = dpo_config(DPOJobSpec(model_id=1, campaigns=["x"]), "/m")
    assert config.model_name_or_path == "/m" and config.beta == 0.1


def test_bad_specs_name_the_field():
    base = {"model_id": 1, "campaigns": ["x"]}
    with pytest.raises(SpecError, match=r"training\.beta"):
        parse_dpo_spec({**base, "training": {"beta": 0}})
    with pytest.raises(SpecError, match=r"training\.label_smoothing"):
        parse_dpo_spec({**base, "training": {"label_smoothing": 0.5}})
    with pytest.raises(SpecError, match="model_id"):
        parse_dpo_spec({"campaigns": ["x"]})
    with pytest.raises(SpecError, match="since is after until"):
        parse_dpo_spec({**base, "since": "2026-02-01", "until": "2026-01-01"})
    with pytest.raises(SpecError, match="unknown"):
        parse_dpo_spec({**base, "unknown": 1})


# --- what the job reads ----------------------------------------------------------------------


def test_comparisons_are_the_trl_pairs_split_by_prompt(db, database, settings):
    campaign = make_campaign(db, slug="dpo-read", k=2, overlap=2, allow_ties=True)
    truth = make_tasks(db, campaign, 10)
    assert rank_all(db, campaign, make_labeler(db, "dpo-ann"), truth) == 10
    assert rank_all(db, campaign, make_labeler(db, "dpo-tie"), truth, tie=True) == 10
    row = {"prompt": "say zeta 99", "chosen": "zeta zeta", "rejected": "zeta beta"}
    stream = io.BytesIO((json.dumps(row) + "\n").encode())
    importer.import_stream(db, campaign, stream, file_name="pairs.jsonl", as_judged=True)
    db.commit()
    spec = DPOJobSpec(model_id=1, campaigns=["dpo-read"], test_fraction=0.4, split_seed=1)
    data = load_comparisons(database, spec, settings.secret_key)
    # ann's ten pairs and the imported one; the tied rankings teach nothing and are dropped
    assert data.counts["human_pairs"] == 10 and data.counts["imported_pairs"] == 1
    pairs = data.train + data.eval
    assert len(pairs) == 11 and all(p.chosen.split()[0] == p.chosen.split()[1] for p in pairs)
    assert {p.chosen for p in pairs} >= {"zeta zeta"} and all(p.chosen != p.rejected for p in pairs)
    train_keys, eval_keys = {p.prompt_key for p in data.train}, {p.prompt_key for p in data.eval}
    assert train_keys and eval_keys and not train_keys & eval_keys
    # only the labelers' pairs; at most N training pairs
    humans = load_comparisons(
        database, spec.model_copy(update={"sources": ["human"]}), settings.secret_key
    )
    assert humans.counts["imported_pairs"] == 0 and humans.counts["human_pairs"] == 10
    capped = load_comparisons(
        database, spec.model_copy(update={"max_pairs": 2}), settings.secret_key
    )
    assert capped.counts["train_pairs"] == 2
    # the same mark reads the same rows after more labels
    more = make_tasks(db, campaign, 2)
    rank_all(db, campaign, make_labeler(db, "dpo-late"), more)
    db.commit()
    again = load_comparisons(database, spec, settings.secret_key, data.parameters["as_of"])
    assert again.fingerprint() == data.fingerprint()
    newer = load_comparisons(database, spec, settings.secret_key)
    assert newer.counts["human_pairs"] > 10


# --- end to end ------------------------------------------------------------------------------


def tiny_policy(folder: Path) -> str:
    return tiny_model(folder, [f"say {' '.join(answers(n))} {n}" for n in range(40)])


def test_comparisons_become_a_job_and_a_new_policy_version(live, tmp_path):
    database, settings = live
    with database.session() as db:
        campaign = make_campaign(db, slug="dpo-live", k=2, overlap=2)
        demo = make_campaign(db, slug="dpo-demo", k=2, overlap=1, mode=CampaignMode.demonstration)
        truth = make_tasks(db, campaign, 16)
        for name in ("dpo-a", "dpo-b"):
            assert rank_all(db, campaign, make_labeler(db, name), truth) == 16
        base = registry.register(
            db,
            name="tiny base",
            path=tiny_policy(tmp_path / "base"),
            data_dir=settings.data_dir,
            actor_id=None,
        )
        reward = ModelVersion(name="rm", kind=ModelKind.reward, path="models/rm")
        researcher = auth_service.create_user(
            db, username="dpo-r", role=Role.researcher, password=None
        )
        db.add(reward)
        token = auth_service.create_api_token(db, researcher, name="trainer")
        db.commit()
        base_id, reward_id, demo_slug = base.id, reward.id, demo.slug
    client = TestClient(create_app(settings, database))
    auth = {"Authorization": f"Bearer {token.secret}"}
    config = {
        "model_id": base_id,
        "campaigns": ["dpo-live"],
        "test_fraction": 0.25,
        "training": {
            "learning_rate": 2e-2,
            "batch_size": 8,
            "max_length": 32,
            "epochs": 8,
            "warmup_ratio": 0.0,
            "logging_steps": 1,
            "save_every": 3,
        },
    }

    def post(cfg):
        return client.post("/api/v1/jobs", json={"kind": "dpo", "config": cfg}, headers=auth)

    assert post({**config, "campaigns": ["nope"]}).status_code == 404
    wrong_mode = post({**config, "campaigns": [demo_slug]})
    assert wrong_mode.status_code == 422 and "demonstration" in wrong_mode.json()["detail"]
    not_policy = post({**config, "model_id": reward_id})
    assert not_policy.status_code == 404 and "no policy model version" in not_policy.text
    assert post({**config, "training": {"beta": -1}}).status_code == 422
    with database.session() as db:
        assert db.query(Job).filter(Job.kind == "dpo").count() == 0  # nothing was queued
    created = post(config)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]

    ran = run_worker(
        settings, "dpo-worker", once=True, database=database, install_signals=False, **FAST
    )
    assert ran == 1
    job = client.get(f"/api/v1/jobs/{job_id}", headers=auth).json()
    assert job["state"] == "succeeded", job["error"]
    [model] = job["models"]
    assert (model["kind"], model["algorithm"], model["parent_id"]) == ("policy", "dpo", base_id)
    counts = model["metrics"]["data"]
    assert counts["human_pairs"] == 32 and counts["train_pairs"] + counts["eval_pairs"] == 32
    assert counts["eval_pairs"] > 0
    ev = model["metrics"]["eval"]
    # Held out: better than chance (the split is fixed by the prompts' texts, so this is
    # the same held-out pairs every run; DPO on a dozen tiny prompts does not solve them all).
    assert ev["eval_reward_accuracy"] > 0.5 and ev["eval_reward_margin"] > 0
    assert ev["train_reward_accuracy"] == 1.0
    assert model["metrics"]["export_parameters"]["as_of"]["comparison_id"] > 0

    series = client.get(f"/api/v1/jobs/{job_id}/metrics", headers=auth).json()["series"]
    expected = {"train/loss", "rewards/accuracy", "rewards/margin", "logps/chosen", "eval/loss"}
    assert expected | {"eval/rewards/accuracy", "train/grad_norm"} <= series.keys()
    margins = [value for _, value in series["rewards/margin"]]
    assert margins[0] == 0 and margins[-1] > 0.1  # step 1: the policy is the reference

    from transformers import AutoModelForCausalLM

    folder = Path(settings.data_dir) / model["path"]
    assert model["path"].startswith("models/dpo-")
    assert AutoModelForCausalLM.from_pretrained(folder).config.model_type == "llama"
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["config"]["epochs"] == 8 and not (folder / "checkpoint").exists()

    # the pages: the job's charts, the new version with its parent and the next steps
    page = client.get(f"/jobs/{job_id}", headers=auth)
    assert page.status_code == 200 and "rewards/accuracy" in page.text
    model_page = client.get(f"/models/{model['id']}", headers=auth)
    assert model_page.status_code == 200 and f"/models/{base_id}" in model_page.text
    assert f"/jobs/new/dpo?model={model['id']}" in model_page.text
    assert "eval_reward_accuracy" in model_page.text
    assert "/jobs/new/dpo" in client.get("/jobs", headers=auth).text
    with database.session() as db:
        version = db.get_one(ModelVersion, model["id"])
        assert version.kind is ModelKind.policy and version.job_id == job_id


def register_folder(db, folder: Path, name: str, data_dir: Path) -> ModelVersion:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    return registry.register(db, name=name, path=str(folder), data_dir=data_dir, actor_id=None)


def test_the_form_queues_a_dpo_job(client, as_role, db, settings, tmp_path):
    make_campaign(db, slug="dpo-form", k=2, overlap=1)
    make_campaign(db, slug="dpo-written", k=2, overlap=1, mode=CampaignMode.demonstration)
    base = register_folder(db, tmp_path / "base", "form base", settings.data_dir)
    db.commit()
    as_role("labeler")
    assert client.get("/jobs/new/dpo").status_code == 403
    csrf = as_role("researcher")
    form = client.get(f"/jobs/new/dpo?model={base.id}&campaign=dpo-form")
    assert form.status_code == 200 and 'data-testid="dpo-form"' in form.text
    assert 'value="dpo-form" checked' in form.text and "dpo-written" not in form.text
    assert f'value="{base.id}" selected' in form.text
    fields = {"model_id": str(base.id), "campaigns": "dpo-form"}
    unsigned = client.post("/jobs/new/dpo", data=fields, follow_redirects=False)
    assert unsigned.status_code == 403  # no CSRF token
    bad = client.post("/jobs/new/dpo", data={**fields, "beta": "0", "csrf_token": csrf})
    assert bad.status_code == 422 and 'data-testid="job-errors"' in bad.text
    assert "training.beta" in bad.text
    done = client.post(
        "/jobs/new/dpo",
        data={
            **fields,
            "beta": "0.2",
            "max_pairs": "50",
            "include_excluded": "true",
            "csrf_token": csrf,
        },
        follow_redirects=False,
    )
    assert done.status_code == 303, done.text
    job = db.get_one(Job, int(done.headers["location"].rsplit("/", 1)[1]))
    assert job.kind == "dpo" and job.state is JobState.queued
    assert job.config["model_id"] == base.id and job.config["campaigns"] == ["dpo-form"]
    assert job.config["training"]["beta"] == 0.2 and job.config["max_pairs"] == 50
    assert job.config["include_excluded"] is True


def test_the_command_queues_a_dpo_job(fresh_database_url, tmp_path):
    database = Database(fresh_database_url)
    try:
        with database.session() as db:
            make_campaign(db, slug="dpo-cli", k=2, overlap=1)
            base_id = register_folder(db, tmp_path / "base", "cli base", tmp_path / "data").id
            db.commit()
    finally:
        database.dispose()
    env = cli_env(fresh_database_url, tmp_path / "data", secret_key="s" * 48)
    args = ("train", "dpo", "--campaign", "dpo-cli", "--model", "cli base")
    bad = run_cli(*args, "--beta", "0", env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "training.beta" in bad.stderr
    queued = run_cli(*args, "--beta", "0.25", "--epochs", "2", env=env, cwd=tmp_path)
    assert queued.returncode == 0, queued.stderr
    job_id = int(re.search(r"queued job (\d+)", queued.stdout).group(1))
    database = Database(fresh_database_url)
    try:
        with database.session() as db:
            job = db.get_one(Job, job_id)
            assert job.kind == "dpo" and job.config["model_id"] == base_id
            assert job.config["training"]["beta"] == 0.25 and job.config["training"]["epochs"] == 2
    finally:
        database.dispose()
