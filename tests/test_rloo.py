"""RLOO (trainer/rloo.py): its math on hand-made tensors, then end to end on a one-layer Llama
built from config (no hub) with a programmatic reward, and an exact resume.

The reward: 1 when the response contains the word "sunny", else 0. A random policy over ~25
words says it in about a quarter of 8-token responses; RLOO should make it say it nearly
always, with no value model, at a KL from the start that stays bounded.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from tests.tiny_rl import (  # noqa: E402
    LINEAR_ADAMW,
    PROMPTS,
    one_torch_thread,
    resume_refusal,
    save_tiny_policy,
    says_sunny,
    series,
    stop_at_ask,
    sunny_samples,
    train_recording,
    update_two_ways,
    weights,
)
from trainer.rl_math import (  # noqa: E402
    kl_k1,
    rloo_advantages,
    rloo_baseline,
    sequence_kl_rewards,
)
from trainer.rloo import CHECKPOINT_DIR, META_FILE, RLOOConfig, train  # noqa: E402


def close(actual: torch.Tensor, expected: list | float, atol: float = 1e-6) -> None:
    torch.testing.assert_close(
        actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0
    )


# ---------------------------------------------------------------------------------------
# The math, by hand


def test_leave_one_out_baseline_and_advantages_by_hand() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.0, 4.0]])  # (N=2, k=4)
    # prompt 1: the others' means are (2+3+6)/3, (1+3+6)/3, (1+2+6)/3, (1+2+3)/3
    # prompt 2: 4/3 for the three zeros, 0 for the 4
    close(rloo_baseline(rewards), [[11 / 3, 10 / 3, 3.0, 2.0], [4 / 3, 4 / 3, 4 / 3, 0.0]])
    advantages = rloo_advantages(rewards)
    close(advantages, [[-8 / 3, -4 / 3, 0.0, 4.0], [-4 / 3, -4 / 3, -4 / 3, 4.0]])
    close(advantages.sum(dim=1), [0.0, 0.0], atol=1e-5)  # they sum to 0 per prompt
    # equivalently k / (k - 1) * (r - mean): no prompt's own mean leaks into its baseline
    mean = rewards.mean(dim=1, keepdim=True)
    close(advantages, (4 / 3 * (rewards - mean)).tolist(), atol=1e-5)


def test_leave_one_out_with_two_samples_and_ties() -> None:
    # k = 2: each sample's baseline is the other one, so the advantages are +-(r1 - r2)
    close(rloo_advantages(torch.tensor([[5.0, 2.0]])), [[3.0, -3.0]])
    # equal rewards: nothing to learn from that prompt
    close(rloo_advantages(torch.tensor([[0.7, 0.7, 0.7]])), [[0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_baseline(torch.tensor([[1.0], [2.0]]))


def test_sequence_kl_reward_by_hand() -> None:
    score = torch.tensor([1.0, -0.5])
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -9.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.7, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])  # row 2 is one token long
    kl = kl_k1(logprobs, ref)  # row 1: 0.5, -1.0, 0.0 -> -0.5; row 2: 0.5 (padding ignored)
    # 1 - 0.1 * (-0.5) = 1.05; -0.5 - 0.1 * 0.5 = -0.55
    close(sequence_kl_rewards(score, kl, 0.1, mask), [1.05, -0.55])
    close(sequence_kl_rewards(score, kl, 0.0, mask), [1.0, -0.5])


# ---------------------------------------------------------------------------------------
# End to end on a tiny model


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_policy(tmp_path_factory.mktemp("policy"))


def config(policy: Path, **overrides: object) -> RLOOConfig:
    settings: dict[str, object] = {
        "policy": str(policy),
        "prompts_per_step": 8,
        "k": 4,
        "minibatch_size": 16,
        "epochs": 2,
        "learning_rate": 1e-2,
        "lr_schedule": "constant",
        "max_new_tokens": 8,
        "temperature": 1.0,
        "kl_coef": 0.1,
        "total_steps": 20,
        "seed": 0,
    }
    return RLOOConfig(**(settings | overrides))


def test_rloo_raises_the_reward_with_a_bounded_kl(policy_dir: Path, tmp_path: Path) -> None:
    cfg = config(policy_dir)
    result, seen, progress = train_recording(
        train, cfg, tmp_path / "out", reward_fn=says_sunny, device="cpu"
    )
    assert not result.stopped and result.steps == 20 and progress[-1] == 1.0
    reward, kl = series(seen, "reward/raw"), series(seen, "kl/k1")
    assert len(reward) == 20
    start, end = sum(reward[:3]) / 3, sum(reward[-5:]) / 5
    assert start < 0.45 and end > 0.8, (start, end)
    assert kl[0] == pytest.approx(0.0, abs=1e-5)  # policy == reference before any update
    assert max(kl) < 10.0, kl  # nats per 8-token response: moved, but not unboundedly
    assert series(seen, "kl/beta") == [0.1] * 20  # the fixed controller
    assert series(seen, "reward/normalized") == reward  # a plain function is not rescaled
    # reward/rlhf is the score minus beta times the sequence KL, on average
    for raw, rlhf, k1 in zip(reward, series(seen, "reward/rlhf"), kl, strict=True):
        assert rlhf == pytest.approx(raw - 0.1 * k1, abs=1e-5)
    names = {name for _, name, _ in seen}
    for name in (
        "reward/std_within_prompt",
        "rloo/baseline_std",
        "kl/k3",
        "policy/entropy",
        "policy/loss",
        "policy/clip_frac",
        "policy/approx_kl",
        "response/length",
        "response/eos_rate",
        "response/length_reward_corr",
        "train/learning_rate",
        "train/grad_norm",
        "time/generate",
        "time/train",
        "tokens/response",
    ):
        assert name in names, name
    assert not any(name.startswith("value/") for name in names)  # no value model
    assert all(math.isfinite(v) for _, _, v in seen)
    assert all(0 <= v <= 1 for v in series(seen, "policy/clip_frac"))
    assert all(1 <= v <= 8 for v in series(seen, "response/length"))

    # The saved policy loads as a plain causal LM and says the word.
    out = tmp_path / "out"
    meta = json.loads((out / META_FILE).read_text())
    assert meta["format"] == "prefloop-rloo/1" and meta["steps"] == 20
    assert meta["config"]["k"] == 4 and meta["metrics"]["reward/raw"] == reward[-1]
    assert not (out / CHECKPOINT_DIR).exists()
    assert sunny_samples(out) >= 10


def test_stop_and_resume_match_an_uninterrupted_run(policy_dir: Path, tmp_path: Path) -> None:
    cfg = config(
        policy_dir, total_steps=4, prompts_per_step=3, k=2, minibatch_size=3, adaptive_kl=True
    )
    whole = train(cfg, PROMPTS, tmp_path / "whole", reward_fn=says_sunny, device="cpu")
    split = tmp_path / "split"
    first = train(
        cfg, PROMPTS, split, reward_fn=says_sunny, device="cpu", should_stop=stop_at_ask(3)
    )
    assert first.stopped and first.steps == 2
    assert (split / CHECKPOINT_DIR / "state.pt").exists()
    assert not (split / META_FILE).exists()
    second = train(cfg, PROMPTS, split, reward_fn=says_sunny, device="cpu")
    assert not second.stopped and second.steps == 4
    # the same tensor names, each equal
    torch.testing.assert_close(weights(split), weights(tmp_path / "whole"), atol=1e-6, rtol=0)
    # Same rollouts, same beta (the adaptive controller's state was saved), same history.
    for name in ("reward/raw", "kl/k1", "kl/beta", "policy/loss"):
        assert series(second.history, name) == pytest.approx(series(whole.history, name))
    assert series(whole.history, "kl/beta")[-1] != 0.1  # the controller did move
    # Another config does not resume this checkpoint.
    other = RLOOConfig(**{**cfg.__dict__, "k": 3})
    refusal = resume_refusal(
        train, cfg, other, tmp_path / "other", reward_fn=says_sunny, device="cpu"
    )
    assert "another config" in refusal


def test_plain_reinforce_loo_sees_k_answers_per_prompt(policy_dir: Path, tmp_path: Path) -> None:
    """One epoch of one minibatch: the only update is at ratio 1 (the old log-probs are the
    training pass's own), so nothing is clipped; the reward function gets each prompt's k
    responses side by side."""
    calls: list[list] = []

    def recording(prompts: list, responses: list[str]) -> torch.Tensor:
        calls.append(list(prompts))
        return says_sunny(prompts, responses)

    cfg = config(policy_dir, total_steps=2, prompts_per_step=3, k=3, epochs=1, minibatch_size=None)
    result = train(cfg, PROMPTS, tmp_path / "plain", reward_fn=recording, device="cpu")
    assert series(result.history, "policy/clip_frac") == [0.0, 0.0]
    assert series(result.history, "policy/approx_kl") == pytest.approx([0.0, 0.0], abs=1e-6)
    for batch in calls:
        assert len(batch) == 9
        groups = [batch[i : i + 3] for i in range(0, 9, 3)]
        assert all(len(set(group)) == 1 for group in groups)  # one prompt, k times
        assert len({group[0] for group in groups}) == 3  # three different prompts
    assert calls[0][0] != calls[1][0]  # the next step takes the next prompts


def test_accumulation_and_checkpointing_give_the_same_update(
    policy_dir: Path, tmp_path: Path
) -> None:
    """micro_batch_size splits the minibatch into accumulated passes (here unevenly, 3 + 3 + 2
    responses, each weighted by its share) and gradient checkpointing recomputes
    activations: neither changes what a step learns."""
    # One AdamW step linear in the gradient (LINEAR_ADAMW), on a dense reward that gives
    # every response an advantage: a mis-weighted accumulation would show in the weights.
    one_step = {"total_steps": 1, "prompts_per_step": 4, "k": 2, "minibatch_size": None}
    plain = config(policy_dir, **one_step, **LINEAR_ADAMW)
    micro = config(
        policy_dir, **one_step, **LINEAR_ADAMW, micro_batch_size=3, gradient_checkpointing=True
    )
    a, b, logged_a, logged_b = update_two_ways(train, plain, micro, tmp_path)
    start = weights(policy_dir)
    assert any(not torch.equal(a[name], start[name]) for name in a)  # the step did learn
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)  # every tensor, the same names
    # the logged losses are the minibatch's own means too, however it was split
    for name in ("policy/loss", "policy/clip_frac", "policy/approx_kl"):
        assert logged_b[name] == pytest.approx(logged_a[name], rel=1e-4, abs=1e-6), name


def test_lora_policy_uses_the_adapter_free_model_as_reference(
    policy_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("peft", reason="peft is optional: LoRA is tested where it is installed")
    cfg = config(
        policy_dir,
        use_lora=True,
        lora_r=4,
        total_steps=3,
        prompts_per_step=4,
        k=2,
        minibatch_size=4,
    )
    result = train(cfg, PROMPTS, tmp_path / "lora", reward_fn=says_sunny, device="cpu")
    kl = series(result.history, "kl/k1")
    assert kl[0] == pytest.approx(0.0, abs=1e-5) and kl[-1] != pytest.approx(0.0, abs=1e-4)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "lora")  # merged: a plain model


def test_config_fields_document_themselves_and_validate(tmp_path: Path) -> None:
    for f in fields(RLOOConfig):
        assert f.metadata.get("help"), f.name
    with pytest.raises(ValueError, match="k must be >= 2"):
        RLOOConfig(policy="p", k=1)
    with pytest.raises(ValueError, match="minibatch_size"):
        RLOOConfig(policy="p", prompts_per_step=2, k=2, minibatch_size=5)
    assert RLOOConfig(policy="p", prompts_per_step=3, k=5).batch_size == 15
    with pytest.raises(ValueError, match="reward_fn"):
        train(RLOOConfig(policy="p"), PROMPTS, tmp_path, device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_bf16_rloo_raises_the_reward(policy_dir: Path, tmp_path: Path) -> None:
    """bf16 autocast is on by default with CUDA; the reward still rises, from KL 0."""
    cfg = config(policy_dir, gradient_checkpointing=True)
    result, seen, _ = train_recording(
        train, cfg, tmp_path / "gpu", reward_fn=says_sunny, device="cuda"
    )
    reward, kl = series(seen, "reward/raw"), series(seen, "kl/k1")
    assert sum(reward[-5:]) / 5 > sum(reward[:3]) / 3 + 0.2, reward
    assert kl[0] == pytest.approx(0.0, abs=1e-3) and result.steps == cfg.total_steps
    assert json.loads((tmp_path / "gpu" / META_FILE).read_text())["config"]["bf16"] is None
