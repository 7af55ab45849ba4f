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

In several data-parallel processes (`dist`; a job's `"processes": N`) each rank samples,
scores and trains on 1/N of every step's prompts (all k answers of each) and of every
minibatch, as PPO does (trainer/ppo.py): the rewards are pooled, so the baselines, the
whitening, the KL controller and the metrics are those of the global batch. Sharded
(`"sharding": "fsdp"`) the policy, the reference and the reward model are FSDP2 shards, as
in PPO.

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

from trainer.data import Prompt
from trainer.distributed import SINGLE, Distributed, shard
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
    LossMeans,
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
    per_rank,
    prompt_indices,
    record_metrics,
    response_logprobs,
    reward_model_function,
    rollout_logprobs,
    rollout_metrics,
    sampling_config,
    score_responses,
    seed_ranks,
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
    dist: Distributed = SINGLE,
) -> RLOOResult:
    """Optimise config.policy with RLOO on `prompts` against `reward_fn` (default: the
    config's reward model), and save it to output_dir.

    `should_stop()` is asked before every step; when it says True, a resumable checkpoint
    goes to output_dir/checkpoint and the result has stopped=True. Calling `train` again with
    the same arguments resumes it exactly (RNG states included). `on_metric(step, name,
    value)` gets every metric of every step. `dist`: one of several data-parallel processes
    (see the module's docstring); rank 0 reports, checkpoints and saves."""
    output_dir, device = open_run(config, prompts, output_dir, reward_fn, device, dist)
    # FSDP: the models are built on the CPU; sharding moves each rank's shards to its device
    home = torch.device("cpu") if dist.sharded else device
    precision = mixed_precision(config.bf16, device)
    N, k, B, fwd = config.prompts_per_step, config.k, config.batch_size, config.forward_batch_size
    n = per_rank(N, dist, "prompts_per_step")  # this rank's prompts per step
    b = n * k  # and responses
    minibatch_size = per_rank(config.minibatch_size or B, dist, "minibatch_size")  # this rank's
    micro_size = config.micro_batch_size or minibatch_size

    # ---- models: the policy, and a frozen reference (or the policy with LoRA off)
    seed_everything(config.seed)
    if reward_fn is None:
        reward_fn = reward_model_function(
            config.reward_model, device, normalize=config.normalize_reward, dist=dist
        )
    tokenizer = load_tokenizer(config.policy)
    policy, reference, hub_generation = load_policy(config, home)
    generation = sampling_config(config, tokenizer)  # softmax(logits / T) with top-p
    # DDP for the updates, or under FSDP the policy sharded in place (one process: the
    # policy); the reference sharded too under FSDP
    policy_forward = dist.wrap(policy)
    reference = dist.shard_frozen(reference)

    # ---- optimizer, schedule, KL controller (on the shards under FSDP)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer, scheduler = optimizer_and_schedule(params, config)
    kl_ctl = kl_controller(config)
    prompt_ids = [encode_prompt(tokenizer, p, config.max_prompt_length) for p in prompts]

    # ---- resume from a checkpoint of the same run, if there is one
    checkpoint = RunCheckpoint(
        output_dir,
        fingerprint(config, prompts),  # the config's fields but checkpoint_every
        dist,
        models={"policy": policy},
        optimizer=optimizer,
        scheduler=scheduler,
        kl=kl_ctl,
    )
    total = config.total_steps
    seed_ranks(config.seed, dist)  # several processes: each samples its own responses
    done, last_metrics, history = checkpoint.resume(on_progress, total)

    while done < total:
        if dist.any(should_stop()):
            checkpoint.save(done, last_metrics, history)
            on_progress(done / total, f"stopped at step {done}/{total}")
            return RLOOResult(str(output_dir), dict(last_metrics), True, done, total, history)
        timer = Timer(device)
        began = time.perf_counter()
        # this rank's n of the step's N prompts (one process: all of them)
        indices = shard(
            prompt_indices(len(prompts), done, N, config.seed), dist.rank, dist.world_size
        )
        batch_prompts = [prompts[i] for i in indices for _ in range(k)]  # each k times
        query, query_mask = left_pad([prompt_ids[i] for i in indices], tokenizer.pad_token_id)
        # Rows j*k .. j*k + k-1 answer prompt j, so rewards.view(-1, k) groups them (pooled
        # too: each rank's rows are whole groups).
        query = query.repeat_interleave(k, dim=0).to(device)  # (b, P)
        query_mask = query_mask.repeat_interleave(k, dim=0).to(device)  # (b, P)

        # ---- 1. rollout: k responses per prompt with the KV cache, stop at EOS
        policy.eval()
        with timer.phase("generate"), torch.no_grad(), precision():
            rollout = generate_rollout(policy, query, query_mask, generation, fwd, dist)
        query_response, attention = rollout.query_response, rollout.attention  # (b, P + R)
        P, fmask = rollout.context_length, rollout.mask.float()  # fmask (b, R)

        # ---- 2. score: old log-probs, reference log-probs, rewards
        with timer.phase("score"), torch.no_grad():
            with precision():
                old_logprobs, ref_logprobs, entropy = rollout_logprobs(
                    policy, reference, rollout, config.temperature, fwd
                )  # (b, R) each
            texts = decode_responses(tokenizer, rollout)
            score, raw_score = score_responses(
                reward_fn, batch_prompts, texts, rollout.contains_eos, config.missing_eos_penalty
            )  # (b,) each

            # ---- 3. one reward per response (score - beta * sequence KL), LOO advantages,
            # of the global batch: the ranks' numbers pooled (one process: these tensors)
            pool = dist.gather_rows
            beta = kl_ctl.value
            kl = kl_k1(old_logprobs, ref_logprobs) * fmask  # (b, R)
            rewards = pool(sequence_kl_rewards(score, kl, beta, fmask))  # (B,)
            grouped = rewards.view(N, k)  # (N, k): the k responses to each prompt
            baseline = rloo_baseline(grouped)  # (N, k)
            all_advantages = rloo_advantages(grouped).flatten()  # (B,)
            if config.whiten_advantages:
                all_advantages = masked_whiten(all_advantages, torch.ones_like(all_advantages))
            advantages = all_advantages[dist.mine(b)]  # (b,): this rank's responses
            old_sequence_logprobs = (old_logprobs * fmask).sum(dim=1)  # (b,)

        # ---- 4. clipped REINFORCE over shuffled minibatches, one action per response
        policy.train()
        losses, grad_norms = LossMeans(), []  # the global minibatches' means
        with timer.phase("train"):
            for _ in range(config.epochs):
                order = torch.randperm(b)
                for start in range(0, b, minibatch_size):
                    minibatch = order[start : start + minibatch_size].to(device)
                    micros = minibatch.split(micro_size)
                    for i, micro in enumerate(micros):
                        m = fmask[micro]
                        # DDP averages the gradients once, after the last micro-batch
                        with dist.no_sync(policy_forward, sync=i == len(micros) - 1):
                            with precision():
                                new_logprobs, logits = response_logprobs(
                                    policy_forward,
                                    query_response[micro],
                                    attention[micro],
                                    P,
                                    config.temperature,
                                )
                                del logits
                            # policy_loss on (m, 1): the ratio is the whole response's,
                            # exp(sum_t log pi - sum_t log pi_old), and the loss a mean over
                            # responses; at ratio 1 its gradient is -A * grad log pi(y | x).
                            new_sequence_logprobs = (new_logprobs * m).sum(dim=1)  # (m,)
                            pg_loss, clip_frac, _ = policy_loss(
                                new_sequence_logprobs[:, None],
                                old_sequence_logprobs[micro][:, None],
                                advantages[micro][:, None],
                                torch.ones_like(new_sequence_logprobs[:, None]),
                                config.clip_eps,
                            )
                            # Response-weighted: accumulated micro-batches (and the ranks'
                            # equal minibatches) add up to the minibatch's mean over responses.
                            share = len(micro) / (len(minibatch) * dist.world_size)
                            dist.backward(pg_loss * share)
                        losses.add(len(micro), pg=pg_loss, clip=clip_frac)  # per response
                        # per token, k3 of the old policy from the new one, as PPO logs it
                        approx_kl = masked_mean(kl_k3(old_logprobs[micro], new_logprobs), m)
                        losses.add(m.sum().item(), akl=approx_kl)
                    grad_norm = dist.clip_grad_norm(params, config.max_grad_norm)
                    grad_norms.append(float(grad_norm))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        learning_rate = scheduler.get_last_lr()[0]
        scheduler.step()

        # ---- 5. the KL controller, metrics (of the global batch; the losses averaged)
        kl_per_response = pool(kl.sum(dim=1))  # (B,)
        kl_ctl.update(kl_per_response.mean().item(), B)
        done += 1
        avg = losses.means(dist)
        all_mask, all_raw = pool(fmask), pool(raw_score)  # (B, R_max), (B,)
        k3 = pool((kl_k3(old_logprobs, ref_logprobs) * fmask).sum(1))  # (B,)
        metrics = {
            "reward/raw": all_raw.mean().item(),
            "reward/normalized": pool(score).mean().item(),
            "reward/rlhf": rewards.mean().item(),
            "reward/std_within_prompt": grouped.std(dim=1).mean().item(),
            "kl/k1": kl_per_response.mean().item(),
            "kl/k3": k3.mean().item(),
            "kl/beta": beta,
            "policy/entropy": masked_mean(pool(entropy), all_mask).item(),
            "policy/loss": avg["pg"],
            "policy/clip_frac": avg["clip"],
            "policy/approx_kl": avg["akl"],
            "rloo/baseline_std": baseline.std().item(),
            **rollout_metrics(rollout, all_raw, learning_rate, grad_norms, timer, began, dist),
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
        dist=dist,
    )
    return RLOOResult(str(output_dir), dict(last_metrics), False, done, total, history)
