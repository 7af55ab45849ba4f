"""Dataset imports: prompts, completions, tasks and already-judged comparisons from a file.

One service behind `prefloop import`, the admin upload page and `POST /api/v1/imports`.
Files are JSON Lines or CSV (told apart by their first character), read line by line and
written in batches, so a large file never sits in memory. Every line is validated; a file
with any bad line imports nothing (unless the caller asks to skip bad lines), and the first
`MAX_REPORTED_ERRORS` reasons are reported with their line numbers.

Row formats, detected per line or forced with `format`:

- `prompt`: `{"prompt": "..." | "messages": [...], "completions": [...]}` with optional
  `id`, `metadata`, `priority` and `gold` (the expected ranking: completion indexes best
  first, tiers allowed). Without completions only the prompt is stored, except in a
  demonstration campaign, where every row is a task (with 0 or 1 suggested answer).
- `hh`: Anthropic HH-RLHF, `{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}`.
  The shared turns become a chat prompt and the two last Assistant turns the completions.
  TRL's implicit-prompt rows (`chosen`/`rejected` as message lists) are read the same way.
- `trl`: TRL preference rows `{"prompt", "chosen", "rejected"}`, standard (strings) or
  conversational (a message-list prompt and one assistant message per answer).

Pairs become tasks to (re-)label, or with `as_judged` one imported comparison each.
"""

from __future__ import annotations

import codecs
import csv
import enum
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO

from sqlalchemy import bindparam, insert, select
from sqlalchemy import text as sql
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.campaigns.models import Campaign, CampaignMode
from app.db import utcnow
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

MAX_LINE_BYTES = 1 << 20  # 1 MiB per line (per CSV line; a quoted field may span lines)
MAX_REPORTED_ERRORS = 50
BATCH_SIZE = 500
PROGRESS_EVERY = 10_000
MAX_RANK_COMPLETIONS = 9
MAX_EXTERNAL_ID = 255
MAX_PRIORITY = 1_000_000_000
ROLES = ("system", "user", "assistant")
UTF8_BOM = codecs.BOM_UTF8


class ImportFormat(enum.StrEnum):
    auto = "auto"  # detected per line
    prompt = "prompt"  # prompt or messages, optional completions
    hh = "hh"  # Anthropic HH-RLHF chosen/rejected dialogues
    trl = "trl"  # TRL prompt/chosen/rejected


FORMAT_LABELS = {
    ImportFormat.auto: "Detect per line",
    ImportFormat.prompt: "Prompts with completions",
    ImportFormat.hh: "HH-RLHF pairs (chosen, rejected)",
    ImportFormat.trl: "TRL preference rows (prompt, chosen, rejected)",
}


# --- hashes ---------------------------------------------------------------------------------


def prompt_hash(content: str | list[dict[str, Any]]) -> str:
    """sha256 of the canonical JSON of a prompt's text or messages."""
    canonical = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def completion_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def task_hash(prompt_content_hash: str, completion_hashes: Sequence[str]) -> str:
    """sha256 of the prompt's hash and its completions' hashes, in task order."""
    return hashlib.sha256(" ".join([prompt_content_hash, *completion_hashes]).encode()).hexdigest()


# --- results and errors ---------------------------------------------------------------------


@dataclass(frozen=True)
class LineError:
    line: int | None  # None: the file as a whole
    message: str

    def __str__(self) -> str:
        return self.message if self.line is None else f"line {self.line}: {self.message}"


@dataclass
class ImportResult:
    """What an import did. With `skip_invalid`, `errors` lists the lines it left out."""

    campaign: str
    file_name: str
    as_judged: bool = False
    lines: int = 0  # data lines read (blank lines not counted)
    prompts: int = 0  # created
    completions: int = 0
    tasks: int = 0
    comparisons: int = 0
    duplicates: int = 0  # lines skipped because what they describe is already there
    invalid: int = 0  # bad lines skipped (only with skip_invalid)
    formats: dict[str, int] = field(default_factory=dict)  # lines per detected row format
    errors: list[LineError] = field(default_factory=list)
    more_errors: int = 0

    def counts(self) -> dict[str, int]:
        return {
            "lines": self.lines,
            "prompts": self.prompts,
            "completions": self.completions,
            "tasks": self.tasks,
            "comparisons": self.comparisons,
            "duplicates": self.duplicates,
            "invalid": self.invalid,
        }

    def summary(self) -> str:
        created = ", ".join(
            f"{getattr(self, name)} {name if getattr(self, name) != 1 else name[:-1]}"
            for name in ("prompts", "completions", "tasks", "comparisons")
        )
        text = (
            f"Imported {self.file_name} into '{self.campaign}': {self.lines} "
            f"line{'' if self.lines == 1 else 's'}; created {created}; "
            f"{self.duplicates} duplicate{'' if self.duplicates == 1 else 's'} skipped"
        )
        if self.invalid:
            text += f"; {self.invalid} bad line{'' if self.invalid == 1 else 's'} skipped"
        return text + "."

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ImportRejected(Exception):
    """The file had bad lines (or none at all); nothing was written."""

    def __init__(self, errors: list[LineError], more: int, lines: int) -> None:
        self.errors = errors
        self.more = more
        self.lines = lines
        total = len(errors) + more
        super().__init__(
            f"{total} bad line{'' if total == 1 else 's'}; nothing was imported"
            if any(e.line is not None for e in errors)
            else (errors[0].message if errors else "nothing was imported")
        )

    @property
    def total(self) -> int:
        return len(self.errors) + self.more


class RowError(ValueError):
    """One line is unusable; the message says why (without the line number)."""


class _Errors:
    def __init__(self) -> None:
        self.kept: list[LineError] = []
        self.count = 0

    def add(self, line: int | None, message: str) -> None:
        self.count += 1
        if len(self.kept) < MAX_REPORTED_ERRORS:
            self.kept.append(LineError(line, message))

    @property
    def more(self) -> int:
        return self.count - len(self.kept)


# --- parsed rows ----------------------------------------------------------------------------


@dataclass(slots=True)
class Row:
    """One valid line, normalised: a prompt and 0..9 completions (pairs: chosen first)."""

    line: int
    kind: ImportFormat  # never auto
    text: str | None
    messages: list[dict[str, str]] | None
    completions: list[str]
    external_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    gold: list[list[int]] | None = None  # tiers of completion indexes

    @property
    def is_pair(self) -> bool:
        return self.kind in (ImportFormat.hh, ImportFormat.trl)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "a whole number"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise RowError(f'"{name}" must be a string, not {_describe(value)}')
    if not value.strip():
        raise RowError(f'"{name}" is empty')
    return value


def _messages(value: Any, name: str, *, last: str | None = "user") -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise RowError(f'"{name}" must be a list of messages, not {_describe(value)}')
    if not value:
        raise RowError(f'"{name}" is empty')
    messages = []
    for i, message in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise RowError(f'"{where}" must be an object with "role" and "content"')
        role = message.get("role")
        if role not in ROLES:
            raise RowError(f'"{where}.role" must be one of {", ".join(ROLES)}, not {role!r}')
        content = _text(message.get("content"), f"{where}.content")
        messages.append({"role": role, "content": content})
    if last is not None and messages[-1]["role"] != last:
        raise RowError(f'the last message of "{name}" must be from the {last}')
    return messages


def _prompt_of(obj: dict[str, Any]) -> tuple[str | None, list[dict[str, str]] | None]:
    if "prompt" in obj and "messages" in obj:
        raise RowError('give either "prompt" or "messages", not both')
    if "messages" in obj:
        return None, _messages(obj["messages"], "messages")
    if "prompt" not in obj:
        raise RowError('missing "prompt" (or "messages")')
    value = obj["prompt"]
    if isinstance(value, list):
        return None, _messages(value, "prompt")
    return _text(value, "prompt"), None


def _distinct(texts: list[str], name: str) -> list[str]:
    seen: dict[str, int] = {}
    for i, text in enumerate(texts):
        if text in seen:
            raise RowError(f'"{name}[{seen[text]}]" and "{name}[{i}]" are the same text')
        seen[text] = i
    return texts


def _common(obj: dict[str, Any], row: Row) -> Row:
    if (value := obj.get("id")) is not None:
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise RowError(f'"id" must be a string or a number, not {_describe(value)}')
        external_id = str(value).strip()
        if not external_id:
            raise RowError('"id" is empty')
        if len(external_id) > MAX_EXTERNAL_ID:
            raise RowError(f'"id" is longer than {MAX_EXTERNAL_ID} characters')
        row.external_id = external_id
    if (meta := obj.get("metadata")) is not None:
        if not isinstance(meta, dict):
            raise RowError(f'"metadata" must be an object, not {_describe(meta)}')
        row.meta = meta
    if (priority := obj.get("priority")) is not None:
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise RowError(f'"priority" must be a whole number, not {_describe(priority)}')
        if abs(priority) > MAX_PRIORITY:
            raise RowError(f'"priority" must be between -{MAX_PRIORITY} and {MAX_PRIORITY}')
        row.priority = priority
    return row


def _gold(value: Any, count: int) -> list[list[int]]:
    """A ranking of completion indexes, best first: [0, 2, 1] or with ties [[0], [1, 2]]."""
    if not isinstance(value, list) or not value:
        raise RowError('"gold" must be a list of completion indexes, best first')
    tiers: list[list[int]] = []
    for item in value:
        tier = item if isinstance(item, list) else [item]
        if not tier or any(isinstance(i, bool) or not isinstance(i, int) for i in tier):
            raise RowError('"gold" must hold completion indexes (numbers) or lists of them')
        tiers.append(list(tier))
    flat = [i for tier in tiers for i in tier]
    if sorted(flat) != list(range(count)):
        raise RowError(f'"gold" must rank every completion exactly once (indexes 0 to {count - 1})')
    return tiers


def parse_prompt_row(obj: dict[str, Any], line: int) -> Row:
    text, messages = _prompt_of(obj)
    if "completions" in obj and "completion" in obj:
        raise RowError('give either "completions" or "completion", not both')
    completions: list[str] = []
    if "completion" in obj:
        completions = [_text(obj["completion"], "completion")]
    elif (values := obj.get("completions")) is not None:
        if not isinstance(values, list):
            raise RowError(f'"completions" must be a list of strings, not {_describe(values)}')
        completions = _distinct(
            [_text(v, f"completions[{i}]") for i, v in enumerate(values)], "completions"
        )
    row = _common(obj, Row(line, ImportFormat.prompt, text, messages, completions))
    if obj.get("gold") is not None:
        if len(completions) < 2:
            raise RowError('"gold" needs at least 2 completions to rank')
        row.gold = _gold(obj["gold"], len(completions))
    return row


HH_TURN = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _hh_turns(value: Any, name: str) -> list[dict[str, str]]:
    """The turns of one HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ..."), stripped."""
    if isinstance(value, list):  # TRL's implicit-prompt rows: whole conversations as messages
        return _messages(value, name, last="assistant")
    if not isinstance(value, str):
        raise RowError(f'"{name}" must be a string or a list of messages, not {_describe(value)}')
    parts = HH_TURN.split(value)
    if parts[0].strip() or len(parts) < 3:
        raise RowError(f'"{name}" must be a dialogue starting with "Human:"')
    return [
        {"role": HH_ROLES[role], "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2], strict=True)
    ]


def _merge_turns(turns: list[dict[str, str]], name: str) -> list[dict[str, str]]:
    """Join consecutive turns of one speaker (a known HH quirk); no turn may be empty."""
    merged: list[dict[str, str]] = []
    for i, turn in enumerate(turns):
        if not turn["content"]:
            raise RowError(f'turn {i + 1} of "{name}" is empty')
        if merged and merged[-1]["role"] == turn["role"]:
            merged[-1] = {
                "role": turn["role"],
                "content": f"{merged[-1]['content']}\n\n{turn['content']}",
            }
        else:
            merged.append(dict(turn))
    return merged


def parse_hh_row(obj: dict[str, Any], line: int) -> Row:
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise RowError(f'missing "{key}"')
    if obj["chosen"] == obj["rejected"]:
        raise RowError('"chosen" and "rejected" are the same dialogue')
    chosen = _hh_turns(obj["chosen"], "chosen")
    rejected = _hh_turns(obj["rejected"], "rejected")
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            raise RowError(f'"{name}" does not end with an Assistant turn')
        if not turns[-1]["content"]:
            raise RowError(f'the last Assistant turn of "{name}" is empty')
    shared = chosen[:-1]
    if shared != rejected[:-1]:
        turn = next(
            (i for i, (a, b) in enumerate(zip(shared, rejected[:-1], strict=False)) if a != b),
            min(len(shared), len(rejected) - 1),
        )
        raise RowError(
            f'"chosen" and "rejected" differ before their last Assistant turn (at turn {turn + 1});'
            " the two dialogues must share every earlier turn"
        )
    messages = _merge_turns(shared, "chosen")
    if not messages or messages[-1]["role"] != "user":
        raise RowError("the shared dialogue must end with a Human turn before the answers")
    answers = [chosen[-1]["content"], rejected[-1]["content"]]
    if answers[0] == answers[1]:
        raise RowError('"chosen" and "rejected" end with the same answer')
    return _common(obj, Row(line, ImportFormat.hh, None, messages, answers))


def _trl_answer(value: Any, name: str) -> str:
    if isinstance(value, list):
        if len(value) != 1:
            raise RowError(f'"{name}" must be a string or a list with one assistant message')
        return _messages(value, name, last="assistant")[0]["content"]
    return _text(value, name)


def parse_trl_row(obj: dict[str, Any], line: int) -> Row:
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise RowError(f'missing "{key}"')
    text, messages = _prompt_of(obj)
    answers = [_trl_answer(obj["chosen"], "chosen"), _trl_answer(obj["rejected"], "rejected")]
    if answers[0] == answers[1]:
        raise RowError('"chosen" and "rejected" are the same text')
    return _common(obj, Row(line, ImportFormat.trl, text, messages, answers))


PARSERS: dict[ImportFormat, Callable[[dict[str, Any], int], Row]] = {
    ImportFormat.prompt: parse_prompt_row,
    ImportFormat.hh: parse_hh_row,
    ImportFormat.trl: parse_trl_row,
}


def detect_format(obj: dict[str, Any]) -> ImportFormat:
    if "chosen" in obj or "rejected" in obj:
        return ImportFormat.trl if "prompt" in obj or "messages" in obj else ImportFormat.hh
    if {"prompt", "messages", "completions", "completion"} & obj.keys():
        return ImportFormat.prompt
    raise RowError(
        'unknown format: expected "prompt" or "messages" (optionally with "completions"), '
        '"chosen" and "rejected" (HH-RLHF), or "prompt", "chosen" and "rejected" (TRL)'
    )


def parse_row(obj: Any, line: int, fmt: ImportFormat = ImportFormat.auto) -> Row:
    """Validate one decoded line against its (detected or forced) format."""
    if not isinstance(obj, dict):
        hint = " (JSON Lines has one object per line)" if isinstance(obj, list) else ""
        raise RowError(f"expected a JSON object, not {_describe(obj)}{hint}")
    kind = detect_format(obj) if fmt == ImportFormat.auto else fmt
    return PARSERS[kind](obj, line)


def check_row_for_campaign(row: Row, campaign: Campaign, *, as_judged: bool) -> None:
    """The rules that depend on the campaign's mode and on importing pairs as judged."""
    mode = campaign.mode
    n = len(row.completions)
    if as_judged:
        if not row.is_pair:
            raise RowError(
                "importing as judged comparisons needs chosen/rejected rows (HH-RLHF or TRL); "
                "this line is a prompt row"
            )
        if mode == CampaignMode.demonstration:
            raise RowError("a demonstration campaign takes no comparisons")
        return
    if mode == CampaignMode.demonstration:
        if row.is_pair:
            raise RowError("a demonstration campaign takes no chosen/rejected pairs")
        if n > 1:
            raise RowError(f"a demonstration task takes at most 1 suggested completion, not {n}")
        if row.gold is not None:
            raise RowError('"gold" needs a rank or pairwise campaign')
        return
    if mode == CampaignMode.pairwise and n not in (0, 2):
        raise RowError(f"a pairwise task needs exactly 2 completions, not {n}")
    if mode == CampaignMode.rank and n not in (0, *range(2, MAX_RANK_COMPLETIONS + 1)):
        raise RowError(f"a rank task needs 2 to {MAX_RANK_COMPLETIONS} completions, not {n}")
    if row.gold is not None and not campaign.allow_ties and any(len(t) > 1 for t in row.gold):
        raise RowError('"gold" has a tie, but this campaign does not allow ties')


# --- reading lines --------------------------------------------------------------------------


def _physical_lines(stream: BinaryIO) -> Iterator[tuple[int, bytes | None]]:
    """(line number, raw bytes with their line ending); None for a line over MAX_LINE_BYTES,
    which is skipped without ever holding more than that much of it."""
    number = 0
    while chunk := stream.readline(MAX_LINE_BYTES + 1):
        number += 1
        if number == 1 and chunk.startswith(UTF8_BOM):
            chunk = chunk[len(UTF8_BOM) :]
        if len(chunk) > MAX_LINE_BYTES and not chunk.endswith(b"\n"):
            while (rest := stream.readline(1 << 16)) and not rest.endswith(b"\n"):
                pass
            yield number, None
            continue
        yield number, chunk


TOO_LONG = f"the line is longer than {MAX_LINE_BYTES // (1 << 20)} MiB"
# JSON escapes that decode to text no database stores: NUL and unpaired surrogates.
SUSPECT_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")


def _decode(raw: bytes | None) -> str:
    if raw is None:
        raise RowError(TOO_LONG)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RowError(
            f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at position {exc.start + 1}); "
            "save the file as UTF-8"
        ) from None
    if "\x00" in text:
        raise RowError("the line contains a NUL character")
    return text


def _reject_constant(name: str) -> Any:
    raise RowError(f"invalid JSON: {name} is not a number JSON allows")


def _check_strings(value: Any) -> None:
    """Refuse strings PostgreSQL cannot store (NUL, lone surrogates from \\u escapes)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            if "\x00" in item:
                raise RowError("a string contains a NUL character (\\u0000)")
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise RowError(
                    "a string contains an unpaired surrogate (\\ud800-\\udfff)"
                ) from None


def _json_records(lines: Iterable[tuple[int, bytes | None]]) -> Iterator[tuple[int, Any]]:
    for number, raw in lines:
        if raw is not None and not raw.strip():
            continue
        try:
            text = _decode(raw).rstrip("\r\n")
            try:
                obj = json.loads(text, parse_constant=_reject_constant)
            except json.JSONDecodeError as exc:
                raise RowError(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
            if SUSPECT_ESCAPE.search(text):
                _check_strings(obj)
            yield number, obj
        except RowError as exc:
            yield number, exc


CSV_COMPLETION = re.compile(r"^completions?(_?\d+)?$")
CSV_HEADER_HELP = (
    'the CSV header needs a "prompt" column (with "completion_1".."completion_N"), '
    '"prompt,chosen,rejected" or "chosen,rejected"'
)


def _csv_records(lines: Iterable[tuple[int, bytes | None]]) -> Iterator[tuple[int, Any]]:
    """Rows of a CSV file with a header, as objects shaped like the JSON formats."""
    bad: dict[int, str] = {}
    last = [0]

    def text_lines() -> Iterator[str]:
        for number, raw in lines:
            last[0] = number
            try:
                yield _decode(raw)
            except RowError as exc:
                bad[number] = str(exc)
                yield "\n"

    csv.field_size_limit(max(csv.field_size_limit(), MAX_LINE_BYTES))
    reader = csv.reader(text_lines())
    header: list[str] | None = None
    completion_columns: list[int] = []
    end = 0
    while True:
        start = end + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield last[0], RowError(f"unreadable CSV: {exc}")
            return
        end = last[0]
        problems = [bad.pop(n) for n in range(start, end + 1) if n in bad]
        if problems:
            yield start, RowError(problems[0])
            if header is None:
                return
            continue
        if not any(cell.strip() for cell in cells):
            continue
        if header is None:
            header = [cell.strip().lower() for cell in cells]
            completion_columns = [i for i, name in enumerate(header) if CSV_COMPLETION.match(name)]
            named = [name for name in header if not CSV_COMPLETION.match(name)]
            repeated = sorted({name for name in named if named.count(name) > 1})
            if repeated:
                yield start, RowError(f"the CSV header repeats the column {repeated[0]!r}")
                return
            if "prompt" not in header and not {"chosen", "rejected"} <= set(header):
                yield start, RowError(CSV_HEADER_HELP)
                return
            continue
        if len(cells) > len(header):
            yield start, RowError(f"{len(cells)} fields, but the header has {len(header)}")
            continue
        cells += [""] * (len(header) - len(cells))
        try:
            yield start, _csv_object(header, cells, completion_columns)
        except RowError as exc:
            yield start, exc


def _csv_object(header: list[str], cells: list[str], completion_columns: list[int]) -> Any:
    """prompt, chosen, rejected, id, priority, metadata and gold (JSON) columns keep their
    meaning; completion columns are gathered in order (empty cells left out); any other
    non-empty cell goes into the prompt's metadata."""
    obj: dict[str, Any] = {}
    extra: dict[str, str] = {}
    for i, (name, value) in enumerate(zip(header, cells, strict=True)):
        if i in completion_columns or not name:
            continue
        if name in ("prompt", "chosen", "rejected"):
            obj[name] = value
        elif not value.strip():
            continue
        elif name == "id":
            obj["id"] = value
        elif name == "priority":
            try:
                obj["priority"] = int(value)
            except ValueError:
                raise RowError(f'"priority" must be a whole number, not {value!r}') from None
        elif name in ("metadata", "gold"):
            try:
                obj[name] = json.loads(value, parse_constant=_reject_constant)
            except json.JSONDecodeError as exc:
                raise RowError(f'"{name}" is not valid JSON: {exc.msg}') from None
        else:
            extra[name] = value
    if extra:
        given = obj.get("metadata")
        obj["metadata"] = {**extra, **given} if isinstance(given, dict) else given or extra
    completions = [cells[i] for i in completion_columns if cells[i].strip()]
    if completions:
        obj["completions"] = completions
    return obj


CSV_SUFFIXES = (".csv", ".csv.gz")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz", ".json.gz")


def file_kind(file_name: str, content_type: str | None = None) -> str | None:
    """Kind "csv" or "jsonl", as a file name or media type says; None when neither tells."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media in ("text/csv", "application/csv"):
        return "csv"
    if media in ("application/x-ndjson", "application/jsonl", "application/json"):
        return "jsonl"
    name = file_name.lower()
    if name.endswith(CSV_SUFFIXES):
        return "csv"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


def read_records(stream: BinaryIO, kind: str | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, decoded object or RowError) per data line. `kind` is "jsonl" or
    "csv"; without it, JSON Lines when the first non-blank character is `{` or `[`."""
    lines = _physical_lines(stream)
    # The first non-blank line tells the kind; the blank ones before it are only counted
    # (kept, a file of newlines would fill memory) and given back as bare newlines.
    first: tuple[int, bytes | None] | None = None
    for number, raw in lines:
        first = (number, raw)
        if raw is None or raw.strip():
            break
    if first is None or (first[1] is not None and not first[1].strip()):
        return
    opening: tuple[int, bytes | None] = first
    if kind is None:
        head = (opening[1] or b"{").lstrip()
        kind = "jsonl" if head[:1] in (b"{", b"[") else "csv"
    source = _json_records if kind == "jsonl" else _csv_records

    def chained() -> Iterator[tuple[int, bytes | None]]:
        yield from ((number, b"\n") for number in range(1, opening[0]))
        yield opening
        yield from lines

    yield from source(chained())


# --- writing --------------------------------------------------------------------------------


def _chunks(values: Sequence[Any], size: int = BATCH_SIZE) -> Iterator[Sequence[Any]]:
    for i in range(0, len(values), size):
        yield values[i : i + size]


class _Writer:
    """Writes batches of valid rows, de-duplicating against the database and the batch.

    Earlier batches are flushed, so the database lookups also catch repeats within the file.
    """

    def __init__(self, session: Session, campaign: Campaign, as_judged: bool) -> None:
        self.session = session
        self.campaign = campaign
        self.as_judged = as_judged
        self.now = utcnow()  # one timestamp for everything the import creates
        self.is_postgresql = session.get_bind().dialect.name == "postgresql"

    def _makes_task(self, row: Row) -> bool:
        if self.as_judged:
            return False
        return self.campaign.mode == CampaignMode.demonstration or bool(row.completions)

    def write(self, rows: list[Row], result: ImportResult) -> None:
        session, campaign_id = self.session, self.campaign.id
        p_hashes = [
            prompt_hash(row.messages if row.messages is not None else row.text) for row in rows
        ]
        c_hashes = [[completion_hash(text) for text in row.completions] for row in rows]
        t_hashes = [
            task_hash(ph, ch) if self._makes_task(row) else None
            for row, ph, ch in zip(rows, p_hashes, c_hashes, strict=True)
        ]

        # Existing prompts, by external id and by content, and existing tasks.
        by_ext: dict[str, tuple[int, str]] = {
            ext: (pid, ph)
            for pid, ext, ph in self._find(
                Prompt,
                "external_id",
                {row.external_id for row in rows if row.external_id is not None},
                "id, external_id, content_hash",
            )
        }
        by_hash: dict[str, int] = {
            ph: pid
            for pid, ph in self._find(Prompt, "content_hash", set(p_hashes), "id, content_hash")
        }
        existing_tasks = {
            th
            for (th,) in self._find(
                Task, "content_hash", {h for h in t_hashes if h is not None}, "content_hash"
            )
        }

        # Decide, row by row, what is new; a prompt is created only for a row that needs it.
        new_prompts: dict[str, dict[str, Any]] = {}  # prompt hash -> insert values
        batch_ext: dict[str, str] = {}  # external ids given to new prompts -> their hash
        batch_tasks: set[str] = set()
        batch_pairs: set[tuple[str, str, str]] = set()
        keep: list[tuple[Row, str, list[str], str | None, int | None]] = []
        for row, ph, ch, th in zip(rows, p_hashes, c_hashes, t_hashes, strict=True):
            ext = row.external_id
            pid: int | None = None
            if ext is not None:
                known = by_ext[ext][1] if ext in by_ext else batch_ext.get(ext)
                if known is not None and known != ph:  # the id already names another prompt
                    result.duplicates += 1
                    continue
                if ext in by_ext:
                    pid = by_ext[ext][0]
            if pid is None:
                pid = by_hash.get(ph)
            if th is not None:
                if th in existing_tasks or th in batch_tasks:
                    result.duplicates += 1
                    continue
                batch_tasks.add(th)
            elif self.as_judged:
                pair = (ph, ch[0], ch[1])
                if pair in batch_pairs:
                    result.duplicates += 1
                    continue
                batch_pairs.add(pair)
            elif pid is not None or ph in new_prompts:  # a prompt-only row
                result.duplicates += 1
                continue
            if pid is None and ph not in new_prompts:
                new_prompts[ph] = {
                    "campaign_id": campaign_id,
                    "external_id": ext if ext is not None and ext not in batch_ext else None,
                    "text": row.text,
                    "messages": row.messages,
                    "content_hash": ph,
                    "metadata": row.meta,
                    "created_at": self.now,
                }
                if ext is not None:
                    batch_ext.setdefault(ext, ph)
            keep.append((row, ph, ch, th, pid))

        created_prompt = self._insert(Prompt, list(new_prompts.values()), "content_hash")
        result.prompts += len(created_prompt)

        # Completions: reuse a prompt's existing ones with the same text.
        old_pids = sorted({pid for _, _, ch, _, pid in keep if pid is not None and ch})
        existing_completions: dict[tuple[int, str], int] = {}
        for chunk in _chunks(old_pids):
            for cid, pid, chash in session.execute(
                select(Completion.id, Completion.prompt_id, Completion.content_hash)
                .where(Completion.prompt_id.in_(chunk))
                .order_by(Completion.id)
            ):
                existing_completions.setdefault((pid, chash), cid)
        existing_pairs: set[tuple[int, int, int]] = set()
        if self.as_judged:  # by prompt only: that index is the one to use (see _find)
            for chunk in _chunks(old_pids):
                existing_pairs.update(
                    (pid, chosen, rejected)
                    for pid, chosen, rejected, source in session.execute(
                        select(
                            Comparison.prompt_id,
                            Comparison.chosen_id,
                            Comparison.rejected_id,
                            Comparison.source,
                        ).where(Comparison.prompt_id.in_(chunk))
                    )
                    if source == ComparisonSource.imported
                )

        new_completions: dict[tuple[int, str], dict[str, Any]] = {}
        planned: list[tuple[Row, int, list[tuple[int, str]], str | None]] = []
        for row, ph, ch, th, pid in keep:
            pid = pid if pid is not None else created_prompt[ph]
            keys = [(pid, h) for h in ch]
            if self.as_judged:
                known = [existing_completions.get(key) for key in keys]
                if None not in known and (pid, known[0], known[1]) in existing_pairs:
                    result.duplicates += 1
                    continue
            for key, text in zip(keys, row.completions, strict=True):
                if key not in existing_completions and key not in new_completions:
                    new_completions[key] = {
                        "prompt_id": pid,
                        "text": text,
                        "source": CompletionSource.imported,
                        "content_hash": key[1],
                        "generation_params": {},
                        "created_at": self.now,
                    }
            planned.append((row, pid, keys, th))
        created = self._insert(
            Completion, list(new_completions.values()), "prompt_id", "content_hash"
        )
        result.completions += len(created)
        ids = existing_completions | created

        if self.as_judged:
            comparisons = [
                {
                    "campaign_id": campaign_id,
                    "prompt_id": pid,
                    "judgment_id": None,
                    "user_id": None,
                    "chosen_id": ids[keys[0]],
                    "rejected_id": ids[keys[1]],
                    "is_tie": False,
                    "margin": None,
                    "source": ComparisonSource.imported,
                    "is_active": True,
                    "created_at": self.now,
                }
                for _, pid, keys, _ in planned
            ]
            self._insert(Comparison, comparisons)
            result.comparisons += len(comparisons)
            return

        tasks = [
            {
                "campaign_id": campaign_id,
                "prompt_id": pid,
                "status": TaskStatus.open,
                "priority": row.priority,
                "required_judgments": self.campaign.overlap,
                "judgment_count": 0,
                "assigned_count": 0,
                "content_hash": th,
                "is_gold": row.gold is not None,
                "gold_ranking": (
                    [[ids[keys[i]] for i in tier] for tier in row.gold]
                    if row.gold is not None
                    else None
                ),
                "created_at": self.now,
            }
            for row, pid, keys, th in planned
            if th is not None
        ]
        task_ids = self._insert(Task, tasks, "content_hash")
        result.tasks += len(task_ids)
        items = [
            {"task_id": task_ids[th], "position": position, "completion_id": ids[key]}
            for _, _, keys, th in planned
            if th is not None
            for position, key in enumerate(keys)
        ]
        self._insert(TaskCompletion, items)

    def _find(self, model: Any, column: str, values: set[str], returns: str) -> list[Any]:
        """`returns` of this campaign's `model` rows whose `column` is one of `values`, the
        lowest id per value.

        On PostgreSQL each value is probed on its own through the (campaign_id, column)
        index. A plain `campaign_id = :c AND column IN (...)` is planned from statistics
        that cannot count the rows this (uncommitted) import added: the planner then takes
        the campaign_id index and filters every row of the campaign, once per batch, and a
        large import slows down quadratically.
        """
        if not values:
            return []
        table = model.__tablename__
        if self.is_postgresql:
            statement = sql(
                f"SELECT found.* FROM unnest(CAST(:values AS TEXT[])) AS probe(value) "  # noqa: S608  (names are ours)
                f"CROSS JOIN LATERAL (SELECT {returns} FROM {table} "
                f"WHERE campaign_id = :campaign AND {column} = probe.value "
                f"ORDER BY id LIMIT 1) AS found"
            )
            return [
                tuple(row)
                for chunk in _chunks(sorted(values))
                for row in self.session.execute(
                    statement, {"values": list(chunk), "campaign": self.campaign.id}
                )
            ]
        statement = sql(
            f"SELECT {returns} FROM {table} WHERE campaign_id = :campaign "  # noqa: S608
            f"AND {column} IN :values ORDER BY id DESC"
        ).bindparams(bindparam("values", expanding=True))
        found: dict[str, tuple[Any, ...]] = {}
        key = [name.strip() for name in returns.split(",")].index(column)
        for chunk in _chunks(sorted(values)):
            for row in self.session.execute(
                statement, {"values": list(chunk), "campaign": self.campaign.id}
            ):
                found[row[key]] = tuple(row)  # descending ids: the lowest wins
        return list(found.values())

    def _insert(self, model: Any, values: list[dict[str, Any]], *key: str) -> dict[Any, int]:
        """Insert rows; {their key columns' values: new id} when `key` is given. Keys are
        unique in `values`, so RETURNING need not keep the input order (that would cost a
        statement per row). A None value is stored as SQL NULL (never as a JSON null)."""
        if not values:
            return {}
        if self.is_postgresql:
            returned = self._insert_unnest(model.__table__, values, key)
        else:
            returned = self._insert_many(model.__table__, values, key)
        if len(key) == 1:
            return {row[1]: row[0] for row in returned}
        return {tuple(row[1:]): row[0] for row in returned}

    def _insert_many(
        self, table: Any, values: list[dict[str, Any]], key: tuple[str, ...]
    ) -> list[Any]:
        """executemany, in groups of rows that set the same columns: a None is left out (a
        JSON column would store a JSON null for it)."""
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for row in values:
            row = {name: value for name, value in row.items() if value is not None}
            groups.setdefault(tuple(row), []).append(row)
        returned: list[Any] = []
        for group in groups.values():
            if not key:
                self.session.execute(insert(table), group)
                continue
            statement = insert(table).returning(table.c.id, *(table.c[name] for name in key))
            returned.extend(self.session.execute(statement, group))
        return returned

    def _insert_unnest(
        self, table: Any, values: list[dict[str, Any]], key: tuple[str, ...]
    ) -> list[Any]:
        """PostgreSQL: one `INSERT ... SELECT FROM unnest(arrays)` per batch. The statement is
        short and the same for every batch, where a multi-row VALUES list is thousands of
        placeholders that the driver parses again for every batch."""
        from psycopg.types.json import Jsonb  # the PostgreSQL driver, present on this path

        columns = list(values[0])
        dialect = self.session.get_bind().dialect
        arrays = []
        params: dict[str, list[Any]] = {}
        for i, name in enumerate(columns):
            column_type = table.c[name].type
            sql_type = column_type.compile(dialect=dialect)
            is_json = sql_type == "JSONB"
            params[f"c{i}"] = [
                (Jsonb(row[name]) if is_json and row[name] is not None else _plain(row[name]))
                for row in values
            ]
            arrays.append(f"CAST(:c{i} AS {sql_type}[])")
        statement = (
            f"INSERT INTO {table.name} ({', '.join(columns)}) "  # noqa: S608  (names are ours)
            f"SELECT * FROM unnest({', '.join(arrays)})"
        )
        if key:
            statement += f" RETURNING id, {', '.join(key)}"
        result = self.session.execute(sql(statement), params)
        return list(result) if key else []


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


# --- the service ----------------------------------------------------------------------------


def import_stream(
    session: Session,
    campaign: Campaign,
    stream: BinaryIO,
    *,
    file_name: str,
    fmt: ImportFormat = ImportFormat.auto,
    as_judged: bool = False,
    skip_invalid: bool = False,
    actor_id: int | None = None,
    ip: str | None = None,
    kind: str | None = None,
    batch_size: int = BATCH_SIZE,
    on_progress: Callable[[int], None] | None = None,
) -> ImportResult:
    """Import a JSON Lines or CSV byte stream into `campaign` (adds and flushes; the caller
    commits). Raises ImportRejected, having written nothing, when any line is bad (unless
    `skip_invalid`) or the file has no data.

    `kind` ("jsonl" or "csv") defaults to what the file name says, else to what the
    first line looks like. `on_progress` is called with the lines read so far, every
    PROGRESS_EVERY lines."""
    errors = _Errors()
    result = ImportResult(campaign=campaign.slug, file_name=file_name, as_judged=as_judged)
    writer = _Writer(session, campaign, as_judged)
    # A savepoint: a rejected file leaves the caller's session as it found it.
    savepoint = session.begin_nested()
    try:
        batch: list[Row] = []
        for line, item in read_records(stream, kind or file_kind(file_name)):
            result.lines += 1
            if on_progress is not None and result.lines % PROGRESS_EVERY == 0:
                on_progress(result.lines)
            try:
                if isinstance(item, RowError):
                    raise item
                row = parse_row(item, line, fmt)
                check_row_for_campaign(row, campaign, as_judged=as_judged)
            except RowError as exc:
                errors.add(line, str(exc))
                continue
            result.formats[row.kind.value] = result.formats.get(row.kind.value, 0) + 1
            if errors.count and not skip_invalid:
                continue  # the file fails anyway: only validate the rest
            batch.append(row)
            if len(batch) >= batch_size:
                writer.write(batch, result)
                batch = []
        if result.lines == 0 and not errors.count:
            errors.add(None, "the file has no data lines")
        if errors.count and (not skip_invalid or result.lines == errors.count):
            raise ImportRejected(errors.kept, errors.more, result.lines)
        if batch:
            writer.write(batch, result)
        result.invalid = errors.count
        result.errors = errors.kept
        result.more_errors = errors.more
        audit.record(
            session,
            actor_id=actor_id,
            action="import.create",
            entity_type="campaign",
            entity_id=campaign.id,
            after={
                "slug": campaign.slug,
                "file": file_name,
                "format": fmt.value,
                "as_judged": as_judged,
                **result.counts(),
                "formats": result.formats,
            },
            ip=ip,
        )
        savepoint.commit()
    except BaseException:
        savepoint.rollback()
        raise
    return result
