"""Supervised fine-tuning of a causal LM on demonstrations: the loss on completion tokens only.

Each demonstration is a prompt and the answer a person wrote (or one imported with the prompt).
The policy learns to continue the prompt with the answer: next-token cross-entropy on the
answer's tokens, nothing on the prompt's or the padding's (Ouyang et al., 2022, section 3.5:
InstructGPT's SFT step; TRL's `completion_only_loss`). The loss of an optimizer step is the
mean over every completion token of its micro-batches, so gradient accumulation gives the
gradient of one large batch (and a long answer weighs more than a short one, token by token).

    from trainer.sft import SFTConfig, SFTExample, train
    examples = [SFTExample("Write a haiku", "An old silent pond ..."), ...]
    result = train(SFTConfig(model_name_or_path="path/to/base"), examples, held_out,
                   "var/models/sft-1")
    result.metrics["eval_loss"], result.metrics["eval_perplexity"]

Formatting is the generate job's (trainer/generate.py), so the new policy is sampled the way
it was trained: with a chat template, the prompt's messages (a text prompt is one user turn)
plus an assistant turn holding the completion, as the template renders them (its end-of-turn
tokens are trained on, so the model learns to stop); without one, BOS + the prompt (a chat as
"User: ...\\n\\nAssistant:") followed by the completion and EOS.

Truncation keeps the completion: a sequence longer than `max_length` loses the prompt's start
first (the end is the turn being answered), down to its last `min_prompt_tokens` (at most half
the room); only past that floor is the completion's end cut too. A completion cut short loses
its EOS, so the model never learns to stop mid-answer.

Packing (`packing=True`) puts several examples in one row of up to `max_length` tokens (best
fit, longest first) instead of padding each. The examples stay apart: position ids restart at
each example, and transformers turns restarting position ids (with no 2-D attention mask and
no KV cache, as in training) into a block-diagonal causal mask (`masking_utils.find_packed_sequence_indices`; flash
attention reads them as variable-length sequences), and an example's first token is never a
target. Before training, a probe checks that a packed row gives the same logits as its
examples alone, and refuses packing for a model where it would not (an architecture whose
attention ignores position-id resets).

Dynamic padding and length-grouped batches, AdamW with warmup and cosine (InstructGPT) or
linear decay, bf16 autocast and gradient checkpointing on a GPU, seeded throughout; a stopped
run checkpoints the weights, optimizer, scheduler and RNG states and resumes exactly. Nothing
here knows about the database: `trainer/sft_job.py` reads the demonstrations.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.data import length_grouped_batches
from trainer.distributed import SINGLE, Distributed
from trainer.generate import Prompt, as_messages, as_text, leading_special_tokens
from trainer.modeling import enable_checkpointing
from trainer.runtime import (
    TrainingConfig,
    adamw_with_schedule,
    autocast,
    check_schedule,
    json_safe,
    load_checkpoint,
    precision,
    resolve_device,
    save_on_main,
    seed_everything,
)

__all__ = [
    "IGNORE_INDEX",
    "SFTConfig",
    "SFTExample",
    "SFTFormatter",
    "SFTResult",
    "pack",
    "train",
]

META_FILE = "prefloop_sft.json"
CHECKPOINT_DIR = "checkpoint"
IGNORE_INDEX = -100  # the label of a token that is not a target (cross_entropy's default)


@dataclass
class SFTConfig(TrainingConfig):
    """Hyperparameters of one SFT run: the loop's (`trainer.runtime.TrainingConfig`: batches,
    AdamW, precision, logging, eval and checkpoint cadence) and these. Defaults are common
    choices for small policies."""

    model_name_or_path: str = field(
        metadata={"help": "The policy to fine-tune: a causal LM directory or hub id."}
    )
    max_length: int = field(
        default=1024,
        metadata={"help": "Tokens per prompt + completion (and per packed row)."},
    )
    min_prompt_tokens: int = field(
        default=64,
        metadata={"help": "A too-long completion is cut so the prompt keeps this many tokens."},
    )
    batch_size: int = field(
        default=8, metadata={"help": "Examples (packed: rows) per forward pass."}
    )
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak AdamW learning rate."})
    lr_scheduler: str = field(
        default="cosine",
        metadata={"help": "Decay after warmup: 'cosine' (InstructGPT's SFT) or 'linear'."},
    )
    epochs: int = field(
        default=1,
        metadata={"help": "Passes over the data. InstructGPT ran 16, past the eval-loss optimum."},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Pack examples into rows of max_length (kept apart; less padding)."},
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Recompute activations in backward; None = on with CUDA."},
    )
    eval_before: bool = field(
        default=True,
        metadata={"help": "Evaluate the starting policy first, to report the drop in loss."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_schedule(self.lr_scheduler)
        if self.max_length < 8:
            raise ValueError("max_length must be at least 8")


@dataclass
class SFTExample:
    """One demonstration: a prompt (text or chat messages) and the answer to learn."""

    prompt: Prompt
    completion: str
    prompt_key: str = ""  # identity of the prompt, for splits


@dataclass
class EncodedExample:
    """Token ids of prompt + completion; the first `prompt_length` are not targets."""

    input_ids: list[int]
    prompt_length: int

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def labels(self) -> list[int]:
        """input_ids with IGNORE_INDEX on the prompt. The first token is never a target (no
        token before it predicts it), which also keeps packed examples from predicting
        across their boundary."""
        start = max(self.prompt_length, 1)
        return [IGNORE_INDEX] * start + self.input_ids[start:]

    @property
    def targets(self) -> int:
        """Completion tokens the loss is taken on."""
        return self.length - max(self.prompt_length, 1)


@dataclass
class SFTResult:
    """What a run produced. `stopped`: interrupted; call `train` again to resume."""

    output_dir: str
    metrics: dict[str, float]
    stopped: bool = False
    steps: int = 0
    total_steps: int = 0
    history: list[tuple[int, str, float]] = field(default_factory=list)


def fit(
    prompt_ids: list[int], completion_ids: list[int], budget: int, min_prompt: int
) -> tuple[list[int], list[int]]:
    """Fit prompt + completion into `budget` tokens: the prompt loses its start first, down to
    its last min(min_prompt, budget // 2) tokens (or all, when shorter); past that floor the
    completion loses its end. A completion with no prompt to answer teaches nothing, so the
    floor holds even for a completion that would fit alone."""
    if len(prompt_ids) + len(completion_ids) <= budget:
        return prompt_ids, completion_ids
    keep = min(len(prompt_ids), max(budget - len(completion_ids), min(min_prompt, budget // 2)))
    return prompt_ids[len(prompt_ids) - keep :], completion_ids[: budget - keep]


class SFTFormatter:
    """(prompt, completion) -> EncodedExample, formatted as the generate job samples."""

    def __init__(self, tokenizer: Any, max_length: int, min_prompt_tokens: int = 64) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.min_prompt_tokens = min_prompt_tokens
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.eos = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id
        # The special tokens the tokenizer puts before a text (BOS): kept through truncation.
        self.prefix = [] if self.chat else leading_special_tokens(tokenizer)
        self.bos = bos

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def pieces(self, prompt: Prompt, completion: str) -> tuple[list[int], list[int], list[int]]:
        """(kept prefix, prompt ids, completion ids) before truncation."""
        if self.chat:
            messages = as_messages(prompt)
            prompt_ids = self._ids(
                self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
            )
            full_ids = self._ids(
                self.tokenizer.apply_chat_template(
                    [*messages, {"role": "assistant", "content": completion}], tokenize=False
                )
            )
            # The completion is whatever follows the longest shared prefix: robust to
            # templates whose generation prompt differs slightly from the full render.
            n = 0
            while n < min(len(prompt_ids), len(full_ids)) and prompt_ids[n] == full_ids[n]:
                n += 1
            prefix = full_ids[:1] if n and self.bos is not None and full_ids[0] == self.bos else []
            return prefix, full_ids[len(prefix) : n], full_ids[n:]
        completion_ids = self._ids(completion)
        if self.eos is not None:
            completion_ids.append(self.eos)
        return list(self.prefix), self._ids(as_text(prompt)), completion_ids

    def encode(self, prompt: Prompt, completion: str) -> EncodedExample:
        prefix, prompt_ids, completion_ids = self.pieces(prompt, completion)
        budget = self.max_length - len(prefix)
        prompt_ids, completion_ids = fit(prompt_ids, completion_ids, budget, self.min_prompt_tokens)
        ids = prefix + prompt_ids + completion_ids
        return EncodedExample(input_ids=ids, prompt_length=len(prefix) + len(prompt_ids))


# ---------------------------------------------------------------------------------------
# Batches: padded, or packed rows


@dataclass
class SFTBatch:
    input_ids: torch.Tensor  # (B, T) right-padded
    labels: torch.Tensor  # (B, T) IGNORE_INDEX on prompt and padding tokens
    attention_mask: torch.Tensor | None  # (B, T); None for packed rows (see position_ids)
    position_ids: torch.Tensor | None  # (B, T) restarting at each packed example
    num_tokens: int  # real (unpadded) tokens
    num_targets: int  # tokens the loss is taken on

    def to(self, device: torch.device | str) -> SFTBatch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return SFTBatch(
            self.input_ids.to(device),
            self.labels.to(device),
            move(self.attention_mask),
            move(self.position_ids),
            self.num_tokens,
            self.num_targets,
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.input_ids}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids
        return inputs


def collate(examples: Sequence[EncodedExample], pad_token_id: int) -> SFTBatch:
    """Right-pad each example to the batch's longest (dynamic padding)."""
    width = max(e.length for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        input_ids[row, : e.length] = torch.tensor(e.input_ids)
        labels[row, : e.length] = torch.tensor(e.labels)
        mask[row, : e.length] = 1
    return SFTBatch(
        input_ids,
        labels,
        mask,
        None,
        sum(e.length for e in examples),
        sum(e.targets for e in examples),
    )


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of example indices whose lengths sum to at most `capacity`: best fit decreasing
    (each example, longest first, goes to the fullest row it fits in). Deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in order:
        need = lengths[i]
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - need > 0:
            bisect.insort(free, (room - need, row))
    return rows


def collate_packed(rows: Sequence[Sequence[EncodedExample]], pad_token_id: int) -> SFTBatch:
    """Each row's examples end to end; position ids restart at each example (and at the
    padding), which transformers reads as a block-diagonal causal mask."""
    widths = [sum(e.length for e in row) for row in rows]
    width = max(widths)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            input_ids[r, at : at + e.length] = torch.tensor(e.input_ids)
            labels[r, at : at + e.length] = torch.tensor(e.labels)
            positions[r, at : at + e.length] = torch.arange(e.length)
            at += e.length
        positions[r, at:] = torch.arange(width - at)
    return SFTBatch(
        input_ids,
        labels,
        None,
        positions,
        sum(widths),
        sum(e.targets for row in rows for e in row),
    )


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the target tokens: logits (B, T, V) at position t
    predict labels (B, T) at t + 1; IGNORE_INDEX labels count nothing."""
    vocab = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, vocab),  # (B*(T-1), V)
        labels[:, 1:].reshape(-1),  # (B*(T-1),)
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


@torch.no_grad()
def packing_is_exact(
    model: nn.Module, examples: Sequence[EncodedExample], device: torch.device, pad_id: int
) -> bool:
    """Do a few short examples packed in one row get the logits they get alone?"""
    probe = sorted(examples, key=lambda e: e.length)[:3]
    if len(probe) < 2:
        return True
    was_training = model.training
    model.eval()
    try:
        packed = collate_packed([probe], pad_id).to(device)
        together = model(**packed.model_inputs(), use_cache=False).logits[0].float()  # (T, V)
        at = 0
        for e in probe:
            alone = collate([e], pad_id).to(device)
            logits = model(**alone.model_inputs(), use_cache=False).logits[0].float()  # (L, V)
            if not torch.allclose(together[at : at + e.length], logits, atol=1e-3, rtol=1e-3):
                return False
            at += e.length
        return True
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------
# Training


def _fingerprint(config: SFTConfig, examples: Sequence[EncodedExample]) -> str:
    """Identity of a run: a checkpoint resumes only the same config on the same data."""
    digest = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode())
    for e in examples:
        digest.update(json.dumps([e.input_ids, e.prompt_length]).encode())
    return digest.hexdigest()


def policy_to_train(
    path: str | Path, device: torch.device, checkpointing: bool
) -> tuple[nn.Module, Any, Any]:
    """(policy in fp32 on `device`, tokenizer, the dtype its checkpoint was saved in): fp32
    master weights whatever the checkpoint's dtype; bf16 only inside autocast."""
    model, tokenizer = load_policy(path)
    saved_dtype = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    if checkpointing:
        enable_checkpointing(model)
    model.to(device=device, dtype=torch.float32)
    return model, tokenizer, saved_dtype


def save_policy(
    model: nn.Module,
    tokenizer: Any,
    output_dir: Path,
    saved_dtype: Any,
    checkpointing: bool,
    meta_file: str,
    meta: dict[str, Any],
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """The trained policy in plain transformers format, in its checkpoint's dtype (bf16 and
    fp16 stay so), with its tokenizer and `meta` (plus whether a chat template formatted the
    data) in `meta_file`; the resumable checkpoint is removed. `state_dict`: the full weights
    of a sharded (FSDP) `model`, written instead of its own."""
    if checkpointing:  # off again, so the saved model is plain
        if hasattr(model, "activation_checkpointing_disable"):  # transformers 5
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()
    half = isinstance(saved_dtype, torch.dtype) and saved_dtype in (torch.bfloat16, torch.float16)
    model.config.use_cache = True
    if state_dict is not None:
        if half:
            state_dict = {
                k: v.to(saved_dtype) if v.is_floating_point() else v for k, v in state_dict.items()
            }
        model.save_pretrained(output_dir, state_dict=state_dict)
        if half:  # save_pretrained wrote the dtype of the sharded fp32 weights
            model.config.dtype = saved_dtype
            model.config.save_pretrained(output_dir)
    else:
        if half:
            model.to(saved_dtype)
        model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    meta = {**meta, "chat_template": bool(getattr(tokenizer, "chat_template", None))}
    (output_dir / meta_file).write_text(json.dumps(json_safe(meta), indent=2))
    shutil.rmtree(output_dir / CHECKPOINT_DIR, ignore_errors=True)


def load_policy(path: str | Path) -> tuple[nn.Module, Any]:
    """(causal LM, tokenizer); the tokenizer gets pad = eos when it has none (safe: the labels
    come from the lengths, never from the pad id, so a real final EOS stays a target)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(path))
    return model, tokenizer


@torch.no_grad()
def evaluate(
    model: nn.Module,
    examples: Sequence[EncodedExample],
    pad_id: int,
    device: torch.device,
    bf16: bool,
    batch_size: int,
) -> dict[str, float]:
    """Mean completion-token loss and perplexity of `examples` (padded batches by length)."""
    targets = sum(e.targets for e in examples)
    if not targets:
        return {"loss": float("nan"), "perplexity": float("nan"), "tokens": 0}
    was_training = model.training
    model.eval()
    total = 0.0
    order = sorted(examples, key=lambda e: e.length)
    for start in range(0, len(order), batch_size):
        batch = collate(order[start : start + batch_size], pad_id).to(device)
        with autocast(device, bf16):
            logits = model(**batch.model_inputs(), use_cache=False).logits
        total += token_loss_sum(logits, batch.labels).item()
    model.train(was_training)
    loss = total / targets
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": targets}


def train(
    config: SFTConfig,
    train_examples: Sequence[SFTExample],
    eval_examples: Sequence[SFTExample],
    output_dir: str | Path,
    *,
    device: str | torch.device | None = None,
    on_metric: Callable[[int, str, float], None] = lambda step, name, value: None,
    on_progress: Callable[[float, str], None] = lambda fraction, message: None,
    should_stop: Callable[[], bool] = lambda: False,
    dist: Distributed = SINGLE,
) -> SFTResult:
    """Fine-tune the policy on `train_examples`, evaluate on `eval_examples`, save it to
    output_dir (save_pretrained + tokenizer + prefloop_sft.json).

    `should_stop()` is asked before every optimizer step; when it says True, a resumable
    checkpoint goes to output_dir/checkpoint and the result has stopped=True. Calling `train`
    again with the same arguments resumes it and ends with the same weights.

    `dist` (trainer/distributed.py): one of several data-parallel processes. Each takes its
    slice of every global batch of `batch_size` examples (rows), and the loss stays the mean
    over the global step's target tokens, so the run follows the one-process loss curve; rank
    0 evaluates, checkpoints and saves. Sharded (`dist.sharded`, FSDP2, for a policy too big
    for one GPU), every rank runs the evaluation forwards (each needs all of them) and rank 0
    still reports and writes."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = dist.device if dist.active else resolve_device(device)
    cuda = device.type == "cuda"
    bf16, checkpointing = precision(config, device)
    history: list[tuple[int, str, float]] = []

    def emit(step: int, name: str, value: float) -> None:
        history.append((step, name, value))
        on_metric(step, name, value)

    # ---- model
    seed_everything(config.seed)
    # FSDP: on the CPU until `wrap` moves each rank's shards to its device
    home = torch.device("cpu") if dist.sharded else device
    model, tokenizer, saved_dtype = policy_to_train(config.model_name_or_path, home, checkpointing)
    pad_id = tokenizer.pad_token_id

    # ---- data: tokenised once
    formatter = SFTFormatter(tokenizer, config.max_length, config.min_prompt_tokens)
    train_data = [formatter.encode(e.prompt, e.completion) for e in train_examples]
    train_data = [e for e in train_data if e.targets > 0]
    eval_data = [formatter.encode(e.prompt, e.completion) for e in eval_examples]
    eval_data = [e for e in eval_data if e.targets > 0]
    if not train_data:
        raise ValueError("no training demonstrations")
    if config.packing:
        if not packing_is_exact(model, train_data, home, pad_id):
            raise ValueError(
                f"packing is not exact for {type(model).__name__} (its attention does not "
                "restart at position-id resets); train with packing off"
            )
        # A unit is a row of examples; the rows are fixed once, shuffled every epoch.
        units = pack([e.length for e in train_data], config.max_length)
    else:
        units = [[i] for i in range(len(train_data))]
    lengths = [sum(train_data[i].length for i in unit) for unit in units]
    unit_targets = [sum(train_data[i].targets for i in unit) for unit in units]
    megabatch = config.length_group_size if config.group_by_length else None
    micro_per_epoch = math.ceil(len(units) / config.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / config.grad_accumulation_steps)
    total_steps = steps_per_epoch * config.epochs

    def make_batch(indices: Sequence[int]) -> SFTBatch:
        if config.packing:
            rows = [[train_data[i] for i in units[u]] for u in indices]
            return collate_packed(rows, pad_id)
        return collate([train_data[units[u][0]] for u in indices], pad_id)

    # ---- resume from a checkpoint of the same run, if there is one
    checkpoint = output_dir / CHECKPOINT_DIR / "state.pt"
    fingerprint = _fingerprint(config, train_data)
    totals = {"seconds": 0.0, "tokens": 0, "targets": 0, "loss_sum": 0.0, "loss_steps": 0}
    done = 0
    last_eval: dict[str, float] = {}
    before: dict[str, float] = {}
    # The model that backpropagates: DDP's wrapper (which also makes every rank start from
    # rank 0's weights), the model sharded in place (FSDP), or the model itself in one process.
    forward = dist.wrap(model)

    # ---- optimizer: AdamW, linear warmup then cosine or linear decay (on FSDP's shards)
    optimizer, scheduler = adamw_with_schedule(model, config, total_steps, config.lr_scheduler)
    state = load_checkpoint(checkpoint, fingerprint)
    if state is not None:
        dist.load_model_state(model, state["model"])
        dist.load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        done, totals, last_eval = state["step"], state["totals"], state["last_eval"]
        before = state["before"]
        dist.restore_rng(state["rng"])
        on_progress(done / total_steps, f"resumed at step {done}/{total_steps}")
    resumed_from = done

    def save_checkpoint() -> None:
        # every rank: under FSDP the full states are gathered to rank 0
        weights, moments = dist.model_state(model), dist.optimizer_state(model, optimizer)
        rngs = dist.rng_states()  # every rank's, gathered by all of them
        save_on_main(
            dist,
            checkpoint,
            lambda: {
                "fingerprint": fingerprint,
                "model": weights,
                "optimizer": moments,
                "scheduler": scheduler.state_dict(),
                "step": done,
                "totals": totals,
                "last_eval": last_eval,
                "before": before,
                "rng": rngs,
            },
        )

    def run_eval(step: int) -> dict[str, float]:
        metrics = evaluate(model, eval_data, pad_id, device, bf16, config.eval_batch_size)
        if metrics["tokens"]:  # no held-out demonstrations: nothing to chart
            emit(step, "eval/loss", metrics["loss"])
            emit(step, "eval/perplexity", metrics["perplexity"])
        return metrics

    if config.eval_before and done == 0 and eval_data and dist.evaluates:
        before = run_eval(0)

    # ---- the loop
    model.train()
    window = {"loss": 0.0, "targets": 0, "tokens": 0, "seconds": 0.0}
    for epoch in range(config.epochs):
        # The order of epoch e depends only on (seed, e): resuming replays it exactly.
        batches = length_grouped_batches(lengths, config.batch_size, config.seed + epoch, megabatch)
        for step_in_epoch in range(steps_per_epoch):
            if epoch * steps_per_epoch + step_in_epoch < done:
                continue  # done before the checkpoint
            if dist.any(should_stop()):
                save_checkpoint()
                on_progress(done / total_steps, f"stopped at step {done}/{total_steps}")
                return SFTResult(
                    output_dir=str(output_dir),
                    metrics=dict(last_eval),
                    stopped=True,
                    steps=done,
                    total_steps=total_steps,
                    history=history,
                )
            start = step_in_epoch * config.grad_accumulation_steps
            step_batches = batches[start : start + config.grad_accumulation_steps]
            # One normaliser for the whole (global) optimizer step: every completion token of
            # its k micro-batches weighs the same, as in one pass over all of them.
            normalizer = sum(unit_targets[u] for b in step_batches for u in b) or 1
            began = time.perf_counter()
            step_loss, step_tokens = 0.0, 0  # this rank's, summed over ranks below
            for k, global_batch in enumerate(step_batches):
                indices, stand_in = dist.shard(global_batch)
                batch = make_batch(indices).to(device)
                with dist.no_sync(forward, sync=k == len(step_batches) - 1):
                    with autocast(device, bf16):  # logits (B, T, V)
                        logits = forward(**batch.model_inputs(), use_cache=False).logits
                    loss = token_loss_sum(logits, batch.labels) / normalizer
                    if stand_in:
                        loss = loss * 0.0
                    dist.backward(loss)
                if not stand_in:
                    step_loss += loss.item()
                    step_tokens += batch.num_tokens
            step_loss, step_tokens = dist.sum([step_loss, step_tokens])
            step_tokens = int(step_tokens)
            totals["tokens"] += step_tokens
            window["tokens"] += step_tokens
            grad_norm = dist.clip_grad_norm(model, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()  # honest step times
            seconds = time.perf_counter() - began
            totals["seconds"] += seconds
            totals["targets"] += normalizer
            totals["loss_sum"] += step_loss
            totals["loss_steps"] += 1
            done += 1
            window["loss"] += step_loss * normalizer
            window["targets"] += normalizer
            window["seconds"] += seconds

            if config.logs_at(done, total_steps):
                emit(done, "train/loss", window["loss"] / max(window["targets"], 1))
                emit(done, "train/learning_rate", scheduler.get_last_lr()[0])
                emit(done, "train/grad_norm", float(grad_norm))
                emit(
                    done, "train/tokens_per_second", window["tokens"] / max(window["seconds"], 1e-9)
                )
                window = {"loss": 0.0, "targets": 0, "tokens": 0, "seconds": 0.0}
            on_progress(
                done / total_steps, f"epoch {epoch + 1}/{config.epochs}, step {done}/{total_steps}"
            )
            if config.evaluates_within_epoch_at(done, steps_per_epoch) and dist.evaluates:
                last_eval = run_eval(done)
            if config.checkpoints_at(done, total_steps):
                save_checkpoint()
        # not already evaluated before a stop
        if (epoch + 1) * steps_per_epoch > resumed_from and dist.evaluates:
            last_eval = run_eval(done)

    # ---- finish (rank 0): the policy in plain transformers format, in its checkpoint's dtype
    weights = dist.model_state(model) if dist.sharded else None  # FSDP: gathered to rank 0
    if not dist.is_main:
        dist.barrier()  # until rank 0 has saved
        return SFTResult(str(output_dir), {}, steps=done, total_steps=total_steps)
    metrics: dict[str, float] = {
        "eval_loss": last_eval.get("loss", float("nan")),
        "eval_perplexity": last_eval.get("perplexity", float("nan")),
        "eval_tokens": last_eval.get("tokens", 0),
        "eval_loss_before": before.get("loss", float("nan")),
        "eval_perplexity_before": before.get("perplexity", float("nan")),
        "train_loss": totals["loss_sum"] / max(totals["loss_steps"], 1),
        "train_examples": len(train_data),
        "eval_examples": len(eval_data),
        "train_rows": len(units),
        # packed: the share of each row's max_length that holds tokens
        "packing_fill": (
            sum(lengths) / (len(units) * config.max_length) if config.packing else float("nan")
        ),
        "tokens_per_second": totals["tokens"] / max(totals["seconds"], 1e-9),
        "train_seconds": totals["seconds"],
        "steps": done,
    }
    meta = {"format": "prefloop-sft/1", "config": asdict(config), "metrics": metrics}
    save_policy(model, tokenizer, output_dir, saved_dtype, checkpointing, META_FILE, meta, weights)
    dist.barrier()
    on_progress(1.0, "done")
    return SFTResult(
        output_dir=str(output_dir),
        metrics=metrics,
        stopped=False,
        steps=done,
        total_steps=total_steps,
        history=history,
    )
