"""A `train_reward` job with `processes: 2` runs end to end through the worker: read from the
database in the worker, trained by 2 processes under `accelerate launch` (CPU, gloo), its
metrics forwarded to the job, its model published as a version; and it reports the loss curve
the same job reports in one process."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("accelerate")

from app.jobs import service
from app.jobs.models import Job, JobState, ModelVersion
from app.jobs.specs import SpecError, parse_dpo_spec, parse_reward_spec, parse_sft_spec
from tests.factories import make_campaign, make_labeler, make_task
from tests.test_reward_job import answers, rank_by_truth, tiny_backbone
from tests.training_helpers import live_fixture  # noqa: F401 - the `live` fixture
from trainer.worker import run_worker

FAST = {"lease_seconds": 30.0, "heartbeat_seconds": 0.3, "poll_interval": 0.05}
TASKS = 12


def test_processes_is_checked_by_the_spec():
    base = {"backbone": "/m", "campaigns": ["x"]}
    assert parse_reward_spec(base).processes == 1
    assert parse_reward_spec({**base, "processes": 4}).processes == 4
    with pytest.raises(SpecError, match="processes"):
        parse_reward_spec({**base, "processes": 0})
    with pytest.raises(SpecError, match="processes"):
        parse_sft_spec({"model_id": 1, "campaigns": ["x"], "processes": 65})
    assert parse_dpo_spec({"model_id": 1, "campaigns": ["x"], "processes": 2}).processes == 2
    with pytest.raises(SpecError, match="processes"):
        parse_dpo_spec({"model_id": 1, "campaigns": ["x"], "processes": 0})


def test_a_job_trains_in_its_own_process_or_launches_n(monkeypatch):
    """`train_in_job`, which the reward, SFT and DPO jobs share: one process calls the trainer
    with the job's device and callbacks; N launch "module:function" with the same arguments."""
    from types import SimpleNamespace

    from trainer import training_job
    from trainer.dpo import train

    launched = []
    monkeypatch.setattr(
        training_job,
        "run_in_processes",
        lambda ctx, target, n, args, kwargs, on_progress, sharding: (
            launched.append((target, n, args)) or SimpleNamespace(stopped=False)
        ),
    )
    ctx = SimpleNamespace(device="cpu", metric=print, should_stop=lambda: False)
    result = training_job.train_in_job(ctx, train, 2, ("config",), on_progress=print)
    assert launched == [("trainer.dpo:train", 2, ("config",))] and not result.stopped
    calls = []

    def fake_train(*args, **kwargs):
        calls.append((args, kwargs))
        return SimpleNamespace(stopped=False)

    training_job.train_in_job(ctx, fake_train, 1, ("config",), {"x": 1}, on_progress=print)
    assert calls == [
        (
            ("config",),
            {
                "x": 1,
                "device": "cpu",
                "on_metric": print,
                "on_progress": print,
                "should_stop": ctx.should_stop,
            },
        )
    ]


def test_a_stop_that_comes_as_the_processes_finish_keeps_their_model(monkeypatch, tmp_path):
    """The launcher passes a stop on to the ranks without taking it: ranks that were past
    their last step check (saving) finish, and the attempt succeeds with their model instead
    of being handed back to train again from scratch. A run that did stop is handed back."""
    import logging
    from types import SimpleNamespace

    from trainer import launch as launching
    from trainer import training_job
    from trainer.dpo import train
    from trainer.worker import JobContext, JobStopped

    ctx = JobContext(
        job_id=1,
        kind="dpo",
        config={},
        campaign_id=None,
        attempt=1,
        worker_id="w",
        output_dir=tmp_path,
        checkpoint_dir=tmp_path / "checkpoint",
        settings=None,
        database=None,
        log=logging.getLogger("test"),
        requested_device="cpu",
    )
    outcome = {"stopped": False}

    def ranks(target, args, kwargs, *, should_stop, **_):
        ctx._attempt.request_stop("SIGTERM")  # arrives while the ranks save
        assert should_stop()  # the launcher sees it, and would touch the STOP file
        return SimpleNamespace(stopped=outcome["stopped"])

    monkeypatch.setattr(launching, "launch", ranks)
    result = training_job.train_in_job(ctx, train, 2, ("config",), on_progress=print)
    assert not result.stopped and not ctx._attempt.stop_seen  # the worker records success
    outcome["stopped"] = True
    with pytest.raises(JobStopped):
        training_job.train_in_job(ctx, train, 2, ("config",), on_progress=print)
    assert ctx._attempt.stop_seen


# PostgreSQL only: the processes never touch the database (the worker reads before and
# writes after them, as in one process, which test_reward_job runs on both backends), and a
# launch costs some 15 s of the suite.
@pytest.mark.postgres_only
def test_a_two_process_reward_job_becomes_a_model_version(live, tmp_path):
    database, settings = live
    with database.session() as db:
        campaign = make_campaign(db, slug="ddp-rm", k=3, overlap=2)
        truth = {}
        for n in range(TASKS):
            task = make_task(db, campaign, prompt=f"question {n}", completions=answers(n))
            truth[task.id] = [item.completion_id for item in task.items]
        rank_by_truth(db, campaign, [make_labeler(db, "ddp-a"), make_labeler(db, "ddp-b")], truth)
        config = {
            "backbone": tiny_backbone(tmp_path / "backbone"),
            "campaigns": ["ddp-rm"],
            "test_fraction": 0.3,
            "score_tasks": 2,
            "training": {"learning_rate": 3e-3, "batch_size": 5, "max_length": 64, "epochs": 2},
        }
        one = service.enqueue(db, kind="train_reward", config=config, priority=1).id
        two = service.enqueue(db, kind="train_reward", config={**config, "processes": 2}).id
        db.commit()

    ran = run_worker(
        settings, "ddp-worker", drain=True, database=database, install_signals=False, **FAST
    )
    assert ran == 2

    with database.session() as db:
        jobs = {job_id: db.get_one(Job, job_id) for job_id in (one, two)}
        for job in jobs.values():
            assert job.state is JobState.succeeded, job.error
        assert jobs[two].result["data"]["fingerprint"] == jobs[one].result["data"]["fingerprint"]
        curves = {
            job_id: [(m.step, m.value) for m in service.metrics(db, job_id, name="train/loss")]
            for job_id in jobs
        }
        accuracy = {
            job_id: [m.value for m in service.metrics(db, job_id, name="eval/accuracy")]
            for job_id in jobs
        }
        version = db.query(ModelVersion).filter_by(job_id=two).one()
        assert version.algorithm == "reward" and version.metrics["task_scores"]
        path = Path(settings.data_dir) / version.path
    assert curves[two] and [s for s, _ in curves[two]] == [s for s, _ in curves[one]]
    assert [v for _, v in curves[two]] == pytest.approx([v for _, v in curves[one]], rel=1e-4)
    assert accuracy[two] == pytest.approx(accuracy[one])
    assert jobs[two].progress == 1.0
    assert (path / "prefloop_reward.json").is_file() and not (path / "checkpoint").exists()
    launch_dir = service.attempt_dir(settings.data_dir, two, 1) / "launch"
    assert (launch_dir / "launch.log").is_file() and (launch_dir / "events.jsonl").is_file()
