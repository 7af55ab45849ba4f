"""What the jobs that train on labeled data (`train_reward`, `sft`, `dpo`) share, in the order a
job's `run` uses it:

1. `policy_path`: the folder of the policy version an `sft` or `dpo` job starts from.
2. `read_once`: the data is read in one consistent transaction through an export
   (`read_split` for the sft and dpo jobs); the first attempt records the export's `as_of`
   high-water mark in the job's checkpoint folder, and later attempts read exactly the same
   rows (`export_params_as_of`), so a resumed run trains on what its checkpoint was trained on.
3. `trainer_config`: the trainer's config from the spec's training options (the same names; a
   test in each job's tests holds the two equal).
4. `train_in_job`: the trainer in the worker's process, or in `spec.processes` data-parallel
   ones (trainer/launch.py; the same result; the sft, dpo, ppo and rloo jobs' `spec.sharding`
   "fsdp" shards the models over them), with the job's metrics, progress and stop request; a
   run that stopped hands the job back to the worker (JobStopped).
5. `publish_version`: the finished folder becomes a model version with the job's success
   (trainer/model_versions.py)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Generic, TypeVar

from app.db import Database
from app.exports.query import make_context, read_session
from app.exports.schemas import AsOf, ExportParams
from app.jobs.models import ModelKind, ModelVersion
from trainer.generate_job import model_location
from trainer.launch import run_in_processes
from trainer.model_versions import finite, publish
from trainer.runtime import write_atomically

T = TypeVar("T")
S = TypeVar("S", bound="Split[Any]")
AS_OF_FILE = "as_of.json"


def policy_path(ctx: Any, model_id: int) -> str:
    """The folder of the policy version a job starts from."""
    with ctx.database.session() as db:
        version = db.get(ModelVersion, model_id)
        if version is None or version.kind is not ModelKind.policy:
            raise ValueError(f"there is no policy model version {model_id}")
        return model_location(ctx.settings.data_dir, version.path)


def export_params_as_of(spec: Any, as_of: dict[str, int] | None) -> ExportParams:
    """The spec's export, pinned to a recorded high-water mark when there is one."""
    params = spec.export_params()
    if as_of is None:
        return params
    return params.model_copy(update={"as_of": AsOf.model_validate(as_of)})


def read_once(ctx: Any, read: Callable[[dict[str, int] | None], T]) -> T:
    """`read(as_of)` at the job's mark: None on the first attempt, which then records the
    mark of what it read (`data.parameters["as_of"]`); the recorded mark on later attempts."""
    mark = Path(ctx.checkpoint_dir) / AS_OF_FILE
    as_of = json.loads(mark.read_text()) if mark.is_file() else None
    data = read(as_of)
    if as_of is None:
        marked = json.dumps(data.parameters["as_of"])  # type: ignore[attr-defined]
        write_atomically(mark, lambda tmp: tmp.write_text(marked))
    return data


def answer_text(value: Any) -> str:
    """An exported answer as text (a conversational row holds one assistant message)."""
    if isinstance(value, list):
        return "".join(m["content"] for m in value)
    return value


def trainer_config(config_class: type[T], spec: Any, **given: Any) -> T:
    """`config_class(**given, **the spec's training options that are its fields)`."""
    names = {f.name for f in fields(config_class)}  # type: ignore[arg-type]
    options = {k: v for k, v in spec.training.model_dump().items() if k in names}
    return config_class(**given, **options)


def train_in_job(
    ctx: Any,
    train: Callable[..., Any],
    processes: int,
    args: Sequence[Any],
    kwargs: dict[str, Any] | None = None,
    *,
    on_progress: Callable[[float, str], None],
    sharding: str = "none",
) -> Any:
    """`train(*args, **kwargs)` with the job's device, metrics, progress and stop request, in
    this process or in `processes` data-parallel ones (`sharding="fsdp"`: the model sharded
    over them with FSDP2); its result when it finished. A run that stopped raises JobStopped
    (the worker requeues or cancels the job)."""
    if processes > 1:
        target = f"{train.__module__}:{train.__name__}"
        result = run_in_processes(
            ctx, target, processes, args, kwargs, on_progress=on_progress, sharding=sharding
        )
    else:
        result = train(
            *args,
            **(kwargs or {}),
            device=ctx.device,
            on_metric=ctx.metric,
            on_progress=on_progress,
            should_stop=ctx.should_stop,
        )
    if result.stopped:
        ctx.check_stop()  # raises JobStopped
        raise RuntimeError("training stopped without a stop request")
    return result


def publish_version(
    ctx: Any,
    spec: Any,
    work_dir: Path,
    algorithm: str,
    *,
    kind: ModelKind,
    metrics: dict[str, Any],
    parent_id: int | None,
) -> Path:
    """The finished run as the model version `<algorithm>-<job>-<attempt>`, named by the spec
    or for its campaigns; the job's progress is then done. Returns the version's folder."""
    folder = publish(
        ctx,
        work_dir,
        algorithm,
        name=spec.name or f"{algorithm} {'+'.join(spec.campaigns)} (job {ctx.job_id})",
        kind=kind,
        algorithm=algorithm,
        metrics=metrics,
        parent_id=parent_id,
    )
    ctx.report(1.0, "done")
    return folder


def run_policy_training(
    ctx: Any,
    spec: Any,
    *,
    algorithm: str,
    read: Callable[[dict[str, int] | None], Any],
    make_config: Callable[[Any, str], Any],
    train: Callable[..., Any],
    reading: str,
    nothing_to_train: str,
    training_facts: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The `run` of the sft and dpo jobs: read the data once (`read(as_of)`), train the
    starting policy in one process or `spec.processes`, publish the new policy version as
    a child of the starting one. `reading` is the progress message while the data is read;
    `nothing_to_train` the error when no example passed the filters."""
    location = policy_path(ctx, spec.model_id)
    ctx.report(0.0, reading)
    data = read_once(ctx, read)
    ctx.log.info("policy %s, data: %s", location, json.dumps(data.counts, sort_keys=True))
    if not data.train:
        raise ValueError(nothing_to_train)
    work_dir = Path(ctx.checkpoint_dir) / "run"

    def on_progress(fraction: float, message: str) -> None:
        ctx.report(0.02 + 0.96 * fraction, message)

    # one process, or N data-parallel ones (trainer/launch.py) with the same result
    result = train_in_job(
        ctx,
        train,
        spec.processes,
        (make_config(spec, location), data.train, data.eval, work_dir),
        on_progress=on_progress,
        sharding=spec.sharding,
    )
    data_ref = {**data.counts, "fingerprint": data.fingerprint()}
    summary = {
        "training": {
            "config": spec.training.model_dump(),
            "base_model_id": spec.model_id,
            "base_path": location,
            **(training_facts or {}),
        },
        "data": data_ref,
        "export_parameters": data.parameters,
        # NaN (no held-out prompts, ...) left out rather than shown as empty
        "eval": {k: v for k, v in finite(result.metrics).items() if v is not None},
    }
    folder = publish_version(
        ctx,
        spec,
        work_dir,
        algorithm,
        kind=ModelKind.policy,
        metrics=summary,
        parent_id=spec.model_id,
    )
    return {
        "model_path": str(folder),
        "base_model_id": spec.model_id,
        "metrics": finite(result.metrics),
        "data": data_ref,
        "steps": result.steps,
    }


# --- what the sft and dpo jobs read ----------------------------------------------------------


@dataclass
class Split(Generic[T]):
    """What one read of the database gave a job: the training and held-out examples, the
    export's parameters (with as_of) and counts for the model version's page."""

    train: list[T] = field(default_factory=list)
    eval: list[T] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def record(self, example: T) -> list[Any]:
        """What of an example its fingerprint covers."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """SHA-256 of exactly what was trained and evaluated on, in order."""
        digest = hashlib.sha256()
        for name, examples in (("train", self.train), ("eval", self.eval)):
            for example in examples:
                digest.update(json.dumps([name, *self.record(example)], sort_keys=True).encode())
        return digest.hexdigest()

    def prompts(self) -> dict[str, int]:
        return {
            "train_prompts": len({e.prompt_key for e in self.train}),  # type: ignore[attr-defined]
            "eval_prompts": len({e.prompt_key for e in self.eval}),  # type: ignore[attr-defined]
        }


def prompt_key(row: dict[str, Any]) -> str:
    """An exported row's prompt identity, for splits and counts."""
    return f"{row['campaign']}:{row['prompt_id']}"


def read_split(
    database: Database,
    spec: Any,
    secret_key: str,
    as_of: dict[str, int] | None,
    rows: Callable[[Any], Iterable[dict[str, Any]]],
    example: Callable[[dict[str, Any]], Any],
    data: S,
    *,
    limit: int | None,
    names: dict[str, str],
) -> S:
    """Fill `data` with `example(row)` of each row of the spec's export as of the mark (the
    held-out ones where the export's seeded split says test), at most `limit` for training,
    and its parameters and counts: the rows per source, named by `names` (human, ai, import
    -> the count's name), and "train" / "eval" -> the names of the two splits' counts."""
    sources = {"human": 0, "ai": 0, "import": 0}
    with read_session(database) as db:
        ctx = make_context(db, export_params_as_of(spec, as_of), secret_key)
        data.parameters = ctx.params.canonical()
        for row in rows(ctx):
            (data.eval if row["split"] == "test" else data.train).append(example(row))
            sources[row["source"]] += 1
    if limit is not None:
        data.train = data.train[:limit]
    data.counts = {
        **{names[source]: count for source, count in sources.items()},
        names["train"]: len(data.train),
        names["eval"]: len(data.eval),
        **data.prompts(),
    }
    return data
