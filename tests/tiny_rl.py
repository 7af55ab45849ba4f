"""The task the PPO and RLOO tests (tests/test_ppo.py, tests/test_rloo.py) train on, and the
steps both take: a one-layer Llama over ~25 weather words (tests/tiny_models.py), prompts, a
reward for saying "sunny", a stop request, the saved weights and the saved policy's samples.

The reward: 1 when the response contains the word "sunny", else 0. A random policy says it in
about a quarter of 8-token responses. `characters` is a dense one, for tests of one update.
Helpers return what they found; the tests assert.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.tiny_models import causal_lm, tokenizer_for

FILLER = ["rain", "cloud", "wind", "cold", "grey", "fog", "storm", "hail", "mist", "wet", "dark"]
TARGET = "sunny"
PROMPTS = [f"tell me about the weather topic{i}" for i in range(7)]


def vocabulary() -> list[str]:
    return [*FILLER, TARGET, "tell me about the weather please", *(f"topic{i}" for i in range(7))]


def says_sunny(prompts: list, responses: list[str]) -> Any:
    import torch

    return torch.tensor([float(TARGET in r.split()) for r in responses])


def characters(prompts: list, responses: list[str]) -> Any:
    """A dense reward: every response's length tells, so every response has an advantage."""
    import torch

    return torch.tensor([len(r) / 10 for r in responses])


def series(history: list[tuple[int, str, float]], name: str) -> list[float]:
    return [value for _, n, value in history if n == name]


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny models: threads only contend (2 shared cores); results do not depend on it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def save_tiny_policy(path: Path) -> Path:
    """The initial policy, a random one-layer Llama on the vocabulary, saved in `path`."""
    tokenizer = tokenizer_for(vocabulary())
    causal_lm(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def train_recording(
    train: Callable[..., Any], config: Any, out: Path, **kwargs: Any
) -> tuple[Any, list[tuple[int, str, float]], list[float]]:
    """(result, every metric as (step, name, value), every progress fraction) of a run on
    PROMPTS in `out`."""
    seen: list[tuple[int, str, float]] = []
    progress: list[float] = []
    result = train(
        config,
        PROMPTS,
        out,
        on_metric=lambda step, name, value: seen.append((step, name, value)),
        on_progress=lambda fraction, message: progress.append(fraction),
        **kwargs,
    )
    return result, seen, progress


def stop_at_ask(n: int) -> Callable[[], bool]:
    """A should_stop that says True the n-th time a run asks it: before step n."""
    asked = {"n": 0}

    def should_stop() -> bool:
        asked["n"] += 1
        return asked["n"] == n

    return should_stop


def resume_refusal(
    train: Callable[..., Any], config: Any, other: Any, out: Path, **kwargs: Any
) -> str:
    """Start `config` in `out` and stop it at once (it leaves a checkpoint), then call `train`
    with `other` there: the ValueError's message ("" when it resumed without one)."""
    train(config, PROMPTS, out, should_stop=lambda: True, **kwargs)
    try:
        train(other, PROMPTS, out, should_stop=lambda: True, **kwargs)
    except ValueError as error:
        return str(error)
    return ""


# AdamW with a large epsilon takes a first step linear in the gradient (not ~ lr * its sign),
# and no clipping keeps its scale: a mis-weighted gradient accumulation shows in the weights.
LINEAR_ADAMW = {"adam_eps": 10.0, "learning_rate": 1.0, "max_grad_norm": 1e9}


def update_two_ways(
    train: Callable[..., Any], plain: Any, accumulated: Any, out: Path
) -> tuple[dict[str, Any], dict[str, Any], dict[str, float], dict[str, float]]:
    """The weights after the run of `plain` and after that of `accumulated` (the same run in
    micro-batches), both on the dense reward `characters`, and the two runs' last metrics."""
    first = train(plain, PROMPTS, out / "plain", reward_fn=characters, device="cpu")
    second = train(accumulated, PROMPTS, out / "micro", reward_fn=characters, device="cpu")
    return weights(out / "plain"), weights(out / "micro"), first.metrics, second.metrics


def weights(folder: Path) -> dict[str, Any]:
    """The saved model's tensors by name."""
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def sunny_samples(folder: Path, n: int = 16) -> int:
    """How many of n samples (seeded, 8 tokens) of the saved policy to PROMPTS[0] say the
    word; the folder loads as a plain causal LM."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.rollout import encode_prompt

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([encode_prompt(tokenizer, PROMPTS[0], 64)])
    torch.manual_seed(1)
    sampled = model.generate(ids, do_sample=True, max_new_tokens=8, num_return_sequences=n)
    texts = tokenizer.batch_decode(sampled[:, ids.shape[1] :], skip_special_tokens=True)
    return sum(TARGET in t.split() for t in texts)
