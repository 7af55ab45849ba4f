"""Exports: the four formats on a hand-made campaign, every filter, the split, determinism,
pseudonyms, snapshots (manifest, card, failure) and loading with `datasets`."""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import json
import secrets
from pathlib import Path

import pytest
from sqlalchemy import select

from app.auth import service as auth_service
from app.auth.models import Role
from app.campaigns.models import CampaignMode
from app.exports import formats, service
from app.exports.models import ExportSnapshot
from app.exports.schemas import ExportError, ExportParams, parse_params
from app.labeling import service as labeling
from app.labeling.models import Comparison, ComparisonSource, Judgment, Prompt
from app.labeling.schemas import EditIn, JudgmentIn
from app.quality import service as quality
from tests.factories import make_campaign, make_labeler, make_task

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Name a colour."},
]
NAMES = ("annika", "bobbie", "catrin", "danilo")  # found nowhere else in a file


def judge(db, user, task, campaign, *, when=None, recheck_of=None, **answer) -> Judgment:
    """Store a judgment and its comparisons as a submit would (no lease needed)."""
    shown = [item.completion_id for item in task.items]
    answer_in = JudgmentIn(**answer)
    ranking = labeling.check_answer(campaign, shown, shown, answer_in)
    judgment = labeling._write_judgment(
        db,
        user=user,
        task=task,
        campaign=campaign,
        answer=answer_in,
        ranking=ranking,
        shown=shown,
        key=secrets.token_hex(16),
        assignment_id=None,
        supersedes=None,
        now=when or dt.datetime(2026, 11, 10, 12, tzinfo=dt.UTC),
        recheck_of=recheck_of,
    )
    db.flush()
    return judgment


def ids(task) -> list[int]:
    return [item.completion_id for item in task.items]


@pytest.fixture
def hand(db):
    """A rank campaign (a chat prompt, a plain one, a gold task, an imported pair), a
    pairwise one and a demonstration one, judged by ann, bob, cat (excluded) and dan
    (disabled afterwards)."""
    rank = make_campaign(db, slug="hand", k=3, overlap=3, allow_ties=True)
    duel = make_campaign(db, slug="duel", k=2, overlap=2, mode=CampaignMode.pairwise)
    demo = make_campaign(db, slug="demo", k=2, overlap=1, mode=CampaignMode.demonstration)
    admin = auth_service.create_user(db, username="bossadmin", role=Role.admin, password=None)
    people = {name: make_labeler(db, name) for name in NAMES}
    for name, user in people.items():
        user.email = f"{name}@example.com"
    ann, bob, cat, dan = (people[n] for n in NAMES)

    chat = make_task(db, rank, messages=CHAT, completions=["Blue.", "Green.", "Purple, obv."])
    b, g, p = ids(chat)
    judge(
        db,
        ann,
        chat,
        rank,
        ranking=[[b], [g], [p]],
        flags={p: ["harmful"]},
        ratings={b: 6},
        comment="ann-comment",
        confidence=4,
        time_on_task_ms=1500,
    )
    judge(db, bob, chat, rank, ranking=[[b], [g, p]], when=dt.datetime(2026, 11, 12, tzinfo=dt.UTC))
    judge(db, cat, chat, rank, ranking=[[p], [g], [b]])

    plain = make_task(db, rank, prompt="What is 2+2?", completions=["4", "5", "22"])
    four, five, twenty_two = ids(plain)
    first = judge(db, ann, plain, rank, ranking=[[five], [four], [twenty_two]])
    labeling.edit(
        db,
        user=ann,
        judgment_id=first.id,
        answer=EditIn(
            ranking=[[four], [five], [twenty_two]], idempotency_key=secrets.token_hex(12)
        ),
    )
    bobs = judge(db, bob, plain, rank, ranking=[[four], [five], [twenty_two]])
    judge(
        db,
        bob,
        plain,
        rank,
        ranking=[[twenty_two], [five], [four]],
        comment="RECHECK",
        recheck_of=bobs,
    )
    judge(db, dan, plain, rank, ranking=[[four], [twenty_two], [five]])

    gold = make_task(
        db, rank, prompt="Gold?", completions=["g1", "g2", "g3"], is_gold=True,
        gold_ranking_positions=[[0], [1], [2]],
    )  # fmt: skip
    g1, g2, g3 = ids(gold)
    judge(db, ann, gold, rank, ranking=[[g1], [g2], [g3]])
    judge(db, bob, gold, rank, ranking=[[g3], [g2], [g1]])

    imported = make_task(db, rank, prompt="Imported?", completions=["imp-good", "imp-bad"])
    good, bad = ids(imported)
    db.add(
        Comparison(
            campaign_id=rank.id,
            prompt_id=imported.prompt_id,
            chosen_id=good,
            rejected_id=bad,
            source=ComparisonSource.imported,
        )
    )

    pair = make_task(db, duel, prompt="Pick one", completions=["left", "right"])
    judge(db, ann, pair, duel, strength=-2)  # left is better: margin 2
    judge(db, bob, pair, duel, strength=0)  # a tie

    haiku = make_task(db, demo, prompt="Write a haiku", completions=["An old silent pond"])
    judge(db, ann, haiku, demo, demonstration="Autumn moonlight")

    quality.exclude(db, user=cat, campaign=rank, reason="spam", actor_id=admin.id)
    auth_service.set_active(db, dan, False, actor_id=admin.id)
    db.commit()
    return {
        "rank": rank,
        "people": people,
        "chat": chat,
        "plain": plain,
        "gold": gold,
        "pair": pair,
        "completions": {
            "blue": b, "green": g, "purple": p, "four": four, "five": five, "22": twenty_two,
            "g1": g1, "g3": g3, "good": good, "bad": bad,
        },
    }  # fmt: skip


def export(database, settings, tmp_path, name="out.jsonl", **params) -> list[dict]:
    output = tmp_path / name
    service.export_to_file(database, ExportParams(**params), output, settings)
    return read_rows(output)


def read_rows(path: Path) -> list[dict]:
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    return [json.loads(line) for line in data.decode().splitlines()]


def texts(value) -> str:
    return value if isinstance(value, str) else value[-1]["content"]


def pairs(rows) -> list[tuple]:
    return sorted((texts(r["chosen"]), texts(r["rejected"]), r["annotator"]) for r in rows)


# --- TRL ------------------------------------------------------------------------------------


def test_trl_labeled_pairs(database, settings, hand, tmp_path):
    rows = export(database, settings, tmp_path, campaigns=["hand", "duel"], format="trl")
    people = hand["people"]
    by = {}
    for row in rows:
        by.setdefault(row["prompt_id"], []).append(row)
    chat_rows = by[hand["chat"].prompt_id]
    # ann's three pairs and bob's two strict ones; bob's tie dropped; cat is excluded.
    assert len(chat_rows) == 5
    assert chat_rows[0]["prompt"] == CHAT  # a multi-turn prompt: conversational format
    assert chat_rows[0]["chosen"] == [{"role": "assistant", "content": "Blue."}]
    # The edit counts, not the superseded version; the re-check and the disabled dan do not.
    plain = sorted((texts(r["chosen"]), texts(r["rejected"])) for r in by[hand["plain"].prompt_id])
    assert plain == sorted([("4", "5"), ("4", "22"), ("5", "22")] * 2)
    assert len(by[hand["gold"].prompt_id]) == 6  # gold judgments are exported too
    imported = [r for r in rows if r["source"] == "import"]
    assert len(imported) == 1 and imported[0]["annotator"] is None
    assert imported[0]["judgment_id"] is None
    # The pairwise strength is the margin; the file has a margin column for every row.
    duel = by[hand["pair"].prompt_id]
    assert [(texts(r["chosen"]), r["margin"]) for r in duel] == [("left", 2.0)]
    assert all(r["margin"] == 0.0 for r in rows if r["campaign"] == "hand")
    assert len(rows) == 5 + 6 + 6 + 1 + 1
    assert all(r["split"] == "train" for r in rows)
    # Single-turn prompts are chat messages too, so the file has one schema.
    assert {"role": "user", "content": "What is 2+2?"} in by[hand["plain"].prompt_id][0]["prompt"]
    # Rows are in comparison id order, ids included.
    assert [r["comparison_id"] for r in rows] == sorted(r["comparison_id"] for r in rows)
    annotators = {r["annotator"] for r in rows} - {None}
    assert len(annotators) == 2  # ann and bob
    assert not any(name in json.dumps(rows) for name in (*NAMES, "example.com", "bossadmin"))
    assert people  # (used above through the fixture)


def test_trl_plain_strings_without_chat_prompts(database, settings, hand, tmp_path):
    rows = export(database, settings, tmp_path, campaigns=["duel"], format="trl", ties="margin0")
    assert sorted((r["prompt"], r["chosen"], r["rejected"], r["margin"]) for r in rows) == [
        ("Pick one", "left", "right", 0.0),
        ("Pick one", "left", "right", 2.0),
    ]
    assert sorted(r["is_tie"] for r in rows) == [False, True]


def test_trl_consensus_pairs(database, settings, hand, tmp_path, db):
    rows = export(database, settings, tmp_path, campaigns=["hand"], format="trl", pairs="consensus")
    plain = [r for r in rows if r["prompt_id"] == hand["plain"].prompt_id]
    assert [(texts(r["chosen"]), texts(r["rejected"])) for r in plain] == [
        ("4", "5"),
        ("4", "22"),
        ("5", "22"),
    ]
    assert {r["consensus_source"] for r in plain} == {"bradley_terry"}
    assert plain[0]["votes"] == 2 and plain[0]["agreement"] == 1.0
    gold = [r for r in rows if r["prompt_id"] == hand["gold"].prompt_id]
    assert {r["consensus_source"] for r in gold} == {"gold"}
    assert (texts(gold[0]["chosen"]), texts(gold[0]["rejected"])) == ("g1", "g2")
    assert all(r["annotator"] is None for r in rows if "annotator" in r)
    # An admin's resolved ranking overrides the computed consensus.
    c = hand["completions"]
    quality.resolve(
        db,
        task=hand["plain"],
        actor_id=hand["people"]["annika"].id,
        ranking=[[c["22"]], [c["five"]], [c["four"]]],
    )
    db.commit()
    rows = export(database, settings, tmp_path, campaigns=["hand"], format="trl", pairs="consensus")
    plain = [r for r in rows if r["prompt_id"] == hand["plain"].prompt_id]
    assert (texts(plain[0]["chosen"]), texts(plain[0]["rejected"])) == ("22", "5")
    assert plain[0]["consensus_source"] == "resolved" and plain[0]["agreement"] == 0.0


# --- rankings, soft labels, demonstrations ----------------------------------------------------


def test_rankings_rows(database, settings, hand, tmp_path):
    rows = export(database, settings, tmp_path, campaigns=["hand"], format="rankings")
    assert [r["task_id"] for r in rows] == [hand["chat"].id, hand["plain"].id, hand["gold"].id]
    chat = rows[0]
    c = hand["completions"]
    assert chat["prompt"] == CHAT
    assert chat["completions"] == [
        {"id": c["blue"], "text": "Blue.", "source": "import"},
        {"id": c["green"], "text": "Green.", "source": "import"},
        {"id": c["purple"], "text": "Purple, obv.", "source": "import"},
    ]
    ann, bob = chat["judgments"]  # cat is excluded
    assert ann["ranking"] == [[c["blue"]], [c["green"]], [c["purple"]]]
    assert ann["flags"] == [{"completion_id": c["purple"], "flags": ["harmful"]}]
    assert ann["ratings"] == [{"completion_id": c["blue"], "rating": 6}]
    assert ann["comment"] == "ann-comment" and ann["confidence"] == 4
    assert ann["time_on_task_ms"] == 1500 and ann["guidelines_version"] == 1
    assert ann["display_order"] == [c["blue"], c["green"], c["purple"]]
    assert bob["ranking"] == [[c["blue"]], [c["green"], c["purple"]]]  # the tie, raw
    assert ann["annotator"] != bob["annotator"] and ann["annotator"].startswith("a-")
    assert chat["consensus"][0] == [c["blue"]] and chat["consensus_source"] == "bradley_terry"
    assert chat["agreement"] == pytest.approx(5 / 6)
    plain = rows[1]
    assert len(plain["judgments"]) == 2  # ann's edit and bob; no re-check, no dan
    assert "RECHECK" not in json.dumps(rows)
    assert rows[2]["is_gold"] and rows[2]["gold_ranking"] == [[c["g1"]], [c["g1"] + 1], [c["g3"]]]


def test_soft_labels(database, settings, hand, tmp_path):
    rows = export(database, settings, tmp_path, campaigns=["hand"], format="soft")
    c = hand["completions"]
    chat = {
        (r["chosen_id"], r["rejected_id"]): r
        for r in rows
        if r["prompt_id"] == hand["chat"].prompt_id
    }
    blue_green = chat[(c["blue"], c["green"])]
    assert (blue_green["votes_chosen"], blue_green["votes_tie"], blue_green["votes_rejected"]) == (
        2,
        0,
        0,
    )
    assert blue_green["p_chosen"] == pytest.approx((2 + 1) / (2 + 2))
    green_purple = chat[(c["green"], c["purple"])]
    # ann: green > purple, bob: a tie (left out of P by default, still counted).
    assert (green_purple["votes_chosen"], green_purple["votes_tie"]) == (1, 1)
    assert green_purple["p_chosen"] == pytest.approx(2 / 3)
    rows = export(
        database,
        settings,
        tmp_path,
        campaigns=["hand"],
        format="soft",
        ties="margin0",
        soft_prior=0,
    )
    green_purple = next(
        r for r in rows if r["chosen_id"] == c["green"] and r["rejected_id"] == c["purple"]
    )
    assert green_purple["p_chosen"] == pytest.approx(0.75) and green_purple["prior"] == 0
    gold = [r for r in rows if r["prompt_id"] == hand["gold"].prompt_id]
    assert all(r["p_chosen"] >= 0.5 for r in rows)
    assert {(r["votes_chosen"], r["votes_rejected"]) for r in gold} == {(1, 1)}
    assert texts(rows[-1]["chosen"]) == "imp-good" and rows[-1]["votes"] == 1  # fmt: skip


def test_sft_rows(database, settings, hand, tmp_path):
    rows = export(database, settings, tmp_path, campaigns=["demo"], format="sft")
    assert [(r["prompt"], r["completion"], r["source"]) for r in rows] == [
        ("Write a haiku", "Autumn moonlight", "human"),
        ("Write a haiku", "An old silent pond", "import"),
    ]
    assert rows[0]["annotator"].startswith("a-") and rows[1]["annotator"] is None
    rows = export(
        database, settings, tmp_path, campaigns=["demo"], format="sft", sft_style="messages",
        sources=["human"],
    )  # fmt: skip
    assert [r["messages"] for r in rows] == [
        [
            {"role": "user", "content": "Write a haiku"},
            {"role": "assistant", "content": "Autumn moonlight"},
        ]
    ]


# --- filters --------------------------------------------------------------------------------


def count(database, settings, tmp_path, **params) -> int:
    params.setdefault("campaigns", ["hand"])
    params.setdefault("format", "trl")
    return len(export(database, settings, tmp_path, **params))


def test_filters_one_by_one(database, settings, hand, tmp_path, db):
    base = count(database, settings, tmp_path)
    assert base == 5 + 6 + 6 + 1
    # cat's three pairs on the chat task.
    assert count(database, settings, tmp_path, include_excluded=True) == base + 3
    # dan's three pairs.
    assert count(database, settings, tmp_path, include_inactive=True) == base + 3
    # bob's tie kept with margin 0.
    assert count(database, settings, tmp_path, ties="margin0") == base + 1
    # Purple was flagged by ann: the chat pairs with purple go (ann 2, bob 1).
    assert count(database, settings, tmp_path, flagged="drop") == base - 3
    assert count(database, settings, tmp_path, sources=["import"]) == 1
    assert count(database, settings, tmp_path, sources=["human"]) == base - 1
    assert count(database, settings, tmp_path, sources=["ai"]) == 0
    # Dates: bob's chat judgment is on the 12th, the rest on the 10th; ann's edit and the
    # import are today.
    assert count(database, settings, tmp_path, since="2026-11-11", until="2026-11-12") == 2
    assert count(database, settings, tmp_path, until="2026-11-10") == base - 2 - 3 - 1
    # Gold accuracy: ann 1.0, bob 0.0; the imported pair has no labeler and stays.
    assert count(database, settings, tmp_path, min_gold_accuracy=0.9) == 3 + 3 + 3 + 1
    # Agreement: chat 5/6 (ann, bob), plain 1.0, gold 0.0; imported pairs have no task.
    assert count(database, settings, tmp_path, min_agreement=0.8) == 5 + 6 + 1
    assert count(database, settings, tmp_path, min_agreement=0.9) == 6 + 1
    # Dedupe: the same imported pair twice is written once, unless asked.
    rank, c = hand["rank"], hand["completions"]
    db.add(
        Comparison(
            campaign_id=rank.id,
            prompt_id=db.scalar(select(Prompt.id).where(Prompt.text == "Imported?")),
            chosen_id=c["good"],
            rejected_id=c["bad"],
            source=ComparisonSource.imported,
        )
    )
    db.commit()
    assert count(database, settings, tmp_path) == base
    assert count(database, settings, tmp_path, dedupe=False) == base + 1


def test_bad_parameters_are_refused(db, database, settings, tmp_path):
    with pytest.raises(ExportError) as missing:
        service.export_to_file(
            database, ExportParams(campaigns=["nope"], format="trl"), tmp_path / "x.jsonl", settings
        )
    assert missing.value.status_code == 404 and "nope" in str(missing.value)
    assert list(tmp_path.iterdir()) == []
    for bad in (
        {"campaigns": [], "format": "trl"},
        {"campaigns": ["a"], "format": "csv"},
        {"campaigns": ["a"], "format": "trl", "min_agreement": 2},
        {"campaigns": ["a"], "format": "trl", "test_fraction": 0.9},
        {"campaigns": ["a"], "format": "trl", "since": "2026-02-01", "until": "2026-01-01"},
        {"campaigns": ["a"], "format": "soft", "pairs": "consensus"},
        {"campaigns": ["a"], "format": "trl", "colour": "blue"},
    ):
        with pytest.raises(ExportError) as caught:
            parse_params(bad)
        assert caught.value.status_code == 422 and str(caught.value)


# --- split, determinism, pseudonyms ---------------------------------------------------------


def test_split_by_prompt_is_deterministic(database, settings, judged, tmp_path):
    def split(seed: int) -> dict[int, str]:
        rows = export(
            database, settings, tmp_path, campaigns=["quality"], format="trl",
            test_fraction=0.3, seed=seed,
        )  # fmt: skip
        sides: dict[int, set[str]] = {}
        for row in rows:
            sides.setdefault(row["prompt_id"], set()).add(row["split"])
        assert all(len(s) == 1 for s in sides.values())  # no prompt on both sides
        return {prompt: s.pop() for prompt, s in sides.items()}

    first, again, other = split(1), split(1), split(2)
    assert first == again
    assert first != other
    assert 0 < list(first.values()).count("test") < len(first)


def test_same_parameters_same_bytes_while_labeling_goes_on(database, settings, hand, tmp_path, db):
    for fmt in ("trl", "rankings", "soft", "sft"):
        for suffix in ("jsonl", "jsonl.gz", "parquet"):
            campaigns = ["demo"] if fmt == "sft" else ["hand", "duel"]
            output = tmp_path / f"a-{fmt}.{suffix}"
            made = service.export_to_file(
                database, ExportParams(campaigns=campaigns, format=fmt), output, settings
            )
            first = output.read_bytes()
            assert made["sha256"] == hashlib.sha256(first).hexdigest()
            again = ExportParams.model_validate(made["parameters"])
            service.export_to_file(database, again, output, settings)
            assert output.read_bytes() == first, (fmt, suffix)
    # Labeling goes on: a new judgment, an edit of a judgment read before, a new import.
    hand_made = ExportParams(campaigns=["hand"], format="trl", test_fraction=0.5)
    output = tmp_path / "before.parquet"
    made = service.export_to_file(database, hand_made, output, settings)
    people, c = hand["people"], hand["completions"]
    eve = make_labeler(db, "eve")
    judge(db, eve, hand["plain"], hand["rank"], ranking=[[c["22"]], [c["four"]], [c["five"]]])
    bobs = db.scalar(
        select(Judgment).where(
            Judgment.user_id == people["bobbie"].id,
            Judgment.task_id == hand["gold"].id,
        )
    )
    labeling.edit(
        db,
        user=people["bobbie"],
        judgment_id=bobs.id,
        answer=EditIn(
            ranking=[[c["g1"]], [c["g1"] + 1], [c["g3"]]], idempotency_key=secrets.token_hex(12)
        ),
    )
    db.commit()
    again = tmp_path / "after.parquet"
    service.export_to_file(
        database, ExportParams.model_validate(made["parameters"]), again, settings
    )
    assert again.read_bytes() == output.read_bytes()
    fresh = service.export_to_file(database, hand_made, tmp_path / "fresh.parquet", settings)
    assert fresh["sha256"] != made["sha256"]  # a new export sees the new labels


def test_pseudonyms(database, settings, hand, tmp_path):
    def annotators(**params) -> set[str]:
        rows = export(database, settings, tmp_path, campaigns=["hand"], format="trl", **params)
        return {r["annotator"] for r in rows if r["annotator"]}

    snapshot_a = annotators()
    snapshot_b = annotators(since="2026-01-01")  # other parameters, other pseudonyms
    assert len(snapshot_a) == 2 and not snapshot_a & snapshot_b
    stable_a = annotators(pseudonyms="stable")
    stable_b = annotators(pseudonyms="stable", since="2026-01-01")
    assert stable_a == stable_b and all(a.startswith("s-") for a in stable_a)
    other_key = settings.model_copy(update={"secret_key": "k" * 48})
    rows = export(
        database, other_key, tmp_path, campaigns=["hand"], format="trl", pseudonyms="stable"
    )
    assert not {r["annotator"] for r in rows} & stable_a  # keyed by the server's secret


# --- snapshots ------------------------------------------------------------------------------


def make_snapshot(db, **params) -> ExportSnapshot:
    snapshot = service.create_snapshot(db, ExportParams(**params), actor_id=None)
    db.commit()
    return snapshot


def test_snapshot_files_manifest_and_card(db, database, settings, hand):
    snapshot = make_snapshot(
        db, campaigns=["hand", "duel"], format="trl", file_format="parquet", test_fraction=0.5,
        seed=3,
    )  # fmt: skip
    assert snapshot.state == "pending"
    seen = []
    built = service.build_snapshot(database, snapshot.id, settings, progress=seen.append)
    assert built.state == "ready", built.error
    folder = service.snapshot_folder(settings, built)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["README.md", "manifest.json", "test.parquet", "train.parquet"]
    manifest_bytes = (folder / "manifest.json").read_bytes()
    assert hashlib.sha256(manifest_bytes).hexdigest() == built.manifest_sha256
    manifest = json.loads(manifest_bytes)
    for entry in manifest["files"]:
        data = (folder / entry["name"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["bytes"] == len(data)
    assert {f["name"] for f in built.files} == set(names)
    counts = manifest["row_counts"]
    assert counts == built.row_counts and counts["total"] == 19 == seen[-1]
    assert counts["train"] == len(read_rows(folder / "train.parquet"))
    assert counts["test"] == len(read_rows(folder / "test.parquet"))
    assert manifest["parameters"]["as_of"]["comparison_id"] > 0
    assert built.parameters["as_of"] == manifest["parameters"]["as_of"]
    assert manifest["labelers"] == 2 and manifest["guidelines_versions"] == {
        "duel": [1],
        "hand": [1],
    }
    card = (folder / "README.md").read_text()
    assert "license:" in card and "pairwise agreement" in card and "seed 3" in card
    everything = card + manifest_bytes.decode()
    for name in (*NAMES, "example.com", "bossadmin"):
        assert name not in everything  # no usernames or emails
    # The rebuilt rows are what export_to_file gives with the recorded parameters.
    assert not list(folder.parent.glob(".snapshot-*"))
    again = service.build_snapshot(database, snapshot.id, settings)
    assert again.manifest_sha256 == built.manifest_sha256  # a ready snapshot is left alone


def test_failed_build_leaves_no_folder(db, database, settings, hand, monkeypatch):
    snapshot = make_snapshot(db, campaigns=["hand"], format="rankings")

    def broken(ctx):
        yield from formats.rankings_rows(ctx)
        raise RuntimeError("disk on fire")

    monkeypatch.setitem(formats.ROWS, "rankings", broken)
    built = service.build_snapshot(database, snapshot.id, settings)
    assert built.state == "failed" and "disk on fire" in built.error
    assert built.path is None
    root = service.exports_root(settings)
    assert list(root.iterdir()) == []


def test_create_snapshot_refuses_unknown_campaigns(db):
    with pytest.raises(ExportError) as caught:
        service.create_snapshot(db, ExportParams(campaigns=["nope"], format="trl"), actor_id=None)
    assert caught.value.status_code == 404
    assert db.scalar(select(ExportSnapshot.id)) is None


# --- real clients ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["trl", "rankings", "soft", "sft"])
@pytest.mark.parametrize("suffix", ["jsonl", "jsonl.gz", "parquet"])
def test_datasets_loads_every_format(database, settings, hand, tmp_path, fmt, suffix):
    datasets = pytest.importorskip("datasets")
    campaigns = ["demo"] if fmt == "sft" else ["hand", "duel"]
    output = tmp_path / f"{fmt}.{suffix}"
    service.export_to_file(
        database, ExportParams(campaigns=campaigns, format=fmt), output, settings
    )
    kind = "parquet" if suffix == "parquet" else "json"
    loaded = datasets.load_dataset(
        kind, data_files=str(output), split="train", cache_dir=str(tmp_path / "cache")
    )
    assert len(loaded) == len(read_rows(output)) > 0
    assert loaded[0]["split"] == "train"
