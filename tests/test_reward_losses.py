"""The reward model's math on hand-made tensors: pair losses, ties, margins, pooling, ECE,
truncation and batching."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from tests.tiny_models import llama_config, tokenizer_for  # noqa: E402
from trainer.data import (  # noqa: E402
    RankingGroup,
    RewardFormatter,
    collate,
    length_grouped_batches,
    truncate,
)
from trainer.losses import (  # noqa: E402
    batch_pair_indices,
    bradley_terry_loss,
    expected_calibration_error,
    grouped_ranking_loss,
    pair_calibration_error,
    pair_indices,
    tie_loss,
    weighted_mean,
)
from trainer.modeling import compute_rewards, last_token_pool  # noqa: E402


def bt(a: float, b: float, m: float = 0.0) -> float:
    """-log sigmoid(a - b - m), by hand."""
    return math.log1p(math.exp(-(a - b - m)))


def test_pair_indices_orders_each_pair_and_marks_ties():
    better, worse, tie = pair_indices([2, 0, 1, 0])
    pairs = list(zip(better.tolist(), worse.tolist(), tie.tolist(), strict=True))
    # (0,1) -> 1 better; (0,2) -> 2 better; (0,3) -> 3 better; (1,2) -> 1; (1,3) tie; (2,3) -> 3
    assert pairs == [
        (1, 0, False),
        (2, 0, False),
        (3, 0, False),
        (1, 2, False),
        (1, 3, True),
        (3, 2, False),
    ]


def test_k_way_loss_is_the_mean_of_the_hand_computed_pair_losses():
    # Two judgments in one batch: K=3 (ranks 1,0,2) and K=2 (ranks 0,1); rewards flattened.
    rewards = torch.tensor([0.5, 2.0, -1.0, 0.3, 0.9])
    better, worse, tie, group = batch_pair_indices([[1, 0, 2], [0, 1]])
    group_loss, has_pairs = grouped_ranking_loss(rewards, better, worse, tie, group, 2)
    first = (bt(2.0, 0.5) + bt(0.5, -1.0) + bt(2.0, -1.0)) / 3  # all 3 pairs of group 0
    second = bt(0.3, 0.9)
    assert group_loss.tolist() == pytest.approx([first, second], rel=1e-6)
    assert has_pairs.tolist() == [True, True]
    # Weighted mean over judgments with one normaliser, as the training loop uses it.
    weights = torch.tensor([1.0, 0.5])
    total = weighted_mean(group_loss, has_pairs, weights, normalizer=1.5).item()
    assert total == pytest.approx((first + 0.5 * second) / 1.5, rel=1e-6)


def test_batched_loss_gradient_matches_separate_pairs():
    # Encoding each completion once and taking all pairs gives the same gradient as
    # InstructGPT's definition written pair by pair.
    rewards = torch.tensor([0.1, -0.4, 0.7, 0.2], requires_grad=True)
    better, worse, tie, group = batch_pair_indices([[3, 2, 1, 0]])
    group_loss, _ = grouped_ranking_loss(rewards, better, worse, tie, group, 1)
    group_loss.sum().backward()
    batched = rewards.grad.clone()
    rewards.grad = None
    ranks = [3, 2, 1, 0]
    terms = [
        -F.logsigmoid(rewards[j] - rewards[i])
        for i in range(4)
        for j in range(i + 1, 4)
        if ranks[j] < ranks[i]
    ]
    (sum(terms) / len(terms)).backward()
    assert torch.allclose(batched, rewards.grad)


def test_ties_are_skipped_or_trained_toward_one_half():
    rewards = torch.tensor([1.0, 1.0, -0.5])
    better, worse, tie, group = batch_pair_indices([[0, 0, 1]])
    skipped, _ = grouped_ranking_loss(rewards, better, worse, tie, group, 1, ties="skip")
    assert skipped.item() == pytest.approx((bt(1.0, -0.5) * 2) / 2)
    half, _ = grouped_ranking_loss(rewards, better, worse, tie, group, 1, ties="half")
    assert half.item() == pytest.approx((math.log(2) + 2 * bt(1.0, -0.5)) / 3)
    # The tie loss is smallest at equal rewards and symmetric.
    r = torch.tensor([0.0, 0.0, 2.0])
    a, b = torch.tensor([0, 0]), torch.tensor([1, 2])
    values = tie_loss(r, a, b)
    assert values[0].item() == pytest.approx(math.log(2))
    assert values[1] > values[0]
    assert tie_loss(r, b, a).tolist() == pytest.approx(values.tolist())


def test_an_all_tied_judgment_has_no_pairs_when_ties_are_skipped():
    rewards = torch.tensor([0.2, 0.2, 1.0, 0.0])
    better, worse, tie, group = batch_pair_indices([[0, 0], [0, 1]])
    loss, has_pairs = grouped_ranking_loss(rewards, better, worse, tie, group, 2)
    assert has_pairs.tolist() == [False, True]
    assert loss[0].item() == 0.0


def test_margin_is_subtracted_from_the_reward_difference():
    rewards = torch.tensor([1.0, 0.0])
    better, worse = torch.tensor([0]), torch.tensor([1])
    assert bradley_terry_loss(rewards, better, worse).item() == pytest.approx(bt(1.0, 0.0))
    with_margin = bradley_terry_loss(rewards, better, worse, torch.tensor([2.0])).item()
    assert with_margin == pytest.approx(bt(1.0, 0.0, 2.0))
    assert with_margin > bt(1.0, 0.0)


def test_collate_spreads_margins_over_strict_pairs_only():
    tokenizer = tokenizer_for(["a b c"])
    groups = [
        RewardFormatter(tokenizer, 16).encode_group(
            RankingGroup("a", ["b", "c", "b c"], ranks=[0, 0, 1], margin=1.5)
        )
    ]
    batch = collate(groups, tokenizer.pad_token_id)
    assert batch.tie.tolist() == [True, False, False]
    assert batch.margins.tolist() == [0.0, 1.5, 1.5]


def test_ece_on_a_known_example():
    # Bin [0.8, 0.9): 4 predictions of 0.8, 3 positive -> |0.75 - 0.8| = 0.05, share 4/8.
    # Bin [0.2, 0.3): 4 predictions of 0.2, 2 positive -> |0.5 - 0.2| = 0.30, share 4/8.
    probs = torch.tensor([0.8] * 4 + [0.2] * 4)
    labels = torch.tensor([1, 1, 1, 0, 1, 1, 0, 0])
    assert expected_calibration_error(probs, labels, bins=10).item() == pytest.approx(0.175)
    # Perfectly calibrated: half the 0.5 predictions are right.
    assert expected_calibration_error(torch.tensor([0.5, 0.5]), torch.tensor([1, 0])) == 0


def test_pair_ece_counts_both_orientations():
    # sigmoid(r_better - r_worse) = p for three pairs and 1 - p for the fourth: 3 of 4 right.
    # Mirrored, bin p holds three 1s and one 0 (mean 0.75), bin 1 - p one 1 and three 0s.
    def ece(p: float) -> float:
        d = math.log(p / (1 - p))
        rewards = torch.tensor([d, 0.0] * 3 + [0.0, d])
        better, worse = torch.tensor([0, 2, 4, 6]), torch.tensor([1, 3, 5, 7])
        return pair_calibration_error(rewards, better, worse).item()

    assert ece(0.75) == pytest.approx(0.0, abs=1e-6)  # says 75 %, right 75 % of the time
    assert ece(0.85) == pytest.approx(0.10, abs=1e-6)  # overconfident by 10 points


def test_last_token_pool_uses_the_mask_not_the_pad_id():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float).view(2, 4, 1)  # (N=2, T=4, H=1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert last_token_pool(hidden, mask).view(-1).tolist() == [2.0, 7.0]
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert last_token_pool(hidden, left).view(-1).tolist() == [3.0, 7.0]


def test_reward_is_read_at_the_last_real_token_when_pad_is_eos():
    from transformers import LlamaForSequenceClassification

    tokenizer = tokenizer_for(["hello there friend"])
    tokenizer.pad_token = tokenizer.eos_token  # pad == eos, right padding
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(
        llama_config(tokenizer, num_labels=1, pad_token_id=tokenizer.eos_token_id)
    ).eval()
    eos = tokenizer.eos_token_id
    hello, there, friend = (
        tokenizer.convert_tokens_to_ids(w) for w in ["hello", "there", "friend"]
    )
    long = [hello, there, friend, eos]
    short = [hello, eos]  # ends in eos, then padded with eos
    ids = torch.tensor([long, [*short, eos, eos]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        batched = compute_rewards(model, ids, mask)
        alone = [
            compute_rewards(model, torch.tensor([s]), torch.ones(1, len(s))) for s in (long, short)
        ]
    # Each sequence's reward is the one it gets alone: read at its own final eos, not at the
    # last non-eos token (where the pad-id heuristic would land), nor on padding.
    assert batched.tolist() == pytest.approx([alone[0].item(), alone[1].item()], abs=1e-5)
    with torch.no_grad():
        hf = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    assert hf[1].item() != pytest.approx(batched[1].item(), abs=1e-5)


def test_truncation_keeps_the_completion_and_the_end_of_the_prompt():
    prompt, completion = list(range(10)), [100, 101, 102]
    assert truncate(prompt, completion, 6) == ([7, 8, 9], [100, 101, 102])
    assert truncate(prompt, completion, 20) == (prompt, completion)
    assert truncate(prompt, completion, 3) == ([], [100, 101, 102])
    assert truncate(prompt, completion, 2) == ([], [100, 101])  # only then is the tail cut


def test_formatter_truncates_text_prompts_from_the_left():
    words = [f"w{i}" for i in range(30)]
    tokenizer = tokenizer_for([" ".join(words), "answer here"])
    tokenizer.chat_template = None  # plain concatenation: prompt, separator, completion, eos
    formatter = RewardFormatter(tokenizer, max_length=6)
    [ids] = formatter.encode(" ".join(words), ["answer here"])
    assert tokenizer.convert_ids_to_tokens(ids) == ["w27", "w28", "w29", "answer", "here", "<eos>"]


def test_formatter_uses_the_chat_template():
    tokenizer = tokenizer_for(["what is two plus two", "four"])
    [ids] = RewardFormatter(tokenizer, max_length=64).encode("what is two plus two", ["four"])
    text = tokenizer.convert_ids_to_tokens(ids)
    prompt = ["<user>", "what", "is", "two", "plus", "two", "<eos>", "<assistant>"]
    assert text == [*prompt, "four", "<eos>"]
    [short] = RewardFormatter(tokenizer, max_length=5).encode("what is two plus two", ["four"])
    assert tokenizer.convert_ids_to_tokens(short) == [
        "two",
        "<eos>",
        "<assistant>",
        "four",
        "<eos>",
    ]


def test_a_chat_templates_bos_survives_truncation():
    """As SFT keeps it: a long prompt loses its start, never the template's leading BOS."""
    from tests.tiny_models import CHAT_TEMPLATE

    tokenizer = tokenizer_for(["what is two plus two", "four"])
    tokenizer.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    formatter = RewardFormatter(tokenizer, max_length=6)
    [short] = formatter.encode("what is two plus two", ["four"])
    assert tokenizer.convert_ids_to_tokens(short) == [
        "<bos>",
        "two",
        "<eos>",
        "<assistant>",
        "four",
        "<eos>",
    ]
    [whole] = RewardFormatter(tokenizer, max_length=64).encode("two", ["four"])
    assert tokenizer.convert_ids_to_tokens(whole)[:2] == ["<bos>", "<user>"]


def test_length_grouped_batches_are_seeded_and_similar_in_length():
    lengths = [5, 50, 6, 49, 7, 48, 8, 47]
    batches = length_grouped_batches(lengths, batch_size=2, seed=1)
    assert batches == length_grouped_batches(lengths, batch_size=2, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert all(abs(lengths[b[0]] - lengths[b[1]]) <= 1 for b in batches)
    assert length_grouped_batches(lengths, 2, seed=2) != batches
