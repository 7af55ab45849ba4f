"""PPO and RLOO in 2 data-parallel processes on CPU (gloo), launched through `accelerate
launch` as the worker launches them: the ranks pool their rollouts' numbers, each samples its
own half of every batch, the pair raises the reward, stops together at the worker's request
and resumes to the weights of the uninterrupted 2-process run; sharded (FSDP2), the pair takes
the replicated pair's steps and resumes its own sharded checkpoint exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("accelerate")

from tests.test_ppo import config as ppo_config  # noqa: E402
from tests.test_rloo import config as rloo_config  # noqa: E402
from tests.tiny_rl import PROMPTS, save_tiny_policy, says_sunny, series, weights  # noqa: E402
from trainer.distributed import SINGLE, Distributed  # noqa: E402
from trainer.launch import launch  # noqa: E402
from trainer.launched import STOP  # noqa: E402
from trainer.rollout import CHECKPOINT_DIR, per_rank  # noqa: E402


def pooled_numbers(
    *, dist: Distributed, on_metric: Any, on_progress: Any, should_stop: Any
) -> dict[str, Any]:
    """What each rank sees of `gather_rows` when rank r holds 2 rows of width r + 1."""
    r = dist.rank
    rows = torch.full((2, r + 1), float(r + 1))  # (2, r + 1)
    flags = torch.tensor([r == 0, True])  # (2,)
    pooled = dist.gather_rows(rows)
    return {
        "rank": r,
        "rows": pooled,
        "flags": dist.gather_rows(flags),
        "mine": pooled[dist.mine(2), : r + 1],
        "sum": dist.sum([r, 10.0]),
    }


def test_the_ranks_pool_their_rows_padded_to_the_widest(tmp_path):
    got = launch(
        "tests.test_distributed_rl:pooled_numbers",
        (),
        {},
        processes=2,
        device="cpu",
        run_dir=tmp_path,
    )  # rank 0's view
    assert got["rank"] == 0
    assert torch.equal(got["rows"], torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 2.0], [2.0, 2.0]]))
    assert got["flags"].dtype == torch.bool and got["flags"].tolist() == [True, True, False, True]
    assert torch.equal(got["mine"], torch.ones(2, 1))  # its own rows at its own width
    assert got["sum"] == [1.0, 20.0]
    # one process: the tensors themselves
    alone = torch.ones(3, 2)
    assert SINGLE.gather_rows(alone) is alone and SINGLE.mine(3) == slice(0, 3)


def sharded_scores(
    model_dir: str,
    prompts: list[str],
    responses: list[str],
    *,
    dist: Distributed,
    on_metric: Any,
    on_progress: Any,
    should_stop: Any,
) -> torch.Tensor:
    """Each rank scores every world_size-th response through the sharded reward model (in
    batches of 2, so each rank runs several forwards); rank 0 returns them all, rank by
    rank."""
    from trainer.rollout import reward_model_function

    reward = reward_model_function(model_dir, dist=dist)
    reward.batch_size = 2
    scores = reward(prompts[dist.rank :: 2], responses[dist.rank :: 2])  # (b,)
    return dist.gather_rows(scores)


def test_a_sharded_reward_model_scores_as_one_process(tmp_path):
    """PPO and RLOO under FSDP score each rank's responses through the reward model sharded
    over the ranks: the same normalized scores as the whole model in one process."""
    from tests.rl_jobs import save_models
    from trainer.rollout import reward_model_function

    save_models(tmp_path, reward_std=2.0)
    model_dir = str(tmp_path / "models" / "rm")
    prompts = [f"tell me about the weather {n}" for n in range(8)]
    responses = ["sunny", "rain cold", "wind", "sunny sunny", "cloud", "cold", "the", "rain"]
    got = launch(
        "tests.test_distributed_rl:sharded_scores",
        (model_dir, prompts, responses),
        {},
        processes=2,
        device="cpu",
        run_dir=tmp_path / "launch",
        sharding="fsdp",
    )
    alone = reward_model_function(model_dir)(prompts, responses)  # (8,)
    order = [*range(0, 8, 2), *range(1, 8, 2)]  # rank 0's rows, then rank 1's
    torch.testing.assert_close(got, alone[order], atol=1e-5, rtol=1e-5)
    assert alone.std() > 0  # the responses are told apart


def test_every_global_batch_splits_evenly_over_the_processes():
    assert per_rank(8, Distributed(rank=1, world_size=2), "rollout_batch_size") == 4
    assert per_rank(8, SINGLE, "rollout_batch_size") == 8
    with pytest.raises(
        ValueError, match=r"rollout_batch_size \(9\) must be a multiple of .* \(2\)"
    ):
        per_rank(9, Distributed(rank=0, world_size=2), "rollout_batch_size")


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_policy(tmp_path_factory.mktemp("policy"))


def _launch(target: str, config: Any, out: Path, run_dir: Path, **kwargs: Any) -> Any:
    return launch(
        target,
        (config, PROMPTS, out),
        {"reward_fn": says_sunny},
        processes=2,
        device="cpu",
        run_dir=run_dir,
        **kwargs,
    )


def _launch_stopped(target: str, config: Any, out: Path, run_dir: Path, **kwargs: Any) -> Any:
    """`_launch`, the worker asking the processes to stop once the first step's metrics
    came (the stop lands at a later step)."""
    seen: list[tuple[int, str, float]] = []
    return _launch(
        target,
        config,
        out,
        run_dir,
        on_metric=lambda step, name, value: seen.append((step, name, value)),
        should_stop=lambda: bool(seen),
        **kwargs,
    )


@pytest.mark.parametrize(
    ("target", "settings", "steps"),
    [
        # 32 responses per step, 16 per rank; minibatches of 16, 8 per rank, in micro-batches
        # of 4 (DDP syncs once per minibatch)
        ("trainer.ppo:train", lambda p: ppo_config(p, micro_batch_size=4), 25),
        # 8 prompts x 4 answers per step: 4 prompts (16 responses) per rank
        ("trainer.rloo:train", lambda p: rloo_config(p, micro_batch_size=4), 20),
    ],
    ids=["ppo", "rloo"],
)
def test_two_processes_raise_the_reward_stop_together_and_resume_exactly(
    policy_dir, tmp_path, target, settings, steps
):
    config = settings(policy_dir)
    whole = _launch(target, config, tmp_path / "whole", tmp_path / "launch-whole")
    assert not whole.stopped and whole.steps == steps
    reward = series(whole.history, "reward/raw")
    assert len(reward) == steps
    start, end = sum(reward[:3]) / 3, sum(reward[-5:]) / 5
    assert start < 0.4 and end > 0.8, (start, end)
    # rank 0 reports the global batch: all 32 responses' tokens, prompt and response
    assert all(v >= 32 * 2 for v in series(whole.history, "tokens/sequence"))
    assert all(32 <= v <= 32 * 8 for v in series(whole.history, "tokens/response"))
    assert not (tmp_path / "whole" / CHECKPOINT_DIR).exists()

    out = tmp_path / "split"
    stopped = _launch_stopped(target, config, out, tmp_path / "launch")
    assert (tmp_path / "launch" / STOP).exists()
    assert stopped.stopped and 1 <= stopped.steps < steps, stopped.steps
    assert (out / CHECKPOINT_DIR / "state.pt").exists()
    resumed = _launch(target, config, out, tmp_path / "launch")
    assert not resumed.stopped and resumed.steps == steps
    # every rank got its own RNG states back: the same samples, the same weights (the
    # history goes on from the checkpoint's)
    for name in ("reward/raw", "kl/k1", "policy/loss"):
        assert series(resumed.history, name) == pytest.approx(
            series(whole.history, name), rel=1e-4, abs=1e-6
        ), name
    torch.testing.assert_close(weights(out), weights(tmp_path / "whole"), atol=1e-5, rtol=1e-4)


def test_a_two_process_checkpoint_resumes_in_one(policy_dir, tmp_path):
    """The checkpoint is one process's format (the models, not their DDP wrappers): one
    process resumes it, taking rank 0's RNG states."""
    from trainer.ppo import train

    # Long enough that the stop, asked after the first step's metrics, lands mid-run.
    steps = 40
    config = ppo_config(policy_dir, total_steps=steps, rollout_batch_size=8, minibatch_size=4)
    out = tmp_path / "run"
    stopped = _launch_stopped("trainer.ppo:train", config, out, tmp_path / "launch")
    assert stopped.stopped and stopped.steps < steps
    resumed = train(config, PROMPTS, out, reward_fn=says_sunny, device="cpu")
    assert not resumed.stopped and resumed.steps == steps
    assert [step for step, name, _ in resumed.history if name == "reward/raw"] == list(
        range(1, steps + 1)
    )
    assert resumed.history[: len(stopped.history)] == stopped.history
    assert not (out / CHECKPOINT_DIR).exists()


def test_a_checkpoint_of_another_process_count_gives_each_rank_its_own_stream(tmp_path):
    """Resumed by 2 processes, a one-process checkpoint's RNG states (rank 0's, for every
    rank) would have both ranks draw the same samples: each rank is reseeded, the same way
    on every resume."""
    from trainer.rl_math import FixedKLController
    from trainer.rollout import RunCheckpoint

    RunCheckpoint(tmp_path, "run", kl=FixedKLController(0.1)).save(3, {}, [])

    def draw(rank: int, world_size: int) -> torch.Tensor:
        dist = Distributed(rank=rank, world_size=world_size)
        RunCheckpoint(tmp_path, "run", dist, kl=FixedKLController(0.1)).resume(print, 10)
        return torch.rand(4)

    alone = draw(0, 1)
    assert torch.equal(draw(0, 1), alone)  # one process: exactly the saved states
    first, second = draw(0, 2), draw(1, 2)
    assert not torch.equal(first, second)
    assert torch.equal(draw(1, 2), second)


# Enough steps that the stop, asked after the first step's metrics, lands mid-run (an RLOO
# step of the tiny policy takes some 0.2 s). PPO with LoRA shards the policy (its adapters
# trained, its base frozen) and the value model; RLOO the policy and the reference. A
# reduce-scatter adds in another order than an all-reduce: at the other tests' learning rate
# of 1e-2 that rounding grows, over a few steps of the tiny policy, until a sample differs;
# at 1e-3 the runs stay within 1e-4 of each other (measured: 4e-5 at most).
@pytest.mark.parametrize(
    ("target", "settings"),
    [
        (
            "trainer.ppo:train",
            lambda p: ppo_config(
                p, total_steps=8, learning_rate=1e-3, use_lora=True, gradient_checkpointing=True
            ),
        ),
        (
            "trainer.rloo:train",
            lambda p: rloo_config(p, total_steps=16, learning_rate=1e-3, micro_batch_size=4),
        ),
    ],
    ids=["ppo-lora-checkpointing", "rloo"],
)
def test_sharded_processes_stop_resume_and_follow_the_replicated_run(
    policy_dir, tmp_path, target, settings
):
    """FSDP2 over 2 processes, sampling in lockstep: stopped mid-run, their checkpoint (the
    one-process format, gathered from the shards) resumes them, sharded, and they end where
    the uninterrupted DDP run does: the same samples, losses and gradient norms at every
    step, and the same weights."""
    config = settings(policy_dir)
    steps = config.total_steps
    replicated = _launch(target, config, tmp_path / "ddp", tmp_path / "launch-ddp")
    assert not replicated.stopped and replicated.steps == steps

    out = tmp_path / "fsdp"
    stopped = _launch_stopped(target, config, out, tmp_path / "launch", sharding="fsdp")
    assert stopped.stopped and 1 <= stopped.steps < steps, stopped.steps
    state = torch.load(out / CHECKPOINT_DIR / "state.pt", weights_only=False)
    models = ["policy", "value"] if "ppo" in target else ["policy"]
    for name in models:  # whole tensors under the plain model's names, no shards
        assert state[name] and all(type(t) is torch.Tensor for t in state[name].values())
        assert not any(key.startswith(("module.", "_fsdp")) for key in state[name])
    assert set(state["optimizer"]["state"]) <= set(range(len(state["optimizer"]["state"])))

    resumed = _launch(target, config, out, tmp_path / "launch", sharding="fsdp")
    assert not resumed.stopped and resumed.steps == steps
    assert [s for s, n, _ in resumed.history if n == "reward/raw"] == list(range(1, steps + 1))
    assert series(resumed.history, "reward/raw") == series(replicated.history, "reward/raw")
    for name in ("kl/k1", "policy/loss", "train/grad_norm"):
        assert series(resumed.history, name) == pytest.approx(
            series(replicated.history, name), rel=1e-4, abs=1e-6
        ), name
    # the saved policy: plain transformers weights (LoRA merged), the DDP run's
    torch.testing.assert_close(weights(out), weights(tmp_path / "ddp"), atol=1e-5, rtol=1e-4)
    assert not (out / CHECKPOINT_DIR).exists()
