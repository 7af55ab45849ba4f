"""The API and `prefloop generate` queue no second generate job while one from the same model
or endpoint waits for the campaign (as the form and the button already refuse): they answer
with that job, and a job from another model, endpoint or campaign is still queued."""

from __future__ import annotations

from sqlalchemy import func, select

from app.auth import service as auth_service
from app.db import Database
from app.jobs.models import Job, JobState, ModelKind, ModelVersion
from tests.factories import make_campaign
from tests.test_cli import cli_env, run_cli, run_cli_together


def policy(db, name: str) -> ModelVersion:
    made = ModelVersion(name=name, kind=ModelKind.policy, algorithm="base", path=f"org/{name}")
    db.add(made)
    db.flush()
    return made


def generate_jobs(db) -> int:
    return db.scalar(select(func.count(Job.id)).where(Job.kind == "generate"))


def test_the_api_answers_a_repeat_with_the_waiting_job(client, db, users):
    token = auth_service.create_api_token(db, users.researcher, name="dedupe").secret
    make_campaign(db, slug="dedupe-api", k=2)
    make_campaign(db, slug="dedupe-other", k=2)
    first_model, second_model = policy(db, "dedupe-a"), policy(db, "dedupe-b")
    db.commit()
    auth = {"Authorization": f"Bearer {token}"}
    config = {"campaign": "dedupe-api", "model_id": first_model.id, "temperature": 0.8}

    def post(**changes):
        body = {"kind": "generate", "config": {**config, **changes}}
        return client.post("/api/v1/jobs", json=body, headers=auth)

    made = post()
    assert made.status_code == 201, made.text
    assert made.json()["created"] is True and made.json()["state"] == "queued"
    first = made.json()["id"]

    again = post()
    assert again.status_code == 200, again.text
    assert again.json()["created"] is False
    assert again.json()["id"] == first and again.json()["url"] == f"/api/v1/jobs/{first}"
    # Other sampling settings from the same model would find every prompt taken by the
    # first job too, so they get it back as well (the form does the same).
    hotter = post(temperature=1.2)
    assert hotter.status_code == 200 and hotter.json()["id"] == first
    assert generate_jobs(db) == 1
    # A repeat that could not run is refused as it would be with nothing waiting...
    unknown = post(reward_model_id=99999)
    assert unknown.status_code in (404, 422) and "reward_model_id" in unknown.text
    assert post(temperature=0).status_code == 422  # greedy: K=2 identical completions
    # ... and a more urgent one hurries the waiting job along.
    urgent = client.post(
        "/api/v1/jobs",
        json={"kind": "generate", "config": config, "priority": 50},
        headers=auth,
    )
    assert urgent.status_code == 200 and urgent.json()["priority"] == 50
    assert post().json()["priority"] == 50  # never lowered
    assert generate_jobs(db) == 1

    # Another model, or the same model for another campaign, is another job.
    other_model = post(model_id=second_model.id)
    other_campaign = post(campaign="dedupe-other")
    assert (other_model.status_code, other_campaign.status_code) == (201, 201)
    assert len({first, other_model.json()["id"], other_campaign.json()["id"]}) == 3
    assert generate_jobs(db) == 3

    # A running job still counts; once it has finished, the same request queues anew.
    job = db.get_one(Job, first)
    job.state = JobState.running
    db.commit()
    assert post().json()["id"] == first
    job.state = JobState.succeeded
    db.commit()
    after = post()
    assert after.status_code == 201 and after.json()["id"] not in (first, None)
    assert generate_jobs(db) == 4


def test_the_api_tells_endpoints_apart_by_url_and_model(client, db, users):
    token = auth_service.create_api_token(db, users.researcher, name="dedupe").secret
    make_campaign(db, slug="dedupe-endpoint", k=2)
    db.commit()
    auth = {"Authorization": f"Bearer {token}"}
    endpoint = {"base_url": "http://vllm:8000/v1", "model": "qwen"}

    def post(**changes):
        config = {"campaign": "dedupe-endpoint", "endpoint": {**endpoint, **changes}}
        return client.post(
            "/api/v1/jobs", json={"kind": "generate", "config": config}, headers=auth
        )

    first = post()
    assert first.status_code == 201, first.text
    same = post(api="completions", concurrency=8)
    assert same.status_code == 200 and same.json()["id"] == first.json()["id"]
    for spelling in ("http://vllm:8000", "HTTP://VLLM:8000/", "http://vllm:8000/v1/"):
        respelled = post(base_url=spelling)
        assert respelled.status_code == 200 and respelled.json()["id"] == first.json()["id"]
    elsewhere = post(base_url="http://vllm:8001/v1")
    assert elsewhere.status_code == 201
    other = post(model="llama")
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]
    assert generate_jobs(db) == 3


def test_prefloop_generate_twice_queues_one_job(fresh_database_url, tmp_path):
    database = Database(fresh_database_url)
    with database.session() as db:
        make_campaign(db, slug="dedupe-cli", k=2)
        policy(db, "cli-a")
        policy(db, "cli-b")
        db.commit()
    env = cli_env(fresh_database_url, tmp_path / "data")
    command = ("generate", "--campaign", "dedupe-cli", "--model", "cli-a")
    first = run_cli(*command, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "queued job" in first.stdout
    results = run_cli_together(
        command,
        (*command, "--temperature", "0.5"),
        ("generate", "--campaign", "dedupe-cli", "--model", "cli-b"),
        env=env,
        cwd=tmp_path,
    )
    again, hotter, other = results
    with database.session() as db:
        jobs = db.scalars(select(Job).where(Job.kind == "generate").order_by(Job.id)).all()
        names = dict(db.execute(select(ModelVersion.name, ModelVersion.id)).tuples().all())
    database.dispose()
    assert len(jobs) == 2, [r.stdout + r.stderr for r in results]
    waiting, queued = jobs
    assert waiting.config["model_id"] == names["cli-a"]
    assert queued.config["model_id"] == names["cli-b"]
    for repeat in (again, hotter):
        assert repeat.returncode == 0, repeat.stderr
        assert f"nothing new was queued: job {waiting.id} (queued)" in repeat.stdout
        assert "queued job" not in repeat.stdout
    assert other.returncode == 0 and f"queued job {queued.id}" in other.stdout, other.stderr


def test_two_first_requests_at_once_queue_one_job(live):
    """The second request waits for the first one's transaction (the campaign's row is
    locked on PostgreSQL; SQLite's writers queue anyway), then finds its job waiting."""
    import threading
    import time

    from app.jobs import generation
    from app.jobs.specs import GenerateJobSpec

    database, _ = live
    with database.session() as db:
        make_campaign(db, slug="dedupe-race", k=2)
        model_id = policy(db, "dedupe-race").id
        db.commit()
    spec = GenerateJobSpec(campaign="dedupe-race", model_id=model_id)
    first_committed = threading.Event()
    second: dict[str, tuple[int, bool, bool]] = {}

    def ask_again() -> None:
        with database.session() as db:
            job, created = generation.queue_unless_waiting(db, spec, actor_id=None)
            second["answer"] = (job.id, created, first_committed.is_set())
            db.commit()

    with database.session() as db:
        job, created = generation.queue_unless_waiting(db, spec, actor_id=None)
        thread = threading.Thread(target=ask_again)
        thread.start()
        time.sleep(0.5)  # the second request reaches the check meanwhile
        first_committed.set()
        db.commit()
    thread.join(timeout=30)
    assert created and second["answer"] == (job.id, False, True)
    with database.session() as db:
        assert generate_jobs(db) == 1
