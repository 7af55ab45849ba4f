"""Backbones with a scalar head, and reading the reward at the last real token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

HEAD_FILE = "reward_head.pt"


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state (N, H) at each sequence's last real token.

    The position comes from the attention mask, never from the pad id: when pad == eos the
    real final eos would otherwise be mistaken for padding. Works for left or right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # (T,)
    last = (positions * attention_mask).argmax(dim=1)  # (N,) rightmost position with mask 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere, nn.Dropout modules and the attention's own probability
    (Llama, Qwen2): PPO's old log-probs and DPO's reference come from forward passes, so
    any noise makes the ratio != 1 before the policy has moved (Huang et al.)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward (non-reentrant, as PyTorch recommends)."""
    if isinstance(model, ScalarHeadModel):
        model = model.backbone
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class ScalarHeadModel(nn.Module):
    """A causal LM's body with a linear head, for architectures transformers has no
    ...ForSequenceClassification class for. Saved as the body's save_pretrained plus
    `reward_head.pt`."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        hidden = self.config.get_text_config().hidden_size
        self.score = nn.Linear(hidden, 1, bias=False)
        nn.init.normal_(self.score.weight, std=1 / (hidden + 1) ** 0.5)

    @property
    def base_model(self) -> nn.Module:
        return self.backbone

    def save_pretrained(self, directory: str | Path, **kwargs: Any) -> None:
        self.backbone.save_pretrained(directory, **kwargs)
        torch.save(self.score.state_dict(), Path(directory) / HEAD_FILE)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs: Any) -> ScalarHeadModel:
        from transformers import AutoModel

        model = cls(AutoModel.from_pretrained(directory, **kwargs))
        head = Path(directory) / HEAD_FILE
        if head.exists():
            model.score.load_state_dict(torch.load(head, map_location="cpu", weights_only=True))
        return model


def reads_last_token(model: nn.Module) -> bool:
    """True for decoder classifiers (Llama, Qwen, GPT-2, ...: a `score` head over the base
    model's hidden states). Encoders like BERT pool their [CLS] token themselves."""
    return isinstance(getattr(model, "score", None), nn.Linear) and model.base_model is not model


def compute_rewards(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """One scalar reward per sequence, (N,) float32, from (N, T) ids and mask."""
    if reads_last_token(model):
        hidden = model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state  # (N, T, H)
        # The head sees one position per sequence instead of all T of them.
        pooled = last_token_pool(hidden, attention_mask)  # (N, H)
        return model.score(pooled).squeeze(-1).float()
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()


def _has_linear_head(path: str | Path) -> bool:
    return (Path(path) / HEAD_FILE).exists()


def load_reward_model(
    path: str | Path, *, linear_head: bool | None = None, **kwargs: Any
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for a reward model or a backbone to train into one.

    A sequence classifier with one output where transformers has the class; otherwise a
    causal LM body with `ScalarHeadModel`'s linear head (linear_head=True forces it). The
    tokenizer gets pad = eos when it has no pad token."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = AutoConfig.from_pretrained(path)
    if linear_head is None:
        kind = config.model_type
        has_classifier = kind in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
        linear_head = _has_linear_head(path) or (
            not has_classifier and kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        )
    if linear_head:
        model = ScalarHeadModel.from_pretrained(path, **kwargs)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
    text_config = model.config.get_text_config()
    if text_config.pad_token_id is None:
        text_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
