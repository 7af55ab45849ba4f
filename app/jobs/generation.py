"""What a generation job from a trained policy version defaults to, and the generation jobs
already waiting for the same thing.

"Generate completions from it" (and the /generate form, preselected) samples a version the
way the loop's generate step does (`app.loop.service.generate_spec`): scored by the reward
model the version was trained against, its log-ratio measured against where its run started,
and a share of audit pairs against its parent so people's win rate shows on /policies. A
PPO or RLOO version also samples as it was trained (temperature, top-p, response length).

Services only read and flush; the request commits."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.campaigns.models import Campaign
from app.jobs import registry
from app.jobs.models import Job, JobState, ModelKind, ModelVersion
from app.jobs.specs import GENERATE, GenerateJobSpec, canonical_base_url
from app.loop import service as loop_service
from app.loop.models import LoopIteration, PolicyLoop

# The training options of PPO and RLOO that are also the generate job's sampling settings.
SAMPLING = ("temperature", "top_p", "max_new_tokens")
ON_POLICY = ("ppo", "rloo")
# The fields these defaults fill, beside the campaign and the model.
LINKED = ("reward_model_id", "reference_id", "audit_against_id", "audit_share")
WAITING = (JobState.queued, JobState.running)


def _of_kind(db: Session, model_id: Any, kind: ModelKind) -> int | None:
    """`model_id` if it names a version of this kind still there, else None."""
    found = db.get(ModelVersion, int(model_id)) if model_id else None
    return found.id if found is not None and found.kind == kind else None


def _run_config(db: Session, model: ModelVersion) -> tuple[dict[str, Any], dict[str, Any]]:
    """The version's training summary and its job's config (either may be empty)."""
    training = (model.metrics or {}).get("training") or {}
    job = db.get(Job, model.job_id) if model.job_id else None
    return training, (job.config or {}) if job is not None else {}


def version_spec(db: Session, model: ModelVersion, campaign: Campaign) -> GenerateJobSpec:
    """The generate spec for `model` on `campaign`, with the loop's generate step's links
    (a version a loop made gets that loop's reference, audit share and options)."""
    training, job_config = _run_config(db, model)
    sampling: dict[str, Any] = {}
    if model.algorithm in ON_POLICY:
        options = training.get("config") or job_config.get("training") or {}
        sampling = {name: options[name] for name in SAMPLING if name in options}
    parent = _of_kind(db, model.parent_id, ModelKind.policy)
    reward = _of_kind(
        db, training.get("reward_model_id") or job_config.get("reward_model_id"), ModelKind.reward
    )
    made_by = db.scalar(select(LoopIteration).where(LoopIteration.policy_id == model.id))
    loop = db.get(PolicyLoop, made_by.loop_id) if made_by is not None else None
    share = (
        loop.audit_share if loop else loop_service.LoopConfig.model_fields["audit_share"].default
    )
    loop_options = (loop.config or {}).get("generate", {}) if loop else {}
    # Not added to the session: the loop's spec builder reads these fields only, as its own
    # trial run when a loop is saved does.
    trial_loop = PolicyLoop(
        reference_id=loop.reference_id if loop else parent,
        audit_share=share if parent else 0.0,  # no parent, no audits
        config={"generate": {**sampling, **loop_options}},
    )
    trial = LoopIteration(
        policy_id=model.id,
        parent_policy_id=parent,
        reward_model_id=made_by.reward_model_id if made_by and made_by.reward_model_id else reward,
    )
    return loop_service.generate_spec(trial_loop, campaign, trial)


def form_defaults(db: Session, model: ModelVersion, campaign: Campaign) -> dict[str, Any]:
    """The /generate form's values for `model`: its sampling settings and links."""
    spec = version_spec(db, model, campaign)
    return spec.model_dump(include={*SAMPLING, *LINKED})


def waiting_job(db: Session, campaign: Campaign, spec: GenerateJobSpec) -> Job | None:
    """A queued or running generate job of the campaign from the same model or endpoint:
    a second one would find every prompt taken by the first."""
    candidates = db.scalars(
        select(Job)
        .where(Job.kind == GENERATE, Job.campaign_id == campaign.id, Job.state.in_(WAITING))
        .order_by(Job.id)
    )
    for job in candidates:
        config = job.config or {}
        if spec.model_id is not None and config.get("model_id") == spec.model_id:
            return job
        endpoint = config.get("endpoint") or {}
        if (
            spec.endpoint is not None
            and isinstance(endpoint.get("base_url"), str)
            and canonical_base_url(endpoint["base_url"]) == spec.endpoint.base_url
            and endpoint.get("model") == spec.endpoint.model
        ):
            return job
    return None


def queue_unless_waiting(
    db: Session, spec: GenerateJobSpec, *, actor_id: int | None, priority: int = 0
) -> tuple[Job, bool]:
    """Queue the generate job and True, unless `waiting_job` finds one for the same campaign
    from the same model or endpoint: that one and False, and nothing new is queued (a
    still-queued one takes the higher priority). A spec that could not run is SpecError
    either way. Requests for one campaign are serialised by a lock on its row."""
    campaign = registry.check_generation(db, spec)
    # Two requests at once: the second waits here for the first's commit, then finds its job
    # (PostgreSQL; SQLite's writers are in line from their first statement).
    db.execute(select(Campaign.id).where(Campaign.id == campaign.id).with_for_update())
    waiting = waiting_job(db, campaign, spec)
    if waiting is None:
        return registry.enqueue_generation(db, spec, campaign, actor_id, priority), True
    if waiting.state is JobState.queued and priority > waiting.priority:
        waiting.priority = priority
        db.flush()
    return waiting, False
