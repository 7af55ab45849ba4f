"""What PPO (trainer/ppo.py) and RLOO (trainer/rloo.py) share: their common hyperparameters
(OnPolicyConfig), the policy and its frozen reference, the rollout (sample, pad, mask,
decode), the log-probs of a rollout under the policy and the reference, the reward function,
and the bookkeeping of an on-policy run (optimizer schedule, KL controller, resumable
checkpoint, metrics, the saved policy).

Each trainer's `train` reads top to bottom and calls these in the order of its step:

    policy, reference, hub_generation = load_policy(config, device)
    generation = sampling_config(config, tokenizer)
    rollout = generate_rollout(policy, query, query_mask, generation, forward_batch_size)
    logprobs, ref_logprobs, entropy = rollout_logprobs(policy, reference, rollout, ...)
    score, raw_score = score_responses(reward_fn, prompts, decode_responses(tokenizer, rollout),
                                       rollout.contains_eos, missing_eos_penalty)

The algorithm itself (advantages, losses, updates) stays in the trainer; the math in
trainer/rl_math.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer import generate
from trainer.data import EncodedGroup, Prompt
from trainer.distributed import SINGLE, Distributed
from trainer.generate import encode_prompt  # the policy's prompt format, for PPO and RLOO
from trainer.modeling import disable_dropout, enable_checkpointing
from trainer.reward import RewardScorer
from trainer.rl_math import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    logprobs_from_logits,
    pearson,
)
from trainer.runtime import (
    autocast,
    json_safe,
    load_checkpoint,
    resolve_device,
    save_on_main,
    seed_everything,
)

__all__ = [
    "CHECKPOINT_DIR",
    "LossMeans",
    "OnPolicyConfig",
    "RewardFunction",
    "RewardModelFunction",
    "Rollout",
    "RunCheckpoint",
    "RunResult",
    "Timer",
    "apply_lora",
    "chunks",
    "decode_responses",
    "disable_dropout",
    "encode_prompt",
    "fingerprint",
    "finish_run",
    "generate_rollout",
    "kl_controller",
    "left_pad",
    "load_policy",
    "load_tokenizer",
    "mixed_precision",
    "open_run",
    "optimizer_and_schedule",
    "per_rank",
    "position_ids",
    "prompt_indices",
    "record_metrics",
    "reference_logprobs",
    "response_logprobs",
    "response_mask",
    "reward_model_function",
    "rollout_logprobs",
    "rollout_metrics",
    "sampling_config",
    "save_policy",
    "score_responses",
    "seed_ranks",
]

CHECKPOINT_DIR = "checkpoint"

# (prompts, decoded responses) -> one score per response, (B,). Higher is better.
RewardFunction = Callable[[list[Prompt], list[str]], torch.Tensor]


# ---------------------------------------------------------------------------------------
# Hyperparameters


@dataclass
class OnPolicyConfig:
    """The hyperparameters every on-policy trainer here shares (PPOConfig and RLOOConfig add
    their algorithm's own), as TRL's OnPolicyConfig. Defaults follow Huang et al. 2024 where
    they say."""

    policy: str = field(
        metadata={"help": "The initial policy (an SFT model): a causal LM folder or hub id."}
    )
    reward_model: str | None = field(
        default=None,
        metadata={"help": "A prefloop reward model folder; optional when train() gets reward_fn."},
    )
    normalize_reward: bool = field(
        default=True,
        metadata={"help": "Whiten reward-model scores with the mean/std stored at training."},
    )
    use_lora: bool = field(
        default=False,
        metadata={
            "help": "Train LoRA adapters on the policy (needs peft); the reference is "
            "the same model with its adapters off, so no copy is kept."
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (alpha / r)."})
    lora_target_modules: str = field(
        default="all-linear",
        metadata={"help": "'all-linear' or comma-separated module names to adapt."},
    )
    micro_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Responses per forward/backward (gradient accumulation); "
            "None = the whole minibatch."
        },
    )
    forward_batch_size: int = field(
        default=32,
        metadata={"help": "Responses per no-grad pass while sampling and scoring (memory)."},
    )
    learning_rate: float = field(default=3e-6, metadata={"help": "AdamW learning rate."})
    lr_schedule: str = field(
        default="linear",
        metadata={
            "help": "'linear': decay to 0 over total_steps (cleanrl's anneal_lr); 'constant'."
        },
    )
    adam_eps: float = field(
        default=1e-5, metadata={"help": "AdamW epsilon (1e-5 as in cleanrl and Huang et al.)."}
    )
    max_prompt_length: int = field(
        default=512, metadata={"help": "Prompt tokens kept (the end of the prompt)."}
    )
    max_new_tokens: int = field(default=128, metadata={"help": "Response length cap."})
    temperature: float = field(
        default=0.7,
        metadata={"help": "Sampling temperature; log-probs are always of logits / temperature."},
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling; 1.0 = off."})
    kl_coef: float = field(
        default=0.05, metadata={"help": "beta: the KL penalty coefficient (initial if adaptive)."}
    )
    adaptive_kl: bool = field(
        default=False,
        metadata={"help": "Steer beta toward kl_target (Ziegler et al. 2019, section 2.2)."},
    )
    kl_target: float = field(
        default=6.0, metadata={"help": "Target KL per response in nats (adaptive_kl)."}
    )
    kl_horizon: float = field(
        default=10000, metadata={"help": "Controller horizon in responses (adaptive_kl)."}
    )
    missing_eos_penalty: float | None = field(
        default=None,
        metadata={"help": "Subtracted from the score of a response that never emits EOS."},
    )
    total_steps: int = field(default=100, metadata={"help": "Steps (rollout + updates)."})
    checkpoint_every: int = field(
        default=0, metadata={"help": "Write a resumable checkpoint every N steps; 0 = on stop."}
    )
    seed: int = field(default=42, metadata={"help": "Seeds torch, numpy, random, prompt order."})
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 autocast; None = on when CUDA supports it."}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward to save memory."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("linear", "constant"):
            raise ValueError(
                f"lr_schedule must be 'linear' or 'constant', not {self.lr_schedule!r}"
            )
        if self.micro_batch_size is not None and not self.micro_batch_size > 0:
            raise ValueError("micro_batch_size must be >= 1")
        if self.temperature <= 0:
            raise ValueError(
                "temperature must be > 0 (the trainer samples; greedy has no log-probs)"
            )
        if min(self.total_steps, self.max_new_tokens, self.forward_batch_size) < 1:
            raise ValueError("total_steps, max_new_tokens, forward_batch_size >= 1")


@dataclass
class RunResult:
    """What a run produced. `stopped`: interrupted; call `train` again to resume."""

    output_dir: str
    metrics: dict[str, float]
    stopped: bool = False
    steps: int = 0
    total_steps: int = 0
    history: list[tuple[int, str, float]] = field(default_factory=list)


def open_run(
    config: OnPolicyConfig,
    prompts: Sequence[Prompt],
    output_dir: str | Path,
    reward_fn: RewardFunction | None,
    device: str | torch.device | None,
    dist: Distributed = SINGLE,
) -> tuple[Path, torch.device]:
    """(output_dir, device) of a run, the folder made; refuses one with nothing to train on
    or nothing to reward it. One of several processes runs on its rank's device."""
    if not prompts:
        raise ValueError("no prompts")
    if reward_fn is None and config.reward_model is None:
        raise ValueError("give config.reward_model or a reward_fn")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir, dist.device if dist.active else resolve_device(device)


def per_rank(size: int, dist: Distributed, what: str) -> int:
    """Each process's share of a global batch `size` (`what` names it in the error): the
    ranks split every batch evenly, so that each makes the same collective calls."""
    if size % dist.world_size:
        raise ValueError(
            f"{what} ({size}) must be a multiple of the number of processes ({dist.world_size})"
        )
    return size // dist.world_size


def seed_ranks(seed: int, dist: Distributed) -> None:
    """After the models are built (alike on every rank): each of several processes draws its
    own samples and minibatch orders from then on. One process: nothing changes."""
    if dist.active:
        seed_everything((seed * 1_000_003 + dist.rank) % 2**32)  # numpy's seed range


# ---------------------------------------------------------------------------------------
# Rewards


class RewardModelFunction:
    """A prefloop reward model as a RewardFunction. Its tokenizer may differ from the
    policy's: it reads the decoded text, formatted as at its training (RewardScorer). Scores
    are whitened with the mean/std its training stored (prefloop_reward.json), so that a
    kl_coef means the same for every reward model; `raw = score * std + mean`."""

    def __init__(
        self,
        model_dir: str | Path,
        device: str | torch.device | None = None,
        *,
        normalize: bool = True,
        batch_size: int = 32,
        dist: Distributed = SINGLE,
    ) -> None:
        self.scorer = RewardScorer(model_dir, device, dist=dist)
        stats = self.scorer.normalization if normalize else {}
        self.mean = float(stats.get("mean", 0.0))
        self.std = float(stats.get("std", 1.0)) or 1.0
        self.batch_size = batch_size

    def __call__(self, prompts: list[Prompt], responses: list[str]) -> torch.Tensor:
        if not responses:  # a batch whose prompts all came up short of new samples
            return torch.zeros(0)
        groups = [
            EncodedGroup(input_ids=self.scorer.formatter.encode(p, [r]), ranks=[0])
            for p, r in zip(prompts, responses, strict=True)
        ]
        raw = torch.cat(self.scorer.rewards(groups, self.batch_size))  # (B,)
        return (raw - self.mean) / self.std


def reward_model_function(
    model_dir: str | Path,
    device: str | torch.device | None = None,
    *,
    normalize: bool = True,
    dist: Distributed = SINGLE,
) -> RewardModelFunction:
    """The reward model of a run; sharded over its processes under FSDP (each scores its own
    responses, the same number on every rank)."""
    return RewardModelFunction(model_dir, device, normalize=normalize, dist=dist)


def score_responses(
    reward_fn: RewardFunction,
    prompts: list[Prompt],
    texts: list[str],
    contains_eos: torch.Tensor,
    missing_eos_penalty: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(score, raw_score), (B,) each: the reward function's (normalized) score less the
    missing-EOS penalty, and the reward model's raw score (`score * std + mean`)."""
    score = reward_fn(prompts, texts).detach().float().to(contains_eos.device)  # (B,)
    raw_score = score * getattr(reward_fn, "std", 1.0) + getattr(reward_fn, "mean", 0.0)
    if missing_eos_penalty is not None:
        score = torch.where(contains_eos, score, score - missing_eos_penalty)
    return score, raw_score


# ---------------------------------------------------------------------------------------
# The policy and its reference


def load_tokenizer(path: str) -> Any:
    """The policy's tokenizer, padding with EOS when it has no pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ValueError("the policy's tokenizer has no EOS token to stop at")
    return tokenizer


def apply_lora(policy: nn.Module, config: OnPolicyConfig) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ImportError("use_lora needs peft: pip install peft") from exc
    targets: str | list[str] = config.lora_target_modules
    if targets != "all-linear":
        targets = [name.strip() for name in targets.split(",") if name.strip()]
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(policy, lora)


def load_policy(
    config: OnPolicyConfig, device: torch.device
) -> tuple[nn.Module, nn.Module | None, Any]:
    """(policy, reference, the policy's own generation config) on `device` (under FSDP the
    CPU: `Distributed.wrap` and `shard_frozen` move each rank's shards to its GPU).

    fp32 master weights whatever the checkpoint's dtype; bf16 only inside autocast. The
    reference is a frozen copy run the same way, so KL is exactly 0 before the first update;
    with LoRA it is None (the policy with its adapters off, see reference_logprobs). The
    policy's dropout is off, its LoRA adapters (drawn from the seeded RNG) on. Its own
    generation config is cleared, and returned for save_policy to put back: a hub model's
    generation_config.json (top_k, repetition_penalty, ...) would change the sampling
    distribution behind the trainer's back."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    policy = AutoModelForCausalLM.from_pretrained(config.policy, dtype=torch.float32)
    hub_generation = policy.generation_config
    policy.generation_config = GenerationConfig()
    reference = None
    if not config.use_lora:
        reference = AutoModelForCausalLM.from_pretrained(config.policy, dtype=torch.float32)
        reference.requires_grad_(False).eval().to(device)
    disable_dropout(policy)
    if config.gradient_checkpointing:
        enable_checkpointing(policy)
    if config.use_lora:
        policy = apply_lora(policy, config)
    policy.to(device)
    return policy, reference, hub_generation


def sampling_config(config: OnPolicyConfig, tokenizer: Any) -> Any:
    """Sample from exactly softmax(logits / T) with top-p, stopping at any of the policy's
    stop tokens (its tokenizer's EOS and its generation config's, as the generate job)."""
    from transformers import GenerationConfig

    try:
        own = GenerationConfig.from_pretrained(config.policy)
    except OSError:  # no generation_config.json
        own = None
    return generate.sampling_config(
        temperature=config.temperature,
        top_p=config.top_p,
        max_new_tokens=config.max_new_tokens,
        stop_ids=generate.stop_token_ids(tokenizer, own),
        pad_id=tokenizer.pad_token_id,
    )


def mixed_precision(
    bf16: bool | None, device: torch.device
) -> Callable[[], AbstractContextManager[Any]]:
    """A context factory: bf16 autocast (None: where CUDA supports it), or nothing."""
    if bf16 is None:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return (lambda: autocast(device, True)) if bf16 else nullcontext


# ---------------------------------------------------------------------------------------
# Prompts, sampling and forward passes


def left_pad(sequences: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) ids and attention mask, padded on the left so every prompt ends at column P-1."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids, mask


def response_mask(
    response: torch.Tensor, eos_ids: int | Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """mask (B, R): 1 up to and including the first stop token (all 1 without one), and
    contains_eos (B,)."""
    stops = torch.tensor([eos_ids] if isinstance(eos_ids, int) else list(eos_ids))
    is_eos = torch.isin(response, stops.to(response.device))
    contains_eos = is_eos.any(dim=1)
    R = response.shape[1]
    first = torch.where(contains_eos, is_eos.int().argmax(dim=1), R - 1)  # (B,)
    positions = torch.arange(R, device=response.device)
    return (positions[None, :] <= first[:, None]).long(), contains_eos


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (left padding), as generate does."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def response_logprobs(
    model: nn.Module,
    query_response: torch.Tensor,
    attention_mask: torch.Tensor,
    context_length: int,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(response token) and the logits it came from, (B, R) and (B, R, V).

    query_response (B, P + R), the first P columns the left-padded prompt. The logits at
    positions P-1 .. P+R-2 predict the R response tokens; they are divided by the sampling
    temperature, or the log-probs would be of another policy than the one that sampled."""
    R = query_response.shape[1] - context_length
    out = model(
        input_ids=query_response,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
        logits_to_keep=R + 1,  # the lm head runs on the response positions only
    )
    logits = out.logits[:, :-1].float() / temperature  # (B, R, V)
    return logprobs_from_logits(logits, query_response[:, context_length:]), logits


def reference_logprobs(
    policy: nn.Module,
    reference: nn.Module | None,
    query_response: torch.Tensor,
    attention_mask: torch.Tensor,
    context_length: int,
    temperature: float,
) -> torch.Tensor:
    """log ref(response token), (B, R): the frozen copy, or with LoRA the policy's base."""
    if reference is not None:
        return response_logprobs(
            reference, query_response, attention_mask, context_length, temperature
        )[0]
    with policy.disable_adapter():  # LoRA: the base model is the reference
        return response_logprobs(
            policy, query_response, attention_mask, context_length, temperature
        )[0]


def chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def prompt_indices(n_prompts: int, step: int, batch_size: int, seed: int) -> list[int]:
    """The prompts of step `step`: pass k over the prompts is a shuffle seeded by (seed, k),
    so the order depends on nothing but the step and a resume replays it."""
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        pass_index, offset = divmod(position, n_prompts)
        order = list(range(n_prompts))
        random.Random(seed * 1_000_003 + pass_index).shuffle(order)  # noqa: S311 - data order
        out.append(order[offset])
    return out


@dataclass
class Rollout:
    """Sampled responses after their prompts. Everything after a response's first EOS is
    padding, masked out."""

    query_response: torch.Tensor  # (B, P + R): the left-padded prompt, then the response
    attention: torch.Tensor  # (B, P + R)
    response: torch.Tensor  # (B, R), pad_id after the first EOS
    mask: torch.Tensor  # (B, R): 1 up to and including the first EOS
    contains_eos: torch.Tensor  # (B,)
    context_length: int  # P

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) response tokens, the EOS included."""
        return self.mask.sum(dim=1)


def generate_rollout(
    policy: nn.Module,
    query: torch.Tensor,
    query_mask: torch.Tensor,
    generation: Any,
    forward_batch_size: int,
    dist: Distributed = SINGLE,
) -> Rollout:
    """One sampled response per row of the left-padded query (B, P), with the KV cache, in
    chunks of forward_batch_size; the caller holds no_grad and autocast. A sharded policy
    (FSDP) needs every rank in every forward: a rank whose responses have all ended keeps
    stepping (`synced_gpus`, drawing nothing) until every rank's have."""
    B, P = query.shape
    pad_id, eos_ids = generation.pad_token_id, generation.eos_token_id
    pieces = [
        policy.generate(
            input_ids=query[c],
            attention_mask=query_mask[c],
            generation_config=generation,
            synced_gpus=dist.sharded,
        )[:, P:]
        for c in chunks(B, forward_batch_size)
    ]
    R = max(p.shape[1] for p in pieces)
    response = torch.cat(
        [nn.functional.pad(p, (0, R - p.shape[1]), value=pad_id) for p in pieces]
    )  # (B, R)
    mask, contains_eos = response_mask(response, eos_ids)  # (B, R), (B,)
    response = response.masked_fill(mask == 0, pad_id)
    return Rollout(
        query_response=torch.cat([query, response], dim=1),
        attention=torch.cat([query_mask, mask], dim=1),
        response=response,
        mask=mask,
        contains_eos=contains_eos,
        context_length=P,
    )


def decode_responses(tokenizer: Any, rollout: Rollout) -> list[str]:
    """The responses as text, without their EOS and padding, stripped as the generate job
    stores completions (what labelers saw and the reward model learned from)."""
    lengths, contains_eos = rollout.lengths, rollout.contains_eos
    texts = tokenizer.batch_decode(
        [
            rollout.response[b, : int(lengths[b]) - int(contains_eos[b])].tolist()
            for b in range(len(lengths))
        ],
        skip_special_tokens=True,
    )
    return [text.strip() for text in texts]


def rollout_logprobs(
    policy: nn.Module,
    reference: nn.Module | None,
    rollout: Rollout,
    temperature: float,
    forward_batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(old log-probs, reference log-probs, entropy), (B, R) each, of the rollout's response
    tokens, in chunks of forward_batch_size; the caller holds no_grad and autocast."""
    qr, att, P = rollout.query_response, rollout.attention, rollout.context_length
    old_logprobs, ref_logprobs, entropy = [], [], []
    for c in chunks(qr.shape[0], forward_batch_size):
        logprobs, logits = response_logprobs(policy, qr[c], att[c], P, temperature)
        old_logprobs.append(logprobs)
        entropy.append(entropy_from_logits(logits))
        del logits
        ref_logprobs.append(reference_logprobs(policy, reference, qr[c], att[c], P, temperature))
    return torch.cat(old_logprobs), torch.cat(ref_logprobs), torch.cat(entropy)


# ---------------------------------------------------------------------------------------
# The run: optimizer, KL controller, checkpoint, metrics, the saved policy


def optimizer_and_schedule(
    params: list[nn.Parameter], config: OnPolicyConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW, and a learning rate that decays linearly to 0 over total_steps (cleanrl's
    anneal_lr) or stays constant."""
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, eps=config.adam_eps)
    total = config.total_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        (lambda step: 1.0 - step / total) if config.lr_schedule == "linear" else (lambda _: 1.0),
    )
    return optimizer, scheduler


def kl_controller(config: OnPolicyConfig) -> AdaptiveKLController | FixedKLController:
    """beta: fixed, or steered toward kl_target (Ziegler et al. 2019, section 2.2)."""
    if config.adaptive_kl:
        return AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
    return FixedKLController(config.kl_coef)


def fingerprint(config: OnPolicyConfig, prompts: Sequence[Prompt]) -> str:
    """Identity of a run: a checkpoint resumes only the same config (every field but
    checkpoint_every) on the same prompts."""
    settings = asdict(config)
    settings.pop("checkpoint_every")
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update(json.dumps(list(prompts), sort_keys=True).encode())
    return digest.hexdigest()


class RunCheckpoint:
    """output_dir/checkpoint/state.pt: the models' weights, the optimizer's moments, the other
    parts' state dicts (scheduler, KL controller), the step, the last metrics, the history and
    every RNG's state (each process's, in several), so that a resumed run is the uninterrupted
    one. Every rank saves and resumes (the RNG states are gathered); rank 0 writes. The states
    are one process's whatever the mode (DDP keeps a full replica on every rank; FSDP's
    shards are gathered to rank 0, and broadcast back into each rank's shards on resume), so
    a checkpoint resumes under another number of processes or with sharding on or off.

    `models`: name -> model (the optimizer's parameters are theirs, in this order); under
    FSDP the models are sharded and the optimizer built on the shards before `resume`."""

    def __init__(
        self,
        output_dir: Path,
        fingerprint: str,
        dist: Distributed = SINGLE,
        *,
        models: dict[str, nn.Module] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **parts: Any,
    ) -> None:
        self.folder = output_dir / CHECKPOINT_DIR
        self.path = self.folder / "state.pt"
        self.fingerprint = fingerprint
        self.dist = dist
        self.models = models or {}
        # The optimizer's states are keyed by the parameters' names in this module (FSDP's
        # helpers name them; the format keeps one process's parameter indices).
        self.owner = nn.ModuleDict(self.models)
        self.optimizer = optimizer
        self.parts = parts

    def resume(
        self, on_progress: Callable[[float, str], None], total: int
    ) -> tuple[int, dict[str, float], list[tuple[int, str, float]]]:
        """(step, last metrics, history): this run's checkpoint's, its state loaded into the
        parts and the resume reported, or a fresh run's (0, {}, []). Another run's checkpoint
        is refused (ValueError)."""
        state = load_checkpoint(self.path, self.fingerprint)
        if state is None:
            return 0, {}, []
        for name, model in self.models.items():
            self.dist.load_model_state(model, state[name])
        if self.optimizer is not None:
            self.dist.load_optimizer_state(self.owner, self.optimizer, state["optimizer"])
        for name, part in self.parts.items():
            part.load_state_dict(state[name])
        saved = state["rng"]
        self.dist.restore_rng(saved)
        done = state["step"]
        if self.dist.active and (not isinstance(saved, list) or len(saved) != self.dist.world_size):
            # Saved by another number of processes: every rank has rank 0's states now, and
            # would draw the same samples as the others; each gets a stream of its own.
            run_seed = int(hashlib.sha256(self.fingerprint.encode()).hexdigest()[:8], 16)
            seed_ranks(run_seed + done, self.dist)
        on_progress(done / total, f"resumed at step {done}/{total}")
        return done, state["metrics"], state["history"]

    def save(
        self, step: int, metrics: dict[str, float], history: list[tuple[int, str, float]]
    ) -> None:
        # every rank: under FSDP each state is gathered to rank 0
        weights = {name: self.dist.model_state(model) for name, model in self.models.items()}
        if self.optimizer is not None:
            weights["optimizer"] = self.dist.optimizer_state(self.owner, self.optimizer)
        rngs = self.dist.rng_states()  # every rank's, gathered by all of them
        save_on_main(
            self.dist,
            self.path,
            lambda: {
                "fingerprint": self.fingerprint,
                **weights,
                **{name: part.state_dict() for name, part in self.parts.items()},
                "step": step,
                "metrics": metrics,
                "history": history,
                "rng": rngs,
            },
        )

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class Timer:
    """Wall time of a phase; synchronises CUDA so queued kernels count where they ran."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = {}

    def phase(self, name: str) -> AbstractContextManager[None]:
        timer = self

        class _Phase:
            def __enter__(self) -> None:
                self.began = time.perf_counter()

            def __exit__(self, *exc: object) -> None:
                if timer.device.type == "cuda":
                    torch.cuda.synchronize(timer.device)
                timer.totals[name] = timer.totals.get(name, 0.0) + time.perf_counter() - self.began

        return _Phase()


class LossMeans:
    """A step's logged losses as weighted means over its micro-batches and ranks: each
    value weighted by what it is a mean over (tokens, responses), so the figure is the
    global batch's own mean, however the rows were split."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def add(self, weight: float, **values: Any) -> None:
        for name, value in values.items():
            number = value.item() if isinstance(value, torch.Tensor) else float(value)
            self.sums[name] = self.sums.get(name, 0.0) + number * weight
            self.weights[name] = self.weights.get(name, 0.0) + weight

    def means(self, dist: Distributed = SINGLE) -> dict[str, float]:
        """Every value's mean over all ranks (a collective: every rank calls it)."""
        names = sorted(self.sums)
        totals = dist.sum([self.sums[n] for n in names] + [self.weights[n] for n in names])
        return {n: totals[i] / totals[len(names) + i] for i, n in enumerate(names)}


def rollout_metrics(
    rollout: Rollout,
    raw_score: torch.Tensor,
    learning_rate: float,
    grad_norms: list[float],
    timer: Timer,
    began: float,
    dist: Distributed = SINGLE,
) -> dict[str, float]:
    """The response, train, time and token metrics of a step, the same for every trainer:
    of the global batch (`raw_score` the pooled one, (B,)), rank 0's times."""
    lengths = dist.gather_rows(rollout.lengths).float()  # (B,)
    contains_eos = dist.gather_rows(rollout.contains_eos)  # (B,)
    (sequence_tokens,) = dist.sum([rollout.query_response.numel()])
    # Every rank has the same norms: DDP all-reduces the gradients before they are clipped,
    # and under FSDP the norm is taken over all the shards.
    grad_norm = sum(grad_norms) / len(grad_norms)
    return {
        "response/length": lengths.mean().item(),
        "response/eos_rate": contains_eos.float().mean().item(),
        "response/length_reward_corr": pearson(lengths, raw_score),
        "train/learning_rate": learning_rate,
        "train/grad_norm": grad_norm,
        "time/generate": timer.totals["generate"],
        "time/score": timer.totals["score"],
        "time/train": timer.totals["train"],
        "time/step": time.perf_counter() - began,
        "tokens/response": float(lengths.sum()),
        "tokens/sequence": float(sequence_tokens),
    }


def record_metrics(
    step: int,
    metrics: dict[str, float],
    history: list[tuple[int, str, float]],
    on_metric: Callable[[int, str, float], None],
) -> dict[str, float]:
    """Append the step's finite metrics to history and pass them to on_metric (NaN, from a
    constant batch, would break the charts); return them."""
    finite = {name: value for name, value in metrics.items() if math.isfinite(value)}
    for name, value in finite.items():
        history.append((step, name, value))
        on_metric(step, name, value)
    return finite


def finish_run(
    algorithm: str,
    config: OnPolicyConfig,
    policy: nn.Module,
    tokenizer: Any,
    hub_generation: Any,
    output_dir: Path,
    meta_file: str,
    *,
    metrics: dict[str, float],
    steps: int,
    kl_controller: Any,
    prompts: int,
    checkpoint: RunCheckpoint,
    on_progress: Callable[[float, str], None],
    dist: Distributed = SINGLE,
) -> None:
    """The end of a finished PPO or RLOO run: the policy saved (`save_policy`) with its
    config, last metrics, steps and KL controller in `meta_file`; the resumable checkpoint
    removed. In several processes rank 0 saves and the others wait for it; under FSDP the
    weights are gathered to rank 0 first, into a plain copy of the policy on its CPU."""
    if dist.sharded:
        weights = dist.model_state(policy)  # every rank takes part; rank 0 gets them
        if dist.is_main:
            policy = plain_policy(config, weights)
    meta = {
        "format": f"prefloop-{algorithm}/1",
        "config": asdict(config),
        "metrics": metrics,
        "steps": steps,
        "kl_controller": kl_controller.state_dict(),
        "prompts": prompts,
    }
    with dist.main_writes() as main:
        if main:
            save_policy(
                policy,
                tokenizer,
                hub_generation,
                output_dir,
                meta_file,
                meta,
                merge_lora=config.use_lora,
            )
            checkpoint.remove()
    on_progress(1.0, "done")


def plain_policy(config: OnPolicyConfig, weights: dict[str, torch.Tensor]) -> nn.Module:
    """The policy rebuilt on the CPU (LoRA adapters included) with a sharded run's gathered
    `weights`: merging adapters and `save_pretrained` need whole weights, not shards."""
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(config.policy, dtype=torch.float32)
    if config.use_lora:
        policy = apply_lora(policy, config)
    policy.load_state_dict(weights)
    return policy


def save_policy(
    policy: nn.Module,
    tokenizer: Any,
    hub_generation: Any,
    output_dir: Path,
    meta_file: str,
    meta: dict[str, Any],
    *,
    merge_lora: bool,
) -> None:
    """The policy in plain transformers format (LoRA adapters merged), its own generation
    config put back, beside its tokenizer and `meta` (config, metrics, ...) in meta_file."""
    if merge_lora:
        policy = policy.merge_and_unload()
    policy.generation_config = hub_generation
    policy.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    (output_dir / meta_file).write_text(json.dumps(json_safe(meta), indent=2))
