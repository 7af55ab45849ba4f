"""PPO throughput: `trainer.ppo.train` on a policy and reward model built from config.

Both are random-weight models (no download): throughput and memory only, the rewards mean
nothing. By default a ~0.5B-parameter Qwen2-architecture policy and a reward model of the
same shape (the value model starts as the reward model, as in Ziegler et al.), a synthetic
29k-word vocabulary, bf16 autocast on CUDA. A random policy rarely says EOS, so nearly
every response runs to --new-tokens: the figures are for full-length responses.

Printed, over the steps after the first (warm-up): rollout tokens/s (response tokens
sampled per second of generate), training tokens/s (prompt + response tokens through policy
and value model, forward and backward, per second of the PPO epochs), peak GPU memory, the
split of step time into generate / score (old, reference and value forward passes and the
reward model) / train, and the training phase's MFU: 6 * N * tokens / time / peak FLOPs,
N = the trained non-embedding parameters (policy + value model; the lm head counted on the
response tokens only, which is all it runs on). Attention's own FLOPs are left out, so
the MFU is a slight underestimate; recomputation under --gradient-checkpointing is not
counted (model FLOPs, not hardware FLOPs).

The peer, in the same run: a bare training loop of the same two models (fresh copies, fp32
weights under the same autocast) on random tokens of the measured sequence width, the same
micro-batch size and an AdamW step per minibatch, its loss a log-sum-exp over the response
positions' logits plus the values there: what the model code itself reaches on this device
with nothing of PPO around it. The ratio PPO / bare says how much of the training phase's
time PPO's own work (log-probs, clipping, masking, shuffling) costs.

    .venv/bin/python bench/ppo.py --tiny                 # CPU, a 2-layer model, < 1 min
    .venv/bin/python bench/ppo.py                        # CUDA, ~0.5B, bf16
    .venv/bin/python bench/ppo.py --batch 128 --new-tokens 256 --gradient-checkpointing
    .venv/bin/python bench/ppo.py --processes 8          # 8 GPUs, data-parallel, as a job

With --processes N the steps run as a `"processes": N` job runs them (trainer/launch.py: N
ranks, each sampling and training on 1/N of every batch); the figures are the global
batch's, the MFU is against N devices' peak, the peer runs on one device with one rank's
shapes, and PPO / bare compares per device. Peak memory is then not read (the ranks are
other processes).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Dense bf16 peak (no sparsity) by device name; MFU is printed only for these.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def build_models(
    root: Path, args: argparse.Namespace, *, reward: bool = True
) -> tuple[Path, Path | None, Any]:
    """(policy folder, reward model folder, their config): a policy (causal LM) and a reward
    model (sequence classifier) of the same shape sharing one tokenizer; `reward=False`: the
    policy only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from tests.tiny_models import tokenizer_for

    words = [f"w{i}" for i in range(args.vocab)]
    tokenizer = tokenizer_for([" ".join(words)])
    if args.tiny:
        from transformers import LlamaConfig as Config

        shape = {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
        }
    else:
        from transformers import Qwen2Config as Config

        # ~0.5B: Qwen2.5-0.5B's depth class with a 29k vocabulary instead of 152k.
        shape = {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
        }
    config = Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
        num_labels=1,
        **shape,
    )
    policy_dir = root / "policy"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)
    if not reward:
        return policy_dir, None, config
    reward_dir = root / "reward"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(reward_dir)
    tokenizer.save_pretrained(reward_dir)
    return policy_dir, reward_dir, config


def parameter_counts(config: Any) -> dict[str, int]:
    """Parameters of one model of this config: body (no input embedding), lm head."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    return {"total": total, "body": total - embedding - head, "head": head}


def peak_flops(device: Any) -> tuple[str, float | None]:
    import torch

    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
    return name, peak


def bare_training_tokens_per_second(
    policy_dir: Path,
    reward_dir: Path,
    device: Any,
    *,
    micro: int,
    width: int,
    response: int,
    micro_per_step: int,
    optimizer_steps: int,
    gradient_checkpointing: bool,
) -> float:
    """Tokens per second of forward + backward through the policy and the value model (the
    reward model's body and head, as PPO's value model starts), micro-batches of `micro`
    rows of `width` tokens, an AdamW step every `micro_per_step` of them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from trainer.modeling import disable_dropout, enable_checkpointing
    from trainer.rollout import mixed_precision

    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).to(device)
    value = AutoModelForSequenceClassification.from_pretrained(reward_dir, dtype=torch.float32)
    value.to(device)
    for model in (policy, value):
        disable_dropout(model)
        if gradient_checkpointing:
            enable_checkpointing(model)
        model.train()
    params = [*policy.parameters(), *value.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-7, eps=1e-5)
    precision = mixed_precision(None, device)
    ids = torch.randint(policy.config.vocab_size, (micro, width), device=device)  # (b, P + R)
    mask = torch.ones_like(ids)

    def optimizer_step() -> None:
        for _ in range(micro_per_step):
            with precision():
                logits = policy(
                    input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=response + 1
                ).logits  # (b, R + 1, V)
                hidden = value.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
                values = value.score(hidden[:, -response - 1 : -1])  # (b, R, 1)
            loss = logits.float().logsumexp(dim=-1).mean() + values.float().mean()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    optimizer_step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    for _ in range(optimizer_steps):
        optimizer_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return optimizer_steps * micro_per_step * micro * width / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="2-layer model on CPU, < 1 min")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if present)")
    parser.add_argument("--steps", type=int, default=None, help="PPO steps (first = warm-up)")
    parser.add_argument("--batch", type=int, default=None, help="rollout batch size")
    parser.add_argument("--minibatch", type=int, default=None)
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--forward-batch", type=int, default=None)
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--prompt-length", type=int, default=None, help="words per prompt")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None, help="synthetic vocabulary size")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--processes", type=int, default=1, help="data-parallel ranks (GPUs)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (--tiny: 1; a tiny model only loses time to more on a busy box)",
    )
    args = parser.parse_args()
    tiny = {"steps": 3, "batch": 8, "minibatch": 4, "prompt_length": 16, "new_tokens": 16}
    full = {"steps": 4, "batch": 64, "minibatch": 16, "prompt_length": 128, "new_tokens": 128}
    for key, value in (tiny if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.vocab = args.vocab or (500 if args.tiny else 29000)  # the word trainer caps at 30k
    args.forward_batch = args.forward_batch or min(args.batch, 32)

    import torch

    from trainer.ppo import PPOConfig, train

    threads = args.threads or (1 if args.tiny else None)
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.tiny:
        device = torch.device(args.device or "cpu")
    elif device.type != "cuda":
        sys.exit("the ~0.5B benchmark needs CUDA; use --tiny on CPU")
    device_name, peak = peak_flops(device)

    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as tmp:
        root = Path(tmp)
        began = time.perf_counter()
        policy_dir, reward_dir, model_config = build_models(root, args)
        counts = parameter_counts(model_config)
        rng = random.Random(0)  # noqa: S311 - synthetic prompts
        prompts = [
            " ".join(f"w{rng.randrange(args.vocab)}" for _ in range(args.prompt_length))
            for _ in range(args.batch * args.steps)
        ]
        config = PPOConfig(
            policy=str(policy_dir),
            reward_model=str(reward_dir),
            value_init="reward",
            rollout_batch_size=args.batch,
            minibatch_size=args.minibatch,
            micro_batch_size=args.micro_batch,
            forward_batch_size=args.forward_batch,
            ppo_epochs=args.ppo_epochs,
            max_prompt_length=args.prompt_length + 16,
            max_new_tokens=args.new_tokens,
            temperature=1.0,
            total_steps=args.steps,
            gradient_checkpointing=args.gradient_checkpointing,
        )
        print(
            f"device {device_name}; policy {counts['total'] / 1e6:.1f}M parameters "
            f"(+ reward model and value model of the same shape), batch {args.batch}, "
            f"{args.prompt_length}-word prompts, {args.new_tokens} new tokens, "
            f"{args.ppo_epochs} PPO epochs, minibatch {args.minibatch}, "
            f"{args.processes} process{'es' if args.processes > 1 else ''}; "
            f"built in {time.perf_counter() - began:.1f}s",
            flush=True,
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        steps: dict[int, dict[str, float]] = {}

        def on_metric(step: int, name: str, value: float) -> None:
            steps.setdefault(step, {})[name] = value

        began = time.perf_counter()
        if args.processes > 1:
            from trainer.launch import launch

            if threads:
                os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # for every rank
            run = (config, prompts, root / "out")
            launch(
                "trainer.ppo:train",
                run,
                {},
                processes=args.processes,
                device=device.type,
                run_dir=root / "launch",
                on_metric=on_metric,
            )
        else:
            train(config, prompts, root / "out", device=device, on_metric=on_metric)
        wall = time.perf_counter() - began
        cuda_here = device.type == "cuda" and args.processes == 1
        peak_memory = torch.cuda.max_memory_allocated(device) if cuda_here else None
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the run's models are gone; the peer loads its own

        # the peer: one rank's shapes, one PPO step's worth of optimizer steps, one device
        width = round(steps[max(steps)]["tokens/sequence"] / args.batch)  # P + R
        rank_minibatch = args.minibatch // args.processes
        micro = args.micro_batch or rank_minibatch
        bare_tps = bare_training_tokens_per_second(
            policy_dir,
            reward_dir,
            device,
            micro=micro,
            width=width,
            response=args.new_tokens,
            micro_per_step=max(rank_minibatch // micro, 1),
            optimizer_steps=args.ppo_epochs * args.batch // args.minibatch,
            gradient_checkpointing=args.gradient_checkpointing,
        )

    measured = [steps[s] for s in sorted(steps)][1:] or [steps[min(steps)]]  # drop warm-up
    keys = ("tokens/sequence", "tokens/response", "time/generate", "time/score", "time/train")
    total = {k: sum(m[k] for m in measured) for k in (*keys, "time/step")}
    sequence_tokens = total["tokens/sequence"]  # B * (P + R) per step, summed
    response_tokens = total["tokens/response"]
    trained_tokens = sequence_tokens * args.ppo_epochs
    rollout_tps = response_tokens / total["time/generate"]
    train_tps = trained_tokens / total["time/train"]
    step_time = total["time/step"] / len(measured)
    split = {p: total[f"time/{p}"] / total["time/step"] for p in ("generate", "score", "train")}
    # Each trained token goes through both bodies; the lm head only runs on response tokens.
    response_share = response_tokens / sequence_tokens
    flops_per_token = 6 * (2 * counts["body"] + counts["head"] * response_share)
    achieved = flops_per_token * trained_tokens / total["time/train"]
    per_device = train_tps / args.processes  # the bare loop runs on one device

    print(f"steps measured        {len(measured)} (of {len(steps)}; the first is warm-up)")
    print(f"step time             {step_time:.2f} s  (run {wall:.1f} s, saving included)")
    print(
        "time split            "
        + ", ".join(f"{p} {100 * share:.0f}%" for p, share in split.items())
        + f"  (other {100 * (1 - sum(split.values())):.0f}%)"
    )
    print(f"rollout tokens/s      {rollout_tps:,.0f}  (response tokens sampled, KV cache)")
    print(f"training tokens/s     {train_tps:,.0f}  (prompt + response, policy and value)")
    print(f"response length       {response_tokens / (args.batch * len(measured)):.1f} tokens")
    print(f"training FLOP/s       {achieved / 1e12:.3f} TFLOP/s (6 * N * tokens)")
    # the same FLOPs per token: the bare loop runs the head on the same response share
    bare_flops = 6 * (2 * counts["body"] + counts["head"] * args.new_tokens / width) * bare_tps
    print(f"bare loop tokens/s    {bare_tps:,.0f}  (the peer: the same models and shapes, no PPO)")
    print(f"PPO / bare            {per_device / bare_tps:.2f}x  (training tokens/s per device)")
    if peak is not None:
        devices = args.processes
        print(
            f"training MFU          {100 * achieved / (peak * devices):.1f}%  "
            f"(of {devices} x {peak / 1e12:.0f} TFLOPS)"
        )
        print(f"bare loop MFU         {100 * bare_flops / peak:.1f}%")
    else:
        print("training MFU          n/a (no bf16 peak known for this device)")
    if peak_memory is not None:
        print(f"peak GPU memory       {peak_memory / 2**30:.2f} GiB (allocated)")


if __name__ == "__main__":
    main()
