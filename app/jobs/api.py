"""Training jobs and model versions over the JSON API (researchers and admins, bearer tokens):
queue a job, follow it (state, progress, metrics since a cursor, log tail), cancel or retry
it, and read the model versions it produced with their metrics and task rankings."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from app.auth.models import Role
from app.jobs import generation, registry, training
from app.jobs import service as jobs
from app.jobs.models import Job, JobState, ModelVersion
from app.jobs.specs import (
    DPO,
    GENERATE,
    PPO,
    RLOO,
    SCORE_REWARD,
    SFT,
    SpecError,
    parse_dpo_spec,
    parse_generate_spec,
    parse_ppo_spec,
    parse_reward_spec,
    parse_rloo_spec,
    parse_score_spec,
    parse_sft_spec,
)
from app.web import CurrentPrincipal, DbSession, RowId, SettingsDep, require_roles

router = APIRouter(
    prefix="/api/v1",
    tags=["jobs"],
    dependencies=[Depends(require_roles(Role.admin, Role.researcher))],
)


class JobIn(BaseModel):
    """A job to queue: its kind and configuration (for train_reward, a RewardJobSpec)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["train_reward", "score_reward", "generate", "ppo", "rloo", "sft", "dpo"]
    config: dict[str, Any]
    priority: int = Field(0, ge=-100, le=100)


def spec_status(error: SpecError) -> int:
    """404 when the spec names something that does not exist, else 422."""
    return 404 if "there is no " in str(error) else 422


class ScoreIn(BaseModel):
    """What to score: stored tasks, or one prompt's completions."""

    model_config = ConfigDict(extra="forbid")

    task_ids: list[int] | None = None
    prompt: str | list[dict[str, str]] | None = None
    completions: list[str] | None = None


def job_or_404(db: Any, job_id: int) -> Job:
    job = jobs.get(db, job_id)
    if job is None:
        raise HTTPException(404, f"There is no job {job_id}.")
    return job


def model_or_404(db: Any, model_id: int) -> ModelVersion:
    model = db.get(ModelVersion, model_id)
    if model is None:
        raise HTTPException(404, f"There is no model version {model_id}.")
    return model


def one_job(db: Any, job: Job) -> dict[str, Any]:
    models = training.models_of(db, [job.id]).get(job.id, [])
    names = training.usernames(db, {job.created_by_id} if job.created_by_id else set())
    return training.job_json(job, models, names.get(job.created_by_id or 0))


@router.post(
    "/jobs",
    status_code=201,
    responses={
        200: {
            "description": "A generate job for the same campaign from the same model or "
            "endpoint is already queued or running: that job, with `created: false`."
        }
    },
)
def create_job(
    body: JobIn, db: DbSession, principal: CurrentPrincipal, response: Response
) -> dict[str, Any]:
    """Queue a job; 422 names a bad option, 404 an unknown campaign. Nothing is queued then,
    nor when a generate job from the same model waits for the campaign (200, that job)."""
    created = True
    try:
        if body.kind == SCORE_REWARD:
            job = training.queue_scoring(
                db, parse_score_spec(body.config), actor_id=principal.user.id
            )
        elif body.kind == PPO:
            job = training.queue_ppo(
                db, parse_ppo_spec(body.config), actor_id=principal.user.id, priority=body.priority
            )
        elif body.kind == RLOO:
            job = training.queue_rloo(
                db, parse_rloo_spec(body.config), actor_id=principal.user.id, priority=body.priority
            )
        elif body.kind == SFT:
            job = training.queue_sft(
                db, parse_sft_spec(body.config), actor_id=principal.user.id, priority=body.priority
            )
        elif body.kind == DPO:
            job = training.queue_dpo(
                db, parse_dpo_spec(body.config), actor_id=principal.user.id, priority=body.priority
            )
        elif body.kind == GENERATE:
            job, created = generation.queue_unless_waiting(
                db,
                parse_generate_spec(body.config),
                actor_id=principal.user.id,
                priority=body.priority,
            )
        else:
            spec = parse_reward_spec(body.config)
            job = training.queue_reward_training(
                db, spec, actor_id=principal.user.id, priority=body.priority
            )
    except SpecError as error:
        db.rollback()
        raise HTTPException(spec_status(error), str(error)) from error
    db.commit()
    if not created:
        response.status_code = 200
    return one_job(db, job) | {"created": created}


@router.get("/jobs")
def list_jobs(
    db: DbSession,
    state: Annotated[list[JobState] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> dict[str, Any]:
    """Jobs, newest first, optionally of the given states."""
    found = jobs.list_jobs(db, states=state, limit=limit)
    models = training.models_of(db, [j.id for j in found])
    return {"jobs": [training.job_json(j, models.get(j.id, [])) for j in found]}


@router.get("/jobs/{job_id}")
def show_job(job_id: RowId, db: DbSession) -> dict[str, Any]:
    """One job: state, progress, attempt, error, result, log tail and its model versions."""
    return one_job(db, job_or_404(db, job_id))


@router.get("/jobs/{job_id}/metrics")
def job_metrics(
    job_id: RowId,
    db: DbSession,
    after: Annotated[int, Query(ge=0, description="Only metrics logged after this cursor.")] = 0,
) -> dict[str, Any]:
    """The job's metrics as {name: [[step, value], ...]} and `next_after`, the cursor for
    the next call (a live chart polls with it)."""
    job = job_or_404(db, job_id)
    series, last = training.metric_series(db, job.id, after_id=after)
    return {
        "job_id": job.id,
        "state": job.state.value,
        "progress": job.progress,
        "series": series,
        "next_after": last,
    }


def _change(change: Any, job_id: int, db: Any, principal: Any) -> dict[str, Any]:
    try:
        job = change(db, job_id, actor_id=principal.user.id)
    except jobs.JobNotFound as error:
        raise HTTPException(404, str(error)) from error
    except jobs.InvalidTransition as error:
        raise HTTPException(409, str(error)) from error
    db.commit()
    return one_job(db, job)


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: RowId, db: DbSession, principal: CurrentPrincipal) -> dict[str, Any]:
    """Cancel a waiting job now, or ask a running one to stop at its next heartbeat."""
    return _change(jobs.cancel, job_id, db, principal)


@router.post("/jobs/{job_id}/retry")
def retry_job(job_id: RowId, db: DbSession, principal: CurrentPrincipal) -> dict[str, Any]:
    """Queue a failed, dead or cancelled job again (it resumes from its checkpoint)."""
    return _change(jobs.retry, job_id, db, principal)


@router.get("/models")
def list_models(
    db: DbSession,
    kind: Annotated[Literal["policy", "reward", "reference"] | None, Query()] = None,
) -> dict[str, Any]:
    """Model versions, newest first."""
    return {"models": [training.model_json(m) for m in training.list_models(db, kind=kind)]}


@router.get("/models/{model_id}")
def show_model(model_id: RowId, db: DbSession) -> dict[str, Any]:
    """A model version: where its files are, how it was trained, its evaluation."""
    return training.model_json(model_or_404(db, model_id))


@router.post("/models/{model_id}/score", status_code=202)
def score_with_model(
    model_id: RowId, body: ScoreIn, db: DbSession, principal: CurrentPrincipal
) -> dict[str, Any]:
    """Queue a `score_reward` job: the model scores the tasks (then
    `GET /models/{id}/tasks/{task_id}` sets them beside the humans') or the prompt's
    completions (the job's `result.rewards`). Poll the job's URL."""
    try:
        spec = parse_score_spec({"model_id": model_id, **body.model_dump(exclude_none=True)})
        job = training.queue_scoring(db, spec, actor_id=principal.user.id)
    except SpecError as error:
        db.rollback()
        raise HTTPException(spec_status(error), str(error)) from error
    db.commit()
    return one_job(db, job)


@router.get("/models/{model_id}/tasks/{task_id}")
def model_task(model_id: RowId, task_id: RowId, db: DbSession) -> dict[str, Any]:
    """A held-out task the reward model scored: each completion's reward, the model's
    ranking and the labelers' consensus and rankings, side by side."""
    model = model_or_404(db, model_id)
    found = training.compare_task(db, model, task_id)
    if found is None:
        raise HTTPException(404, f"Model version {model.id} did not score task {task_id}.")
    return {
        "model_id": model.id,
        "task_id": task_id,
        "completions": [{k: c[k] for k in ("id", "reward")} for c in found.completions],
        "model_ranking": found.model,
        "human_consensus": found.human,
        "judgments": [{"ranking": r} for _, r in found.judgments],
        "pair_agreement": found.pair_agreement,
    }


class ModelIn(BaseModel):
    """A model trained elsewhere, to register as a version."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    path: str = Field(min_length=1, max_length=1000, description="A folder or a hub id.")
    kind: Literal["policy", "reward"] = "policy"
    algorithm: str | None = Field(None, description="base or sft (policy), reward.")
    parent_id: int | None = None


@router.post("/models", status_code=201, dependencies=[Depends(require_roles(Role.admin))])
def register_model(
    body: ModelIn, db: DbSession, principal: CurrentPrincipal, settings: SettingsDep
) -> dict[str, Any]:
    """Register a model folder (absolute, or under PREFLOOP_DATA_DIR) or hub id (admins);
    422 says what is wrong with it."""
    try:
        model = registry.register(
            db,
            **body.model_dump(),
            data_dir=settings.data_dir,
            actor_id=principal.user.id,
        )
    except registry.RegistryError as error:
        db.rollback()
        status = 404 if "there is no model version" in str(error) else 422
        raise HTTPException(status, str(error)) from error
    db.commit()
    return training.model_json(model)
