"""The `dpo` job: a policy version is optimised directly on the campaigns' comparisons and
becomes a new policy version.

    prefloop train dpo --campaign helpful --model 3   # queue it
    prefloop worker --once                            # run it

1. Read the comparisons in one consistent transaction through the exports' `trl` format (one
   row per judgment and completion pair, as labeled; the reward job's filters; the same seeded
   split by prompt; the same `as_of` high-water mark a snapshot records). Ties are dropped:
   DPO has nothing to learn from them. The first attempt fixes the mark; later attempts read
   exactly the same rows.
2. Train (`trainer.dpo.train`) in the job's checkpoint folder, which every attempt shares: the
   reference log-probs are computed once there, and a stopped worker checkpoints there and the
   next attempt resumes from it. With `processes: N`, N data-parallel processes train
   (trainer/launch.py) and follow the one-process loss curve.
3. Move the finished policy to `PREFLOOP_DATA_DIR/models/dpo-<job>-<attempt>` and record a
   `ModelVersion` (kind policy, algorithm dpo, parent: the starting policy) in the same
   transaction that marks the job succeeded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.db import Database
from app.exports import formats
from app.jobs.specs import DPOJobSpec, parse_dpo_spec
from trainer.dpo import DPOConfig, DPOPair, train
from trainer.training_job import (
    Split,
    answer_text,
    prompt_key,
    read_split,
    run_policy_training,
    trainer_config,
)


@dataclass
class Comparisons(Split[DPOPair]):
    """What one read of the database gave the job."""

    def record(self, pair: DPOPair) -> list[Any]:
        return [pair.prompt, pair.chosen, pair.rejected]


def load_comparisons(
    database: Database, spec: DPOJobSpec, secret_key: str, as_of: dict[str, int] | None = None
) -> Comparisons:
    """The spec's comparisons as (prompt, chosen, rejected) pairs, split by prompt, as of the
    given high-water mark (a resumed attempt reads exactly what the first one read)."""
    return read_split(
        database,
        spec,
        secret_key,
        as_of,
        formats.trl_rows,
        lambda row: DPOPair(
            row["prompt"],
            answer_text(row["chosen"]),
            answer_text(row["rejected"]),
            prompt_key=prompt_key(row),
        ),
        Comparisons(),
        limit=spec.max_pairs,
        names={
            "human": "human_pairs",
            "ai": "ai_pairs",
            "import": "imported_pairs",
            "train": "train_pairs",
            "eval": "eval_pairs",
        },
    )


def dpo_config(spec: DPOJobSpec, model_path: str) -> DPOConfig:
    """The trainer's config from the spec's training options (same names, checked by tests)."""
    return trainer_config(DPOConfig, spec, model_name_or_path=model_path)


def run(ctx: Any) -> dict[str, Any]:
    """The worker's entry point for `dpo` jobs (ctx: trainer.worker.JobContext)."""
    spec = parse_dpo_spec(ctx.config)
    return run_policy_training(
        ctx,
        spec,
        algorithm="dpo",
        read=lambda as_of: load_comparisons(ctx.database, spec, ctx.settings.secret_key, as_of),
        make_config=dpo_config,
        train=train,
        reading="reading comparisons",
        nothing_to_train=(
            "no comparisons to train on: label some tasks, import judged pairs, or loosen "
            "the filters"
        ),
        training_facts={"campaigns": spec.campaigns},
    )
