"""The `train_reward` job end to end: labels made through the labeling service become a queued
job (API), a worker trains a tiny reward model built from config, and the model version,
its metrics, its files and its ranking of held-out tasks come back through the API and the
pages. Also: what the job reads (ranks, ties, margins, gold, imports, the split, weights),
and the job spec held equal to the trainer's config."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.auth import service as auth_service
from app.auth.models import Role
from app.campaigns.models import CampaignMode
from app.jobs import training
from app.jobs.models import Job, JobState, ModelKind, ModelVersion
from app.jobs.specs import RewardJobSpec, RewardTraining, SpecError, parse_reward_spec
from app.labeling import importer
from app.labeling import service as labeling
from app.labeling.schemas import JudgmentIn
from app.main import create_app
from tests.factories import make_campaign, make_labeler, make_task
from tests.tiny_models import reward_model
from tests.training_helpers import (
    assert_spec_mirrors,
    live_fixture,  # noqa: F401 - the `live` fixture
    tiny_model,
)
from trainer.reward import RewardConfig
from trainer.reward_job import load_training_data, ranks_of, reward_config
from trainer.worker import run_worker

TASKS = 24
FAST = {"lease_seconds": 30.0, "heartbeat_seconds": 0.3, "poll_interval": 0.05}


def answers(n: int) -> list[str]:
    """Three answers; the labelers prefer kindly > plain > rude."""
    return [f"kindly helpful answer {n}", f"plain answer {n}", f"rude answer {n}"]


def rank_by_truth(db, campaign, users, truth: dict[int, list[int]]) -> None:
    rng = random.Random(3)
    for user in users:
        while (lease := labeling.next_task(db, user=user, campaign=campaign, rng=rng)) is not None:
            labeling.submit(
                db,
                user=user,
                submit_key=lease.submit_key,
                answer=JudgmentIn(ranking=[[cid] for cid in truth[lease.task_id]]),
            )


# --- the spec -------------------------------------------------------------------------------


def test_the_spec_mirrors_the_trainers_config():
    """Every training option the server accepts is a RewardConfig field with the same default,
    so a job never carries an option the trainer would ignore or refuse."""
    assert_spec_mirrors(RewardTraining, RewardConfig, all_fields=False)
    config = reward_config(RewardJobSpec(backbone="/m", campaigns=["x"]))
    assert config.model_name_or_path == "/m" and config.epochs == 1


def test_bad_specs_name_the_field():
    with pytest.raises(SpecError, match=r"training\.learning_rate"):
        parse_reward_spec({"backbone": "/m", "campaigns": ["x"], "training": {"learning_rate": 0}})
    with pytest.raises(SpecError, match="campaigns"):
        parse_reward_spec({"backbone": "/m", "campaigns": []})
    with pytest.raises(SpecError, match="unknown"):
        parse_reward_spec({"backbone": "/m", "campaigns": ["x"], "unknown": 1})
    with pytest.raises(SpecError, match="backbone: give a backbone, or init_model_id"):
        parse_reward_spec({"campaigns": ["x"]})
    assert parse_reward_spec({"campaigns": ["x"], "init_model_id": 3}).backbone is None


def test_a_warm_start_records_the_backbone_its_model_came_from(db):
    make_campaign(db, slug="rm-warm", k=2, overlap=1)
    first = ModelVersion(
        name="first",
        kind=ModelKind.reward,
        path="models/first",
        metrics={"training": {"backbone": "/backbones/minilm"}},
    )
    unrecorded = ModelVersion(name="imported", kind=ModelKind.reward, path="/models/imported")
    db.add_all([first, unrecorded])
    db.flush()
    for start, other, expected in (
        (first, None, "/backbones/minilm"),
        (first, "/somewhere/else", "/backbones/minilm"),  # the weights are the model's
        (unrecorded, None, "/models/imported"),
    ):
        spec = parse_reward_spec(
            {"campaigns": ["rm-warm"], "init_model_id": start.id, "backbone": other}
        )
        job = training.queue_reward_training(db, spec, actor_id=None)
        assert job.config["backbone"] == expected


def test_ranks_of_places_ties_together():
    assert ranks_of([[3], [1, 2]], [1, 2, 3]) == [1, 1, 0]
    assert ranks_of([[3], [1]], [1, 2, 3]) is None  # does not cover the task


# --- what the job reads ----------------------------------------------------------------------


def test_training_data_from_judgments_ties_margins_gold_and_imports(db, database, settings):
    rank = make_campaign(db, slug="rm-rank", k=3, overlap=2, allow_ties=True)
    duel = make_campaign(db, slug="rm-duel", k=2, overlap=1, mode=CampaignMode.pairwise)
    ann, bob = make_labeler(db, "rm-ann"), make_labeler(db, "rm-bob")
    truth = {}
    for n in range(10):
        task = make_task(db, rank, prompt=f"question {n}", completions=answers(n))
        truth[task.id] = [item.completion_id for item in task.items]
    gold = make_task(
        db,
        rank,
        prompt="gold question",
        completions=answers(99),
        gold_ranking_positions=[[2], [0, 1]],
        is_gold=True,
    )
    rank_by_truth(db, rank, [ann], truth)
    # bob ties the two best of every task
    rng = random.Random(1)
    while (lease := labeling.next_task(db, user=bob, campaign=rank, rng=rng)) is not None:
        ids = truth.get(lease.task_id)
        ranking = [[ids[0], ids[1]], [ids[2]]] if ids else [[c] for c in lease.display_order]
        labeling.submit(
            db, user=bob, submit_key=lease.submit_key, answer=JudgmentIn(ranking=ranking)
        )
    pair = make_task(db, duel, prompt="which?", completions=["left one", "right one"])
    lease = labeling.next_task(db, user=ann, campaign=duel, rng=rng)
    assert lease is not None and lease.task_id == pair.id
    first = lease.display_order[0]
    labeling.submit(db, user=ann, submit_key=lease.submit_key, answer=JudgmentIn(strength=-3))
    hh = json.dumps(
        {
            "chosen": "\n\nHuman: hi\n\nAssistant: hello there",
            "rejected": "\n\nHuman: hi\n\nAssistant: go away",
        }
    )
    importer.import_stream(
        db, duel, io.BytesIO(hh.encode() + b"\n"), file_name="hh.jsonl", as_judged=True
    )
    db.commit()

    spec = RewardJobSpec(
        backbone="/m", campaigns=["rm-rank", "rm-duel"], test_fraction=0.5, split_seed=4
    )
    data = load_training_data(database, spec, settings.secret_key)
    groups = data.train + data.eval
    assert data.counts["judgments"] == 2 * 10 + 1 and data.counts["imported_pairs"] == 1
    # bob's ties are one shared place; ann's rankings are strict
    assert (
        sorted(g.ranks for g in groups if len(g.ranks) == 3 and g.ranks.count(0) == 2)
        == [[0, 0, 1]] * 10
    )
    assert sum(1 for g in groups if g.ranks == [0, 1, 2]) == 10
    # the pairwise judgment: the first-shown answer won at full strength, margin |s| / 3
    duel_group = next(g for g in groups if g.margin is not None)
    assert duel_group.margin == pytest.approx(1.0)
    won = [c for c, r in zip(duel_group.completions, duel_group.ranks, strict=True) if r == 0]
    first_text = "left one" if first == pair.items[0].completion_id else "right one"
    assert won == [first_text]
    # the imported HH pair: chosen first, as a pair of its own
    imported = next(g for g in groups if "hello there" in g.completions)
    assert imported.completions == ["hello there", "go away"] and imported.ranks == [0, 1]
    # gold: evaluated against its answer, never trained on
    assert len(data.gold) == 1 and data.gold[0].ranks == [1, 1, 0]
    assert all(g.prompt != "gold question" for g in groups) and gold.id not in data.eval_tasks
    # the split is by prompt, and both sides are used
    train_keys = {g.prompt_key for g in data.train}
    eval_keys = {g.prompt_key for g in data.eval}
    assert train_keys and eval_keys and not train_keys & eval_keys
    # the same mark reads the same data, even after more labels
    again = load_training_data(database, spec, settings.secret_key, data.parameters["as_of"])
    assert again.fingerprint() == data.fingerprint()


def test_labeler_weights_follow_agreement(db, database, settings):
    campaign = make_campaign(db, slug="rm-weights", k=3, overlap=3)
    careful = [make_labeler(db, f"rm-careful-{i}") for i in range(2)]
    contrarian = make_labeler(db, "rm-contrarian")
    truth = {}
    for n in range(8):
        task = make_task(db, campaign, prompt=f"weigh {n}", completions=answers(n))
        truth[task.id] = [item.completion_id for item in task.items]
    rank_by_truth(db, campaign, careful, truth)
    rank_by_truth(db, campaign, [contrarian], {t: list(reversed(ids)) for t, ids in truth.items()})
    db.commit()
    spec = RewardJobSpec(backbone="/m", campaigns=["rm-weights"], labeler_weights="agreement")
    data = load_training_data(database, spec, settings.secret_key)
    weights = sorted({round(g.weight, 6) for g in data.train + data.eval})
    assert len(weights) == 2 and weights[0] == pytest.approx(0.1)  # the contrarian, floored
    assert weights[1] > 0.5
    assert data.noise_ceiling is not None and 0 < data.noise_ceiling < 1


# --- end to end ------------------------------------------------------------------------------


def tiny_backbone(folder: Path) -> str:
    texts = [" ".join(answers(n)) + f" question {n}" for n in range(TASKS + 1)]
    return tiny_model(folder, texts, reward_model)


def test_labels_become_a_job_and_a_reward_model_version(live, tmp_path):
    database, settings = live
    with database.session() as db:
        campaign = make_campaign(db, slug="rm-live", k=3, overlap=2)
        truth = {}
        for n in range(TASKS):
            task = make_task(db, campaign, prompt=f"question {n}", completions=answers(n))
            truth[task.id] = [item.completion_id for item in task.items]
        rank_by_truth(db, campaign, [make_labeler(db, "live-a"), make_labeler(db, "live-b")], truth)
        researcher = auth_service.create_user(
            db, username="live-r", role=Role.researcher, password=None
        )
        token = auth_service.create_api_token(db, researcher, name="trainer")
        db.commit()
    client = TestClient(create_app(settings, database))
    auth = {"Authorization": f"Bearer {token.secret}"}
    config = {
        "backbone": tiny_backbone(tmp_path / "backbone"),
        "campaigns": ["rm-live"],
        "test_fraction": 0.5,
        "score_tasks": 5,
        "training": {
            "learning_rate": 3e-3,
            "batch_size": 4,
            "max_length": 64,
            "epochs": 2,
            "save_every": 2,
        },
    }
    refused = client.post(
        "/api/v1/jobs",
        json={"kind": "train_reward", "config": {**config, "campaigns": ["nope"]}},
        headers=auth,
    )
    assert refused.status_code == 404 and "nope" in refused.json()["detail"]
    created = client.post(
        "/api/v1/jobs", json={"kind": "train_reward", "config": config}, headers=auth
    )
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    assert created.json()["state"] == "queued"

    ran = run_worker(
        settings, "rm-worker", once=True, database=database, install_signals=False, **FAST
    )
    assert ran == 1

    job = client.get(f"/api/v1/jobs/{job_id}", headers=auth).json()
    assert job["state"] == "succeeded", job["error"]
    [model] = job["models"]
    metrics = model["metrics"]
    assert 0.0 <= metrics["eval"]["eval_accuracy"] <= 1.0 and metrics["eval"]["eval_pairs"] > 0
    assert 0.0 <= metrics["eval"]["noise_ceiling"] <= 1.0
    counts = metrics["data"]["counts"]
    assert (
        counts["judgments"] == 2 * TASKS
        and counts["train_groups"] + counts["eval_groups"] == 2 * TASKS
    )
    assert counts["eval_groups"] > 0 and metrics["normalization"]["std"] > 0
    assert len(model["scored_tasks"]) == min(5, counts["eval_groups"] // 2)

    series = client.get(f"/api/v1/jobs/{job_id}/metrics", headers=auth).json()["series"]
    assert {"train/loss", "eval/accuracy", "train/learning_rate"} <= series.keys()
    later = client.get(f"/api/v1/jobs/{job_id}/metrics?after=999999999", headers=auth).json()
    assert later["series"] == {}

    # plain transformers loads the version's files; the API sets its ranking beside the humans'
    from transformers import AutoModelForSequenceClassification

    folder = Path(settings.data_dir) / model["path"]
    assert AutoModelForSequenceClassification.from_pretrained(folder).config.num_labels == 1
    task_id = model["scored_tasks"][0]
    side = client.get(f"/api/v1/models/{model['id']}/tasks/{task_id}", headers=auth).json()
    assert side["human_consensus"] == [[cid] for cid in truth[task_id]]
    assert sorted(c for [c] in side["model_ranking"]) == sorted(truth[task_id])
    assert len(side["judgments"]) == 2
    assert client.get(f"/api/v1/models/{model['id']}/tasks/999999", headers=auth).status_code == 404

    # on demand: the model scores a task it trained on, and a prompt nobody labeled
    trained_on = next(t for t in truth if str(t) not in map(str, model["scored_tasks"]))
    url = f"/api/v1/models/{model['id']}/score"
    assert client.post(url, json={"task_ids": [999999]}, headers=auth).status_code == 404
    assert client.post(url, json={}, headers=auth).status_code == 422
    assert client.post(url, json={"task_ids": [trained_on]}, headers=auth).status_code == 202
    adhoc = client.post(
        url, json={"prompt": "question 7", "completions": answers(7)}, headers=auth
    ).json()
    assert (
        run_worker(
            settings, "rm-worker", drain=True, database=database, install_signals=False, **FAST
        )
        == 2
    )
    side = client.get(f"/api/v1/models/{model['id']}/tasks/{trained_on}", headers=auth).json()
    assert side["human_consensus"] == [[cid] for cid in truth[trained_on]]
    adhoc = client.get(adhoc["url"], headers=auth).json()
    assert adhoc["state"] == "succeeded" and len(adhoc["result"]["rewards"]) == 3

    # the pages
    page = client.get(f"/jobs/{job_id}", headers=auth)
    assert page.status_code == 200 and 'data-state="succeeded"' in page.text
    assert f"/models/{model['id']}" in page.text
    model_page = client.get(f"/models/{model['id']}", headers=auth)
    assert model_page.status_code == 200 and 'data-testid="task-compare"' in model_page.text
    with database.session() as db:
        assert db.get_one(Job, job_id).state is JobState.succeeded
        version = db.get_one(ModelVersion, model["id"])
        assert version.job_id == job_id and version.campaign_id is not None
        assert training.get_model(db, version.name).id == version.id


def test_the_form_warm_starts_and_spreads_over_gpus(client, as_role, db, tmp_path):
    make_campaign(db, slug="reward-form", k=2, overlap=1)
    earlier = ModelVersion(name="earlier rm", kind=ModelKind.reward, path="models/rm")
    policy = ModelVersion(name="a policy", kind=ModelKind.policy, path="models/p")
    db.add_all([earlier, policy])
    db.commit()
    csrf = as_role("researcher")
    form = client.get("/jobs/new?campaign=reward-form")
    assert f'<option value="{earlier.id}">#{earlier.id} earlier rm</option>' in form.text
    assert "a policy" not in form.text  # only reward models to warm-start from
    fields = {
        "campaigns": "reward-form",
        "backbone": tiny_backbone(tmp_path / "backbone"),
        "csrf_token": csrf,
    }
    wrong = client.post("/jobs", data={**fields, "init_model_id": str(policy.id)})
    assert wrong.status_code == 422 and "init_model_id" in wrong.text
    assert db.scalar(select(Job.id)) is None
    done = client.post(
        "/jobs",
        data={**fields, "init_model_id": str(earlier.id), "processes": "2"},
        follow_redirects=False,
    )
    assert done.status_code == 303, done.text
    job = db.get_one(Job, int(done.headers["location"].rsplit("/", 1)[1]))
    assert (job.config["init_model_id"], job.config["processes"], job.processes) == (
        earlier.id,
        2,
        2,
    )
