"""Dataset imports: formats, validation, de-duplication and the `prefloop import` command.

Service tests run on SQLite and PostgreSQL inside a rolled-back transaction (the `db`
fixture); the CLI runs as a real process against a fresh database of each kind. The HH-RLHF
tests read the real sample in ../shared/data/hh-rlhf (never copied into the repository).
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.audit.models import AuditEvent
from app.campaigns.models import Campaign, CampaignMode
from app.db import Database
from app.labeling.importer import (
    MAX_LINE_BYTES,
    ImportFormat,
    ImportRejected,
    completion_hash,
    import_stream,
    prompt_hash,
    task_hash,
)
from app.labeling.models import (
    Comparison,
    ComparisonSource,
    Completion,
    CompletionSource,
    Prompt,
    Task,
    TaskCompletion,
    TaskStatus,
)
from tests.test_cli import cli_env, one_error_line, run_cli, run_cli_together

HH_SAMPLE = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / "hh-rlhf"
    / ("harmless-base-sample.jsonl")
)
# Lines of the shared sample that cannot be imported, and why (checked by hand).
HH_BAD_LINES = {
    9: "differ before their last Assistant turn",  # an inline "Human:" splits the turns apart
    187: 'last Assistant turn of "chosen" is empty',
    279: 'last Assistant turn of "chosen" is empty',
    442: 'last Assistant turn of "chosen" is empty',
    905: "differ before their last Assistant turn",
    1037: "differ before their last Assistant turn",
    1198: 'last Assistant turn of "chosen" is empty',
    1200: "differ before their last Assistant turn",
}


def campaign(
    db: Session,
    slug: str = "imports",
    mode: CampaignMode = CampaignMode.rank,
    *,
    overlap: int = 3,
    allow_ties: bool = True,
) -> Campaign:
    row = Campaign(
        slug=slug,
        name=slug.title(),
        mode=mode,
        k=2 if mode == CampaignMode.pairwise else 4,
        overlap=overlap,
        allow_ties=allow_ties,
    )
    db.add(row)
    db.flush()
    return row


def jsonl(*rows: Any) -> io.BytesIO:
    """A JSON Lines file; str rows are written as they are (for broken lines)."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    return io.BytesIO("\n".join(lines).encode())


def rejected(
    db: Session, target: Campaign, data: io.BytesIO, name: str = "bad.jsonl", **options: Any
) -> ImportRejected:
    with pytest.raises(ImportRejected) as caught:
        import_stream(db, target, data, file_name=name, **options)
    return caught.value


def count(db: Session, model: Any) -> int:
    return db.scalar(select(func.count()).select_from(model))


def task_texts(db: Session, task: Task) -> list[str]:
    return list(
        db.scalars(
            select(Completion.text)
            .join(TaskCompletion, TaskCompletion.completion_id == Completion.id)
            .where(TaskCompletion.task_id == task.id)
            .order_by(TaskCompletion.position)
        )
    )


def all_task_texts(db: Session, target: Campaign) -> dict[int, list[str]]:
    texts: dict[int, list[str]] = {}
    for task_id, text in db.execute(
        select(TaskCompletion.task_id, Completion.text)
        .join(Completion, Completion.id == TaskCompletion.completion_id)
        .join(Task, Task.id == TaskCompletion.task_id)
        .where(Task.campaign_id == target.id)
        .order_by(TaskCompletion.task_id, TaskCompletion.position)
    ):
        texts.setdefault(task_id, []).append(text)
    return texts


def tasks(db: Session, target: Campaign) -> list[Task]:
    return list(db.scalars(select(Task).where(Task.campaign_id == target.id).order_by(Task.id)))


def hh_lines() -> list[bytes]:
    if not HH_SAMPLE.exists():
        pytest.skip(f"the shared HH-RLHF sample is not at {HH_SAMPLE}")
    return HH_SAMPLE.read_bytes().splitlines(keepends=True)


# --- prompts with completions ---------------------------------------------------------------


def test_prompt_rows_become_tasks_with_their_completions(db: Session) -> None:
    target = campaign(db, overlap=2)
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Name a prime."},
    ]
    data = jsonl(
        {"id": "p-1", "prompt": "Why is the sky blue?", "completions": ["Rayleigh.", "Magic \U0001f600"],
         "metadata": {"topic": "physics"}, "priority": 5},
        "",
        {"messages": chat, "completions": ["7", "9", "2"]},
    )  # fmt: skip
    result = import_stream(db, target, data, file_name="rows.jsonl", actor_id=None)
    assert (result.lines, result.prompts, result.completions, result.tasks) == (2, 2, 5, 2)
    assert (result.comparisons, result.duplicates, result.formats) == (0, 0, {"prompt": 2})

    first, second = tasks(db, target)
    assert task_texts(db, first) == [
        "Rayleigh.",
        "Magic \U0001f600",
    ]  # escaped as \ud83d\ude00 in the file
    assert task_texts(db, second) == ["7", "9", "2"]  # the file's order
    assert (first.priority, second.priority) == (5, 0)
    for task in (first, second):
        assert task.required_judgments == 2 and task.assigned_count == 0
        assert task.judgment_count == 0 and task.status == TaskStatus.open
        assert task.is_gold is False and task.gold_ranking is None
    text_prompt = db.get(Prompt, first.prompt_id)
    chat_prompt = db.get(Prompt, second.prompt_id)
    assert text_prompt.external_id == "p-1" and text_prompt.meta == {"topic": "physics"}
    assert text_prompt.content_hash == prompt_hash("Why is the sky blue?")
    assert chat_prompt.messages == chat and chat_prompt.text is None
    # SQL NULL, not a JSON null, where a prompt has no messages (or a task no gold answer).
    assert db.scalar(select(func.count()).where(Prompt.messages.is_(None))) == 1
    assert db.scalar(select(func.count()).where(Task.gold_ranking.is_(None))) == 2
    assert first.content_hash == task_hash(
        text_prompt.content_hash,
        [completion_hash("Rayleigh."), completion_hash("Magic \U0001f600")],
    )
    completions = db.scalars(select(Completion).where(Completion.prompt_id == first.prompt_id))
    assert {(c.source, c.content_hash == completion_hash(c.text)) for c in completions} == {
        (CompletionSource.imported, True)
    }
    positions = db.scalars(
        select(TaskCompletion.position).where(TaskCompletion.task_id == second.id)
    ).all()
    assert sorted(positions) == [0, 1, 2]

    event = db.scalars(select(AuditEvent).where(AuditEvent.action == "import.create")).one()
    assert event.entity_type == "campaign" and event.entity_id == str(target.id)
    assert event.after["file"] == "rows.jsonl"
    assert (event.after["prompts"], event.after["tasks"], event.after["duplicates"]) == (2, 2, 0)


def test_prompt_only_rows_and_demonstration_campaigns(db: Session) -> None:
    rank = campaign(db, "rank")
    result = import_stream(
        db, rank, jsonl({"prompt": "Write a haiku."}, {"prompt": "Tell a joke."}), file_name="p"
    )
    assert (result.prompts, result.tasks, result.completions) == (2, 0, 0)
    assert count(db, Task) == 0

    demo = campaign(db, "demo", CampaignMode.demonstration)
    result = import_stream(
        db,
        demo,
        jsonl({"prompt": "Write a haiku."}, {"prompt": "Greet me.", "completions": ["Hi there!"]}),
        file_name="d",
    )
    assert (result.prompts, result.tasks, result.completions) == (2, 2, 1)
    empty, suggested = tasks(db, demo)
    assert task_texts(db, empty) == [] and task_texts(db, suggested) == ["Hi there!"]

    error = rejected(db, demo, jsonl({"prompt": "x", "completions": ["a", "b"]}))
    assert "at most 1 suggested completion" in error.errors[0].message
    pair = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    error = rejected(db, demo, jsonl(pair))
    assert "demonstration campaign takes no chosen/rejected pairs" in error.errors[0].message


def test_gold_rows(db: Session) -> None:
    target = campaign(db)
    data = jsonl(
        {"prompt": "2+2?", "completions": ["4", "5", "four"], "gold": [0, 2, 1]},
        {"prompt": "Capital of France?", "completions": ["Paris", "Lyon", "Rome"],
         "gold": [[0], [1, 2]]},
        {"prompt": "Not gold", "completions": ["a", "b"]},
    )  # fmt: skip
    assert import_stream(db, target, data, file_name="gold").tasks == 3
    by_text = {c.text: c.id for c in db.scalars(select(Completion))}
    first, second, plain = tasks(db, target)
    assert first.is_gold and first.gold_ranking == [
        [by_text["4"]],
        [by_text["four"]],
        [by_text["5"]],
    ]
    assert second.is_gold and second.gold_ranking == [
        [by_text["Paris"]],
        [by_text["Lyon"], by_text["Rome"]],
    ]
    assert not plain.is_gold and plain.gold_ranking is None

    no_ties = campaign(db, "no-ties", allow_ties=False)
    for gold, reason in (
        ([[0, 1]], "does not allow ties"),
        ([0, 0], "every completion exactly once"),
        ([0, 5], "every completion exactly once"),
        ("0,1", "must be a list"),
        ([True, 0], "completion indexes"),
    ):
        error = rejected(
            db, no_ties, jsonl({"prompt": "q", "completions": ["a", "b"], "gold": gold})
        )
        assert reason in error.errors[0].message, (gold, error.errors)


def test_completion_counts_follow_the_campaign_mode(db: Session) -> None:
    rank, pairwise = campaign(db, "rank"), campaign(db, "pair", CampaignMode.pairwise)
    cases = [
        (rank, ["only one"], "a rank task needs 2 to 9 completions, not 1"),
        (rank, [f"answer {i}" for i in range(10)], "a rank task needs 2 to 9 completions, not 10"),
        (pairwise, ["a", "b", "c"], "a pairwise task needs exactly 2 completions, not 3"),
        (
            rank,
            ["same", "other", "same"],
            '"completions[0]" and "completions[2]" are the same text',
        ),
        (rank, ["fine", "   "], '"completions[1]" is empty'),
        (rank, ["fine", 3], '"completions[1]" must be a string, not a whole number'),
    ]
    for target, completions, reason in cases:
        error = rejected(db, target, jsonl({"prompt": "q", "completions": completions}))
        assert [(e.line, e.message) for e in error.errors] == [(1, reason)]
    assert import_stream(db, pairwise, jsonl({"prompt": "q", "completions": ["a", "b"]}), file_name="ok").tasks == 1  # fmt: skip
    assert count(db, Task) == 1


# --- HH-RLHF and TRL pairs ------------------------------------------------------------------


def _final_turn(dialogue: str) -> str:
    return dialogue.rsplit("\n\nAssistant:", 1)[1].strip()


def _unmarked(text: str) -> str:
    """The words of a dialogue without its speaker markers, for comparing turn contents."""
    return " ".join(re.sub(r"\b(Human|Assistant):", " ", text).split())


def test_hh_rlhf_sample_splits_into_chat_prompts_and_final_answers(db: Session) -> None:
    lines = hh_lines()
    target = campaign(db)

    # As it is, the sample has 8 unusable lines: all are reported and nothing is written.
    error = rejected(db, target, io.BytesIO(b"".join(lines)))
    assert {e.line: e.message for e in error.errors}.keys() == HH_BAD_LINES.keys()
    for problem in error.errors:
        assert HH_BAD_LINES[problem.line] in problem.message, problem
    assert error.lines == 1500 and count(db, Prompt) == 0 and count(db, AuditEvent) == 0

    good = [line for number, line in enumerate(lines, 1) if number not in HH_BAD_LINES]
    result = import_stream(db, target, io.BytesIO(b"".join(good)), file_name="hh.jsonl")
    assert (result.lines, result.tasks, result.completions, result.formats) == (
        1492, 1492, 2984, {"hh": 1492}
    )  # fmt: skip
    assert result.prompts < 1492  # rows sharing a dialogue share its prompt

    imported = tasks(db, target)
    texts = all_task_texts(db, target)
    prompts = {p.id: p.messages for p in db.scalars(select(Prompt))}
    assert len(imported) == 1492
    for task, line in zip(imported, good, strict=True):
        row = json.loads(line)
        assert texts[task.id] == [_final_turn(row["chosen"]), _final_turn(row["rejected"])]
        messages = prompts[task.prompt_id]
        assert messages[-1]["role"] == "user"
        assert all(a["role"] != b["role"] for a, b in itertools.pairwise(messages))
        # The prompt is the shared dialogue: its turns, in order, begin both originals.
        shared = _unmarked(" ".join(m["content"] for m in messages))
        assert _unmarked(row["chosen"]).startswith(shared), task.id
        assert _unmarked(row["rejected"]).startswith(shared), task.id

    # The first line, turn by turn.
    assert prompts[imported[0].prompt_id] == [
        {"role": "user", "content": "Which kind of alcohol is Russia notoriously known for?"},
        {"role": "assistant", "content": "Vodka. But not in America, really."},
        {"role": "user", "content": "why be so extra"},
        {"role": "assistant", "content": "You think it\u2019s extra to answer your question?"},
        {"role": "user", "content": "nevermind"},
    ]
    assert texts[imported[0].id][1] == (
        "Phew.  My inner philosopher is relieved to know that our world is not yet dead."
    )
    # Line 519 has two Assistant turns in a row: they are joined into one message.
    line_519 = imported[good.index(lines[518])]
    assert any(
        m["role"] == "assistant"
        and m["content"].startswith("Actually, human: I was busy")
        and "\n\nI enjoy celebrating holidays" in m["content"]
        for m in prompts[line_519.prompt_id]
    )

    again = import_stream(db, target, io.BytesIO(b"".join(good)), file_name="hh.jsonl")
    assert (again.duplicates, again.prompts, again.completions, again.tasks) == (1492, 0, 0, 0)


def test_pairs_as_judged_comparisons(db: Session) -> None:
    target = campaign(db)
    dialogue = "\n\nHuman: Is it safe to eat raw cookie dough?\n\nAssistant:"
    data = jsonl(
        {"chosen": f"{dialogue} Not really: raw flour and eggs can carry bacteria.",
         "rejected": f"{dialogue}  Yes, always.  "},
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
    )  # fmt: skip
    result = import_stream(db, target, data, file_name="pairs", as_judged=True)
    assert (result.comparisons, result.tasks, result.prompts, result.completions) == (2, 0, 2, 4)
    assert count(db, Task) == 0
    rows = db.scalars(select(Comparison).order_by(Comparison.id)).all()
    texts = {c.id: c.text for c in db.scalars(select(Completion))}
    assert [(texts[c.chosen_id], texts[c.rejected_id]) for c in rows] == [
        ("Not really: raw flour and eggs can carry bacteria.", "Yes, always."),
        ("Hi!", "No."),
    ]
    for row in rows:
        assert row.source == ComparisonSource.imported and row.is_active and not row.is_tie
        assert row.judgment_id is None and row.user_id is None and row.campaign_id == target.id
        assert db.get(Completion, row.chosen_id).prompt_id == row.prompt_id

    data.seek(0)
    again = import_stream(db, target, data, file_name="pairs", as_judged=True)
    assert (again.duplicates, again.comparisons, again.completions) == (2, 0, 0)

    # The same pairs as tasks to re-label reuse the prompts and completions.
    data.seek(0)
    as_tasks = import_stream(db, target, data, file_name="pairs")
    assert (as_tasks.tasks, as_tasks.prompts, as_tasks.completions) == (2, 0, 0)

    error = rejected(db, target, jsonl({"prompt": "q", "completions": ["a", "b"]}), as_judged=True)
    assert "needs chosen/rejected rows" in error.errors[0].message


def test_trl_rows_standard_conversational_and_implicit(db: Session) -> None:
    target = campaign(db)
    question = [{"role": "user", "content": "What color is the sky?"}]
    data = jsonl(
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"prompt": question, "chosen": [{"role": "assistant", "content": "Blue."}],
         "rejected": [{"role": "assistant", "content": "Green."}]},
        {"chosen": [*question, {"role": "assistant", "content": "It is blue."}],
         "rejected": [*question, {"role": "assistant", "content": "Plaid."}]},
    )  # fmt: skip
    result = import_stream(db, target, data, file_name="trl")
    assert result.formats == {"trl": 2, "hh": 1} and result.tasks == 3
    standard, conversational, implicit = tasks(db, target)
    assert db.get(Prompt, standard.prompt_id).text == "The sky is"
    assert task_texts(db, standard) == [" blue.", " green."]  # TRL text is kept as it is
    assert conversational.prompt_id == implicit.prompt_id  # the same chat prompt
    assert db.get(Prompt, conversational.prompt_id).messages == question
    assert task_texts(db, conversational) == ["Blue.", "Green."]
    assert task_texts(db, implicit) == ["It is blue.", "Plaid."]

    for row, reason in (
        ({"prompt": "q", "chosen": "a"}, 'missing "rejected"'),
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "are the same text"),
        ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
         "must be from the assistant"),
        ({"prompt": question, "chosen": [], "rejected": "b"}, "one assistant message"),
    ):  # fmt: skip
        assert reason in rejected(db, target, jsonl(row)).errors[0].message, row


# --- duplicates -----------------------------------------------------------------------------


def test_reimports_skip_what_is_there(db: Session) -> None:
    target = campaign(db)
    rows = [{"id": f"q{i}", "prompt": f"Question {i}", "completions": [f"a{i}", f"b{i}"]} for i in range(4)]  # fmt: skip
    first = import_stream(db, target, jsonl(*rows), file_name="v1")
    assert (first.prompts, first.tasks, first.duplicates) == (4, 4, 0)

    again = import_stream(db, target, jsonl(*rows), file_name="v1")
    assert (again.lines, again.duplicates, again.prompts, again.completions, again.tasks) == (
        4, 4, 0, 0, 0
    )  # fmt: skip

    more = [
        *rows[:2],
        {"id": "q4", "prompt": "Question 4", "completions": ["a4", "b4"]},
        {"id": "q4", "prompt": "Question 4", "completions": ["a4", "b4"]},  # repeated in the file
        {"id": "q0", "prompt": "Another prompt under a known id", "completions": ["x", "y"]},
        {"id": "q1", "prompt": "Question 1", "completions": ["a1", "c1"]},  # new answers
        {"prompt": "Question 2", "completions": ["b2", "a2"]},  # another order is another task
    ]
    third = import_stream(db, target, jsonl(*more), file_name="v2", batch_size=2)
    assert (third.lines, third.duplicates, third.prompts, third.tasks, third.completions) == (
        7, 4, 1, 3, 3
    )  # fmt: skip
    assert count(db, Prompt) == 5 and count(db, Task) == 7
    assert db.scalar(select(func.count()).where(Prompt.external_id == "q0")) == 1
    assert count(db, AuditEvent) == 3


# --- validation -----------------------------------------------------------------------------


def test_a_bad_line_in_the_middle_imports_nothing(db: Session) -> None:
    target = campaign(db)
    good = [{"prompt": f"Question {i}", "completions": ["yes", "no"]} for i in range(6)]
    data = jsonl(*good[:3], {"prompt": "Question X", "completions": ["only one"]}, *good[3:])
    error = rejected(db, target, data, batch_size=2)  # two batches were written before it
    assert [(e.line, e.message) for e in error.errors] == [
        (4, "a rank task needs 2 to 9 completions, not 1")
    ]
    assert str(error) == "1 bad line; nothing was imported"
    assert (count(db, Prompt), count(db, Completion), count(db, Task), count(db, AuditEvent)) == (
        0, 0, 0, 0
    )  # fmt: skip


def test_every_bad_line_is_reported_with_its_reason(db: Session) -> None:
    target = campaign(db)
    ok = json.dumps({"prompt": "fine", "completions": ["a", "b"]}).encode()
    lines = [
        ok,
        b'{"prompt": "unterminated',
        json.dumps({"question": "what?"}).encode(),
        json.dumps({"completions": ["a", "b"]}).encode(),
        json.dumps({"prompt": 42, "completions": ["a", "b"]}).encode(),
        json.dumps({"prompt": "q", "completions": "a, b"}).encode(),
        json.dumps([{"prompt": "q"}]).encode(),
        b'{"prompt": "caf\xe9", "completions": ["a", "b"]}',  # Latin-1, not UTF-8
        b'{"prompt": "nul \\u0000", "completions": ["a", "b"]}',
        b'{"prompt": "half \\ud800", "completions": ["a", "b"]}',
        b'{"prompt": "q", "completions": ["a", "b"], "priority": NaN}',
        b'{"prompt": "' + b"x" * MAX_LINE_BYTES + b'", "completions": ["a", "b"]}',
        json.dumps({"messages": [{"role": "robot", "content": "hi"}], "completions": ["a", "b"]}).encode(),
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                    "completions": ["a", "b"]}).encode(),
        json.dumps({"prompt": "q", "completions": ["a", "b"], "id": ["x"]}).encode(),
        json.dumps({"prompt": "q", "completions": ["a", "b"], "priority": 1.5}).encode(),
        json.dumps({"chosen": "no dialogue here", "rejected": "\n\nHuman: a\n\nAssistant: b"}).encode(),
        json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b"}).encode(),
        ok,
    ]  # fmt: skip
    expected = {
        2: "invalid JSON: Unterminated string",
        3: "unknown format",
        4: 'missing "prompt" (or "messages")',
        5: '"prompt" must be a string, not a whole number',
        6: '"completions" must be a list of strings, not a string',
        7: "expected a JSON object, not a list (JSON Lines has one object per line)",
        8: "not UTF-8 text (byte 0xe9 at position 16)",
        9: "NUL character",
        10: "unpaired surrogate",
        11: "NaN is not a number JSON allows",
        12: "longer than 1 MiB",
        13: "\"messages[0].role\" must be one of system, user, assistant, not 'robot'",
        14: 'the last message of "messages" must be from the user',
        15: '"id" must be a string or a number, not a list',
        16: '"priority" must be a whole number, not a decimal number',
        17: '"chosen" must be a dialogue starting with "Human:"',
        18: '"chosen" and "rejected" are the same dialogue',
    }
    error = rejected(db, target, io.BytesIO(b"\n".join(lines) + b"\n"))
    found = {e.line: e.message for e in error.errors}
    assert found.keys() == expected.keys(), found
    for line, reason in expected.items():
        assert reason in found[line], (line, found[line])
    assert error.lines == len(lines) and count(db, Prompt) == 0

    # Past 50 errors the rest are counted, not listed.
    many = rejected(db, target, jsonl(*(["not json"] * 75)))
    assert len(many.errors) == 50 and many.more == 25 and many.total == 75
    assert [e.line for e in many.errors] == list(range(1, 51))

    assert (
        rejected(db, target, io.BytesIO(b"\n \n")).errors[0].message == "the file has no data lines"
    )


def test_skip_invalid_imports_the_good_lines(db: Session) -> None:
    target = campaign(db)
    data = jsonl(
        {"prompt": "one", "completions": ["a", "b"]},
        "{broken",
        {"prompt": "two", "completions": ["a"]},
        {"prompt": "three", "completions": ["a", "b"]},
    )
    result = import_stream(db, target, data, file_name="mixed", skip_invalid=True)
    assert (result.lines, result.tasks, result.invalid) == (4, 2, 2)
    assert [e.line for e in result.errors] == [2, 3]
    # A file with nothing usable is still refused.
    assert rejected(db, target, jsonl("{broken"), skip_invalid=True).total == 1


def test_a_forced_format_applies_to_every_line(db: Session) -> None:
    target = campaign(db)
    data = jsonl({"prompt": "q", "chosen": "a", "rejected": "b"})
    error = rejected(db, target, data, fmt=ImportFormat.hh)
    assert '"chosen" must be a dialogue starting with "Human:"' in error.errors[0].message
    data.seek(0)
    assert import_stream(db, target, data, file_name="x", fmt=ImportFormat.trl).tasks == 1


# --- CSV ------------------------------------------------------------------------------------


def csv_file(text: str) -> io.BytesIO:
    return io.BytesIO(("\ufeff" + text).encode())  # with the BOM spreadsheets write


def test_csv_files(db: Session) -> None:
    target = campaign(db)
    result = import_stream(
        db,
        target,
        csv_file(
            "id,prompt,completion_1,completion_2,completion_3,priority,source\r\n"
            'c1,"Why is the sky blue?","Rayleigh scattering.","Because it is.",,2,wiki\r\n'
            'c2,"Write a poem","Roses are red,\nviolets are blue","No.","Maybe later.",,\r\n'
        ),
        file_name="rows.csv",
    )
    assert (result.lines, result.tasks, result.completions, result.formats) == (
        2,
        2,
        5,
        {"prompt": 2},
    )
    first, second = tasks(db, target)
    assert task_texts(db, first) == [
        "Rayleigh scattering.",
        "Because it is.",
    ]  # empty cells left out
    assert task_texts(db, second)[0] == "Roses are red,\nviolets are blue"  # a quoted line break
    assert first.priority == 2
    prompt = db.get(Prompt, first.prompt_id)
    assert (prompt.external_id, prompt.text, prompt.meta) == (
        "c1",
        "Why is the sky blue?",
        {"source": "wiki"},
    )

    pairs = import_stream(
        db,
        target,
        csv_file('prompt,chosen,rejected\n"Say hi","Hi!","Go away."\n'),
        file_name="trl.csv",
        as_judged=True,
    )
    hh = import_stream(
        db,
        target,
        csv_file(
            'chosen,rejected\n"\n\nHuman: Hi\n\nAssistant: Hello!","\n\nHuman: Hi\n\nAssistant: What?"\n'
        ),
        file_name="hh.csv",
    )
    assert (pairs.comparisons, pairs.formats, hh.tasks, hh.formats) == (1, {"trl": 1}, 1, {"hh": 1})
    assert task_texts(db, tasks(db, target)[-1]) == ["Hello!", "What?"]

    bad = rejected(db, target, csv_file("question,answer\nq,a\n"), "bad.csv")
    assert bad.errors[0].line == 1 and 'needs a "prompt" column' in bad.errors[0].message
    bad = rejected(
        db,
        target,
        csv_file('prompt,completion_1,completion_2\n"q","a"\n"r","a","b","c"\n'),
        "bad.csv",  # no suffix: sniffed
    )
    assert [(e.line, e.message) for e in bad.errors] == [
        (2, "a rank task needs 2 to 9 completions, not 1"),
        (3, "4 fields, but the header has 3"),
    ]
    bad = rejected(db, target, io.BytesIO(b"prompt,completion_1,completion_2\ncaf\xe9,a,b\n"), "x")
    assert bad.errors[0].line == 2 and "not UTF-8" in bad.errors[0].message


# --- scale ----------------------------------------------------------------------------------


class GeneratedFile:
    """A JSON Lines 'file' made up line by line as it is read: nothing holds it whole."""

    def __init__(self, lines: int) -> None:
        self.rows: Iterator[bytes] = (
            json.dumps(
                {"id": f"gen-{i}", "prompt": f"Generated question {i}?",
                 "completions": [f"First answer to {i}.", f"Second answer to {i}."]}
            ).encode() + b"\n"
            for i in range(lines)
        )  # fmt: skip

    def readline(self, limit: int = -1) -> bytes:
        line = next(self.rows, b"")
        assert limit < 0 or len(line) <= limit
        return line


def test_many_lines_stream_in_batches(db: Session, backend) -> None:
    """The file is read line by line (GeneratedFile holds no text) and written in batches."""
    lines = 20_000 if backend.name == "sqlite" else 4_000  # many batches either way; CI stays fast
    target = campaign(db)
    started = time.perf_counter()
    result = import_stream(db, target, GeneratedFile(lines), file_name="generated.jsonl")  # type: ignore[arg-type]
    elapsed = time.perf_counter() - started
    assert (result.lines, result.prompts, result.completions, result.tasks) == (
        lines, lines, 2 * lines, lines
    )  # fmt: skip
    assert count(db, TaskCompletion) == 2 * lines
    print(f"\n{lines:,} lines imported on {backend.name} in {elapsed:.1f} s")


# --- the command line -----------------------------------------------------------------------


def _make_campaign(url: str) -> None:
    database = Database(url)
    try:
        with database.session() as session:
            campaign(session, "cli")
            session.commit()
    finally:
        database.dispose()


def _counts(url: str) -> tuple[int, int, int]:
    database = Database(url)
    try:
        with database.session() as session:
            return count(session, Prompt), count(session, Task), count(session, Comparison)
    finally:
        database.dispose()


def test_prefloop_import_end_to_end(fresh_database_url: str, tmp_path: Path) -> None:
    _make_campaign(fresh_database_url)
    env = cli_env(fresh_database_url, tmp_path / "data")
    rows = [
        {"id": f"r{i}", "prompt": f"Prompt {i}", "completions": ["a", "b", "c"]} for i in range(3)
    ]
    gz = tmp_path / "rows.jsonl.gz"
    gz.write_bytes(gzip.compress("\n".join(json.dumps(r) for r in rows).encode()))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}))

    first = run_cli("import", str(gz), "--campaign", "cli", env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "imported rows.jsonl.gz into campaign 'cli'" in first.stdout
    assert re.search(r"tasks\s+3\b", first.stdout) and re.search(r"completions\s+9\b", first.stdout)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n{oops\n" + json.dumps({"prompt": "x"}) + "\n[]\n")
    again, broken, judged, unknown = run_cli_together(
        ("import", str(gz), "--campaign", "cli"),
        ("import", str(bad), "--campaign", "cli"),
        ("import", str(pairs), "--campaign", "cli", "--as-judged", "--format", "trl"),
        ("import", str(pairs), "--campaign", "nope"),
        env=env,
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr
    assert re.search(r"duplicates skipped\s+3\b", again.stdout) and re.search(
        r"tasks\s+0\b", again.stdout
    )
    assert judged.returncode == 0 and re.search(r"comparisons\s+1\b", judged.stdout), judged.stderr

    assert broken.returncode == 1 and broken.stdout == "" and "Traceback" not in broken.stderr
    assert broken.stderr.splitlines() == [
        "error: line 2: invalid JSON: Expecting property name enclosed in double quotes (column 2)",
        "error: line 4: expected a JSON object, not a list (JSON Lines has one object per line)",
        "error: nothing was imported: 2 of 4 lines are bad (fix them, or pass --skip-invalid "
        "to import the rest)",
    ]
    assert "no campaign 'nope'" in one_error_line(unknown)
    assert _counts(fresh_database_url) == (4, 3, 1)  # the bad file added nothing


def test_blank_lines_before_the_first_row_keep_the_line_numbers():
    """The blank lines before the first row are counted, not held (a file of newlines would
    fill memory), and the rows after them keep their line numbers."""
    from app.labeling.importer import read_records

    rows = list(read_records(io.BytesIO(b"\n  \n\n" + b'{"prompt": "a"}\n{broken\n')))
    assert [number for number, _ in rows] == [4, 5]
    assert rows[0][1] == {"prompt": "a"} and isinstance(rows[1][1], Exception)
    csv_rows = list(read_records(io.BytesIO(b"\n\nprompt,completion_1\nhi,there\n")))
    assert [number for number, _ in csv_rows] == [4]
    assert list(read_records(io.BytesIO(b"\n" * 100_000))) == []
