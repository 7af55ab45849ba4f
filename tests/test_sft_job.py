"""The `sft` job end to end: labelers' demonstrations and imported prompt/completion pairs in a
demonstration campaign become a queued job (API), a worker fine-tunes a tiny Llama built from
config, and a new policy version whose parent is the base comes back with its eval loss; its
folder loads with plain transformers. Also: what the job reads (sources, the split by prompt,
as_of), the spec held equal to the trainer's config, refusals, the form and the command."""

from __future__ import annotations

import io
import json
import math
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
from app.jobs.specs import SFTJobSpec, SFTTraining, SpecError, parse_sft_spec
from app.labeling import importer
from app.labeling import service as labeling
from app.labeling.models import Prompt, Task
from app.labeling.schemas import JudgmentIn
from app.main import create_app
from tests.factories import make_campaign, make_labeler, make_task
from tests.test_cli import cli_env, run_cli

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.training_helpers import (
    assert_spec_mirrors,
    live_fixture,  # noqa: F401 - the `live` fixture
    tiny_model,
)
from trainer.sft import META_FILE, SFTConfig
from trainer.sft_job import load_demonstrations, sft_config
from trainer.worker import run_worker

FAST = {"lease_seconds": 30.0, "heartbeat_seconds": 0.3, "poll_interval": 0.05}
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


def question(n: int) -> str:
    return f"repeat {WORDS[n % len(WORDS)]} twice number {n}"


def answer(n: int) -> str:
    word = WORDS[n % len(WORDS)]
    return f"{word} {word} done"


def demonstrate(db, campaign, user, count: int | None = None) -> int:
    """The labeler answers each task served, as the prompt asks; how many."""
    rng, done = random.Random(5), 0
    while (lease := labeling.next_task(db, user=user, campaign=campaign, rng=rng)) is not None:
        task = db.get_one(Task, lease.task_id)
        n = int(db.get_one(Prompt, task.prompt_id).text.rsplit(" ", 1)[1])
        labeling.submit(
            db, user=user, submit_key=lease.submit_key, answer=JudgmentIn(demonstration=answer(n))
        )
        done += 1
        if count is not None and done == count:
            break
    return done


def import_pairs(db, campaign, numbers) -> None:
    lines = [json.dumps({"prompt": question(n), "completions": [answer(n)]}) for n in numbers]
    stream = io.BytesIO(("\n".join(lines) + "\n").encode())
    importer.import_stream(db, campaign, stream, file_name="pairs.jsonl")


# --- the spec -------------------------------------------------------------------------------


def test_the_spec_mirrors_the_trainers_config():
    assert_spec_mirrors(SFTTraining, SFTConfig)
    config = sft_config(SFTJobSpec(model_id=1, campaigns=["x"]), "/m")
    assert config.model_name_or_path == "/m" and config.lr_scheduler == "cosine"


def test_bad_specs_name_the_field():
    with pytest.raises(SpecError, match=r"training\.learning_rate"):
        parse_sft_spec({"model_id": 1, "campaigns": ["x"], "training": {"learning_rate": 0}})
    with pytest.raises(SpecError, match="model_id"):
        parse_sft_spec({"campaigns": ["x"]})
    with pytest.raises(SpecError, match=r"training\.lr_scheduler"):
        parse_sft_spec({"model_id": 1, "campaigns": ["x"], "training": {"lr_scheduler": "step"}})


# --- what the job reads ----------------------------------------------------------------------


def test_demonstrations_and_imported_pairs_split_by_prompt(db, database, settings):
    demo = make_campaign(db, slug="sft-read", k=2, overlap=1, mode=CampaignMode.demonstration)
    for n in range(10):
        make_task(db, demo, prompt=question(n))
    ann = make_labeler(db, "sft-ann")
    assert demonstrate(db, demo, ann) == 10
    import_pairs(db, demo, range(10, 16))
    db.commit()
    spec = SFTJobSpec(model_id=1, campaigns=["sft-read"], test_fraction=0.4, split_seed=3)
    data = load_demonstrations(database, spec, settings.secret_key)
    assert data.counts["labeler_demonstrations"] == 10 and data.counts["imported_pairs"] == 6
    examples = data.train + data.eval
    assert sorted(e.completion for e in examples) == sorted(answer(n) for n in range(16))
    by_prompt = {e.prompt: e.completion for e in examples}
    assert all(by_prompt[question(n)] == answer(n) for n in range(16))
    train_keys = {e.prompt_key for e in data.train}
    eval_keys = {e.prompt_key for e in data.eval}
    assert train_keys and eval_keys and not train_keys & eval_keys
    # only the labelers' answers, or only the imported ones
    humans = load_demonstrations(
        database, spec.model_copy(update={"sources": ["human"]}), settings.secret_key
    )
    assert humans.counts["imported_pairs"] == 0 and humans.counts["labeler_demonstrations"] == 10
    # the same mark reads the same rows after more labels
    make_task(db, demo, prompt=question(40))
    extra = demonstrate(db, demo, ann)  # the new task, and the imported ones' suggestions
    assert extra == 7
    db.commit()
    again = load_demonstrations(database, spec, settings.secret_key, data.parameters["as_of"])
    assert again.fingerprint() == data.fingerprint()
    newer = load_demonstrations(database, spec, settings.secret_key)
    assert newer.counts["labeler_demonstrations"] == 10 + extra


# --- end to end ------------------------------------------------------------------------------


def tiny_policy(folder: Path) -> str:
    return tiny_model(folder, [f"{question(n)} {answer(n)}" for n in range(40)])


def test_demonstrations_become_a_job_and_a_new_policy_version(live, tmp_path):
    database, settings = live
    with database.session() as db:
        demo = make_campaign(db, slug="sft-live", k=2, overlap=1, mode=CampaignMode.demonstration)
        rank = make_campaign(db, slug="sft-rank", k=2, overlap=1)
        for n in range(24):
            make_task(db, demo, prompt=question(n))
        labelers = [make_labeler(db, "sft-a"), make_labeler(db, "sft-b")]
        made = demonstrate(db, demo, labelers[0], count=12) + demonstrate(db, demo, labelers[1])
        assert made == 24
        import_pairs(db, demo, range(24, 36))
        base = registry.register(
            db,
            name="tiny base",
            path=tiny_policy(tmp_path / "base"),
            data_dir=settings.data_dir,
            actor_id=None,
        )
        researcher = auth_service.create_user(
            db, username="sft-r", role=Role.researcher, password=None
        )
        token = auth_service.create_api_token(db, researcher, name="trainer")
        db.commit()
        base_id, rank_slug = base.id, rank.slug
    client = TestClient(create_app(settings, database))
    auth = {"Authorization": f"Bearer {token.secret}"}
    config = {
        "model_id": base_id,
        "campaigns": ["sft-live"],
        "test_fraction": 0.25,
        "training": {
            "learning_rate": 1e-2,
            "batch_size": 4,
            "max_length": 48,
            "epochs": 3,
            "warmup_ratio": 0.0,
            "logging_steps": 1,
            "save_every": 3,
        },
    }

    def post(cfg):
        return client.post("/api/v1/jobs", json={"kind": "sft", "config": cfg}, headers=auth)

    assert post({**config, "campaigns": ["nope"]}).status_code == 404
    wrong_mode = post({**config, "campaigns": [rank_slug]})
    assert wrong_mode.status_code == 422 and "demonstration" in wrong_mode.json()["detail"]
    assert post({**config, "model_id": 999_999}).status_code == 404
    assert post({**config, "training": {"epochs": 0}}).status_code == 422
    created = post(config)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]

    ran = run_worker(
        settings, "sft-worker", once=True, database=database, install_signals=False, **FAST
    )
    assert ran == 1
    job = client.get(f"/api/v1/jobs/{job_id}", headers=auth).json()
    assert job["state"] == "succeeded", job["error"]
    [model] = job["models"]
    assert (model["kind"], model["algorithm"], model["parent_id"]) == ("policy", "sft", base_id)
    counts = model["metrics"]["data"]
    assert counts["labeler_demonstrations"] == 24 and counts["imported_pairs"] == 12
    assert counts["train_examples"] + counts["eval_examples"] == 36
    assert counts["eval_examples"] > 0
    ev = model["metrics"]["eval"]
    assert math.isfinite(ev["eval_loss"]) and ev["eval_loss"] < ev["eval_loss_before"]
    assert ev["eval_perplexity"] == pytest.approx(math.exp(ev["eval_loss"]))
    assert model["metrics"]["export_parameters"]["as_of"]["judgment_id"] > 0

    series = client.get(f"/api/v1/jobs/{job_id}/metrics", headers=auth).json()["series"]
    expected = {"train/loss", "train/learning_rate", "train/tokens_per_second", "eval/loss"}
    assert expected | {"eval/perplexity"} <= series.keys()
    losses = [value for _, value in series["train/loss"]]
    assert losses[-1] < losses[0]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(settings.data_dir) / model["path"]
    assert model["path"].startswith("models/sft-")
    assert AutoModelForCausalLM.from_pretrained(folder).config.model_type == "llama"
    assert AutoTokenizer.from_pretrained(folder).eos_token == "<eos>"
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["config"]["epochs"] == 3 and not (folder / "checkpoint").exists()

    # the pages: the new version links its parent and offers the next steps
    page = client.get(f"/models/{model['id']}", headers=auth)
    assert page.status_code == 200 and f"/models/{base_id}" in page.text
    assert f"/jobs/new/sft?model={model['id']}" in page.text
    assert "/jobs/new/sft" in client.get("/jobs", headers=auth).text
    with database.session() as db:
        version = db.get_one(ModelVersion, model["id"])
        assert version.kind is ModelKind.policy and version.job_id == job_id
        assert version.campaign_id is not None


def register_folder(db, folder: Path, name: str, data_dir: Path) -> ModelVersion:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    return registry.register(db, name=name, path=str(folder), data_dir=data_dir, actor_id=None)


def test_the_form_queues_an_sft_job(client, as_role, db, settings, tmp_path):
    make_campaign(db, slug="sft-form", k=2, overlap=1, mode=CampaignMode.demonstration)
    make_campaign(db, slug="sft-ranked", k=2, overlap=1)
    base = register_folder(db, tmp_path / "base", "form base", settings.data_dir)
    db.commit()
    csrf = as_role("researcher")
    form = client.get(f"/jobs/new/sft?model={base.id}&campaign=sft-form")
    assert form.status_code == 200 and 'data-testid="sft-form"' in form.text
    assert 'value="sft-form" checked' in form.text and "sft-ranked" not in form.text
    bad = client.post(
        "/jobs/new/sft",
        data={"model_id": str(base.id), "campaigns": "sft-form", "epochs": "0", "csrf_token": csrf},
    )
    assert bad.status_code == 422 and 'data-testid="job-errors"' in bad.text
    assert 'name="processes"' in form.text and '<option value="fsdp"' in form.text
    unsharded = client.post(
        "/jobs/new/sft",
        data={
            "model_id": str(base.id),
            "campaigns": "sft-form",
            "sharding": "fsdp",
            "csrf_token": csrf,
        },
    )
    assert unsharded.status_code == 422 and "needs processes &gt;= 2" in unsharded.text
    assert '<option value="fsdp" selected' in unsharded.text  # what was sent is kept
    done = client.post(
        "/jobs/new/sft",
        data={
            "model_id": str(base.id),
            "campaigns": "sft-form",
            "learning_rate": "1e-4",
            "packing": "true",
            "processes": "2",
            "sharding": "fsdp",
            "csrf_token": csrf,
        },
        follow_redirects=False,
    )
    assert done.status_code == 303, done.text
    job = db.get_one(Job, int(done.headers["location"].rsplit("/", 1)[1]))
    assert job.kind == "sft" and job.state is JobState.queued
    assert job.config["model_id"] == base.id and job.config["campaigns"] == ["sft-form"]
    assert job.config["training"]["packing"] is True
    assert job.config["training"]["learning_rate"] == 1e-4
    assert (job.config["processes"], job.config["sharding"], job.processes) == (2, "fsdp", 2)


def test_the_command_queues_an_sft_job(fresh_database_url, tmp_path):
    database = Database(fresh_database_url)
    try:
        with database.session() as db:
            make_campaign(db, slug="sft-cli", k=2, overlap=1, mode=CampaignMode.demonstration)
            base_id = register_folder(db, tmp_path / "base", "cli base", tmp_path / "data").id
            db.commit()
    finally:
        database.dispose()
    env = cli_env(fresh_database_url, tmp_path / "data", secret_key="s" * 48)
    args = ("train", "sft", "--campaign", "sft-cli", "--model", "cli base", "--packing")
    bad = run_cli(*args, "--epochs", "0", env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "training.epochs" in bad.stderr
    missing = run_cli(
        "train", "sft", "--campaign", "sft-cli", "--model", "nope", env=env, cwd=tmp_path
    )
    assert missing.returncode == 1 and "no model version 'nope'" in missing.stderr
    unsharded = run_cli(*args, "--sharding", "fsdp", env=env, cwd=tmp_path)
    assert unsharded.returncode == 2 and "needs processes >= 2" in unsharded.stderr
    queued = run_cli(
        *args, "--epochs", "2", "--processes", "2", "--sharding", "fsdp", env=env, cwd=tmp_path
    )
    assert queued.returncode == 0, queued.stderr
    job_id = re.search(r"queued job (\d+)", queued.stdout).group(1)
    shown = run_cli("job", "show", job_id, env=env, cwd=tmp_path)
    assert shown.returncode == 0 and "sft" in shown.stdout
    database = Database(fresh_database_url)
    try:
        with database.session() as db:
            job = db.get_one(Job, int(job_id))
            assert job.kind == "sft" and job.config["model_id"] == base_id
            assert job.config["training"]["epochs"] == 2 and job.config["training"]["packing"]
            assert (job.config["processes"], job.config["sharding"], job.processes) == (
                2,
                "fsdp",
                2,
            )
    finally:
        database.dispose()
