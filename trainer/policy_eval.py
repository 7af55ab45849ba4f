"""What a policy's samples say about it: the reward model's score and the log-ratio to a
reference policy, per sample (the generation job stores both on each completion).

The KL of a policy from its reference is estimated from its own samples, as in PPO (the
k1 estimator): KL(pi || ref) = E_{y ~ pi}[log pi(y|x) - log ref(y|x)]. Both log-probs are
taken with the logits divided by the sampling temperature, since that is the distribution
the samples came from; with top-p < 1 the estimate ignores the truncation. A sample is
scored on the token ids the policy sampled (`generate.SampledText`, which the sampler
returns), not on its stored text tokenized again: a BPE tokenizer can split the text
otherwise (the leading space the stored text lost, a merge), and the log-ratio would then be
of another sequence than the one drawn. A plain string (no ids) is tokenized, its EOS added
when it stopped at one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from trainer.generate import HFSampler, Prompt, SampledText
from trainer.rollout import left_pad, response_logprobs, reward_model_function


class SampleEvaluator:
    """Scores (prompt, sample) pairs: `reward` with a reward model, `log_ratio` of the policy
    against a reference policy that shares its tokenizer, `tokens` of the sample."""

    def __init__(
        self,
        policy: HFSampler,
        *,
        reward_model: str | Path | None = None,
        reference: str | Path | None = None,
        temperature: float = 1.0,
        batch_size: int = 8,
    ) -> None:
        from transformers import AutoModelForCausalLM

        self.policy = policy
        self.temperature = temperature if temperature > 0 else 1.0
        self.batch_size = batch_size
        # Raw scores, not whitened: versions are compared under one reward model.
        self.scorer = (
            reward_model_function(reward_model, policy.device, normalize=False)
            if reward_model
            else None
        )
        self.reference = None
        if reference is not None:
            dtype = next(policy.model.parameters()).dtype
            self.reference = AutoModelForCausalLM.from_pretrained(str(reference), dtype=dtype)
            self.reference.to(policy.device).eval()

    def rewards(self, prompts: Sequence[Prompt], texts: Sequence[str]) -> list[float | None]:
        """The reward model's raw score of each text (None without a reward model)."""
        if self.scorer is None:
            return [None] * len(texts)
        return [float(x) for x in self.scorer(list(prompts), list(texts))]

    def _sequence_logprobs(
        self, model: Any, query_response: torch.Tensor, mask: torch.Tensor, P: int
    ) -> torch.Tensor:
        logprobs, _ = response_logprobs(model, query_response, mask, P, self.temperature)
        return (logprobs * mask[:, P:]).sum(dim=1)  # (B,)

    def log_ratios(
        self, prompts: Sequence[Prompt], texts: Sequence[str], stopped: Sequence[bool]
    ) -> list[tuple[float | None, int]]:
        """(log pi(y|x) - log ref(y|x), tokens of y) per sample; the EOS counts when the
        sample stopped at it. The log-ratio is None without a reference."""
        tokenizer = self.policy.tokenizer
        out: list[tuple[float | None, int]] = []
        for start in range(0, len(texts), self.batch_size):
            end = start + self.batch_size
            responses = []
            for text, stop in zip(texts[start:end], stopped[start:end], strict=True):
                if isinstance(text, SampledText):
                    responses.append(list(text.tokens))
                    continue
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                responses.append(ids + ([tokenizer.eos_token_id] if stop else []))
            if self.reference is None:
                out.extend((None, len(r)) for r in responses)
                continue
            queries = [self.policy.encode(p) for p in prompts[start:end]]
            query, query_mask = left_pad(queries, tokenizer.pad_token_id)  # (B, P)
            P = query.shape[1]
            R = max(max(len(r) for r in responses), 1)
            response = torch.full((len(responses), R), tokenizer.pad_token_id, dtype=torch.long)
            response_mask = torch.zeros((len(responses), R), dtype=torch.long)
            for row, ids in enumerate(responses):
                response[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                response_mask[row, : len(ids)] = 1
            query_response = torch.cat([query, response], 1).to(self.policy.device)  # (B, P+R)
            mask = torch.cat([query_mask, response_mask], 1).to(self.policy.device)  # (B, P+R)
            with torch.inference_mode():
                mine = self._sequence_logprobs(self.policy.model, query_response, mask, P)
                theirs = self._sequence_logprobs(self.reference, query_response, mask, P)
            for row, ids in enumerate(responses):
                out.append((float(mine[row] - theirs[row]), len(ids)))
        return out

    def evaluate(
        self, prompts: Sequence[Prompt], texts: Sequence[str], stopped: Sequence[bool]
    ) -> list[dict[str, Any]]:
        """Per sample: {"reward", "log_ratio", "tokens"} (None where not measured)."""
        rewards = self.rewards(prompts, texts)
        ratios = self.log_ratios(prompts, texts, stopped)
        return [
            {"reward": reward, "log_ratio": ratio, "tokens": tokens}
            for reward, (ratio, tokens) in zip(rewards, ratios, strict=True)
        ]
