"""PPO for language models in one file that reads top to bottom, in the spirit of cleanrl's
ppo.py, with the RLHF details of Huang et al. 2024 ("The N+ Implementation Details of RLHF
with PPO", summarize_from_feedback_details/ppo.py) and Ziegler et al. 2019.

    from trainer.ppo import PPOConfig, train
    from trainer.rollout import reward_model_function
    config = PPOConfig(policy="var/models/sft", reward_model="var/models/reward-3-1")
    result = train(config, prompts, "var/models/ppo-1", on_metric=print)
    # or a programmatic reward: (prompts, responses) -> scores (B,)
    result = train(PPOConfig(policy=..., value_init="policy"), prompts, out,
                   reward_fn=lambda prompts, responses: torch.tensor([...]))

One PPO step:
1. Rollout: sample `rollout_batch_size` prompts (a seeded shuffle of the prompt list per
   pass), left-pad them and sample responses from the policy (KV cache, temperature, top-p,
   stop at EOS; everything after the first EOS is padding).
2. Score: the policy's log-probs (the "old" ones, recomputed by a forward pass with the
   logits divided by the temperature, as at sampling), the frozen reference's log-probs (a
   copy of the initial policy, or the policy with its LoRA adapters off), the value model's
   values, and the reward function's score of each decoded response (minus a penalty when it
   never reached EOS).
3. Per-token rewards -beta * KL_t plus the score on the last token; GAE advantages and
   returns; advantages whitened over the batch.
4. `ppo_epochs` passes over shuffled minibatches: clipped policy loss + vf_coef * clipped
   value loss, gradient clipping, one AdamW over the policy and value model.
5. The KL controller updates beta from the batch's KL; metrics go to `on_metric`.

In several data-parallel processes (`dist`, trainer/distributed.py; a job's `"processes": N`)
each rank samples, scores and trains on its 1/N of every rollout batch and minibatch, the
models replicated and their gradients averaged (DDP). Step 3 and the metrics are the global
batch's: the ranks pool their per-token numbers (`dist.gather_rows`), so GAE, whitening, the
KL controller and every logged number are the one-process formulas on all B responses. Each
rank draws its own samples (its own seed), so N processes follow a run of the same batch
sizes in distribution, not sample for sample. Sharded (`dist.sharded`, a job's `"sharding":
"fsdp"`, for models that do not fit one GPU) the same steps run on FSDP2 shards instead of
replicas: the policy, the value model, the reference and the reward model each keep 1/N of
their weights per rank, every forward gathers them block by block, so generation runs in
lockstep over the ranks (`synced_gpus`). The same seeds give the same samples and, within
float rounding, the same weights as DDP.

The policy and reference loading, sampling, log-probs, reward-model wrapper, checkpoint and
metrics plumbing are trainer/rollout.py's, shared with RLOO (trainer/rloo.py); the value
model is PPO's own, here. Nothing here knows about the database; the worker's job handler
(trainer/ppo_job.py) reads prompts, calls `train` with the job's checkpoint folder and
records the saved policy. The throughput benchmark: `.venv/bin/python bench/ppo.py --tiny`
(CPU) or `bench/ppo.py` (CUDA, ~0.5B).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.data import Prompt
from trainer.distributed import SINGLE, Distributed, Forward, shard
from trainer.handlers import ConfigError
from trainer.modeling import ScalarHeadModel, enable_checkpointing, load_reward_model
from trainer.rl_math import (
    explained_variance,
    gae,
    kl_k1,
    kl_k3,
    masked_mean,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    value_loss,
)
from trainer.rollout import (
    CHECKPOINT_DIR,
    LossMeans,
    OnPolicyConfig,
    RewardFunction,
    RunCheckpoint,
    RunResult,
    Timer,
    chunks,
    decode_responses,
    disable_dropout,
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
    position_ids,
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

__all__ = [
    "CHECKPOINT_DIR",
    "META_FILE",
    "PPOConfig",
    "PPOResult",
    "fold_normalization",
    "response_values",
    "train",
]

META_FILE = "prefloop_ppo.json"


VALUE_INITS = ("auto", "reward", "policy")


@dataclass
class PPOConfig(OnPolicyConfig):
    """Hyperparameters of one PPO run: OnPolicyConfig's (trainer/rollout.py: the policy,
    sampling, KL penalty, optimizer, run), and PPO's own below. Defaults follow Huang et al.
    2024 where they say."""

    value_init: str = field(
        default="auto",
        metadata={
            "help": "'reward': the value model starts as the reward model (Ziegler et al.; "
            "needs the policy's vocabulary and a decoder), 'policy': the policy's body with a "
            "new head, 'auto': 'reward' where the reward model can be one, else 'policy'."
        },
    )
    rollout_batch_size: int = field(
        default=64, metadata={"help": "Prompts (= responses) sampled per PPO step."}
    )
    minibatch_size: int = field(
        default=16, metadata={"help": "Responses per optimizer step in the PPO epochs."}
    )
    ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    clip_eps: float = field(default=0.2, metadata={"help": "PPO ratio clip range."})
    value_clip: float = field(default=0.2, metadata={"help": "Value clip range around old values."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    whiten_rewards: bool = field(
        default=False,
        metadata={"help": "Scale per-token rewards to unit variance (mean kept) before GAE."},
    )

    def __post_init__(self) -> None:
        if self.value_init not in VALUE_INITS:
            raise ValueError(
                f"value_init must be one of {', '.join(VALUE_INITS)}, not {self.value_init!r}"
            )
        if not 0 < self.minibatch_size <= self.rollout_batch_size:
            raise ValueError("minibatch_size must be in 1..rollout_batch_size")
        if self.ppo_epochs < 1:
            raise ValueError("ppo_epochs must be >= 1")
        super().__post_init__()


class PPOResult(RunResult):
    """What a PPO run produced. `stopped`: interrupted; call `train` again to resume."""


# ---------------------------------------------------------------------------------------
# The value model


def _value_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(body, head) of a value model: a decoder whose linear head reads every position."""
    if isinstance(model, ScalarHeadModel):
        return model.backbone, model.score
    head = getattr(model, "score", None)
    if isinstance(head, nn.Linear) and model.base_model is not model:
        return model.base_model, head
    raise ValueError(
        f"{type(model).__name__} cannot give per-token values (an encoder reward model?): "
        "use value_init='policy'"
    )


def fold_normalization(head: nn.Linear, mean: float, std: float) -> nn.Linear:
    """A copy of `head` that outputs (head(x) - mean) / std, with a bias even where `head`
    has none: a reward normalization folded into the head's gain and bias."""
    # skip_init: weights overwritten at once need no draw from the seeded RNG
    folded = nn.utils.skip_init(
        nn.Linear,
        head.in_features,
        head.out_features,
        bias=True,
        device=head.weight.device,
        dtype=head.weight.dtype,
    )
    with torch.no_grad():
        bias = torch.zeros_like(folded.bias) if head.bias is None else head.bias
        folded.weight.copy_(head.weight / std)
        folded.bias.copy_((bias - mean) / std)
    return folded


def _load_value_model(
    config: PPOConfig, tokenizer: Any, reward_mean: float, reward_std: float
) -> tuple[nn.Module, str]:
    """(value model, where it started: "reward" or "policy"). The reward model (Ziegler et
    al. 2019: a value function that starts knowing the reward) on the scale of the rewards
    GAE sees, or the policy's body with a new scalar head. With "auto", the reward model
    where it can be one (the policy's vocabulary, a decoder with a linear head: a MiniLM
    encoder cannot give per-token values), else the policy."""
    model = None
    if config.value_init != "policy" and config.reward_model is not None:
        model, reward_tokenizer = load_reward_model(config.reward_model, dtype=torch.float32)
        problem = None
        if reward_tokenizer.get_vocab() != tokenizer.get_vocab():
            problem = (
                "value_init='reward' needs the reward model to share the policy's tokenizer "
                "(the value model reads the policy's tokens); use value_init='policy'"
            )
        else:
            try:
                _value_parts(model)
            except ValueError as error:
                problem = str(error)
        if problem is not None:
            if config.value_init == "reward":
                raise ConfigError(problem)
            model = None  # auto: the policy's body instead
    if model is None:
        if config.value_init == "reward":
            raise ConfigError("value_init='reward' needs config.reward_model; or use 'policy'")
        from transformers import AutoModel

        body = AutoModel.from_pretrained(config.policy, dtype=torch.float32)
        return ScalarHeadModel(body), "policy"
    _, head = _value_parts(model)
    # GAE sees (raw - mean) / std: with the raw head the values would start off by the mean
    # and the first value updates would chase it (lm-human-preferences folds it in too). A
    # plain Linear, so the checkpoint holds the folded head and a resume does not fold again.
    model.score = fold_normalization(head, reward_mean, reward_std)
    return model, "reward"


def response_values(
    value_model: nn.Module,
    query_response: torch.Tensor,
    attention_mask: torch.Tensor,
    context_length: int,
) -> torch.Tensor:
    """V(state before each response token), (B, R): the head on positions P-1 .. P+R-2."""
    body, head = _value_parts(value_model)
    hidden = body(
        input_ids=query_response,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
    ).last_hidden_state  # (B, P + R, H)
    return head(hidden[:, context_length - 1 : -1]).squeeze(-1).float()  # (B, R)


# ---------------------------------------------------------------------------------------
# Training


def train(
    config: PPOConfig,
    prompts: Sequence[Prompt],
    output_dir: str | Path,
    *,
    reward_fn: RewardFunction | None = None,
    device: str | torch.device | None = None,
    on_metric: Callable[[int, str, float], None] = lambda step, name, value: None,
    on_progress: Callable[[float, str], None] = lambda fraction, message: None,
    should_stop: Callable[[], bool] = lambda: False,
    dist: Distributed = SINGLE,
) -> PPOResult:
    """Optimise config.policy with PPO on `prompts` against `reward_fn` (default: the
    config's reward model), and save it to output_dir.

    `should_stop()` is asked before every PPO step; when it says True, a resumable checkpoint
    goes to output_dir/checkpoint and the result has stopped=True. Calling `train` again with
    the same arguments resumes it exactly (RNG states included). `on_metric(step, name,
    value)` gets every metric of every step. `dist`: one of several data-parallel processes
    (see the module's docstring); rank 0 reports, checkpoints and saves."""
    output_dir, device = open_run(config, prompts, output_dir, reward_fn, device, dist)
    # FSDP: the models are built on the CPU; sharding moves each rank's shards to its device
    home = torch.device("cpu") if dist.sharded else device
    precision = mixed_precision(config.bf16, device)
    B, fwd = config.rollout_batch_size, config.forward_batch_size
    b = per_rank(B, dist, "rollout_batch_size")  # this rank's responses per step
    minibatch_size = per_rank(config.minibatch_size, dist, "minibatch_size")  # this rank's
    micro_size = config.micro_batch_size or minibatch_size

    # ---- models: seeded first, since a fresh value head is randomly initialised
    seed_everything(config.seed)
    if reward_fn is None:
        reward_fn = reward_model_function(
            config.reward_model, device, normalize=config.normalize_reward, dist=dist
        )
    tokenizer = load_tokenizer(config.policy)
    # The value model before the policy: its fresh head, then the policy's LoRA adapters,
    # draw their initial weights from the seeded RNG, in that order.
    value_model, value_from = _load_value_model(
        config, tokenizer, getattr(reward_fn, "mean", 0.0), getattr(reward_fn, "std", 1.0)
    )
    on_progress(0.0, f"value model: from the {value_from} model")
    disable_dropout(value_model)
    if config.gradient_checkpointing:
        enable_checkpointing(value_model)
    value_model.to(device=home, dtype=torch.float32)
    # The policy (fp32 master weights, LoRA or not) and its frozen reference (None with
    # LoRA: the policy with its adapters off); sampling from exactly softmax(logits / T).
    policy, reference, hub_generation = load_policy(config, home)
    generation = sampling_config(config, tokenizer)
    # What the PPO epochs run forward and backward: DDP replicas that average the ranks'
    # gradients, or under FSDP the models themselves sharded in place (one process: the
    # models). Sampling and scoring call the models; a sharded value model only through its
    # Forward, the root whose forward gathers the weights outside the blocks.
    policy_forward = dist.wrap(policy)
    value_forward = dist.wrap(Forward(value_model, response_values))
    score_values = value_forward if dist.sharded else Forward(value_model, response_values)
    reference = dist.shard_frozen(reference)

    # ---- optimizer: one AdamW over policy and value model (TRL's PolicyAndValueWrapper),
    # on the shards under FSDP
    params = [p for m in (policy, value_model) for p in m.parameters() if p.requires_grad]
    optimizer, scheduler = optimizer_and_schedule(params, config)
    kl_ctl = kl_controller(config)
    prompt_ids = [encode_prompt(tokenizer, p, config.max_prompt_length) for p in prompts]

    # ---- resume from a checkpoint of the same run, if there is one
    checkpoint = RunCheckpoint(
        output_dir,
        fingerprint(config, prompts),
        dist,
        models={"policy": policy, "value": value_model},
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
            return PPOResult(str(output_dir), dict(last_metrics), True, done, total, history)
        timer = Timer(device)
        began = time.perf_counter()
        # this rank's b of the step's B prompts (one process: all of them)
        indices = shard(
            prompt_indices(len(prompts), done, B, config.seed), dist.rank, dist.world_size
        )
        batch_prompts = [prompts[i] for i in indices]
        query, query_mask = left_pad([prompt_ids[i] for i in indices], tokenizer.pad_token_id)
        query, query_mask = query.to(device), query_mask.to(device)  # (b, P)

        # ---- 1. rollout: sample responses with the KV cache, stop at EOS
        policy.eval()
        value_model.eval()
        with timer.phase("generate"), torch.no_grad(), precision():
            rollout = generate_rollout(policy, query, query_mask, generation, fwd, dist)
        query_response, attention = rollout.query_response, rollout.attention  # (b, P + R)
        P, fmask = rollout.context_length, rollout.mask.float()  # fmask (b, R)

        # ---- 2. score: old log-probs, reference log-probs, values, rewards
        with timer.phase("score"), torch.no_grad():
            with precision():
                old_logprobs, ref_logprobs, entropy = rollout_logprobs(
                    policy, reference, rollout, config.temperature, fwd
                )  # (b, R) each
                old_values = torch.cat(
                    [score_values(query_response[c], attention[c], P) for c in chunks(b, fwd)]
                )  # (b, R)
            texts = decode_responses(tokenizer, rollout)
            score, raw_score = score_responses(
                reward_fn, batch_prompts, texts, rollout.contains_eos, config.missing_eos_penalty
            )  # (b,) each

            # ---- 3. per-token rewards (score - beta * KL), GAE, whitened advantages, of the
            # global batch: the ranks' numbers pooled (one process: these very tensors)
            pool = dist.gather_rows
            all_mask, all_values = pool(fmask), pool(old_values)  # (B, R_max)
            all_old, all_ref = pool(old_logprobs), pool(ref_logprobs)  # (B, R_max)
            all_score, all_raw = pool(score), pool(raw_score)  # (B,)
            beta = kl_ctl.value
            kl = kl_k1(all_old, all_ref) * all_mask  # (B, R_max)
            rewards = per_token_rewards(all_score, kl, beta, all_mask)  # (B, R_max)
            if config.whiten_rewards:
                rewards = masked_whiten(rewards, all_mask, shift_mean=False)
            all_advantages, all_returns = gae(
                rewards, all_values, all_mask, config.gamma, config.lam
            )
            all_advantages = masked_whiten(all_advantages, all_mask)  # (B, R_max)
            R = fmask.shape[1]  # this rank's rows, back to its own response width
            advantages = all_advantages[dist.mine(b), :R]  # (b, R)
            returns = all_returns[dist.mine(b), :R]  # (b, R)

        # ---- 4. PPO epochs over shuffled minibatches
        policy.train()
        value_model.train()
        losses, grad_norms = LossMeans(), []  # token-weighted: the global minibatches' means
        with timer.phase("train"):
            for _ in range(config.ppo_epochs):
                order = torch.randperm(b)
                for start in range(0, b, minibatch_size):
                    minibatch = order[start : start + minibatch_size].to(device)
                    # the global minibatch's tokens: every rank's share of its mean
                    (minibatch_tokens,) = dist.sum([fmask[minibatch].sum().item()])
                    micros = minibatch.split(micro_size)
                    for i, micro in enumerate(micros):
                        qr, att = query_response[micro], attention[micro]
                        m = fmask[micro]
                        # DDP averages the gradients once, after the last micro-batch
                        sync = i == len(micros) - 1
                        with dist.no_sync(policy_forward, sync), dist.no_sync(value_forward, sync):
                            with precision():
                                new_logprobs, logits = response_logprobs(
                                    policy_forward, qr, att, P, config.temperature
                                )
                                del logits
                                values = value_forward(qr, att, P)
                            pg_loss, clip_frac, approx_kl = policy_loss(
                                new_logprobs,
                                old_logprobs[micro],
                                advantages[micro],
                                m,
                                config.clip_eps,
                            )
                            vf_loss, vf_clip = value_loss(
                                values, old_values[micro], returns[micro], m, config.value_clip
                            )
                            # Token-weighted: accumulated micro-batches (and ranks) add up
                            # to the minibatch's own token mean, whatever their lengths.
                            share = m.sum() / minibatch_tokens
                            dist.backward((pg_loss + config.vf_coef * vf_loss) * share)
                        losses.add(
                            m.sum().item(),
                            pg=pg_loss,
                            vf=vf_loss,
                            clip=clip_frac,
                            vclip=vf_clip,
                            akl=approx_kl,
                        )
                    grad_norm = dist.clip_grad_norm(params, config.max_grad_norm)
                    grad_norms.append(float(grad_norm))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        learning_rate = scheduler.get_last_lr()[0]
        scheduler.step()

        # ---- 5. the KL controller, metrics (of the global batch; the losses averaged)
        kl_per_response = kl.sum(dim=1)  # (B,)
        kl_ctl.update(kl_per_response.mean().item(), B)
        done += 1
        avg = losses.means(dist)
        metrics = {
            "reward/raw": all_raw.mean().item(),
            "reward/normalized": all_score.mean().item(),
            "reward/rlhf": (all_score - beta * kl_per_response).mean().item(),
            "kl/k1": kl_per_response.mean().item(),
            "kl/k3": (kl_k3(all_old, all_ref) * all_mask).sum(1).mean().item(),
            "kl/beta": beta,
            "policy/entropy": masked_mean(pool(entropy), all_mask).item(),
            "policy/loss": avg["pg"],
            "policy/clip_frac": avg["clip"],
            "policy/approx_kl": avg["akl"],
            "value/loss": avg["vf"],
            "value/clip_frac": avg["vclip"],
            "value/explained_variance": explained_variance(all_values, all_returns, all_mask),
            **rollout_metrics(rollout, all_raw, learning_rate, grad_norms, timer, began, dist),
        }
        last_metrics = record_metrics(done, metrics, history, on_metric)
        on_progress(done / total, f"step {done}/{total}, reward {metrics['reward/normalized']:.3f}")
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < total:
            checkpoint.save(done, last_metrics, history)

    # ---- finish: the policy in plain transformers format, beside the config and metrics
    finish_run(
        "ppo",
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
    return PPOResult(str(output_dir), dict(last_metrics), False, done, total, history)
