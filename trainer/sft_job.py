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

import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from app.db import Database
from app.exports import formats
from app.exports.query import make_context, read_session
from app.exports.schemas import AsOf
from app.jobs.models import ModelKind, ModelVersion
from app.jobs.specs import SFTJobSpec, parse_sft_spec
from trainer.generate_job import model_location
from trainer.model_versions import finite, publish
from trainer.sft import SFTConfig, SFTExample, train


@dataclass
class Demonstrations:
    """What one read of the database gave the job."""

    train: list[SFTExample] = field(default_factory=list)
    eval: list[SFTExample] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)  # the export's, with as_of
    counts: dict[str, int] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """SHA-256 of exactly what was trained and evaluated on, in order."""
        digest = hashlib.sha256()
        for name, examples in (("train", self.train), ("eval", self.eval)):
            for e in examples:
                digest.update(json.dumps([name, e.prompt, e.completion], sort_keys=True).encode())
        return digest.hexdigest()


def _text(value: Any) -> str:
    """A completion as text (a conversational export holds one assistant message)."""
    if isinstance(value, list):
        return "".join(m["content"] for m in value)
    return value


def load_demonstrations(
    database: Database, spec: SFTJobSpec, secret_key: str, as_of: dict[str, int] | None = None
) -> Demonstrations:
    """The spec's demonstrations, split by prompt, as of the given high-water mark."""
    params = spec.export_params()
    if as_of is not None:
        params = params.model_copy(update={"as_of": AsOf.model_validate(as_of)})
    data = Demonstrations()
    sources = {"human": 0, "ai": 0, "import": 0}
    with read_session(database) as db:
        ctx = make_context(db, params, secret_key)
        data.parameters = ctx.params.canonical()
        for row in formats.sft_rows(ctx):
            example = SFTExample(
                row["prompt"],
                _text(row["completion"]),
                prompt_key=f"{row['campaign']}:{row['prompt_id']}",
            )
            (data.eval if row["split"] == "test" else data.train).append(example)
            sources[row["source"]] += 1
    if spec.max_examples is not None:
        data.train = data.train[: spec.max_examples]
    data.counts = {
        "labeler_demonstrations": sources["human"],
        "ai_demonstrations": sources["ai"],
        "imported_pairs": sources["import"],
        "train_examples": len(data.train),
        "eval_examples": len(data.eval),
        "train_prompts": len({e.prompt_key for e in data.train}),
        "eval_prompts": len({e.prompt_key for e in data.eval}),
    }
    return data


def sft_config(spec: SFTJobSpec, model_path: str) -> SFTConfig:
    """The trainer's config from the spec's training options (same names, checked by tests)."""
    names = {f.name for f in fields(SFTConfig)}
    options = {k: v for k, v in spec.training.model_dump().items() if k in names}
    return SFTConfig(model_name_or_path=model_path, **options)


def run(ctx: Any) -> dict[str, Any]:
    """The worker's entry point for `sft` jobs (ctx: trainer.worker.JobContext)."""
    spec = parse_sft_spec(ctx.config)
    with ctx.database.session() as db:
        base = db.get(ModelVersion, spec.model_id)
        if base is None or base.kind is not ModelKind.policy:
            raise ValueError(f"there is no policy model version {spec.model_id}")
        location = model_location(ctx.settings.data_dir, base.path)
    ctx.report(0.0, "reading demonstrations")
    mark = Path(ctx.checkpoint_dir) / "as_of.json"
    as_of = json.loads(mark.read_text()) if mark.is_file() else None
    data = load_demonstrations(ctx.database, spec, ctx.settings.secret_key, as_of)
    if as_of is None:
        Path(ctx.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        mark.write_text(json.dumps(data.parameters["as_of"]))
    ctx.log.info("base %s, data: %s", location, json.dumps(data.counts, sort_keys=True))
    if not data.train:
        raise ValueError(
            "no demonstrations to train on: label the demonstration campaigns, import "
            "prompt/completion pairs, or loosen the filters"
        )
    config = sft_config(spec, location)
    work_dir = Path(ctx.checkpoint_dir) / "run"

    def on_progress(fraction: float, message: str) -> None:
        ctx.report(0.02 + 0.96 * fraction, message)

    result = train(
        config,
        data.train,
        data.eval,
        work_dir,
        device=ctx.device,
        on_metric=ctx.metric,
        on_progress=on_progress,
        should_stop=ctx.should_stop,
    )
    if result.stopped:
        ctx.check_stop()  # raises JobStopped: the worker requeues or cancels the job
        raise RuntimeError("training stopped without a stop request")

    data_ref = {**data.counts, "fingerprint": data.fingerprint()}
    summary = {
        "training": {
            "config": spec.training.model_dump(),
            "base_model_id": spec.model_id,
            "base_path": location,
        },
        "data": data_ref,
        "export_parameters": data.parameters,
        # NaN (no held-out prompts, no packing) left out rather than shown as empty
        "eval": {k: v for k, v in finite(result.metrics).items() if v is not None},
    }
    folder = publish(
        ctx,
        work_dir,
        "sft",
        name=spec.name or f"sft {'+'.join(spec.campaigns)} (job {ctx.job_id})",
        kind=ModelKind.policy,
        algorithm="sft",
        metrics=summary,
        parent_id=spec.model_id,
    )
    ctx.report(1.0, "done")
    return {
        "model_path": str(folder),
        "base_model_id": spec.model_id,
        "metrics": finite(result.metrics),
        "data": data_ref,
        "steps": result.steps,
    }
