"""Tiny Hugging Face models and a tokenizer built on the spot: no model hub, a second on CPU.

The tokenizer is a word-level vocabulary trained on the texts a test will feed it, with pad,
eos and bos tokens and a minimal chat template (so TRL's conversational formats work); the
models are one-layer Llama configurations sized to it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}<{{ message['role'] }}> {{ message['content'] }} <eos> "
    "{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"
)


def tokenizer_for(texts: Iterable[str]) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    vocabulary = Tokenizer(models.WordLevel(unk_token="<unk>"))
    vocabulary.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<unk>", "<pad>", "<eos>", "<bos>", "<user>", "<assistant>", "<system>"]
    vocabulary.train_from_iterator(
        list(texts), trainers.WordLevelTrainer(special_tokens=specials, min_frequency=1)
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=vocabulary,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def llama_config(tokenizer: Any, **overrides: Any) -> Any:
    from transformers import LlamaConfig

    settings = {
        "vocab_size": len(tokenizer),
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    return LlamaConfig(**(settings | overrides))


def reward_model(tokenizer: Any, seed: int = 0) -> Any:
    import torch
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    return LlamaForSequenceClassification(llama_config(tokenizer, num_labels=1))


def causal_lm(tokenizer: Any, seed: int = 0) -> Any:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(tokenizer))
