"""PPO end to end on a one-layer Llama built from config (no hub), with a programmatic reward.

The reward: 1 when the response contains the word "sunny", else 0. A random policy over ~25
words says it in about a quarter of 8-token responses; PPO should make it say it nearly
always, at a KL from the start that the adaptive controller keeps under its target on average.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from tests.tiny_models import reward_model, tokenizer_for  # noqa: E402
from tests.tiny_rl import (  # noqa: E402
    LINEAR_ADAMW,
    PROMPTS,
    characters,
    one_torch_thread,
    resume_refusal,
    save_tiny_policy,
    says_sunny,
    series,
    stop_at_ask,
    sunny_samples,
    train_recording,
    update_two_ways,
    vocabulary,
    weights,
)
from trainer.ppo import (  # noqa: E402
    CHECKPOINT_DIR,
    META_FILE,
    PPOConfig,
    fold_normalization,
    train,
)
from trainer.reward import META_FILE as REWARD_META  # noqa: E402
from trainer.reward import RewardScorer  # noqa: E402
from trainer.rollout import (  # noqa: E402
    encode_prompt,
    left_pad,
    prompt_indices,
    response_logprobs,
    response_mask,
    reward_model_function,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_policy(tmp_path_factory.mktemp("policy"))


def save_reward_model(path: Path, mean: float, std: float) -> Path:
    """A reward model on the policy's tokenizer, with normalization stats as training writes."""
    tokenizer = tokenizer_for(vocabulary())
    reward_model(tokenizer, seed=3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    meta = {"config": {"max_length": 64}, "normalization": {"mean": mean, "std": std}}
    (path / REWARD_META).write_text(json.dumps(meta))
    return path


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_reward_model(tmp_path_factory.mktemp("reward"), mean=0.5, std=2.0)


@pytest.fixture(scope="module")
def other_reward_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reward model whose tokenizer numbers the words differently from the policy's."""
    path = tmp_path_factory.mktemp("other-reward")
    tokenizer = tokenizer_for([*reversed(vocabulary()), "extra words here"])
    reward_model(tokenizer, seed=4).save_pretrained(path)
    tokenizer.save_pretrained(path)
    meta = {"config": {"max_length": 64}, "normalization": {"mean": -1.0, "std": 0.5}}
    (path / REWARD_META).write_text(json.dumps(meta))
    return path


def config(policy: Path, **overrides: object) -> PPOConfig:
    settings: dict[str, object] = {
        "policy": str(policy),
        "value_init": "policy",
        "rollout_batch_size": 32,
        "minibatch_size": 16,
        "ppo_epochs": 2,
        "learning_rate": 1e-2,
        "lr_schedule": "constant",
        "max_new_tokens": 8,
        "temperature": 1.0,
        "vf_coef": 0.5,
        "kl_coef": 0.2,
        "adaptive_kl": True,
        "kl_target": 6.0,  # nats per response, Ziegler et al.'s value
        "kl_horizon": 50,
        "total_steps": 25,
        "seed": 0,
    }
    return PPOConfig(**(settings | overrides))


def test_ppo_raises_the_reward_and_keeps_kl_under_its_target(
    policy_dir: Path, tmp_path: Path
) -> None:
    cfg = config(policy_dir)
    result, seen, progress = train_recording(
        train, cfg, tmp_path / "out", reward_fn=says_sunny, device="cpu"
    )
    assert not result.stopped and result.steps == 25 and progress[-1] == 1.0
    reward, kl, beta = (series(seen, n) for n in ("reward/raw", "kl/k1", "kl/beta"))
    assert len(reward) == 25
    start, end = sum(reward[:3]) / 3, sum(reward[-5:]) / 5
    assert start < 0.4 and end > 0.8, (start, end)
    assert kl[0] == pytest.approx(0.0, abs=1e-5)  # policy == reference before any update
    # The controller steers the batch KL toward the target: on average under it, and never
    # far over it on one batch.
    assert sum(kl[-10:]) / 10 < cfg.kl_target, kl
    assert max(kl) < 1.25 * cfg.kl_target, kl
    assert beta[-1] < beta[0]  # the KL stayed under target, so the controller eased off
    assert series(seen, "reward/normalized") == reward  # a plain function is not rescaled
    names = {name for _, name, _ in seen}
    for name in (
        "policy/entropy",
        "policy/clip_frac",
        "policy/approx_kl",
        "value/loss",
        "value/explained_variance",
        "response/length",
        "response/eos_rate",
        "response/length_reward_corr",
        "time/generate",
        "time/train",
    ):
        assert name in names, name
    assert all(math.isfinite(v) for _, _, v in seen)
    assert all(0 <= v <= 1 for v in series(seen, "response/eos_rate"))
    assert all(1 <= v <= 8 for v in series(seen, "response/length"))

    # The saved policy loads as a plain causal LM and says the word.
    out = tmp_path / "out"
    meta = json.loads((out / META_FILE).read_text())
    assert meta["config"]["kl_target"] == 6.0 and meta["steps"] == 25
    assert meta["metrics"]["reward/raw"] == reward[-1]
    assert not (out / CHECKPOINT_DIR).exists()
    assert sunny_samples(out) >= 10


def test_stop_and_resume_match_an_uninterrupted_run(policy_dir: Path, tmp_path: Path) -> None:
    cfg = config(policy_dir, total_steps=6, rollout_batch_size=8, minibatch_size=4)
    whole = train(cfg, PROMPTS, tmp_path / "whole", reward_fn=says_sunny, device="cpu")
    split = tmp_path / "split"
    first = train(
        cfg, PROMPTS, split, reward_fn=says_sunny, device="cpu", should_stop=stop_at_ask(4)
    )
    assert first.stopped and first.steps == 3
    assert (split / CHECKPOINT_DIR / "state.pt").exists()
    assert not (split / META_FILE).exists()
    second = train(cfg, PROMPTS, split, reward_fn=says_sunny, device="cpu")
    assert not second.stopped and second.steps == 6
    # the same tensor names, each equal
    torch.testing.assert_close(weights(split), weights(tmp_path / "whole"), atol=1e-6, rtol=0)
    # Same rollouts, same beta (the controller's state was saved), same metrics history.
    for name in ("reward/raw", "kl/k1", "kl/beta", "value/loss"):
        assert series(second.history, name) == pytest.approx(series(whole.history, name))
    # Another config does not resume this checkpoint.
    other = PPOConfig(**{**cfg.__dict__, "seed": 1})
    refusal = resume_refusal(
        train, cfg, other, tmp_path / "other", reward_fn=says_sunny, device="cpu"
    )
    assert "another config" in refusal


def test_recomputed_logprobs_match_sampling_with_left_padding(policy_dir: Path) -> None:
    """The forward pass over left-padded prompt + response gives the log-probs of the
    distribution generate sampled from (KV cache, temperature 0.7)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    prompts = ["weather", "tell me about the weather topic1 please rain rain", "fog"]
    query, mask = left_pad([encode_prompt(tokenizer, p, 64) for p in prompts], 1)
    P = query.shape[1]
    torch.manual_seed(0)
    out = model.generate(
        input_ids=query,
        attention_mask=mask,
        generation_config=GenerationConfig(
            do_sample=True,
            temperature=0.7,
            top_k=0,
            max_new_tokens=6,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        output_scores=True,
        return_dict_in_generate=True,
    )
    response = out.sequences[:, P:]
    mask_r, _ = response_mask(response, tokenizer.eos_token_id)
    sampled = torch.log_softmax(torch.stack(out.scores, dim=1), dim=-1)  # (B, R, V)
    sampled = sampled.gather(-1, response.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        logprobs, _ = response_logprobs(
            model, out.sequences, torch.cat([mask, mask_r], 1), P, temperature=0.7
        )
    real = mask_r.bool()
    torch.testing.assert_close(logprobs[real], sampled[real], atol=1e-4, rtol=0)


def test_response_mask_ends_at_the_first_eos() -> None:
    eos = 2
    response = torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8], [2, 1, 1, 1]])
    mask, contains = response_mask(response, eos)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert contains.tolist() == [True, False, True]


def test_prompt_order_is_a_seeded_shuffle_per_pass() -> None:
    first_pass = prompt_indices(7, 0, 7, seed=3)
    assert sorted(first_pass) == list(range(7))
    assert prompt_indices(7, 0, 7, seed=3) == first_pass  # depends on nothing but its inputs
    # step 1 with batch 4 covers positions 4..7: the end of pass 0 and the start of pass 1
    assert prompt_indices(7, 1, 4, seed=3)[:3] == first_pass[4:]


def test_encode_prompt_uses_the_chat_template_and_keeps_the_end(policy_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    ids = encode_prompt(tokenizer, "tell me about the weather", 64)
    assert tokenizer.decode(ids) == "<user> tell me about the weather <eos> <assistant>"
    short = encode_prompt(tokenizer, "tell me about the weather", 3)
    assert short == ids[-3:]
    chat = [{"role": "user", "content": "rain"}, {"role": "assistant", "content": "fog"}]
    assert tokenizer.decode(encode_prompt(tokenizer, chat, 64)).endswith("fog <eos> <assistant>")


def test_reward_model_function_retokenizes_and_normalizes(other_reward_dir: Path) -> None:
    fn = reward_model_function(other_reward_dir, "cpu")
    scorer = RewardScorer(other_reward_dir, "cpu")
    prompts = ["tell me about the weather", [{"role": "user", "content": "weather please"}]]
    responses = ["sunny rain", "fog fog cold"]
    raw = [scorer.score(p, [r])[0] for p, r in zip(prompts, responses, strict=True)]
    expected = torch.tensor([(r + 1.0) / 0.5 for r in raw])
    torch.testing.assert_close(fn(prompts, responses), expected, atol=1e-5, rtol=0)
    plain = reward_model_function(other_reward_dir, "cpu", normalize=False)
    torch.testing.assert_close(plain(prompts, responses), torch.tensor(raw), atol=1e-5, rtol=0)
    assert fn([], []).shape == (0,)  # a batch with nothing to score


def test_reward_model_and_value_from_reward(
    policy_dir: Path, reward_dir: Path, other_reward_dir: Path, tmp_path: Path
) -> None:
    cfg = config(
        policy_dir,
        reward_model=str(reward_dir),
        value_init="reward",
        total_steps=2,
        rollout_batch_size=8,
        minibatch_size=8,
        missing_eos_penalty=1.0,
    )
    result = train(cfg, PROMPTS, tmp_path / "rm", device="cpu")
    assert result.steps == 2
    raw, normalized = (
        series(result.history, "reward/raw"),
        series(result.history, "reward/normalized"),
    )
    eos_rate = series(result.history, "response/eos_rate")
    # normalized = (raw - 0.5) / 2, then minus 1 for each response without EOS
    for r, n, e in zip(raw, normalized, eos_rate, strict=True):
        assert n == pytest.approx((r - 0.5) / 2 - (1 - e), abs=1e-5)
    # The value model reads the policy's tokens: a reward model with another vocabulary fails.
    bad = config(policy_dir, reward_model=str(other_reward_dir), value_init="reward")
    with pytest.raises(ValueError, match="tokenizer"):
        train(bad, PROMPTS, tmp_path / "bad", device="cpu")
    # "auto", the default: that reward model still scores, the value model is the policy's.
    said: list[str] = []
    assert PPOConfig(policy="p").value_init == "auto"
    auto = config(policy_dir, reward_model=str(other_reward_dir), value_init="auto", total_steps=1)
    done = train(
        auto, PROMPTS, tmp_path / "auto", device="cpu", on_progress=lambda f, m: said.append(m)
    )
    assert done.steps == 1 and "value model: from the policy model" in said
    said.clear()
    train(
        config(policy_dir, reward_model=str(reward_dir), value_init="auto", total_steps=1),
        PROMPTS,
        tmp_path / "auto-same",
        device="cpu",
        on_progress=lambda f, m: said.append(m),
    )
    assert "value model: from the reward model" in said


def test_fold_normalization_rescales_a_head_with_or_without_bias() -> None:
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])  # (N, H)
    for bias in (False, True):
        head = torch.nn.Linear(3, 1, bias=bias)
        with torch.no_grad():
            head.weight.copy_(torch.tensor([[0.5, -1.0, 2.0]]))
            if bias:
                head.bias.fill_(0.25)
        before = head(x).detach()
        rng = torch.get_rng_state()
        folded = fold_normalization(head, mean=1.5, std=4.0)
        assert torch.equal(torch.get_rng_state(), rng)  # later seeded draws stay as they were
        torch.testing.assert_close(folded(x), (before - 1.5) / 4.0)
        torch.testing.assert_close(head(x), before)  # the original is left alone
        assert isinstance(folded, torch.nn.Linear) and folded.bias is not None


def test_the_value_model_starts_on_the_normalized_reward_scale(
    policy_dir: Path, tmp_path: Path
) -> None:
    """GAE sees rewards (raw - mean) / std; the value model from the reward model must start
    on that scale too. The same reward model with a stored mean of 0 or 5: the same raw
    rewards, normalized ones 5 apart, and (learning rate 0) the same value loss."""
    cfg = {"value_init": "reward", "total_steps": 1, "rollout_batch_size": 8}
    cfg |= {"minibatch_size": 8, "ppo_epochs": 1, "learning_rate": 0.0}
    seen = {}
    for mean in (0.0, 5.0):
        rm = save_reward_model(tmp_path / f"rm-{mean}", mean=mean, std=1.0)
        result = train(
            config(policy_dir, reward_model=str(rm), **cfg), PROMPTS, tmp_path / f"out-{mean}"
        )
        seen[mean] = {name: value for _, name, value in result.history}
    low, high = seen[0.0], seen[5.0]
    assert high["reward/raw"] == pytest.approx(low["reward/raw"], abs=1e-5)
    assert high["reward/normalized"] == pytest.approx(low["reward/normalized"] - 5, abs=1e-5)
    assert high["value/loss"] == pytest.approx(low["value/loss"], rel=1e-3, abs=1e-6)
    assert high["value/explained_variance"] == pytest.approx(
        low["value/explained_variance"], rel=1e-3, abs=1e-6
    )


def test_resume_with_a_value_model_from_the_reward_model(
    policy_dir: Path, reward_dir: Path, tmp_path: Path
) -> None:
    """The checkpoint holds the value model with its normalization folded in: resuming loads
    it as it was (folding it again would shift the values of every later step)."""
    cfg = config(
        policy_dir,
        reward_model=str(reward_dir),
        value_init="reward",
        total_steps=2,
        rollout_batch_size=8,
        minibatch_size=8,
        ppo_epochs=1,
    )
    whole = train(cfg, PROMPTS, tmp_path / "whole", device="cpu")
    split = tmp_path / "split"
    first = train(cfg, PROMPTS, split, device="cpu", should_stop=stop_at_ask(2))
    assert first.stopped and first.steps == 1
    second = train(cfg, PROMPTS, split, device="cpu")
    assert second.steps == 2
    for name in ("reward/raw", "value/loss", "value/explained_variance"):
        assert series(second.history, name) == pytest.approx(series(whole.history, name))
    torch.testing.assert_close(weights(split), weights(tmp_path / "whole"), atol=1e-6, rtol=0)


def test_lora_policy_uses_the_adapter_free_model_as_reference(
    policy_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("peft", reason="peft is optional: LoRA is tested where it is installed")
    cfg = config(
        policy_dir, use_lora=True, lora_r=4, total_steps=3, rollout_batch_size=8, minibatch_size=4
    )
    result = train(cfg, PROMPTS, tmp_path / "lora", reward_fn=says_sunny, device="cpu")
    kl = series(result.history, "kl/k1")
    assert kl[0] == pytest.approx(0.0, abs=1e-5) and kl[-1] > 0
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "lora")  # merged: a plain model


def test_config_fields_document_themselves_and_validate(tmp_path: Path) -> None:
    for f in fields(PPOConfig):
        assert f.metadata.get("help"), f.name
    with pytest.raises(ValueError, match="value_init"):
        PPOConfig(policy="p", value_init="critic")
    with pytest.raises(ValueError, match="minibatch_size"):
        PPOConfig(policy="p", rollout_batch_size=4, minibatch_size=8)
    with pytest.raises(ValueError, match="reward_fn"):
        train(PPOConfig(policy="p", value_init="policy"), PROMPTS, tmp_path, device="cpu")


def test_accumulation_and_checkpointing_give_the_same_update(
    policy_dir: Path, tmp_path: Path
) -> None:
    """micro_batch_size splits a minibatch into accumulated passes (here unevenly, 3 + 3 + 2
    responses of different lengths, each weighted by its share of the minibatch's tokens) and
    gradient checkpointing recomputes activations: neither changes what one step learns."""
    # One AdamW step linear in the gradient (LINEAR_ADAMW), on a dense reward that gives
    # every response an advantage: a mis-weighted accumulation would show in the weights.
    one_step = {"total_steps": 1, "rollout_batch_size": 8, "minibatch_size": 8, "ppo_epochs": 1}
    plain = config(policy_dir, **one_step, **LINEAR_ADAMW)
    micro = config(
        policy_dir, **one_step, **LINEAR_ADAMW, micro_batch_size=3, gradient_checkpointing=True
    )
    a, b, logged_a, logged_b = update_two_ways(train, plain, micro, tmp_path)
    start = weights(policy_dir)
    assert any(not torch.equal(a[name], start[name]) for name in a)  # the step did learn
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)  # every tensor, the same names
    # the logged losses are the minibatch's own means too, however it was split
    for name in (
        "policy/loss",
        "policy/clip_frac",
        "policy/approx_kl",
        "value/loss",
        "value/clip_frac",
    ):
        assert logged_b[name] == pytest.approx(logged_a[name], rel=1e-4, abs=1e-6), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_bf16_ppo_raises_the_reward(policy_dir: Path, tmp_path: Path) -> None:
    """bf16 autocast is on by default with CUDA (fp32 master weights); gradient checkpointing
    on the policy and value model too. The reward still rises and the KL starts at 0."""
    cfg = config(policy_dir, gradient_checkpointing=True)
    result, seen, _ = train_recording(
        train, cfg, tmp_path / "gpu", reward_fn=says_sunny, device="cuda"
    )
    reward, kl = series(seen, "reward/raw"), series(seen, "kl/k1")
    assert sum(reward[-5:]) / 5 > sum(reward[:3]) / 3 + 0.2, reward
    assert kl[0] == pytest.approx(0.0, abs=1e-3) and result.steps == cfg.total_steps
    meta = json.loads((tmp_path / "gpu" / META_FILE).read_text())
    assert meta["config"]["bf16"] is None  # auto: on


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_bf16_the_ratio_is_one_while_the_weights_stay(
    policy_dir: Path, tmp_path: Path
) -> None:
    """Learning rate 0: the training passes see the weights that scored the rollout, so the
    ratio must be 1. Under bf16 the scoring pass (chunks of forward_batch_size) and the
    training pass (micro-batches of another size, with grad) may run other kernels; a
    difference would show as a ratio off 1 before the policy has moved."""
    cfg = config(
        policy_dir,
        bf16=True,
        learning_rate=0.0,
        total_steps=1,
        rollout_batch_size=32,
        forward_batch_size=16,
        minibatch_size=16,
        micro_batch_size=4,
    )
    result = train(cfg, PROMPTS, tmp_path / "gpu", reward_fn=characters, device="cuda")
    metrics = result.metrics
    assert result.steps == 1 and metrics["kl/k1"] == pytest.approx(0.0, abs=1e-3)
    assert metrics["policy/clip_frac"] == 0.0 and metrics["value/clip_frac"] == 0.0
    assert abs(metrics["policy/approx_kl"]) < 1e-3, metrics["policy/approx_kl"]
