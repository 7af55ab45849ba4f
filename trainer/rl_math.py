"""PPO's and RLOO's math for language models as small pure functions on tensors.

Shapes: B sequences in a batch, T response tokens, V vocabulary. `mask` is (B, T) with 1 on
real response tokens (the EOS included) and 0 on the padding after it; the functions that
walk time (`gae`, `per_token_rewards`) need it to be a prefix of ones on every row, which is
what sampling until EOS gives.

References: Schulman et al. 2016 (GAE), Schulman et al. 2017 (PPO), Ziegler et al. 2019
("Fine-Tuning Language Models from Human Preferences": per-token KL penalty, adaptive KL
controller), Schulman 2020 "Approximating KL Divergence" (k1/k2/k3), Huang et al. 2024
("The N+ Implementation Details of RLHF with PPO"), Ahmadian et al. 2024 ("Back to Basics:
Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs": RLOO).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "pearson",
    "per_token_rewards",
    "policy_loss",
    "rloo_advantages",
    "rloo_baseline",
    "sequence_kl_rewards",
    "value_loss",
]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the positions where mask is 1: () or, along `dim`, x's shape without it."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over the masked positions, () ; Bessel-corrected by default (as TRL)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked positions, same shape as x, 0 where mask is 0.
    shift_mean=False keeps the mean (scales only): used for rewards, whose sign matters."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label), (B, T) from logits (B, T, V) and labels (B, T); float32.

    logit[label] - logsumexp(logits) never materialises the (B, T, V) log-softmax."""
    logits = logits.float()
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax at each position, (B, T) from (B, T, V):
    H = logsumexp(z) - sum softmax(z) * z."""
    logits = logits.float()
    probs = F.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


# KL(pi || ref) estimated from tokens sampled from pi (Schulman, "Approximating KL
# Divergence", 2020), with r = ref(x) / pi(x) and log r = ref_logprob - logprob, each (B, T):
#   k1 = -log r             unbiased, high variance, can be negative on one sample
#   k2 = (log r)^2 / 2      biased, low variance, always >= 0
#   k3 = (r - 1) - log r    unbiased, low variance, always >= 0


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return 0.5 * (ref_logprobs - logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


def per_token_rewards(
    score: torch.Tensor, kl: torch.Tensor, beta: float, mask: torch.Tensor
) -> torch.Tensor:
    """Ziegler et al. 2019, eq. 2: r_t = -beta * kl_t on every response token, plus the
    sequence's score (B,) on its last real token. kl and mask (B, T) -> rewards (B, T)."""
    mask = mask.to(kl.dtype)
    rewards = -beta * kl * mask  # (B, T)
    last = (mask.sum(1).long() - 1).clamp(min=0)  # (B,) index of the last real token
    rows = torch.arange(len(score), device=score.device)
    rewards[rows, last] += score.to(rewards.dtype)
    return rewards


def sequence_kl_rewards(
    score: torch.Tensor, kl: torch.Tensor, beta: float, mask: torch.Tensor
) -> torch.Tensor:
    """RLOO's reward (Ahmadian et al. 2024): one per sequence, the score (B,) minus
    beta times the KL summed over its real tokens, kl and mask (B, T) -> (B,)."""
    return score - beta * (kl * mask.to(kl.dtype)).sum(dim=1)


def rloo_baseline(rewards: torch.Tensor) -> torch.Tensor:
    """The leave-one-out baseline (Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a
    Baseline for Free!"; Ahmadian et al. 2024): for rewards (N prompts, k samples each),
    every sample's baseline is the mean of the other k - 1 samples' rewards of its prompt,
    (N, k). Needs k >= 2."""
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError("the leave-one-out baseline needs k >= 2 samples per prompt")
    return (rewards.sum(dim=-1, keepdim=True) - rewards) / (k - 1)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """A_i = r_i - mean_{j != i} r_j over each prompt's k samples, (N, k) -> (N, k). They
    sum to 0 per prompt; equal rewards give 0 (nothing to learn from that prompt)."""
    return rewards - rloo_baseline(rewards)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), (B, T) each:

        delta_t = r_t + gamma * V_{t+1} - V_t      (V after the last real token is 0)
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns = A + V                            (the value targets)

    Padding (mask 0, after the last real token) gets rewards and values 0, so the episode ends
    at the last real token and padded advantages are 0."""
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    advantages = advantages * mask
    return advantages, advantages + values


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), to minimise; inputs (B, T).

    Returns (loss, clip_frac, approx_kl), each (): the share of tokens where the clipped term
    is the one used, and k3 of the old policy from the new (what cleanrl logs)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_frac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
    return loss, clip_frac, approx_kl


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (the OpenAI baselines / lm-human-preferences form), inputs (B, T):
    0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clamp(V - V_old, -c, c).

    Returns (loss, clip_frac), each ()."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    with torch.no_grad():
        clip_frac = masked_mean((clipped_loss > unclipped_loss).float(), mask)
    return loss, clip_frac


def explained_variance(
    predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> float:
    """1 - Var(target - predicted) / Var(target): 1 is a perfect value function, 0 is no
    better than a constant, negative is worse. NaN when the target is constant."""
    if mask is None:
        mask = torch.ones_like(target)
    var_target = masked_var(target, mask).item()
    if var_target == 0:
        return float("nan")
    return 1.0 - masked_var(target - predicted, mask).item() / var_target


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Correlation of two (B,) tensors; NaN when either is constant."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = (x.pow(2).sum() * y.pow(2).sum()).sqrt().item()
    return float("nan") if denominator == 0 else (x * y).sum().item() / denominator


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, value: float) -> None:
        self.value = value

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]


class AdaptiveKLController:
    """Ziegler et al. 2019, section 2.2 (lm-human-preferences' AdaptiveKLController): a
    proportional controller that steers the KL toward `target`:

        e_t    = clip(KL_t / target - 1, -0.2, 0.2)
        beta  *= 1 + e_t * n_steps / horizon

    `current_kl`: the batch's mean KL per sequence (summed over tokens); `n_steps`: samples in
    the batch, so that `horizon` is counted in episodes (10000 in the paper)."""

    def __init__(self, init_value: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError("the KL target and horizon must be positive")
        self.value = init_value
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]
