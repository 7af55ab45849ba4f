"""One turn of the loop end to end, with tiny models and a real worker: labelers' judgments
start an iteration; the worker warm-starts the reward model, runs PPO, registers the new
policy and samples fresh tasks from it, a share of them audit pairs against the parent;
labelers judge those, and the policy versions page shows the win rate."""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import select

from app.auth import service as auth_service
from app.auth.models import Role
from app.jobs.models import Job, JobState, ModelKind, ModelVersion
from app.labeling import service as labeling
from app.labeling.models import Completion, Prompt, Task, TaskStatus
from app.labeling.schemas import JudgmentIn
from app.loop import service as loops
from app.loop.audits import is_audit_prompt
from app.loop.models import AuditPair, PolicyLoop, Stage
from app.main import create_app
from tests.conftest import PASSWORD, csrf_from, login
from tests.factories import make_campaign, make_labeler, make_task
from tests.rl_jobs import TINY_PPO_TRAINING
from tests.test_cli import cli_env, run_cli
from tests.tiny_models import causal_lm, reward_model, tokenizer_for
from trainer.reward import META_FILE as REWARD_META
from trainer.worker import run_worker

WORDS = ["sunny", "rain", "cloud", "wind", "cold", "tell", "me", "about", "the", "weather"]
FAST = {"lease_seconds": 30.0, "heartbeat_seconds": 0.3, "poll_interval": 0.05}
PROMPTS = 6
# Iteration 2 starts on the fresh tasks' judgments; a prompt the generate job reports short
# (fewer than PROMPTS // 2 of them, asserted below) has no fresh task, so the threshold is
# what the rest reach.
MIN_NEW_COMPARISONS = PROMPTS - (PROMPTS // 2 - 1)


def save_models(data_dir: Path) -> None:
    tokenizer = tokenizer_for([" ".join(WORDS)])
    for name, model in (("base", causal_lm(tokenizer)), ("rm", reward_model(tokenizer, seed=3))):
        model.save_pretrained(data_dir / "models" / name)
        tokenizer.save_pretrained(data_dir / "models" / name)
    meta = {"config": {"max_length": 32}, "normalization": {"mean": 0.0, "std": 1.0}}
    (data_dir / "models" / "rm" / REWARD_META).write_text(json.dumps(meta))


def label_everything(db, campaign, user, prefer) -> int:
    """`user` judges every task it is served, ranking by `prefer(task)` (best first)."""
    rng, judged = random.Random(0), 0
    while (lease := labeling.next_task(db, user=user, campaign=campaign, rng=rng)) is not None:
        task = db.get_one(Task, lease.task_id)
        labeling.submit(
            db,
            user=user,
            submit_key=lease.submit_key,
            answer=JudgmentIn(ranking=[[cid] for cid in prefer(task)], time_on_task_ms=2000),
            now=lease.leased_at + dt.timedelta(seconds=3),
        )
        judged += 1
    db.commit()
    return judged


def test_one_loop_iteration_turns_labels_into_a_new_policy_and_audited_tasks(live):
    database, settings = live
    save_models(Path(settings.data_dir))
    with database.session() as db:
        campaign = make_campaign(db, slug="loop-live", k=2, overlap=1)
        for n in range(PROMPTS):
            make_task(
                db,
                campaign,
                prompt=f"tell me about the weather {n}",
                completions=[f"sunny {n}", f"rain cold {n}"],
            )
        base = ModelVersion(
            name="base", kind=ModelKind.policy, path="models/base", algorithm="base"
        )
        rm = ModelVersion(name="rm", kind=ModelKind.reward, path="models/rm", algorithm="reward")
        db.add_all([base, rm])
        auth_service.create_user(db, username="loop-admin", role=Role.admin, password=PASSWORD)
        labeler = make_labeler(db, "loop-labeler")
        db.flush()
        config = loops.parse_config(
            {
                "algorithm": "ppo",
                "policy_id": base.id,
                "reward_model_id": rm.id,
                "min_new_comparisons": MIN_NEW_COMPARISONS,
                "audit_share": 0.5,
                "reward": {"test_fraction": 0.2, "training": {"max_length": 32, "batch_size": 2}},
                "policy": {"training": TINY_PPO_TRAINING | {"checkpoint_every": 0}},
                "generate": {"max_new_tokens": 4, "max_prompt_tokens": 16, "batch_size": 4},
            }
        )
        loop = loops.configure(db, campaign, config, actor_id=None)
        db.commit()
        base_id, rm_id, loop_id = base.id, rm.id, loop.id
        # Labelers prefer the sunny answer: that is what the reward model learns.
        judged = label_everything(
            db, campaign, labeler, lambda task: sorted(c.completion_id for c in task.items)
        )
        assert judged == PROMPTS

    # One worker runs the whole iteration: each finished step queues the next at its tick.
    ran = run_worker(
        settings, "loop-worker", drain=True, database=database, install_signals=False, **FAST
    )
    assert ran == 3
    with database.session() as db:
        loop = db.get_one(PolicyLoop, loop_id)
        [iteration] = loops.iterations(db, loop)
        jobs = [
            db.get_one(Job, j)
            for j in (iteration.reward_job_id, iteration.policy_job_id, iteration.generate_job_id)
        ]
        assert [j.kind for j in jobs] == ["train_reward", "ppo", "generate"]
        assert all(j.state == JobState.succeeded for j in jobs), [j.error for j in jobs]
        assert iteration.stage == Stage.done and iteration.new_comparisons == PROMPTS

        new_rm = db.get_one(ModelVersion, iteration.reward_model_id)
        assert new_rm.parent_id == rm_id and new_rm.kind == ModelKind.reward  # warm start
        policy = db.get_one(ModelVersion, iteration.policy_id)
        assert policy.algorithm == "ppo" and policy.parent_id == base_id
        assert loop.policy_id == policy.id and loop.reward_model_id == new_rm.id

        # Fresh tasks from the new policy: K=2 samples, or an audit pair against the parent.
        # A 4-token sample can fail to differ from the old ones in every re-sampling round;
        # the job reports such prompts as short and writes no task for them.
        short = set(jobs[2].result["short_prompts"])
        assert jobs[2].result["short_prompt_count"] == len(short) < PROMPTS // 2
        prompt_ids = list(db.scalars(select(Prompt.id).where(Prompt.campaign_id == campaign.id)))
        audited = {pid for pid in prompt_ids if is_audit_prompt(pid, 0.5, seed=0)} - short
        pairs = list(db.scalars(select(AuditPair)))
        assert {db.get_one(Task, p.task_id).prompt_id for p in pairs} == audited
        new_tasks = list(
            db.scalars(
                select(Task).where(Task.status == TaskStatus.open, Task.campaign_id == campaign.id)
            )
        )
        assert {t.prompt_id for t in new_tasks} == set(prompt_ids) - short
        assert jobs[2].result["tasks_created"] == len(new_tasks) == PROMPTS - len(short)
        for pair in pairs:
            assert pair.new_model_id == policy.id and pair.old_model_id == base_id
            assert pair.reward_model_id == new_rm.id
            assert pair.new_score is not None and pair.old_score is not None
            old = db.get_one(Completion, pair.old_completion_id)
            assert old.model_version_id == base_id  # the base had no sample: one was drawn
        samples = list(
            db.scalars(select(Completion).where(Completion.model_version_id == policy.id))
        )
        assert len(samples) == 2 * (PROMPTS - len(short) - len(audited)) + len(audited)
        for sample in samples:
            params = sample.generation_params
            assert params["reward_model_id"] == new_rm.id and params["reference_id"] == base_id
            assert isinstance(params["reward"], float) and isinstance(params["log_ratio"], float)
            assert params["tokens"] >= 1

        # The labeler now judges the new tasks, always for the new policy's sample.
        def new_first(task):
            ids = [c.completion_id for c in task.items]
            mine = {
                c.completion_id for c in task.items if c.completion.model_version_id == policy.id
            }
            return sorted(ids, key=lambda cid: cid not in mine)

        judged_again = label_everything(db, campaign, labeler, new_first)
        assert judged_again == PROMPTS - len(short)
        policy_id, reward_job_id = policy.id, iteration.reward_job_id

    client = TestClient(create_app(settings, database))
    versions = client.get("/api/v1/policies")
    assert versions.status_code in (401, 403)  # signed out
    login(client, "loop-admin")
    body = client.get("/api/v1/policies?campaign=loop-live").json()["versions"]
    by_id = {v["id"]: v for v in body}
    assert by_id[policy_id]["depth"] == by_id[base_id]["depth"] + 1
    win = by_id[policy_id]["win_rate"]
    assert win["against_id"] == base_id and win["judgments"] == len(audited)
    assert win["rate"] == 1.0 and win["verdict"] == "pending"
    assert by_id[policy_id]["kl_from_reference"] is not None
    job_page = client.get(f"/jobs/{reward_job_id}")
    assert 'data-testid="job-loop"' in job_page.text
    assert 'href="/admin/campaigns/loop-live/loop"' in job_page.text
    page = client.get("/policies")
    assert page.status_code == 200 and f'data-model="{policy_id}"' in page.text
    model_page = client.get(f"/models/{policy_id}")
    assert 'data-testid="model-win-rate"' in model_page.text and "100 % against" in model_page.text
    loop_page = client.get("/admin/campaigns/loop-live/loop")
    assert loop_page.status_code == 200 and 'data-stage="done"' in loop_page.text
    # Pause from the page (CSRF token from the page itself).
    paused = client.post(
        "/admin/campaigns/loop-live/loop/pause",
        data={"csrf_token": csrf_from(loop_page.text)},
        follow_redirects=False,
    )
    assert paused.status_code == 303
    with database.session() as db:
        assert db.get_one(PolicyLoop, loop_id).state.value == "paused"

    # The same from the command line.
    env = cli_env(settings.database_url, Path(settings.data_dir))
    cwd = Path(settings.data_dir)
    shown = run_cli("loop", "show", "loop-live", env=env, cwd=cwd)
    assert shown.returncode == 0, shown.stderr
    assert "loop-live: paused, ppo" in shown.stdout and "paused: paused by an admin" in shown.stdout
    assert f"1.00 ({len(audited)})" in shown.stdout
    listed = run_cli("policies", "--campaign", "loop-live", "--json", env=env, cwd=cwd)
    assert listed.returncode == 0, listed.stderr
    assert {v["id"] for v in json.loads(listed.stdout)["versions"]} == set(by_id)
    resumed = run_cli("loop", "resume", "loop-live", env=env, cwd=cwd)
    assert resumed.returncode == 0 and "Loop resumed." in resumed.stdout
    # The new tasks' judgments are new comparisons: the next iteration starts, from the new
    # policy.
    ticked = run_cli("loop", "tick", "loop-live", env=env, cwd=cwd)
    assert "Started" in ticked.stdout, ticked.stdout
    assert f"iteration 2: {judged_again} new comparisons" in ticked.stdout
    with database.session() as db:
        second = loops.open_iteration(db, db.get_one(PolicyLoop, loop_id))
        assert second is not None and second.parent_policy_id == policy_id
    missing = run_cli("loop", "show", "no-such", env=env, cwd=cwd)
    assert missing.returncode == 2 and "there is no campaign 'no-such'" in missing.stderr
