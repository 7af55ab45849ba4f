"""Job handlers for the worker tests, loaded with `prefloop worker --handlers tests.job_handlers`.

They do real (tiny) work with the same contract as a training job: checkpoint every step into
the shared checkpoint folder, resume from it, stop when asked, and say in their result what
each attempt did, so a test can tell a resumed job from a restarted one.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from trainer.handlers import ConfigError
from trainer.worker import JobContext


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a worker killed mid-write leaves the previous checkpoint intact."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data))
    os.replace(temporary, path)


def count(ctx: JobContext) -> dict[str, Any]:
    """Count to config["steps"], one step per config["sleep"] seconds, resuming a checkpoint.

    The checkpoint holds the step reached and one entry per attempt that ran (from, to);
    a completed run also leaves `completed-<attempt>` so a test can count completions.
    """
    steps = int(ctx.config.get("steps", 5))
    sleep = float(ctx.config.get("sleep", 0.05))
    path = ctx.checkpoint_dir / "state.json"
    state = json.loads(path.read_text()) if path.exists() else {"step": 0, "runs": []}
    start = state["step"]
    ctx.log.info("count: from step %s to %s", start, steps)
    state["runs"].append({"attempt": ctx.attempt, "worker": ctx.worker_id, "from": start})
    step = start
    while step < steps:
        if ctx.should_stop():
            ctx.log.info("count: stopping at step %s (%s)", step, ctx.stop_reason)
            state["runs"][-1]["to"] = step
            _write_json(path, state)
            return {"stopped_at": step}
        time.sleep(sleep)
        step += 1
        state["step"] = step
        state["runs"][-1]["to"] = step
        _write_json(path, state)
        ctx.metric(step, "step", step)
        ctx.report(step / steps, f"step {step}/{steps}")
    (ctx.checkpoint_dir / f"completed-{ctx.attempt}").write_text(ctx.worker_id)
    return {"steps": steps, "resumed_from": start, "attempt": ctx.attempt, "runs": state["runs"]}


def flaky(ctx: JobContext) -> dict[str, Any]:
    """Fail the first config["failures"] attempts, then succeed."""
    failures = int(ctx.config.get("failures", 1))
    tries_file = ctx.checkpoint_dir / "tries"
    tries = int(tries_file.read_text()) + 1 if tries_file.exists() else 1
    tries_file.write_text(str(tries))
    if tries <= failures:
        raise RuntimeError(f"flaky: failing try {tries} of {failures}")
    return {"tries": tries}


def record(ctx: JobContext) -> dict[str, Any]:
    """Take config["sleep"] seconds and log one `ran` metric: one row per execution."""
    time.sleep(float(ctx.config.get("sleep", 0.05)))
    ctx.metric(0, "ran", 1.0)
    (ctx.output_dir / "ran").write_text(ctx.worker_id)
    return {"worker": ctx.worker_id, "pid": os.getpid()}


def stubborn(ctx: JobContext) -> dict[str, Any]:
    """Stop only through check_stop(), which raises JobStopped (the other way to stop)."""
    deadline = time.monotonic() + float(ctx.config.get("seconds", 30))
    while time.monotonic() < deadline:
        ctx.check_stop()
        time.sleep(0.02)
    return {"done": True}


def not_json(ctx: JobContext) -> Any:
    """A result that cannot be stored: the attempt must fail, not crash the worker."""
    return {"value": object()}


def misconfigured(ctx: JobContext) -> dict[str, Any]:
    """A config no attempt can run: a bad spec, or a combination the models refuse."""
    if ctx.config.get("spec"):
        from app.jobs.specs import parse_ppo_spec

        parse_ppo_spec({})  # raises SpecError
    raise ConfigError("value_init='reward' needs the reward model to share the tokenizer")


def device(ctx: JobContext) -> dict[str, Any]:
    """Report the device the worker chose."""
    return {"device": ctx.device}


HANDLERS = {
    "test_count": "tests.job_handlers:count",
    "test_flaky": "tests.job_handlers:flaky",
    "test_record": "tests.job_handlers:record",
    "test_stubborn": "tests.job_handlers:stubborn",
    "test_not_json": not_json,
    "test_misconfigured": misconfigured,
    "test_device": device,
}
