"""The training worker: handlers, heartbeats, checkpoints, stopping, and real worker processes
that race, get SIGKILLed or SIGTERMed. Leases are short (2 s) so takeovers happen quickly."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

import app.cli
from app.config import get_settings
from app.db import Database, utcnow
from app.jobs import service
from app.jobs.models import Job, JobMetric, JobState, ModelKind, ModelVersion
from tests.conftest import make_settings
from trainer.handlers import HandlerError, registry, resolve
from trainer.worker import Worker, check_device, run_worker

ROOT = Path(__file__).resolve().parent.parent
HANDLERS = "tests.job_handlers"
FAST = {"lease_seconds": 2.0, "heartbeat_seconds": 0.2, "poll_interval": 0.05}
_SCRIPT = Path(sys.executable).with_name("prefloop")
PREFLOOP = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "app.cli"]


@pytest.fixture
def database(fresh_database_url):
    """A real database of the test's own: the worker commits from several threads."""
    database = Database(fresh_database_url)
    yield database
    database.dispose()


@pytest.fixture
def settings(fresh_database_url, tmp_path):
    return make_settings(database_url=fresh_database_url, data_dir=tmp_path / "data")


def enqueue(database: Database, kind: str, config: dict | None = None, **kwargs) -> int:
    with database.session() as db:
        job = service.enqueue(db, kind=kind, config=config or {}, **kwargs)
        db.commit()
        return job.id


def job_row(database: Database, job_id: int) -> Job:
    with database.session() as db:
        return db.get_one(Job, job_id)


def work(settings, database, **kwargs) -> int:
    options = {**FAST, "handler_modules": [HANDLERS], "install_signals": False, **kwargs}
    return run_worker(settings, "test-worker", database=database, **options)


def wait_for(condition: Callable[[], object], timeout: float = 20.0, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or condition}")


def checkpoint_step(settings, job_id: int) -> int:
    path = service.checkpoint_dir(settings.data_dir, job_id) / "state.json"
    try:
        return json.loads(path.read_text())["step"]
    except (OSError, ValueError):
        return 0


# --- in-process ---------------------------------------------------------------------------------


def test_a_job_runs_with_metrics_progress_log_and_checkpoint(settings, database):
    job_id = enqueue(database, "test_count", {"steps": 4, "sleep": 0.1})
    assert work(settings, database, once=True) == 1
    job = job_row(database, job_id)
    assert job.state is JobState.succeeded, job.error
    assert job.result == {
        "steps": 4,
        "resumed_from": 0,
        "attempt": 1,
        "runs": [{"attempt": 1, "worker": "test-worker", "from": 0, "to": 4}],
    }
    assert (job.progress, job.attempt, job.worker_id) == (1.0, 1, "test-worker")
    with database.session() as db:
        steps = [(m.step, m.value) for m in service.metrics(db, job_id, name="step")]
    assert steps == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    log = (service.attempt_dir(settings.data_dir, job_id, 1) / "log.txt").read_text()
    assert "attempt 1" in log and "count: from step 0 to 4" in log and "succeeded" in log
    assert "count: from step 0 to 4" in job.log_tail and "succeeded" in job.log_tail
    assert (service.checkpoint_dir(settings.data_dir, job_id) / "completed-1").exists()


def test_failures_back_off_and_retry_until_success(settings, database):
    job_id = enqueue(database, "test_flaky", {"failures": 2}, max_attempts=3)
    assert work(settings, database, drain=True, backoff_seconds=0) == 3
    job = job_row(database, job_id)
    assert (job.state, job.attempt, job.result) == (JobState.succeeded, 3, {"tries": 3})
    failed_log = (service.attempt_dir(settings.data_dir, job_id, 2) / "log.txt").read_text()
    assert "RuntimeError: flaky: failing try 2 of 2" in failed_log and "Traceback" in failed_log


def test_out_of_attempts_is_dead_and_the_worker_keeps_going(settings, database):
    dead_id = enqueue(database, "test_flaky", {"failures": 5}, max_attempts=2, priority=1)
    bad_id = enqueue(database, "test_not_json", max_attempts=1, priority=1)
    ok_id = enqueue(database, "test_record")
    assert work(settings, database, drain=True, backoff_seconds=0) == 4
    dead = job_row(database, dead_id)
    assert (dead.state, dead.attempt) == (JobState.dead, 2)
    assert dead.error == "attempt 2: RuntimeError: flaky: failing try 2 of 5"
    bad = job_row(database, bad_id)
    assert bad.state is JobState.dead and "not JSON serializable" in bad.error
    assert job_row(database, ok_id).state is JobState.succeeded


def test_a_config_no_attempt_can_run_is_dead_at_once(settings, database):
    """A SpecError or ConfigError would fail every attempt alike: no retries, no backoff."""
    spec_id = enqueue(database, "test_misconfigured", {"spec": True}, max_attempts=3)
    config_id = enqueue(database, "test_misconfigured", max_attempts=3)
    assert work(settings, database, drain=True, backoff_seconds=0) == 2
    refused = job_row(database, spec_id)
    assert (refused.state, refused.attempt) == (JobState.dead, 1)
    assert refused.error.startswith("attempt 1: SpecError: ")
    mismatched = job_row(database, config_id)
    assert (mismatched.state, mismatched.attempt) == (JobState.dead, 1)
    assert "ConfigError: value_init='reward'" in mismatched.error


def test_an_unusable_data_dir_fails_the_attempt_not_the_worker(settings, database, tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    settings = make_settings(database_url=settings.database_url, data_dir=blocked)
    job_id = enqueue(database, "test_record", max_attempts=1)
    assert work(settings, database, drain=True) == 1
    job = job_row(database, job_id)
    assert job.state is JobState.dead and "cannot set up the job folder" in job.error


def test_backoff_keeps_a_failed_job_waiting(settings, database):
    job_id = enqueue(database, "test_flaky", {"failures": 1})
    before = utcnow()
    assert work(settings, database, drain=True, backoff_seconds=100) == 1  # then nothing ready
    job = job_row(database, job_id)
    assert job.state is JobState.failed
    assert before + dt.timedelta(seconds=50) <= job.run_after
    assert job.run_after <= utcnow() + dt.timedelta(seconds=100)


def in_thread(target: Callable[[], object]) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(target()), daemon=True)
    thread.start()
    return thread, out


def test_cancel_stops_a_running_job_at_its_next_heartbeat(settings, database):
    job_id = enqueue(database, "test_count", {"steps": 500, "sleep": 0.02})
    thread, _ = in_thread(lambda: work(settings, database, once=True))
    wait_for(lambda: checkpoint_step(settings, job_id) >= 3, what="the job to start")
    with database.session() as db:
        assert service.cancel(db, job_id).state is JobState.running
        db.commit()
    thread.join(timeout=10)
    assert not thread.is_alive()
    job = job_row(database, job_id)
    assert job.state is JobState.cancelled and job.result is None
    assert 3 <= checkpoint_step(settings, job_id) < 500


def test_a_stop_hands_the_job_back_uncounted_and_it_resumes(settings, database):
    """What SIGTERM does, in-process: the handler returns, the job is queued again."""
    job_id = enqueue(database, "test_count", {"steps": 60, "sleep": 0.01}, max_attempts=1)
    worker = Worker(
        settings, worker_id="first", handler_modules=[HANDLERS], **FAST, database=database
    )
    thread, ran = in_thread(lambda: worker.run(install_signals=False))
    wait_for(lambda: checkpoint_step(settings, job_id) >= 5, what="the job to start")
    worker.request_stop()
    thread.join(timeout=10)
    assert ran == [1]
    job = job_row(database, job_id)
    assert (job.state, job.attempt, job.uncounted_attempts) == (JobState.queued, 1, 1)
    stopped_at = checkpoint_step(settings, job_id)
    assert work(settings, database, once=True) == 1  # max_attempts=1, yet it runs again
    job = job_row(database, job_id)
    assert job.state is JobState.succeeded and job.result["resumed_from"] == stopped_at


def test_check_stop_raising_also_hands_back(settings, database):
    job_id = enqueue(database, "test_stubborn", {"seconds": 30})
    worker = Worker(settings, handler_modules=[HANDLERS], **FAST, database=database)
    thread, _ = in_thread(lambda: worker.run(install_signals=False))
    wait_for(lambda: job_row(database, job_id).state is JobState.running, what="a claim")
    worker.request_stop()
    thread.join(timeout=10)
    assert job_row(database, job_id).state is JobState.queued


def test_on_complete_writes_with_the_success_or_not_at_all(settings, database):
    def handler(ctx):
        def add_model(db):
            db.add(
                ModelVersion(
                    name=f"rm-{ctx.job_id}", kind=ModelKind.reward, path="x", job_id=ctx.job_id
                )
            )
            if ctx.config.get("break"):
                raise RuntimeError("registry unavailable")

        ctx.on_complete(add_model)
        return {"ok": True}

    worker = Worker(settings, handler_modules=[HANDLERS], database=database, **FAST)
    worker.handlers.update({"model": handler})
    worker.kinds = ["model"]
    good = enqueue(database, "model")
    broken = enqueue(database, "model", {"break": True}, max_attempts=1)
    assert worker.run(drain=True, install_signals=False) == 2
    with database.session() as db:
        models = db.scalars(select(ModelVersion.job_id)).all()
    assert models == [good]
    assert job_row(database, good).state is JobState.succeeded
    broken_job = job_row(database, broken)
    assert broken_job.state is JobState.dead and "registry unavailable" in broken_job.error


def test_device_choice(settings, database):
    cpu = enqueue(database, "test_device")
    work(settings, database, once=True, device="cpu")
    assert job_row(database, cpu).result == {"device": "cpu"}
    auto = enqueue(database, "test_device")
    work(settings, database, once=True)
    expected = "cuda" if _cuda_available() else "cpu"
    assert job_row(database, auto).result == {"device": expected}
    assert check_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match="device"):
        check_device("tpu")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def test_worker_configuration_errors(settings, database):
    with pytest.raises(ValueError, match="no handler for job kind nope"):
        Worker(settings, kinds=["nope"], handler_modules=[HANDLERS], database=database)
    with pytest.raises(ValueError, match="half the lease"):
        Worker(
            settings,
            handler_modules=[HANDLERS],
            lease_seconds=2,
            heartbeat_seconds=1.5,
            database=database,
        )
    with pytest.raises(HandlerError, match="cannot import"):
        registry(["tests.no_such_module"])
    with pytest.raises(HandlerError, match="module:function"):
        resolve("nocolon")
    assert set(registry([HANDLERS])) >= {"test_count", "test_flaky", "test_record"}
    with pytest.raises(ValueError, match="max_processes"):
        Worker(settings, handler_modules=[HANDLERS], database=database, max_processes=0)


def test_the_process_limit_follows_the_devices(settings, database):
    def limit(**options):
        return Worker(settings, handler_modules=[HANDLERS], database=database, **options)

    assert limit(device="cpu").process_limit() is None  # gloo: any number of processes
    assert limit(device="cuda:1").process_limit() == 1  # pinned to one GPU
    assert limit(device="cpu", max_processes=3).process_limit() == 3


def test_the_worker_claims_only_its_kinds(settings, database):
    other = enqueue(database, "someone_elses_kind")
    mine = enqueue(database, "test_record")
    assert work(settings, database, drain=True) == 1
    assert job_row(database, other).state is JobState.queued
    assert job_row(database, mine).state is JobState.succeeded


def test_app_and_worker_import_without_torch():
    code = (
        "import sys, app.cli, app.main, trainer.worker, trainer.handlers; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


# --- the job commands ---------------------------------------------------------------------------


def test_job_commands(settings, database, monkeypatch):
    monkeypatch.setenv("PREFLOOP_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("PREFLOOP_ENV", "dev")
    monkeypatch.setenv("PREFLOOP_DATA_DIR", str(settings.data_dir))
    get_settings.cache_clear()
    runner = CliRunner()

    def prefloop(*args: str):
        return runner.invoke(app.cli.cli, list(args), prog_name="prefloop")

    try:
        assert prefloop("job", "list").output.strip() == "no jobs"
        done = enqueue(database, "test_count", {"steps": 2, "sleep": 0.01})
        waiting = enqueue(database, "test_count", {"steps": 2}, priority=-1)
        work(settings, database, once=True)
        listing = prefloop("job", "list").output
        assert f"{done:>6}  test_count" in listing and "succeeded" in listing
        assert "queued" in prefloop("job", "list", "--state", "queued").output
        assert "succeeded" not in prefloop("job", "list", "--state", "queued").output
        shown = prefloop("job", "show", str(done))
        assert shown.exit_code == 0, shown.output
        assert "succeeded" in shown.output and '"resumed_from": 0' in shown.output
        assert "step" in shown.output and "log tail:" in shown.output
        cancelled = prefloop("job", "cancel", str(waiting))
        assert cancelled.exit_code == 0 and f"cancelled job {waiting}" in cancelled.output
        again = prefloop("job", "cancel", str(waiting))
        assert again.exit_code == 1 and "nothing to cancel" in again.output
        retried = prefloop("job", "retry", str(waiting))
        assert retried.exit_code == 0 and f"queued job {waiting} again" in retried.output
        assert job_row(database, waiting).state is JobState.queued
        missing = prefloop("job", "show", "999999")
        assert missing.exit_code == 1 and "no job 999999" in missing.output
    finally:
        get_settings.cache_clear()


# --- real worker processes ----------------------------------------------------------------------


def worker_env(settings) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFLOOP_")}
    env.update(
        PREFLOOP_DATABASE_URL=settings.database_url,
        PREFLOOP_ENV="dev",
        PREFLOOP_DATA_DIR=str(settings.data_dir),
        PREFLOOP_LOG_LEVEL="info",
        PREFLOOP_WORKER_HANDLERS=HANDLERS,
        PYTHONPATH=str(ROOT),  # so the worker can import tests.job_handlers
    )
    return env


def start_worker(settings, tmp_path: Path, worker_id: str, *args: str) -> subprocess.Popen:
    command = [
        *PREFLOOP,
        "worker",
        "--worker-id",
        worker_id,
        "--lease-seconds",
        "2",
        "--heartbeat-seconds",
        "0.3",
        "--poll-seconds",
        "0.1",
        *args,
    ]
    return subprocess.Popen(
        command,
        env=worker_env(settings),
        cwd=tmp_path,  # no .env file or ./var of the checkout
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 30) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"worker did not exit:\n{output}") from None
    return output


@pytest.mark.postgres_only
def test_racing_worker_processes_run_each_job_exactly_once(settings, database, tmp_path):
    jobs = [enqueue(database, "test_record", {"sleep": 0.05}) for _ in range(40)]
    workers = [start_worker(settings, tmp_path, f"racer-{i}", "--drain") for i in range(4)]
    outputs = [finish(process, timeout=60) for process in workers]
    assert [process.returncode for process in workers] == [0] * 4, "\n".join(outputs)
    with database.session() as db:
        rows = db.scalars(select(Job).where(Job.id.in_(jobs))).all()
        ran = Counter(db.scalars(select(JobMetric.job_id).where(JobMetric.name == "ran")).all())
    assert {job.state for job in rows} == {JobState.succeeded}
    assert {job.attempt for job in rows} == {1}
    assert ran == Counter(jobs), "a job ran twice, or not at all"
    for job_id in jobs:
        folder = service.job_dir(settings.data_dir, job_id)
        assert sorted(p.name for p in folder.glob("attempt-*")) == ["attempt-1"]
    by_worker = Counter(job.worker_id for job in rows)
    assert len(by_worker) >= 2, f"only one worker got work: {by_worker}"


def test_sigkilled_worker_is_taken_over_and_its_late_finish_refused(settings, database, tmp_path):
    job_id = enqueue(database, "test_count", {"steps": 20, "sleep": 0.05}, max_attempts=3)
    victim = start_worker(settings, tmp_path, "victim")
    wait_for(lambda: checkpoint_step(settings, job_id) >= 3, what="the victim to make progress")
    victim.kill()
    finish(victim)
    killed_at = checkpoint_step(settings, job_id)
    job = job_row(database, job_id)
    assert (job.state, job.worker_id, job.attempt) == (JobState.running, "victim", 1)
    # Nobody can take it over before the lease runs out; then the next claim does.
    wait_for(
        lambda: job_row(database, job_id).lease_expires_at < utcnow(), what="the lease to expire"
    )
    rescuer = start_worker(settings, tmp_path, "rescuer", "--once")
    output = finish(rescuer)
    assert rescuer.returncode == 0, output
    job = job_row(database, job_id)
    assert (job.state, job.attempt, job.worker_id) == (JobState.succeeded, 2, "rescuer"), output
    assert job.result["resumed_from"] == killed_at
    assert [run["worker"] for run in job.result["runs"]] == ["victim", "rescuer"]
    assert job.error is None  # it succeeded; the takeover is in the new attempt's log
    log = (service.attempt_dir(settings.data_dir, job_id, 2) / "log.txt").read_text()
    assert "attempt 1: worker victim stopped heartbeating; taken over by rescuer" in log
    completions = list(service.checkpoint_dir(settings.data_dir, job_id).glob("completed-*"))
    assert [path.name for path in completions] == ["completed-2"]
    # The victim's late writes, under its old attempt number, do not land.
    late = service.Lease(
        job_id=job_id,
        worker_id="victim",
        attempt=1,
        kind="test_count",
        config={},
        campaign_id=None,
        max_attempts=3,
        uncounted_attempts=0,
        lease_expires_at=utcnow(),
    )
    with database.session() as db:
        assert service.heartbeat(db, late) is False
        with pytest.raises(service.LeaseLost):
            service.complete(db, late, {"by": "victim"})
        with pytest.raises(service.LeaseLost):
            service.fail(db, late, "late")
    assert job_row(database, job_id).result["runs"][-1]["worker"] == "rescuer"


def test_sigterm_requeues_and_the_job_completes_from_its_checkpoint(settings, database, tmp_path):
    job_id = enqueue(database, "test_count", {"steps": 20, "sleep": 0.05}, max_attempts=1)
    first = start_worker(settings, tmp_path, "first")
    wait_for(lambda: checkpoint_step(settings, job_id) >= 3, what="the first worker to start")
    first.send_signal(signal.SIGTERM)
    output = finish(first, timeout=10)
    assert first.returncode == 0, output
    with database.session() as db:
        running = db.scalar(select(func.count()).where(Job.state == JobState.running))
    assert running == 0, output
    job = job_row(database, job_id)
    assert (job.state, job.attempt, job.uncounted_attempts) == (JobState.queued, 1, 1), output
    stopped_at = checkpoint_step(settings, job_id)
    assert 3 <= stopped_at < 20
    log = (service.attempt_dir(settings.data_dir, job_id, 1) / "log.txt").read_text()
    assert "stopped: worker shutting down (SIGTERM)" in log
    second = start_worker(settings, tmp_path, "second", "--once")
    output = finish(second)
    assert second.returncode == 0, output
    job = job_row(database, job_id)
    assert (job.state, job.attempt, job.worker_id) == (JobState.succeeded, 2, "second"), output
    assert job.result["resumed_from"] == stopped_at
    assert [(run["from"], run["to"]) for run in job.result["runs"]] == [
        (0, stopped_at),
        (stopped_at, 20),
    ]


def test_an_idle_worker_exits_0_on_sigterm_and_bad_options_are_one_line(settings, tmp_path):
    idle = start_worker(settings, tmp_path, "idle")
    bad = start_worker(settings, tmp_path, "bad", "--once", "--kind", "nope")
    deadline = time.monotonic() + 30
    while "worker idle: kinds" not in (line := idle.stdout.readline()):
        assert line and time.monotonic() < deadline, "the idle worker did not start"
    idle.send_signal(signal.SIGTERM)
    output = finish(idle, timeout=10)
    assert idle.returncode == 0, output
    output = finish(bad)
    assert bad.returncode == 2, output
    assert "error: no handler for job kind nope" in output and "Traceback" not in output
