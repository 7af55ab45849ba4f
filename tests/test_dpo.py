"""DPO (trainer/losses.py `dpo_loss`, trainer/dpo.py) on hand-made tensors and a tiny Llama
built from config: the loss on a hand-computed case, conservative DPO's smoothing, agreement
with TRL's DPOTrainer on the same batch, log-probs over completion tokens only, pairs
truncated alike, the implicit reward accuracy and margin rising in training, and a stopped run
resuming to the same weights without recomputing the reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.tiny_models import causal_lm, tokenizer_for  # noqa: E402
from trainer.dpo import (  # noqa: E402
    CHECKPOINT_DIR,
    META_FILE,
    REFERENCE_FILE,
    DPOConfig,
    DPOPair,
    completion_logps,
    encode_pair,
    forward_pairs,
    sequence_logps,
    train,
)
from trainer.losses import dpo_loss  # noqa: E402
from trainer.sft import IGNORE_INDEX, SFTFormatter  # noqa: E402

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


def pairs(n: int, offset: int = 0) -> list[DPOPair]:
    """The labelers prefer the prompt's word said twice to the word and another."""
    out = []
    for i in range(offset, offset + n):
        word, other = WORDS[i % len(WORDS)], WORDS[(i + 3) % len(WORDS)]
        out.append(DPOPair(f"say {word} please", f"{word} {word}", f"{word} {other}", f"p{i}"))
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_for([" ".join(WORDS), "say please User : Assistant : long prompt words"])


@pytest.fixture(scope="module")
def policy(tmp_path_factory, tokenizer) -> str:
    folder = tmp_path_factory.mktemp("dpo-policy")
    causal_lm(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def config(policy: str, **overrides) -> DPOConfig:
    settings = {
        "model_name_or_path": policy,
        "max_length": 32,
        "batch_size": 8,
        "learning_rate": 2e-2,
        "warmup_ratio": 0.0,
        "epochs": 10,
        "logging_steps": 1,
    }
    return DPOConfig(**(settings | overrides))


# --- the loss on hand-made tensors --------------------------------------------------------------


def test_the_loss_of_a_hand_computed_pair():
    # chosen: log-ratio +1, rejected: -1; beta 0.5 -> rewards +0.5, -0.5; loss -log sigmoid(1)
    losses, chosen, rejected = dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5
    )
    assert chosen.item() == pytest.approx(0.5) and rejected.item() == pytest.approx(-0.5)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-1)))  # 0.31326...
    # policy == reference: every reward 0 and the loss log 2, whatever beta
    same = torch.tensor([-4.0, -7.5])
    losses, chosen, rejected = dpo_loss(same, same + 1, same, same + 1, 3.0)
    assert torch.allclose(losses, torch.full((2,), math.log(2)))
    assert chosen.abs().max() == 0 and rejected.abs().max() == 0


def test_conservative_dpo_smooths_the_label():
    pc, pr, rc, rr = (torch.tensor(v) for v in ([-1.0, -5.0], [-3.0, -2.0], [-2.0] * 2, [-2.0] * 2))
    beta, eps = 0.5, 0.1
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta, label_smoothing=eps)
    d = beta * ((pc - rc) - (pr - rr))  # written out: -(1-eps) log s(d) - eps log s(-d)
    expected = -(1 - eps) * torch.log(torch.sigmoid(d)) - eps * torch.log(torch.sigmoid(-d))
    torch.testing.assert_close(losses, expected)
    # for d = 1: log(1 + e^-1) + eps * 1, since log(1 + e) - log(1 + e^-1) = 1
    assert losses[0].item() == pytest.approx(math.log(1 + math.exp(-1)) + eps)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, beta, label_smoothing=0.5)


def test_the_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.tensor([-2.0, -1.0], requires_grad=True)
    rejected = torch.tensor([-2.0, -3.0], requires_grad=True)
    ref = torch.tensor([-2.0, -2.0])
    losses, _, _ = dpo_loss(chosen, rejected, ref, ref, 0.1)
    losses.sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()  # descent: chosen up
    # a pair already far apart pulls less (the sigmoid's weight, DPO eq. 8)
    assert chosen.grad[1].abs() < chosen.grad[0].abs()


def test_agrees_with_trl_on_the_same_batch(tokenizer):
    """TRL's DPOTrainer computes its sigmoid loss inside the trainer (no standalone function in
    trl 1.x): both sides take TRL's own collated batch, a policy and a different reference."""
    import copy

    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs(4)]
    model, reference = causal_lm(plain, seed=0), causal_lm(plain, seed=1)
    args = trl.DPOConfig(
        output_dir="/nonexistent/unused",
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=4,
        save_strategy="no",
        beta=0.3,
    )
    trainer = trl.DPOTrainer(
        model=model,
        ref_model=reference,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=plain,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, batch).item()
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        policy = completion_logps(model(**inputs).logits, labels)  # (2B,) chosen then rejected
        ref = completion_logps(reference(**inputs).logits, labels)
    losses, _, _ = dpo_loss(policy[:4], policy[4:], ref[:4], ref[4:], beta=0.3)
    assert abs(trl_loss - math.log(2)) > 1e-3  # the two models differ: a real comparison
    assert losses.mean().item() == pytest.approx(trl_loss, abs=1e-5)


# --- formatting and log-probs ------------------------------------------------------------------


def test_both_completions_follow_the_same_truncated_prompt(tokenizer):
    formatter = SFTFormatter(tokenizer, 14, min_prompt_tokens=4)
    prompt = "long prompt words " * 4 + "say alpha please"
    pair = encode_pair(formatter, DPOPair(prompt, "alpha", "beta gamma delta epsilon"))
    head = pair.chosen.input_ids[: pair.chosen.prompt_length]
    assert head == pair.rejected.input_ids[: pair.rejected.prompt_length]
    assert pair.rejected.length == 14 and pair.chosen.length < 14  # the longer one fits exactly
    # the prompt lost its start, not its end; both completions are whole (with end of turn)
    assert tokenizer.decode(head).endswith("say alpha please <eos> <assistant>")
    assert tokenizer.decode(pair.rejected.input_ids[pair.rejected.prompt_length :]) == (
        "beta gamma delta epsilon <eos>"
    )
    # a completion that does not fit loses its end, and the prompt keeps min_prompt_tokens
    long = encode_pair(formatter, DPOPair(prompt, "alpha", " ".join(WORDS * 3)))
    assert long.rejected.length == 14 and long.rejected.prompt_length == 4
    # identical completions teach nothing
    assert encode_pair(formatter, DPOPair(prompt, "alpha beta", "alpha beta")) is None


def test_log_probs_cover_the_completion_only_and_ignore_padding(tokenizer, policy):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(policy).eval()
    formatter = SFTFormatter(tokenizer, 32)
    encoded = [encode_pair(formatter, p) for p in pairs(3)]
    device = torch.device("cpu")
    with torch.no_grad():
        chosen, rejected, _ = forward_pairs(model, encoded, tokenizer.pad_token_id, device, False)
        for row, pair in enumerate(encoded):
            for example, batched in ((pair.chosen, chosen[row]), (pair.rejected, rejected[row])):
                ids = torch.tensor([example.input_ids])
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)  # (T, V)
                start = example.prompt_length
                alone = sum(
                    logp[t - 1, example.input_ids[t]].item() for t in range(start, example.length)
                )
                assert batched.item() == pytest.approx(alone, abs=1e-4)
    table = sequence_logps(model, encoded, tokenizer.pad_token_id, device, False, batch_size=2)
    torch.testing.assert_close(table, torch.stack([chosen, rejected], dim=1))
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4]])
    logits = torch.zeros(1, 4, 6)  # uniform: each target token costs log 6
    assert completion_logps(logits, labels).item() == pytest.approx(-2 * math.log(6))


# --- training -----------------------------------------------------------------------------------


def margins(folder: str | Path, tokenizer, data: list[DPOPair]) -> torch.Tensor:
    """log pi(chosen) - log pi(rejected) of each pair under the model in `folder`, (N,)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    encoded = [encode_pair(SFTFormatter(tokenizer, 32), p) for p in data]
    table = sequence_logps(model, encoded, tokenizer.pad_token_id, torch.device("cpu"), False, 16)
    return table[:, 0] - table[:, 1]


@pytest.fixture(scope="module")
def trained(policy, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo")
    metrics: list[tuple[int, str, float]] = []
    result = train(
        config(policy),
        pairs(16),
        pairs(4, offset=16),
        out,
        on_metric=lambda s, n, v: metrics.append((s, n, v)),
    )
    return result, out, metrics


def test_the_implicit_rewards_separate_the_pairs(trained, policy, tokenizer):
    result, out, metrics = trained
    assert not result.stopped and result.steps == result.total_steps == 10 * 2
    names = {name for _, name, _ in metrics}
    assert {
        "train/loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracy",
        "rewards/margin",
        "logps/chosen",
        "logps/rejected",
        "train/learning_rate",
        "train/grad_norm",
        "train/tokens_per_second",
        "eval/loss",
        "eval/rewards/accuracy",
        "eval/rewards/margin",
    } <= names

    def series(name: str) -> list[float]:
        return [v for _, n, v in metrics if n == name]

    # step 1 is measured before any update: policy == reference, every reward 0
    assert series("rewards/margin")[0] == 0 and series("train/loss")[0] == pytest.approx(
        math.log(2)
    )
    assert series("rewards/accuracy")[-1] == 1.0 and series("rewards/margin")[-1] > 0.15
    assert series("train/loss")[-1] < 0.9 * math.log(2)
    m = result.metrics
    assert m["eval_reward_accuracy"] == 1.0 and m["eval_reward_margin"] > 0.15
    assert m["eval_loss"] < math.log(2) and m["train_pairs"] == 16 and m["eval_pairs"] == 4
    # the policy itself now puts more probability on the chosen answers than it did
    before, after = margins(policy, tokenizer, pairs(16)), margins(out, tokenizer, pairs(16))
    assert (after > before).all() and (after - before).mean() > 1.5  # nats
    meta = json.loads((out / META_FILE).read_text())
    assert meta["format"] == "prefloop-dpo/1" and meta["config"]["beta"] == 0.1
    assert not (out / CHECKPOINT_DIR).exists()


def test_dropout_is_off_so_the_unmoved_policy_is_its_reference(tokenizer, tmp_path):
    """The reference log-probs come from eval mode: a policy that trained with its config's
    dropout would score noisy log-probs against them, so even at learning rate 0 the loss
    would not be log 2 nor the margin 0 (TRL's DPOConfig.disable_dropout, on by default)."""
    from transformers import LlamaForCausalLM

    from tests.tiny_models import llama_config

    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(tokenizer, attention_dropout=0.3)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    metrics: list[tuple[int, str, float]] = []
    train(
        config(str(tmp_path), learning_rate=0.0, epochs=1),
        pairs(16),
        [],
        tmp_path / "out",
        on_metric=lambda s, n, v: metrics.append((s, n, v)),
    )
    losses = [v for _, n, v in metrics if n == "train/loss"]
    margins = [v for _, n, v in metrics if n == "rewards/margin"]
    assert len(losses) == len(margins) == 2  # every step sees the starting weights
    assert losses == pytest.approx([math.log(2)] * 2, abs=1e-6)
    assert margins == pytest.approx([0.0] * 2, abs=1e-6)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["attention_dropout"] == 0.3  # the saved policy keeps its own config


def test_the_saved_policy_loads_with_plain_transformers(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out, _ = trained
    assert AutoModelForCausalLM.from_pretrained(out).config.use_cache
    assert AutoTokenizer.from_pretrained(out).eos_token == "<eos>"


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def test_stop_then_resume_gives_the_same_weights_without_a_new_reference(policy, tmp_path):
    settings = config(policy, epochs=2, batch_size=2, grad_accumulation_steps=2, save_every=2)
    data, held = pairs(12), pairs(4, offset=12)
    straight = train(settings, data, held, tmp_path / "straight")
    assert not straight.reference_reused
    calls = {"n": 0}

    def stop_after_four() -> bool:
        calls["n"] += 1
        return calls["n"] == 5

    out = tmp_path / "resumed"
    stopped = train(settings, data, held, out, should_stop=stop_after_four)
    assert stopped.stopped and stopped.steps == 4
    assert (out / CHECKPOINT_DIR / "state.pt").exists()
    assert (out / CHECKPOINT_DIR / REFERENCE_FILE).exists()
    resumed = train(settings, data, held, out)
    assert not resumed.stopped and resumed.steps == straight.steps == 6
    assert resumed.reference_reused  # read back, not recomputed from the half-trained policy
    a, b = weights(tmp_path / "straight"), weights(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics["eval_loss"] == straight.metrics["eval_loss"]
    # another config on the same folder is refused, not mixed in
    train(settings, data, held, tmp_path / "other", should_stop=lambda: True)
    with pytest.raises(ValueError, match="another config"):
        train(config(policy, beta=0.5), data, held, tmp_path / "other")


def test_bad_configs_are_refused(policy, tmp_path):
    with pytest.raises(ValueError, match="beta"):
        DPOConfig(model_name_or_path=policy, beta=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOConfig(model_name_or_path=policy, label_smoothing=0.5)
    with pytest.raises(ValueError, match="lr_scheduler"):
        DPOConfig(model_name_or_path=policy, lr_scheduler="step")
    with pytest.raises(ValueError, match="no training"):
        train(config(policy), [], [], tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_bf16_and_checkpointing_train_too(policy, tmp_path):
    """bf16 autocast and gradient checkpointing are on by default with CUDA."""
    result = train(config(policy), pairs(16), pairs(4, offset=16), tmp_path / "gpu", device="cuda")
    assert result.metrics["eval_reward_accuracy"] >= 0.75
    meta = json.loads((tmp_path / "gpu" / META_FILE).read_text())
    assert meta["config"]["bf16"] is None and meta["config"]["gradient_checkpointing"] is None
