"""The loop: when enough new human comparisons have arrived in a campaign, warm-start the
reward model on everything labeled so far, optimise the policy (PPO, DPO or RLOO), and sample
fresh completions from the new policy for labeling, with a share of audit pairs against its
parent. Each step is an ordinary job; `tick` moves every loop along and is what the workers
call between jobs (and the loop page's "check now").

    iteration n:  train_reward (warm start)  ->  ppo | dpo | rloo  ->  generate (+ audits)

Services flush; the caller commits. `tick` locks each loop row it advances (FOR UPDATE SKIP
LOCKED on PostgreSQL, so two workers never advance the same loop twice), and moves an
iteration to its next stage with a compare-and-set on the stage, which SQLite's one writer
at a time makes safe as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.campaigns.models import Campaign
from app.db import utcnow
from app.jobs import registry, specs, training
from app.jobs import service as jobs
from app.jobs.models import Job, JobState, ModelKind, ModelVersion
from app.labeling.models import Comparison, ComparisonSource
from app.loop.models import LoopIteration, LoopState, PolicyLoop, Stage
from app.validation import humane_errors

ALGORITHMS = ("ppo", "dpo", "rloo")
OPEN_STAGES = (Stage.reward, Stage.policy, Stage.generate)
STOPPED_JOB_STATES = (JobState.dead, JobState.cancelled)


class LoopError(ValueError):
    """A loop that cannot be configured or changed as asked; the message says why."""


class LoopConfig(BaseModel):
    """What an admin sets for a campaign's loop. `reward`, `policy` and `generate` are extra
    options of each step's job spec (e.g. {"training": {"total_steps": 50}}), checked when
    the loop is saved."""

    model_config = ConfigDict(extra="forbid")

    algorithm: Literal["ppo", "dpo", "rloo"] = "ppo"
    policy_id: int = Field(ge=1, description="The policy version the loop starts from.")
    reward_model_id: int | None = Field(
        None, ge=1, description="The reward model version to warm-start from."
    )
    reward_backbone: str | None = Field(
        None, max_length=500, description="Without a reward model: the backbone to train one on."
    )
    min_new_comparisons: int = Field(200, ge=1, le=10_000_000)
    audit_share: float = Field(0.2, ge=0, le=1)
    reward: dict[str, Any] = Field(default_factory=dict)
    policy: dict[str, Any] = Field(default_factory=dict)
    generate: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _reward_source(self) -> LoopConfig:
        if self.reward_model_id is None and not (self.reward_backbone or "").strip():
            raise ValueError("give a reward model version to warm-start, or a backbone")
        return self


def parse_config(raw: dict[str, Any]) -> LoopConfig:
    try:
        return LoopConfig.model_validate(raw)
    except ValidationError as error:
        raise LoopError(humane_errors(error)) from error


# --- the step specs ------------------------------------------------------------------------


def reward_spec(
    db: Session, loop: PolicyLoop, campaign: Campaign, number: int
) -> specs.RewardJobSpec:
    return specs.parse_reward_spec(
        {
            "backbone": loop.reward_backbone,  # a warm start records its own instead
            "campaigns": [campaign.slug],
            "name": f"{campaign.slug} loop {number} reward",
            **loop.config.get("reward", {}),
            "init_model_id": loop.reward_model_id,
        }
    )


def policy_spec(loop: PolicyLoop, campaign: Campaign, number: int, reward_model_id: int) -> Any:
    """The spec of the policy step: PPO or RLOO against the new reward model, or DPO on the
    campaign's comparisons; every one starts from the loop's current policy."""
    options = dict(loop.config.get("policy", {}))
    name = f"{campaign.slug} loop {number} {loop.algorithm}"
    base = {"campaigns": [campaign.slug], "name": name, **options}
    if loop.algorithm == "ppo":
        return specs.parse_ppo_spec(
            {**base, "policy_id": loop.policy_id, "reward_model_id": reward_model_id}
        )
    if loop.algorithm == "rloo":
        return specs.parse_rloo_spec(
            {**base, "policy_id": loop.policy_id, "reward_model_id": reward_model_id}
        )
    return specs.parse_dpo_spec({**base, "model_id": loop.policy_id})


def generate_spec(
    loop: PolicyLoop, campaign: Campaign, iteration: LoopIteration
) -> specs.GenerateJobSpec:
    assert iteration.policy_id is not None
    return specs.parse_generate_spec(
        {
            **loop.config.get("generate", {}),
            "campaign": campaign.slug,
            "model_id": iteration.policy_id,
            "audit_against_id": iteration.parent_policy_id,
            "audit_share": loop.audit_share,
            "reward_model_id": iteration.reward_model_id,
            "reference_id": loop.reference_id,
        }
    )


def _queue_policy(db: Session, spec: Any, algorithm: str, actor_id: int | None) -> Job:
    queue = {"ppo": training.queue_ppo, "rloo": training.queue_rloo, "dpo": training.queue_dpo}
    return queue[algorithm](db, spec, actor_id=actor_id)


def _queue_stage(
    db: Session,
    loop: PolicyLoop,
    campaign: Campaign,
    iteration: LoopIteration,
    stage: Stage,
    actor_id: int | None,
) -> Job:
    """Queue the job of `stage` for the iteration from the loop's current options and
    versions (the policy step reads iteration.reward_model_id, generate its policy_id)."""
    if stage == Stage.reward:
        spec = reward_spec(db, loop, campaign, iteration.number)
        return training.queue_reward_training(db, spec, actor_id=actor_id)
    if stage == Stage.policy:
        assert iteration.reward_model_id is not None
        spec = policy_spec(loop, campaign, iteration.number, iteration.reward_model_id)
        return _queue_policy(db, spec, loop.algorithm, actor_id)
    spec = generate_spec(loop, campaign, iteration)
    return registry.queue_generation(db, spec, actor_id=actor_id)


# --- configuring ---------------------------------------------------------------------------


def get_loop(db: Session, campaign_id: int) -> PolicyLoop | None:
    return db.scalar(select(PolicyLoop).where(PolicyLoop.campaign_id == campaign_id))


def _check_versions(db: Session, config: LoopConfig) -> None:
    policy = db.get(ModelVersion, config.policy_id)
    if policy is None or policy.kind != ModelKind.policy:
        raise LoopError(f"policy_id: there is no policy model version {config.policy_id}")
    if config.reward_model_id is not None:
        reward = db.get(ModelVersion, config.reward_model_id)
        if reward is None or reward.kind != ModelKind.reward:
            raise LoopError(
                f"reward_model_id: there is no reward model version {config.reward_model_id}"
            )


def _check_steps(db: Session, loop: PolicyLoop, campaign: Campaign) -> None:
    """Build each step's spec now, so a bad option is refused when the loop is saved rather
    than when its iteration reaches that step."""
    trial = LoopIteration(number=0, parent_policy_id=loop.policy_id, policy_id=loop.policy_id)
    trial.reward_model_id = loop.reward_model_id
    try:
        reward_spec(db, loop, campaign, 0)
        policy_spec(loop, campaign, 0, loop.reward_model_id or 1)
        generate_spec(loop, campaign, trial)
    except specs.SpecError as error:
        raise LoopError(str(error)) from error


def configure(
    db: Session, campaign: Campaign, config: LoopConfig, *, actor_id: int | None
) -> PolicyLoop:
    """Create or change the campaign's loop (it starts active). A loop that has run keeps its
    current policy and reward model unless the config names other ones."""
    _check_versions(db, config)
    start = db.get(ModelVersion, config.reward_model_id) if config.reward_model_id else None
    loop = get_loop(db, campaign.id)
    before = _summary(loop) if loop else None
    if loop is None:
        loop = PolicyLoop(
            campaign_id=campaign.id,
            reference_id=config.policy_id,
            comparison_mark=0,
            created_by_id=actor_id,
        )
        db.add(loop)
    if before is None or config.policy_id != before["policy_id"]:
        loop.policy_id = config.policy_id
        loop.reference_id = config.policy_id
    if before is None or config.reward_model_id != before["reward_model_id"]:
        loop.reward_model_id = config.reward_model_id
        # What the chosen reward model already learned from is not new: count from there.
        loop.comparison_mark = max(loop.comparison_mark or 0, trained_through(start, campaign))
    loop.algorithm = config.algorithm
    loop.reward_backbone = (config.reward_backbone or "").strip() or None
    loop.min_new_comparisons = config.min_new_comparisons
    loop.audit_share = config.audit_share
    loop.config = {"reward": config.reward, "policy": config.policy, "generate": config.generate}
    loop.state = LoopState.active
    loop.paused_reason = None
    _check_steps(db, loop, campaign)
    db.flush()
    audit.record(
        db,
        actor_id=actor_id,
        action="loop.configure",
        entity_type="policy_loop",
        entity_id=loop.id,
        before=before,
        after=_summary(loop),
    )
    return loop


def _summary(loop: PolicyLoop) -> dict[str, Any]:
    return {
        "algorithm": loop.algorithm,
        "policy_id": loop.policy_id,
        "reward_model_id": loop.reward_model_id,
        "min_new_comparisons": loop.min_new_comparisons,
        "audit_share": loop.audit_share,
        "state": loop.state.value if loop.state else None,
        "config": loop.config,
    }


def pause(db: Session, loop: PolicyLoop, *, actor_id: int | None, reason: str = "") -> None:
    """No new step or iteration starts; a running step's job runs to its end."""
    loop.state = LoopState.paused
    loop.paused_reason = reason.strip() or "paused by an admin"
    db.flush()
    audit.record(
        db,
        actor_id=actor_id,
        action="loop.pause",
        entity_type="policy_loop",
        entity_id=loop.id,
        after={"reason": loop.paused_reason},
    )


def resume(db: Session, loop: PolicyLoop, *, actor_id: int | None) -> Job | None:
    """Active again. A step whose job died or was cancelled gets a new job (returned) built
    from the loop's current options, so options fixed since then apply; the old job stays as
    it was, for its history. When the new job cannot be queued the loop stays paused with
    the reason (None is returned)."""
    iteration = open_iteration(db, loop)
    job = current_job(db, iteration) if iteration else None
    queued = None
    if iteration is not None and job is not None and job.state in STOPPED_JOB_STATES:
        campaign = db.get_one(Campaign, loop.campaign_id)
        try:
            with db.begin_nested():  # a spec that fails half-way leaves no job behind
                queued = _queue_stage(db, loop, campaign, iteration, iteration.stage, actor_id)
                job_field = f"{iteration.stage.value}_job_id"
                if not _move(db, iteration, iteration.stage, error=None, **{job_field: queued.id}):
                    raise RuntimeError("the iteration moved under this resume")
        except (specs.SpecError, LoopError) as error:
            reason = f"iteration {iteration.number}: a new {job.kind} job cannot be queued: {error}"
            _pause(db, loop, reason)
            audit.record(
                db,
                actor_id=actor_id,
                action="loop.resume",
                entity_type="policy_loop",
                entity_id=loop.id,
                after={"state": loop.state.value, "reason": reason},
            )
            return None
    loop.state = LoopState.active
    loop.paused_reason = None
    db.flush()
    audit.record(
        db,
        actor_id=actor_id,
        action="loop.resume",
        entity_type="policy_loop",
        entity_id=loop.id,
        after={
            "queued_job_id": queued.id if queued else None,
            "replaced_job_id": job.id if queued and job else None,
        },
    )
    return queued


def abandon(db: Session, loop: PolicyLoop, *, actor_id: int | None) -> LoopIteration | None:
    """End the open iteration as failed (its running job is cancelled) and put the loop back
    where the iteration started: the versions it adopted from it go back to the ones it
    started from (its parent policy, the reward model its reward job warm-started from),
    and its comparisons count as new again, so the next iteration need not wait for as many
    more. A version the loop was set to by hand meanwhile stays."""
    iteration = open_iteration(db, loop)
    if iteration is None:
        return None
    job = current_job(db, iteration)
    if job is not None and job.state in (JobState.queued, JobState.running):
        jobs.cancel(db, job.id, actor_id=actor_id)
    iteration.stage = Stage.failed
    iteration.error = iteration.error or "abandoned by an admin"
    iteration.finished_at = utcnow()
    reward_job = db.get(Job, iteration.reward_job_id) if iteration.reward_job_id else None
    start_rm_id = (reward_job.config or {}).get("init_model_id") if reward_job else None
    if iteration.reward_model_id is not None and loop.reward_model_id == iteration.reward_model_id:
        loop.reward_model_id = start_rm_id
    if iteration.policy_id is not None and loop.policy_id == iteration.policy_id:
        loop.policy_id = iteration.parent_policy_id
    finished_mark = db.scalar(
        select(func.max(LoopIteration.comparison_mark)).where(
            LoopIteration.loop_id == loop.id,
            LoopIteration.number < iteration.number,
            LoopIteration.stage == Stage.done,
        )
    )
    start_rm = db.get(ModelVersion, start_rm_id) if start_rm_id else None
    campaign = db.get_one(Campaign, loop.campaign_id)
    # What the starting reward model was trained on is not new (as when the loop was set up).
    loop.comparison_mark = max(finished_mark or 0, trained_through(start_rm, campaign))
    db.flush()
    audit.record(
        db,
        actor_id=actor_id,
        action="loop.abandon",
        entity_type="policy_loop",
        entity_id=loop.id,
        after={
            "iteration": iteration.number,
            "policy_id": loop.policy_id,
            "reward_model_id": loop.reward_model_id,
            "comparison_mark": loop.comparison_mark,
        },
    )
    return iteration


ACTIONS = ("pause", "resume", "tick", "abandon")


def act(db: Session, loop: PolicyLoop, action: str, *, actor_id: int | None) -> str:
    """Pause, resume, tick (check now) or abandon, for the page and the CLI; a sentence
    saying what happened."""
    if action == "pause":
        pause(db, loop, actor_id=actor_id)
        return "Loop paused."
    if action == "resume":
        queued = resume(db, loop, actor_id=actor_id)
        if loop.state == LoopState.paused:
            return f"Loop still paused: {loop.paused_reason}."
        return (
            f"Loop resumed{f'; job {queued.id} queued with its current options' if queued else ''}."
        )
    if action == "abandon":
        ended = abandon(db, loop, actor_id=actor_id)
        return f"Iteration {ended.number} abandoned." if ended else "No open iteration."
    if action != "tick":
        raise LoopError(f"unknown action {action!r}: use {', '.join(ACTIONS)}")
    locked = db.scalar(
        select(PolicyLoop).where(PolicyLoop.id == loop.id).with_for_update(skip_locked=True)
    )
    if locked is None:
        return "A worker is moving this loop along right now."
    step = tick_loop(db, locked, actor_id=actor_id)
    if step is None:
        return "Nothing to do yet."
    return f"{step.action.replace('_', ' ').capitalize()} (job {step.job_id}): {step.detail}."


# --- reading -------------------------------------------------------------------------------


def iterations(db: Session, loop: PolicyLoop, limit: int = 50) -> list[LoopIteration]:
    return list(
        db.scalars(
            select(LoopIteration)
            .where(LoopIteration.loop_id == loop.id)
            .order_by(LoopIteration.number.desc())
            .limit(limit)
        )
    )


def open_iteration(db: Session, loop: PolicyLoop) -> LoopIteration | None:
    return db.scalar(
        select(LoopIteration).where(
            LoopIteration.loop_id == loop.id, LoopIteration.stage.in_(OPEN_STAGES)
        )
    )


def current_job(db: Session, iteration: LoopIteration) -> Job | None:
    job_id = {
        Stage.reward: iteration.reward_job_id,
        Stage.policy: iteration.policy_job_id,
        Stage.generate: iteration.generate_job_id,
    }.get(iteration.stage)
    return db.get(Job, job_id) if job_id else None


def trained_through(model: ModelVersion | None, campaign: Campaign) -> int:
    """The newest comparison id of `campaign` a reward model version was trained on: its
    export's as_of mark, when that export read this campaign (the mark is global, and a
    model trained on another campaign has seen none of this one's); 0 where nothing is
    recorded, as for a registered or imported model."""
    data = ((model.metrics or {}).get("data") or {}) if model is not None else {}
    params = data.get("export_parameters") or {}
    if campaign.slug not in (params.get("campaigns") or []):
        return 0
    return int((params.get("as_of") or {}).get("comparison_id") or 0)


def human_comparisons_after(db: Session, campaign_id: int, mark: int) -> tuple[int, int]:
    """(how many active human comparisons of the campaign have an id above `mark`, the
    newest id among them)."""
    count, newest = db.execute(
        select(func.count(Comparison.id), func.max(Comparison.id)).where(
            Comparison.campaign_id == campaign_id,
            Comparison.source == ComparisonSource.human,
            Comparison.is_active.is_(True),
            Comparison.id > mark,
        )
    ).one()
    return int(count), int(newest or mark)


# --- moving along --------------------------------------------------------------------------


@dataclass
class Step:
    """What one tick did to one loop (for the worker's log and the tests)."""

    loop_id: int
    action: str  # started, queued_policy, queued_generate, finished, paused
    job_id: int | None = None
    detail: str = ""


def _version_of(db: Session, job: Job, kind: ModelKind) -> ModelVersion | None:
    return db.scalar(
        select(ModelVersion)
        .where(ModelVersion.job_id == job.id, ModelVersion.kind == kind)
        .order_by(ModelVersion.id.desc())
    )


def _move(db: Session, iteration: LoopIteration, from_stage: Stage, **values: Any) -> bool:
    """Compare-and-set: move the iteration on only if it is still at `from_stage`."""
    moved = db.execute(
        update(LoopIteration)
        .where(LoopIteration.id == iteration.id, LoopIteration.stage == from_stage)
        .values(**values)
        .execution_options(synchronize_session=False)
    ).rowcount
    db.refresh(iteration)
    return moved == 1


def _pause_for(db: Session, loop: PolicyLoop, iteration: LoopIteration, job: Job) -> Step:
    reason = (
        f"iteration {iteration.number}: the {job.kind} job {job.id} is {job.state.value}"
        + (f" ({(job.error or '').splitlines()[0][:300]})" if job.error else "")
        + "; fix the step's options if needed and resume (a new job is queued with them),"
        " or abandon the iteration"
    )
    iteration.error = reason
    step = _pause(db, loop, reason)
    step.job_id = job.id
    return step


def start_iteration(
    db: Session, loop: PolicyLoop, campaign: Campaign, *, actor_id: int | None = None
) -> Step | None:
    """A new iteration and its reward job, when the campaign has at least
    `min_new_comparisons` human comparisons newer than the last iteration's mark."""
    count, newest = human_comparisons_after(db, campaign.id, loop.comparison_mark)
    if count < loop.min_new_comparisons:
        return None
    number = (
        db.scalar(select(func.max(LoopIteration.number)).where(LoopIteration.loop_id == loop.id))
        or 0
    ) + 1
    job = training.queue_reward_training(
        db, reward_spec(db, loop, campaign, number), actor_id=actor_id
    )
    db.add(
        LoopIteration(
            loop_id=loop.id,
            number=number,
            stage=Stage.reward,
            comparison_mark=newest,
            new_comparisons=count,
            parent_policy_id=loop.policy_id,
            reward_job_id=job.id,
        )
    )
    loop.comparison_mark = newest
    db.flush()
    return Step(loop.id, "started", job.id, f"iteration {number}: {count} new comparisons")


def advance(db: Session, loop: PolicyLoop, iteration: LoopIteration) -> Step | None:
    """Queue the iteration's next step when its current job has succeeded; pause the loop
    when that job is dead or cancelled. A paused loop's iteration waits where it is."""
    job = current_job(db, iteration)
    if job is None:
        return None
    if job.state in STOPPED_JOB_STATES:
        return None if loop.state == LoopState.paused else _pause_for(db, loop, iteration, job)
    if job.state != JobState.succeeded or loop.state == LoopState.paused:
        return None
    if iteration.stage == Stage.generate:
        note = _nothing_sampled(job)
        if _move(db, iteration, Stage.generate, stage=Stage.done, finished_at=utcnow(), error=note):
            return Step(loop.id, "finished", job.id, f"iteration {iteration.number} {note or ''}")
        return None
    kind = ModelKind.reward if iteration.stage == Stage.reward else ModelKind.policy
    made = _version_of(db, job, kind)
    if made is None:  # a handler that succeeded without recording its version
        return _pause_for(db, loop, iteration, job)
    campaign = db.get_one(Campaign, loop.campaign_id)
    to_stage, made_field = (
        (Stage.policy, "reward_model_id")
        if iteration.stage == Stage.reward
        else (Stage.generate, "policy_id")
    )
    setattr(iteration, made_field, made.id)  # the next step's spec reads it
    queued = _queue_stage(db, loop, campaign, iteration, to_stage, None)
    return _hand_over(db, loop, iteration, to_stage, queued, made_field, made)


def _nothing_sampled(job: Job) -> str | None:
    """Why a generate step that made no task made none (the loop page shows it): without
    new tasks there are no audit pairs, so no human win rate for the new version."""
    result = job.result or {}
    if result.get("tasks_created", 1):
        return None
    why = result.get("none_due") or (
        "every prompt already has an open task or enough completions"
        if not result.get("prompts_planned")
        else "no prompt got enough distinct completions"
    )
    if isinstance(why, dict):  # registry.why_none_due's counts
        why = (
            f"{why.get('open_task', '?')} of the campaign's {why.get('prompts', '?')} prompts "
            f"have an open task, {why.get('answered', '?')} others are answered already"
        )
    return (
        f"the new policy wrote no tasks ({why}); import new prompts, then queue a generation "
        "from it on the Generate page, or let the next iteration sample"
    )


def _hand_over(
    db: Session,
    loop: PolicyLoop,
    iteration: LoopIteration,
    to_stage: Stage,
    queued: Job,
    made_field: str,
    made: ModelVersion,
) -> Step:
    """Move the iteration on to `to_stage` with the version its last step made and the job
    of its next step, by compare-and-set (a tick that lost a race raises, which rolls back
    the job it queued); the loop's next step or iteration starts from that version."""
    job_field = f"{to_stage.value}_job_id"
    moved = _move(
        db,
        iteration,
        iteration.stage,
        stage=to_stage,
        **{made_field: made.id, job_field: queued.id},
    )
    if not moved:
        raise RuntimeError("the iteration moved under this tick")
    setattr(loop, made_field, made.id)
    db.flush()
    return Step(loop.id, f"queued_{to_stage.value}", queued.id, f"iteration {iteration.number}")


def tick_loop(db: Session, loop: PolicyLoop, *, actor_id: int | None = None) -> Step | None:
    """Move one (locked) loop along: its open iteration, else maybe a new one."""
    iteration = open_iteration(db, loop)
    if iteration is not None:
        return advance(db, loop, iteration)
    if loop.state != LoopState.active:
        return None
    return start_iteration(db, loop, db.get_one(Campaign, loop.campaign_id), actor_id=actor_id)


def tick(db: Session) -> list[Step]:
    """Move every loop along once; the caller commits. Loops another worker is advancing
    right now are skipped (PostgreSQL), so ticking from every worker is safe."""
    steps: list[Step] = []
    ids = list(db.scalars(select(PolicyLoop.id).order_by(PolicyLoop.id)))
    for loop_id in ids:
        loop = db.scalar(
            select(PolicyLoop).where(PolicyLoop.id == loop_id).with_for_update(skip_locked=True)
        )
        if loop is None:
            continue
        try:
            with db.begin_nested():  # a step that cannot be queued leaves nothing half-done
                step = tick_loop(db, loop)
        except (specs.SpecError, LoopError) as error:
            # A version or campaign the loop names is gone, or an option no longer passes:
            # pause this loop with the reason rather than fail every tick (and the others).
            step = _pause(db, loop, f"the next step cannot be queued: {error}")
        if step is not None:
            steps.append(step)
    return steps


def _pause(db: Session, loop: PolicyLoop, reason: str) -> Step:
    loop.state = LoopState.paused
    loop.paused_reason = reason
    db.flush()
    return Step(loop.id, "paused", None, reason)
