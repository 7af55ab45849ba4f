"""The reward model's math (and DPO's loss, at the end) as small pure functions on tensors.

A judgment ranks K completions of one prompt (rank 0 = best, equal ranks = a tie). Following
InstructGPT (Ouyang et al., 2022, section 3.5), the K completions are scored in one forward
pass and all K-choose-2 comparisons of the judgment enter the loss together, averaged within
the judgment so that a K=9 ranking does not weigh 36 times a K=2 one.

Shapes: N completions in a batch (all groups' completions flattened), P pairs, G groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import torch
import torch.nn.functional as F


def pair_indices(ranks: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All K-choose-2 pairs of one ranking as (better, worse, tie), each of shape (P,).

    For a tie the two indices are in their original order; `tie` marks them."""
    better, worse, tie = [], [], []
    for i, j in combinations(range(len(ranks)), 2):
        if ranks[i] <= ranks[j]:
            better.append(i)
            worse.append(j)
        else:
            better.append(j)
            worse.append(i)
        tie.append(ranks[i] == ranks[j])
    return (
        torch.tensor(better, dtype=torch.long),
        torch.tensor(worse, dtype=torch.long),
        torch.tensor(tie, dtype=torch.bool),
    )


def batch_pair_indices(
    rankings: Sequence[Sequence[int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs of several rankings whose completions are flattened one group after another.

    Returns (better, worse, tie, group), each (P,): indices into the flattened (N,) rewards,
    and the group each pair belongs to."""
    parts, offset = [], 0
    for g, ranks in enumerate(rankings):
        better, worse, tie = pair_indices(ranks)
        parts.append((better + offset, worse + offset, tie, torch.full_like(better, g)))
        offset += len(ranks)
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))  # type: ignore[return-value]


def bradley_terry_loss(
    rewards: torch.Tensor,
    better: torch.Tensor,
    worse: torch.Tensor,
    margins: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair Bradley-Terry loss, shape (P,), from rewards (N,) and pair indices (P,).

    The optional margin (P,) is Llama 2's (Touvron et al., 2023, eq. 2): a pair judged
    "much better" must be separated by more."""
    delta = rewards[better] - rewards[worse]  # (P,)
    if margins is not None:
        delta = delta - margins
    return -F.logsigmoid(delta)


def tie_loss(rewards: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Per-pair loss (P,) pulling sigmoid(r_first - r_second) toward 0.5: cross-entropy with
    a label of one half, minimal when the two rewards are equal."""
    delta = rewards[first] - rewards[second]  # (P,)
    return -0.5 * F.logsigmoid(delta) - 0.5 * F.logsigmoid(-delta)


def grouped_ranking_loss(
    rewards: torch.Tensor,
    better: torch.Tensor,
    worse: torch.Tensor,
    tie: torch.Tensor,
    group: torch.Tensor,
    num_groups: int,
    margins: torch.Tensor | None = None,
    ties: str = "skip",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's mean pair loss, shape (G,), and whether the group had any pair to learn
    from, (G,) bool (a ranking that is all ties has none when ties are skipped).

    ties="skip" leaves tied pairs out; ties="half" trains them toward probability 0.5.
    Margins apply to strict pairs only. The caller weights and sums the groups."""
    strict = bradley_terry_loss(rewards, better, worse, margins)  # (P,)
    if ties == "half":
        per_pair = torch.where(tie, tie_loss(rewards, better, worse), strict)
        used = torch.ones_like(tie)
    elif ties == "skip":
        per_pair = torch.where(tie, torch.zeros_like(strict), strict)
        used = ~tie
    else:
        raise ValueError(f"ties must be 'skip' or 'half', not {ties!r}")
    used_f = used.to(per_pair.dtype)
    total = per_pair.new_zeros(num_groups).index_add(0, group, per_pair * used_f)  # (G,)
    count = per_pair.new_zeros(num_groups).index_add(0, group, used_f)  # (G,)
    has_pairs = count > 0
    return total / count.clamp(min=1), has_pairs


def weighted_mean(
    group_loss: torch.Tensor, has_pairs: torch.Tensor, weights: torch.Tensor, normalizer: float
) -> torch.Tensor:
    """sum_g w_g * L_g / normalizer over groups with pairs. With gradient accumulation the
    normalizer is the total weight of the whole optimizer step, so that the accumulated
    gradient equals the one of a single large batch."""
    return (group_loss * weights * has_pairs.to(group_loss.dtype)).sum() / normalizer


def pair_correct(rewards: torch.Tensor, better: torch.Tensor, worse: torch.Tensor) -> torch.Tensor:
    """(P,) bool: the better completion got the strictly higher reward."""
    return rewards[better] > rewards[worse]


def expected_calibration_error(
    probs: torch.Tensor, labels: torch.Tensor, bins: int = 10
) -> torch.Tensor:
    """Binary ECE (Guo et al., 2017): sum over equal-width probability bins of
    (bin share) * |mean label - mean probability|. probs and labels (M,), labels 0/1."""
    probs = probs.detach().double()
    labels = labels.double()
    index = (probs * bins).long().clamp(0, bins - 1)  # (M,) bin of each prediction
    prob_sum = torch.zeros(bins, dtype=torch.double).index_add(0, index, probs)
    label_sum = torch.zeros(bins, dtype=torch.double).index_add(0, index, labels)
    gap = (label_sum - prob_sum).abs()  # = count * |mean label - mean prob| per bin
    return gap.sum() / max(len(probs), 1)


def pair_calibration_error(
    rewards: torch.Tensor, better: torch.Tensor, worse: torch.Tensor, bins: int = 10
) -> torch.Tensor:
    """ECE of the Bradley-Terry probability sigmoid(r_a - r_b) on strict pairs. Each pair is
    counted in both orientations (p with label 1, 1 - p with label 0): otherwise every label
    would be 1 and any uncertainty would read as miscalibration."""
    p = torch.sigmoid(rewards[better] - rewards[worse]).detach()  # (P,)
    probs = torch.cat([p, 1 - p])
    labels = torch.cat([torch.ones_like(p), torch.zeros_like(p)])
    return expected_calibration_error(probs, labels, bins)


# --- DPO ----------------------------------------------------------------------------------------
# Shapes: B pairs. Sequence log-probs are summed over each completion's tokens.


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's sigmoid loss (Rafailov et al., 2023, eq. 7) per pair, and the implicit rewards.

    Each input is (B,): log pi(y|x) of the chosen and rejected completion under the policy
    and under the frozen reference. The implicit reward of a completion is
    beta * (log pi(y|x) - log pi_ref(y|x)) (section 5), and the loss is

        -log sigmoid(r_chosen - r_rejected)

    With label_smoothing = eps > 0 it is conservative DPO (Mitchell, "A note on DPO with noisy
    preferences", 2023): each label is taken to be flipped with probability eps,
        -(1 - eps) * log sigmoid(d) - eps * log sigmoid(-d).

    Returns (losses, chosen_rewards, rejected_rewards), each (B,); the rewards are detached
    (they are for metrics: accuracy is chosen > rejected, the margin their difference)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError("label_smoothing must be in [0, 0.5)")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    logits = beta * (chosen_logratios - rejected_logratios)  # (B,) = r_chosen - r_rejected
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()
