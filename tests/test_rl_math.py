"""PPO's math (trainer/rl_math.py) on hand-made tensors, against values computed by hand."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from trainer.rl_math import (  # noqa: E402
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_k1,
    kl_k2,
    kl_k3,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    pearson,
    per_token_rewards,
    policy_loss,
    value_loss,
)


def close(actual: torch.Tensor, expected: list | float, atol: float = 1e-6) -> None:
    torch.testing.assert_close(
        actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0
    )


def test_masked_mean_ignores_padding() -> None:
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(masked_mean(x, mask), 2.0)
    close(masked_mean(x, mask, dim=1), [1.5, 3.0])


def test_masked_whiten_uses_only_real_tokens() -> None:
    x = torch.tensor([[2.0, 4.0, 6.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # mean 4, unbiased variance (4 + 0 + 4) / 2 = 4, std 2; padding stays 0
    close(masked_whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]], atol=1e-5)
    close(masked_whiten(x, mask, shift_mean=False), [[3.0, 4.0, 5.0, 0.0]], atol=1e-5)


def test_gae_by_hand() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [0.5, 1.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # row 2 ends at t=1: its 9 and 7 are padding
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 1: A2 = 1 - .3 = .7; A1 = (0 + .3 - .4) + .5 * .7 = .25; A0 = -.1 + .5 * .25 = .025
    # row 2: A1 = 2 + 0 - 1 = 1; A0 = (0 + 1 - .5) + .5 * 1 = 1; padding 0
    close(advantages, [[0.025, 0.25, 0.7], [1.0, 1.0, 0.0]])
    close(returns, [[0.525, 0.65, 1.0], [1.5, 2.0, 0.0]])


def test_gae_with_lambda_one_is_the_discounted_return() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.3, -0.2, 0.8]])
    _, returns = gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=1.0)
    close(returns, [[0.81, 0.9, 1.0]])


def test_kl_estimators_on_one_token() -> None:
    logprobs = torch.tensor([math.log(0.5)])
    ref = torch.tensor([math.log(0.25)])
    log_ratio = math.log(0.5)  # log ref/pi
    close(kl_k1(logprobs, ref), [-log_ratio])
    close(kl_k2(logprobs, ref), [0.5 * log_ratio**2])
    close(kl_k3(logprobs, ref), [(0.5 - 1) - log_ratio])


def test_k1_and_k3_are_unbiased_and_k3_is_positive() -> None:
    generator = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    exact = (p * (p / q).log()).sum()
    x = torch.multinomial(p, 200_000, replacement=True, generator=generator)
    logp, logq = p.log()[x], q.log()[x]
    assert abs(kl_k1(logp, logq).mean() - exact) < 0.01
    assert abs(kl_k3(logp, logq).mean() - exact) < 0.01
    assert (kl_k3(logp, logq) >= 0).all()
    assert kl_k3(logp, logq).var() < kl_k1(logp, logq).var()


def test_policy_loss_by_hand() -> None:
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.0, 3.0]])
    old = torch.zeros(1, 5)
    advantages = torch.tensor([[1.0, 1.0, -1.0, 2.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])  # the last token is padding
    loss, clip_frac, approx_kl = policy_loss(ratios.log(), old, advantages, mask, clip=0.2)
    # max(-A r, -A clip(r)): 1.5,+1 -> -1.2 (clipped); 0.5,+1 -> -0.5; 0.5,-1 -> 0.8 (clipped);
    # 1.0,+2 -> -2
    close(loss, (-1.2 - 0.5 + 0.8 - 2.0) / 4)
    close(clip_frac, 0.5)
    k3 = [(r - 1) - math.log(r) for r in (1.5, 0.5, 0.5, 1.0)]
    close(approx_kl, sum(k3) / 4)


def test_policy_loss_gradient_is_zero_where_clipped() -> None:
    logprobs = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    loss, _, _ = policy_loss(logprobs, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), 0.2)
    loss.backward()
    close(logprobs.grad, [[0.0, -1.1 / 2]])


def test_value_loss_by_hand() -> None:
    values = torch.tensor([[1.5, 1.1, 50.0]])
    old = torch.tensor([[1.0, 1.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, clip_frac = value_loss(values, old, returns, mask, clip=0.2)
    # token 1: clipped V = 1.2, max(.25, .64) = .64; token 2: within the clip, 1.21
    close(loss, 0.5 * (0.64 + 1.21) / 2)
    close(clip_frac, 0.5)


def test_per_token_rewards_put_the_score_on_the_last_real_token() -> None:
    score = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    close(
        per_token_rewards(score, kl, 0.1, mask),
        [[-0.01, -0.02, 0.97], [-0.05, 1.95, 0.0]],
    )


def test_adaptive_kl_controller() -> None:
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(9.0, n_steps=100)  # error 0.5, clipped to 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))
    ctl.update(6.6, n_steps=1000)  # error 0.1
    assert ctl.value == pytest.approx(0.1 * 1.002 * 1.01)
    ctl.update(0.0, n_steps=100)  # error -1, clipped to -0.2
    assert ctl.value == pytest.approx(0.1 * 1.002 * 1.01 * 0.998)
    other = AdaptiveKLController(1.0, target=1.0, horizon=1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.state_dict() == ctl.state_dict()
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05


def test_logprobs_and_entropy_from_logits() -> None:
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [2.0, 1.0, 0.0, -1.0]]])  # (1, 2, 4)
    labels = torch.tensor([[3, 0]])
    expected = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    close(logprobs_from_logits(logits, labels), expected.tolist())
    p = torch.softmax(logits[0, 1], -1)
    close(entropy_from_logits(logits), [[math.log(4), float(-(p * p.log()).sum())]], atol=1e-5)


def test_explained_variance_and_pearson() -> None:
    target = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert explained_variance(target, target) == pytest.approx(1.0)
    assert explained_variance(torch.full((4,), 2.5), target) == pytest.approx(0.0)
    assert math.isnan(explained_variance(target, torch.ones(4)))
    assert pearson(target, 2 * target + 1) == pytest.approx(1.0)
    assert math.isnan(pearson(target, torch.ones(4)))
