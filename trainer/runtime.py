"""What every trainer here shares: the loop's hyperparameters (`TrainingConfig`), seeding, RNG
state, device and autocast, AdamW with its warmup schedule, and resumable checkpoints (written
atomically, refused when they belong to another run). Used by `trainer.reward`, `trainer.sft`,
`trainer.dpo` and `trainer.ppo`."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

SCHEDULES = ("cosine", "linear")


@dataclass
class TrainingConfig:
    """The loop's hyperparameters, the same in every supervised trainer here (reward model, SFT,
    DPO): batches, AdamW, precision, and when to log, evaluate and checkpoint. Each trainer's
    config adds its own fields and restates those whose default or meaning is its own."""

    model_name_or_path: str = field(
        metadata={"help": "The model to train: a local directory or hub id."}
    )
    batch_size: int = field(default=8, metadata={"help": "Examples per forward pass."})
    grad_accumulation_steps: int = field(
        default=1, metadata={"help": "Forward passes per optimizer step."}
    )
    learning_rate: float = field(default=1e-5, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW weight decay (not applied to biases and norms)."}
    )
    warmup_ratio: float = field(
        default=0.03, metadata={"help": "Share of steps of linear warmup before the decay."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    epochs: int = field(default=1, metadata={"help": "Passes over the data."})
    seed: int = field(default=42, metadata={"help": "Seeds torch, random, numpy and data order."})
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 autocast; None = on when CUDA supports it."}
    )
    group_by_length: bool = field(
        default=True,
        metadata={"help": "Batch examples of similar length together (less padding)."},
    )
    length_group_size: int = field(
        default=50,
        metadata={"help": "Batches per megabatch that is sorted by length before batching."},
    )
    eval_every: int = field(
        default=0, metadata={"help": "Evaluate every N optimizer steps; 0 = per epoch only."}
    )
    eval_batch_size: int = field(default=16, metadata={"help": "Examples per eval pass."})
    logging_steps: int = field(
        default=10, metadata={"help": "Report train/* metrics every N optimizer steps."}
    )
    save_every: int = field(
        default=0,
        metadata={"help": "Write a resumable checkpoint every N steps; 0 = only on stop."},
    )

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.grad_accumulation_steps < 1 or self.epochs < 1:
            raise ValueError("batch_size, grad_accumulation_steps and epochs must be >= 1")

    # What the training loop does after optimizer step `done` (counted from 1).
    def logs_at(self, done: int, total_steps: int) -> bool:
        return done % self.logging_steps == 0 or done == total_steps

    def evaluates_within_epoch_at(self, done: int, steps_per_epoch: int) -> bool:
        """`eval_every`'s evaluations; the one at an epoch's end is the loop's own."""
        return bool(self.eval_every) and done % self.eval_every == 0 and done % steps_per_epoch != 0

    def checkpoints_at(self, done: int, total_steps: int) -> bool:
        """The last step saves the model itself, not a checkpoint."""
        return bool(self.save_every) and done % self.save_every == 0 and done < total_steps


def check_schedule(schedule: str) -> None:
    """A config's `lr_scheduler` must be one `lr_schedule` knows."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_scheduler must be 'cosine' or 'linear', not {schedule!r}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict[str, Any]:
    """Every generator's state, so a resumed run draws what the uninterrupted one would."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def autocast(device: torch.device, bf16: bool) -> AbstractContextManager[Any]:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def resolve_device(device: str | torch.device | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Decay matrices only, as HF Trainer does: biases and norm gains stay free.
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def lr_schedule(
    optimizer: torch.optim.Optimizer, schedule: str, warmup_ratio: float, total_steps: int
) -> Any:
    """Linear warmup over `warmup_ratio` of the steps, then "linear" or "cosine" decay to 0
    (transformers' schedules, as HF Trainer and TRL use them)."""
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    make = (
        get_cosine_schedule_with_warmup if schedule == "cosine" else get_linear_schedule_with_warmup
    )
    return make(optimizer, math.ceil(warmup_ratio * total_steps), total_steps)


def adamw_with_schedule(
    model: nn.Module, config: TrainingConfig, total_steps: int, schedule: str = "linear"
) -> tuple[torch.optim.Optimizer, Any]:
    """(AdamW at the config's peak learning rate, its warmup-then-decay schedule)."""
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.learning_rate)
    return optimizer, lr_schedule(optimizer, schedule, config.warmup_ratio, total_steps)


def json_safe(value: Any) -> Any:
    """NaN (no eval data, no gold) as null: strict JSON readers reject NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return value


def precision(config: Any, device: torch.device) -> tuple[bool, bool]:
    """(bf16 autocast, gradient checkpointing): the config's, or on with CUDA where it says
    None (bf16 only where the GPU supports it)."""
    cuda = device.type == "cuda"
    bf16 = config.bf16 if config.bf16 is not None else (cuda and torch.cuda.is_bf16_supported())
    checkpointing = config.gradient_checkpointing
    return bf16, checkpointing if checkpointing is not None else cuda


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)`, then the temporary file on disk and renamed over `path`: a crash or a
    power cut mid-write keeps the previous file whole, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with tmp.open("rb") as written:
        os.fsync(written.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself
    finally:
        os.close(directory)


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    write_atomically(path, lambda tmp: torch.save(state, tmp))


def save_on_main(dist: Any, path: Path, state: Callable[[], dict[str, Any]]) -> None:
    """`write_checkpoint(path, state())` on rank 0 (`dist`: trainer.distributed.Distributed),
    every rank waiting until it is written; one process: just the write."""
    with dist.main_writes() as main:
        if main:
            write_checkpoint(path, state())


def load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint of this run (same fingerprint), or None when there is none; a
    checkpoint of another config or data is refused rather than half-applied."""
    if not path.exists():
        return None
    # Our own file, written by write_checkpoint; it holds RNG states, not only tensors.
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["fingerprint"] != fingerprint:
        raise ValueError(
            f"{path} belongs to a run with another config or data; delete it to start over"
        )
    return state
