"""Data-parallel training in several processes that gives the result of one process.

`accelerate launch --multi_gpu --num_processes N -m trainer.launched RUN_DIR` (see
trainer/launch.py) starts N copies of a trainer; torch elastic gives each its RANK, WORLD_SIZE
and LOCAL_RANK. A trainer's `train(..., dist=init(device))` then:

1. builds the same model and the same seeded order of global (micro)batches on every rank,
   and gives each rank a slice of each one (`Distributed.shard`);
2. divides every rank's loss by the normaliser of the *global* step (all its examples' weight,
   or all its target tokens), so the ranks' losses add up to the one-process loss, and
   backpropagates world_size x that share (`Distributed.backward`): DDP averages gradients
   over ranks, so the averaged gradient is the one-process gradient. A rank whose slice of a
   short last batch is empty runs a stand-in example with its loss times zero, so every rank
   makes the same collective calls;
3. sums its logged numbers over ranks (`Distributed.sum`) so rank 0 reports the global loss,
   and stops where any rank (or the parent, through a STOP file) asks (`Distributed.any`), at
   the same step on every rank;
4. evaluates, checkpoints and saves on rank 0 only (`is_main`), with barriers around the
   writes. The model and optimizer states are the one-process ones (DDP keeps a full replica
   on every rank), so checkpoints have the same format as a one-process run's.

Plain `torch.nn.parallel.DistributedDataParallel`: gloo on CPU, nccl on CUDA (one GPU per
local rank). Sharded training (FSDP, DeepSpeed) is not implemented: a launch whose
accelerate configuration asks for it is refused (`init`), since a model wrapped that way
needs other forward, clipping and saving code than the trainers have.

One process (`SINGLE`, the default everywhere) makes every helper the identity, so the
one-process path is the code it always was.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist
from torch import nn

T = TypeVar("T")

# What accelerate launch sets when its configuration asks for a sharded strategy.
SHARDED_ENV = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_MEGATRON_LM")
# A rank waiting on rank 0 (evaluating, saving) waits this long before the collective fails.
COLLECTIVE_TIMEOUT = dt.timedelta(hours=2)


def environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torch elastic's variables; (0, 1, 0) without them."""
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank `rank`'s slice of a global batch: every world_size-th item from `rank` on. Slices
    differ in size by at most one; a length-sorted batch gives every rank similar lengths."""
    return list(items[rank::world_size])


def shard_or_stand_in(items: Sequence[T], rank: int, world_size: int) -> tuple[list[T], bool]:
    """(this rank's items, False), or ([the batch's first item], True) when its slice is empty
    (a last batch smaller than world_size): the caller multiplies that item's loss by zero."""
    mine = shard(items, rank, world_size)
    if mine or not items:
        return mine, False
    return [items[0]], True


class Forward(nn.Module):
    """`fn(module, *args)` as a module's forward, so DistributedDataParallel sees the call
    (DDP syncs gradients only of what ran through its own forward). E.g. the reward model's
    last-token pooling: Forward(model, compute_rewards)(input_ids, attention_mask)."""

    def __init__(self, module: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.module = module
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(self.module, *args, **kwargs)


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run, and the few collective operations trainers need."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device_name: str | None = None  # None: the trainer's own device argument decides

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device(self.device_name or "cpu")

    # -- data --

    def shard(self, items: Sequence[T]) -> tuple[list[T], bool]:
        """(this rank's slice of a global batch, is it a zero-weight stand-in); one process:
        (the whole batch, False)."""
        if not self.active:
            return list(items), False
        return shard_or_stand_in(items, self.rank, self.world_size)

    # -- the model --

    def wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel around `model` (it broadcasts rank 0's weights now); one
        process: `model` itself."""
        if not self.active:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def no_sync(self, model: nn.Module, sync: bool) -> Any:
        """Inside it, backward accumulates gradients without the all-reduce: for every
        micro-batch of an optimizer step but the last (`sync=False`)."""
        if self.active and not sync:
            return model.no_sync()
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate this rank's share of the global loss. DDP averages the gradients over
        ranks; the shares sum to the global loss, so scale by world_size."""
        if self.active:
            (loss * self.world_size).backward()
        else:
            loss.backward()

    # -- collectives --

    def _tensor(self, values: Sequence[float]) -> torch.Tensor:
        return torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)

    def sum(self, values: Sequence[Any]) -> list[Any]:
        """Each value summed over ranks (every rank gets the sums); one process: unchanged."""
        if not self.active:
            return list(values)
        tensor = self._tensor(values)
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        return tensor.tolist()

    def sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over ranks element by element, on its own device; one process:
        `tensor` itself. A table each rank fills its own rows of (zeros elsewhere) becomes the
        whole table on every rank."""
        if not self.active:
            return tensor
        total = tensor.to(self.device, copy=True)
        torch_dist.all_reduce(total, op=torch_dist.ReduceOp.SUM)
        return total.to(tensor.device)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any: a stop at the same step everywhere."""
        if not self.active:
            return flag
        tensor = self._tensor([1.0 if flag else 0.0])
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
        return bool(tensor.item())

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()

    @contextmanager
    def main_writes(self) -> Iterator[bool]:
        """`with dist.main_writes() as main: if main: write(...)`: only rank 0 writes, and no
        rank goes on (or exits) before the write is done."""
        try:
            yield self.is_main
        finally:
            self.barrier()

    def close(self) -> None:
        if self.active and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


SINGLE = Distributed()


def init(device: str = "cpu") -> Distributed:
    """Join the run torch elastic started (gloo on CPU; nccl on CUDA, GPU = local rank), or
    SINGLE when this process is the whole run. `device`: "cpu" or "cuda" (the worker's)."""
    rank, world_size, local_rank = environment()
    if world_size <= 1:
        return SINGLE
    sharded = [name for name in SHARDED_ENV if os.environ.get(name, "").lower() == "true"]
    if sharded:
        raise RuntimeError(
            f"the accelerate configuration asks for {', '.join(sharded)}: prefloop's trainers run "
            "data-parallel (DDP) only, so the model must fit one GPU"
        )
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        name, backend = f"cuda:{local_rank}", "nccl"
    else:
        name, backend = "cpu", "gloo"
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    return Distributed(rank, world_size, local_rank, name)
