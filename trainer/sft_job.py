"""The `sft` job: a policy version is fine-tuned on demonstrations and becomes a new version.

    prefloop train sft --campaign haiku --model 3   # queue it
    prefloop worker --once                          # run it

1. Read the demonstrations in one consistent transaction through the exports' `sft` format
   (the same filters, the same seeded split by prompt, the same `as_of` high-water mark a
   snapshot records): each current labeler demonstration, and each imported completion of a
   demonstration campaign's task (prompt/completion pairs imported with the prompt, source
   `import`). The first attempt fixes the mark; later attempts read exactly the same rows.
2. Train (`trainer.sft.train`) in the job's checkpoint folder, which every attempt shares: a
   stopped worker checkpoints there and the next attempt resumes from it.
3. Move the finished policy to `PREFLOOP_DATA_DIR/models/sft-<job>-<attempt>` and record a
   `ModelVersion` (kind policy, algorithm sft, parent: the base version) in the same
   transaction that marks the job succeeded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.db import Database
from app.exports import formats
from app.jobs.specs import SFTJobSpec, parse_sft_spec
from trainer.sft import SFTConfig, SFTExample, train
from trainer.training_job import (
    Split,
    answer_text,
    prompt_key,
    read_split,
    run_policy_training,
    trainer_config,
)


@dataclass
class Demonstrations(Split[SFTExample]):
    """What one read of the database gave the job."""

    def record(self, example: SFTExample) -> list[Any]:
        return [example.prompt, example.completion]


def load_demonstrations(
    database: Database, spec: SFTJobSpec, secret_key: str, as_of: dict[str, int] | None = None
) -> Demonstrations:
    """The spec's demonstrations, split by prompt, as of the given high-water mark."""
    return read_split(
        database,
        spec,
        secret_key,
        as_of,
        formats.sft_rows,
        lambda row: SFTExample(
            row["prompt"], answer_text(row["completion"]), prompt_key=prompt_key(row)
        ),
        Demonstrations(),
        limit=spec.max_examples,
        names={
            "human": "labeler_demonstrations",
            "ai": "ai_demonstrations",
            "import": "imported_pairs",
            "train": "train_examples",
            "eval": "eval_examples",
        },
    )


def sft_config(spec: SFTJobSpec, model_path: str) -> SFTConfig:
    """The trainer's config from the spec's training options (same names, checked by tests)."""
    return trainer_config(SFTConfig, spec, model_name_or_path=model_path)


def run(ctx: Any) -> dict[str, Any]:
    """The worker's entry point for `sft` jobs (ctx: trainer.worker.JobContext)."""
    spec = parse_sft_spec(ctx.config)
    return run_policy_training(
        ctx,
        spec,
        algorithm="sft",
        read=lambda as_of: load_demonstrations(ctx.database, spec, ctx.settings.secret_key, as_of),
        make_config=sft_config,
        train=train,
        reading="reading demonstrations",
        nothing_to_train=(
            "no demonstrations to train on: label the demonstration campaigns, import "
            "prompt/completion pairs, or loosen the filters"
        ),
    )
