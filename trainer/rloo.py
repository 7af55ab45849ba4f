"""RLOO for language models in one file that reads top to bottom, like trainer/ppo.py:
REINFORCE with a leave-one-out baseline (Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a
Baseline for Free!"; Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
Optimization for Learning from Human Feedback in LLMs"), updated with the clipped ratio of
TRL's RLOOTrainer. No value model: the other samples of the same prompt are the baseline.

    from trainer.rloo import RLOOConfig, train
    config = RLOOConfig(policy="var/models/sft", reward_model="var/models/reward-3-1", k=4)
    result = train(config, prompts, "var/models/rloo-1", on_metric=print)
    # or a programmatic reward: (prompts, responses) -> scores (B,)
    result = train(RLOOConfig(policy=...), prompts, out,
                   reward_fn=lambda prompts, responses: torch.tensor([...]))

One RLOO step, B = prompts_per_step * k responses:
1. Rollout: `prompts_per_step` prompts (PPO's seeded shuffle of the prompt list per pass),
   each left-padded and repeated k times, and one sampled response per copy (KV cache,
   temperature, top-p, stop at EOS; everything after the first EOS is padding).
2. Score: the policy's log-probs (the "old" ones, recomputed with the logits divided by the
   temperature, as at sampling), the frozen reference's log-probs (a copy of the initial
   policy, or the policy with its LoRA adapters off), and the reward function's score of
   each decoded response (minus a penalty when it never reached EOS).
3. One reward per response, score - beta * sum_t KL_t (k1): Ahmadian et al. model the whole
   response as one action, so there is no per-token credit and no GAE. A response's advantage
   is its reward minus the mean reward of the other k - 1 responses to its prompt
   (`rl_math.rloo_advantages`), optionally whitened over the batch.
4. `epochs` passes over shuffled minibatches of PPO's clipped surrogate on the response's
   probability ratio exp(sum_t log pi - sum_t log pi_old), as TRL's RLOOTrainer does; with
   one epoch and one minibatch the ratio is 1 and the step is plain REINFORCE-LOO,
   grad = -A * grad log pi(response | prompt). Gradient clipping, AdamW.
5. The KL controller updates beta from the batch's KL; metrics go to `on_metric`.

The policy and reference loading, sampling, log-probs, reward-model wrapper, checkpoint and
metrics plumbing are trainer/rollout.py's, shared with PPO (trainer/ppo.py); nothing here
knows about the database (trainer/rloo_job.py reads the prompts and records the saved
policy).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from trainer.data import Prompt
from trainer.rl_math import (
    kl_k1,
    kl_k3,
    masked_mean,
    masked_whiten,
    policy_loss,
    rloo_advantages,
    rloo_baseline,
    sequence_kl_rewards,
)
from trainer.rollout import (
    CHECKPOINT_DIR,
    OnPolicyConfig,
    RewardFunction,
    RunCheckpoint,
    RunResult,
    Timer,
    decode_responses,
    encode_prompt,
    fingerprint,
    finish_run,
    generate_rollout,
    kl_controller,
    left_pad,
    load_policy,
    load_tokenizer,
    mixed_precision,
    open_run,
    optimizer_and_schedule,
    prompt_indices,
    record_metrics,
    response_logprobs,
    reward_model_function,
    rollout_logprobs,
    rollout_metrics,
    sampling_config,
    score_responses,
)
from trainer.runtime import seed_everything

__all__ = ["CHECKPOINT_DIR", "META_FILE", "RLOOConfig", "RLOOResult", "train"]

META_FILE = "prefloop_rloo.json"


@dataclass
class RLOOConfig(OnPolicyConfig):
    """Hyperparameters of one RLOO run: OnPolicyConfig's (trainer/rollout.py: the policy,
    sampling, KL penalty, optimizer, run; they mean what they mean for PPO), and RLOO's own
    below."""

    prompts_per_step: int = field(
        default=16, metadata={"help": "Prompts per RLOO step; each is answered k times."}
    )
    k: int = field(
        default=4,
        metadata={
            "help": "Responses sampled per prompt (>= 2): each one's baseline is the mean "
            "reward of the other k - 1 (Ahmadian et al. find k = 4 a good trade)."
        },
    )
    minibatch_size: int | None = field(
        default=None,
        metadata={
            "help": "Responses per optimizer step; None = the whole step's "
            "prompts_per_step * k (one update per epoch)."
        },
    )
    epochs: int = field(
        default=1,
        metadata={
            "help": "Passes over each step's responses; 1 with one minibatch is plain "
            "REINFORCE-LOO, more reuse the samples under the clipped ratio (TRL's RLOO)."
        },
    )
    clip_eps: float = field(
        default=0.2, metadata={"help": "Clip range of the response's probability ratio."}
    )
    whiten_advantages: bool = field(
        default=False,
        metadata={"help": "Whiten the leave-one-out advantages over the step's responses."},
    )

    def __post_init__(self) -> None:
        if self.k < 2:
            raise ValueError("k must be >= 2: the leave-one-out baseline needs another sample")
        if self.minibatch_size is not None and not (
            0 < self.minibatch_size <= self.prompts_per_step * self.k
        ):
            raise ValueError("minibatch_size must be in 1..prompts_per_step * k")
        if min(self.prompts_per_step, self.epochs) < 1:
            raise ValueError("prompts_per_step and epochs must be >= 1")
        super().__post_init__()

    @property
    def batch_size(self) -> int:
        """Responses per step."""
        return self.prompts_per_step * self.k


class RLOOResult(RunResult):
    """What a RLOO run produced. `stopped`: interrupted; call `train` again to resume."""


def train(
    config: RLOOConfig,
    prompts: Sequence[Prompt],
    output_dir: str | Path,
    *,
    reward_fn: RewardFunction | None = None,
    device: str | torch.device | None = None,
    on_metric: Callable[[int, str, float], None] = lambda step, name, value: None,
    on_progress: Callable[[float, str], None] = lambda fraction, message: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> RLOOResult:
    """Optimise config.policy with RLOO on `prompts` against `reward_fn` (default: the
    config's reward model), and save it to output_dir.

    `should_stop()` is asked before every step; when it says True, a resumable checkpoint
    goes to output_dir/checkpoint and the result has stopped=True. Calling `train` again with
    the same arguments resumes it exactly (RNG states included). `on_metric(step, name,
    value)` gets every metric of every step."""
    output_dir, device = open_run(config, prompts, output_dir, reward_fn, device)
    precision = mixed_precision(config.bf16, device)

    # ---- models: the policy, and a frozen reference (or the policy with LoRA off)
    seed_everything(config.seed)
    if reward_fn is None:
        reward_fn = reward_model_function(
            config.reward_model, device, normalize=config.normalize_reward
        )
    tokenizer = load_tokenizer(config.policy)
    policy, reference, hub_generation = load_policy(config, device)
    generation = sampling_config(config, tokenizer)  # softmax(logits / T) with top-p

    # ---- optimizer, schedule, KL controller
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer, scheduler = optimizer_and_schedule(params, config)
    kl_ctl = kl_controller(config)
    prompt_ids = [encode_prompt(tokenizer, p, config.max_prompt_length) for p in prompts]

    # ---- resume from a checkpoint of the same run, if there is one
    checkpoint = RunCheckpoint(
        output_dir,
        fingerprint(config, prompts),  # the config's fields but checkpoint_every
        policy=policy,
        optimizer=optimizer,
        scheduler=scheduler,
        kl=kl_ctl,
    )
    total = config.total_steps
    done, last_metrics, history = checkpoint.resume(on_progress, total)

    N, k, B, fwd = config.prompts_per_step, config.k, config.batch_size, config.forward_batch_size
    minibatch_size = config.minibatch_size or B
    micro_size = config.micro_batch_size or minibatch_size
    while done < total:
        if should_stop():
            checkpoint.save(done, last_metrics, history)
            on_progress(done / total, f"stopped at step {done}/{total}")
            return RLOOResult(str(output_dir), dict(last_metrics), True, done, total, history)
        timer = Timer(device)
        began = time.perf_counter()
        indices = prompt_indices(len(prompts), done, N, config.seed)  # (N,) prompts
        batch_prompts = [prompts[i] for i in indices for _ in range(k)]  # each k times
        query, query_mask = left_pad([prompt_ids[i] for i in indices], tokenizer.pad_token_id)
        # Rows n*k .. n*k + k-1 answer prompt n, so rewards.view(N, k) groups them.
        query = query.repeat_interleave(k, dim=0).to(device)  # (B, P)
        query_mask = query_mask.repeat_interleave(k, dim=0).to(device)  # (B, P)

        # ---- 1. rollout: k responses per prompt with the KV cache, stop at EOS
        policy.eval()
        with timer.phase("generate"), torch.no_grad(), precision():
            rollout = generate_rollout(policy, query, query_mask, generation, fwd)
        query_response, attention = rollout.query_response, rollout.attention  # (B, P + R)
        P, fmask = rollout.context_length, rollout.mask.float()  # fmask (B, R)

        # ---- 2. score: old log-probs, reference log-probs, rewards
        with timer.phase("score"), torch.no_grad():
            with precision():
                old_logprobs, ref_logprobs, entropy = rollout_logprobs(
                    policy, reference, rollout, config.temperature, fwd
                )  # (B, R) each
            texts = decode_responses(tokenizer, rollout)
            score, raw_score = score_responses(
                reward_fn, batch_prompts, texts, rollout.contains_eos, config.missing_eos_penalty
            )  # (B,) each

            # ---- 3. one reward per response (score - beta * sequence KL), LOO advantages
            beta = kl_ctl.value
            kl = kl_k1(old_logprobs, ref_logprobs) * fmask  # (B, R)
            rewards = sequence_kl_rewards(score, kl, beta, fmask)  # (B,)
            grouped = rewards.view(N, k)  # (N, k): the k responses to each prompt
            baseline = rloo_baseline(grouped)  # (N, k)
            advantages = rloo_advantages(grouped).flatten()  # (B,)
            if config.whiten_advantages:
                advantages = masked_whiten(advantages, torch.ones_like(advantages))
            old_sequence_logprobs = (old_logprobs * fmask).sum(dim=1)  # (B,)

        # ---- 4. clipped REINFORCE over shuffled minibatches, one action per response
        policy.train()
        stats: dict[str, list[float]] = {name: [] for name in ("pg", "clip", "akl", "gn")}
        with timer.phase("train"):
            for _ in range(config.epochs):
                order = torch.randperm(B)
                for start in range(0, B, minibatch_size):
                    minibatch = order[start : start + minibatch_size].to(device)
                    for micro in minibatch.split(micro_size):
                        m = fmask[micro]
                        with precision():
                            new_logprobs, logits = response_logprobs(
                                policy,
                                query_response[micro],
                                attention[micro],
                                P,
                                config.temperature,
                            )
                            del logits
                        # policy_loss on (b, 1): the ratio is the whole response's,
                        # exp(sum_t log pi - sum_t log pi_old), and the loss a mean over
                        # responses; at ratio 1 its gradient is -A * grad log pi(y | x).
                        new_sequence_logprobs = (new_logprobs * m).sum(dim=1)  # (b,)
                        pg_loss, clip_frac, _ = policy_loss(
                            new_sequence_logprobs[:, None],
                            old_sequence_logprobs[micro][:, None],
                            advantages[micro][:, None],
                            torch.ones_like(new_sequence_logprobs[:, None]),
                            config.clip_eps,
                        )
                        # Response-weighted: accumulated micro-batches add up to the
                        # minibatch's own mean over responses.
                        (pg_loss * (len(micro) / len(minibatch))).backward()
                        stats["pg"].append(pg_loss.item())
                        stats["clip"].append(clip_frac.item())
                        # per token, k3 of the old policy from the new one, as PPO logs it
                        approx_kl = masked_mean(kl_k3(old_logprobs[micro], new_logprobs), m)
                        stats["akl"].append(approx_kl.item())
                    grad_norm = nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                    stats["gn"].append(float(grad_norm))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        learning_rate = scheduler.get_last_lr()[0]
        scheduler.step()

        # ---- 5. the KL controller, metrics
        kl_per_response = kl.sum(dim=1)  # (B,)
        kl_ctl.update(kl_per_response.mean().item(), B)
        done += 1
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        metrics = {
            "reward/raw": raw_score.mean().item(),
            "reward/normalized": score.mean().item(),
            "reward/rlhf": rewards.mean().item(),
            "reward/std_within_prompt": grouped.std(dim=1).mean().item(),
            "kl/k1": kl_per_response.mean().item(),
            "kl/k3": (kl_k3(old_logprobs, ref_logprobs) * fmask).sum(1).mean().item(),
            "kl/beta": beta,
            "policy/entropy": masked_mean(entropy, fmask).item(),
            "policy/loss": mean(stats["pg"]),
            "policy/clip_frac": mean(stats["clip"]),
            "policy/approx_kl": mean(stats["akl"]),
            "rloo/baseline_std": baseline.std().item(),
            **rollout_metrics(rollout, raw_score, learning_rate, stats["gn"], timer, began),
        }
        last_metrics = record_metrics(done, metrics, history, on_metric)
        on_progress(done / total, f"step {done}/{total}, reward {metrics['reward/normalized']:.3f}")
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < total:
            checkpoint.save(done, last_metrics, history)

    # ---- finish: the policy in plain transformers format, beside the config and metrics
    finish_run(
        "rloo",
        config,
        policy,
        tokenizer,
        hub_generation,
        output_dir,
        META_FILE,
        metrics=last_metrics,
        steps=done,
        kl_controller=kl_ctl,
        prompts=len(prompts),
        checkpoint=checkpoint,
        on_progress=on_progress,
    )
    return RLOOResult(str(output_dir), dict(last_metrics), False, done, total, history)
