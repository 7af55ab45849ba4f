"""The `ppo` job: a policy version is optimised against a reward model version on the
campaigns' prompts, and becomes a new policy version.

1. The prompts: every prompt of the campaigns, oldest first, each text once (chat prompts as
   their messages), at most `max_prompts`. The first attempt writes the list to the job's
   checkpoint folder; later attempts resume on exactly that list.
2. `trainer.ppo.train` in the checkpoint folder, which every attempt shares: a stopped or
   killed worker's job resumes from the last checkpoint (every `checkpoint_every` steps).
3. The policy moves to `PREFLOOP_DATA_DIR/models/ppo-<job>-<attempt>` and a
   `ModelVersion(kind=policy, algorithm=ppo, parent=the starting policy)` is recorded with the
   fenced success.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.jobs.models import ModelKind, ModelVersion
from app.jobs.specs import PPOJobSpec, parse_ppo_spec
from app.labeling.models import Prompt
from trainer.model_versions import finite, publish
from trainer.ppo import PPOConfig, train

PROMPTS_FILE = "prompts.json"


def resolve_model_path(path: str, data_dir: Path) -> str:
    """A registered path as the worker reads it: relative paths live under the data folder;
    anything else (an absolute folder, a hub id) is used as it is."""
    local = Path(data_dir) / path
    return str(local) if not Path(path).is_absolute() and local.exists() else path


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


def ppo_config(spec: PPOJobSpec, policy: str, reward_model: str) -> PPOConfig:
    """The trainer's config from the spec's training options (same names, checked by tests)."""
    names = {f.name for f in fields(PPOConfig)}
    options = {k: v for k, v in spec.training.model_dump().items() if k in names}
    return PPOConfig(policy=policy, reward_model=reward_model, **options)


def run(ctx: Any) -> dict[str, Any]:
    """The worker's entry point for `ppo` jobs (ctx: trainer.worker.JobContext)."""
    from app.campaigns import service as campaigns

    spec = parse_ppo_spec(ctx.config)
    data_dir = Path(ctx.settings.data_dir)
    checkpoint = Path(ctx.checkpoint_dir)
    checkpoint.mkdir(parents=True, exist_ok=True)
    with ctx.database.session() as db:
        policy = db.get(ModelVersion, spec.policy_id)
        reward = db.get(ModelVersion, spec.reward_model_id)
        if policy is None or reward is None:
            raise ValueError("the policy or the reward model version no longer exists")
        policy_path = resolve_model_path(policy.path, data_dir)
        reward_path = resolve_model_path(reward.path, data_dir)
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
    ctx.log.info(
        "ppo: %d prompts, policy %s, reward model %s", len(prompts), policy_path, reward_path
    )
    work_dir = checkpoint / "run"
    result = train(
        ppo_config(spec, policy_path, reward_path),
        prompts,
        work_dir,
        device=ctx.device,
        on_metric=ctx.metric,
        on_progress=lambda fraction, message: ctx.report(0.98 * fraction, message),
        should_stop=ctx.should_stop,
    )
    if result.stopped:
        ctx.check_stop()  # raises JobStopped: the worker requeues or cancels the job
        raise RuntimeError("training stopped without a stop request")
    summary = {
        "training": {
            "config": spec.training.model_dump(),
            "policy_id": spec.policy_id,
            "reward_model_id": spec.reward_model_id,
            "campaigns": spec.campaigns,
        },
        "data": {"prompts": len(prompts)},
        "eval": finite(result.metrics),
    }
    folder = publish(
        ctx,
        work_dir,
        "ppo",
        name=spec.name or f"ppo {'+'.join(spec.campaigns)} (job {ctx.job_id})",
        kind=ModelKind.policy,
        algorithm="ppo",
        metrics=summary,
        parent_id=spec.policy_id,
    )
    ctx.report(1.0, "done")
    return {"model_path": str(folder), "metrics": finite(result.metrics), "steps": result.steps}
