"""The `ppo` job: a policy version is optimised against a reward model version on the
campaigns' prompts, and becomes a new policy version.

1. The prompts: every prompt of the campaigns, oldest first, each text once (chat prompts as
   their messages), at most `max_prompts`. The first attempt writes the list to the job's
   checkpoint folder; later attempts resume on exactly that list.
2. `trainer.ppo.train` in the checkpoint folder, which every attempt shares: a stopped or
   killed worker's job resumes from the last checkpoint (every `checkpoint_every` steps). In
   the worker's process, or in `processes` data-parallel ones (trainer/launch.py), their
   models replicated (DDP) or with `"sharding": "fsdp"` sharded (FSDP2).
3. The policy moves to `PREFLOOP_DATA_DIR/models/ppo-<job>-<attempt>` and a
   `ModelVersion(kind=policy, algorithm=ppo, parent=the starting policy)` is recorded with the
   fenced success.

Steps 1 and 3 are the same for every policy-optimisation job (`rloo` too): `read_job_inputs`
and `publish_policy`, below `run`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.jobs.models import ModelKind, ModelVersion
from app.jobs.specs import PPOJobSpec, RLOOJobSpec, parse_ppo_spec
from app.labeling.models import Prompt
from trainer.model_versions import finite, publish
from trainer.ppo import PPOConfig, train
from trainer.training_job import train_in_job, trainer_config

PROMPTS_FILE = "prompts.json"

PolicyJobSpec = PPOJobSpec | RLOOJobSpec


def ppo_config(spec: PPOJobSpec, policy: str, reward_model: str) -> PPOConfig:
    """The trainer's config from the spec's training options (same names, checked by tests)."""
    return trainer_config(PPOConfig, spec, policy=policy, reward_model=reward_model)


def run(ctx: Any) -> dict[str, Any]:
    """The worker's entry point for `ppo` jobs (ctx: trainer.worker.JobContext)."""
    spec = parse_ppo_spec(ctx.config)
    job = read_job_inputs(ctx, spec)
    ctx.log.info(
        "ppo: %d prompts, policy %s, reward model %s",
        len(job.prompts),
        job.policy_path,
        job.reward_path,
    )
    config = ppo_config(spec, job.policy_path, job.reward_path)
    result = train_policy(ctx, spec, train, config, job)
    return publish_policy(ctx, spec, result, job, "ppo")


# ---------------------------------------------------------------------------------------
# What every policy-optimisation job (ppo, rloo) shares


def resolve_model_path(path: str, data_dir: Path) -> str:
    """A registered path as the worker reads it: relative paths live under the data folder;
    anything else (an absolute folder, a hub id) is used as it is."""
    local = Path(data_dir) / path
    return str(local) if not Path(path).is_absolute() and local.exists() else path


@dataclass
class JobInputs:
    """What a policy-optimisation job trains: read once per attempt by read_job_inputs."""

    prompts: list[Any]
    policy_path: str
    reward_path: str
    work_dir: Path  # the trainer's output folder, shared by every attempt


def read_job_inputs(ctx: Any, spec: PolicyJobSpec) -> JobInputs:
    """The job's prompts and model folders; its trainer works in <checkpoint folder>/run."""
    checkpoint = Path(ctx.checkpoint_dir)
    checkpoint.mkdir(parents=True, exist_ok=True)
    with ctx.database.session() as db:
        policy_path, reward_path = job_model_paths(db, spec, Path(ctx.settings.data_dir))
        prompts = job_prompts(db, spec, checkpoint)
    return JobInputs(prompts, policy_path, reward_path, checkpoint / "run")


def job_model_paths(db: Session, spec: PolicyJobSpec, data_dir: Path) -> tuple[str, str]:
    """The folders of the spec's policy and reward model versions, as the worker reads them."""
    policy = db.get(ModelVersion, spec.policy_id)
    reward = db.get(ModelVersion, spec.reward_model_id)
    if policy is None or reward is None:
        raise ValueError("the policy or the reward model version no longer exists")
    return resolve_model_path(policy.path, data_dir), resolve_model_path(reward.path, data_dir)


def campaign_prompts(db: Session, campaign_ids: list[int], limit: int | None) -> list[Any]:
    """The campaigns' prompts, oldest first, each content once: text, or chat messages."""
    seen: set[str] = set()
    out: list[Any] = []
    query = (
        select(Prompt.text, Prompt.messages, Prompt.content_hash)
        .where(Prompt.campaign_id.in_(campaign_ids))
        .order_by(Prompt.id)
    )
    for text, messages, content_hash in db.execute(query):
        if content_hash in seen or not (messages or text):
            continue
        seen.add(content_hash)
        out.append(messages if messages else text)
        if limit is not None and len(out) >= limit:
            break
    return out


def job_prompts(db: Session, spec: PolicyJobSpec, checkpoint: Path) -> list[Any]:
    """The prompts the job trains on: the list an earlier attempt saved in its checkpoint
    folder, or else the campaigns' prompts, saved there for the attempts after this one."""
    from app.campaigns import service as campaigns

    saved = checkpoint / PROMPTS_FILE
    if saved.is_file():
        prompts = json.loads(saved.read_text(encoding="utf-8"))
    else:
        ids = []
        for slug in spec.campaigns:
            campaign = campaigns.get_by_slug(db, slug)
            if campaign is None:
                raise ValueError(f"there is no campaign '{slug}'")
            ids.append(campaign.id)
        prompts = campaign_prompts(db, ids, spec.max_prompts)
        saved.write_text(json.dumps(prompts, ensure_ascii=False), encoding="utf-8")
    if not prompts:
        raise ValueError("the campaigns have no prompts to train on")
    return prompts


def train_policy(
    ctx: Any, spec: PolicyJobSpec, train: Callable[..., Any], config: Any, job: JobInputs
) -> Any:
    """`train(config, prompts, work_dir)` (trainer.ppo.train, trainer.rloo.train) in the
    worker's process or in `spec.processes` data-parallel ones (`spec.sharding` "fsdp": the
    models sharded over them), with the job's device, metrics, progress (the last 2% is for
    publishing) and stop request. A run that stopped raises JobStopped, for the worker to
    requeue or cancel the job."""
    return train_in_job(
        ctx,
        train,
        spec.processes,
        (config, job.prompts, job.work_dir),
        on_progress=lambda fraction, message: ctx.report(0.98 * fraction, message),
        sharding=spec.sharding,
    )


def publish_policy(
    ctx: Any, spec: PolicyJobSpec, result: Any, job: JobInputs, algorithm: str
) -> dict[str, Any]:
    """The finished run as a new policy version whose parent is the starting policy (the
    job's result)."""
    summary = {
        "training": {
            "config": spec.training.model_dump(),
            "policy_id": spec.policy_id,
            "reward_model_id": spec.reward_model_id,
            "campaigns": spec.campaigns,
            "processes": spec.processes,
            "sharding": spec.sharding,
        },
        "data": {"prompts": len(job.prompts)},
        "eval": finite(result.metrics),
    }
    folder = publish(
        ctx,
        job.work_dir,
        algorithm,
        name=spec.name or f"{algorithm} {'+'.join(spec.campaigns)} (job {ctx.job_id})",
        kind=ModelKind.policy,
        algorithm=algorithm,
        metrics=summary,
        parent_id=spec.policy_id,
    )
    ctx.report(1.0, "done")
    return {"model_path": str(folder), "metrics": finite(result.metrics), "steps": result.steps}
