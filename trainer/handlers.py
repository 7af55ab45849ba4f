"""Which function runs each kind of job: kind -> "module:function", imported only when needed.

Adding a kind is one line here. A handler takes a `trainer.worker.JobContext` and returns a
JSON-serialisable result dict; see trainer/worker.py for the contract (checkpoints, stopping).
Extra handlers come from modules named with `prefloop worker --handlers MODULE` (or
PREFLOOP_WORKER_HANDLERS=mod1,mod2): each defines its own `HANDLERS` dict of the same shape,
whose values may also be the functions themselves.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any

Handler = Callable[[Any], dict[str, Any] | None]

HANDLERS: dict[str, str] = {
    "train_reward": "trainer.reward_job:run",
    "score_reward": "trainer.reward_job:score",
    "generate": "trainer.generate_job:run",
    "ppo": "trainer.ppo_job:run",
    "rloo": "trainer.rloo_job:run",
    "sft": "trainer.sft_job:run",
    "dpo": "trainer.dpo_job:run",
}


class ConfigError(ValueError):
    """A job's config that no attempt can run (a combination the models do not allow): the
    worker fails the job at once instead of retrying it, as it does a SpecError."""


class HandlerError(Exception):
    """A handler module or function cannot be loaded; the message names it."""


def registry(modules: Iterable[str] = ()) -> dict[str, str | Handler]:
    """The built-in handlers plus each module's HANDLERS (later modules win)."""
    handlers: dict[str, str | Handler] = dict(HANDLERS)
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise HandlerError(f"cannot import handler module {name!r}: {exc}") from exc
        extra = getattr(module, "HANDLERS", None)
        if not isinstance(extra, dict):
            raise HandlerError(f"handler module {name!r} has no HANDLERS dict")
        handlers.update(extra)
    return handlers


def resolve(spec: str | Handler) -> Handler:
    """The function for a "module:function" spec (imported now), or the function itself."""
    if callable(spec):
        return spec
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise HandlerError(f"handler {spec!r} is not 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise HandlerError(f"cannot import {module_name!r} for handler {spec!r}: {exc}") from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        raise HandlerError(f"{module_name!r} has no function {function_name!r}")
    return function
