"""Judgments in, padded token batches out: formatting, truncation and length-grouped batching.

Nothing here knows about the database: the caller hands over `RankingGroup`s.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from trainer.losses import batch_pair_indices

Prompt = str | list[dict[str, str]]


@dataclass
class RankingGroup:
    """One human judgment of K >= 2 completions of one prompt."""

    prompt: Prompt  # plain text, or chat messages [{"role": ..., "content": ...}, ...]
    completions: list[str]
    ranks: list[int]  # place of each completion, 0 = best; equal numbers are a tie
    margin: float | None = None  # how much better (K=2), Llama 2-style margin
    weight: float = 1.0  # per-labeler weight from the quality metrics
    prompt_key: str = ""  # identity of the prompt, for splits and grouping
    is_gold: bool = False

    def __post_init__(self) -> None:
        if len(self.completions) < 2:
            raise ValueError("a ranking needs at least two completions")
        if len(self.ranks) != len(self.completions):
            raise ValueError("ranks and completions differ in length")


@dataclass
class EncodedGroup:
    """A RankingGroup as token ids, one list per completion (prompt included)."""

    input_ids: list[list[int]]
    ranks: list[int]
    margin: float = 0.0
    weight: float = 1.0
    is_gold: bool = False
    prompt_key: str = ""

    @property
    def length(self) -> int:
        """The padded width this group needs."""
        return max(len(ids) for ids in self.input_ids)


def truncate(
    prompt_ids: list[int], completion_ids: list[int], budget: int
) -> tuple[list[int], list[int]]:
    """Fit prompt + completion into `budget` tokens, keeping the completion whole and the END
    of the prompt (the turn being answered). Only a completion longer than the whole budget
    loses its tail, and then no prompt is left."""
    if len(completion_ids) >= budget:
        return [], completion_ids[:budget]
    keep = budget - len(completion_ids)
    return prompt_ids[max(len(prompt_ids) - keep, 0) :], completion_ids


class RewardFormatter:
    """Turns (prompt, completion) into token ids the way the reward model reads them.

    With a chat template: the prompt messages plus an assistant turn holding the completion,
    rendered by the template (its own special tokens included). Without one: the tokenizer's
    usual special tokens around "prompt<separator>completion<eos>". Reading the reward at an
    end-of-sequence token gives the model a fixed place to summarise the whole answer."""

    def __init__(self, tokenizer: Any, max_length: int, separator: str = "\n\n") -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.separator = separator
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        # Which special tokens this tokenizer puts around a text (BOS, or [CLS] ... [SEP]):
        # they are added back after truncation so they are never cut.
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        full = tokenizer("a", add_special_tokens=True)["input_ids"]
        start = full.index(plain[0]) if plain and plain[0] in full else 0
        self.prefix = [] if self.chat else full[:start]
        self.suffix = [] if self.chat else full[start + len(plain) :]
        eos = tokenizer.eos_token_id
        if not self.chat and eos is not None and eos not in self.suffix:
            self.suffix = [*self.suffix, eos]
        self.budget = max_length - len(self.suffix)  # for the leading tokens and the text
        if self.budget - len(self.prefix) < 1:
            raise ValueError(f"max_length {max_length} leaves no room for text")

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @staticmethod
    def _messages(prompt: Prompt) -> list[dict[str, str]]:
        return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt

    def _plain_prompt(self, prompt: Prompt) -> str:
        if isinstance(prompt, str):
            return prompt + self.separator
        turns = [f"{m['role'].capitalize()}: {m['content']}" for m in prompt]
        return self.separator.join(turns) + self.separator + "Assistant: "

    def encode(self, prompt: Prompt, completions: Sequence[str]) -> list[list[int]]:
        """Token ids of prompt + each completion, truncated to max_length."""
        if self.chat:
            messages = self._messages(prompt)
            prompt_text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            prompt_ids = self._ids(prompt_text)
            pieces = []
            for completion in completions:
                full = self.tokenizer.apply_chat_template(
                    [*messages, {"role": "assistant", "content": completion}], tokenize=False
                )
                full_ids = self._ids(full)
                # The completion is whatever follows the longest shared token prefix: robust
                # to templates whose generation prompt differs slightly from the full render.
                n = 0
                while n < min(len(prompt_ids), len(full_ids)) and prompt_ids[n] == full_ids[n]:
                    n += 1
                # A template's leading BOS is kept through truncation, as SFT keeps it.
                bos = self.tokenizer.bos_token_id
                head = full_ids[:1] if n and bos is not None and full_ids[0] == bos else []
                pieces.append((head, full_ids[len(head) : n], full_ids[n:]))
        else:
            prompt_ids = self._ids(self._plain_prompt(prompt))
            pieces = [(self.prefix, prompt_ids, self._ids(c)) for c in completions]
        out = []
        for head, p, c in pieces:
            p, c = truncate(p, c, self.budget - len(head))
            out.append(head + p + c + self.suffix)
        return out

    def encode_group(self, group: RankingGroup) -> EncodedGroup:
        return EncodedGroup(
            input_ids=self.encode(group.prompt, group.completions),
            ranks=list(group.ranks),
            margin=float(group.margin or 0.0),
            weight=float(group.weight),
            is_gold=group.is_gold,
            prompt_key=group.prompt_key,
        )


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int, megabatch: int | None = 50
) -> list[list[int]]:
    """Batches of indices with similar lengths, in a seeded random order.

    Shuffle, cut into megabatches of `megabatch` batches, sort each by length, cut into
    batches, shuffle the batches: each batch pads to nearly its own length while the order
    stays random (the megabatch trick of fairseq and HF's group_by_length). megabatch=None:
    plain shuffled batches."""
    rng = random.Random(seed)  # noqa: S311 - data order, not secrets
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if megabatch is None:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    size = batch_size * megabatch
    batches = []
    for start in range(0, len(order), size):
        chunk = sorted(order[start : start + size], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


TENSOR_FIELDS = (
    "input_ids",
    "attention_mask",
    "better",
    "worse",
    "tie",
    "pair_group",
    "margins",
    "weights",
)


@dataclass
class Batch:
    """Padded completions of several groups plus their pairs, ready for the loss."""

    input_ids: torch.Tensor  # (N, T) right-padded
    attention_mask: torch.Tensor  # (N, T)
    better: torch.Tensor  # (P,)
    worse: torch.Tensor  # (P,)
    tie: torch.Tensor  # (P,) bool
    pair_group: torch.Tensor  # (P,)
    margins: torch.Tensor  # (P,)
    weights: torch.Tensor  # (G,)
    num_groups: int = 0
    num_tokens: int = 0  # real (unpadded) tokens

    def to(self, device: torch.device | str) -> Batch:
        tensors = {name: getattr(self, name).to(device) for name in TENSOR_FIELDS}
        return Batch(**tensors, num_groups=self.num_groups, num_tokens=self.num_tokens)


def collate(groups: Sequence[EncodedGroup], pad_token_id: int) -> Batch:
    """Right-pad every completion of `groups` to the batch's longest (dynamic padding)."""
    sequences = [ids for g in groups for ids in g.input_ids]
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    better, worse, tie, pair_group = batch_pair_indices([g.ranks for g in groups])
    margins = torch.tensor([g.margin for g in groups], dtype=torch.float)[pair_group]
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        better=better,
        worse=worse,
        tie=tie,
        pair_group=pair_group,
        margins=margins.masked_fill(tie, 0.0),
        weights=torch.tensor([g.weight for g in groups], dtype=torch.float),
        num_groups=len(groups),
        num_tokens=sum(len(ids) for ids in sequences),
    )
