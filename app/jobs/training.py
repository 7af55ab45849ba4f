"""Training jobs as the server sees them: queue one from a checked spec, and read back what
the worker produced (metrics, model versions, a model's ranking of a task beside the
humans'). No torch here: the worker (`trainer/`) does the training and the scoring."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.auth.models import User
from app.campaigns import service as campaigns
from app.campaigns.models import Campaign
from app.jobs import service as jobs
from app.jobs.models import Job, JobMetric, ModelVersion
from app.jobs.specs import (
    DPO,
    PPO,
    RLOO,
    SCORE_REWARD,
    SFT,
    TRAIN_REWARD,
    DPOJobSpec,
    PPOJobSpec,
    RewardJobSpec,
    RLOOJobSpec,
    ScoreJobSpec,
    SFTJobSpec,
    SpecError,
)
from app.labeling.models import Judgment, Task
from app.quality import metrics as quality_metrics

CHART_METRICS_LIMIT = 5_000
# What PPO and RLOO start from: spec field -> model kind.
ONLINE_RL_MODELS = {"policy_id": "policy", "reward_model_id": "reward"}


def campaigns_named(db: Session, slugs: list[str]) -> list[Campaign]:
    """The campaigns of these slugs, in order; SpecError names the first unknown one."""
    found: list[Campaign] = []
    for slug in slugs:
        campaign = campaigns.get_by_slug(db, slug)
        if campaign is None:
            raise SpecError(f"campaigns: there is no campaign '{slug}'")
        found.append(campaign)
    return found


def _model_version(db: Session, field: str, model_id: int, kind: str) -> ModelVersion:
    """The model version a spec's `field` names; SpecError unless it is one of this kind."""
    model = db.get(ModelVersion, model_id)
    if model is None or model.kind.value != kind:
        raise SpecError(f"{field}: there is no {kind} model version {model_id}")
    return model


def _enqueue(
    db: Session,
    kind: str,
    config: dict[str, Any],
    *,
    campaign_id: int | None,
    actor_id: int | None,
    priority: int,
    audited: dict[str, Any],
) -> Job:
    """Enqueue the job and record who asked for it (`audited`: what the audit log shows)."""
    job = jobs.enqueue(
        db,
        kind=kind,
        config=config,
        campaign_id=campaign_id,
        created_by_id=actor_id,
        priority=priority,
    )
    audit.record(
        db,
        actor_id=actor_id,
        action="job.create",
        entity_type="job",
        entity_id=job.id,
        after={"kind": job.kind, **audited},
    )
    return job


def _queue_training(
    db: Session,
    kind: str,
    spec: BaseModel,
    *,
    actor_id: int | None,
    priority: int,
    models: dict[str, str],
    audited: dict[str, Any],
    demonstrations: bool | None = None,
    learns_from: str = "",
) -> Job:
    """Queue a training job on the spec's campaigns (the first is the job's): every campaign
    must exist and, when `demonstrations` is set, be (True) or not be (False) a demonstration
    campaign, else SpecError says what the kind `learns_from`; each of `models` (spec field:
    model kind) must name a version of that kind (None: no such version asked for). The
    audit log gets the kind, the campaigns and `audited`. SpecError queues nothing."""
    slugs: list[str] = spec.campaigns
    found = campaigns_named(db, slugs)
    for campaign, slug in zip(found, slugs, strict=True):
        mode = campaign.mode.value
        if demonstrations is not None and (mode == "demonstration") != demonstrations:
            raise SpecError(f"campaigns: '{slug}' is a {mode} campaign; {learns_from}")
    for field, model_kind in models.items():
        if (model_id := getattr(spec, field)) is not None:
            _model_version(db, field, model_id, model_kind)
    return _enqueue(
        db,
        kind,
        spec.model_dump(mode="json"),
        campaign_id=found[0].id,
        actor_id=actor_id,
        priority=priority,
        audited={"campaigns": slugs, **audited},
    )


def queue_reward_training(
    db: Session, spec: RewardJobSpec, *, actor_id: int | None, priority: int = 0
) -> Job:
    """Queue a `train_reward` job; an unknown campaign, or a warm start from something that
    is not a reward model version, is SpecError and queues nothing. A warm start records
    the backbone its model was trained from (the weights come from the model)."""
    if spec.init_model_id is not None:
        start = _model_version(db, "init_model_id", spec.init_model_id, "reward")
        spec = spec.model_copy(update={"backbone": backbone_of(start)})
    return _queue_training(
        db,
        TRAIN_REWARD,
        spec,
        actor_id=actor_id,
        priority=priority,
        models={"init_model_id": "reward"},
        audited={"backbone": spec.backbone},
    )


def backbone_of(model: ModelVersion) -> str:
    """The backbone a reward model version was trained from (its own folder if unrecorded)."""
    recorded = ((model.metrics or {}).get("training") or {}).get("backbone")
    return recorded or model.path


def queue_scoring(db: Session, spec: ScoreJobSpec, *, actor_id: int | None) -> Job:
    """Queue a `score_reward` job for a reward model version (SpecError if it is not one)."""
    model = _model_version(db, "model_id", spec.model_id, "reward")
    if spec.task_ids:
        found = set(db.scalars(select(Task.id).where(Task.id.in_(spec.task_ids))))
        missing = sorted(set(spec.task_ids) - found)
        if missing:
            raise SpecError(f"task_ids: there is no task {missing[0]}")
    return _enqueue(
        db,
        SCORE_REWARD,
        spec.model_dump(mode="json", exclude_none=True),
        campaign_id=model.campaign_id,
        actor_id=actor_id,
        priority=10,  # a person is waiting for it
        audited={"model_id": model.id, "task_ids": spec.task_ids},
    )


def queue_ppo(db: Session, spec: PPOJobSpec, *, actor_id: int | None, priority: int = 0) -> Job:
    """Queue a `ppo` job; unknown campaigns or model versions of the wrong kind are
    SpecError and queue nothing."""
    return _queue_training(
        db,
        PPO,
        spec,
        actor_id=actor_id,
        priority=priority,
        models=ONLINE_RL_MODELS,
        audited={"policy_id": spec.policy_id, "reward_model_id": spec.reward_model_id},
    )


def queue_rloo(db: Session, spec: RLOOJobSpec, *, actor_id: int | None, priority: int = 0) -> Job:
    """Queue an `rloo` job; unknown campaigns or model versions of the wrong kind are
    SpecError and queue nothing."""
    return _queue_training(
        db,
        RLOO,
        spec,
        actor_id=actor_id,
        priority=priority,
        models=ONLINE_RL_MODELS,
        audited={
            "policy_id": spec.policy_id,
            "reward_model_id": spec.reward_model_id,
            "k": spec.training.k,
        },
    )


def queue_sft(db: Session, spec: SFTJobSpec, *, actor_id: int | None, priority: int = 0) -> Job:
    """Queue an `sft` job; an unknown campaign, one that is not a demonstration campaign, or a
    model version that is not a policy is SpecError and queues nothing."""
    return _queue_training(
        db,
        SFT,
        spec,
        actor_id=actor_id,
        priority=priority,
        models={"model_id": "policy"},
        audited={"model_id": spec.model_id},
        demonstrations=True,
        learns_from="SFT learns from demonstration campaigns",
    )


def queue_dpo(db: Session, spec: DPOJobSpec, *, actor_id: int | None, priority: int = 0) -> Job:
    """Queue a `dpo` job; an unknown campaign, a demonstration campaign (it has no
    comparisons), or a model version that is not a policy is SpecError and queues nothing."""
    return _queue_training(
        db,
        DPO,
        spec,
        actor_id=actor_id,
        priority=priority,
        models={"model_id": "policy"},
        audited={"model_id": spec.model_id},
        demonstrations=False,
        learns_from="DPO learns from comparisons (rank and pairwise campaigns, imported pairs)",
    )


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
    """What a PPO or RLOO run's metrics say is going wrong, in words for its page (both log
    `kl/k1` per response and the length metrics under the same names):

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
