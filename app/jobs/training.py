"""Training jobs as the server sees them: queue one from a checked spec, and read back what
the worker produced (metrics, model versions, a model's ranking of a task beside the
humans'). No torch here: the worker (`trainer/`) does the training and the scoring."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.auth.models import User
from app.campaigns import service as campaigns
from app.campaigns.models import Campaign
from app.jobs import service as jobs
from app.jobs.models import Job, JobMetric, ModelVersion
from app.jobs.specs import (
    PPO,
    SCORE_REWARD,
    SFT,
    TRAIN_REWARD,
    PPOJobSpec,
    RewardJobSpec,
    ScoreJobSpec,
    SFTJobSpec,
    SpecError,
)
from app.labeling.models import Judgment, Task
from app.quality import metrics as quality_metrics

CHART_METRICS_LIMIT = 5_000


def campaigns_named(db: Session, slugs: list[str]) -> list[Campaign]:
    """The campaigns of these slugs, in order; SpecError names the first unknown one."""
    found: list[Campaign] = []
    for slug in slugs:
        campaign = campaigns.get_by_slug(db, slug)
        if campaign is None:
            raise SpecError(f"campaigns: there is no campaign '{slug}'")
        found.append(campaign)
    return found


def queue_reward_training(
    db: Session, spec: RewardJobSpec, *, actor_id: int | None, priority: int = 0
) -> Job:
    """Queue a `train_reward` job; an unknown campaign is SpecError and queues nothing."""
    found = campaigns_named(db, spec.campaigns)
    job = jobs.enqueue(
        db,
        kind=TRAIN_REWARD,
        config=spec.model_dump(mode="json"),
        campaign_id=found[0].id,
        created_by_id=actor_id,
        priority=priority,
    )
    audit.record(
        db,
        actor_id=actor_id,
        action="job.create",
        entity_type="job",
        entity_id=job.id,
        after={"kind": job.kind, "campaigns": spec.campaigns, "backbone": spec.backbone},
    )
    return job


def queue_scoring(db: Session, spec: ScoreJobSpec, *, actor_id: int | None) -> Job:
    """Queue a `score_reward` job for a reward model version (SpecError if it is not one)."""
    model = db.get(ModelVersion, spec.model_id)
    if model is None or model.kind.value != "reward":
        raise SpecError(f"model_id: there is no reward model version {spec.model_id}")
    if spec.task_ids:
        found = set(db.scalars(select(Task.id).where(Task.id.in_(spec.task_ids))))
        missing = sorted(set(spec.task_ids) - found)
        if missing:
            raise SpecError(f"task_ids: there is no task {missing[0]}")
    job = jobs.enqueue(
        db,
        kind=SCORE_REWARD,
        config=spec.model_dump(mode="json", exclude_none=True),
        campaign_id=model.campaign_id,
        created_by_id=actor_id,
        priority=10,  # a person is waiting for it
    )
    audit.record(
        db,
        actor_id=actor_id,
        action="job.create",
        entity_type="job",
        entity_id=job.id,
        after={"kind": job.kind, "model_id": model.id, "task_ids": spec.task_ids},
    )
    return job


def queue_ppo(db: Session, spec: PPOJobSpec, *, actor_id: int | None, priority: int = 0) -> Job:
    """Queue a `ppo` job; unknown campaigns or model versions of the wrong kind are
    SpecError and queue nothing."""
    found = campaigns_named(db, spec.campaigns)
    policy = db.get(ModelVersion, spec.policy_id)
    if policy is None or policy.kind.value != "policy":
        raise SpecError(f"policy_id: there is no policy model version {spec.policy_id}")
    reward = db.get(ModelVersion, spec.reward_model_id)
    if reward is None or reward.kind.value != "reward":
        raise SpecError(f"reward_model_id: there is no reward model version {spec.reward_model_id}")
    job = jobs.enqueue(
        db,
        kind=PPO,
        config=spec.model_dump(mode="json"),
        campaign_id=found[0].id,
        created_by_id=actor_id,
        priority=priority,
    )
    audit.record(
        db,
        actor_id=actor_id,
        action="job.create",
        entity_type="job",
        entity_id=job.id,
        after={
            "kind": job.kind,
            "campaigns": spec.campaigns,
            "policy_id": policy.id,
            "reward_model_id": reward.id,
        },
    )
    return job


def metric_series(
    db: Session, job_id: int, *, after_id: int = 0, limit: int = CHART_METRICS_LIMIT
) -> tuple[dict[str, list[tuple[int, float]]], int]:
    """The job's metrics logged after `after_id`, as name -> [(step, value)], and the last id
    read (the cursor a chart polls with)."""
    rows = db.execute(
        select(JobMetric.id, JobMetric.name, JobMetric.step, JobMetric.value)
        .where(JobMetric.job_id == job_id, JobMetric.id > after_id)
        .order_by(JobMetric.id)
        .limit(limit)
    ).all()
    series: dict[str, list[tuple[int, float]]] = {}
    for _id, name, step, value in rows:
        series.setdefault(name, []).append((step, value))
    return series, (rows[-1][0] if rows else after_id)


def models_of(db: Session, job_ids: list[int]) -> dict[int, list[ModelVersion]]:
    """The model versions each job produced."""
    if not job_ids:
        return {}
    out: dict[int, list[ModelVersion]] = {}
    query = select(ModelVersion).where(ModelVersion.job_id.in_(job_ids)).order_by(ModelVersion.id)
    for model in db.scalars(query):
        out.setdefault(model.job_id or 0, []).append(model)
    return out


def list_models(db: Session, *, kind: str | None = None, limit: int = 100) -> list[ModelVersion]:
    query = select(ModelVersion).order_by(ModelVersion.id.desc()).limit(limit)
    if kind:
        query = query.where(ModelVersion.kind == kind)
    return list(db.scalars(query))


def get_model(db: Session, ref: str | int) -> ModelVersion | None:
    """A model version by id, or by name when `ref` is not a number (the newest of that name)."""
    text = str(ref)
    if text.isdigit():
        return db.get(ModelVersion, int(text))
    return db.scalars(
        select(ModelVersion).where(ModelVersion.name == text).order_by(ModelVersion.id.desc())
    ).first()


def usernames(db: Session, ids: set[int]) -> dict[int, str]:
    if not ids:
        return {}
    return dict(db.execute(select(User.id, User.username).where(User.id.in_(ids))).tuples().all())


@dataclass
class TaskComparison:
    """A task the model scored, its completions, and how the humans and the model rank them."""

    task: Task
    completions: list[dict[str, Any]]  # id, text, reward, model_place, human_place
    human: list[list[int]]  # consensus of the current judgments (Bradley-Terry)
    model: list[list[int]]  # by reward, best first
    judgments: list[tuple[str, list[list[int]]]]  # (labeler, ranking)
    pair_agreement: float | None  # share of the consensus's untied pairs the model orders alike


def scored_task_ids(model: ModelVersion) -> list[int]:
    return sorted(int(t) for t in (model.metrics or {}).get("task_scores", {}))


def compare_task(db: Session, model: ModelVersion, task_id: int) -> TaskComparison | None:
    """The model's ranking of a held-out task beside the humans' (None if it did not score it)."""
    scores = (model.metrics or {}).get("task_scores", {}).get(str(task_id))
    task = db.get(Task, task_id)
    if scores is None or task is None:
        return None
    rows = db.execute(
        select(Judgment.user_id, Judgment.ranking)
        .where(
            Judgment.task_id == task_id,
            Judgment.is_current.is_(True),
            Judgment.ranking.is_not(None),
        )
        .order_by(Judgment.id)
    ).all()
    names = usernames(db, {user_id for user_id, _ in rows})
    rankings = [ranking for _, ranking in rows]
    human = quality_metrics.consensus(rankings).ranking if rankings else []
    rewards = {int(cid): float(value) for cid, value in scores.items()}
    order = sorted(rewards, key=lambda cid: -rewards[cid])
    model_ranking = [[cid] for cid in order]
    human_place = {cid: i for i, tied in enumerate(human) for cid in tied}
    model_place = {cid: i for i, cid in enumerate(order)}
    agree = total = 0
    ids = list(rewards)
    for i, a in enumerate(ids):
        for b in ids[i + 1 :]:
            if a in human_place and b in human_place and human_place[a] != human_place[b]:
                total += 1
                agree += (human_place[a] < human_place[b]) == (rewards[a] > rewards[b])
    completions = [
        {
            "id": item.completion_id,
            "text": item.completion.text,
            "reward": rewards.get(item.completion_id),
            "model_place": model_place.get(item.completion_id),
            "human_place": human_place.get(item.completion_id),
        }
        for item in task.items
    ]
    return TaskComparison(
        task=task,
        completions=completions,
        human=human,
        model=model_ranking,
        judgments=[(names.get(u, str(u)), r) for u, r in rows],
        pair_agreement=agree / total if total else None,
    )


def model_json(model: ModelVersion) -> dict[str, Any]:
    metrics = dict(model.metrics or {})
    scored = sorted(int(t) for t in metrics.pop("task_scores", {}) or {})
    return {
        "id": model.id,
        "url": f"/api/v1/models/{model.id}",
        "name": model.name,
        "kind": model.kind.value,
        "algorithm": model.algorithm,
        "path": model.path,
        "job_id": model.job_id,
        "campaign_id": model.campaign_id,
        "parent_id": model.parent_id,
        "created_at": model.created_at.isoformat(),
        "metrics": metrics,
        "scored_tasks": scored,
    }


def job_json(
    job: Job, models: list[ModelVersion] | None = None, created_by: str | None = None
) -> dict[str, Any]:
    return {
        "id": job.id,
        "url": f"/api/v1/jobs/{job.id}",
        "kind": job.kind,
        "state": job.state.value,
        "campaign_id": job.campaign_id,
        "config": job.config,
        "priority": job.priority,
        "attempt": job.attempt,
        "max_attempts": job.max_attempts,
        "progress": job.progress,
        "progress_message": job.progress_message,
        "cancel_requested": job.cancel_requested,
        "worker_id": job.worker_id,
        "error": job.error,
        "result": job.result,
        "log_tail": job.log_tail,
        "created_by": created_by,
        "created_at": job.created_at.isoformat(),
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "models": [model_json(m) for m in models or []],
    }


# --- PPO health ---------------------------------------------------------------------------------

LENGTH_HACK_CORRELATION = 0.5  # reward ~ response length correlation that looks like verbosity
LENGTH_HACK_GROWTH = 1.2  # responses this much longer than at the start
WINDOW = 5  # steps averaged at each end of the run


def _window_mean(points: list[tuple[int, float]], last: bool) -> float | None:
    chosen = points[-WINDOW:] if last else points[:WINDOW]
    return sum(v for _, v in chosen) / len(chosen) if chosen else None


def ppo_warnings(series: dict[str, list[tuple[int, float]]], config: dict[str, Any]) -> list[str]:
    """What a PPO run's metrics say is going wrong, in words for its page:

    - the KL to the starting policy (mean over the last steps) is past its budget (the job's
      `kl_budget`, else the adaptive controller's target);
    - the reward rises with response length alone: reward and length correlate strongly
      while responses grow, the verbosity that reward models are known to reward."""
    warnings = []
    training = config.get("training", {})
    budget = config.get("kl_budget") or (
        training.get("kl_target") if training.get("adaptive_kl") else None
    )
    kl = _window_mean(series.get("kl/k1", []), last=True)
    if budget is not None and kl is not None and kl > budget:
        warnings.append(
            f"KL to the starting policy is {kl:.2f} nats over the last steps, past its budget "
            f"of {budget:g}: the policy is drifting; lower the learning rate or raise beta."
        )
    correlation = _window_mean(series.get("response/length_reward_corr", []), last=True)
    lengths = series.get("response/length", [])
    start, end = _window_mean(lengths, last=False), _window_mean(lengths, last=True)
    if (
        correlation is not None
        and correlation > LENGTH_HACK_CORRELATION
        and start
        and end is not None
        and len(lengths) > WINDOW
        and end > LENGTH_HACK_GROWTH * start
    ):
        warnings.append(
            f"Reward rises with length: responses grew from {start:.0f} to {end:.0f} tokens "
            f"and reward correlates {correlation:.2f} with length. The reward model may be "
            "paying for verbosity; check samples before trusting the gain."
        )
    return warnings


def queue_sft(db: Session, spec: SFTJobSpec, *, actor_id: int | None, priority: int = 0) -> Job:
    """Queue an `sft` job; an unknown campaign, one that is not a demonstration campaign, or a
    model version that is not a policy is SpecError and queues nothing."""
    found = campaigns_named(db, spec.campaigns)
    for campaign, slug in zip(found, spec.campaigns, strict=True):
        if campaign.mode.value != "demonstration":
            raise SpecError(
                f"campaigns: '{slug}' is a {campaign.mode.value} campaign; SFT learns from "
                "demonstration campaigns"
            )
    policy = db.get(ModelVersion, spec.model_id)
    if policy is None or policy.kind.value != "policy":
        raise SpecError(f"model_id: there is no policy model version {spec.model_id}")
    job = jobs.enqueue(
        db,
        kind=SFT,
        config=spec.model_dump(mode="json"),
        campaign_id=found[0].id,
        created_by_id=actor_id,
        priority=priority,
    )
    audit.record(
        db,
        actor_id=actor_id,
        action="job.create",
        entity_type="job",
        entity_id=job.id,
        after={"kind": job.kind, "campaigns": spec.campaigns, "model_id": policy.id},
    )
    return job
