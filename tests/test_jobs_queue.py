"""The job queue service: claim, heartbeat, finish, fencing, backoff, dead, cancel, retry.

Time is passed in (`now=`), so lease expiry and backoff are tested without sleeping.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
from collections import Counter

import pytest
from sqlalchemy import select

from app.audit.models import AuditEvent
from app.db import Database
from app.jobs import service
from app.jobs.models import Job, JobState

T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
LEASE = 60.0


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def fresh(db, job_id: int) -> Job:
    """The row as the database has it now (claims update it behind the session's back)."""
    db.expire_all()
    return db.get_one(Job, job_id)


def queue(db, kind: str = "k", **kwargs) -> Job:
    kwargs.setdefault("now", T0)
    job = service.enqueue(db, kind=kind, config={"n": 1}, **kwargs)
    db.commit()
    return job


def claim(db, worker: str = "w1", *, now: dt.datetime = T0, kinds=None) -> service.Lease | None:
    lease = service.claim(db, worker_id=worker, kinds=kinds, lease_seconds=LEASE, now=now)
    db.commit()
    return lease


def test_enqueue_and_claim_one_job_once(db):
    job = queue(db, priority=0, max_attempts=2)
    assert (job.state, job.attempt, job.run_after) == (JobState.queued, 0, T0)
    lease = claim(db)
    assert lease is not None
    assert (lease.job_id, lease.attempt, lease.kind, lease.config) == (job.id, 1, "k", {"n": 1})
    assert lease.counted_attempt == 1 and lease.max_attempts == 2
    row = fresh(db, job.id)
    assert row.state is JobState.running and row.worker_id == "w1"
    assert row.lease_expires_at == at(LEASE) and row.heartbeat_at == T0 and row.started_at == T0
    assert claim(db, "w2") is None  # held: nobody else gets it


def test_claim_order_run_after_and_kinds(db):
    low = queue(db, priority=0)
    later = queue(db, priority=9, run_after=at(100))
    high = queue(db, priority=5)
    other_kind = queue(db, kind="other", priority=7)
    assert claim(db, kinds=["k"]).job_id == high.id  # best priority that is due, of my kind
    assert claim(db, kinds=["k"]).job_id == low.id
    assert claim(db, kinds=["k"]) is None  # `later` is not due yet
    assert claim(db, kinds=["k"], now=at(100)).job_id == later.id
    assert claim(db, kinds=[]) is None
    assert claim(db, kinds=None).job_id == other_kind.id


def test_a_worker_claims_only_jobs_it_has_devices_for(db):
    four = service.enqueue(db, kind="k", config={"processes": 4}, now=T0, priority=9)
    two = service.enqueue(db, kind="k", config={"processes": 2}, now=T0)
    db.commit()
    assert (four.processes, two.processes) == (4, 2)
    lease = service.claim(db, worker_id="two-gpus", lease_seconds=LEASE, now=T0, max_processes=2)
    assert lease is not None and lease.job_id == two.id  # the 4-process job waits
    assert service.claim(db, worker_id="w", lease_seconds=LEASE, now=T0, max_processes=2) is None
    assert service.claim(db, worker_id="w", lease_seconds=LEASE, now=T0).job_id == four.id
    with pytest.raises(service.JobError, match="processes"):
        service.enqueue(db, kind="k", config={"processes": 0})


def test_heartbeat_extends_lease_and_reports(db):
    job = queue(db)
    lease = claim(db)
    assert service.heartbeat(
        db, lease, lease_seconds=LEASE, progress=0.25, message="step 1", log_tail="a\nb", now=at(30)
    )
    db.commit()
    row = fresh(db, job.id)
    assert row.lease_expires_at == at(30 + LEASE) and row.heartbeat_at == at(30)
    assert (row.progress, row.progress_message, row.log_tail) == (0.25, "step 1", "a\nb")
    # Progress is clamped to the column's range; omitted fields are left alone.
    assert service.heartbeat(db, lease, progress=7, now=at(31))
    db.commit()
    assert (fresh(db, job.id).progress, fresh(db, job.id).progress_message) == (1.0, "step 1")


def test_fencing_refuses_other_workers_and_attempts(db):
    queue(db)
    lease = claim(db)
    impostor = service.Lease(**{**lease.__dict__, "worker_id": "w2"})
    old_attempt = service.Lease(**{**lease.__dict__, "attempt": lease.attempt - 1})
    for wrong in (impostor, old_attempt):
        assert service.heartbeat(db, wrong, now=at(1)) is False
        for finish in (
            lambda lease: service.complete(db, lease, {"x": 1}, now=at(1)),
            lambda lease: service.fail(db, lease, "boom", now=at(1)),
            lambda lease: service.release(db, lease, now=at(1)),
        ):
            with pytest.raises(service.LeaseLost, match="no longer holds"):
                finish(wrong)
    service.complete(db, lease, {"x": 1}, now=at(2))
    db.commit()
    with pytest.raises(service.LeaseLost):  # finishing twice
        service.complete(db, lease, {"x": 2}, now=at(3))
    assert service.heartbeat(db, lease, now=at(3)) is False


def test_complete_records_result(db):
    job = queue(db)
    lease = claim(db)
    service.complete(db, lease, {"accuracy": 0.7}, log_tail="done", now=at(5))
    db.commit()
    row = fresh(db, job.id)
    assert row.state is JobState.succeeded and row.result == {"accuracy": 0.7}
    assert (row.progress, row.finished_at, row.lease_expires_at, row.log_tail) == (
        1.0,
        at(5),
        None,
        "done",
    )


def test_expired_lease_is_taken_over_and_the_old_attempt_is_fenced(db):
    job = queue(db, max_attempts=3)
    first = claim(db, "w1")
    assert claim(db, "w2", now=at(LEASE)) is None  # not expired yet (strictly before)
    second = claim(db, "w2", now=at(LEASE + 1))
    assert second is not None and (second.job_id, second.attempt) == (job.id, 2)
    assert second.counted_attempt == 2  # a lost attempt counts
    row = fresh(db, job.id)
    assert row.worker_id == "w2" and "attempt 1: worker w1 stopped heartbeating" in row.error
    # The first worker wakes up: nothing it writes lands.
    assert service.heartbeat(db, first, now=at(LEASE + 2)) is False
    with pytest.raises(service.LeaseLost):
        service.complete(db, first, {"by": "w1"}, now=at(LEASE + 2))
    service.complete(db, second, {"by": "w2"}, now=at(LEASE + 3))
    db.commit()
    assert fresh(db, job.id).result == {"by": "w2"}


def test_expired_lease_without_attempts_left_goes_dead(db):
    job = queue(db, max_attempts=1)
    claim(db)
    assert claim(db, "w2", now=at(LEASE + 1)) is None
    row = fresh(db, job.id)
    assert row.state is JobState.dead and row.finished_at == at(LEASE + 1)
    assert "stopped heartbeating" in row.error and "no attempts left" in row.error


def test_expired_lease_with_cancel_requested_is_cancelled_not_rerun(db):
    job = queue(db)
    claim(db)
    service.cancel(db, job.id, now=at(1))
    db.commit()
    assert claim(db, "w2", now=at(LEASE + 1)) is None
    assert fresh(db, job.id).state is JobState.cancelled


def test_failure_backs_off_then_goes_dead(db):
    job = queue(db, max_attempts=3)
    rng = random.Random(1)
    now = T0
    for attempt in (1, 2):
        lease = claim(db, now=now)
        assert lease.attempt == attempt
        failed = service.fail(
            db, lease, "CUDA OOM", backoff_seconds=10, max_backoff_seconds=1000, rng=rng, now=now
        )
        db.commit()
        assert failed.state is JobState.failed and failed.error == f"attempt {attempt}: CUDA OOM"
        full = 10 * 2 ** (attempt - 1)  # 10 s, then 20 s, jittered to between half and all
        assert now + dt.timedelta(seconds=full / 2) <= failed.run_after
        assert failed.run_after <= now + dt.timedelta(seconds=full)
        assert claim(db, now=failed.run_after - dt.timedelta(seconds=0.001)) is None
        now = failed.run_after
    lease = claim(db, now=now)
    assert lease.attempt == 3
    dead = service.fail(db, lease, "still OOM", now=now)
    db.commit()
    assert dead.state is JobState.dead and dead.finished_at == now
    assert claim(db, now=now + dt.timedelta(days=1)) is None
    assert fresh(db, job.id).error == "attempt 3: still OOM"


def test_backoff_delay_doubles_is_capped_and_jittered():
    class Fixed(random.Random):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.value = value

        def random(self) -> float:
            return self.value

    top, bottom = Fixed(0.999999), Fixed(0.0)
    delays = [service.backoff_delay(n, base=30, cap=3600, rng=top) for n in range(1, 10)]
    assert [round(d) for d in delays] == [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert service.backoff_delay(3, base=30, cap=3600, rng=bottom) == 60  # half of 120
    assert service.backoff_delay(1, base=0, cap=3600) == 0


def test_release_on_shutdown_requeues_without_counting(db):
    job = queue(db, max_attempts=1)
    for attempt in (1, 2, 3):  # shut down three times: never dead with max_attempts=1
        lease = claim(db, now=at(attempt))
        assert (lease.attempt, lease.counted_attempt) == (attempt, 1)
        released = service.release(db, lease, log_tail="bye", now=at(attempt))
        db.commit()
        assert released.state is JobState.queued and released.run_after == at(attempt)
        assert released.lease_expires_at is None and released.log_tail == "bye"
    row = fresh(db, job.id)
    assert (row.attempt, row.uncounted_attempts) == (3, 3)
    lease = claim(db, now=at(10))
    service.fail(db, lease, "boom", now=at(10))  # the one counted attempt
    db.commit()
    assert fresh(db, job.id).state is JobState.dead


def test_cancel_waiting_running_and_finished_jobs(db):
    waiting = queue(db)
    cancelled = service.cancel(db, waiting.id, actor_id=None, now=at(1))
    db.commit()
    assert cancelled.state is JobState.cancelled and cancelled.finished_at == at(1)

    running = queue(db)
    lease = claim(db, now=at(2))
    asked = service.cancel(db, running.id, now=at(3))
    db.commit()
    assert asked.state is JobState.running and asked.cancel_requested
    assert service.cancel(db, running.id, now=at(3)).cancel_requested  # asking again is fine
    # The worker learns at its next heartbeat (the lease is still extended to stop cleanly).
    assert service.heartbeat(db, lease, now=at(4)) is False
    db.commit()
    assert fresh(db, running.id).lease_expires_at == at(4 + LEASE)
    assert service.release(db, lease, now=at(5)).state is JobState.cancelled
    db.commit()

    done = queue(db)
    service.complete(db, claim(db, now=at(6)), {}, now=at(6))
    db.commit()
    with pytest.raises(service.InvalidTransition, match="succeeded"):
        service.cancel(db, done.id)
    with pytest.raises(service.JobNotFound):
        service.cancel(db, 10**9)
    actions = db.scalars(select(AuditEvent.action).where(AuditEvent.entity_type == "job")).all()
    assert actions.count("job.cancel") == 2


def test_failure_while_cancel_requested_ends_cancelled(db):
    job = queue(db)
    lease = claim(db)
    service.cancel(db, job.id, now=at(1))
    assert service.fail(db, lease, "interrupted", now=at(2)).state is JobState.cancelled


def test_failed_job_is_cancelled_at_once(db):
    job = queue(db)
    service.fail(db, claim(db), "boom", now=T0)
    db.commit()
    assert service.cancel(db, job.id, now=at(1)).state is JobState.cancelled


def test_retry_gives_fresh_attempts_and_keeps_the_fence(db):
    job = queue(db, max_attempts=1)
    old = claim(db)
    service.fail(db, old, "boom", now=T0)
    db.commit()
    assert fresh(db, job.id).state is JobState.dead
    retried = service.retry(db, job.id, now=at(10))
    db.commit()
    assert retried.state is JobState.queued and retried.run_after == at(10)
    assert (retried.attempt, retried.uncounted_attempts, retried.finished_at) == (1, 1, None)
    lease = claim(db, now=at(10))
    assert (lease.attempt, lease.counted_attempt) == (2, 1)  # attempt 2, the first counted
    assert service.heartbeat(db, old, now=at(11)) is False  # attempt 1 stays fenced out
    for state_job in (lease,):
        with pytest.raises(service.InvalidTransition, match="running"):
            service.retry(db, state_job.job_id)
    service.complete(db, lease, {"ok": True}, now=at(12))
    db.commit()
    with pytest.raises(service.InvalidTransition, match="succeeded"):
        service.retry(db, job.id)
    queued = queue(db)
    with pytest.raises(service.InvalidTransition, match="queued"):
        service.retry(db, queued.id)
    cancelled = queue(db)
    service.cancel(db, cancelled.id)
    assert service.retry(db, cancelled.id).state is JobState.queued
    assert db.scalar(select(AuditEvent.action).where(AuditEvent.action == "job.retry"))


def test_metrics_and_latest_metrics(db):
    job = queue(db)
    for step in range(3):
        service.log_metrics(db, job.id, step, {"loss": 1.0 / (step + 1), "acc": 0.5 + step / 10})
    db.commit()
    assert [m.value for m in service.metrics(db, job.id, name="loss")] == [1.0, 0.5, 1 / 3]
    assert len(service.metrics(db, job.id)) == 6
    latest = service.latest_metrics(db, job.id)
    assert latest == {"acc": (2, pytest.approx(0.7)), "loss": (2, pytest.approx(1 / 3))}


def test_paths_and_log_tail(tmp_path):
    assert service.attempt_dir(tmp_path, 7, 2) == tmp_path / "jobs" / "7" / "attempt-2"
    assert service.checkpoint_dir(tmp_path, 7) == tmp_path / "jobs" / "7" / "checkpoint"
    log = tmp_path / "log.txt"
    assert service.read_log_tail(log) == ""
    log.write_text("".join(f"line {i}\n" for i in range(200)))
    tail = service.read_log_tail(log, lines=3)
    assert tail == "line 197\nline 198\nline 199"
    assert len(service.read_log_tail(log, lines=1000, max_chars=50)) == 50


def test_enqueue_validates(db):
    with pytest.raises(service.JobError, match="kind"):
        service.enqueue(db, kind="")
    with pytest.raises(service.JobError, match="max_attempts"):
        service.enqueue(db, kind="k", max_attempts=0)


def test_list_jobs_filters(db):
    a = queue(db, kind="a")
    b = queue(db, kind="b")
    service.cancel(db, b.id)
    db.commit()
    assert [job.id for job in service.list_jobs(db)][:2] == [b.id, a.id]
    assert [job.id for job in service.list_jobs(db, states=[JobState.cancelled])] == [b.id]
    assert [job.id for job in service.list_jobs(db, kind="a")] == [a.id]


@pytest.mark.postgres_only
def test_racing_claims_take_each_job_once(fresh_database_url):
    """Threads with their own connections claim at once: SKIP LOCKED hands out each job once."""
    database = Database(fresh_database_url)
    with database.session() as db:
        ids = [service.enqueue(db, kind="k", priority=i % 3).id for i in range(60)]
        db.commit()
    claimed: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def worker(name: str) -> None:
        try:
            start.wait()
            while True:
                with database.session() as db:
                    lease = service.claim(db, worker_id=name, kinds=["k"])
                    db.commit()
                if lease is None:
                    return
                claimed.append(lease.job_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == [] and not any(thread.is_alive() for thread in threads)
    assert Counter(claimed) == Counter(ids)
    database.dispose()
