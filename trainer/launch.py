"""Run one training function in N data-parallel processes from the worker, as one job.

    result = run_in_processes(ctx, "trainer.reward:train", 2, (config, train, held_out, out),
                              {"gold_groups": gold}, on_progress=report)

The worker has read the data from the database; the training function and its arguments go
to the attempt's folder (`<attempt>/launch/payload.pkl`), and

    python -m accelerate.commands.launch --multi_gpu --num_processes N --num_machines 1 \\
        --mixed_precision no --dynamo_backend no --main_process_port P \\
        -m trainer.launched <attempt>/launch

starts the ranks (trainer/launched.py); `sharding="fsdp"` (in the payload) makes them shard
the model with FSDP2 instead of replicating it (trainer/distributed.py). `--multi_gpu` is accelerate's launcher that starts N
local processes through torch elastic, on CPU too (the ranks pick gloo or nccl themselves
from the worker's device); `--cpu` would start a single process, since accelerate runs
several CPU processes only through mpirun. Every rank sees the GPUs the worker sees and takes
the one of its local rank: pin a worker's GPUs with CUDA_VISIBLE_DEVICES.

While the ranks train, the worker tails rank 0's `events.jsonl` into `on_metric` /
`on_progress` (the job's metrics and progress), turns a stop request into a `STOP` file (the
ranks checkpoint at the same step and exit), and reads the function's return value from
`result.pkl`. The ranks' output goes to `launch/launch.log`; a launch that fails raises
LaunchError with its tail. The launcher dies with the worker (PR_SET_PDEATHSIG, and its own
session so a terminal's Ctrl-C reaches only the worker), the ranks die with the launcher, and
they stop by themselves once the worker's process is gone.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from trainer.launched import (
    DONE,
    ERRORS,
    EVENTS,
    PAYLOAD,
    PR_SET_PDEATHSIG,
    RESULT,
    SHARDINGS,
    STOP,
    WORKER_PID_ENV,
    done_file,
)

ROOT = Path(__file__).resolve().parent.parent
LOG_FILE = "launch.log"
LOG_TAIL_LINES = 40
POLL_SECONDS = 0.2
STOP_GRACE_SECONDS = 600.0  # after a stop request, how long the ranks get to checkpoint
MAX_PROCESSES = 64


class LaunchError(RuntimeError):
    """The processes did not finish: their exit status and the end of their log."""


def free_port() -> int:
    """A TCP port nobody listens on now, for the ranks' rendezvous (one per launch, so two
    jobs on one machine do not collide on accelerate's default 29500)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(processes: int, run_dir: Path, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",  # the trainers do their own bf16 autocast
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        "-m",
        "trainer.launched",
        str(run_dir),
    ]


def device_kind(device: str, processes: int) -> str:
    """ "cpu" or "cuda" for the ranks; refuses what N processes cannot run on."""
    if device == "cpu":
        return "cpu"
    if device != "cuda":
        raise ValueError(
            f"a {processes}-process job needs the worker's device to be cpu or cuda, not "
            f"{device!r}: choose the worker's GPUs with CUDA_VISIBLE_DEVICES instead of cuda:N"
        )
    import torch

    if torch.cuda.device_count() < processes:
        raise ValueError(
            f"the job asks for {processes} processes, one per GPU, but this worker sees "
            f"{torch.cuda.device_count()} GPU(s)"
        )
    return "cuda"


def _die_with_worker() -> Callable[[], None]:
    """A preexec_fn that makes the child get SIGKILL when the worker thread that starts it
    exits. prctl is looked up here, before the fork: the child only calls it."""
    if not sys.platform.startswith("linux"):
        return lambda: None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return preexec


class _Tail:
    """New complete lines of a file that another process appends to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def lines(self) -> list[str]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        *complete, self.partial = (self.partial + chunk).split(b"\n")
        return [line.decode("utf-8") for line in complete if line.strip()]


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return "(no output)"
    return "\n".join(text.splitlines()[-lines:])


def _rank_errors(run_dir: Path) -> str:
    """The first failed rank's exception line and traceback, or "" when no rank wrote one."""
    files = sorted(run_dir.glob(ERRORS))
    if not files:
        return ""
    text = files[0].read_text(encoding="utf-8", errors="replace").rstrip()
    rank = files[0].stem.removeprefix("error-rank")
    return f": rank {rank}: {text.splitlines()[-1]}\n{text}\n"


def _end(process: subprocess.Popen[bytes]) -> None:
    """Stop the launcher and every rank (they share its process group)."""
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            continue


def launch(
    target: str,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    *,
    processes: int,
    device: str,
    run_dir: Path,
    on_metric: Callable[[int, str, float], None] = lambda step, name, value: None,
    on_progress: Callable[[float, str], None] = lambda fraction, message: None,
    should_stop: Callable[[], bool] = lambda: False,
    log: logging.Logger | None = None,
    stop_grace_seconds: float = STOP_GRACE_SECONDS,
    sharding: str = "none",
) -> Any:
    """`target(*args, **kwargs)` ("module:function") in `processes` ranks; returns rank 0's
    return value. `device`: the worker's, "cpu" or "cuda"; `sharding`: "none" (DDP) or
    "fsdp" (FSDP2: the model's weights split over the ranks; trainer/distributed.py)."""
    if not 2 <= processes <= MAX_PROCESSES:
        raise ValueError(f"processes must be 2..{MAX_PROCESSES}, not {processes}")
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, not {sharding!r}")
    kind = device_kind(device, processes)
    log = log or logging.getLogger("prefloop.launch")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stale_files = (p.name for pattern in (ERRORS, DONE) for p in run_dir.glob(pattern))
    for stale in (STOP, RESULT, EVENTS, *stale_files):
        (run_dir / stale).unlink(missing_ok=True)
    payload = {
        "target": target,
        "args": tuple(args),
        "kwargs": kwargs,
        "device": kind,
        "sharding": sharding,
    }
    (run_dir / PAYLOAD).write_bytes(pickle.dumps(payload))

    command = launch_command(processes, run_dir, free_port())
    env = dict(os.environ)
    env[WORKER_PID_ENV] = str(os.getpid())
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    log_path = run_dir / LOG_FILE
    log.info(
        "launching %s processes (%s, sharding %s): %s", processes, kind, sharding, " ".join(command)
    )
    events = _Tail(run_dir / EVENTS)
    stop_asked_at: float | None = None

    def forward_events() -> None:
        for line in events.lines():
            event = json.loads(line)
            if "metric" in event:
                on_metric(*event["metric"])
            elif "progress" in event:
                on_progress(*event["progress"])

    with log_path.open("ab") as output:
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            command,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_worker(),  # prctl only, looked up before the fork
        )
        try:
            while process.poll() is None:
                forward_events()
                if stop_asked_at is None and should_stop():
                    (run_dir / STOP).touch()
                    stop_asked_at = time.monotonic()
                    log.info("stop requested: the %s processes checkpoint and exit", processes)
                elif (
                    stop_asked_at is not None
                    and time.monotonic() - stop_asked_at > stop_grace_seconds
                ):
                    log.warning("the processes did not stop in %ss: killed", stop_grace_seconds)
                    _end(process)
                    break
                time.sleep(POLL_SECONDS)
            forward_events()
        finally:
            _end(process)
    code = process.returncode
    result_path = run_dir / RESULT
    finished = result_path.exists() and all(
        done_file(run_dir, rank).exists() for rank in range(processes)
    )
    if code != 0 and finished:
        # Every rank's training function returned and rank 0's result is written: a rank
        # that died as the processes shut down took nothing with it.
        log.warning(
            "the %s processes finished their training but exited with status %s as they shut "
            "down; the end of %s:\n%s",
            processes,
            code,
            log_path,
            log_tail(log_path),
        )
    elif code != 0 or not result_path.exists():
        raise LaunchError(
            f"the {processes}-process training exited with status {code}"
            f"{'' if result_path.exists() else ' and no result'}{_rank_errors(run_dir)}; "
            f"the end of {log_path}:\n{log_tail(log_path)}"
        )
    return pickle.loads(result_path.read_bytes())  # noqa: S301 - written by our own ranks


def run_in_processes(
    ctx: Any,
    target: str,
    processes: int,
    args: Sequence[Any],
    kwargs: dict[str, Any] | None = None,
    *,
    on_progress: Callable[[float, str], None] | None = None,
    sharding: str = "none",
) -> Any:
    """`launch` for a job handler (ctx: trainer.worker.JobContext): the ranks' metrics are
    the job's, the job's stop request stops them, and a launch that ended because of a stop
    is handed back (JobStopped) rather than failed."""
    try:
        return launch(
            target,
            args,
            kwargs or {},
            processes=processes,
            device=ctx.device,
            run_dir=Path(ctx.output_dir) / "launch",
            on_metric=ctx.metric,
            on_progress=on_progress or ctx.report,
            # Passed on to the ranks, not taken: ranks that had finished when it came end
            # the run normally, and the handler publishes their model.
            should_stop=ctx.stop_pending,
            log=ctx.log,
            sharding=sharding,
        )
    except LaunchError:
        ctx.check_stop()
        raise
