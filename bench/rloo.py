"""RLOO steps: prefloop's `trainer.rloo.train` against TRL's `RLOOTrainer` on the same work.

Both train one policy built from config (random weights, no download: throughput and
memory only, the rewards mean nothing), each in a fresh subprocess so that peak memory is
its own. `--tiny`: a 2-layer Llama-shaped model on the CPU; by default a ~0.5B Qwen2-shaped
model (bench/ppo.py's `build_models`, a synthetic word vocabulary) in bf16 autocast over
fp32 weights on CUDA. A random policy rarely says EOS, so nearly every response runs to
--new-tokens.

The same work per step on both sides: the same synthetic prompts, `--prompts-per-step`
prompts answered `--k` times (TRL: num_generations), the same chat-template token ids
(checked), --new-tokens, temperature 1.0 with every other sampling processor off, a frozen
reference copy of the policy, the same programmatic reward (the share of even-numbered words
in the response, a cheap function of the text), reward = score - beta * sum_t (log pi -
log pi_ref) (k1, beta fixed), leave-one-out advantages, the clipped surrogate on the
response's ratio with eps 0.2, the loss a mean over responses, one optimizer step per
generation batch (TRL: num_iterations=1, steps_per_generation = gradient_accumulation_steps),
AdamW (lr, eps 1e-5, weight decay 0.01, betas 0.9/0.999), clipping at 1.0, constant learning
rate, dropout off, seed 42, no vLLM, no logging service (report_to="none"), no checkpoints.
The number of completions and distinct prompts each side's reward function receives per
step is counted and must be prompts_per_step * k and prompts_per_step.

Measured, over the steps after the first (warm-up): seconds per step, as the wall time
between the ends of consecutive optimizer steps (prefloop: its first metric of the step;
TRL: `on_step_end`; CUDA synchronised), so each side's whole loop counts and model loading
and the final save do not; response tokens sampled per second of step (up to and including
EOS); the share of the step spent in `generate` (TRL's `model.generate` wrapped with a
timer); peak GPU memory allocated over the whole subprocess (models included); and the
ratio prefloop / TRL.

Differences that remain, each side doing what it does by default:
* Log-probs: TRL 1.16 patches a fused LM head onto both models that projects the
  completion positions in tiles and returns log-probs (and entropy) without materialising
  the (B, R, V) logits; prefloop materialises the response positions' logits in fp32 (and
  computes the entropy from the old pass's logits, TRL from the training pass's).
* Batching: without --micro-batch both sample, score and train the whole step's batch at
  once. With it, TRL trains and scores in chunks of it (per_device_train_batch_size) and
  samples the whole batch in one `generate`; prefloop accumulates over micro-batches of it
  but samples and scores with forward_batch_size = the whole batch.
* AdamW: HF's Trainer exempts biases and norm weights from weight decay; prefloop decays
  every parameter. Both use torch.optim.AdamW (TRL with optim="adamw_torch", not fused).
* Order and sampling: each side shuffles the same prompts its own way (each prompt is
  used once), and draws from the same distribution but not the same samples, so response
  lengths can differ where EOS is sampled; the token counts are printed. TRL pads each
  batch to its longest completion, as prefloop does.
* Per-step overhead: TRL's Trainer adds its callbacks, metric gathering and bookkeeping;
  prefloop its metrics. Both are inside the timed step, as a user gets them.

    .venv/bin/python bench/rloo.py --tiny            # CPU, a 2-layer model, < 2 min
    .venv/bin/python bench/rloo.py                   # CUDA, ~0.5B, bf16
    .venv/bin/python bench/rloo.py --prompts-per-step 32 --micro-batch 32 --gradient-checkpointing
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEED = 42
CLIP_EPS = 0.2
ADAM_EPS = 1e-5
WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default, which prefloop uses


def reward_of(text: str) -> float:
    """The programmatic reward: the share of the response's words w<n> with an even n."""
    words = text.split()
    even = sum(1 for w in words if w[1:].isdigit() and int(w[1:]) % 2 == 0)
    return even / max(len(words), 1)


# ---------------------------------------------------------------------------------------
# Timing


def now(device: Any) -> float:
    """perf_counter once the GPU has finished what was queued."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class StepLog:
    """What one trainer did per step: when the step ended, what its reward function saw
    (completions, distinct prompts, answers per prompt, response tokens) and, where timed,
    the seconds spent in generate."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.ends: list[float] = []
        self.batches: list[dict[str, Any]] = []
        self.generate_seconds: list[float] = []

    def step_ended(self) -> None:
        self.ends.append(now(self.device))

    def saw(self, prompts: list[str], response_tokens: int = 0) -> None:
        counts = Counter(prompts)
        self.batches.append(
            {
                "completions": len(prompts),
                "prompts": len(counts),
                "answers_per_prompt": sorted(set(counts.values())),
                "response_tokens": response_tokens,
            }
        )

    def result(self) -> dict[str, Any]:
        """The figures of the steps after the first (the warm-up)."""
        import torch

        measured = self.ends[-1] - self.ends[0]
        steps = len(self.ends) - 1
        after_warmup = self.batches[1:]
        tokens = sum(b["response_tokens"] for b in after_warmup)
        timed = len(self.generate_seconds) == len(self.ends)  # one generate call per step
        generate = sum(self.generate_seconds[1:]) if timed else float("nan")
        cuda = self.device.type == "cuda"
        return {
            "steps": len(self.ends),
            "seconds_per_step": measured / steps,
            "steps_per_second": steps / measured,
            "completions_per_step": self.batches[-1]["completions"],
            "response_tokens_per_second": tokens / measured,
            "response_tokens_per_answer": tokens / sum(b["completions"] for b in after_warmup),
            "generate_share": generate / measured,
            "batches": self.batches,
            "threads": torch.get_num_threads(),
            "peak_gib": torch.cuda.max_memory_allocated(self.device) / 2**30 if cuda else None,
        }


# ---------------------------------------------------------------------------------------
# One trainer in its own process


def run_prefloop(job: dict[str, Any], log: StepLog) -> dict[str, Any]:
    import torch

    from trainer.rloo import RLOOConfig, train

    config = RLOOConfig(
        policy=job["policy"],
        prompts_per_step=job["prompts_per_step"],
        k=job["k"],
        minibatch_size=None,  # one optimizer step per RLOO step
        epochs=1,
        micro_batch_size=job["micro_batch"],
        forward_batch_size=job["batch"],  # one generate call, as TRL's
        clip_eps=CLIP_EPS,
        whiten_advantages=False,  # TRL: normalize_advantages=False
        learning_rate=job["lr"],
        lr_schedule="constant",
        adam_eps=ADAM_EPS,
        max_prompt_length=job["max_prompt_tokens"],
        max_new_tokens=job["new_tokens"],
        temperature=1.0,
        top_p=1.0,
        kl_coef=job["beta"],
        adaptive_kl=False,
        total_steps=job["steps"],
        seed=SEED,
        bf16=job["device"] == "cuda",
        gradient_checkpointing=job["gradient_checkpointing"],
        max_grad_norm=1.0,
    )
    metrics: dict[int, dict[str, float]] = {}

    def reward_fn(prompts: list[str], responses: list[str]) -> torch.Tensor:
        log.saw(prompts)
        return torch.tensor([reward_of(r) for r in responses])

    def on_metric(step: int, name: str, value: float) -> None:
        if step not in metrics:  # the step's first metric: its update is done
            log.step_ended()
        metrics.setdefault(step, {})[name] = value

    train(
        config,
        job["prompts"],
        job["out"],
        reward_fn=reward_fn,
        device=log.device,
        on_metric=on_metric,
    )
    steps = [metrics[s] for s in sorted(metrics)]
    for batch, step in zip(log.batches, steps, strict=True):  # one reward call per step
        batch["response_tokens"] = int(step["tokens/response"])
    log.generate_seconds = [step["time/generate"] for step in steps]
    return log.result()


def run_trl(job: dict[str, Any], log: StepLog) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    from trainer.generate import encode_prompt

    B, micro = job["batch"], job["micro_batch"] or job["batch"]
    cuda = job["device"] == "cuda"
    args = RLOOConfig(
        output_dir=job["out"],
        num_generations=job["k"],
        # per_device_train_batch_size counts completions, not prompts: B of them per
        # optimizer step, in B / micro accumulated micro-batches, all from one generation.
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=B // micro,
        steps_per_generation=B // micro,
        num_iterations=1,
        max_steps=job["steps"],
        max_completion_length=job["new_tokens"],
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=job["beta"],
        epsilon=CLIP_EPS,
        normalize_advantages=False,
        learning_rate=job["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        adam_epsilon=ADAM_EPS,
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=1.0,
        seed=SEED,
        bf16=cuda,  # TRL's default is bf16=True, even on the CPU
        use_cpu=not cuda,
        gradient_checkpointing=job["gradient_checkpointing"],  # TRL's default is True
        disable_dropout=True,
        use_vllm=False,
        report_to="none",
        logging_steps=10**9,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    # Conversational prompts, so that TRL applies the chat template as prefloop does.
    dataset = Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": p}] for p in job["prompts"]]}
    )
    tokenizer = AutoTokenizer.from_pretrained(job["policy"], padding_side="left")

    def reward_fn(prompts: list, completions: list, completion_ids: list, **_: Any) -> list:
        log.saw([p[-1]["content"] for p in prompts], sum(len(ids) for ids in completion_ids))
        return [reward_of(c[-1]["content"]) for c in completions]

    class StepEnd(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            log.step_ended()

    trainer = RLOOTrainer(
        model=job["policy"],
        reward_funcs=reward_fn,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepEnd()],
    )
    prompt = job["prompts"][0]
    trl_ids = trainer._tokenize_prompts([dataset[0]["prompt"]])[0][0]
    if list(trl_ids) != encode_prompt(tokenizer, prompt, job["max_prompt_tokens"]):
        sys.exit(f"TRL's prompt tokens differ from prefloop's: {trl_ids}")
    if args.generation_batch_size != B:
        sys.exit(f"TRL generates {args.generation_batch_size} completions per step, not {B}")

    generate = trainer.model.generate  # the model TRL samples from, on one process

    def timed_generate(*a: Any, **kw: Any) -> Any:
        began = now(log.device)
        out = generate(*a, **kw)
        log.generate_seconds.append(now(log.device) - began)
        return out

    trainer.model.generate = timed_generate
    trainer.remove_callback(PrinterCallback)  # its end-of-run log would print all metrics
    trainer.train()
    result = log.result()
    result["prompt_tokens"] = len(trl_ids)
    result["trl_generation_batch_size"] = args.generation_batch_size
    return result


def worker(job_file: str) -> None:
    import torch
    from transformers.utils import logging

    logging.disable_progress_bar()

    job = json.loads(Path(job_file).read_text())
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log = StepLog(device)
    result = (run_prefloop if job["trainer"] == "prefloop" else run_trl)(job, log)
    Path(job["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------
# The benchmark


def spawn(job: dict[str, Any], scratch: Path) -> dict[str, Any]:
    job_file = scratch / f"{job['trainer']}.job.json"
    job_file.write_text(json.dumps(job))
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, __file__, "--worker", str(job_file)]
    if subprocess.run(command, env=env, check=False).returncode:  # noqa: S603 - this script
        sys.exit(f"the {job['trainer']} run failed")
    return json.loads(Path(job["result"]).read_text())


def check_batches(name: str, result: dict[str, Any], prompts_per_step: int, k: int) -> None:
    """One reward call per step, each on prompts_per_step prompts answered k times."""
    if len(result["batches"]) != result["steps"]:
        sys.exit(f"{name}: {len(result['batches'])} reward calls in {result['steps']} steps")
    want = {"completions": prompts_per_step * k, "prompts": prompts_per_step}
    for step, batch in enumerate(result["batches"], start=1):
        if batch["completions"] != want["completions"] or batch["prompts"] != want["prompts"]:
            sys.exit(f"{name} step {step}: {batch}, expected {want} with {k} answers each")
        if batch["answers_per_prompt"] != [k]:
            sys.exit(f"{name} step {step}: prompts answered {batch['answers_per_prompt']} times")


def report(ours: dict[str, Any], trl: dict[str, Any]) -> None:
    print(f"\n{'':<30}{'prefloop':>12}{'TRL':>12}{'ratio':>9}")
    rows = [  # (label, key, format, ratio shown)
        ("steps (first = warm-up)", "steps", "{:.0f}", False),
        ("completions per step", "completions_per_step", "{:.0f}", False),
        ("seconds per step", "seconds_per_step", "{:.3f}", False),
        ("steps/s", "steps_per_second", "{:.3f}", True),
        ("response tokens/s", "response_tokens_per_second", "{:,.0f}", True),
        ("response tokens per answer", "response_tokens_per_answer", "{:.1f}", False),
        ("generate share of step", "generate_share", "{:.0%}", False),
        ("CPU threads", "threads", "{:.0f}", False),
        ("peak GPU memory GiB", "peak_gib", "{:.2f}", True),
    ]
    for label, key, fmt, with_ratio in rows:
        a, b = ours[key], trl[key]
        if a is None:
            print(f"{label:<30}{'n/a':>12}{'n/a':>12}")
            continue
        ratio = f"{a / b:.2f}x" if with_ratio and b else ""
        print(f"{label:<30}{fmt.format(a):>12}{fmt.format(b):>12}{ratio:>9}")
    speedup = ours["steps_per_second"] / trl["steps_per_second"]
    print(f"\nprefloop / TRL: {speedup:.2f}x steps/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="2-layer model on CPU, < 2 min")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if present)")
    parser.add_argument("--steps", type=int, default=None, help="RLOO steps (first = warm-up)")
    parser.add_argument("--prompts-per-step", type=int, default=None)
    parser.add_argument("--k", type=int, default=4, help="answers per prompt")
    parser.add_argument("--micro-batch", type=int, default=None, help="completions per backward")
    parser.add_argument("--prompt-length", type=int, default=None, help="words per prompt")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None, help="synthetic vocabulary size")
    parser.add_argument("--beta", type=float, default=0.05, help="KL coefficient")
    parser.add_argument("--lr", type=float, default=3e-6)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="for both")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (--tiny: 1)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    tiny = {"steps": 16, "prompts_per_step": 4, "prompt_length": 16, "new_tokens": 16}
    full = {"steps": 6, "prompts_per_step": 16, "prompt_length": 128, "new_tokens": 128}
    for key, value in (tiny if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.vocab = args.vocab or (500 if args.tiny else 29000)  # the word trainer caps at 30k
    batch = args.prompts_per_step * args.k
    if args.micro_batch and batch % args.micro_batch:
        sys.exit(f"--micro-batch must divide prompts-per-step * k = {batch}")
    if args.steps < 2:
        sys.exit("--steps must be >= 2: the first is a warm-up")

    import torch
    from transformers.utils import logging

    from bench.ppo import build_models, parameter_counts

    logging.disable_progress_bar()

    device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if not args.tiny and device != "cuda":
        sys.exit("the ~0.5B benchmark needs CUDA; use --tiny on CPU")
    device_name = torch.cuda.get_device_name(device) if device == "cuda" else "cpu"

    with tempfile.TemporaryDirectory(prefix="bench-rloo-") as tmp:
        scratch = Path(tmp)
        began = time.perf_counter()
        policy_dir, _, model_config = build_models(scratch, args, reward=False)
        rng = random.Random(0)  # noqa: S311 - synthetic prompts
        prompts = [
            " ".join(f"w{rng.randrange(args.vocab)}" for _ in range(args.prompt_length))
            for _ in range(args.prompts_per_step * args.steps)  # each prompt used once
        ]
        print(
            f"device {device_name}; policy {parameter_counts(model_config)['total'] / 1e6:.1f}M "
            f"parameters; {args.prompts_per_step} prompts x k={args.k} = {batch} completions "
            f"per step, {args.prompt_length}-word prompts, {args.new_tokens} new tokens, "
            f"beta {args.beta}, micro-batch {args.micro_batch or batch}, {args.steps} steps; "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
            f"built in {time.perf_counter() - began:.1f}s",
            flush=True,
        )
        results = {}
        for trainer in ("prefloop", "trl"):
            job = {
                "trainer": trainer,
                "policy": str(policy_dir),
                "out": str(scratch / f"out-{trainer}"),
                "result": str(scratch / f"{trainer}.result.json"),
                "prompts": prompts,
                "prompts_per_step": args.prompts_per_step,
                "k": args.k,
                "batch": batch,
                "micro_batch": args.micro_batch,
                "max_prompt_tokens": args.prompt_length + 16,  # room for the chat template
                "new_tokens": args.new_tokens,
                "beta": args.beta,
                "lr": args.lr,
                "steps": args.steps,
                "device": device,
                "gradient_checkpointing": args.gradient_checkpointing,
                "threads": args.threads or (1 if args.tiny else None),
            }
            began = time.perf_counter()
            results[trainer] = spawn(job, scratch)
            check_batches(trainer, results[trainer], args.prompts_per_step, args.k)
            print(f"[{trainer}: {time.perf_counter() - began:.0f} s in all]", flush=True)
    trl = results["trl"]
    print(
        f"TRL: generation_batch_size {trl['trl_generation_batch_size']} per optimizer step, "
        f"prompts of {trl['prompt_tokens']} tokens (the same ids as prefloop's)"
    )
    report(results["prefloop"], trl)


if __name__ == "__main__":
    main()
