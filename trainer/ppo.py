"""PPO for language models in one file that reads top to bottom, in the spirit of cleanrl's
ppo.py, with the RLHF details of Huang et al. 2024 ("The N+ Implementation Details of RLHF
with PPO", summarize_from_feedback_details/ppo.py) and Ziegler et al. 2019.

    from trainer.ppo import PPOConfig, reward_model_function, train
    config = PPOConfig(policy="var/models/sft", reward_model="var/models/reward-3-1")
    result = train(config, prompts, "var/models/ppo-1", on_metric=print)
    # or a programmatic reward: (prompts, responses) -> scores (B,)
    result = train(PPOConfig(policy=..., value_init="policy"), prompts, out,
                   reward_fn=lambda prompts, responses: torch.tensor([...]))

One PPO step:
1. Rollout: sample `rollout_batch_size` prompts (a seeded shuffle of the prompt list per
   pass), left-pad them and sample responses from the policy (KV cache, temperature, top-p,
   stop at EOS; everything after the first EOS is padding).
2. Score: the policy's log-probs (the "old" ones, recomputed by a forward pass with the
   logits divided by the temperature, as at sampling), the frozen reference's log-probs (a
   copy of the initial policy, or the policy with its LoRA adapters off), the value model's
   values, and the reward function's score of each decoded response (minus a penalty when it
   never reached EOS).
3. Per-token rewards -beta * KL_t plus the score on the last token; GAE advantages and
   returns; advantages whitened over the batch.
4. `ppo_epochs` passes over shuffled minibatches: clipped policy loss + vf_coef * clipped
   value loss, gradient clipping, one AdamW over the policy and value model.
5. The KL controller updates beta from the batch's KL; metrics go to `on_metric`.

Nothing here knows about the database; the worker's job handler would read prompts, call
`train` with the job's checkpoint folder and record the saved policy. The throughput
benchmark: `.venv/bin/python bench/ppo.py --tiny` (CPU) or `bench/ppo.py` (CUDA, ~0.5B).
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

from trainer.data import EncodedGroup, Prompt
from trainer.modeling import ScalarHeadModel, enable_checkpointing, load_reward_model
from trainer.reward import (
    RewardScorer,
)
from trainer.rl_math import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_k1,
    kl_k3,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    pearson,
    per_token_rewards,
    policy_loss,
    value_loss,
)
from trainer.runtime import (
    autocast,
    json_safe,
    load_checkpoint,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
    write_checkpoint,
)

__all__ = [
    "PPOConfig",
    "PPOResult",
    "RewardFunction",
    "RewardModelFunction",
    "encode_prompt",
    "response_logprobs",
    "reward_model_function",
    "train",
]

META_FILE = "prefloop_ppo.json"
CHECKPOINT_DIR = "checkpoint"

# (prompts, decoded responses) -> one score per response, (B,). Higher is better.
RewardFunction = Callable[[list[Prompt], list[str]], torch.Tensor]


@dataclass
class PPOConfig:
    """Hyperparameters of one PPO run. Defaults follow Huang et al. 2024 where they say."""

    policy: str = field(
        metadata={"help": "The initial policy (an SFT model): a causal LM folder or hub id."}
    )
    reward_model: str | None = field(
        default=None,
        metadata={"help": "A prefloop reward model folder; optional when train() gets reward_fn."},
    )
    value_init: str = field(
        default="reward",
        metadata={
            "help": "'reward': the value model starts as the reward model (Ziegler et al.; "
            "needs the policy's vocabulary), 'policy': the policy's body with a new head."
        },
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
    rollout_batch_size: int = field(
        default=64, metadata={"help": "Prompts (= responses) sampled per PPO step."}
    )
    minibatch_size: int = field(
        default=16, metadata={"help": "Responses per optimizer step in the PPO epochs."}
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
    ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
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
    separator: str = field(
        default="\n\n",
        metadata={
            "help": "After a plain-text prompt when the tokenizer has no chat template "
            "(as the reward model's formatter)."
        },
    )
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    clip_eps: float = field(default=0.2, metadata={"help": "PPO ratio clip range."})
    value_clip: float = field(default=0.2, metadata={"help": "Value clip range around old values."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
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
    whiten_rewards: bool = field(
        default=False,
        metadata={"help": "Scale per-token rewards to unit variance (mean kept) before GAE."},
    )
    total_steps: int = field(default=100, metadata={"help": "PPO steps (rollout + updates)."})
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
        if self.value_init not in ("reward", "policy"):
            raise ValueError(f"value_init must be 'reward' or 'policy', not {self.value_init!r}")
        if self.lr_schedule not in ("linear", "constant"):
            raise ValueError(
                f"lr_schedule must be 'linear' or 'constant', not {self.lr_schedule!r}"
            )
        if not 0 < self.minibatch_size <= self.rollout_batch_size:
            raise ValueError("minibatch_size must be in 1..rollout_batch_size")
        if self.micro_batch_size is not None and not self.micro_batch_size > 0:
            raise ValueError("micro_batch_size must be >= 1")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (PPO samples; greedy has no log-probs)")
        if min(self.ppo_epochs, self.total_steps, self.max_new_tokens, self.forward_batch_size) < 1:
            raise ValueError("ppo_epochs, total_steps, max_new_tokens, forward_batch_size >= 1")


@dataclass
class PPOResult:
    """What a run produced. `stopped`: interrupted; call `train` again to resume."""

    output_dir: str
    metrics: dict[str, float]
    stopped: bool = False
    steps: int = 0
    total_steps: int = 0
    history: list[tuple[int, str, float]] = field(default_factory=list)


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
    ) -> None:
        self.scorer = RewardScorer(model_dir, device)
        stats = self.scorer.normalization if normalize else {}
        self.mean = float(stats.get("mean", 0.0))
        self.std = float(stats.get("std", 1.0)) or 1.0
        self.batch_size = batch_size

    def __call__(self, prompts: list[Prompt], responses: list[str]) -> torch.Tensor:
        groups = [
            EncodedGroup(input_ids=self.scorer.formatter.encode(p, [r]), ranks=[0])
            for p, r in zip(prompts, responses, strict=True)
        ]
        raw = torch.cat(self.scorer.rewards(groups, self.batch_size))  # (B,)
        return (raw - self.mean) / self.std


def reward_model_function(
    model_dir: str | Path, device: str | torch.device | None = None, *, normalize: bool = True
) -> RewardModelFunction:
    return RewardModelFunction(model_dir, device, normalize=normalize)


# ---------------------------------------------------------------------------------------
# Models


def _disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere (Huang et al. detail): the old log-probs come from a forward
    pass, so any noise there makes the ratio != 1 before the policy has moved."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def _apply_lora(policy: nn.Module, config: PPOConfig) -> nn.Module:
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


def _value_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(body, head) of a value model: a decoder whose linear head reads every position."""
    if isinstance(model, ScalarHeadModel):
        return model.backbone, model.score
    head = getattr(model, "score", None)
    if isinstance(head, nn.Linear) and model.base_model is not model:
        return model.base_model, head
    raise ValueError(
        f"{type(model).__name__} cannot give per-token values (an encoder reward model?): "
        "use value_init='policy'"
    )


def _load_value_model(config: PPOConfig, tokenizer: Any) -> nn.Module:
    """Value model: the reward model (Ziegler et al. 2019: a value function that starts
    knowing the reward), or the policy's body with a new scalar head."""
    if config.value_init == "policy":
        from transformers import AutoModel

        return ScalarHeadModel(AutoModel.from_pretrained(config.policy, dtype=torch.float32))
    if config.reward_model is None:
        raise ValueError("value_init='reward' needs config.reward_model; or use 'policy'")
    model, reward_tokenizer = load_reward_model(config.reward_model, dtype=torch.float32)
    if reward_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            "value_init='reward' needs the reward model to share the policy's tokenizer "
            "(the value model reads the policy's tokens); use value_init='policy'"
        )
    _value_parts(model)  # fail now, not after the first rollout
    return model


# ---------------------------------------------------------------------------------------
# Prompts, sampling and forward passes


def _plain_prompt(prompt: Prompt, separator: str) -> str:
    if isinstance(prompt, str):
        return prompt + separator
    turns = [f"{m['role'].capitalize()}: {m['content']}" for m in prompt]
    return separator.join(turns) + separator + "Assistant: "


def encode_prompt(tokenizer: Any, prompt: Prompt, max_length: int, separator: str) -> list[int]:
    """Token ids the policy continues: the chat template with the generation prompt when the
    tokenizer has one, else "prompt<separator>" after the tokenizer's BOS if it adds one.
    Long prompts keep their end (the turn being answered)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prefix: list[int] = []
    else:
        text = _plain_prompt(prompt, separator)
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
        prefix = [bos] if adds_bos else []
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = max(max_length - len(prefix), 1)
    return prefix + ids[-keep:]


def _left_pad(sequences: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) ids and attention mask, padded on the left so every prompt ends at column P-1."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids, mask


def _response_mask(response: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mask (B, R): 1 up to and including the first EOS (all 1 without one), and
    contains_eos (B,)."""
    is_eos = response == eos_id
    contains_eos = is_eos.any(dim=1)
    R = response.shape[1]
    first = torch.where(contains_eos, is_eos.int().argmax(dim=1), R - 1)  # (B,)
    positions = torch.arange(R, device=response.device)
    return (positions[None, :] <= first[:, None]).long(), contains_eos


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
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
        position_ids=_position_ids(attention_mask),
        use_cache=False,
        logits_to_keep=R + 1,  # the lm head runs on the response positions only
    )
    logits = out.logits[:, :-1].float() / temperature  # (B, R, V)
    return logprobs_from_logits(logits, query_response[:, context_length:]), logits


def response_values(
    value_model: nn.Module,
    query_response: torch.Tensor,
    attention_mask: torch.Tensor,
    context_length: int,
) -> torch.Tensor:
    """V(state before each response token), (B, R): the head on positions P-1 .. P+R-2."""
    body, head = _value_parts(value_model)
    hidden = body(
        input_ids=query_response,
        attention_mask=attention_mask,
        position_ids=_position_ids(attention_mask),
        use_cache=False,
    ).last_hidden_state  # (B, P + R, H)
    return head(hidden[:, context_length - 1 : -1]).squeeze(-1).float()  # (B, R)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _prompt_indices(n_prompts: int, step: int, batch_size: int, seed: int) -> list[int]:
    """The prompts of PPO step `step`: pass k over the prompts is a shuffle seeded by
    (seed, k), so the order depends on nothing but the step and a resume replays it."""
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        pass_index, offset = divmod(position, n_prompts)
        order = list(range(n_prompts))
        random.Random(seed * 1_000_003 + pass_index).shuffle(order)  # noqa: S311 - data order
        out.append(order[offset])
    return out


def _fingerprint(config: PPOConfig, prompts: Sequence[Prompt]) -> str:
    """Identity of a run: a checkpoint resumes only the same config on the same prompts."""
    settings = asdict(config)
    settings.pop("checkpoint_every")
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update(json.dumps(list(prompts), sort_keys=True).encode())
    return digest.hexdigest()


class _Timer:
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


# ---------------------------------------------------------------------------------------
# Training


def train(
    config: PPOConfig,
    prompts: Sequence[Prompt],
    output_dir: str | Path,
    *,
    reward_fn: RewardFunction | None = None,
    device: str | torch.device | None = None,
    on_metric: Callable[[int, str, float], None] = lambda step, name, value: None,
    on_progress: Callable[[float, str], None] = lambda fraction, message: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> PPOResult:
    """Optimise config.policy with PPO on `prompts` against `reward_fn` (default: the
    config's reward model), and save it to output_dir.

    `should_stop()` is asked before every PPO step; when it says True, a resumable checkpoint
    goes to output_dir/checkpoint and the result has stopped=True. Calling `train` again with
    the same arguments resumes it exactly (RNG states included). `on_metric(step, name,
    value)` gets every metric of every step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if not prompts:
        raise ValueError("no prompts")
    if reward_fn is None and config.reward_model is None:
        raise ValueError("give config.reward_model or a reward_fn")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    bf16 = (
        config.bf16
        if config.bf16 is not None
        else (device.type == "cuda" and torch.cuda.is_bf16_supported())
    )
    history: list[tuple[int, str, float]] = []

    def emit(step: int, name: str, value: float) -> None:
        if math.isfinite(value):  # NaN (a constant batch) would break the charts
            history.append((step, name, value))
            on_metric(step, name, value)

    # ---- models: seeded first, since a fresh value head is randomly initialised
    seed_everything(config.seed)
    if reward_fn is None:
        reward_fn = reward_model_function(
            config.reward_model, device, normalize=config.normalize_reward
        )
    tokenizer = AutoTokenizer.from_pretrained(config.policy)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the policy's tokenizer has no EOS token to stop at")

    # fp32 master weights whatever the checkpoint's dtype; bf16 only inside autocast. The
    # reference runs the same way, so KL is exactly 0 before the first update.
    policy = AutoModelForCausalLM.from_pretrained(config.policy, dtype=torch.float32)
    saved_generation_config = policy.generation_config
    # A hub model's generation_config.json (top_k, repetition_penalty, ...) would change the
    # sampling distribution behind PPO's back: sample from exactly softmax(logits / T), top-p.
    policy.generation_config = GenerationConfig()
    generation = GenerationConfig(
        do_sample=True,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=0,
        repetition_penalty=1.0,
        max_new_tokens=config.max_new_tokens,
        min_new_tokens=0,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=True,
    )
    reference = None
    if not config.use_lora:
        reference = AutoModelForCausalLM.from_pretrained(config.policy, dtype=torch.float32)
        reference.requires_grad_(False).eval().to(device)
    value_model = _load_value_model(config, tokenizer)
    for model in (policy, value_model):
        _disable_dropout(model)
        if config.gradient_checkpointing:
            enable_checkpointing(model)
    if config.use_lora:
        policy = _apply_lora(policy, config)
    policy.to(device)
    value_model.to(device=device, dtype=torch.float32)
    mixed_precision = (lambda: autocast(device, True)) if bf16 else nullcontext

    # ---- optimizer: one AdamW over policy and value model (TRL's PolicyAndValueWrapper)
    params = [p for m in (policy, value_model) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, eps=config.adam_eps)
    total = config.total_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        (lambda step: 1.0 - step / total) if config.lr_schedule == "linear" else (lambda _: 1.0),
    )
    kl_ctl: AdaptiveKLController | FixedKLController = (
        AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
        if config.adaptive_kl
        else FixedKLController(config.kl_coef)
    )
    prompt_ids = [
        encode_prompt(tokenizer, p, config.max_prompt_length, config.separator) for p in prompts
    ]

    # ---- resume from a checkpoint of the same run, if there is one
    checkpoint = output_dir / CHECKPOINT_DIR / "state.pt"
    fingerprint = _fingerprint(config, prompts)
    done = 0
    last_metrics: dict[str, float] = {}
    state = load_checkpoint(checkpoint, fingerprint)
    if state is not None:
        policy.load_state_dict(state["policy"])
        value_model.load_state_dict(state["value"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        kl_ctl.load_state_dict(state["kl"])
        done, last_metrics, history[:] = state["step"], state["metrics"], state["history"]
        set_rng_state(state["rng"])
        on_progress(done / total, f"resumed at step {done}/{total}")

    def save_checkpoint() -> None:
        write_checkpoint(
            checkpoint,
            {
                "fingerprint": fingerprint,
                "policy": policy.state_dict(),
                "value": value_model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "kl": kl_ctl.state_dict(),
                "step": done,
                "metrics": last_metrics,
                "history": history,
                "rng": rng_state(),
            },
        )

    def reference_logprobs(qr: torch.Tensor, mask: torch.Tensor, P: int) -> torch.Tensor:
        if reference is not None:
            return response_logprobs(reference, qr, mask, P, config.temperature)[0]
        with policy.disable_adapter():  # LoRA: the base model is the reference
            return response_logprobs(policy, qr, mask, P, config.temperature)[0]

    micro_size = config.micro_batch_size or config.minibatch_size
    B, fwd = config.rollout_batch_size, config.forward_batch_size
    while done < total:
        if should_stop():
            save_checkpoint()
            on_progress(done / total, f"stopped at step {done}/{total}")
            return PPOResult(str(output_dir), dict(last_metrics), True, done, total, history)
        timer = _Timer(device)
        began = time.perf_counter()
        indices = _prompt_indices(len(prompts), done, B, config.seed)
        batch_prompts = [prompts[i] for i in indices]
        query, query_mask = _left_pad([prompt_ids[i] for i in indices], pad_id)  # (B, P)
        query, query_mask = query.to(device), query_mask.to(device)
        P = query.shape[1]

        # ---- 1. rollout: sample responses with the KV cache, stop at EOS
        policy.eval()
        value_model.eval()
        with timer.phase("generate"), torch.no_grad(), mixed_precision():
            pieces = [
                policy.generate(
                    input_ids=query[c], attention_mask=query_mask[c], generation_config=generation
                )[:, P:]
                for c in _chunks(B, fwd)
            ]
        R = max(p.shape[1] for p in pieces)
        response = torch.cat(
            [nn.functional.pad(p, (0, R - p.shape[1]), value=pad_id) for p in pieces]
        )  # (B, R)
        mask, contains_eos = _response_mask(response, eos_id)  # (B, R), (B,)
        response = response.masked_fill(mask == 0, pad_id)
        query_response = torch.cat([query, response], dim=1)  # (B, P + R)
        attention = torch.cat([query_mask, mask], dim=1)  # (B, P + R)
        fmask = mask.float()

        # ---- 2. score: old log-probs, reference log-probs, values, rewards
        with timer.phase("score"), torch.no_grad():
            old_logprobs, ref_logprobs, old_values, entropy = [], [], [], []
            with mixed_precision():
                for c in _chunks(B, fwd):
                    logprobs, logits = response_logprobs(
                        policy, query_response[c], attention[c], P, config.temperature
                    )
                    old_logprobs.append(logprobs)
                    entropy.append(entropy_from_logits(logits))
                    del logits
                    ref_logprobs.append(reference_logprobs(query_response[c], attention[c], P))
                    old_values.append(
                        response_values(value_model, query_response[c], attention[c], P)
                    )
            old_logprobs, ref_logprobs = torch.cat(old_logprobs), torch.cat(ref_logprobs)
            old_values, entropy = torch.cat(old_values), torch.cat(entropy)  # (B, R) each
            lengths = mask.sum(dim=1)  # (B,) tokens, the EOS included
            texts = tokenizer.batch_decode(
                [response[b, : int(lengths[b]) - int(contains_eos[b])].tolist() for b in range(B)],
                skip_special_tokens=True,
            )
            score = reward_fn(batch_prompts, texts).detach().float().to(device)  # (B,)
            raw_score = score * getattr(reward_fn, "std", 1.0) + getattr(reward_fn, "mean", 0.0)
            if config.missing_eos_penalty is not None:
                score = torch.where(contains_eos, score, score - config.missing_eos_penalty)

            # ---- 3. per-token rewards (score - beta * KL), GAE, whitened advantages
            beta = kl_ctl.value
            kl = kl_k1(old_logprobs, ref_logprobs) * fmask  # (B, R)
            rewards = per_token_rewards(score, kl, beta, fmask)  # (B, R)
            if config.whiten_rewards:
                rewards = masked_whiten(rewards, fmask, shift_mean=False)
            advantages, returns = gae(rewards, old_values, fmask, config.gamma, config.lam)
            advantages = masked_whiten(advantages, fmask)  # (B, R)

        # ---- 4. PPO epochs over shuffled minibatches
        policy.train()
        value_model.train()
        stats: dict[str, list[float]] = {k: [] for k in ("pg", "vf", "clip", "vclip", "akl", "gn")}
        with timer.phase("train"):
            for _ in range(config.ppo_epochs):
                order = torch.randperm(B)
                for start in range(0, B, config.minibatch_size):
                    minibatch = order[start : start + config.minibatch_size].to(device)
                    minibatch_tokens = fmask[minibatch].sum()
                    for micro in minibatch.split(micro_size):
                        qr, att = query_response[micro], attention[micro]
                        m = fmask[micro]
                        with mixed_precision():
                            new_logprobs, logits = response_logprobs(
                                policy, qr, att, P, config.temperature
                            )
                            del logits
                            values = response_values(value_model, qr, att, P)
                        pg_loss, clip_frac, approx_kl = policy_loss(
                            new_logprobs, old_logprobs[micro], advantages[micro], m, config.clip_eps
                        )
                        vf_loss, vf_clip = value_loss(
                            values, old_values[micro], returns[micro], m, config.value_clip
                        )
                        # Token-weighted: accumulated micro-batches add up to the
                        # minibatch's own token mean, whatever their response lengths.
                        share = m.sum() / minibatch_tokens
                        ((pg_loss + config.vf_coef * vf_loss) * share).backward()
                        stats["pg"].append(pg_loss.item())
                        stats["vf"].append(vf_loss.item())
                        stats["clip"].append(clip_frac.item())
                        stats["vclip"].append(vf_clip.item())
                        stats["akl"].append(approx_kl.item())
                    grad_norm = nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                    stats["gn"].append(float(grad_norm))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        learning_rate = scheduler.get_last_lr()[0]
        scheduler.step()

        # ---- 5. the KL controller, metrics
        kl_per_response = kl.sum(dim=1)  # (B,)
        kl_ctl.update(kl_per_response.mean().item(), B)
        done += 1
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        metrics = {
            "reward/raw": raw_score.mean().item(),
            "reward/normalized": score.mean().item(),
            "reward/rlhf": (score - beta * kl_per_response).mean().item(),
            "kl/k1": kl_per_response.mean().item(),
            "kl/k3": (kl_k3(old_logprobs, ref_logprobs) * fmask).sum(1).mean().item(),
            "kl/beta": beta,
            "policy/entropy": masked_mean(entropy, fmask).item(),
            "policy/loss": mean(stats["pg"]),
            "policy/clip_frac": mean(stats["clip"]),
            "policy/approx_kl": mean(stats["akl"]),
            "value/loss": mean(stats["vf"]),
            "value/clip_frac": mean(stats["vclip"]),
            "value/explained_variance": explained_variance(old_values, returns, fmask),
            "response/length": lengths.float().mean().item(),
            "response/eos_rate": contains_eos.float().mean().item(),
            "response/length_reward_corr": pearson(lengths.float(), raw_score),
            "train/learning_rate": learning_rate,
            "train/grad_norm": mean(stats["gn"]),
            "time/generate": timer.totals["generate"],
            "time/score": timer.totals["score"],
            "time/train": timer.totals["train"],
            "time/step": time.perf_counter() - began,
            "tokens/response": float(lengths.sum()),
            "tokens/sequence": float(B * (P + R)),
        }
        for name, value in metrics.items():
            emit(done, name, value)
        last_metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
        on_progress(done / total, f"step {done}/{total}, reward {metrics['reward/normalized']:.3f}")
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < total:
            save_checkpoint()

    # ---- finish: the policy in plain transformers format, beside the config and metrics
    if config.use_lora:
        policy = policy.merge_and_unload()
    policy.generation_config = saved_generation_config
    policy.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    (output_dir / META_FILE).write_text(
        json.dumps(
            json_safe(
                {
                    "format": "prefloop-ppo/1",
                    "config": asdict(config),
                    "metrics": last_metrics,
                    "steps": done,
                    "kl_controller": kl_ctl.state_dict(),
                    "prompts": len(prompts),
                }
            ),
            indent=2,
        )
    )
    shutil.rmtree(output_dir / CHECKPOINT_DIR, ignore_errors=True)
    on_progress(1.0, "done")
    return PPOResult(str(output_dir), dict(last_metrics), False, done, total, history)
