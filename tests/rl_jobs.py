"""What the `ppo` and `rloo` job tests (tests/test_ppo_job.py, tests/test_rloo_job.py) share: a
tiny policy and reward model registered as versions beside a campaign of weather prompts and
a researcher's API token, one worker pass, and the spec's defaults held to the trainer's.
Helpers return what they found; the tests assert."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.auth import service as auth_service
from app.auth.models import Role
from app.config import Settings
from app.db import Database
from app.jobs.models import ModelKind, ModelVersion
from tests.factories import make_campaign, make_task
from tests.tiny_models import causal_lm, reward_model, tokenizer_for
from trainer.reward import META_FILE as REWARD_META
from trainer.worker import run_worker

WORDS = ["sunny", "rain", "cloud", "wind", "cold", "tell", "me", "about", "the", "weather"]
FAST = {"lease_seconds": 30.0, "heartbeat_seconds": 0.3, "poll_interval": 0.05}
PROMPTS = 6  # in the campaign
# A PPO job's training options that run in about a second on the tiny models.
TINY_PPO_TRAINING = {
    "total_steps": 2,
    "rollout_batch_size": 4,
    "minibatch_size": 2,
    "ppo_epochs": 1,
    "max_new_tokens": 4,
    "max_prompt_length": 16,
    "temperature": 1.0,
}


def save_models(data_dir: Path, *, reward_std: float) -> tuple[str, str]:
    """A tiny policy and a reward model on its tokenizer, as registered folders; the reward
    model's stored normalization has mean 0 and std `reward_std`."""
    tokenizer = tokenizer_for([" ".join(WORDS)])
    policy, reward = data_dir / "models" / "base", data_dir / "models" / "rm"
    causal_lm(tokenizer).save_pretrained(policy)
    tokenizer.save_pretrained(policy)
    reward_model(tokenizer, seed=3).save_pretrained(reward)
    tokenizer.save_pretrained(reward)
    meta = {"config": {"max_length": 32}, "normalization": {"mean": 0.0, "std": reward_std}}
    (reward / REWARD_META).write_text(json.dumps(meta))
    return "models/base", "models/rm"


@dataclass
class Registered:
    base_id: int  # the policy version
    rm_id: int  # the reward model version
    auth: dict[str, str]  # the researcher's Authorization header


def register_models(
    database: Database, settings: Settings, name: str, *, reward_std: float
) -> Registered:
    """The campaign `<name>-live` with PROMPTS weather prompts, the models of save_models
    registered as versions, and an API token of the researcher `<name>-r`."""
    policy_path, reward_path = save_models(Path(settings.data_dir), reward_std=reward_std)
    with database.session() as db:
        campaign = make_campaign(db, slug=f"{name}-live", k=2)
        for n in range(PROMPTS):
            make_task(db, campaign, prompt=f"tell me about the weather {n}", completions=["a", "b"])
        base = ModelVersion(name="base", kind=ModelKind.policy, path=policy_path, algorithm="base")
        rm = ModelVersion(
            name="rm", kind=ModelKind.reward, path=reward_path, campaign_id=campaign.id
        )
        db.add_all([base, rm])
        researcher = auth_service.create_user(
            db, username=f"{name}-r", role=Role.researcher, password=None
        )
        token = auth_service.create_api_token(db, researcher, name=name)
        db.commit()
        return Registered(base.id, rm.id, {"Authorization": f"Bearer {token.secret}"})


def work_once(settings: Settings, database: Database, worker: str) -> int:
    """One pass of a real worker (it commits): how many jobs it ran."""
    return run_worker(settings, worker, once=True, database=database, install_signals=False, **FAST)


def defaults_unlike_the_trainers(config: type, training: Any) -> list[str]:
    """The spec's training options whose default differs from the trainer config's (a job
    checkpoints every 10 steps, so a killed worker loses little)."""
    trainer_fields = {f.name: f for f in dataclasses.fields(config)}
    job_defaults = {"checkpoint_every": 10}
    return [
        name
        for name, field in training.model_fields.items()
        if field.default != job_defaults.get(name, trainer_fields[name].default)
    ]
