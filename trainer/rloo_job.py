"""The `rloo` job: a policy version is optimised with RLOO against a reward model version on
the campaigns' prompts, and becomes a new policy version. The same plumbing as the `ppo` job
(trainer/ppo_job.py, whose functions read the prompts and model paths and publish the
policy):

1. The prompts: every prompt of the campaigns, oldest first, each text once, at most
   `max_prompts`; the first attempt writes the list to the job's checkpoint folder and later
   attempts resume on exactly that list.
2. `trainer.rloo.train` in the checkpoint folder, which every attempt shares: a stopped or
   killed worker's job resumes from the last checkpoint (every `checkpoint_every` steps). In
   the worker's process, or in `processes` data-parallel ones (trainer/launch.py).
3. The policy moves to `PREFLOOP_DATA_DIR/models/rloo-<job>-<attempt>` and a
   `ModelVersion(kind=policy, algorithm=rloo, parent=the starting policy)` is recorded with
   the fenced success.
"""

from __future__ import annotations

from typing import Any

from app.jobs.specs import RLOOJobSpec, parse_rloo_spec
from trainer.ppo_job import publish_policy, read_job_inputs, train_policy
from trainer.rloo import RLOOConfig, train
from trainer.training_job import trainer_config


def rloo_config(spec: RLOOJobSpec, policy: str, reward_model: str) -> RLOOConfig:
    """The trainer's config from the spec's training options (same names, checked by tests)."""
    return trainer_config(RLOOConfig, spec, policy=policy, reward_model=reward_model)


def run(ctx: Any) -> dict[str, Any]:
    """The worker's entry point for `rloo` jobs (ctx: trainer.worker.JobContext)."""
    spec = parse_rloo_spec(ctx.config)
    job = read_job_inputs(ctx, spec)
    ctx.log.info(
        "rloo: %d prompts, k=%d, policy %s, reward model %s",
        len(job.prompts),
        spec.training.k,
        job.policy_path,
        job.reward_path,
    )
    config = rloo_config(spec, job.policy_path, job.reward_path)
    result = train_policy(ctx, spec, train, config, job)
    return publish_policy(ctx, spec, result, job, "rloo")
