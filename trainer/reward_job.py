"""The `train_reward` job: a campaign's judgments, as they stand now, become a reward model.

    prefloop train reward --campaign helpful --backbone /path/to/model   # queue it
    prefloop worker --once                                               # run it

1. Read the data in one consistent transaction through the exports (the same filters, the
   same seeded split by prompt, the same `as_of` high-water mark a snapshot records), as
   `RankingGroup`s: each current human judgment ranks its task's K completions, each imported
   comparison is a pair. Gold tasks are kept out of training and evaluated against their
   gold answers.
2. Train (`trainer.reward.train`) in the job's checkpoint folder, which every attempt
   shares: a worker that is stopped (SIGTERM, cancel) checkpoints there, and the next attempt
   resumes from it.
3. Move the finished model to `PREFLOOP_DATA_DIR/models/reward-<job>-<attempt>` and record a
   `ModelVersion` in the same transaction that marks the job succeeded: a worker that lost
   its lease records nothing, and a recorded version's files are complete.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import Database
from app.exports import formats
from app.exports.query import make_context, read_session
from app.exports.service import quality_reports
from app.jobs.models import ModelKind, ModelVersion
from app.jobs.specs import RewardJobSpec, parse_reward_spec, parse_score_spec
from app.labeling.models import Completion, Prompt, Task, TaskCompletion
from trainer.model_versions import finite
from trainer.reward import RankingGroup, RewardConfig, RewardScorer, train
from trainer.training_job import (
    answer_text,
    export_params_as_of,
    prompt_key,
    publish_version,
    read_once,
    train_in_job,
    trainer_config,
)

MIN_WEIGHT = 0.1


@dataclass
class TrainingData:
    """What one read of the database gave the job."""

    train: list[RankingGroup] = field(default_factory=list)
    eval: list[RankingGroup] = field(default_factory=list)
    gold: list[RankingGroup] = field(default_factory=list)
    # The held-out tasks, for the jobs page: task id -> (prompt, completion ids, texts).
    eval_tasks: dict[int, tuple[Any, list[int], list[str]]] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)  # the export's, with as_of
    noise_ceiling: float | None = None  # labelers' pairwise agreement on these campaigns
    counts: dict[str, int] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """SHA-256 of exactly what was trained and evaluated on, in order."""
        digest = hashlib.sha256()
        for name, groups in (("train", self.train), ("eval", self.eval), ("gold", self.gold)):
            for g in groups:
                record = [name, g.prompt, g.completions, g.ranks, g.margin, g.weight]
                digest.update(json.dumps(record, sort_keys=True).encode())
        return digest.hexdigest()


def ranks_of(ranking: list[list[int]], completion_ids: list[int]) -> list[int] | None:
    """Place of each completion (0 = best; tied completions share a place), or None when the
    ranking does not cover exactly these completions."""
    place = {cid: i for i, tied in enumerate(ranking) for cid in tied}
    if sorted(place) != sorted(completion_ids):
        return None
    return [place[cid] for cid in completion_ids]


def labeler_weights(
    reports: dict[str, dict[str, Any]], pseudonym: Any, *, floor: float = MIN_WEIGHT
) -> dict[str, float]:
    """Annotator pseudonym -> weight: their agreement with the other labelers in the quality
    report (the mean over campaigns), floored so nobody's judgments count for nothing."""
    sums: dict[str, list[float]] = {}
    for report in reports.values():
        for row in report.get("labelers", []):
            value = row.get("agreement_with_others")
            if value is not None:
                sums.setdefault(pseudonym(row["labeler_id"]), []).append(float(value))
    return {who: max(floor, sum(v) / len(v)) for who, v in sums.items()}


def load_training_data(
    database: Database, spec: RewardJobSpec, secret_key: str, as_of: dict[str, int] | None = None
) -> TrainingData:
    """Read the spec's judgments and imported pairs in one consistent transaction, as of the
    given high-water mark (a resumed attempt reads exactly what the first one read)."""
    data = TrainingData()
    annotators: list[tuple[RankingGroup, str | None]] = []
    with read_session(database) as db:
        ctx = make_context(db, export_params_as_of(spec, as_of), secret_key)
        data.parameters = ctx.params.canonical()
        judgments = 0
        for row in formats.rankings_rows(ctx):
            ids = [c["id"] for c in row["completions"]]
            texts = [c["text"] for c in row["completions"]]
            key = prompt_key(row)
            if row["is_gold"]:
                continue  # read below with its answer, judged or not
            held_out = row["split"] == "test"
            if held_out and len(data.eval_tasks) < spec.score_tasks:
                data.eval_tasks[row["task_id"]] = (row["prompt"], ids, texts)
            for judgment in row["judgments"]:
                ranks = ranks_of(judgment["ranking"], ids)
                if ranks is None:
                    continue
                strength = judgment["strength"]
                group = RankingGroup(
                    row["prompt"],
                    texts,
                    ranks,
                    margin=abs(strength) * spec.margin_scale if strength else None,
                    prompt_key=key,
                )
                annotators.append((group, judgment["annotator"]))
                (data.eval if held_out else data.train).append(group)
                judgments += 1
        data.gold = gold_groups(ctx)
        # Imported comparisons (HH-RLHF, TRL rows imported as judged) have no judgment: each
        # is a pair of its own.
        pair_ctx = make_context(
            db, ctx.params.model_copy(update={"format": "trl", "ties": "drop"}), secret_key
        )
        imported = 0
        for row in formats.trl_rows(pair_ctx):
            if row["judgment_id"] is not None:
                continue
            group = RankingGroup(
                row["prompt"],
                [answer_text(row["chosen"]), answer_text(row["rejected"])],
                [0, 1],
                prompt_key=prompt_key(row),
            )
            (data.eval if row["split"] == "test" else data.train).append(group)
            imported += 1
    # The quality report is read after the export's transaction has ended (it may store a
    # fresh report, a write).
    reports = quality_reports(database, ctx.params, ctx.campaigns)
    ceilings = [
        r["agreement"]["pairwise_agreement"]["value"]
        for r in reports.values()
        if ((r.get("agreement") or {}).get("pairwise_agreement") or {}).get("value") is not None
    ]
    data.noise_ceiling = sum(ceilings) / len(ceilings) if ceilings else None
    if spec.labeler_weights == "agreement":
        weights = labeler_weights(reports, ctx.pseudonym)
        for group, annotator in annotators:
            group.weight = weights.get(annotator or "", 1.0)
    if spec.max_judgments is not None:
        data.train = data.train[: spec.max_judgments]
    data.counts = {
        "judgments": judgments,
        "imported_pairs": imported,
        "train_groups": len(data.train),
        "eval_groups": len(data.eval),
        "gold_tasks": len(data.gold),
        "train_pairs": sum(_pairs(g) for g in data.train),
        "eval_pairs": sum(_pairs(g) for g in data.eval),
    }
    return data


def gold_groups(ctx: Any) -> list[RankingGroup]:
    """Every gold task of the campaigns with its answer, as a ranking to evaluate against."""
    tasks = ctx.db.execute(
        select(Task.id, Task.campaign_id, Task.gold_ranking, Prompt.text, Prompt.messages)
        .join(Prompt, Prompt.id == Task.prompt_id)
        .where(
            Task.campaign_id.in_(ctx.campaign_ids),
            Task.is_gold.is_(True),
            Task.gold_ranking.is_not(None),
        )
        .order_by(Task.id)
    ).all()
    if not tasks:
        return []
    items: dict[int, list[tuple[int, str]]] = {}
    for task_id, completion_id, text in ctx.db.execute(
        select(TaskCompletion.task_id, Completion.id, Completion.text)
        .join(Completion, Completion.id == TaskCompletion.completion_id)
        .where(TaskCompletion.task_id.in_([t.id for t in tasks]))
        .order_by(TaskCompletion.task_id, TaskCompletion.position)
    ):
        items.setdefault(task_id, []).append((completion_id, text))
    groups = []
    for task in tasks:
        ids = [cid for cid, _ in items.get(task.id, [])]
        ranks = ranks_of(task.gold_ranking, ids)
        if ranks is None:
            continue
        prompt = formats.prompt_value(ctx, task.text, task.messages)
        texts = [text for _, text in items[task.id]]
        groups.append(
            RankingGroup(prompt, texts, ranks, prompt_key=f"gold:{task.id}", is_gold=True)
        )
    return groups


def _pairs(group: RankingGroup) -> int:
    k = len(group.ranks)
    return sum(1 for i in range(k) for j in range(i + 1, k) if group.ranks[i] != group.ranks[j])


def reward_config(spec: RewardJobSpec) -> RewardConfig:
    """The trainer's config from the spec's training options (same names, checked by tests)."""
    return trainer_config(RewardConfig, spec, model_name_or_path=spec.backbone)


def warm_start_path(ctx: Any, model_id: int) -> str:
    """The folder of the reward model version a warm-started run begins from."""
    from trainer.ppo_job import resolve_model_path

    with ctx.database.session() as db:
        model = db.get(ModelVersion, model_id)
        if model is None or model.kind != ModelKind.reward:
            raise ValueError(f"there is no reward model version {model_id} to warm-start from")
        return resolve_model_path(model.path, Path(ctx.settings.data_dir))


def score_tasks(
    model_dir: Path, tasks: dict[int, tuple[Any, list[int], list[str]]], device: str
) -> dict[str, dict[str, float]]:
    """The trained model's reward for each completion of the held-out tasks, by task id, for
    the jobs page to set beside the humans' rankings."""
    if not tasks:
        return {}
    scorer = RewardScorer(model_dir, device)
    out: dict[str, dict[str, float]] = {}
    for task_id, (prompt, ids, texts) in tasks.items():
        rewards = scorer.score(prompt, texts)
        out[str(task_id)] = {
            str(cid): round(float(r), 5) for cid, r in zip(ids, rewards, strict=True)
        }
    return out


def run(ctx: Any) -> dict[str, Any]:
    """The worker's entry point for `train_reward` jobs (ctx: trainer.worker.JobContext)."""
    spec = parse_reward_spec(ctx.config)
    ctx.report(0.0, "reading judgments")
    # The first attempt fixes the data's high-water mark; later attempts resume from the
    # checkpoint on exactly the same rows.
    data = read_once(
        ctx, lambda as_of: load_training_data(ctx.database, spec, ctx.settings.secret_key, as_of)
    )
    ctx.log.info("data: %s", json.dumps(data.counts, sort_keys=True))
    if not data.train:
        raise ValueError("no judgments to train on: label some tasks, or loosen the filters")
    config = reward_config(spec)
    if spec.init_model_id is not None:
        config.model_name_or_path = warm_start_path(ctx, spec.init_model_id)
        ctx.log.info("warm start from reward model version %s", spec.init_model_id)
    work_dir = Path(ctx.checkpoint_dir) / "run"

    def on_progress(fraction: float, message: str) -> None:
        ctx.report(0.02 + 0.93 * fraction, message)

    # one process, or N data-parallel ones (trainer/launch.py) with the same result, the
    # model replicated (DDP) or sharded (FSDP2)
    result = train_in_job(
        ctx,
        train,
        spec.processes,
        (config, data.train, data.eval, work_dir),
        {"gold_groups": data.gold or None, "noise_ceiling": data.noise_ceiling},
        on_progress=on_progress,
        sharding=spec.sharding,
    )
    ctx.report(0.96, "scoring held-out tasks")
    task_scores = score_tasks(work_dir, data.eval_tasks, ctx.device)

    data_ref = {
        "export_parameters": data.parameters,
        "counts": data.counts,
        "fingerprint": data.fingerprint(),
    }
    summary = {
        "training": {"config": spec.training.model_dump(), "backbone": spec.backbone},
        "data": data_ref,
        "eval": finite(result.metrics),
        "normalization": finite(result.normalization),
        "task_scores": task_scores,
    }
    folder = publish_version(
        ctx,
        spec,
        work_dir,
        "reward",
        kind=ModelKind.reward,
        metrics=summary,
        parent_id=spec.init_model_id,
    )
    return {
        "model_path": str(folder),
        "metrics": finite(result.metrics),
        "normalization": finite(result.normalization),
        "data": data_ref,
        "steps": result.steps,
    }


# --- scoring on demand ------------------------------------------------------------------------


def task_texts(db: Session, task_ids: list[int]) -> dict[int, tuple[Any, list[int], list[str]]]:
    """Each task's prompt (text, or chat messages) and completions, in task order."""
    prompts = {
        task_id: messages if messages else text
        for task_id, text, messages in db.execute(
            select(Task.id, Prompt.text, Prompt.messages)
            .join(Prompt, Prompt.id == Task.prompt_id)
            .where(Task.id.in_(task_ids))
        )
    }
    out: dict[int, tuple[Any, list[int], list[str]]] = {
        task_id: (prompt, [], []) for task_id, prompt in prompts.items()
    }
    for task_id, completion_id, text in db.execute(
        select(TaskCompletion.task_id, Completion.id, Completion.text)
        .join(Completion, Completion.id == TaskCompletion.completion_id)
        .where(TaskCompletion.task_id.in_(task_ids))
        .order_by(TaskCompletion.task_id, TaskCompletion.position)
    ):
        out[task_id][1].append(completion_id)
        out[task_id][2].append(text)
    return {task_id: out[task_id] for task_id in task_ids if task_id in out}


def score(ctx: Any) -> dict[str, Any]:
    """The worker's entry point for `score_reward` jobs: a reward model version scores the
    given tasks (kept on the version, where its page sets them beside the humans' rankings)
    or one prompt's completions (returned in the result)."""
    spec = parse_score_spec(ctx.config)
    with ctx.database.session() as db:
        model = db.get(ModelVersion, spec.model_id)
        if model is None:
            raise ValueError(f"there is no model version {spec.model_id}")
        folder = Path(ctx.settings.data_dir) / model.path
        tasks = task_texts(db, spec.task_ids) if spec.task_ids else {}
    ctx.report(0.1, "loading the reward model")
    scorer = RewardScorer(folder, ctx.device)
    if spec.task_ids is None:
        rewards = scorer.score(spec.prompt, spec.completions or [])
        ctx.report(1.0, "done")
        return {"model_id": spec.model_id, "rewards": [round(float(r), 5) for r in rewards]}
    scored: dict[str, dict[str, float]] = {}
    for done, (task_id, (prompt, ids, texts)) in enumerate(tasks.items(), start=1):
        rewards = scorer.score(prompt, texts)
        scored[str(task_id)] = {
            str(cid): round(float(r), 5) for cid, r in zip(ids, rewards, strict=True)
        }
        ctx.report(0.1 + 0.9 * done / len(tasks), f"scored {done} of {len(tasks)} tasks")
        ctx.check_stop()

    def record(db: Session) -> None:
        model = db.get_one(ModelVersion, spec.model_id)
        metrics = dict(model.metrics or {})
        metrics["task_scores"] = {**metrics.get("task_scores", {}), **scored}
        model.metrics = metrics  # a new dict, so the JSON column is written

    ctx.on_complete(record)
    return {"model_id": spec.model_id, "tasks": scored}
