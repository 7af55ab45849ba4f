"""What each process of a multi-process training run executes (started by trainer/launch.py).

    accelerate launch --multi_gpu --num_processes 2 -m trainer.launched RUN_DIR

RUN_DIR holds `payload.pkl`, written by the worker: the trainer to call ("module:function",
e.g. "trainer.reward:train"), its arguments, the device kind and the sharding ("none": DDP,
"fsdp": FSDP2). Every rank calls
`function(*args, **kwargs, dist=..., on_metric=..., on_progress=..., should_stop=...)`; the
function must accept those keywords (the `train` of trainer.reward, trainer.sft,
trainer.dpo, trainer.ppo and trainer.rloo do). Rank 0 appends its metrics and progress to
`events.jsonl` for the worker to forward, and writes the function's return value to
`result.pkl`; each rank whose function returned leaves `done-rank<r>`, so that a rank dying
as the processes shut down (a communication library's threads at interpreter exit) does not
fail a run whose work is all done and saved. A `STOP` file (the worker's stop request), or the
worker's death, stops every rank at the same step: they checkpoint and exit.

Each rank dies with its launcher (PR_SET_PDEATHSIG) and also stops when the worker process
(PREFLOOP_WORKER_PID) is gone, so no training process outlives the job's worker.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

PAYLOAD = "payload.pkl"
EVENTS = "events.jsonl"
RESULT = "result.pkl"
STOP = "STOP"
WORKER_PID_ENV = "PREFLOOP_WORKER_PID"
PR_SET_PDEATHSIG = 1
SHARDINGS = ("none", "fsdp")  # DDP, or FSDP2 (trainer/distributed.py)


def die_with_parent(signum: int = signal.SIGKILL) -> None:
    """Linux: the kernel sends `signum` to this process when its parent exits."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)


def alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, someone else's
        return True
    return True


def resolve(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


class Events:
    """Rank 0's metrics and progress as JSON lines, one write (and flush) per event."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("a", encoding="utf-8")

    def write(self, event: dict[str, Any]) -> None:
        self.file.write(json.dumps(event) + "\n")
        self.file.flush()

    def metric(self, step: int, name: str, value: float) -> None:
        self.write({"metric": [int(step), name, float(value)]})

    def progress(self, fraction: float, message: str) -> None:
        self.write({"progress": [float(fraction), message]})

    def close(self) -> None:
        self.file.close()


def stop_check(stop_file: Path, worker_pid: int | None) -> Callable[[], bool]:
    """When a rank checkpoints and stops: the worker asked (the STOP file), the worker is
    gone, or the rank itself got SIGTERM (a service manager that signals every process of
    the unit, not only the worker)."""
    terminated = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: terminated.set())

    def should_stop() -> bool:
        return terminated.is_set() or stop_file.exists() or not alive(worker_pid)

    return should_stop


def main(run_dir: Path) -> int:
    die_with_parent()
    payload = pickle.loads((run_dir / PAYLOAD).read_bytes())  # noqa: S301 - our worker's file
    train = resolve(payload["target"])
    worker_pid = int(os.environ[WORKER_PID_ENV]) if WORKER_PID_ENV in os.environ else None
    from trainer.distributed import init

    dist = init(payload["device"], payload.get("sharding", "none"))
    should_stop = stop_check(run_dir / STOP, worker_pid)

    events = Events(run_dir / EVENTS) if dist.is_main else None
    try:
        result = train(
            *payload["args"],
            **payload["kwargs"],
            dist=dist,
            on_metric=events.metric if events else lambda step, name, value: None,
            on_progress=events.progress if events else lambda fraction, message: None,
            should_stop=should_stop,
        )
        if dist.is_main:
            tmp = run_dir / (RESULT + ".tmp")
            tmp.write_bytes(pickle.dumps(result))
            os.replace(tmp, run_dir / RESULT)
        done_file(run_dir, dist.rank).touch()
        dist.barrier()  # from here on, a rank that dies at exit takes nothing with it
    finally:
        if events:
            events.close()
        dist.close()
    return 0


ERRORS = "error-rank*.txt"  # one per failed rank
DONE = "done-rank*"  # one per rank whose training function returned


def done_file(run_dir: Path, rank: int) -> Path:
    return run_dir / f"done-rank{rank}"


def error_file(run_dir: Path, rank: int | str) -> Path:
    return run_dir / f"error-rank{rank}.txt"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m trainer.launched RUN_DIR")
    run_dir = Path(sys.argv[1])
    try:
        sys.exit(main(run_dir))
    except Exception:
        # The rank's own traceback, for the worker's error message (torch elastic's summary
        # names only the exit codes).
        error_file(run_dir, os.environ.get("RANK", "0")).write_text(traceback.format_exc())
        raise
