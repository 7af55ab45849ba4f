"""`prefloop worker` and `prefloop job list|show|cancel|retry`.

The worker's code lives in trainer/ and is imported only when `prefloop worker` runs, so the
rest of the command line (and the web server) never loads it, nor torch.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Annotated

import typer
from sqlalchemy.exc import DBAPIError

from app.cli_support import fail, load_settings, open_database
from app.jobs import service
from app.jobs.models import Job, JobState

job_cli = typer.Typer(help="Training jobs: list, show, cancel, retry.", no_args_is_help=True)

JobIdArg = Annotated[int, typer.Argument(help="The job's number (see `prefloop job list`).")]
HANDLERS_ENV = "PREFLOOP_WORKER_HANDLERS"


def worker_command(
    once: Annotated[
        bool, typer.Option("--once", help="Run at most one job, then exit (0 even if none).")
    ] = False,
    drain: Annotated[
        bool, typer.Option("--drain", help="Run jobs until none is ready, then exit.")
    ] = False,
    kind: Annotated[
        list[str] | None,
        typer.Option(
            "--kind", metavar="KIND", help="Only claim this kind (repeatable; default: all known)."
        ),
    ] = None,
    device: Annotated[
        str, typer.Option(metavar="DEVICE", help="auto (cuda if torch sees a GPU), cpu, cuda[:N].")
    ] = "auto",
    worker_id: Annotated[
        str | None, typer.Option(help="This worker's name in the jobs table (default host:pid).")
    ] = None,
    lease_seconds: Annotated[
        float, typer.Option(min=1, help="A claim lasts this long without a heartbeat.")
    ] = service.DEFAULT_LEASE_SECONDS,
    heartbeat_seconds: Annotated[
        float | None,
        typer.Option(help="Seconds between heartbeats (default a quarter of the lease)."),
    ] = None,
    poll_seconds: Annotated[
        float, typer.Option(min=0.05, help="Seconds between looks at an empty queue.")
    ] = 5.0,
    backoff_seconds: Annotated[
        float, typer.Option(min=0, help="First retry delay after a failure; doubles per attempt.")
    ] = service.DEFAULT_BACKOFF_SECONDS,
    max_backoff_seconds: Annotated[
        float, typer.Option(min=0, help="The longest retry delay.")
    ] = service.DEFAULT_MAX_BACKOFF_SECONDS,
    handlers: Annotated[
        list[str] | None,
        typer.Option(
            "--handlers",
            metavar="MODULE",
            help=f"Also load the HANDLERS of this module (repeatable; or {HANDLERS_ENV}=a,b).",
        ),
    ] = None,
    loops: Annotated[
        bool,
        typer.Option(
            "--loops/--no-loops",
            help="Between jobs, move the campaigns' loops along (queue their next steps).",
        ),
    ] = True,
    max_processes: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Claim only jobs that train in at most this many processes "
            "(default: the GPUs this worker sees; no limit on CPU).",
        ),
    ] = None,
) -> None:
    """Run training jobs from the queue until SIGTERM or Ctrl-C (the running job is handed back)."""
    from trainer.handlers import HandlerError
    from trainer.worker import run_worker

    settings = load_settings()
    open_database(settings).dispose()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    modules = list(handlers or [])
    modules += [
        name.strip() for name in os.environ.get(HANDLERS_ENV, "").split(",") if name.strip()
    ]
    try:
        run_worker(
            settings,
            worker_id,
            once=once,
            drain=drain,
            kinds=kind or None,
            device=device,
            poll_interval=poll_seconds,
            lease_seconds=lease_seconds,
            heartbeat_seconds=heartbeat_seconds,
            handler_modules=modules,
            backoff_seconds=backoff_seconds,
            max_backoff_seconds=max_backoff_seconds,
            loop_ticks=loops,
            max_processes=max_processes,
        )
    except (HandlerError, ValueError) as exc:
        fail(str(exc), 2)
    except DBAPIError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        fail(f"the database stopped answering: {reason}")


def _when(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _counted(job: Job) -> str:
    return f"{job.attempt - job.uncounted_attempts}/{job.max_attempts}"


@job_cli.command("list")
def job_list(
    state: Annotated[
        list[JobState] | None, typer.Option(help="Only jobs in this state (repeatable).")
    ] = None,
    kind: Annotated[str | None, typer.Option(help="Only jobs of this kind.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first.")] = 50,
) -> None:
    """List jobs, newest first: state, attempts counted of the most, progress, worker."""
    database = open_database(load_settings())
    with database.session() as session:
        jobs = service.list_jobs(session, states=state, kind=kind, limit=limit)
        if not jobs:
            typer.echo("no jobs")
            return
        typer.echo(
            f"{'ID':>6}  {'KIND':<16} {'STATE':<10} {'TRIES':<6} {'PRIO':>4} {'DONE':>5}  "
            f"{'WORKER':<24} CREATED (UTC)"
        )
        for job in jobs:
            state_text = job.state.value + ("*" if job.cancel_requested else "")
            typer.echo(
                f"{job.id:>6}  {job.kind:<16} {state_text:<10} {_counted(job):<6} "
                f"{job.priority:>4} {job.progress:>5.0%}  {(job.worker_id or '-'):<24} "
                f"{_when(job.created_at)}"
            )
        if any(job.cancel_requested for job in jobs):
            typer.echo("* cancel requested: stops at its worker's next heartbeat")
    database.dispose()


@job_cli.command("show")
def job_show(job_id: JobIdArg) -> None:
    """Show one job: state, attempts, timing, config, result or error, metrics, log tail."""
    settings = load_settings()
    database = open_database(settings)
    with database.session() as session:
        job = service.get(session, job_id)
        if job is None:
            fail(f"no job {job_id}")
        state = job.state.value + (" (cancel requested)" if job.cancel_requested else "")
        rows = [
            ("kind", job.kind),
            ("state", state),
            ("attempt", f"{job.attempt} ({_counted(job)} counted toward max_attempts)"),
            ("priority", str(job.priority)),
            ("campaign", str(job.campaign_id) if job.campaign_id else "-"),
            ("progress", f"{job.progress:.0%} {job.progress_message}".rstrip()),
            ("worker", job.worker_id or "-"),
            ("created", _when(job.created_at)),
            ("started", _when(job.started_at)),
            ("heartbeat", _when(job.heartbeat_at)),
            ("lease until", _when(job.lease_expires_at)),
            ("run after", _when(job.run_after)),
            ("finished", _when(job.finished_at)),
            ("folder", str(service.job_dir(settings.data_dir, job.id))),
        ]
        typer.echo(f"job {job.id}")
        for label, value in rows:
            typer.echo(f"  {label:<12} {value}")
        typer.echo(f"  {'config':<12} {json.dumps(job.config, sort_keys=True)}")
        if job.result is not None:
            typer.echo(f"  {'result':<12} {json.dumps(job.result, sort_keys=True)}")
        if job.error:
            typer.echo(f"  {'error':<12} {job.error}")
        latest = service.latest_metrics(session, job.id)
        if latest:
            typer.echo("metrics (latest step):")
            for name, (step, value) in latest.items():
                typer.echo(f"  {name:<24} {value:.6g} at step {step}")
        if job.log_tail:
            typer.echo("log tail:")
            for line in job.log_tail.splitlines():
                typer.echo(f"  {line}")
    database.dispose()


@job_cli.command("cancel")
def job_cancel(job_id: JobIdArg) -> None:
    """Cancel a job: a waiting one at once, a running one at its worker's next heartbeat."""
    database = open_database(load_settings())
    with database.session() as session:
        try:
            job = service.cancel(session, job_id)
        except service.JobError as exc:
            fail(str(exc))
        session.commit()
        if job.state is JobState.cancelled:
            typer.echo(f"cancelled job {job.id}")
        else:
            typer.echo(f"job {job.id} is running: asked its worker to stop")
    database.dispose()


@job_cli.command("retry")
def job_retry(job_id: JobIdArg) -> None:
    """Queue a failed, dead or cancelled job again now, with fresh attempts."""
    database = open_database(load_settings())
    with database.session() as session:
        try:
            job = service.retry(session, job_id)
        except service.JobError as exc:
            fail(str(exc))
        session.commit()
        typer.echo(f"queued job {job.id} again ({job.max_attempts} attempts)")
    database.dispose()
