"""The loop's bookkeeping, on both databases: an iteration starts when enough new human
comparisons arrived, each step's success queues the next job with the right versions, a dead
step pauses the loop and resuming retries it, pausing holds everything; and the win-rate
statistics on hand-made judgments (Wilson's interval, ties as halves, the Goodhart flag)."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from app.auth.models import UserKind
from app.jobs.models import Job, JobState, ModelKind, ModelVersion
from app.labeling.models import Comparison, ComparisonSource, Judgment
from app.loop import service as loops
from app.loop.audits import (
    MIN_JUDGMENTS,
    WinRate,
    add_audit_task,
    is_audit_prompt,
    outcome,
    wilson,
    win_rates,
)
from app.loop.models import LoopState, Stage
from tests.conftest import csrf_from
from tests.factories import make_campaign, make_labeler, make_task


def test_wilson_interval_matches_the_formula_by_hand():
    low, high = wilson(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    low, high = wilson(10, 10)
    assert low == pytest.approx(0.7225, abs=1e-4) and high == pytest.approx(1.0)
    assert wilson(0, 0) == (0.0, 1.0)


def test_outcome_counts_wins_losses_and_ties_as_halves():
    assert outcome([[7], [9]], new_id=7, old_id=9) == 1.0
    assert outcome([[9], [7]], new_id=7, old_id=9) == 0.0
    assert outcome([[7, 9]], new_id=7, old_id=9) == 0.5
    assert outcome([[7], [3]], new_id=7, old_id=9) is None  # does not rank the old one
    assert outcome(None, new_id=7, old_id=9) is None


def test_verdicts_and_the_goodhart_flag():
    few = WinRate(2, 1, judgments=MIN_JUDGMENTS - 1, wins=MIN_JUDGMENTS - 1)
    assert few.verdict == "pending" and not few.goodhart
    better = WinRate(2, 1, judgments=40, wins=32, new_score=1.0, old_score=0.0)
    assert better.verdict == "better" and not better.goodhart
    # The reward model prefers the new samples; people split evenly: Goodhart.
    hacked = WinRate(2, 1, judgments=40, wins=20, new_score=1.0, old_score=0.0)
    assert hacked.verdict == "no better" and hacked.goodhart
    honest = WinRate(2, 1, judgments=40, wins=20, new_score=0.0, old_score=1.0)
    assert not honest.goodhart
    worse = WinRate(2, 1, judgments=40, wins=8, new_score=1.0, old_score=0.0)
    assert worse.verdict == "worse" and worse.goodhart
    # People prefer it 8 times in 10: the interval [49-94 %] still reaches 50 %, so the
    # verdict is "no better", but a version people prefer is not fooling the reward model.
    liked = WinRate(2, 1, judgments=10, wins=8, new_score=1.0, old_score=0.0)
    assert liked.verdict == "no better" and not liked.goodhart
    slightly = WinRate(2, 1, judgments=40, wins=21, new_score=1.0, old_score=0.0)
    assert slightly.verdict == "no better" and not slightly.goodhart
    even = WinRate(2, 1, judgments=MIN_JUDGMENTS, wins=MIN_JUDGMENTS / 2, new_score=1, old_score=0)
    assert even.goodhart  # half the time is not better
    unjudged = WinRate(2, 1, judgments=MIN_JUDGMENTS - 1, wins=0, new_score=1.0, old_score=0.0)
    assert not unjudged.goodhart


def test_audit_prompts_are_a_fixed_seeded_share():
    picks = [is_audit_prompt(pid, 0.3, seed=1) for pid in range(2000)]
    assert picks == [is_audit_prompt(pid, 0.3, seed=1) for pid in range(2000)]
    assert 0.26 < sum(picks) / len(picks) < 0.34
    assert picks != [is_audit_prompt(pid, 0.3, seed=2) for pid in range(2000)]
    assert not any(is_audit_prompt(pid, 0.0, seed=1) for pid in range(100))


def _versions(db):
    base = ModelVersion(name="base", kind=ModelKind.policy, path="models/base", algorithm="base")
    rm = ModelVersion(
        name="rm",
        kind=ModelKind.reward,
        path="models/rm",
        algorithm="reward",
        metrics={"training": {"backbone": "models/backbone"}},
    )
    db.add_all([base, rm])
    db.flush()
    return base, rm


def _comparisons(db, campaign, n, source=ComparisonSource.human):
    user = make_labeler(db)
    for _ in range(n):
        task = make_task(db, campaign, completions=["first answer", "second answer"])
        a, b = (item.completion_id for item in task.items)
        db.add(
            Comparison(
                campaign_id=campaign.id,
                prompt_id=task.prompt_id,
                user_id=user.id,
                chosen_id=a,
                rejected_id=b,
                source=source,
            )
        )
    db.flush()


def _succeed(db, job_id, kind=None, **version):
    job = db.get_one(Job, job_id)
    job.state = JobState.succeeded
    made = None
    if kind is not None:
        made = ModelVersion(job_id=job.id, kind=kind, path=f"models/{job.id}", **version)
        db.add(made)
    db.flush()
    return made


def _config(base, rm, **overrides):
    raw = {
        "algorithm": "ppo",
        "policy_id": base.id,
        "reward_model_id": rm.id,
        "min_new_comparisons": 3,
        "audit_share": 0.25,
        "policy": {"training": {"total_steps": 5}},
        "generate": {"max_new_tokens": 16},
    }
    return loops.parse_config(raw | overrides)


def test_configure_refuses_bad_versions_and_bad_step_options(db):
    campaign = make_campaign(db, slug="loop-bad", k=2)
    base, rm = _versions(db)
    with pytest.raises(loops.LoopError, match="policy_id: there is no policy model version"):
        loops.configure(db, campaign, _config(base, rm, policy_id=rm.id), actor_id=None)
    with pytest.raises(loops.LoopError, match="learning_rate"):
        bad = _config(base, rm, policy={"training": {"learning_rate": -1}})
        loops.configure(db, campaign, bad, actor_id=None)
    with pytest.raises(loops.LoopError, match="temperature"):
        loops.configure(db, campaign, _config(base, rm, generate={"temperature": 9}), actor_id=None)
    with pytest.raises(loops.LoopError, match="reward model version to warm-start, or a backbone"):
        loops.parse_config({"policy_id": base.id})


def test_an_iteration_runs_reward_then_policy_then_generate(db):
    campaign = make_campaign(db, slug="loop-steps", k=2)
    base, rm = _versions(db)
    loop = loops.configure(db, campaign, _config(base, rm), actor_id=None)
    _comparisons(db, campaign, 2)
    _comparisons(db, campaign, 5, source=ComparisonSource.imported)  # not human: not counted
    assert loops.tick(db) == []

    _comparisons(db, campaign, 1)
    [started] = loops.tick(db)
    assert started.action == "started"
    [iteration] = loops.iterations(db, loop)
    assert iteration.number == 1 and iteration.stage == Stage.reward
    assert iteration.new_comparisons == 3 and iteration.parent_policy_id == base.id
    reward_job = db.get_one(Job, started.job_id)
    assert reward_job.kind == "train_reward" and reward_job.config["init_model_id"] == rm.id
    assert reward_job.config["backbone"] == "models/backbone"
    assert reward_job.config["campaigns"] == ["loop-steps"]
    assert loops.tick(db) == []  # the reward job has not run yet

    new_rm = _succeed(db, reward_job.id, ModelKind.reward, name="rm 2", parent_id=rm.id)
    [queued] = loops.tick(db)
    assert queued.action == "queued_policy"
    policy_job = db.get_one(Job, queued.job_id)
    assert policy_job.kind == "ppo" and policy_job.config["reward_model_id"] == new_rm.id
    assert policy_job.config["policy_id"] == base.id
    assert policy_job.config["training"]["total_steps"] == 5
    assert loop.reward_model_id == new_rm.id and iteration.stage == Stage.policy

    new_policy = _succeed(db, policy_job.id, ModelKind.policy, name="ppo 1", parent_id=base.id)
    [queued] = loops.tick(db)
    generate_job = db.get_one(Job, queued.job_id)
    assert generate_job.kind == "generate" and generate_job.config["model_id"] == new_policy.id
    assert generate_job.config["audit_against_id"] == base.id
    assert generate_job.config["audit_share"] == 0.25
    assert generate_job.config["reward_model_id"] == new_rm.id
    assert generate_job.config["reference_id"] == base.id
    assert generate_job.config["max_new_tokens"] == 16
    assert loop.policy_id == new_policy.id

    _succeed(db, generate_job.id)
    [finished] = loops.tick(db)
    assert finished.action == "finished" and iteration.stage == Stage.done
    assert iteration.finished_at is not None

    # The next iteration counts only comparisons after the first one's mark, and starts from
    # the new versions.
    _comparisons(db, campaign, 2)
    assert loops.tick(db) == []
    _comparisons(db, campaign, 1)
    [again] = loops.tick(db)
    second = loops.open_iteration(db, loop)
    assert second is not None and second.number == 2 and second.parent_policy_id == new_policy.id
    assert db.get_one(Job, again.job_id).config["init_model_id"] == new_rm.id


def test_a_dead_step_pauses_the_loop_and_resuming_queues_a_new_job(db):
    campaign = make_campaign(db, slug="loop-dead", k=2)
    base, rm = _versions(db)
    loop = loops.configure(db, campaign, _config(base, rm), actor_id=None)
    _comparisons(db, campaign, 3)
    [started] = loops.tick(db)
    job = db.get_one(Job, started.job_id)
    job.state, job.error = JobState.dead, "CUDA out of memory\nTraceback..."
    db.flush()
    [paused] = loops.tick(db)
    assert paused.action == "paused" and loop.state == LoopState.paused
    assert "train_reward job" in loop.paused_reason and "CUDA out of memory" in loop.paused_reason
    assert "a new job is queued with them" in loop.paused_reason
    assert loops.tick(db) == []  # paused: nothing moves

    # The admin fixes the step's options, then resumes: a new job with them, not a retry.
    fixed = _config(base, rm, reward={"training": {"batch_size": 2}})
    loops.configure(db, campaign, fixed, actor_id=None)
    new_job = loops.resume(db, loop, actor_id=None)
    [iteration] = loops.iterations(db, loop)
    assert new_job is not None and new_job.id != job.id and new_job.state == JobState.queued
    assert new_job.kind == "train_reward" and new_job.config["training"]["batch_size"] == 2
    assert new_job.config["init_model_id"] == rm.id
    assert job.state == JobState.dead and job.error.startswith("CUDA")  # kept as it was
    assert iteration.reward_job_id == new_job.id and iteration.error is None
    assert loop.state == LoopState.active and loop.paused_reason is None

    # Pausing holds a finished step's successor back until the loop is resumed.
    loops.pause(db, loop, actor_id=None, reason="")
    _succeed(db, new_job.id, ModelKind.reward, name="rm 2")
    assert loops.tick(db) == []
    assert loops.resume(db, loop, actor_id=None) is None  # its job is fine: nothing queued
    assert [s.action for s in loops.tick(db)] == ["queued_policy"]

    ended = loops.abandon(db, loop, actor_id=None)
    assert ended is not None and ended.stage == Stage.failed
    policy_job = db.get_one(Job, ended.policy_job_id)
    assert policy_job.state == JobState.cancelled
    assert loops.open_iteration(db, loop) is None


def test_resuming_a_dead_policy_step_uses_the_loops_current_policy_options(db):
    campaign = make_campaign(db, slug="loop-dead-policy", k=2)
    base, rm = _versions(db)
    loop = loops.configure(db, campaign, _config(base, rm), actor_id=None)
    _comparisons(db, campaign, 3)
    [started] = loops.tick(db)
    new_rm = _succeed(db, started.job_id, ModelKind.reward, name="rm 2", parent_id=rm.id)
    [queued] = loops.tick(db)
    dead = db.get_one(Job, queued.job_id)
    dead.state, dead.error = JobState.dead, "diverged"
    db.flush()
    assert loops.tick(db)[0].action == "paused"

    loop.config = {**loop.config, "policy": {"training": {"total_steps": 9}}}
    db.flush()
    message = loops.act(db, loop, "resume", actor_id=None)
    [iteration] = loops.iterations(db, loop)
    new_job = db.get_one(Job, iteration.policy_job_id)
    assert f"job {new_job.id} queued" in message and new_job.id != dead.id
    assert new_job.kind == "ppo" and new_job.config["training"]["total_steps"] == 9
    assert new_job.config["reward_model_id"] == new_rm.id
    assert new_job.config["policy_id"] == base.id
    assert dead.state == JobState.dead and dead.config["training"]["total_steps"] == 5


def _paused_on_a_dead_reward_job(db, slug):
    """A loop whose first iteration's reward job died (the tick paused it): (loop, its start)."""
    campaign = make_campaign(db, slug=slug, k=2)
    base, rm = _versions(db)
    loop = loops.configure(db, campaign, _config(base, rm), actor_id=None)
    _comparisons(db, campaign, 3)
    [started] = loops.tick(db)
    db.get_one(Job, started.job_id).state = JobState.dead
    db.flush()
    loops.tick(db)
    return loop, started


def test_resuming_keeps_the_loop_paused_when_the_new_job_cannot_be_queued(db):
    loop, started = _paused_on_a_dead_reward_job(db, "loop-dead-bad")
    loop.config = {**loop.config, "reward": {"training": {"epochs": 0}}}  # edited behind
    db.flush()
    jobs_before = db.scalar(select(func.count(Job.id)))

    assert loops.resume(db, loop, actor_id=None) is None
    message = loops.act(db, loop, "resume", actor_id=None)
    assert loop.state == LoopState.paused and "epochs" in loop.paused_reason
    assert message.startswith("Loop still paused") and "epochs" in message
    [iteration] = loops.iterations(db, loop)
    assert iteration.reward_job_id == started.job_id and iteration.stage == Stage.reward
    assert db.scalar(select(func.count(Job.id))) == jobs_before  # nothing half-queued


def test_resuming_from_the_loop_page_clears_the_dead_message(db, client, as_role):
    loop, started = _paused_on_a_dead_reward_job(db, "loop-dead-page")
    db.commit()
    as_role("admin")
    page = client.get("/admin/campaigns/loop-dead-page/loop")
    assert 'data-testid="loop-paused-reason"' in page.text and "is dead" in page.text
    resumed = client.post(
        "/admin/campaigns/loop-dead-page/loop/resume",
        data={"csrf_token": csrf_from(page.text)},
        follow_redirects=False,
    )
    assert resumed.status_code == 303
    db.expire_all()
    iteration = loops.open_iteration(db, loop)
    assert iteration is not None and iteration.reward_job_id != started.job_id
    page = client.get("/admin/campaigns/loop-dead-page/loop")
    assert "is dead" not in page.text and 'data-testid="loop-paused-reason"' not in page.text
    assert f'href="/jobs/{iteration.reward_job_id}"' in page.text


def test_abandoning_gives_the_iterations_comparisons_and_versions_back(db):
    campaign = make_campaign(db, slug="loop-abandon", k=2)
    base, rm = _versions(db)
    _comparisons(db, campaign, 2)
    seen = db.scalar(select(func.max(Comparison.id)))
    exported = {"campaigns": ["loop-abandon"], "as_of": {"comparison_id": seen}}
    rm.metrics = {**rm.metrics, "data": {"export_parameters": exported}}
    db.flush()
    loop = loops.configure(db, campaign, _config(base, rm), actor_id=None)
    _comparisons(db, campaign, 3)

    # Iteration 1 gets as far as its generate step, the loop having adopted its versions.
    [started] = loops.tick(db)
    rm2 = _succeed(db, started.job_id, ModelKind.reward, name="rm 2", parent_id=rm.id)
    [queued] = loops.tick(db)
    policy1 = _succeed(db, queued.job_id, ModelKind.policy, name="ppo 1", parent_id=base.id)
    loops.tick(db)
    assert (loop.reward_model_id, loop.policy_id) == (rm2.id, policy1.id)
    first = loops.abandon(db, loop, actor_id=None)
    assert first is not None and first.stage == Stage.failed
    # Back where it started: the warm start's versions, counting after what rm was trained on.
    assert (loop.reward_model_id, loop.policy_id) == (rm.id, base.id)
    assert loop.comparison_mark == seen
    [again] = loops.tick(db)  # the same 3 comparisons start the next iteration at once
    assert again.action == "started" and db.get_one(Job, again.job_id).config["init_model_id"] == (
        rm.id
    )
    second = loops.open_iteration(db, loop)
    assert second is not None and second.number == 2 and second.new_comparisons == 3
    assert second.parent_policy_id == base.id

    # Iteration 2 finishes; iteration 3 adopts a reward model, then is abandoned.
    rm3 = _succeed(db, again.job_id, ModelKind.reward, name="rm 3", parent_id=rm.id)
    [queued] = loops.tick(db)
    policy2 = _succeed(db, queued.job_id, ModelKind.policy, name="ppo 2", parent_id=base.id)
    [queued] = loops.tick(db)
    _succeed(db, queued.job_id)
    assert loops.tick(db)[0].action == "finished" and second.stage == Stage.done
    _comparisons(db, campaign, 3)
    [third_start] = loops.tick(db)
    loops.tick(db)  # still training
    _succeed(db, third_start.job_id, ModelKind.reward, name="rm 4", parent_id=rm3.id)
    loops.tick(db)
    assert loop.reward_model_id != rm3.id and loop.policy_id == policy2.id
    third = loops.abandon(db, loop, actor_id=None)
    assert third is not None and third.number == 3
    assert loop.comparison_mark == second.comparison_mark  # not the abandoned one's
    assert (loop.reward_model_id, loop.policy_id) == (rm3.id, policy2.id)
    assert loops.tick(db)[0].action == "started"


def test_abandoning_keeps_a_version_set_by_hand_meanwhile(db):
    campaign = make_campaign(db, slug="loop-abandon-hand", k=2)
    base, rm = _versions(db)
    other_rm = ModelVersion(name="other rm", kind=ModelKind.reward, path="models/o")
    db.add(other_rm)
    db.flush()
    loop = loops.configure(db, campaign, _config(base, rm), actor_id=None)
    _comparisons(db, campaign, 3)
    [started] = loops.tick(db)
    _succeed(db, started.job_id, ModelKind.reward, name="rm 2", parent_id=rm.id)
    loops.tick(db)
    loops.configure(db, campaign, _config(base, other_rm), actor_id=None)  # chosen by hand
    loops.abandon(db, loop, actor_id=None)
    assert loop.reward_model_id == other_rm.id and loop.policy_id == base.id


def test_win_rates_come_from_current_human_judgments_of_audit_tasks(db):
    campaign = make_campaign(db, slug="loop-audit", k=2, overlap=3)
    base, _ = _versions(db)
    child = ModelVersion(name="child", kind=ModelKind.policy, path="x", parent_id=base.id)
    db.add(child)
    db.flush()
    humans = [make_labeler(db) for _ in range(3)]
    robot = make_labeler(db)
    robot.kind = UserKind.ai
    tasks = []
    for n in range(16):
        prompt_task = make_task(db, campaign, completions=[f"old answer {n}"])
        [old] = prompt_task.prompt.completions
        old.model_version_id = base.id  # a sample the parent wrote earlier
        task = add_audit_task(
            db,
            campaign=campaign,
            prompt_id=prompt_task.prompt_id,
            new=(f"new answer {n}", {"temperature": 1.0}),
            new_model_id=child.id,
            old=old,
            old_model_id=base.id,
            job_id=None,
            scores=(1.0, 0.5),
            seed=n,
        )
        assert sorted(i.completion.text for i in task.items) == sorted(
            [f"new answer {n}", f"old answer {n}"]
        )
        tasks.append(task)
    # The sides are shuffled: the new sample is not always shown first (a 2^-15 chance).
    firsts = {task.items[0].completion.model_version_id for task in tasks}
    assert firsts == {base.id, child.id}
    tasks = tasks[:4]  # judged below; the other 12 stay unjudged

    def judge(user, task, new_wins: bool | None, current=True):
        new = next(i.completion_id for i in task.items if i.completion.model_version_id == child.id)
        old = next(i.completion_id for i in task.items if i.completion_id != new)
        ranking = (
            [[new, old]] if new_wins is None else [[new], [old]] if new_wins else [[old], [new]]
        )
        db.add(
            Judgment(
                task_id=task.id,
                campaign_id=campaign.id,
                user_id=user.id,
                ranking=ranking,
                idempotency_key=f"k-{task.id}-{user.id}-{current}",
                payload_hash="x",
                is_current=current,
            )
        )

    for task in tasks:
        judge(humans[0], task, True)
        judge(humans[1], task, False)
        judge(humans[1], task, True, current=False)  # superseded: not counted
        judge(robot, task, True)  # an AI labeler: not counted
    judge(humans[2], tasks[0], None)  # a tie counts half
    db.flush()
    rate = win_rates(db, [child.id])[child.id]
    assert rate.pairs == 16 and rate.judgments == 9 and rate.ties == 1
    assert rate.wins == pytest.approx(4.5) and rate.rate == pytest.approx(0.5)
    assert rate.reward_rate == 1.0 and rate.reward_rose  # 1.0 > 0.5 on every pair
    assert rate.verdict == "pending"  # 9 < MIN_JUDGMENTS


@pytest.mark.parametrize("algorithm", ["dpo", "rloo"])
def test_dpo_and_rloo_loops_queue_their_own_policy_jobs(db, algorithm):
    campaign = make_campaign(db, slug=f"loop-{algorithm}", k=2)
    base, rm = _versions(db)
    config = _config(base, rm, algorithm=algorithm, policy={"training": {"seed": 7}})
    loops.configure(db, campaign, config, actor_id=None)
    _comparisons(db, campaign, 3)
    [started] = loops.tick(db)
    new_rm = _succeed(db, started.job_id, ModelKind.reward, name="rm 2")
    [queued] = loops.tick(db)
    job = db.get_one(Job, queued.job_id)
    assert job.kind == algorithm and job.config["training"]["seed"] == 7
    if algorithm == "dpo":  # DPO trains on the comparisons: no reward model in its spec
        assert job.config["model_id"] == base.id and "reward_model_id" not in job.config
    else:
        assert job.config["policy_id"] == base.id and job.config["reward_model_id"] == new_rm.id


def test_the_loop_page_configures_and_refuses_bad_json(client, as_role, db):
    campaign = make_campaign(db, slug="loop-page", k=2)
    base, rm = _versions(db)
    db.commit()
    as_role("admin")
    page = client.get("/admin/campaigns/loop-page/loop")
    assert page.status_code == 200 and 'data-testid="loop-form"' in page.text
    token = csrf_from(page.text)
    fields = {
        "csrf_token": token,
        "algorithm": "ppo",
        "policy_id": str(base.id),
        "reward_model_id": str(rm.id),
        "min_new_comparisons": "5",
        "audit_share": "0.3",
        "reward_options": "{}",
        "policy_options": '{"training": {"total_steps": 3}}',
        "generate_options": "{}",
    }
    bad = client.post("/admin/campaigns/loop-page/loop", data={**fields, "policy_options": "{oops"})
    assert bad.status_code == 422 and "policy options: not JSON" in bad.text
    assert loops.get_loop(db, campaign.id) is None
    bad = client.post("/admin/campaigns/loop-page/loop", data={**fields, "audit_share": "2"})
    assert bad.status_code == 422 and "audit_share" in bad.text
    saved = client.post("/admin/campaigns/loop-page/loop", data=fields, follow_redirects=False)
    assert saved.status_code == 303
    db.expire_all()
    loop = loops.get_loop(db, campaign.id)
    assert loop is not None and loop.min_new_comparisons == 5 and loop.audit_share == 0.3
    assert loop.config["policy"] == {"training": {"total_steps": 3}}
    page = client.get("/admin/campaigns/loop-page/loop")
    assert 'data-testid="loop-pending"' in page.text and "0 of 5 needed" in page.text
    campaign_page = client.get("/admin/campaigns/loop-page")
    assert "/admin/campaigns/loop-page/loop" in campaign_page.text


@pytest.mark.postgres_only
def test_two_workers_ticking_at_once_start_one_iteration(fresh_database_url):
    """A worker that finds the loop row locked by another skips it instead of waiting or
    starting a second iteration (FOR UPDATE SKIP LOCKED)."""
    from sqlalchemy import select

    from app.db import Database
    from app.loop.models import LoopIteration, PolicyLoop

    database = Database(fresh_database_url)
    try:
        with database.session() as db:
            campaign = make_campaign(db, slug="loop-race", k=2)
            base, rm = _versions(db)
            loops.configure(db, campaign, _config(base, rm), actor_id=None)
            _comparisons(db, campaign, 3)
            db.commit()
        with database.session() as first, database.session() as second:
            held = first.scalar(select(PolicyLoop).with_for_update())
            assert held is not None
            assert loops.tick(second) == []  # skipped, not blocked
            second.commit()
            step = loops.tick_loop(first, held)
            assert step is not None and step.action == "started"
            first.commit()
        with database.session() as db:
            assert len(list(db.scalars(select(LoopIteration)))) == 1
            assert loops.tick(db) == []  # the reward job is queued: nothing more to do
    finally:
        database.dispose()


def test_a_step_that_cannot_be_queued_pauses_its_loop_only(db):
    campaign = make_campaign(db, slug="loop-gone", k=2)
    other = make_campaign(db, slug="loop-fine", k=2)
    base, rm = _versions(db)
    broken = loops.configure(db, campaign, _config(base, rm), actor_id=None)
    fine = loops.configure(db, other, _config(base, rm), actor_id=None)
    _comparisons(db, campaign, 3)
    _comparisons(db, other, 3)
    broken.config = {**broken.config, "reward": {"training": {"epochs": 0}}}  # edited behind
    db.flush()
    steps = {step.loop_id: step for step in loops.tick(db)}
    assert steps[broken.id].action == "paused" and "epochs" in broken.paused_reason
    assert loops.open_iteration(db, broken) is None  # nothing half-written
    assert steps[fine.id].action == "started" and fine.state == LoopState.active


def test_sample_stats_count_every_sample_and_average_the_newest(db, monkeypatch):
    from app.loop import lineage

    monkeypatch.setattr(lineage, "SAMPLES_PER_VERSION", 3)
    monkeypatch.setattr(lineage, "UNION_CHUNK", 1)  # a statement per version: chunks join up
    campaign = make_campaign(db, slug="stats", k=5, overlap=1)
    base, rm = _versions(db)
    child = ModelVersion(name="child", kind=ModelKind.policy, path="models/c", parent_id=base.id)
    quiet = ModelVersion(name="quiet", kind=ModelKind.policy, path="models/q")
    db.add_all([child, quiet])
    db.flush()
    task = make_task(db, campaign, completions=["a", "bb", "ccc", "dddd", "eeeee"])
    completions = sorted((item.completion for item in task.items), key=lambda c: c.id)
    for n, completion in enumerate(completions):  # base wrote the first 4, child the last
        mine = child if n == 4 else base
        completion.model_version_id = mine.id
        measured = {"reward": float(n), "reward_model_id": rm.id, "tokens": n + 1}
        completion.generation_params = {**measured, "log_ratio": 0.5 * n, "reference_id": base.id}
    db.flush()
    stats = lineage.sample_stats(db, [base.id, child.id, quiet.id])
    # base: 4 samples, means over its newest 3 (n = 1, 2, 3: texts of 2, 3, 4 characters)
    assert stats[base.id].samples == 4
    assert stats[base.id].reward == pytest.approx(2.0) and stats[base.id].kl == pytest.approx(1.0)
    assert (stats[base.id].tokens, stats[base.id].characters) == (3.0, 3.0)
    assert stats[base.id].reward_models == [rm.id] and stats[base.id].reference_id == base.id
    assert (stats[child.id].samples, stats[child.id].reward, stats[child.id].tokens) == (
        1,
        4.0,
        5.0,
    )
    assert stats[quiet.id].samples == 0 and stats[quiet.id].reward is None


def test_a_warm_start_counts_only_what_its_reward_model_has_not_seen(db):
    campaign = make_campaign(db, slug="loop-seen", k=2)
    base, rm = _versions(db)
    _comparisons(db, campaign, 4)
    seen = db.scalar(select(func.max(Comparison.id)))
    exported = {"campaigns": ["loop-seen"], "as_of": {"comparison_id": seen}}
    elsewhere = ModelVersion(
        name="rm of another campaign",
        kind=ModelKind.reward,
        path="models/other",
        metrics={"data": {"export_parameters": {**exported, "campaigns": ["other"]}}},
    )
    rm.metrics = {**rm.metrics, "data": {"export_parameters": exported}}
    db.add(elsewhere)
    db.flush()
    # A model trained on another campaign has seen none of this one's comparisons.
    other_loop = loops.configure(
        db, make_campaign(db, slug="loop-unseen", k=2), _config(base, elsewhere), actor_id=None
    )
    assert other_loop.comparison_mark == 0
    loop = loops.configure(db, campaign, _config(base, rm), actor_id=None)
    assert loop.comparison_mark == seen
    assert loops.tick(db) == []  # the 4 it was trained on are not new
    _comparisons(db, campaign, 3)
    [started] = loops.tick(db)
    assert started.action == "started" and loops.open_iteration(db, loop).new_comparisons == 3


def test_an_iteration_that_wrote_no_tasks_says_why(db, client, as_role):
    campaign = make_campaign(db, slug="loop-dry", k=2)
    base, rm = _versions(db)
    loop = loops.configure(db, campaign, _config(base, rm), actor_id=None)
    _comparisons(db, campaign, 3)
    [started] = loops.tick(db)
    _succeed(db, started.job_id, ModelKind.reward, name="rm 2")
    [queued] = loops.tick(db)
    _succeed(db, queued.job_id, ModelKind.policy, name="ppo 1")
    [queued] = loops.tick(db)
    generate_job = db.get_one(Job, queued.job_id)
    generate_job.result = {
        "prompts_planned": 0,
        "tasks_created": 0,
        "audit_tasks": 0,
        "none_due": {"prompts": 3, "open_task": 3, "answered": 0, "per_task": 2},
    }
    _succeed(db, generate_job.id)
    [finished] = loops.tick(db)
    iteration = loops.iterations(db, loop)[0]
    assert finished.action == "finished" and iteration.stage == Stage.done
    assert "wrote no tasks (3 of the campaign's 3 prompts have an open task" in iteration.error
    db.commit()
    as_role("admin")
    page = client.get("/admin/campaigns/loop-dry/loop")
    assert 'data-testid="iteration-note"' in page.text and "wrote no tasks" in page.text
    assert '<td data-testid="iteration-tasks">0</td>' in page.text
