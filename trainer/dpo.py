"""Direct preference optimisation: the policy learns from the comparisons themselves.

DPO (Rafailov et al., 2023) skips the reward model and the sampling loop of PPO: for each
human comparison of two completions of a prompt, it raises the policy's log-probability of
the chosen one and lowers the rejected one's, each measured against a frozen reference (the
starting policy), through one logistic loss (`trainer.losses.dpo_loss`):

    r(y)  = beta * (log pi(y|x) - log pi_ref(y|x))        the implicit reward
    loss  = -log sigmoid(r(chosen) - r(rejected))

beta is the strength of the pull toward the reference (the KL coefficient of the RLHF
objective DPO solves in closed form). The implicit rewards give the run's health figures:
reward accuracy (the share of pairs with r(chosen) > r(rejected)) and the reward margin.

    from trainer.dpo import DPOConfig, DPOPair, train
    pairs = [DPOPair("Write a haiku", chosen="An old silent pond ...", rejected="Haiku."), ...]
    result = train(DPOConfig(model_name_or_path="path/to/sft"), pairs, held_out,
                   "var/models/dpo-1")
    result.metrics["eval_reward_accuracy"], result.metrics["eval_reward_margin"]

Formatting is SFT's (`trainer.sft.SFTFormatter`, itself the generate job's): the chat template
when the tokenizer has one, else BOS + prompt + completion + EOS; a completion's log-prob is
summed over its own tokens only. Truncation: a pair longer than `max_length` loses the
prompt's start first, the same number of prompt tokens for both completions (so both are
scored in the same context); a completion that does not fit even so loses its end, and the
prompt keeps its last `min_prompt_tokens`. Chosen and rejected go through the model in one
forward pass (one padded batch of 2B rows).

The reference log-probs are computed once, before the first step, by the starting policy
itself: before any update the policy is the reference, so no second copy is held in memory
while training (TRL's `precompute_ref_log_probs`); dropout is off throughout, so the policy
matches them exactly until it moves. They are saved beside the resumable checkpoint, so a
stopped run resumes without recomputing them.

Data-parallel (`dist`, trainer/distributed.py): every rank holds the whole reference table
(each computes every world_size-th pair by length, and the ranks' rows are summed together),
takes its slice of every global batch of `batch_size` pairs, and divides its loss by the pairs
of the whole step, so N processes follow the one-process loss curve; rank 0 evaluates,
checkpoints and saves. Sharded (`dist.sharded`, FSDP2), every rank runs the evaluation and
reference forwards (each needs all of them) and rank 0 still reports and writes.

AdamW with warmup and linear or cosine decay, gradient accumulation (the loss of a step is the
mean over all its pairs), clipping, bf16 autocast and gradient checkpointing on a GPU, seeded
throughout; a stopped run checkpoints weights, optimizer, scheduler and RNG states and resumes
exactly. Nothing here knows about the database: `trainer/dpo_job.py` reads the comparisons.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.data import length_grouped_batches
from trainer.distributed import SINGLE, Distributed, shard
from trainer.generate import Prompt
from trainer.losses import dpo_loss
from trainer.rl_math import logprobs_from_logits
from trainer.rollout import disable_dropout
from trainer.runtime import (
    TrainingConfig,
    adamw_with_schedule,
    autocast,
    check_schedule,
    load_checkpoint,
    precision,
    resolve_device,
    save_on_main,
    seed_everything,
)
from trainer.sft import (
    IGNORE_INDEX,
    EncodedExample,
    SFTBatch,
    SFTFormatter,
    collate,
    fit,
    policy_to_train,
    save_policy,
)

__all__ = [
    "DPOConfig",
    "DPOPair",
    "DPOResult",
    "EncodedPair",
    "completion_logps",
    "encode_pair",
    "forward_pairs",
    "train",
]

META_FILE = "prefloop_dpo.json"
CHECKPOINT_DIR = "checkpoint"
REFERENCE_FILE = "reference_logps.pt"


@dataclass
class DPOConfig(TrainingConfig):
    """Hyperparameters of one DPO run: the loop's (`trainer.runtime.TrainingConfig`: batches,
    AdamW, precision, logging, eval and checkpoint cadence) and these. Defaults are TRL's
    DPOConfig's where it has them."""

    model_name_or_path: str = field(
        metadata={"help": "The policy to optimise (and the reference): a causal LM directory."}
    )
    beta: float = field(
        default=0.1,
        metadata={"help": "Strength of the pull toward the reference; 0.1 in the paper and TRL."},
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "Conservative DPO: the chance a label is flipped, in [0, 0.5)."},
    )
    max_length: int = field(
        default=1024, metadata={"help": "Tokens per prompt + completion (each of the two)."}
    )
    min_prompt_tokens: int = field(
        default=64,
        metadata={"help": "A too-long completion is cut so the prompt keeps this many."},
    )
    batch_size: int = field(
        default=8, metadata={"help": "Pairs per forward pass (2x rows: chosen and rejected)."}
    )
    learning_rate: float = field(
        default=1e-6, metadata={"help": "Peak AdamW learning rate (DPO wants small ones)."}
    )
    warmup_ratio: float = field(
        default=0.1, metadata={"help": "Share of steps of linear warmup before the decay."}
    )
    lr_scheduler: str = field(
        default="linear", metadata={"help": "Decay after warmup: 'linear' (TRL) or 'cosine'."}
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Recompute activations in backward; None = on with CUDA."},
    )
    eval_batch_size: int = field(
        default=16, metadata={"help": "Pairs per pass in eval and for the reference log-probs."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_schedule(self.lr_scheduler)
        if self.max_length < 8:
            raise ValueError("max_length must be at least 8")
        if self.beta <= 0:
            raise ValueError("beta must be positive")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError("label_smoothing must be in [0, 0.5)")


@dataclass
class DPOPair:
    """One comparison: a prompt (text or chat messages) and the preferred of two answers."""

    prompt: Prompt
    chosen: str
    rejected: str
    prompt_key: str = ""  # identity of the prompt, for splits


@dataclass
class EncodedPair:
    """Both completions as token ids after the same prompt (truncated alike)."""

    chosen: EncodedExample
    rejected: EncodedExample

    @property
    def length(self) -> int:
        """The padded width this pair needs."""
        return max(self.chosen.length, self.rejected.length)


@dataclass
class DPOResult:
    """What a run produced. `stopped`: interrupted; call `train` again to resume."""

    output_dir: str
    metrics: dict[str, float]
    stopped: bool = False
    steps: int = 0
    total_steps: int = 0
    reference_reused: bool = False  # the reference log-probs were read from the checkpoint
    history: list[tuple[int, str, float]] = field(default_factory=list)


def encode_pair(formatter: SFTFormatter, pair: DPOPair) -> EncodedPair | None:
    """The pair as token ids, or None when it cannot teach anything (a completion cut to
    nothing, or the two completions' tokens are the same)."""
    prefix, prompt_ids, chosen_ids = formatter.pieces(pair.prompt, pair.chosen)
    _, _, rejected_ids = formatter.pieces(pair.prompt, pair.rejected)
    budget = formatter.max_length - len(prefix)
    # The prompt is cut as for the longer completion, so both are scored after the same tokens.
    longer = max(chosen_ids, rejected_ids, key=len)
    prompt_ids, _ = fit(prompt_ids, longer, budget, formatter.min_prompt_tokens)
    room = budget - len(prompt_ids)
    chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
    if not chosen_ids or not rejected_ids or chosen_ids == rejected_ids:
        return None
    head = prefix + prompt_ids
    return EncodedPair(
        EncodedExample(head + chosen_ids, len(head)),
        EncodedExample(head + rejected_ids, len(head)),
    )


# ---------------------------------------------------------------------------------------
# Log-probabilities of completions


def completion_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log pi(completion | prompt) per row, (N,) float32: logits (N, T, V) at position t
    predict labels (N, T) at t + 1, summed over the target tokens (IGNORE_INDEX elsewhere)."""
    targets = labels[:, 1:]  # (N, T-1)
    mask = targets != IGNORE_INDEX  # (N, T-1)
    logps = logprobs_from_logits(logits[:, :-1], targets.clamp(min=0))  # (N, T-1)
    return logps.masked_fill(~mask, 0.0).sum(-1)  # (N,)


def pair_batch(pairs: Sequence[EncodedPair], pad_token_id: int) -> SFTBatch:
    """The chosen completions then the rejected ones, right-padded together: (2B, T)."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_token_id)


def forward_pairs(
    model: nn.Module,
    pairs: Sequence[EncodedPair],
    pad_token_id: int,
    device: torch.device,
    bf16: bool,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(chosen log-probs (B,), rejected log-probs (B,), real tokens) in one forward pass."""
    batch = pair_batch(pairs, pad_token_id).to(device)
    with autocast(device, bf16):
        logits = model(**batch.model_inputs(), use_cache=False).logits  # (2B, T, V)
    logps = completion_logps(logits, batch.labels)  # (2B,)
    return logps[: len(pairs)], logps[len(pairs) :], batch.num_tokens


@torch.no_grad()
def sequence_logps(
    model: nn.Module,
    pairs: Sequence[EncodedPair],
    pad_token_id: int,
    device: torch.device,
    bf16: bool,
    batch_size: int,
) -> torch.Tensor:
    """(N, 2) log-probs of each pair's chosen and rejected completion, in the pairs' order, on
    the CPU; eval mode (no dropout), batches of similar lengths."""
    was_training = model.training
    model.eval()
    out = torch.zeros(len(pairs), 2)
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].length)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        chosen, rejected, _ = forward_pairs(
            model, [pairs[i] for i in index], pad_token_id, device, bf16
        )
        out[index] = torch.stack([chosen, rejected], dim=1).float().cpu()  # (b, 2)
    model.train(was_training)
    return out


def reference_logps(
    model: nn.Module,
    pairs: Sequence[EncodedPair],
    pad_token_id: int,
    device: torch.device,
    bf16: bool,
    batch_size: int,
    dist: Distributed = SINGLE,
) -> torch.Tensor:
    """`sequence_logps` of every pair (N, 2), the work shared by the ranks: each computes every
    world_size-th pair in length order (the same work for each) and the ranks' rows, zeros
    elsewhere, are summed. One process: the same batches as `sequence_logps` itself. FSDP:
    every forward needs every rank, so each takes its slice of every global batch of
    batch_size x world_size pairs (a stand-in pair, discarded, where its slice is empty)."""
    by_length = sorted(range(len(pairs)), key=lambda i: pairs[i].length)
    table = torch.zeros(len(pairs), 2)
    if dist.sharded:
        width = batch_size * dist.world_size
        for start in range(0, len(by_length), width):
            mine, stand_in = dist.shard(by_length[start : start + width])
            logps = sequence_logps(
                model, [pairs[i] for i in mine], pad_token_id, device, bf16, batch_size
            )
            if not stand_in:
                table[mine] = logps
        return dist.sum_tensor(table)
    mine = shard(by_length, dist.rank, dist.world_size)
    table[mine] = sequence_logps(
        model, [pairs[i] for i in mine], pad_token_id, device, bf16, batch_size
    )
    return dist.sum_tensor(table)


def pair_figures(
    policy: torch.Tensor, reference: torch.Tensor, beta: float, label_smoothing: float
) -> dict[str, float]:
    """Mean loss, implicit rewards, reward accuracy and margin, and log-probs of N >= 1
    pairs whose (N, 2) policy and reference log-probs are given."""
    losses, chosen, rejected = dpo_loss(
        policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], beta, label_smoothing
    )
    return {
        "loss": losses.mean().item(),
        "accuracy": (chosen > rejected).float().mean().item(),
        "margin": (chosen - rejected).mean().item(),
        "chosen": chosen.mean().item(),
        "rejected": rejected.mean().item(),
        "logps_chosen": policy[:, 0].mean().item(),
        "logps_rejected": policy[:, 1].mean().item(),
        "pairs": len(policy),
    }


# ---------------------------------------------------------------------------------------
# Training


def _fingerprint(config: DPOConfig, train_data: Sequence[EncodedPair], eval_data: Any) -> str:
    """Identity of a run: a checkpoint resumes only the same config on the same pairs."""
    digest = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode())
    for name, pairs in (("train", train_data), ("eval", eval_data)):
        for p in pairs:
            record = [name, p.chosen.input_ids, p.rejected.input_ids, p.chosen.prompt_length]
            digest.update(json.dumps(record).encode())
    return digest.hexdigest()


# What a step sums over its pairs (and ranks), and a logging window over its steps.
STEP_SUMS = ("loss", "tokens", "chosen", "rejected", "correct", "logps_chosen", "logps_rejected")
WINDOW_SUMS = (
    "loss",
    "pairs",
    "chosen",
    "rejected",
    "correct",
    "logps_chosen",
    "logps_rejected",
    "tokens",
    "seconds",
)


def window_figures(window: dict[str, float]) -> dict[str, float]:
    """Means over the pairs of a logging window, from its sums."""
    n = max(window["pairs"], 1)
    return {
        "loss": window["loss"] / n,
        "chosen": window["chosen"] / n,
        "rejected": window["rejected"] / n,
        "accuracy": window["correct"] / n,
        "margin": (window["chosen"] - window["rejected"]) / n,
        "logps_chosen": window["logps_chosen"] / n,
        "logps_rejected": window["logps_rejected"] / n,
        "tokens_per_second": window["tokens"] / max(window["seconds"], 1e-9),
    }


def train(
    config: DPOConfig,
    train_pairs: Sequence[DPOPair],
    eval_pairs: Sequence[DPOPair],
    output_dir: str | Path,
    *,
    device: str | torch.device | None = None,
    on_metric: Callable[[int, str, float], None] = lambda step, name, value: None,
    on_progress: Callable[[float, str], None] = lambda fraction, message: None,
    should_stop: Callable[[], bool] = lambda: False,
    dist: Distributed = SINGLE,
) -> DPOResult:
    """Optimise the policy on `train_pairs`, evaluate on `eval_pairs`, save it to output_dir
    (save_pretrained + tokenizer + prefloop_dpo.json).

    `should_stop()` is asked before every optimizer step; when it says True, a resumable
    checkpoint goes to output_dir/checkpoint and the result has stopped=True. Calling `train`
    again with the same arguments resumes it and ends with the same weights.

    `dist` (trainer/distributed.py): one of several data-parallel processes. Each takes its
    slice of every global batch of `batch_size` pairs, and the loss stays the mean over the
    global step's pairs, so the run follows the one-process loss curve; rank 0 evaluates,
    checkpoints and saves."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = dist.device if dist.active else resolve_device(device)
    cuda = device.type == "cuda"
    bf16, checkpointing = precision(config, device)
    history: list[tuple[int, str, float]] = []

    def emit(step: int, name: str, value: float) -> None:
        history.append((step, name, value))
        on_metric(step, name, value)

    # ---- model
    seed_everything(config.seed)
    # FSDP: on the CPU until `wrap` moves each rank's shards to its device
    home = torch.device("cpu") if dist.sharded else device
    model, tokenizer, saved_dtype = policy_to_train(config.model_name_or_path, home, checkpointing)
    # The reference log-probs come from eval mode (no dropout): a policy trained with dropout
    # would be scored against them with noise, a reward margin before it has moved (TRL's
    # DPOConfig.disable_dropout, on by default).
    disable_dropout(model)
    pad_id = tokenizer.pad_token_id

    # ---- data: tokenised once; pairs that cannot teach anything are dropped
    formatter = SFTFormatter(tokenizer, config.max_length, config.min_prompt_tokens)
    encoded = [encode_pair(formatter, p) for p in train_pairs]
    train_data = [p for p in encoded if p is not None]
    eval_encoded = [encode_pair(formatter, p) for p in eval_pairs]
    eval_data = [p for p in eval_encoded if p is not None]
    dropped = len(encoded) - len(train_data) + len(eval_encoded) - len(eval_data)
    if not train_data:
        raise ValueError("no training pairs")
    lengths = [p.length for p in train_data]
    megabatch = config.length_group_size if config.group_by_length else None
    micro_per_epoch = math.ceil(len(train_data) / config.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / config.grad_accumulation_steps)
    total_steps = steps_per_epoch * config.epochs
    fingerprint = _fingerprint(config, train_data, eval_data)
    checkpoint = output_dir / CHECKPOINT_DIR / "state.pt"

    # The model that backpropagates: DDP's wrapper (which also makes every rank start from
    # rank 0's weights), the model sharded in place (FSDP: before the reference pass, whose
    # forwards need the shards), or the model itself in one process.
    forward = dist.wrap(model)

    # ---- the reference: log pi_ref of every pair, once, by the policy before any update
    reference_file = output_dir / CHECKPOINT_DIR / REFERENCE_FILE
    saved_reference = load_checkpoint(reference_file, fingerprint)
    reference_reused = not dist.any(saved_reference is None)  # every rank decides alike
    if reference_reused:
        ref_train, ref_eval = saved_reference["train"], saved_reference["eval"]  # (N, 2), (M, 2)
    else:
        on_progress(0.0, f"reference log-probs of {len(train_data) + len(eval_data)} pairs")
        ref_train, ref_eval = (
            reference_logps(model, data, pad_id, device, bf16, config.eval_batch_size, dist)
            for data in (train_data, eval_data)
        )
        save_on_main(
            dist,
            reference_file,
            lambda: {"fingerprint": fingerprint, "train": ref_train, "eval": ref_eval},
        )

    # ---- optimizer: AdamW, linear warmup then linear or cosine decay (on FSDP's shards)
    optimizer, scheduler = adamw_with_schedule(model, config, total_steps, config.lr_scheduler)

    # ---- resume from a checkpoint of the same run, if there is one
    totals = {"seconds": 0.0, "tokens": 0, "loss_sum": 0.0, "loss_steps": 0}
    last_window: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    done = 0
    state = load_checkpoint(checkpoint, fingerprint)
    if state is not None:
        dist.load_model_state(model, state["model"])
        dist.load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        done, totals = state["step"], state["totals"]
        last_window, last_eval = state["last_window"], state["last_eval"]
        dist.restore_rng(state["rng"])
        on_progress(done / total_steps, f"resumed at step {done}/{total_steps}")
    resumed_from = done

    def save_checkpoint() -> None:
        # every rank: under FSDP the full states are gathered to rank 0
        weights, moments = dist.model_state(model), dist.optimizer_state(model, optimizer)
        rngs = dist.rng_states()  # every rank's, gathered by all of them
        save_on_main(
            dist,
            checkpoint,
            lambda: {
                "fingerprint": fingerprint,
                "model": weights,
                "optimizer": moments,
                "scheduler": scheduler.state_dict(),
                "step": done,
                "totals": totals,
                "last_window": last_window,
                "last_eval": last_eval,
                "rng": rngs,
            },
        )

    def run_eval(step: int) -> dict[str, float]:
        if not eval_data:  # no held-out pairs: nothing to chart
            return {}
        policy = sequence_logps(model, eval_data, pad_id, device, bf16, config.eval_batch_size)
        figures = pair_figures(policy, ref_eval, config.beta, config.label_smoothing)
        emit(step, "eval/loss", figures["loss"])
        for name in ("accuracy", "margin", "chosen", "rejected"):
            emit(step, f"eval/rewards/{name}", figures[name])
        return figures

    # ---- the loop
    model.train()
    window = dict.fromkeys(WINDOW_SUMS, 0.0)
    for epoch in range(config.epochs):
        # The order of epoch e depends only on (seed, e): resuming replays it exactly.
        batches = length_grouped_batches(lengths, config.batch_size, config.seed + epoch, megabatch)
        for step_in_epoch in range(steps_per_epoch):
            if epoch * steps_per_epoch + step_in_epoch < done:
                continue  # done before the checkpoint
            if dist.any(should_stop()):
                save_checkpoint()
                on_progress(done / total_steps, f"stopped at step {done}/{total_steps}")
                return DPOResult(
                    output_dir=str(output_dir),
                    metrics=dict(last_eval),
                    stopped=True,
                    steps=done,
                    total_steps=total_steps,
                    reference_reused=reference_reused,
                    history=history,
                )
            start = step_in_epoch * config.grad_accumulation_steps
            micro = batches[start : start + config.grad_accumulation_steps]
            # One normaliser for the whole (global) optimizer step: the mean over all its
            # pairs, as in one pass over all of them.
            normalizer = sum(len(b) for b in micro)
            began = time.perf_counter()
            sums = dict.fromkeys(STEP_SUMS, 0.0)  # this rank's, summed over ranks below
            for k, global_batch in enumerate(micro):
                indices, stand_in = dist.shard(global_batch)
                ref = ref_train[indices].to(device)  # (B, 2)
                with dist.no_sync(forward, sync=k == len(micro) - 1):
                    chosen, rejected, tokens = forward_pairs(
                        forward, [train_data[i] for i in indices], pad_id, device, bf16
                    )  # (B,), (B,)
                    losses, r_chosen, r_rejected = dpo_loss(
                        chosen, rejected, ref[:, 0], ref[:, 1], config.beta, config.label_smoothing
                    )  # (B,) each
                    loss = losses.sum() / normalizer
                    if stand_in:
                        loss = loss * 0.0
                    dist.backward(loss)
                if stand_in:
                    continue
                sums["loss"] += loss.item()
                sums["tokens"] += tokens
                sums["chosen"] += r_chosen.sum().item()
                sums["rejected"] += r_rejected.sum().item()
                sums["correct"] += (r_chosen > r_rejected).sum().item()
                sums["logps_chosen"] += chosen.detach().sum().item()
                sums["logps_rejected"] += rejected.detach().sum().item()
            sums = dict(zip(STEP_SUMS, dist.sum(list(sums.values())), strict=True))
            step_loss = sums.pop("loss")
            totals["tokens"] += int(sums["tokens"])
            for name, value in sums.items():
                window[name] += value
            grad_norm = dist.clip_grad_norm(model, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()  # honest step times
            seconds = time.perf_counter() - began
            totals["seconds"] += seconds
            totals["loss_sum"] += step_loss
            totals["loss_steps"] += 1
            done += 1
            window["loss"] += step_loss * normalizer
            window["pairs"] += normalizer
            window["seconds"] += seconds

            if config.logs_at(done, total_steps):
                last_window = window_figures(window)
                emit(done, "train/loss", last_window["loss"])
                for name in ("chosen", "rejected", "accuracy", "margin"):
                    emit(done, f"rewards/{name}", last_window[name])
                emit(done, "logps/chosen", last_window["logps_chosen"])
                emit(done, "logps/rejected", last_window["logps_rejected"])
                emit(done, "train/learning_rate", scheduler.get_last_lr()[0])
                emit(done, "train/grad_norm", float(grad_norm))
                emit(done, "train/tokens_per_second", last_window["tokens_per_second"])
                window = dict.fromkeys(WINDOW_SUMS, 0.0)
            on_progress(
                done / total_steps, f"epoch {epoch + 1}/{config.epochs}, step {done}/{total_steps}"
            )
            if config.evaluates_within_epoch_at(done, steps_per_epoch) and dist.evaluates:
                last_eval = run_eval(done)
            if config.checkpoints_at(done, total_steps):
                save_checkpoint()
        # not already evaluated before a stop
        if (epoch + 1) * steps_per_epoch > resumed_from and dist.evaluates:
            last_eval = run_eval(done)

    # ---- finish (rank 0): the policy in plain transformers format, in its checkpoint's dtype
    weights = dist.model_state(model) if dist.sharded else None  # FSDP: gathered to rank 0
    if not dist.is_main:
        dist.barrier()  # until rank 0 has saved
        return DPOResult(str(output_dir), {}, steps=done, total_steps=total_steps)
    nan = float("nan")
    metrics: dict[str, float] = {
        "eval_loss": last_eval.get("loss", nan),
        "eval_reward_accuracy": last_eval.get("accuracy", nan),
        "eval_reward_margin": last_eval.get("margin", nan),
        "eval_rewards_chosen": last_eval.get("chosen", nan),
        "eval_rewards_rejected": last_eval.get("rejected", nan),
        "eval_pairs": len(eval_data),
        # the last logging window's figures on the training pairs
        "train_loss": totals["loss_sum"] / max(totals["loss_steps"], 1),
        "train_reward_accuracy": last_window.get("accuracy", nan),
        "train_reward_margin": last_window.get("margin", nan),
        "train_pairs": len(train_data),
        "dropped_pairs": dropped,
        "tokens_per_second": totals["tokens"] / max(totals["seconds"], 1e-9),
        "train_seconds": totals["seconds"],
        "steps": done,
    }
    meta = {"format": "prefloop-dpo/1", "config": asdict(config), "metrics": metrics}
    save_policy(model, tokenizer, output_dir, saved_dtype, checkpointing, META_FILE, meta, weights)
    dist.barrier()
    on_progress(1.0, "done")
    return DPOResult(
        output_dir=str(output_dir),
        metrics=metrics,
        stopped=False,
        steps=done,
        total_steps=total_steps,
        reference_reused=reference_reused,
        history=history,
    )
