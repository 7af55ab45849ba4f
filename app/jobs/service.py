"""The job queue: enqueue, claim, heartbeat, finish, cancel and retry training jobs.

A worker claims one job in one statement, `UPDATE jobs ... WHERE id = (SELECT id ... ORDER BY
priority DESC, id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING ...`: on PostgreSQL concurrent
workers skip each other's rows instead of waiting; SQLite serializes writers (BEGIN IMMEDIATE),
which makes the same statement correct without the locking clause.

A claim is a lease: the worker must heartbeat before `lease_expires_at`, or the next claim
takes the job over as a new attempt (a SIGKILLed worker, a lost machine). `attempt` only goes
up, so (job id, worker id, attempt) fences every later write: a worker whose lease was taken
over cannot heartbeat, finish or fail the newer attempt (`LeaseLost`).

States: queued -> running -> succeeded; running -> failed (waiting out a backoff, claimed
again once `run_after` passes) or dead (out of attempts); running -> queued when a worker
shuts down (SIGTERM), without counting the attempt; cancelled from queued or failed at once,
and from running at the worker's next heartbeat. An admin's retry puts a failed, dead or
cancelled job back in the queue with its attempts fresh.

Services flush; the caller (request, CLI command or worker) owns the transaction.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import String, and_, case, cast, false, func, or_, select, update
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.db import utcnow
from app.jobs.models import Job, JobMetric, JobState

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_LEASE_SECONDS = 60.0
DEFAULT_BACKOFF_SECONDS = 30.0
DEFAULT_MAX_BACKOFF_SECONDS = 3600.0
LOG_TAIL_LINES = 50
LOG_TAIL_CHARS = 8000
MESSAGE_CHARS = 2000
ERROR_CHARS = 20_000

# Waiting to be claimed once run_after has passed: new, or failed and backing off.
READY_STATES = (JobState.queued, JobState.failed)
RETRYABLE_STATES = (JobState.failed, JobState.dead, JobState.cancelled)
FINISHED_STATES = (JobState.succeeded, JobState.dead, JobState.cancelled)


class JobError(Exception):
    """A job operation that cannot be done; the message says why."""


class JobNotFound(JobError):
    pass


class InvalidTransition(JobError):
    """The job is not in a state the operation applies to (cancel a finished job, ...)."""


class LeaseLost(JobError):
    """This worker's attempt no longer holds the job: the lease was taken over or ended."""

    def __init__(self, lease: Lease) -> None:
        super().__init__(
            f"job {lease.job_id}: attempt {lease.attempt} of worker {lease.worker_id!r} "
            "no longer holds the job (its lease expired and was taken over, or it ended)"
        )
        self.lease = lease


@dataclass(frozen=True)
class Lease:
    """What a claim hands the worker: the job and the fence its later writes carry."""

    job_id: int
    worker_id: str
    attempt: int  # 1 for the first attempt; never reused for the same job
    kind: str
    config: dict[str, Any]
    campaign_id: int | None
    max_attempts: int
    uncounted_attempts: int
    lease_expires_at: dt.datetime
    previous_error: str | None = None  # why the last attempt ended, if it failed or was lost

    @property
    def counted_attempt(self) -> int:
        """Which attempt this is toward max_attempts (shutdowns and pre-retry runs excluded)."""
        return self.attempt - self.uncounted_attempts


# --- paths --------------------------------------------------------------------------------------


def job_dir(data_dir: Path, job_id: int) -> Path:
    return Path(data_dir) / "jobs" / str(job_id)


def attempt_dir(data_dir: Path, job_id: int, attempt: int) -> Path:
    """The attempt's own folder: its log.txt and whatever the handler writes there."""
    return job_dir(data_dir, job_id) / f"attempt-{attempt}"


def checkpoint_dir(data_dir: Path, job_id: int) -> Path:
    """Shared by every attempt of the job, so a requeued or taken-over job resumes."""
    return job_dir(data_dir, job_id) / "checkpoint"


def read_log_tail(path: Path, lines: int = LOG_TAIL_LINES, max_chars: int = LOG_TAIL_CHARS) -> str:
    """The last `lines` lines of a log file (at most `max_chars`), or "" when there is none."""
    try:
        with open(path, "rb") as file:
            file.seek(0, 2)
            size = file.tell()
            file.seek(max(0, size - 4 * max_chars))
            data = file.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    tail = "\n".join(data.splitlines()[-lines:])
    return tail[-max_chars:]


# --- enqueue and read ---------------------------------------------------------------------------


def enqueue(
    db: Session,
    *,
    kind: str,
    config: dict[str, Any] | None = None,
    campaign_id: int | None = None,
    created_by_id: int | None = None,
    priority: int = 0,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    run_after: dt.datetime | None = None,
    now: dt.datetime | None = None,
) -> Job:
    """Queue a job of `kind` with its `config`; higher `priority` runs first, then older jobs."""
    if not kind or len(kind) > 32:
        raise JobError("a job kind is 1 to 32 characters")
    if max_attempts < 1:
        raise JobError("max_attempts must be at least 1")
    now = now or utcnow()
    processes = (config or {}).get("processes", 1)
    if not isinstance(processes, int) or processes < 1:
        raise JobError("processes must be a whole number of at least 1")
    job = Job(
        kind=kind,
        config=dict(config or {}),
        processes=processes,
        campaign_id=campaign_id,
        created_by_id=created_by_id,
        priority=priority,
        max_attempts=max_attempts,
        state=JobState.queued,
        attempt=0,
        uncounted_attempts=0,
        run_after=run_after or now,
        progress=0.0,
        progress_message="",
        log_tail="",
        cancel_requested=False,
        created_at=now,
    )
    db.add(job)
    db.flush()
    return job


def get(db: Session, job_id: int) -> Job | None:
    return db.get(Job, job_id)


def get_or_raise(db: Session, job_id: int) -> Job:
    job = db.get(Job, job_id)
    if job is None:
        raise JobNotFound(f"no job {job_id}")
    return job


def list_jobs(
    db: Session,
    *,
    states: list[JobState] | None = None,
    kind: str | None = None,
    campaign_id: int | None = None,
    limit: int = 100,
) -> list[Job]:
    """Jobs, newest first, filtered by state, kind and campaign."""
    query = select(Job).order_by(Job.id.desc()).limit(limit)
    if states:
        query = query.where(Job.state.in_(states))
    if kind:
        query = query.where(Job.kind == kind)
    if campaign_id is not None:
        query = query.where(Job.campaign_id == campaign_id)
    return list(db.scalars(query))


# --- claim --------------------------------------------------------------------------------------


def _claim_statement(
    *,
    kinds: list[str] | None,
    worker_id: str,
    now: dt.datetime,
    lease: float,
    max_processes: int | None = None,
):
    ready = and_(Job.state.in_(READY_STATES), Job.run_after <= now)
    # A running job whose worker stopped heartbeating, with an attempt left and no cancel
    # pending (those two are finished by sweep_expired instead).
    abandoned = and_(
        Job.state == JobState.running,
        Job.lease_expires_at < now,
        Job.attempt - Job.uncounted_attempts < Job.max_attempts,
        Job.cancel_requested.is_(false()),
    )
    pick = select(Job.id).where(or_(ready, abandoned))
    if kinds is not None:
        pick = pick.where(Job.kind.in_(kinds))
    if max_processes is not None:
        pick = pick.where(Job.processes <= max_processes)
    pick = (
        pick.order_by(Job.priority.desc(), Job.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return (
        update(Job)
        .where(Job.id == pick)
        .values(
            state=JobState.running,
            worker_id=worker_id,
            attempt=Job.attempt + 1,
            lease_expires_at=now + dt.timedelta(seconds=lease),
            heartbeat_at=now,
            started_at=now,
            finished_at=None,
            progress=0.0,
            progress_message="",
            log_tail="",
            # Taking over an abandoned attempt: say so where the jobs page shows errors.
            error=case(
                (
                    Job.state == JobState.running,
                    "attempt "
                    + cast(Job.attempt, String)
                    + ": worker "
                    + func.coalesce(Job.worker_id, "?")
                    + " stopped heartbeating; taken over by "
                    + worker_id,
                ),
                else_=Job.error,
            ),
        )
        .returning(
            Job.id,
            Job.attempt,
            Job.kind,
            Job.config,
            Job.campaign_id,
            Job.max_attempts,
            Job.uncounted_attempts,
            Job.lease_expires_at,
            Job.error,
        )
        .execution_options(synchronize_session=False)
    )


def claim(
    db: Session,
    *,
    worker_id: str,
    kinds: list[str] | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    now: dt.datetime | None = None,
    max_processes: int | None = None,
) -> Lease | None:
    """Take the best ready job of one of `kinds` (None: any kind) for `lease_seconds`, or None.
    With `max_processes`, only jobs that train in at most that many processes (a worker with
    two GPUs leaves a four-process job to a worker that has four).

    Ready: queued or failed with run_after passed, or running with an expired lease (taken
    over as a new attempt, which counts toward max_attempts). Commit soon after: the lease
    starts now.
    """
    if kinds is not None and not kinds:
        return None
    now = now or utcnow()
    sweep_expired(db, now=now)
    row = db.execute(
        _claim_statement(
            kinds=kinds,
            worker_id=worker_id,
            now=now,
            lease=lease_seconds,
            max_processes=max_processes,
        )
    ).first()
    if row is None:
        return None
    return Lease(
        job_id=row.id,
        worker_id=worker_id,
        attempt=row.attempt,
        kind=row.kind,
        config=dict(row.config or {}),
        campaign_id=row.campaign_id,
        max_attempts=row.max_attempts,
        uncounted_attempts=row.uncounted_attempts,
        lease_expires_at=row.lease_expires_at,
        previous_error=row.error,
    )


def sweep_expired(db: Session, *, now: dt.datetime | None = None) -> int:
    """Finish abandoned jobs that must not run again: cancel pending -> cancelled, no attempt
    left -> dead. Rows another transaction holds are skipped. Returns how many."""
    now = now or utcnow()
    stale = db.scalars(
        select(Job)
        .where(
            Job.state == JobState.running,
            Job.lease_expires_at < now,
            or_(
                Job.cancel_requested.is_(True),
                Job.attempt - Job.uncounted_attempts >= Job.max_attempts,
            ),
        )
        .order_by(Job.id)
        .with_for_update(skip_locked=True)
        .execution_options(populate_existing=True)
    ).all()
    for job in stale:
        if job.cancel_requested:
            job.state = JobState.cancelled
        else:
            job.state = JobState.dead
            job.error = (
                f"attempt {job.attempt}: the worker {job.worker_id!r} stopped heartbeating "
                f"(lease expired at {job.lease_expires_at:%Y-%m-%d %H:%M:%S} UTC); "
                "no attempts left"
            )
        job.lease_expires_at = None
        job.finished_at = now
    db.flush()
    return len(stale)


# --- while running ------------------------------------------------------------------------------


def _fence(lease: Lease):
    return and_(
        Job.id == lease.job_id,
        Job.worker_id == lease.worker_id,
        Job.attempt == lease.attempt,
        Job.state == JobState.running,
    )


def heartbeat(
    db: Session,
    lease: Lease,
    *,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    progress: float | None = None,
    message: str | None = None,
    log_tail: str | None = None,
    now: dt.datetime | None = None,
) -> bool:
    """Extend the lease and report progress. False: stop, the lease was lost or a cancel was
    requested (the lease is still extended then, so the worker can stop cleanly)."""
    now = now or utcnow()
    values: dict[str, Any] = {
        "lease_expires_at": now + dt.timedelta(seconds=lease_seconds),
        "heartbeat_at": now,
    }
    if progress is not None:
        values["progress"] = min(1.0, max(0.0, float(progress)))
    if message is not None:
        values["progress_message"] = message[:MESSAGE_CHARS]
    if log_tail is not None:
        values["log_tail"] = log_tail[-LOG_TAIL_CHARS:]
    cancel_requested = db.scalar(
        update(Job)
        .where(_fence(lease))
        .values(**values)
        .returning(Job.cancel_requested)
        .execution_options(synchronize_session=False)
    )
    return cancel_requested is False


def log_metrics(
    db: Session,
    job_id: int,
    step: int,
    values: dict[str, float],
    *,
    now: dt.datetime | None = None,
) -> None:
    """Record scalars (loss, accuracy, ...) a job logged at `step`."""
    now = now or utcnow()
    db.add_all(
        JobMetric(job_id=job_id, step=int(step), name=name, value=float(value), created_at=now)
        for name, value in values.items()
    )
    db.flush()


def metrics(db: Session, job_id: int, *, name: str | None = None) -> list[JobMetric]:
    """A job's metrics in step order."""
    query = select(JobMetric).where(JobMetric.job_id == job_id)
    if name is not None:
        query = query.where(JobMetric.name == name)
    return list(db.scalars(query.order_by(JobMetric.name, JobMetric.step, JobMetric.id)))


def latest_metrics(db: Session, job_id: int) -> dict[str, tuple[int, float]]:
    """Each metric's value at its latest step: {name: (step, value)}."""
    latest = (
        select(JobMetric.name, func.max(JobMetric.id).label("id"))
        .where(JobMetric.job_id == job_id)
        .group_by(JobMetric.name)
        .subquery()
    )
    rows = db.execute(
        select(JobMetric.name, JobMetric.step, JobMetric.value)
        .join(latest, latest.c.id == JobMetric.id)
        .order_by(JobMetric.name)
    )
    return {name: (step, value) for name, step, value in rows}


# --- finishing an attempt -----------------------------------------------------------------------


def _held(db: Session, lease: Lease) -> Job:
    """The job row, locked, if this lease still holds it; else LeaseLost."""
    job = db.scalar(
        select(Job).where(_fence(lease)).with_for_update().execution_options(populate_existing=True)
    )
    if job is None:
        raise LeaseLost(lease)
    return job


def _locked(db: Session, job_id: int) -> Job | None:
    """The job row, locked, and read fresh (the session may hold an older copy)."""
    return db.scalar(
        select(Job)
        .where(Job.id == job_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )


def _end_attempt(job: Job, state: JobState, now: dt.datetime, log_tail: str | None) -> None:
    job.state = state
    job.lease_expires_at = None
    job.heartbeat_at = now
    if log_tail is not None:
        job.log_tail = log_tail[-LOG_TAIL_CHARS:]
    if state in FINISHED_STATES:
        job.finished_at = now


def complete(
    db: Session,
    lease: Lease,
    result: dict[str, Any] | None = None,
    *,
    log_tail: str | None = None,
    now: dt.datetime | None = None,
) -> Job:
    """Mark the attempt succeeded with its result. Raises LeaseLost if it no longer holds the job."""
    now = now or utcnow()
    job = _held(db, lease)
    _end_attempt(job, JobState.succeeded, now, log_tail)
    job.result = result if result is not None else {}
    job.progress = 1.0
    job.error = None
    db.flush()
    return job


def backoff_delay(
    counted_attempt: int,
    *,
    base: float = DEFAULT_BACKOFF_SECONDS,
    cap: float = DEFAULT_MAX_BACKOFF_SECONDS,
    rng: random.Random | None = None,
) -> float:
    """Seconds before retrying after the n-th counted attempt failed: base * 2**(n-1), capped,
    then jittered to between half and all of it (so failed jobs do not retry in lockstep)."""
    delay = min(cap, base * 2 ** max(0, counted_attempt - 1))
    return delay * (0.5 + 0.5 * (rng or random).random())


def fail(
    db: Session,
    lease: Lease,
    error: str,
    *,
    log_tail: str | None = None,
    backoff_seconds: float = DEFAULT_BACKOFF_SECONDS,
    max_backoff_seconds: float = DEFAULT_MAX_BACKOFF_SECONDS,
    rng: random.Random | None = None,
    now: dt.datetime | None = None,
    retry: bool = True,
) -> Job:
    """The attempt failed: back off and retry while attempts remain, else dead (a pending cancel
    makes it cancelled); `retry=False` (a config no attempt can run) is dead at once. Raises
    LeaseLost if the attempt no longer holds the job."""
    now = now or utcnow()
    job = _held(db, lease)
    job.error = f"attempt {job.attempt}: {error}"[:ERROR_CHARS]
    counted = job.attempt - job.uncounted_attempts
    if job.cancel_requested:
        _end_attempt(job, JobState.cancelled, now, log_tail)
    elif retry and counted < job.max_attempts:
        _end_attempt(job, JobState.failed, now, log_tail)
        delay = backoff_delay(counted, base=backoff_seconds, cap=max_backoff_seconds, rng=rng)
        job.run_after = now + dt.timedelta(seconds=delay)
    else:
        _end_attempt(job, JobState.dead, now, log_tail)
    db.flush()
    return job


def release(
    db: Session, lease: Lease, *, log_tail: str | None = None, now: dt.datetime | None = None
) -> Job:
    """The worker stopped the attempt without failing (shutdown, or a requested cancel): back to
    the queue at once, the attempt not counted; or cancelled if a cancel was requested.
    Raises LeaseLost if the attempt no longer holds the job."""
    now = now or utcnow()
    job = _held(db, lease)
    if job.cancel_requested:
        _end_attempt(job, JobState.cancelled, now, log_tail)
    else:
        _end_attempt(job, JobState.queued, now, log_tail)
        job.uncounted_attempts += 1
        job.run_after = now
    db.flush()
    return job


# --- admin actions ------------------------------------------------------------------------------


def cancel(
    db: Session, job_id: int, *, actor_id: int | None = None, now: dt.datetime | None = None
) -> Job:
    """Cancel a job: a waiting one at once; a running one is asked to stop at its worker's next
    heartbeat (state stays running with cancel_requested until the worker acknowledges)."""
    now = now or utcnow()
    job = _locked(db, job_id)
    if job is None:
        raise JobNotFound(f"no job {job_id}")
    before = {"state": job.state.value, "cancel_requested": job.cancel_requested}
    if job.state in READY_STATES:
        job.state = JobState.cancelled
        job.finished_at = now
        job.lease_expires_at = None
    elif job.state is JobState.running:
        if job.cancel_requested:
            return job
        job.cancel_requested = True
    else:
        raise InvalidTransition(f"job {job.id} is {job.state.value}; there is nothing to cancel")
    db.flush()
    audit.record(
        db,
        actor_id=actor_id,
        action="job.cancel",
        entity_type="job",
        entity_id=job.id,
        before=before,
        after={"state": job.state.value, "cancel_requested": job.cancel_requested},
    )
    return job


def retry(
    db: Session, job_id: int, *, actor_id: int | None = None, now: dt.datetime | None = None
) -> Job:
    """Put a failed, dead or cancelled job back in the queue now, with all its attempts fresh.

    The attempt number keeps counting (it fences old workers); the earlier attempts stop
    counting toward max_attempts. The checkpoint folder is kept, so the job may resume.
    """
    now = now or utcnow()
    job = _locked(db, job_id)
    if job is None:
        raise JobNotFound(f"no job {job_id}")
    if job.state not in RETRYABLE_STATES:
        raise InvalidTransition(
            f"job {job.id} is {job.state.value}; only failed, dead or cancelled jobs are retried"
        )
    before = {"state": job.state.value, "attempt": job.attempt, "error": job.error}
    job.state = JobState.queued
    job.uncounted_attempts = job.attempt
    job.run_after = now
    job.cancel_requested = False
    job.finished_at = None
    job.lease_expires_at = None
    job.progress = 0.0
    job.progress_message = ""
    db.flush()
    audit.record(
        db,
        actor_id=actor_id,
        action="job.retry",
        entity_type="job",
        entity_id=job.id,
        before=before,
        after={"state": job.state.value},
    )
    return job
