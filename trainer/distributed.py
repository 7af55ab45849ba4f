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
local rank).

Sharded (`sharding="fsdp"`, the job spec's `"sharding": "fsdp"`, for a model that does not fit
one GPU): PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`) on every transformer block
(the classes in the model's `_no_split_modules`, else the entries of its ModuleLists), then
on the root, so each rank keeps 1/world_size of the weights, gradients and AdamW moments and
gathers one block at a time for its forward and backward. The same loss shares and the same
`backward` (FSDP2 also averages the gradients over ranks) give the one-process gradient;
with accumulation each micro-batch's gradients are reduce-scattered into the shards at once
(`no_sync` does nothing: deferring would hold full gradients), and clipping takes the norm
over the shards (`clip_grad_norm`). Every forward needs every rank, so under FSDP all ranks
evaluate (the same batches; rank 0 reports and writes; `evaluates`). Checkpoints gather the
full model and optimizer states to rank 0's CPU (`torch.distributed.checkpoint.state_dict`)
and keep the one-process format (the optimizer's states keyed by parameter index), so a
checkpoint of one process resumes sharded and the other way around. The trainers build the
optimizer after `wrap`, on the shards, and load a checkpoint into both after it
(`load_model_state`, `load_optimizer_state`: rank 0's copy is broadcast, each rank keeps its
shards). PPO and RLOO shard several models on one mesh: the trained ones through `wrap`, the
frozen reference through `shard_frozen`; their checkpoints gather each the same way
(trainer/rollout.py's RunCheckpoint). accelerate's own FSDP and DeepSpeed configurations are
not read: a launch whose accelerate configuration asks for one is refused (`init`), not
half-applied.

One process (`SINGLE`, the default everywhere) makes every helper the identity, so the
one-process path is the code it always was.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist
from torch import nn

from trainer.launched import SHARDINGS
from trainer.runtime import rng_state, set_rng_state

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
    sharding: str = "none"  # "fsdp": FSDP2 instead of DDP (see the module's docstring)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """The model's weights are split over the ranks (FSDP2)."""
        return self.active and self.sharding == "fsdp"

    @property
    def evaluates(self) -> bool:
        """Does this rank run the evaluation forwards: rank 0 alone, or every rank under FSDP
        (each forward gathers the weights from all of them); only rank 0 reports."""
        return self.is_main or self.sharded

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
        """DistributedDataParallel around `model` (it broadcasts rank 0's weights now); under
        FSDP `model` itself, sharded in place (build the optimizer after this); one process:
        `model` itself."""
        if not self.active:
            return model
        if self.sharded:
            return shard_model(model, self.device, self.world_size)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def shard_frozen(self, model: nn.Module | None) -> nn.Module | None:
        """A frozen model (a reference, no gradients): under FSDP sharded in place like a
        trained one, so it too holds 1/world_size of its weights on each rank and gathers
        one block at a time; otherwise (DDP, one process) the replica itself."""
        if model is None or not self.sharded:
            return model
        return shard_model(model, self.device, self.world_size)

    def no_sync(self, model: nn.Module, sync: bool) -> Any:
        """Inside it, backward accumulates gradients without the all-reduce: for every
        micro-batch of an optimizer step but the last (`sync=False`). Under FSDP nothing:
        every micro-batch's gradients are reduce-scattered into the shards at once, since
        deferring it (`set_requires_gradient_sync(False)`) would hold every parameter's full
        gradient on every GPU until the step's last micro-batch."""
        if self.sharded:
            return nullcontext()
        if self.active and not sync:
            return model.no_sync()
        return nullcontext()

    def clip_grad_norm(
        self, model: nn.Module | Sequence[nn.Parameter], max_norm: float
    ) -> torch.Tensor:
        """`nn.utils.clip_grad_norm_` of the gradients of a model (or of a list of parameters,
        e.g. PPO's policy and value model); their total norm. Under FSDP the norm is taken over
        every rank's shards (TorchTitan's way), the same number on every rank."""
        parameters = list(model.parameters() if isinstance(model, nn.Module) else model)
        if not self.sharded:
            return nn.utils.clip_grad_norm_(parameters, max_norm)
        from torch.distributed.tensor import DTensor

        params = [p for p in parameters if p.grad is not None]
        total = nn.utils.get_total_norm([p.grad for p in params], 2.0)
        if isinstance(total, DTensor):
            total = total.full_tensor()  # the shards' partial norms, reduced
        nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    # -- checkpoints: one-process states whatever the mode --

    def model_state(self, model: nn.Module) -> dict[str, Any]:
        """`model.state_dict()`. Under FSDP the full weights gathered to rank 0's CPU (every
        rank must call it; the others get {})."""
        if not self.sharded:
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_full_state_options())

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """`optimizer.state_dict()`. Under FSDP the full states gathered to rank 0's CPU and
        keyed by parameter index as in one process (every rank must call it)."""
        if not self.sharded or not optimizer.state:
            # No step yet: nothing is sharded, and torch's helper would take a zero step to
            # make states (AdamW's step count would then be off by one).
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        full = get_optimizer_state_dict(model, optimizer, options=_full_state_options())
        if not self.is_main:
            return {}
        names = [name for group in full["param_groups"] for name in group["params"]]
        index = {name: i for i, name in enumerate(names)}
        return {
            "state": {index[name]: value for name, value in full["state"].items()},
            "param_groups": [
                {**group, "params": [index[name] for name in group["params"]]}
                for group in full["param_groups"]
            ],
        }

    def load_model_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        """`model.load_state_dict(state)` of a full (one-process) state. Under FSDP rank 0's copy
        is broadcast and every rank keeps its shards."""
        if not self.sharded:
            model.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        set_model_state_dict(
            model,
            state if self.is_main else {},
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
        )

    def load_optimizer_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        """`optimizer.load_state_dict(state)` of a one-process (or `optimizer_state`) state.
        Under FSDP rank 0's copy is broadcast and every rank keeps its shards."""
        if not self.sharded or not state["state"]:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        fqn = {id(p): name for name, p in model.named_parameters()}
        names = [fqn[id(p)] for group in optimizer.param_groups for p in group["params"]]
        by_name = {
            "state": {names[i]: value for i, value in state["state"].items()},
            "param_groups": [
                {**group, "params": [names[i] for i in group["params"]]}
                for group in state["param_groups"]
            ],
        }
        set_optimizer_state_dict(
            model,
            optimizer,
            by_name if self.is_main else {},
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
        )

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

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor`, (b,) or (b, R), stacked in rank order on every rank: the
        global batch's (world_size * b, ...) numbers. The ranks' R may differ (each rank's
        responses end where its own longest does): the narrower ones are right-padded with
        zeros, which a mask of the same width marks as padding. Every rank must have b rows.
        One process: `tensor` itself."""
        if not self.active:
            return tensor
        flag = tensor.dtype == torch.bool
        if flag:  # not every backend gathers bools
            tensor = tensor.to(torch.uint8)
        if tensor.dim() == 2:
            width = torch.tensor([tensor.shape[1]], device=tensor.device)
            torch_dist.all_reduce(width, op=torch_dist.ReduceOp.MAX)
            tensor = nn.functional.pad(tensor, (0, int(width.item()) - tensor.shape[1]))
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        torch_dist.all_gather(parts, tensor.contiguous())
        rows = torch.cat(parts)
        return rows.bool() if flag else rows

    def mine(self, rows: int) -> slice:
        """This rank's rows of a `gather_rows` result whose ranks had `rows` rows each."""
        return slice(self.rank * rows, (self.rank + 1) * rows)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any: a stop at the same step everywhere."""
        if not self.active:
            return flag
        tensor = self._tensor([1.0 if flag else 0.0])
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
        return bool(tensor.item())

    def rng_states(self) -> list[dict[str, Any]]:
        """Every rank's RNG states, in rank order, for a checkpoint (a collective: every rank
        calls it). Each rank draws its own dropout masks on its own batches, so a resumed
        run needs each rank's own back to go on exactly."""
        mine = rng_state()
        if not self.active:
            return [mine]
        states: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(states, mine)
        return states

    def restore_rng(self, saved: list[dict[str, Any]] | dict[str, Any]) -> None:
        """This rank's states from `rng_states()`; a checkpoint of another number of
        processes (or one dict, the format before) gives every rank rank 0's."""
        states = saved if isinstance(saved, list) else [saved]
        set_rng_state(states[self.rank] if len(states) == self.world_size else states[0])

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


def _full_state_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one: those of the classes a Hugging Face model names in
    `_no_split_modules` (its decoder layers), else the entries of its ModuleLists."""
    names: set[str] = set()
    for module in model.modules():  # a wrapper (e.g. a scalar head) holds the HF model
        names |= set(getattr(module, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        blocks = [block for m in model.modules() if isinstance(m, nn.ModuleList) for block in m]
    return blocks


@functools.cache
def _mesh(device_type: str, world_size: int) -> Any:
    """One device mesh for every sharded model of the run: PPO clips its policy's and value
    model's gradients together, and DTensors combine only on the same mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world_size,))


def shard_model(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """FSDP2 on each transformer block, then on the root (the embeddings, final norm and head,
    tied or not, in one group): `model` itself, its parameters now DTensor shards on
    `device`. The root of a peft model is the model inside it: its `generate` calls that
    model's forward, not the wrapper's, and the root's gather has to run on every call."""
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh(device.type, world_size)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh)
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    # The root too reshards after its forward (by default it keeps its weights gathered for
    # the backward), so evaluation leaves nothing gathered and the optimizer sees the shards.
    fully_shard(root, mesh=mesh, reshard_after_forward=True)
    return model


SINGLE = Distributed()


def init(device: str = "cpu", sharding: str = "none") -> Distributed:
    """Join the run torch elastic started (gloo on CPU; nccl on CUDA, GPU = local rank), or
    SINGLE when this process is the whole run. `device`: "cpu" or "cuda" (the worker's);
    `sharding`: "none" (DDP) or "fsdp" (FSDP2)."""
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, not {sharding!r}")
    rank, world_size, local_rank = environment()
    if world_size <= 1:
        return SINGLE
    sharded = [name for name in SHARDED_ENV if os.environ.get(name, "").lower() == "true"]
    if sharded:
        raise RuntimeError(
            f"the accelerate configuration asks for {', '.join(sharded)}: prefloop's trainers run "
            'data-parallel (DDP), or FSDP2 when the job says "sharding": "fsdp"; '
            "accelerate's own sharding configurations are not read"
        )
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        name, backend = f"cuda:{local_rank}", "nccl"
    else:
        name, backend = "cpu", "gloo"
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    return Distributed(rank, world_size, local_rank, name, sharding)
