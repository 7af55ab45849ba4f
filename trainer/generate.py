"""Sampling completions from a causal language model, and keeping only distinct ones.

    sampler = HFSampler("/data/models/sft-1", device="cuda")
    groups = sampler.sample(["Why is the sky blue?"], n=4, temperature=0.7, top_p=0.9)

Prompts are batched with **left** padding (every prompt ends where generation starts, so the
new tokens of each row line up) and decoded with the KV cache by `model.generate`. A chat
prompt, or a text prompt when the tokenizer has a chat template, goes through the template
with the generation prompt added (the template brings its own special tokens); without a
template, a text prompt gets the tokenizer's BOS and a chat prompt is written out as
"User: ...\n\nAssistant:" (`encode_prompt`, the format SFT trains and PPO/RLOO sample in).
Sampling is exactly softmax(logits / T) with top-p (`sampling_config`: no top-k, no
repetition penalty, whatever the model's generation_config.json says). Each row stops at
EOS (the tokenizer's and the model's generation config's); the EOS and the padding after it
are cut off. bf16 on a GPU that supports it, fp32 elsewhere. Each text is a `SampledText`,
which keeps the token ids it was decoded from, so a sample's log-probs are taken on what was
sampled (trainer/policy_eval.py) rather than on its text tokenized again.

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


class SampledText(str):
    """A completion's text as stored (decoded, stripped) that keeps `tokens`: the ids the
    policy sampled, its stop token included when it stopped at one."""

    tokens: tuple[int, ...]

    def __new__(cls, text: str, tokens: Sequence[int]) -> SampledText:
        made = super().__new__(cls, text)
        made.tokens = tuple(tokens)
        return made

    def __reduce__(self) -> tuple[type[SampledText], tuple[str, tuple[int, ...]]]:
        return SampledText, (str(self), self.tokens)  # copied and pickled with its ids


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


def leading_special_tokens(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text (BOS, for most), which a prompt
    keeps through truncation."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    return list(full[: full.index(plain[0])]) if plain and plain[0] in full else []


def encode_prompt(tokenizer: Any, prompt: Prompt, max_tokens: int) -> list[int]:
    """The token ids a policy continues, one format for every sampler and trainer (the
    generate job, PPO and RLOO, and SFT's `SFTFormatter`): the chat template with the
    generation prompt when the tokenizer has one, else the prompt as plain text (`as_text`)
    after the tokenizer's leading special tokens. A long prompt loses its start (the turn
    being answered is at the end), never its leading BOS."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            as_messages(prompt), tokenize=False, add_generation_prompt=True
        )
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        bos = tokenizer.bos_token_id
        prefix = ids[:1] if bos is not None and ids[:1] == [bos] else []
        body = ids[len(prefix) :]
    else:
        prefix = leading_special_tokens(tokenizer)
        body = list(tokenizer(as_text(prompt), add_special_tokens=False)["input_ids"])
    keep = max(max_tokens - len(prefix), 1)
    return prefix + body[-keep:]


def stop_token_ids(tokenizer: Any, generation_config: Any | None) -> list[int]:
    """Every token id that ends a response: the tokenizer's EOS and the model's own
    generation config's (chat models end a turn with one of their own: Qwen's <|im_end|>,
    Llama 3's <|eot_id|>)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(generation_config, "eos_token_id", None)
    ids |= set(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def sampling_config(
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
) -> Any:
    """Sample from exactly softmax(logits / T) truncated to top-p (greedy at temperature 0),
    stopping at any of `stop_ids`: every other processor is off, so neither the library's
    defaults (top_k=50) nor a model's generation_config.json (a top_k, a repetition penalty)
    changes the distribution behind the caller's back."""
    from transformers import GenerationConfig

    sampled = temperature > 0
    return GenerationConfig(
        do_sample=sampled,
        temperature=temperature if sampled else 1.0,
        top_p=top_p if sampled else 1.0,
        top_k=0,
        min_p=None,
        typical_p=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
        use_cache=True,
    )


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
        self.eos_ids = stop_token_ids(self.tokenizer, self.model.generation_config)

    def encode(self, prompt: Prompt) -> list[int]:
        """A prompt's token ids, its start cut when it is longer than max_prompt_tokens."""
        return encode_prompt(self.tokenizer, prompt, self.max_prompt_tokens)

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
        generation = sampling_config(
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            stop_ids=self.eos_ids,
            pad_id=pad,
        )
        if seed is not None:
            torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=generation
            )
        new = out[:, width:].tolist()  # (B*n, <= max_new_tokens): the generated tokens
        return [
            [self._finish(tokens) for tokens in new[i * n : (i + 1) * n]]
            for i in range(len(prompts))
        ]

    def _finish(self, tokens: list[int]) -> tuple[str, str]:
        """The tokens before the first EOS, decoded (keeping the sampled ids, the EOS with
        them), and why generation stopped."""
        stop = next((j for j, t in enumerate(tokens) if t in self.eos_ids), None)
        kept = tokens[:stop] if stop is not None else tokens
        text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
        sampled = tokens[: stop + 1] if stop is not None else tokens
        return SampledText(text, sampled), ("stop" if stop is not None else "length")


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
