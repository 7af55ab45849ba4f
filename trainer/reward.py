"""Reward-model training on human rankings: K-way Bradley-Terry, InstructGPT-style.

Each judgment ranks K completions of one prompt. Its K completions are encoded once, and all
K-choose-2 pair losses are taken together and averaged within the judgment (Ouyang et al.,
2022, "Training language models to follow instructions with human feedback", section 3.5):
each completion is forwarded once instead of once per pair, and a judgment counts once
however large K is. Ties are skipped or trained toward 0.5, Llama 2's margin and per-labeler
weights are optional, and TRL's reward centering can be switched on.

    from trainer.reward import RankingGroup, RewardConfig, train, score
    groups = [RankingGroup("2+2?", ["4", "5"], ranks=[0, 1], prompt_key="p1"), ...]
    result = train(RewardConfig(model_name_or_path="path/to/backbone"), groups, held_out,
                   "var/models/rm-1")
    score("var/models/rm-1", "2+2?", ["4", "5"])   # -> [1.3, -0.8]

The worker loads judgments from the database and calls `train`; nothing here knows about the
database. The benchmark against TRL's RewardTrainer: `.venv/bin/python bench/reward_model.py`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.data import (
    EncodedGroup,
    Prompt,
    RankingGroup,
    RewardFormatter,
    collate,
    length_grouped_batches,
)
from trainer.distributed import SINGLE, Distributed, Forward
from trainer.losses import (
    batch_pair_indices,
    grouped_ranking_loss,
    pair_calibration_error,
    pair_correct,
    weighted_mean,
)
from trainer.modeling import (
    compute_rewards,
    disable_dropout,
    enable_checkpointing,
    load_reward_model,
)
from trainer.runtime import (
    TrainingConfig,
    adamw_with_schedule,
    autocast,
    json_safe,
    load_checkpoint,
    resolve_device,
    save_on_main,
    seed_everything,
)

__all__ = [
    "RankingGroup",
    "RewardConfig",
    "RewardResult",
    "RewardScorer",
    "evaluate_pairs",
    "score",
    "train",
]

META_FILE = "prefloop_reward.json"
CHECKPOINT_DIR = "checkpoint"


@dataclass
class RewardConfig(TrainingConfig):
    """Hyperparameters of one reward-model run: the loop's (`trainer.runtime.TrainingConfig`:
    batches, AdamW with linear decay, precision, logging, eval and checkpoint cadence) and
    these. Defaults follow InstructGPT where it says."""

    model_name_or_path: str = field(
        metadata={"help": "Backbone: a local directory or hub id (sequence classifier or LM)."}
    )
    max_length: int = field(
        default=512,
        metadata={"help": "Tokens per prompt + completion; the prompt's start is cut first."},
    )
    batch_size: int = field(default=8, metadata={"help": "Judgments (not pairs) per forward pass."})
    epochs: int = field(
        default=1,
        metadata={"help": "Passes over the data. InstructGPT: a second epoch overfits."},
    )
    ties: str = field(
        default="skip",
        metadata={"help": "'skip' tied pairs, or 'half': train them toward probability 0.5."},
    )
    use_margin: bool = field(
        default=False,
        metadata={"help": "Subtract each judgment's margin from r_better - r_worse (Llama 2)."},
    )
    use_weights: bool = field(
        default=True, metadata={"help": "Weight each judgment by its labeler's weight."}
    )
    center_rewards_coefficient: float | None = field(
        default=None,
        metadata={"help": "Add coef * mean(r^2) to keep rewards near 0 (Eisenstein et al., 2023)."},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward to save memory."}
    )
    disable_dropout: bool = field(
        default=True, metadata={"help": "Zero dropout: pair losses compare two noisy forwards."}
    )
    eval_batch_size: int = field(default=32, metadata={"help": "Judgments per eval pass."})
    separator: str = field(
        default="\n\n",
        metadata={"help": "Between prompt and completion when there is no chat template."},
    )
    normalization_samples: int = field(
        default=4096,
        metadata={"help": "Training completions scored after training for mean/std stats."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ties not in ("skip", "half"):
            raise ValueError(f"ties must be 'skip' or 'half', not {self.ties!r}")


@dataclass
class RewardResult:
    """What a run produced. `stopped`: interrupted; call `train` again to resume."""

    output_dir: str
    metrics: dict[str, float]
    normalization: dict[str, float]
    stopped: bool = False
    steps: int = 0
    total_steps: int = 0
    history: list[tuple[int, str, float]] = field(default_factory=list)


def _prepare(groups: Sequence[EncodedGroup], config: RewardConfig) -> list[EncodedGroup]:
    """Apply the config's switches to the data once, so the loop need not know them."""
    for g in groups:
        if not config.use_margin:
            g.margin = 0.0
        if not config.use_weights:
            g.weight = 1.0
    return list(groups)


def _has_pairs(group: EncodedGroup, ties: str) -> bool:
    return ties == "half" or len(set(group.ranks)) > 1


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ---------------------------------------------------------------------------------------
# Scoring and evaluation (shared by training, `score` and `evaluate_pairs`)


@torch.no_grad()
def _group_rewards(
    model: nn.Module,
    groups: Sequence[EncodedGroup],
    pad_token_id: int,
    device: torch.device,
    bf16: bool,
    batch_size: int,
    forward: nn.Module | None = None,
) -> list[torch.Tensor]:
    """Rewards (K,) of each group, in input order; batches sorted by length for speed.
    `forward`: the FSDP root around `model` (`Forward(model, compute_rewards)`), whose
    forward gathers the weights outside the blocks; every rank calls it on the same
    batches."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(groups)), key=lambda i: groups[i].length)
    out: list[torch.Tensor] = [torch.empty(0)] * len(groups)
    for chunk in _chunks(order, batch_size):
        batch = collate([groups[i] for i in chunk], pad_token_id).to(device)
        with autocast(device, bf16):
            if forward is None:
                rewards = compute_rewards(model, batch.input_ids, batch.attention_mask)
            else:
                rewards = forward(batch.input_ids, batch.attention_mask)
            rewards = rewards.cpu()
        for i, part in zip(
            chunk, rewards.split([len(groups[i].ranks) for i in chunk]), strict=True
        ):
            out[i] = part
    model.train(was_training)
    return out


def _pair_metrics(
    groups: Sequence[EncodedGroup], rewards: Sequence[torch.Tensor], ties: str
) -> dict[str, float]:
    """Pair accuracy and ECE on strict pairs (ties never count), and the mean group loss."""
    if not groups:
        return {"accuracy": float("nan"), "ece": float("nan"), "loss": float("nan"), "pairs": 0}
    flat = torch.cat(list(rewards))  # (N,)
    better, worse, tie, pair_group = batch_pair_indices([g.ranks for g in groups])
    margins = torch.tensor([g.margin for g in groups])[pair_group].masked_fill(tie, 0.0)
    group_loss, has_pairs = grouped_ranking_loss(
        flat, better, worse, tie, pair_group, len(groups), margins, ties
    )
    strict = ~tie
    b, w = better[strict], worse[strict]
    pairs = int(strict.sum())
    return {
        "accuracy": pair_correct(flat, b, w).float().mean().item() if pairs else float("nan"),
        "ece": pair_calibration_error(flat, b, w).item() if pairs else float("nan"),
        "loss": group_loss[has_pairs].mean().item() if has_pairs.any() else float("nan"),
        "pairs": pairs,
    }


class RewardScorer:
    """A trained reward model loaded once for scoring many prompts."""

    def __init__(
        self,
        model_dir: str | Path,
        device: str | torch.device | None = None,
        *,
        max_length: int | None = None,
        separator: str | None = None,
        dist: Distributed = SINGLE,
    ) -> None:
        """Formatting comes from the model's prefloop_reward.json; max_length and separator
        override it (for a reward model trained elsewhere). `dist` sharded (FSDP, a sharded
        PPO or RLOO run): the model is sharded over the processes like the policy, and every
        process must score the same number of batches (the same number of groups)."""
        meta_path = Path(model_dir) / META_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        settings = meta.get("config", {})
        self.device = dist.device if dist.active else resolve_device(device)
        self.model, self.tokenizer = load_reward_model(model_dir)
        self.model.to(torch.device("cpu") if dist.sharded else self.device).eval()
        # the sharded root is the scoring function's module, as in `train`
        self.forward = (
            dist.shard_frozen(Forward(self.model, compute_rewards)) if dist.sharded else None
        )
        self.formatter = RewardFormatter(
            self.tokenizer,
            max_length or settings.get("max_length", 512),
            separator if separator is not None else settings.get("separator", "\n\n"),
        )
        self.bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.normalization = meta.get("normalization", {})

    def rewards(self, groups: Sequence[EncodedGroup], batch_size: int = 32) -> list[torch.Tensor]:
        return _group_rewards(
            self.model,
            groups,
            self.tokenizer.pad_token_id,
            self.device,
            self.bf16,
            batch_size,
            self.forward,
        )

    def score(self, prompt: Prompt, completions: Sequence[str]) -> list[float]:
        ids = self.formatter.encode(prompt, completions)
        group = EncodedGroup(input_ids=ids, ranks=[0] * len(ids))
        return self.rewards([group])[0].tolist()


def score(
    model_dir: str | Path,
    prompt: Prompt,
    completions: Sequence[str],
    device: str | torch.device | None = None,
) -> list[float]:
    """Raw rewards of each completion of `prompt` (higher is better). For many calls, keep a
    `RewardScorer`. Normalise with the mean/std in prefloop_reward.json if needed."""
    return RewardScorer(model_dir, device).score(prompt, completions)


def evaluate_pairs(
    model_dir: str | Path,
    pairs: Sequence[tuple[Prompt, str, str]],
    device: str | torch.device | None = None,
    batch_size: int = 32,
    **formatting: Any,
) -> dict[str, float]:
    """Accuracy and ECE of a reward model on (prompt, chosen, rejected) triples.
    `formatting`: max_length / separator overrides, as for RewardScorer."""
    scorer = RewardScorer(model_dir, device, **formatting)
    groups = [
        EncodedGroup(input_ids=scorer.formatter.encode(p, [c, r]), ranks=[0, 1])
        for p, c, r in pairs
    ]
    metrics = _pair_metrics(groups, scorer.rewards(groups, batch_size), "skip")
    return {"accuracy": metrics["accuracy"], "ece": metrics["ece"], "pairs": metrics["pairs"]}


# ---------------------------------------------------------------------------------------
# Training


def _fingerprint(config: RewardConfig, groups: Sequence[EncodedGroup]) -> str:
    """Identity of a run: a checkpoint resumes only the same config on the same data."""
    digest = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode())
    for g in groups:
        digest.update(json.dumps([g.input_ids, g.ranks, g.margin, g.weight]).encode())
    return digest.hexdigest()


def _normalization(
    model: nn.Module,
    groups: Sequence[EncodedGroup],
    config: RewardConfig,
    pad_token_id: int,
    device: torch.device,
    bf16: bool,
    forward: nn.Module | None = None,
) -> dict[str, float]:
    """Mean and std of the reward over (a seeded sample of) the training completions, so a
    policy trainer can whiten rewards (Ziegler et al., 2019 normalise the same way).
    `forward`: as `_group_rewards`'s."""
    order = list(range(len(groups)))
    random.Random(config.seed).shuffle(order)  # noqa: S311 - a sample, not secrets
    sample, count = [], 0
    for i in order:
        if count >= config.normalization_samples:
            break
        sample.append(groups[i])
        count += len(groups[i].ranks)
    if not sample:
        return {"mean": 0.0, "std": 1.0, "count": 0}
    flat = torch.cat(
        _group_rewards(model, sample, pad_token_id, device, bf16, config.eval_batch_size, forward)
    )
    std = flat.std().item() if len(flat) > 1 else 1.0
    return {"mean": flat.mean().item(), "std": std, "count": len(flat)}


def train(
    config: RewardConfig,
    train_groups: Sequence[RankingGroup],
    eval_groups: Sequence[RankingGroup],
    output_dir: str | Path,
    *,
    device: str | torch.device | None = None,
    on_metric: Callable[[int, str, float], None] = lambda step, name, value: None,
    on_progress: Callable[[float, str], None] = lambda fraction, message: None,
    should_stop: Callable[[], bool] = lambda: False,
    gold_groups: Sequence[RankingGroup] | None = None,
    noise_ceiling: float | None = None,
    dist: Distributed = SINGLE,
) -> RewardResult:
    """Train a reward model on `train_groups`, evaluate on `eval_groups`, save to output_dir.

    `should_stop()` is asked before every optimizer step; when it says True, a resumable
    checkpoint goes to output_dir/checkpoint and the result has stopped=True. Calling `train`
    again with the same arguments resumes it. `noise_ceiling` (inter-labeler agreement) is
    passed through to the metrics to read the accuracy against.

    `dist` (trainer/distributed.py): one of several data-parallel processes. Each takes its
    slice of every global batch of `batch_size` judgments, so the run follows the one-process
    loss curve; rank 0 evaluates, checkpoints and saves. Sharded (`dist.sharded`, FSDP2, for
    a reward model too big for one GPU) the root of the sharding is the scoring function's
    module (`Forward(model, compute_rewards)`), since the last-token pooling calls the body
    and the head apart; every rank evaluates (the same batches), rank 0 reports and saves."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = dist.device if dist.active else resolve_device(device)
    bf16 = (
        config.bf16
        if config.bf16 is not None
        else (device.type == "cuda" and torch.cuda.is_bf16_supported())
    )
    history: list[tuple[int, str, float]] = []

    def emit(step: int, name: str, value: float) -> None:
        history.append((step, name, value))
        on_metric(step, name, value)

    # ---- model: seeded first, since a fresh reward head is randomly initialised
    seed_everything(config.seed)
    model, tokenizer = load_reward_model(config.model_name_or_path)
    if config.disable_dropout:
        disable_dropout(model)
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    # fp32 master weights whatever the checkpoint's dtype; bf16 only inside autocast. FSDP:
    # on the CPU until `wrap` moves each rank's shards to its device.
    model.to(device=torch.device("cpu") if dist.sharded else device, dtype=torch.float32)
    pad_id = tokenizer.pad_token_id

    # ---- data: tokenised once; every batch is padded only to its own longest sequence
    formatter = RewardFormatter(tokenizer, config.max_length, config.separator)
    train_data = _prepare([formatter.encode_group(g) for g in train_groups], config)
    eval_data = _prepare([formatter.encode_group(g) for g in eval_groups], config)
    gold_data = (
        _prepare([formatter.encode_group(g) for g in gold_groups], config)
        if gold_groups is not None
        else [g for g in eval_data if g.is_gold]
    )
    if not train_data:
        raise ValueError("no training judgments")
    lengths = [g.length for g in train_data]
    megabatch = config.length_group_size if config.group_by_length else None
    micro_per_epoch = math.ceil(len(train_data) / config.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / config.grad_accumulation_steps)
    total_steps = steps_per_epoch * config.epochs

    # The forward that backpropagates: under DDP through its wrapper (which also makes every
    # rank start from rank 0's weights), under FSDP the same module sharded in place; one
    # process: compute_rewards(model, ...) as is.
    forward = dist.wrap(Forward(model, compute_rewards))
    scoring = forward if dist.sharded else None  # evaluation's forward (see _group_rewards)

    # ---- optimizer: AdamW, linear warmup then linear decay to 0 (on the shards under FSDP)
    optimizer, scheduler = adamw_with_schedule(model, config, total_steps, "linear")

    # ---- resume from a checkpoint of the same run, if there is one
    checkpoint = output_dir / CHECKPOINT_DIR / "state.pt"
    fingerprint = _fingerprint(config, train_data)
    totals = {"seconds": 0.0, "pairs": 0, "tokens": 0, "loss_sum": 0.0, "loss_steps": 0}
    done = 0
    last_eval: dict[str, float] = {}
    state = load_checkpoint(checkpoint, fingerprint)
    if state is not None:
        dist.load_model_state(model, state["model"])
        dist.load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        done, totals, last_eval = state["step"], state["totals"], state["last_eval"]
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
                "last_eval": last_eval,
                "rng": rngs,
            },
        )

    def run_eval(step: int) -> dict[str, float]:
        rewards = _group_rewards(
            model, eval_data, pad_id, device, bf16, config.eval_batch_size, scoring
        )
        metrics = _pair_metrics(eval_data, rewards, config.ties)
        for name in ("accuracy", "ece", "loss"):
            if not math.isnan(metrics[name]):  # no held-out pairs: nothing to chart
                emit(step, f"eval/{name}", metrics[name])
        if gold_data:
            gold_rewards = _group_rewards(
                model, gold_data, pad_id, device, bf16, config.eval_batch_size, scoring
            )
            metrics["gold_accuracy"] = _pair_metrics(gold_data, gold_rewards, "skip")["accuracy"]
            emit(step, "gold/accuracy", metrics["gold_accuracy"])
        return metrics

    # ---- the loop
    model.train()
    window = {"loss": 0.0, "correct": 0, "strict": 0, "steps": 0}
    for epoch in range(config.epochs):
        # The order of epoch e depends only on (seed, e): resuming replays it exactly.
        batches = length_grouped_batches(lengths, config.batch_size, config.seed + epoch, megabatch)
        for step_in_epoch in range(steps_per_epoch):
            if epoch * steps_per_epoch + step_in_epoch < done:
                continue  # done before the checkpoint
            if dist.any(should_stop()):
                save_checkpoint()
                on_progress(done / total_steps, f"stopped at step {done}/{total_steps}")
                return RewardResult(
                    output_dir=str(output_dir),
                    metrics=dict(last_eval),
                    normalization={},
                    stopped=True,
                    steps=done,
                    total_steps=total_steps,
                    history=history,
                )
            start = step_in_epoch * config.grad_accumulation_steps
            micro = [
                [train_data[i] for i in b]
                for b in batches[start : start + config.grad_accumulation_steps]
            ]
            # One normaliser for the whole optimizer step: accumulating k forward passes
            # then gives the gradient of one pass over all of them.
            normalizer = (
                sum(g.weight for mb in micro for g in mb if _has_pairs(g, config.ties)) or 1.0
            )
            began = time.perf_counter()
            # This rank's numbers of the step, summed over ranks below:
            # loss, correct pairs, strict pairs, trained pairs, tokens.
            local = [0.0, 0, 0, 0, 0]
            for k, global_groups in enumerate(micro):
                groups, stand_in = dist.shard(global_groups)
                batch = collate(groups, pad_id).to(device)
                with dist.no_sync(forward, sync=k == len(micro) - 1):
                    with autocast(device, bf16):
                        rewards = forward(batch.input_ids, batch.attention_mask)  # (N,)
                    group_loss, has_pairs = grouped_ranking_loss(
                        rewards,
                        batch.better,
                        batch.worse,
                        batch.tie,
                        batch.pair_group,
                        batch.num_groups,
                        batch.margins,
                        config.ties,
                    )  # (G,), (G,)
                    loss = weighted_mean(group_loss, has_pairs, batch.weights, normalizer)
                    if config.center_rewards_coefficient:
                        # TRL's centering (Eisenstein et al., 2023, eq. 2), averaged over passes;
                        # under DDP this rank's share of the mean over the global micro-batch.
                        squares = (
                            rewards.pow(2).sum() / sum(len(g.ranks) for g in global_groups)
                            if dist.active
                            else rewards.pow(2).mean()
                        )
                        loss = loss + config.center_rewards_coefficient * squares / len(micro)
                    if stand_in:
                        loss = loss * 0.0
                    dist.backward(loss)
                if stand_in:
                    continue
                with torch.no_grad():
                    strict = ~batch.tie
                    correct = pair_correct(rewards, batch.better[strict], batch.worse[strict])
                local[0] += loss.item()
                local[1] += int(correct.sum())
                local[2] += int(strict.sum())
                local[3] += len(batch.tie) if config.ties == "half" else int(strict.sum())
                local[4] += batch.num_tokens
            step_loss, correct_pairs, strict_pairs, trained_pairs, tokens = dist.sum(local)
            window["correct"] += int(correct_pairs)
            window["strict"] += int(strict_pairs)
            totals["pairs"] += int(trained_pairs)
            totals["tokens"] += int(tokens)
            grad_norm = dist.clip_grad_norm(model, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()  # honest step times
            totals["seconds"] += time.perf_counter() - began
            totals["loss_sum"] += step_loss
            totals["loss_steps"] += 1
            done += 1
            window["loss"] += step_loss
            window["steps"] += 1

            if config.logs_at(done, total_steps):
                emit(done, "train/loss", window["loss"] / window["steps"])
                if window["strict"]:
                    emit(done, "train/accuracy", window["correct"] / window["strict"])
                emit(done, "train/learning_rate", scheduler.get_last_lr()[0])
                emit(done, "train/grad_norm", float(grad_norm))
                emit(done, "train/pairs_per_second", totals["pairs"] / totals["seconds"])
                window = {"loss": 0.0, "correct": 0, "strict": 0, "steps": 0}
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

    # ---- finish (rank 0): stats for reward whitening, the model in plain transformers format
    # (FSDP: every rank scores the sample and gathers the weights; rank 0 saves a plain copy)
    if dist.evaluates:
        normalization = _normalization(model, train_data, config, pad_id, device, bf16, scoring)
    weights = dist.model_state(model) if dist.sharded else None
    if not dist.is_main:
        dist.barrier()  # until rank 0 has saved
        return RewardResult(str(output_dir), {}, {}, steps=done, total_steps=total_steps)
    if weights is not None:
        model, _ = load_reward_model(config.model_name_or_path)  # on the CPU, for its weights
        model.load_state_dict(weights)
    metrics: dict[str, float] = {
        "eval_accuracy": last_eval.get("accuracy", float("nan")),
        "eval_ece": last_eval.get("ece", float("nan")),
        "eval_loss": last_eval.get("loss", float("nan")),
        "eval_pairs": last_eval.get("pairs", 0),
        "train_loss": totals["loss_sum"] / max(totals["loss_steps"], 1),
        "pairs_per_second": totals["pairs"] / max(totals["seconds"], 1e-9),
        "tokens_per_second": totals["tokens"] / max(totals["seconds"], 1e-9),
        "train_seconds": totals["seconds"],
        "steps": done,
    }
    if "gold_accuracy" in last_eval:
        metrics["gold_accuracy"] = last_eval["gold_accuracy"]
    if noise_ceiling is not None:
        metrics["noise_ceiling"] = noise_ceiling
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    (output_dir / META_FILE).write_text(
        json.dumps(
            json_safe(
                {
                    "format": "prefloop-reward/1",
                    "config": asdict(config),
                    "metrics": metrics,
                    "normalization": normalization,
                    "train_judgments": len(train_data),
                    "eval_judgments": len(eval_data),
                }
            ),
            indent=2,
        )
    )
    shutil.rmtree(output_dir / CHECKPOINT_DIR, ignore_errors=True)
    dist.barrier()
    on_progress(1.0, "done")
    return RewardResult(
        output_dir=str(output_dir),
        metrics=metrics,
        normalization=normalization,
        stopped=False,
        steps=done,
        total_steps=total_steps,
        history=history,
    )
