"""Data-parallel training (trainer/distributed.py, trainer/launch.py): the sharding math on
hand-made tensors, and real 2-process runs on CPU (gloo), launched through `accelerate launch`
as the worker launches them, that follow the one-process loss curve to the same weights: the
reward model, SFT and DPO, replicated (DDP) or sharded (FSDP2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("accelerate")

from tests.test_dpo import config as dpo_config  # noqa: E402
from tests.test_dpo import pairs  # noqa: E402
from tests.test_reward_training import HELD_OUT, TRAIN  # noqa: E402
from tests.test_reward_training import config as reward_config  # noqa: E402
from tests.test_reward_training import vocabulary as reward_vocabulary  # noqa: E402
from tests.test_sft import config as sft_config  # noqa: E402
from tests.test_sft import demonstrations  # noqa: E402
from tests.test_sft import vocabulary as sft_vocabulary  # noqa: E402
from tests.tiny_models import causal_lm, reward_model, tokenizer_for  # noqa: E402
from trainer import distributed  # noqa: E402
from trainer.distributed import SINGLE, Distributed, shard, shard_or_stand_in  # noqa: E402
from trainer.launch import LaunchError, launch  # noqa: E402
from trainer.launched import STOP  # noqa: E402

# --- the helpers, on hand-made inputs ---------------------------------------------------------


def test_each_rank_takes_a_slice_of_every_global_batch():
    batch = [10, 11, 12, 13, 14]
    assert shard(batch, 0, 2) == [10, 12, 14] and shard(batch, 1, 2) == [11, 13]
    slices = [shard(batch, r, 3) for r in range(3)]
    assert sorted(x for s in slices for x in s) == batch  # every example once, none twice
    assert [len(s) for s in slices] == [2, 2, 1]
    # a last batch smaller than the world: the empty rank runs a zero-weight stand-in
    assert shard_or_stand_in([7], 0, 2) == ([7], False)
    assert shard_or_stand_in([7], 1, 2) == ([7], True)
    assert Distributed(rank=1, world_size=2).shard([7, 8, 9]) == ([8], False)


def test_one_process_helpers_change_nothing():
    model = torch.nn.Linear(2, 1)
    assert SINGLE.wrap(model) is model
    assert SINGLE.shard([1, 2, 3]) == ([1, 2, 3], False)
    values = [1, 2.5]
    assert SINGLE.sum(values) == values and type(SINGLE.sum(values)[0]) is int
    assert SINGLE.any(True) and not SINGLE.any(False)
    assert distributed.init("cpu") is SINGLE  # no WORLD_SIZE: one process


def test_each_rank_resumes_its_own_random_state():
    """A checkpoint keeps every rank's RNG states; rank r gets its own back, and a run of
    another size (or a checkpoint of one dict) gives every rank rank 0's."""
    torch.manual_seed(1)
    first = SINGLE.rng_states()
    assert len(first) == 1
    expected = torch.rand(3)
    torch.manual_seed(2)
    second = SINGLE.rng_states()[0]
    for saved, rank, world, seeded in (
        ([first[0], second], 1, 2, 2),
        ([first[0], second], 0, 2, 1),
        ([first[0], second], 0, 1, 1),  # 2 processes' checkpoint, resumed in one
        (first[0], 0, 1, 1),  # the one-dict format
    ):
        torch.manual_seed(99)
        distributed.Distributed(rank=rank, world_size=world).restore_rng(saved)
        torch.manual_seed(seeded)
        wanted = torch.rand(3)
        distributed.Distributed(rank=rank, world_size=world).restore_rng(saved)
        assert torch.equal(torch.rand(3), wanted)
    assert torch.equal(wanted, expected)  # the last case: seed 1, as saved


def test_a_rank_stops_at_its_workers_request_its_death_or_its_own_sigterm(tmp_path):
    import os
    import signal

    from trainer.launched import stop_check

    previous = signal.getsignal(signal.SIGTERM)
    try:
        should_stop = stop_check(tmp_path / "stop", os.getpid())
        assert not should_stop()
        os.kill(os.getpid(), signal.SIGTERM)  # handled: the rank checkpoints at its next step
        assert should_stop()
        asked = stop_check(tmp_path / "stop", os.getpid())
        (tmp_path / "stop").touch()
        assert asked()
        (tmp_path / "stop").unlink()
        orphan = stop_check(tmp_path / "stop", 2**22 + 12345)  # no such worker process
        assert orphan()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _token_losses(weight: torch.Tensor, rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """Summed squared error of each row's tokens: a stand-in for a summed token loss."""
    return [((row @ weight) ** 2).sum() for row in rows]


def test_rank_shares_of_a_token_weighted_loss_average_to_the_one_process_gradient():
    """Rows of 1, 4 and 2 tokens, two ranks. Each rank divides by the global step's token
    count and backpropagates world_size x its share; DDP's average of the two gradients is
    then the one-process gradient. A rank-local mean (each rank dividing by its own tokens)
    would weigh rank 1's long row less, and gives another gradient."""
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(n, 3, generator=gen) for n in (1, 4, 2)]
    tokens = sum(len(r) for r in rows)

    weight = torch.randn(3, generator=gen, requires_grad=True)
    (sum(_token_losses(weight, rows)) / tokens).backward()
    single = weight.grad.clone()

    per_rank = []
    for rank in range(2):
        dist = Distributed(rank=rank, world_size=2)
        weight.grad = None
        mine, stand_in = dist.shard(rows)
        assert not stand_in
        dist.backward(sum(_token_losses(weight, mine)) / tokens)
        per_rank.append(weight.grad.clone())
    torch.testing.assert_close((per_rank[0] + per_rank[1]) / 2, single)  # what DDP does

    local_means = []
    for rank in range(2):
        weight.grad = None
        mine = shard(rows, rank, 2)
        (sum(_token_losses(weight, mine)) / sum(len(r) for r in mine)).backward()
        local_means.append(weight.grad.clone())
    assert not torch.allclose((local_means[0] + local_means[1]) / 2, single, atol=1e-4)


def test_sharded_strategies_are_refused_not_ignored(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RuntimeError, match="data-parallel"):
        distributed.init("cpu")


def test_a_launch_needs_two_processes_and_a_plain_device(tmp_path):
    with pytest.raises(ValueError, match="processes"):
        launch("trainer.sft:train", (), {}, processes=1, device="cpu", run_dir=tmp_path)
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        launch("trainer.sft:train", (), {}, processes=2, device="cuda:1", run_dir=tmp_path)


# --- 2 processes against 1 -------------------------------------------------------------------


def _metrics(history, name: str) -> list[tuple[int, float]]:
    return [(step, value) for step, n, value in history if n == name]


def _assert_same_curve(got, want, name: str) -> None:
    got, want = _metrics(got, name), _metrics(want, name)
    assert got and [s for s, _ in got] == [s for s, _ in want], name
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-4, abs=1e-6), name


def _assert_same_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=key)


def _reward_backbone(folder: Path) -> Path:
    """A tiny random reward model (a Llama sequence classifier) to train, saved in folder."""
    tokenizer = tokenizer_for(reward_vocabulary())
    reward_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _fsdp_stopped_after_first_log(target: str, args: tuple, kwargs: dict, run_dir: Path) -> Any:
    """2 FSDP processes running `target`, the worker asking them to stop once the first
    `train/loss` came (the stop lands at a later step)."""
    seen: list[tuple[int, str, float]] = []
    return launch(
        target,
        args,
        kwargs,
        processes=2,
        device="cpu",
        run_dir=run_dir,
        on_metric=lambda step, name, value: seen.append((step, name, value)),
        should_stop=lambda: any(name == "train/loss" for _, name, _ in seen),
        sharding="fsdp",
    )


def test_two_processes_resume_a_reward_run_to_the_one_process_weights(tmp_path):
    """89 judgments in global batches of 8: every batch splits 4 + 4 except the last, one
    judgment, where rank 1 runs a zero-weight stand-in. Gradient accumulation, centering,
    margins and tie targets are on, so every piece of the loss is sharded. A one-process run
    stops after 3 of 6 steps; 2 processes resume its checkpoint and finish with the curve and
    weights of the uninterrupted one-process run."""
    from transformers import AutoModelForSequenceClassification

    from trainer.reward import train

    backbone = _reward_backbone(tmp_path / "backbone")
    settings = reward_config(
        backbone,
        epochs=2,
        batch_size=8,
        grad_accumulation_steps=4,
        logging_steps=1,
        ties="half",
        use_margin=True,
        center_rewards_coefficient=0.01,
    )
    data, gold = TRAIN[:89], {"gold_groups": HELD_OUT[:10]}
    straight = train(settings, data, HELD_OUT, tmp_path / "straight", **gold)
    assert straight.steps == 6  # 12 micro-batches / 4, two epochs

    calls = {"n": 0}

    def stop_after_four() -> bool:
        calls["n"] += 1
        return calls["n"] == 5

    out = tmp_path / "resumed"
    stopped = train(settings, data, HELD_OUT, out, should_stop=stop_after_four, **gold)
    assert stopped.stopped and stopped.steps == 4
    events: list[tuple[int, str, float]] = []
    progress: list[float] = []
    resumed = launch(
        "trainer.reward:train",
        (settings, data, HELD_OUT, out),
        gold,
        processes=2,
        device="cpu",
        run_dir=tmp_path / "launch",
        on_metric=lambda step, name, value: events.append((step, name, value)),
        on_progress=lambda fraction, message: progress.append(fraction),
    )
    assert not resumed.stopped and resumed.steps == 6
    # rank 0 reports the global numbers, forwarded to on_metric as they came
    assert events == resumed.history and progress[-1] == 1.0
    curve = stopped.history + resumed.history
    for name in ("train/loss", "train/accuracy", "train/grad_norm", "eval/loss", "gold/accuracy"):
        _assert_same_curve(curve, straight.history, name)
    assert resumed.metrics["eval_accuracy"] == pytest.approx(straight.metrics["eval_accuracy"])
    assert resumed.normalization["mean"] == pytest.approx(
        straight.normalization["mean"], rel=1e-4, abs=1e-5
    )
    _assert_same_weights(
        AutoModelForSequenceClassification.from_pretrained(out).state_dict(),
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "straight").state_dict(),
    )
    assert not (out / "checkpoint").exists()


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("policy")
    tokenizer = tokenizer_for(sft_vocabulary())
    causal_lm(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _weights(folder: Path) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def test_two_processes_follow_the_sft_curve_stop_together_and_resume_in_one(policy, tmp_path):
    """Token-weighted: examples of two lengths in global batches of 3 (2 + 1 per rank; the
    last of each epoch 1 + a stand-in). The 2-process run follows the one-process curve until
    the worker's stop request (a STOP file) stops both ranks at the same step; the checkpoint
    rank 0 wrote then resumes in one process to the uninterrupted run's weights."""
    from trainer.sft import SFTExample, train

    settings = sft_config(
        policy, batch_size=3, grad_accumulation_steps=2, epochs=20, learning_rate=5e-3
    )
    longer = [
        SFTExample(e.prompt, f"{e.completion} {e.completion}", e.prompt_key)
        for e in demonstrations(4, offset=9)
    ]
    data = demonstrations(9) + longer
    held = demonstrations(4, offset=20)
    straight = train(settings, data, held, tmp_path / "straight")
    assert straight.steps == 60  # 13 examples / 3 = 5 micro-batches, 3 steps, 20 epochs

    out = tmp_path / "run"
    seen: list[tuple[int, str, float]] = []
    stopped = launch(
        "trainer.sft:train",
        (settings, data, held, out),
        {},
        processes=2,
        device="cpu",
        run_dir=tmp_path / "launch",
        on_metric=lambda step, name, value: seen.append((step, name, value)),
        should_stop=lambda: any(name == "train/loss" for _, name, _ in seen),
    )
    assert (tmp_path / "launch" / STOP).exists()
    assert stopped.stopped and 1 <= stopped.steps < 60, stopped.steps
    assert (out / "checkpoint" / "state.pt").exists() and not (out / "prefloop_sft.json").exists()
    for name in ("train/loss", "train/grad_norm", "eval/loss"):
        want = [e for e in straight.history if e[0] <= stopped.steps]
        _assert_same_curve(stopped.history, want, name)

    resumed = train(settings, data, held, out)  # the same checkpoint format as one process's
    assert not resumed.stopped and resumed.steps == 60
    _assert_same_weights(_weights(out), _weights(tmp_path / "straight"))
    assert resumed.metrics["eval_loss"] == pytest.approx(straight.metrics["eval_loss"], rel=1e-4)


def test_two_processes_share_the_dpo_reference_and_follow_the_one_process_curve(policy, tmp_path):
    """13 pairs in global batches of 3, 2 per step: each epoch's last step is one pair, where
    rank 1 runs a zero-weight stand-in. A 2-process run, stopped by the worker before its first
    step, has computed the reference log-probs (each rank half the pairs) and checkpointed them;
    2 processes resume from that, reuse them, and follow the one-process run's curve to its
    weights."""
    from trainer.dpo import CHECKPOINT_DIR, REFERENCE_FILE, encode_pair, sequence_logps, train
    from trainer.sft import SFTFormatter, load_policy

    settings = dpo_config(policy, batch_size=3, grad_accumulation_steps=2, epochs=4, eval_every=2)
    data, held = pairs(13), pairs(4, offset=13)
    straight = train(settings, data, held, tmp_path / "straight")
    assert straight.steps == 12  # 5 micro-batches (3, 3, 3, 3, 1) / 2 = 3 steps, 4 epochs

    out = tmp_path / "run"
    run = ((settings, data, held, out), {})
    stopped = launch(
        "trainer.dpo:train",
        *run,
        processes=2,
        device="cpu",
        run_dir=tmp_path / "launch",
        should_stop=lambda: True,  # the STOP file is there before the ranks have started
    )
    assert stopped.stopped and stopped.steps == 0 and not stopped.reference_reused
    # the table the two ranks computed is the one-process reference, row for row
    model, tokenizer = load_policy(policy)
    encoded = [encode_pair(SFTFormatter(tokenizer, settings.max_length), p) for p in data]
    alone = sequence_logps(
        model, encoded, tokenizer.pad_token_id, torch.device("cpu"), False, batch_size=16
    )
    saved = torch.load(out / CHECKPOINT_DIR / REFERENCE_FILE, weights_only=False)
    torch.testing.assert_close(saved["train"], alone, atol=1e-5, rtol=1e-5)

    resumed = launch(
        "trainer.dpo:train", *run, processes=2, device="cpu", run_dir=tmp_path / "launch"
    )
    assert not resumed.stopped and resumed.steps == 12 and resumed.reference_reused
    for name in ("train/loss", "rewards/margin", "logps/chosen", "train/grad_norm", "eval/loss"):
        _assert_same_curve(resumed.history, straight.history, name)
    for name in ("eval_loss", "eval_reward_margin", "train_reward_margin"):
        assert resumed.metrics[name] == pytest.approx(straight.metrics[name], rel=1e-4, abs=1e-6)
    _assert_same_weights(_weights(out), _weights(tmp_path / "straight"))
    assert not (out / CHECKPOINT_DIR).exists()


def test_a_failing_launch_raises_with_the_log_tail(tmp_path):
    with pytest.raises(
        LaunchError, match=r"status 1 and no result: rank \d: ModuleNotFoundError.*trainer\.nope"
    ):
        launch("trainer.nope:train", (), {}, processes=2, device="cpu", run_dir=tmp_path)


def finish_then_abort_at_exit(*, dist, on_metric, on_progress, should_stop) -> dict:
    """A launched function whose rank 1 is killed by SIGABRT at interpreter exit, as gloo's
    threads can do to a process as it shuts down."""
    import atexit
    import os

    if dist.rank == 1:
        atexit.register(os.abort)
    return {"world": dist.world_size}


def test_a_rank_dying_as_the_processes_shut_down_fails_nothing(tmp_path, caplog):
    """Every rank's function returned and rank 0's result is written: the launch returns it
    and logs the exit status, rather than failing (and retraining) a job whose work is done."""
    with caplog.at_level("WARNING", logger="prefloop.launch"):
        result = launch(
            "tests.test_distributed:finish_then_abort_at_exit",
            (),
            {},
            processes=2,
            device="cpu",
            run_dir=tmp_path,
        )
    assert result == {"world": 2}
    assert "finished their training but exited with status 1" in caplog.text
    assert sorted(p.name for p in tmp_path.glob("done-rank*")) == ["done-rank0", "done-rank1"]


# --- sharded (FSDP2): 2 processes against 1 ----------------------------------------------------


@pytest.fixture(scope="module")
def two_layer_policy(tmp_path_factory) -> str:
    """Two decoder layers, so FSDP shards two blocks and the root (embeddings, norm, head)."""
    from transformers import LlamaForCausalLM

    from tests.tiny_models import llama_config

    folder = tmp_path_factory.mktemp("policy2")
    tokenizer = tokenizer_for(sft_vocabulary())
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(tokenizer, num_hidden_layers=2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_fsdp_shards_each_decoder_layer_and_is_asked_for_by_the_spec(two_layer_policy, tmp_path):
    from app.jobs.specs import SpecError, parse_dpo_spec, parse_reward_spec, parse_sft_spec
    from trainer.distributed import transformer_blocks
    from trainer.sft import load_policy

    model, _ = load_policy(two_layer_policy)
    assert transformer_blocks(model) == list(model.model.layers)
    wrapper = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2)] * 2))
    assert len(transformer_blocks(wrapper)) == 2  # no _no_split_modules: a ModuleList's entries

    base = {"model_id": 1, "campaigns": ["x"]}
    assert parse_sft_spec(base).sharding == "none"
    assert parse_sft_spec({**base, "processes": 2, "sharding": "fsdp"}).sharding == "fsdp"
    assert parse_dpo_spec({**base, "processes": 4, "sharding": "fsdp"}).sharding == "fsdp"
    with pytest.raises(SpecError, match="processes >= 2"):
        parse_sft_spec({**base, "sharding": "fsdp"})
    with pytest.raises(SpecError, match="sharding"):
        parse_dpo_spec({**base, "processes": 2, "sharding": "deepspeed"})
    reward = {"backbone": "/m", "campaigns": ["x"]}
    assert parse_reward_spec({**reward, "processes": 2, "sharding": "fsdp"}).sharding == "fsdp"
    with pytest.raises(SpecError, match="processes >= 2"):
        parse_reward_spec({**reward, "sharding": "fsdp"})
    with pytest.raises(ValueError, match="sharding"):
        launch(
            "trainer.sft:train", (), {}, processes=2, device="cpu", run_dir=tmp_path, sharding="z3"
        )


def test_fsdp_sft_follows_the_one_process_curve_and_its_checkpoint_resumes_in_one(
    two_layer_policy, tmp_path
):
    """2 FSDP processes, stopped by the worker after their first logged step, follow the
    one-process curve (evaluation included: both ranks run it) with gradient accumulation and
    a stand-in on rank 1 in each epoch's last micro-batch; the checkpoint rank 0 gathered
    has the one-process format and resumes in one process to the uninterrupted run's weights,
    and the saved model loads with from_pretrained."""
    from trainer.sft import train

    settings = sft_config(
        two_layer_policy, batch_size=3, grad_accumulation_steps=2, epochs=16, learning_rate=5e-3
    )
    data, held = demonstrations(9), demonstrations(4, offset=20)
    straight = train(settings, data, held, tmp_path / "straight")
    assert straight.steps == 32  # 9 examples / 3 = 3 micro-batches, 2 steps, 16 epochs

    out = tmp_path / "run"
    stopped = _fsdp_stopped_after_first_log(
        "trainer.sft:train", (settings, data, held, out), {}, tmp_path / "launch"
    )
    assert stopped.stopped and 1 <= stopped.steps < 32, stopped.steps
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    assert state["model"].keys() == _weights(two_layer_policy).keys()
    assert sorted(state["optimizer"]["state"]) == list(range(len(state["model"])))
    for name in ("train/loss", "train/grad_norm", "eval/loss"):
        want = [e for e in straight.history if e[0] <= stopped.steps]
        _assert_same_curve(stopped.history, want, name)

    resumed = train(settings, data, held, out)
    assert not resumed.stopped and resumed.steps == 32
    _assert_same_weights(_weights(out), _weights(tmp_path / "straight"))


def test_fsdp_dpo_resumes_a_one_process_checkpoint_to_the_one_process_weights(
    two_layer_policy, tmp_path
):
    """A one-process DPO run stops after 3 of 8 steps; 2 FSDP processes recompute the
    reference (each its slice of every global batch; the file is deleted here), load the
    one-process checkpoint and finish with the uninterrupted run's curve and weights, saved
    in plain transformers format."""
    from transformers import AutoModelForCausalLM

    from trainer.dpo import CHECKPOINT_DIR, REFERENCE_FILE, train

    settings = dpo_config(
        two_layer_policy, batch_size=3, grad_accumulation_steps=2, epochs=4, eval_every=3
    )
    data, held = pairs(7), pairs(4, offset=13)
    straight = train(settings, data, held, tmp_path / "straight")
    assert straight.steps == 8  # 3 micro-batches (3, 3, 1) / 2 = 2 steps, 4 epochs

    calls = {"n": 0}

    def stop_after_three() -> bool:
        calls["n"] += 1
        return calls["n"] == 4

    out = tmp_path / "run"
    stopped = train(settings, data, held, out, should_stop=stop_after_three)
    assert stopped.stopped and stopped.steps == 3
    (out / CHECKPOINT_DIR / REFERENCE_FILE).unlink()
    resumed = launch(
        "trainer.dpo:train",
        (settings, data, held, out),
        {},
        processes=2,
        device="cpu",
        run_dir=tmp_path / "launch",
        sharding="fsdp",
    )
    assert not resumed.stopped and resumed.steps == 8 and not resumed.reference_reused
    curve = stopped.history + resumed.history
    for name in ("train/loss", "rewards/margin", "train/grad_norm", "eval/loss"):
        _assert_same_curve(curve, straight.history, name)
    assert resumed.metrics["eval_loss"] == pytest.approx(straight.metrics["eval_loss"], rel=1e-4)
    saved = AutoModelForCausalLM.from_pretrained(out)
    assert saved.config.architectures == ["LlamaForCausalLM"]
    _assert_same_weights(saved.state_dict(), _weights(tmp_path / "straight"))
    assert not (out / CHECKPOINT_DIR).exists()


def test_fsdp_reward_training_follows_the_one_process_curve_stops_and_resumes(tmp_path):
    """2 FSDP processes train a reward model (the last-token pooling, which calls the body and
    the head apart, runs inside the sharded root), stopped by the worker after their first
    logged step: they follow the one-process curve, evaluation and gold accuracy included
    (both ranks run it), into a checkpoint of the one-process format. Resumed sharded, they
    score the normalization sample together and rank 0 saves the one-process run's weights."""
    from transformers import AutoModelForSequenceClassification

    from trainer.reward import train

    backbone = _reward_backbone(tmp_path / "backbone")
    # 45 judgments, global batches of 8: rank 1 runs a stand-in in each epoch's last one.
    # An evaluation every step, so the curve up to the stop has some, wherever it lands.
    settings = reward_config(
        backbone, epochs=3, batch_size=8, logging_steps=1, eval_every=1, ties="half"
    )
    data, gold = TRAIN[:45], {"gold_groups": HELD_OUT[:10]}
    straight = train(settings, data, HELD_OUT, tmp_path / "straight", **gold)
    assert straight.steps == 18  # 6 batches per epoch

    out = tmp_path / "run"
    args = (settings, data, HELD_OUT, out)
    stopped = _fsdp_stopped_after_first_log("trainer.reward:train", args, gold, tmp_path / "l")
    assert stopped.stopped and 1 <= stopped.steps < 18, stopped.steps
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    plain = AutoModelForSequenceClassification.from_pretrained(backbone).state_dict()
    assert state["model"].keys() == plain.keys()
    assert sorted(state["optimizer"]["state"]) == list(range(len(state["model"])))
    for name in ("train/loss", "train/grad_norm", "eval/loss", "gold/accuracy"):
        want = [e for e in straight.history if e[0] <= stopped.steps]
        _assert_same_curve(stopped.history, want, name)

    resumed = launch(
        "trainer.reward:train",
        args,
        gold,
        processes=2,
        device="cpu",
        run_dir=tmp_path / "l",
        sharding="fsdp",
    )
    assert not resumed.stopped and resumed.steps == 18
    for key in ("mean", "std"):
        assert resumed.normalization[key] == pytest.approx(
            straight.normalization[key], rel=1e-4, abs=1e-5
        ), key
    assert resumed.normalization["count"] == straight.normalization["count"] > 0
    assert resumed.metrics["eval_accuracy"] == pytest.approx(straight.metrics["eval_accuracy"])
    _assert_same_weights(
        AutoModelForSequenceClassification.from_pretrained(out).state_dict(),
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "straight").state_dict(),
    )
    assert not (out / "checkpoint").exists()
