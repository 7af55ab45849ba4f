"""Supervised fine-tuning (trainer/sft.py) on a tiny Llama built from config: the loss covers
completion tokens only (with and without a chat template), truncation keeps the completion,
packed examples never see each other, the loss goes down, and a stopped run resumes to the
same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.tiny_models import causal_lm, tokenizer_for  # noqa: E402
from trainer.sft import (  # noqa: E402
    IGNORE_INDEX,
    META_FILE,
    SFTConfig,
    SFTExample,
    SFTFormatter,
    collate,
    collate_packed,
    fit,
    pack,
    packing_is_exact,
    token_loss_sum,
    train,
)

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
]


def demonstrations(n: int, offset: int = 0) -> list[SFTExample]:
    """Question n is answered by a fixed pattern of words, learnable from the prompt."""
    out = []
    for i in range(offset, offset + n):
        word = WORDS[i % len(WORDS)]
        nxt = WORDS[(i + 1) % len(WORDS)]
        out.append(SFTExample(f"say {word} please", f"{word} {nxt} {word} {nxt}", f"p{i}"))
    return out


def vocabulary() -> list[str]:
    return [" ".join(WORDS), "say please User : Assistant : long prompt words here"]


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_for(vocabulary())


@pytest.fixture(scope="module")
def plain_tokenizer():
    tok = tokenizer_for(vocabulary())
    tok.chat_template = None
    return tok


@pytest.fixture(scope="module")
def policy(tmp_path_factory, tokenizer) -> str:
    folder = tmp_path_factory.mktemp("policy")
    causal_lm(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def config(policy: str, **overrides) -> SFTConfig:
    settings = {
        "model_name_or_path": policy,
        "max_length": 48,
        "batch_size": 4,
        "learning_rate": 5e-3,
        "warmup_ratio": 0.0,
        "epochs": 3,
        "logging_steps": 1,
    }
    return SFTConfig(**(settings | overrides))


def targets(example) -> list[int]:
    return [t for t in example.labels if t != IGNORE_INDEX]


# --- formatting and the label mask ------------------------------------------------------------


def test_without_a_template_the_labels_are_the_completion_and_eos(plain_tokenizer):
    tok = plain_tokenizer
    encoded = SFTFormatter(tok, 64).encode("say alpha please", "alpha beta")
    ids = tok("alpha beta", add_special_tokens=False)["input_ids"]
    assert targets(encoded) == [*ids, tok.eos_token_id]
    prompt = tok("say alpha please", add_special_tokens=False)["input_ids"]
    assert encoded.input_ids == [*prompt, *ids, tok.eos_token_id]
    assert encoded.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    # a chat prompt without a template is written out as the generate job writes it
    chat = SFTFormatter(tok, 64).encode([{"role": "user", "content": "say beta"}], "beta")
    head = tok.decode(chat.input_ids[: chat.prompt_length])
    assert head.startswith("User") and head.endswith("Assistant :")
    assert targets(chat) == [*tok("beta", add_special_tokens=False)["input_ids"], tok.eos_token_id]


def test_with_the_chat_template_only_the_assistant_turn_is_a_target(tokenizer):
    formatter = SFTFormatter(tokenizer, 64)
    messages = [{"role": "user", "content": "say alpha please"}]
    encoded = formatter.encode(messages, "alpha beta")
    # the target is the assistant's words and the template's end of turn, nothing else
    assert tokenizer.decode(targets(encoded)) == "alpha beta <eos>"
    rendered = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": "alpha beta"}], tokenize=False
    )
    assert encoded.input_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    head = tokenizer.decode(encoded.input_ids[: encoded.prompt_length])
    assert head == "<user> say alpha please <eos> <assistant>"
    # a text prompt is one user turn, as the generate job samples it
    assert formatter.encode("say alpha please", "alpha beta").input_ids == encoded.input_ids


def test_padding_and_prompts_are_masked_in_a_batch(tokenizer):
    formatter = SFTFormatter(tokenizer, 64)
    a = formatter.encode("say alpha please", "alpha")
    b = formatter.encode("say beta please", "beta gamma delta epsilon")
    batch = collate([a, b], tokenizer.pad_token_id)
    assert batch.input_ids.shape == (2, b.length)
    assert (batch.labels[0, a.length :] == IGNORE_INDEX).all()
    assert (batch.attention_mask[0, a.length :] == 0).all()
    assert batch.num_targets == a.targets + b.targets == int((batch.labels != IGNORE_INDEX).sum())


def test_truncation_cuts_the_prompt_first_and_keeps_the_completion():
    prompt, completion = list(range(100, 120)), list(range(10))
    assert fit(prompt, completion, 40, 4) == (prompt, completion)
    p, c = fit(prompt, completion, 15, 4)
    assert c == completion and p == prompt[-5:]  # the prompt's end, the completion whole
    p, c = fit(prompt, list(range(30)), 16, 4)
    assert p == prompt[-4:] and c == list(range(12))  # the completion's start, a bit of prompt
    p, c = fit(prompt, list(range(30)), 6, 64)
    assert len(p) == 3 and len(c) == 3  # never more than half the room for the prompt
    p, c = fit(prompt, list(range(14)), 16, 4)  # it would fit alone: the prompt floor holds
    assert p == prompt[-4:] and c == list(range(12))


def test_a_cut_completion_loses_its_eos(plain_tokenizer):
    tok = plain_tokenizer
    long = " ".join(WORDS * 4)
    encoded = SFTFormatter(tok, 20, min_prompt_tokens=2).encode("say alpha please", long)
    assert encoded.length == 20 and encoded.prompt_length == 2
    assert tok.eos_token_id not in encoded.input_ids
    short = SFTFormatter(tok, 20).encode("long prompt words here " * 5, "alpha")
    assert short.length == 20 and short.input_ids[-1] == tok.eos_token_id
    assert targets(short)[0] == tok.convert_tokens_to_ids("alpha")


# --- packing ------------------------------------------------------------------------------------


def test_pack_fills_rows_without_splitting_an_example():
    lengths = [7, 3, 5, 2, 9, 4, 1, 6]
    rows = pack(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 4  # 37 tokens in rows of 10: as few as possible
    assert pack(lengths, 10) == rows  # deterministic


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_examples_do_not_attend_to_each_other(tokenizer, policy, attention):
    """A packed row gives every example exactly the logits it gets alone: position ids
    restart at each example and transformers masks attention across them (in training, with
    no KV cache: a cache turns the detection off)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(policy, attn_implementation=attention).eval()
    formatter = SFTFormatter(tokenizer, 64)
    examples = [formatter.encode(e.prompt, e.completion) for e in demonstrations(3)]
    row = collate_packed([examples], tokenizer.pad_token_id)
    assert row.attention_mask is None
    starts = [0, examples[0].length, examples[0].length + examples[1].length]
    assert all(row.position_ids[0, s] == 0 for s in starts)
    # the first token of each packed example is never a target (no prediction across the seam)
    assert all(row.labels[0, s] == IGNORE_INDEX for s in starts)
    with torch.no_grad():
        together = model(**row.model_inputs(), use_cache=False).logits[0]
        for start, e in zip(starts, examples, strict=True):
            alone = model(input_ids=torch.tensor([e.input_ids])).logits[0]
            torch.testing.assert_close(together[start : start + e.length], alone)
        # the control: without the restarts the second example sees the first
        leaky = model(input_ids=row.input_ids, use_cache=False).logits[0]
        second = slice(starts[1], starts[1] + examples[1].length)
        assert not torch.allclose(leaky[second], together[second], atol=1e-3)
    assert packing_is_exact(model, examples, torch.device("cpu"), tokenizer.pad_token_id)
    # the packed loss is the sum of the examples' losses
    total = token_loss_sum(together.unsqueeze(0), row.labels)
    with torch.no_grad():
        parts = sum(
            token_loss_sum(
                model(input_ids=torch.tensor([e.input_ids])).logits, torch.tensor([e.labels])
            )
            for e in examples
        )
    torch.testing.assert_close(total, parts)


# --- training -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(policy, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    metrics: list[tuple[int, str, float]] = []
    result = train(
        config(policy, learning_rate=2e-2, epochs=4),
        demonstrations(24),
        demonstrations(6, offset=24),
        out,
        on_metric=lambda s, n, v: metrics.append((s, n, v)),
    )
    return result, out, metrics


def test_the_loss_goes_down_and_the_metrics_are_reported(trained):
    result, out, metrics = trained
    assert not result.stopped and result.steps == result.total_steps == 4 * 6
    names = {name for _, name, _ in metrics}
    assert {
        "train/loss",
        "train/learning_rate",
        "train/tokens_per_second",
        "eval/loss",
        "eval/perplexity",
    } <= names
    losses = [v for _, n, v in metrics if n == "train/loss"]
    assert losses[-1] < losses[0] * 0.7
    m = result.metrics
    assert m["eval_loss"] < m["eval_loss_before"]
    assert m["eval_perplexity"] == pytest.approx(float(torch.tensor(m["eval_loss"]).exp()))
    meta = json.loads((out / META_FILE).read_text())
    assert meta["format"] == "prefloop-sft/1" and meta["config"]["epochs"] == 4
    assert not (out / "checkpoint").exists()


def test_the_saved_policy_loads_with_plain_transformers(trained, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out, _ = trained
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.eos_token == "<eos>"
    assert model.config.use_cache


def test_packing_trains_too(policy, tmp_path):
    result = train(
        config(policy, packing=True, batch_size=2),
        demonstrations(24),
        demonstrations(6, offset=24),
        tmp_path / "packed",
    )
    m = result.metrics
    assert m["train_rows"] < m["train_examples"] and 0.5 < m["packing_fill"] <= 1.0
    assert m["eval_loss"] < m["eval_loss_before"]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


@pytest.mark.parametrize("packing", [False, True])
def test_stop_then_resume_gives_the_same_weights(policy, tmp_path, packing):
    rows = 1 if packing else 2  # 16 examples pack into about 5 rows of 48 tokens
    settings = config(policy, packing=packing, epochs=2, grad_accumulation_steps=2, batch_size=rows)
    data, held = demonstrations(16), demonstrations(4, offset=16)
    straight = train(settings, data, held, tmp_path / "straight")
    calls = {"n": 0}

    def stop_after_three() -> bool:
        calls["n"] += 1
        return calls["n"] == 4

    out = tmp_path / "resumed"
    stopped = train(settings, data, held, out, should_stop=stop_after_three)
    assert stopped.stopped and stopped.steps == 3 and (out / "checkpoint" / "state.pt").exists()
    resumed = train(settings, data, held, out)
    assert not resumed.stopped and resumed.steps == straight.steps
    a, b = weights(tmp_path / "straight"), weights(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics["eval_loss"] == straight.metrics["eval_loss"]
    # another config on the same folder is refused, not mixed in
    train(settings, data, held, tmp_path / "other", should_stop=lambda: True)
    with pytest.raises(ValueError, match="another config"):
        train(config(policy, learning_rate=1e-3), data, held, tmp_path / "other")


def test_gradient_accumulation_equals_one_large_batch(policy, tmp_path):
    """Token-weighted: two micro-batches of 2 make the step one batch of 4 makes."""
    data = demonstrations(8)
    one = train(
        config(policy, batch_size=4, epochs=1, group_by_length=False), data, [], tmp_path / "a"
    )
    two = train(
        config(policy, batch_size=2, grad_accumulation_steps=2, epochs=1, group_by_length=False),
        data,
        [],
        tmp_path / "b",
    )
    assert one.steps == two.steps == 2
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    # different batch orders would differ; the same order of 4 split in 2 + 2 does not
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_bad_configs_are_refused(policy, tmp_path):
    with pytest.raises(ValueError, match="lr_scheduler"):
        SFTConfig(model_name_or_path=policy, lr_scheduler="step")
    with pytest.raises(ValueError, match="no training"):
        train(config(policy), [], [], tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_bf16_and_checkpointing_train_too(policy, tmp_path):
    """bf16 autocast and gradient checkpointing are on by default with CUDA; packing's probe
    passes on the GPU's attention kernels too."""
    result = train(
        config(policy, packing=True, batch_size=2),
        demonstrations(24),
        demonstrations(6, offset=24),
        tmp_path / "gpu",
        device="cuda",
    )
    m = result.metrics
    assert m["eval_loss"] < m["eval_loss_before"]
    meta = json.loads((tmp_path / "gpu" / META_FILE).read_text())
    assert meta["config"]["bf16"] is None and meta["config"]["gradient_checkpointing"] is None


def test_gradient_checkpointing_changes_nothing_but_memory(policy, tmp_path):
    data = demonstrations(8)
    settings = {"epochs": 1, "batch_size": 4, "packing": True}
    train(config(policy, **settings), data, [], tmp_path / "plain")
    train(config(policy, gradient_checkpointing=True, **settings), data, [], tmp_path / "ckpt")
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "ckpt")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
