"""The training worker: claim a job, run its handler with a heartbeat, record how it ended.

    prefloop worker                      # run jobs until SIGTERM / Ctrl-C
    prefloop worker --once --kind train_reward --device cuda

One job at a time per process (one process per GPU). The loop:

1. Claim the best ready job of a kind this worker has a handler for (app.jobs.service.claim,
   one UPDATE ... FOR UPDATE SKIP LOCKED statement) and commit: the lease starts.
2. Run the handler in the main thread with a JobContext. A heartbeat thread extends the lease
   every `heartbeat_seconds` (well under `lease_seconds`), sends progress and the log tail,
   and writes the metrics logged since the last beat. A heartbeat that finds a cancel request
   or a lost lease asks the handler to stop.
3. Record the outcome with a fenced write that only lands while this attempt holds the job:
   succeeded (with the result), failed (backoff, or dead when out of attempts), or handed
   back (stopped: queued again uncounted, or cancelled when asked).

The handler contract: `handler(ctx) -> dict` (JSON-serialisable). It should checkpoint into
`ctx.checkpoint_dir` (shared by every attempt of the job, so a requeued or taken-over job
resumes there) and look at `ctx.should_stop()` between steps: once it has said True, the
handler stops by returning (the return value is then ignored and the attempt is handed back,
not failed) or by calling `ctx.check_stop()`, which raises JobStopped. A handler that
finishes without ever seeing a stop succeeds, even if a stop came late. Any other exception
fails the attempt.

SIGTERM or SIGINT sets the stop flag: a running handler checkpoints and returns, the job goes
back to the queue without counting the attempt, and the worker exits 0; nothing stays
`running`. A worker killed outright (SIGKILL, a lost machine) leaves a lease that expires;
the next claim anywhere takes the job over as a new attempt.

torch is imported only if a handler asks for `ctx.device` with device "auto".
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import Database
from app.jobs import service
from app.jobs.specs import SpecError
from app.loop import service as loops
from trainer.handlers import ConfigError, Handler, registry, resolve

log = logging.getLogger("prefloop.worker")

DEFAULT_POLL_SECONDS = 5.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
DEVICES = ("auto", "cpu", "cuda")
FINAL_WRITE_TRIES = 3


class JobStopped(Exception):
    """Raised by JobContext.check_stop(): the attempt stops and is handed back, not failed."""


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def resolve_device(requested: str = "auto") -> str:
    """ "auto": cuda when torch sees a GPU, else cpu (torch imported here, not before)."""
    if requested != "auto":
        return requested
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(requested: str) -> str:
    if requested in DEVICES or (requested.startswith("cuda:") and requested[5:].isdigit()):
        return requested
    raise ValueError(f"device {requested!r}: use auto, cpu, cuda or cuda:N")


class _Attempt:
    """What the handler (main thread) and the heartbeat thread share during one attempt."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.progress: float | None = None
        self.message: str | None = None
        self.pending: list[tuple[int, dict[str, float]]] = []
        self.stop = threading.Event()
        self.stop_reason: str | None = None
        self.stop_seen = False

    def request_stop(self, reason: str) -> None:
        with self.lock:
            if self.stop_reason is None:
                self.stop_reason = reason
        self.stop.set()

    def take(self) -> tuple[float | None, str | None, list[tuple[int, dict[str, float]]]]:
        with self.lock:
            taken = (self.progress, self.message, self.pending)
            self.pending = []
            return taken

    def put_back(self, pending: list[tuple[int, dict[str, float]]]) -> None:
        with self.lock:
            self.pending[:0] = pending


@dataclass
class JobContext:
    """What a handler gets: the job, its folders, and how to report and when to stop."""

    job_id: int
    kind: str
    config: dict[str, Any]
    campaign_id: int | None
    attempt: int  # 1, 2, ...: the attempt-<n> folder; never reused for this job
    worker_id: str
    output_dir: Path  # PREFLOOP_DATA_DIR/jobs/<id>/attempt-<n>/ (log.txt is here)
    checkpoint_dir: Path  # PREFLOOP_DATA_DIR/jobs/<id>/checkpoint/, shared by all attempts
    settings: Settings
    database: Database  # for the handler's own reads and writes (its own sessions and commits)
    log: logging.Logger  # writes to output_dir/log.txt (and the worker's stderr)
    requested_device: str = "auto"
    _attempt: _Attempt = field(default_factory=_Attempt, repr=False)
    _on_complete: list[Callable[[Session], None]] = field(default_factory=list, repr=False)
    _device: str | None = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.output_dir / "log.txt"

    @property
    def device(self) -> str:
        """ "cuda", "cuda:N" or "cpu": the worker's --device, or chosen now when it is "auto"."""
        if self._device is None:
            self._device = resolve_device(self.requested_device)
        return self._device

    def report(self, progress: float, message: str | None = None) -> None:
        """Progress from 0 to 1 and a short status line, sent with the next heartbeat."""
        with self._attempt.lock:
            self._attempt.progress = progress
            if message is not None:
                self._attempt.message = message

    def metric(self, step: int, name: str, value: float) -> None:
        """Log one scalar at `step`; written to job_metrics with the next heartbeat."""
        self.metrics(step, {name: value})

    def metrics(self, step: int, values: dict[str, float]) -> None:
        """Log several scalars at `step`."""
        clean = {name: float(value) for name, value in values.items()}
        with self._attempt.lock:
            self._attempt.pending.append((int(step), clean))

    def should_stop(self) -> bool:
        """True once the worker is shutting down, a cancel was requested or the lease was lost:
        checkpoint, then return (or call check_stop())."""
        if self._attempt.stop.is_set():
            self._attempt.stop_seen = True
            return True
        return False

    def stop_pending(self) -> bool:
        """Whether a stop is pending, without taking it: for a watcher (the launcher of a
        multi-process run) that passes it on. The run that then stops calls should_stop() or
        check_stop(); one that finished anyway succeeds, its model kept."""
        return self._attempt.stop.is_set()

    def check_stop(self) -> None:
        """Raise JobStopped if should_stop(); handy between steps deep inside a loop."""
        if self.should_stop():
            raise JobStopped(self._attempt.stop_reason or "stop requested")

    @property
    def stop_reason(self) -> str | None:
        return self._attempt.stop_reason

    def on_complete(self, callback: Callable[[Session], None]) -> None:
        """Run callback(db) in the transaction that marks the job succeeded (e.g. to add the
        ModelVersion it trained): it commits with the success, and never runs if this
        attempt lost the job."""
        self._on_complete.append(callback)


class _Heartbeat(threading.Thread):
    def __init__(
        self,
        database: Database,
        lease: service.Lease,
        attempt: _Attempt,
        *,
        log_path: Path,
        interval: float,
        lease_seconds: float,
    ) -> None:
        super().__init__(name=f"heartbeat-{lease.job_id}", daemon=True)
        self.database = database
        self.lease = lease
        self.attempt = attempt
        self.log_path = log_path
        self.interval = interval
        self.lease_seconds = lease_seconds
        self.done = threading.Event()

    def run(self) -> None:
        last_ok = time.monotonic()
        while not self.done.wait(self.interval):
            try:
                held = self.beat()
                last_ok = time.monotonic()
            except Exception as exc:  # the database may be back at the next beat
                log.warning("job %s: heartbeat failed: %s", self.lease.job_id, exc)
                if time.monotonic() - last_ok > self.lease_seconds:
                    self.attempt.request_stop("lease lost: no heartbeat got through")
                continue
            if not held:
                self.attempt.request_stop("cancel requested or lease lost")

    def beat(self) -> bool:
        progress, message, pending = self.attempt.take()
        try:
            with self.database.session() as db:
                held = service.heartbeat(
                    db,
                    self.lease,
                    lease_seconds=self.lease_seconds,
                    progress=progress,
                    message=message,
                    log_tail=service.read_log_tail(self.log_path),
                )
                if held:
                    _write_metrics(db, self.lease.job_id, pending)
                    pending = []
                db.commit()
        finally:
            if pending:  # not written: they go with the next beat or the final write
                self.attempt.put_back(pending)
        return held

    def stop(self) -> None:
        self.done.set()
        self.join()


def _write_metrics(db: Session, job_id: int, pending: list[tuple[int, dict[str, float]]]) -> None:
    for step, values in pending:
        service.log_metrics(db, job_id, step, values)


def _job_logger(lease: service.Lease, log_path: Path) -> tuple[logging.Logger, logging.Handler]:
    logger = logging.getLogger(f"prefloop.job.{lease.job_id}.{lease.attempt}")
    logger.setLevel(logging.INFO)
    handler = logging.FileHandler(log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger.addHandler(handler)
    return logger, handler


class Worker:
    """One worker process's loop. `run_worker` is the function to call."""

    def __init__(
        self,
        settings: Settings,
        *,
        worker_id: str | None = None,
        kinds: Iterable[str] | None = None,
        handler_modules: Iterable[str] = (),
        device: str = "auto",
        lease_seconds: float = service.DEFAULT_LEASE_SECONDS,
        heartbeat_seconds: float | None = None,
        poll_interval: float = DEFAULT_POLL_SECONDS,
        backoff_seconds: float = service.DEFAULT_BACKOFF_SECONDS,
        max_backoff_seconds: float = service.DEFAULT_MAX_BACKOFF_SECONDS,
        database: Database | None = None,
        loop_ticks: bool = True,
        max_processes: int | None = None,
    ) -> None:
        self.settings = settings
        self.loop_ticks = loop_ticks
        if max_processes is not None and max_processes < 1:
            raise ValueError("max_processes must be at least 1")
        self.max_processes = max_processes
        self.worker_id = worker_id or default_worker_id()
        self.handlers = registry(handler_modules)
        if kinds is None:
            self.kinds = sorted(self.handlers)
        else:
            self.kinds = sorted(set(kinds))
            unknown = [kind for kind in self.kinds if kind not in self.handlers]
            if unknown:
                raise ValueError(
                    f"no handler for job kind {', '.join(unknown)} "
                    f"(known: {', '.join(sorted(self.handlers)) or 'none'})"
                )
        if not self.kinds:
            raise ValueError("no job handlers: add kinds to trainer/handlers.py or --handlers")
        self.device = check_device(device)
        if lease_seconds <= 0:
            raise ValueError("the lease must be longer than 0 seconds")
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = heartbeat_seconds or lease_seconds / 4
        if not 0 < self.heartbeat_seconds <= lease_seconds / 2:
            raise ValueError("the heartbeat interval must be at most half the lease")
        self.poll_interval = poll_interval
        self.backoff_seconds = backoff_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self.database = database or Database(settings.database_url)
        self._owns_database = database is None
        self.stopping = threading.Event()
        self._current: _Attempt | None = None

    # -- signals --

    def request_stop(self, reason: str = "worker shutting down") -> None:
        """What SIGTERM/SIGINT do: stop the running handler (hand the job back) and exit."""
        self.stopping.set()
        current = self._current
        if current is not None:
            current.request_stop(reason)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        log.info("worker %s: %s, stopping", self.worker_id, signal.Signals(signum).name)
        self.request_stop(f"worker shutting down ({signal.Signals(signum).name})")

    # -- the loop --

    def run(self, *, once: bool = False, drain: bool = False, install_signals: bool = True) -> int:
        """Claim and run jobs until stopped. `once`: at most one job; `drain`: until no job is
        ready. Returns how many attempts ran."""
        previous: dict[int, Any] = {}
        if install_signals and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous[signum] = signal.signal(signum, self._on_signal)
        log.info(
            "worker %s: kinds %s, device %s, lease %ss, heartbeat %ss",
            self.worker_id,
            ",".join(self.kinds),
            self.device,
            self.lease_seconds,
            self.heartbeat_seconds,
        )
        ran = 0
        try:
            while not self.stopping.is_set():
                self.tick_loops()
                try:
                    lease = self.claim()
                except DBAPIError as exc:
                    if once or drain:
                        raise
                    log.warning("worker %s: claim failed: %s", self.worker_id, exc)
                    self.stopping.wait(self.poll_interval)
                    continue
                if lease is None:
                    if once or drain:
                        break
                    self.stopping.wait(self.poll_interval)
                    continue
                self.run_attempt(lease)
                ran += 1
                if once:
                    self.tick_loops()  # a loop step that just finished queues the next one
                    break
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if self._owns_database:
                self.database.dispose()
        return ran

    def tick_loops(self) -> list[Any]:
        """Move the campaigns' loops along (`app.loop.service.tick`): queue the next step of
        an iteration whose job finished, or start one when enough new labels arrived. A
        failure is logged and tried again at the next tick; it never stops the worker."""
        if not self.loop_ticks:
            return []
        try:
            with self.database.session() as db:
                steps = loops.tick(db)
                db.commit()
        except Exception as exc:  # a loop's trouble must not stop the worker
            log.warning("worker %s: loop tick failed: %s", self.worker_id, exc)
            return []
        for step in steps:
            log.info("loop %s: %s (job %s) %s", step.loop_id, step.action, step.job_id, step.detail)
        return steps

    def process_limit(self) -> int | None:
        """The most processes a job this worker claims may train in: as given, else the GPUs
        it sees (one when pinned to cuda:N); no limit on CPU (gloo runs any number)."""
        if self.max_processes is None:
            device = resolve_device(self.device)
            if device == "cuda":
                import torch

                self.max_processes = max(1, torch.cuda.device_count())
            elif device.startswith("cuda:"):
                self.max_processes = 1
            else:
                return None
        return self.max_processes

    def claim(self) -> service.Lease | None:
        with self.database.session() as db:
            lease = service.claim(
                db,
                worker_id=self.worker_id,
                kinds=self.kinds,
                lease_seconds=self.lease_seconds,
                max_processes=self.process_limit(),
            )
            db.commit()
        return lease

    def run_attempt(self, lease: service.Lease) -> str:
        """Run one claimed attempt to its end; returns how it ended (a word for logs and tests)."""
        data_dir = self.settings.data_dir
        output_dir = service.attempt_dir(data_dir, lease.job_id, lease.attempt)
        checkpoint = service.checkpoint_dir(data_dir, lease.job_id)
        log_path = output_dir / "log.txt"
        attempt = _Attempt()
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            checkpoint.mkdir(parents=True, exist_ok=True)
            job_log, file_handler = _job_logger(lease, log_path)
        except OSError as exc:  # a full or read-only disk: fail the attempt, keep the worker
            log.error("job %s: cannot set up %s: %s", lease.job_id, output_dir, exc)
            error = f"cannot set up the job folder {output_dir}: {exc}"
            return self._record(lease, None, attempt, "failed", None, error, log_path)
        ctx = JobContext(
            job_id=lease.job_id,
            kind=lease.kind,
            config=lease.config,
            campaign_id=lease.campaign_id,
            attempt=lease.attempt,
            worker_id=self.worker_id,
            output_dir=output_dir,
            checkpoint_dir=checkpoint,
            settings=self.settings,
            database=self.database,
            log=job_log,
            requested_device=self.device,
            _attempt=attempt,
        )
        self._current = attempt
        if self.stopping.is_set():  # a signal between the claim and here
            attempt.request_stop("worker shutting down")
        job_log.info(
            "job %s (%s) attempt %s (%s of %s counted) on worker %s, device %s",
            lease.job_id,
            lease.kind,
            lease.attempt,
            lease.counted_attempt,
            lease.max_attempts,
            self.worker_id,
            self.device,
        )
        if lease.previous_error:
            job_log.info("the previous attempt ended with: %s", lease.previous_error)
        heartbeat = _Heartbeat(
            self.database,
            lease,
            attempt,
            log_path=log_path,
            interval=self.heartbeat_seconds,
            lease_seconds=self.lease_seconds,
        )
        heartbeat.start()
        outcome: str
        result: dict[str, Any] | None = None
        error: str | None = None
        try:
            handler = resolve(self.handlers[lease.kind])
            result = _run_handler(handler, ctx)
            if attempt.stop_seen:
                outcome = "stopped"
                job_log.info("stopped: %s", attempt.stop_reason)
            else:
                outcome = "succeeded"
                job_log.info("succeeded")
        except JobStopped:
            outcome = "stopped"
            job_log.info("stopped: %s", attempt.stop_reason)
        except (SpecError, ConfigError) as exc:  # another attempt would fail alike
            outcome = "refused"
            error = f"{type(exc).__name__}: {exc}"
            job_log.error("failed, not to be retried (its config): %s", error)
        except Exception as exc:
            outcome = "failed"
            error = f"{type(exc).__name__}: {exc}"
            job_log.error("failed: %s\n%s", error, traceback.format_exc().rstrip())
        finally:
            heartbeat.stop()
            self._current = None
            file_handler.close()
            job_log.removeHandler(file_handler)
        return self._record(lease, ctx, attempt, outcome, result, error, log_path)

    def _record(
        self,
        lease: service.Lease,
        ctx: JobContext | None,
        attempt: _Attempt,
        outcome: str,
        result: dict[str, Any] | None,
        error: str | None,
        log_path: Path,
    ) -> str:
        """The attempt's one fenced final write, with the metrics not yet sent.

        A success whose on_complete callback raises becomes a failure. A database that does
        not answer is tried a few times; after that the lease runs out and another worker
        takes the job over.
        """
        _, _, pending = attempt.take()
        for try_number in range(1, FINAL_WRITE_TRIES + 1):
            tail = service.read_log_tail(log_path)
            try:
                state = self._write_outcome(lease, ctx, outcome, result, error, pending, tail)
            except service.LeaseLost as exc:
                log.warning("%s; its outcome (%s) is dropped", exc, outcome)
                return "lease_lost"
            except DBAPIError as exc:
                log.warning("job %s: recording the outcome failed: %s", lease.job_id, exc)
                if try_number == FINAL_WRITE_TRIES:
                    return "unrecorded"
                time.sleep(min(self.heartbeat_seconds, 5.0))
                continue
            except Exception as exc:
                if outcome != "succeeded":
                    raise
                outcome, error = "failed", f"on_complete: {type(exc).__name__}: {exc}"
                log.error("job %s: %s\n%s", lease.job_id, error, traceback.format_exc())
                continue
            log.info("job %s attempt %s: %s -> %s", lease.job_id, lease.attempt, outcome, state)
            return state
        return "unrecorded"

    def _write_outcome(
        self,
        lease: service.Lease,
        ctx: JobContext | None,
        outcome: str,
        result: dict[str, Any] | None,
        error: str | None,
        pending: list[tuple[int, dict[str, float]]],
        tail: str,
    ) -> str:
        with self.database.session() as db:
            if outcome == "succeeded":
                job = service.complete(db, lease, result, log_tail=tail)
                for callback in ctx._on_complete if ctx else ():
                    callback(db)
            elif outcome in ("failed", "refused"):
                job = service.fail(
                    db,
                    lease,
                    error or "failed",
                    log_tail=tail,
                    backoff_seconds=self.backoff_seconds,
                    max_backoff_seconds=self.max_backoff_seconds,
                    retry=outcome == "failed",
                )
            else:
                job = service.release(db, lease, log_tail=tail)
            _write_metrics(db, lease.job_id, pending)
            state = job.state.value
            db.commit()
        return state


def _run_handler(handler: Handler, ctx: JobContext) -> dict[str, Any]:
    result = handler(ctx)
    if result is None:
        result = {}
    if not isinstance(result, dict):
        raise TypeError(f"the handler returned {type(result).__name__}, not a dict")
    json.dumps(result)  # fails here, as the attempt's error, rather than at commit
    return result


def run_worker(
    settings: Settings,
    worker_id: str | None = None,
    *,
    once: bool = False,
    drain: bool = False,
    kinds: Iterable[str] | None = None,
    device: str = "auto",
    poll_interval: float = DEFAULT_POLL_SECONDS,
    lease_seconds: float = service.DEFAULT_LEASE_SECONDS,
    heartbeat_seconds: float | None = None,
    handler_modules: Iterable[str] = (),
    backoff_seconds: float = service.DEFAULT_BACKOFF_SECONDS,
    max_backoff_seconds: float = service.DEFAULT_MAX_BACKOFF_SECONDS,
    database: Database | None = None,
    install_signals: bool = True,
    loop_ticks: bool = True,
    max_processes: int | None = None,
) -> int:
    """Run a worker until SIGTERM/SIGINT (or one job with `once`, or until the queue has no
    ready job with `drain`). Returns how many attempts it ran."""
    worker = Worker(
        settings,
        worker_id=worker_id,
        kinds=kinds,
        handler_modules=handler_modules,
        device=device,
        lease_seconds=lease_seconds,
        heartbeat_seconds=heartbeat_seconds,
        poll_interval=poll_interval,
        backoff_seconds=backoff_seconds,
        max_backoff_seconds=max_backoff_seconds,
        database=database,
        loop_ticks=loop_ticks,
        max_processes=max_processes,
    )
    return worker.run(once=once, drain=drain, install_signals=install_signals)
