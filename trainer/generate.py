"""Sampling completions from a causal language model, and keeping only distinct ones.

    sampler = HFSampler("/data/models/sft-1", device="cuda")
    groups = sampler.sample(["Why is the sky blue?"], n=4, temperature=0.7, top_p=0.9)

Prompts are batched with **left** padding (every prompt ends where generation starts, so the
new tokens of each row line up) and decoded with the KV cache by `model.generate`. A chat
prompt, or a text prompt when the tokenizer has a chat template, goes through the template
with the generation prompt added (the template brings its own special tokens); without a
template, a text prompt gets the tokenizer's BOS and a chat prompt is written out as
"User: ...\n\nAssistant:". Each row stops at EOS (the tokenizer's and the model's generation
config's); the EOS and the padding after it are cut off. bf16 on a GPU that supports it,
fp32 elsewhere.

`sample_distinct` asks any sampler (this one, or an OpenAI-compatible endpoint) for K
completions per prompt and re-samples those whose content hash repeats another of the
prompt's (new or already stored), up to a number of rounds.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Prompt = str | list[dict[str, Any]]
# sampler(prompts, n, round) -> for each prompt, n (text, finish_reason) pairs
Sampler = Callable[[Sequence[Prompt], int, int], list[list[tuple[str, str]]]]


def text_hash(text: str) -> str:
    """The same sha256 as app.labeling.importer.completion_hash (a completion's content hash)."""
    return hashlib.sha256(text.encode()).hexdigest()


def as_messages(prompt: Prompt) -> list[dict[str, Any]]:
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def as_text(prompt: Prompt) -> str:
    """A chat prompt as plain text, for a model or endpoint that has no chat template."""
    if isinstance(prompt, str):
        return prompt
    turns = [f"{m['role'].capitalize()}: {m['content']}" for m in prompt]
    return "\n\n".join([*turns, "Assistant:"])


class HFSampler:
    """A Hugging Face causal LM on one device, sampling batches of prompts."""

    def __init__(self, path: str | Path, device: str = "cpu", *, max_prompt_tokens: int = 1024):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:  # many causal LMs ship without one
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        self.model.to(self.device).eval()
        self.max_prompt_tokens = max_prompt_tokens
        self.chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        ids = {self.tokenizer.eos_token_id}
        configured = self.model.generation_config.eos_token_id
        ids |= set(configured if isinstance(configured, list) else [configured])
        self.eos_ids = sorted(i for i in ids if i is not None)

    def encode(self, prompt: Prompt) -> list[int]:
        """A prompt's token ids, its start cut when it is longer than max_prompt_tokens."""
        if self.chat_template:
            text = self.tokenizer.apply_chat_template(
                as_messages(prompt), tokenize=False, add_generation_prompt=True
            )
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(as_text(prompt), add_special_tokens=True)["input_ids"]
        return list(ids[-self.max_prompt_tokens :])

    def sample(
        self,
        prompts: Sequence[Prompt],
        n: int = 1,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        seed: int | None = None,
    ) -> list[list[tuple[str, str]]]:
        """n completions of each prompt as (text, finish_reason): "stop" at EOS, "length" when
        max_new_tokens ran out. temperature 0 decodes greedily."""
        import torch

        if not prompts:
            return []
        encoded = [self.encode(p) for p in prompts]
        width = max(len(ids) for ids in encoded)
        pad = self.tokenizer.pad_token_id
        rows = [[pad] * (width - len(ids)) + ids for ids in encoded for _ in range(n)]
        mask = [[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded for _ in range(n)]
        input_ids = torch.tensor(rows, device=self.device)  # (B*n, T), left padded
        attention_mask = torch.tensor(mask, device=self.device)  # (B*n, T), 0 on the padding
        options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "use_cache": True}
        if temperature > 0:
            options |= {"do_sample": True, "temperature": temperature, "top_p": top_p}
        else:
            options |= {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if seed is not None:
            torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                eos_token_id=self.eos_ids,
                pad_token_id=pad,
                **options,
            )
        new = out[:, width:].tolist()  # (B*n, <= max_new_tokens): the generated tokens
        return [
            [self._finish(tokens) for tokens in new[i * n : (i + 1) * n]]
            for i in range(len(prompts))
        ]

    def _finish(self, tokens: list[int]) -> tuple[str, str]:
        """The tokens before the first EOS, decoded, and why generation stopped."""
        stop = next((j for j, t in enumerate(tokens) if t in self.eos_ids), None)
        kept = tokens[:stop] if stop is not None else tokens
        text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
        return text, ("stop" if stop is not None else "length")


@dataclass
class Distinct:
    """sample_distinct's answer: per prompt, up to K new (text, finish_reason) pairs."""

    completions: list[list[tuple[str, str]]]
    sampled: int = 0  # every completion the sampler returned
    duplicates: int = 0  # thrown away as a repeat (or empty) and sampled again
    rounds: int = 0  # re-sampling rounds run after the first
    seconds: float = 0.0
    short: list[int] = field(default_factory=list)  # prompts left with fewer than K


def sample_distinct(
    sampler: Sampler,
    prompts: Sequence[Prompt],
    k: int,
    *,
    existing: Sequence[set[str]] | None = None,
    max_rounds: int = 4,
) -> Distinct:
    """K completions per prompt whose content hashes differ from each other and from the
    prompt's `existing` ones. Repeats and empty texts are dropped and sampled again (only
    for the prompts that still lack some), at most `max_rounds` more times."""
    start = time.perf_counter()
    seen = [set(s) for s in existing] if existing is not None else [set() for _ in prompts]
    kept: list[list[tuple[str, str]]] = [[] for _ in prompts]
    result = Distinct(completions=kept)
    for round_number in range(max_rounds + 1):
        missing = [i for i in range(len(prompts)) if len(kept[i]) < k]
        if not missing:
            break
        if round_number:
            result.rounds += 1
        # Each prompt asks for what it still lacks; prompts lacking as many go together, so
        # the first round is one call for the whole batch.
        by_need: dict[int, list[int]] = {}
        for i in missing:
            by_need.setdefault(k - len(kept[i]), []).append(i)
        for need, indexes in sorted(by_need.items()):
            answers = sampler([prompts[i] for i in indexes], need, round_number)
            for i, group in zip(indexes, answers, strict=True):
                for text, reason in group:
                    result.sampled += 1
                    digest = text_hash(text)
                    if not text.strip() or digest in seen[i] or len(kept[i]) >= k:
                        result.duplicates += 1
                        continue
                    seen[i].add(digest)
                    kept[i].append((text, reason))
    result.short = [i for i in range(len(prompts)) if len(kept[i]) < k]
    result.seconds = time.perf_counter() - start
    return result
