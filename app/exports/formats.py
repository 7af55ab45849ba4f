"""The four export formats: rows built from the streams of `app.exports.query`, and the
explicit Arrow schema of each (so Parquet files are stable, and the same data gives the
same bytes).

Every row carries, besides what a trainer reads, the ids it came from and its split
(`prompt_id`, `chosen_id`, ..., `annotator`, `split`); TRL and `datasets` ignore columns
they do not know. A prompt is a string, or, when any prompt of the exported campaigns is a
chat, a list of messages for every row (one file, one schema).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from app.exports.query import (
    Context,
    comparison_rows,
    demonstration_rows,
    row_key,
    source_of,
    task_agreement,
    task_groups,
)
from app.labeling.service import pairs_from_ranking
from app.quality import metrics


def _value(x: Any) -> str:
    """An enum column's stored value."""
    return x if type(x) is str else str(x.value)


MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
RANKING = pa.list_(pa.list_(pa.int64()))


def _text_type(ctx: Context) -> pa.DataType:
    return MESSAGES if ctx.conversational else pa.string()


def messages(items: list[dict[str, Any]] | None) -> list[dict[str, str]]:
    return [{"role": str(m.get("role")), "content": str(m.get("content"))} for m in items or []]


def prompt_value(ctx: Context, text: str | None, chat: list[dict[str, Any]] | None) -> Any:
    if not ctx.conversational:
        return text if text is not None else ""
    if chat is not None:
        return messages(chat)
    return [{"role": "user", "content": text or ""}]


def answer_value(ctx: Context, text: str) -> Any:
    return [{"role": "assistant", "content": text}] if ctx.conversational else text


# --- TRL preference -------------------------------------------------------------------------


def trl_schema(ctx: Context) -> pa.Schema:
    text_type = _text_type(ctx)
    fields = [
        ("prompt", text_type),
        ("chosen", text_type),
        ("rejected", text_type),
    ]
    if ctx.with_margin:
        fields.append(("margin", pa.float64()))
    if ctx.params.pairs == "labeled":
        fields += [
            ("is_tie", pa.bool_()),
            ("comparison_id", pa.int64()),
            ("judgment_id", pa.int64()),
            ("task_id", pa.int64()),
            ("annotator", pa.string()),
            ("source", pa.string()),
        ]
    else:
        fields += [
            ("is_tie", pa.bool_()),
            ("task_id", pa.int64()),
            ("votes", pa.int64()),
            ("agreement", pa.float64()),
            ("consensus_source", pa.string()),
        ]
    fields += [
        ("prompt_id", pa.int64()),
        ("chosen_id", pa.int64()),
        ("rejected_id", pa.int64()),
        ("campaign", pa.string()),
        ("split", pa.string()),
    ]
    return pa.schema(fields)


def trl_rows(ctx: Context) -> Iterator[dict[str, Any]]:
    if ctx.params.pairs == "consensus":
        yield from _consensus_rows(ctx)
        return
    keep_ties = ctx.params.ties == "margin0"
    dedupe: set[int] | None = set() if ctx.params.dedupe else None
    slugs = ctx.slugs
    prompts: dict[int, Any] = {}  # the last prompt's value, reused by its next pairs
    for (
        comparison_id,
        campaign_id,
        prompt_id,
        judgment_id,
        user_id,
        chosen_id,
        rejected_id,
        is_tie,
        margin,
        source,
        task_id,
        guidelines_version,
        prompt_text,
        prompt_messages,
        prompt_hash,
        chosen_text,
        chosen_hash,
        rejected_text,
        rejected_hash,
    ) in comparison_rows(ctx, keep_ties=keep_ties):
        if dedupe is not None:
            key = row_key(user_id, prompt_hash, chosen_hash, rejected_hash)
            if key in dedupe:
                continue
            dedupe.add(key)
        prompt = prompts.get(prompt_id)
        if prompt is None:
            prompts.clear()
            prompt = prompts[prompt_id] = prompt_value(ctx, prompt_text, prompt_messages)
        ctx.saw(campaign_id, user_id, guidelines_version)
        row = {
            "prompt": prompt,
            "chosen": answer_value(ctx, chosen_text),
            "rejected": answer_value(ctx, rejected_text),
            "is_tie": is_tie,
            "comparison_id": comparison_id,
            "judgment_id": judgment_id,
            "task_id": task_id,
            "annotator": ctx.pseudonym(user_id),
            "source": _value(source),
            "prompt_id": prompt_id,
            "chosen_id": chosen_id,
            "rejected_id": rejected_id,
            "campaign": slugs[campaign_id],
            "split": ctx.split(prompt_hash),
        }
        if ctx.with_margin:
            row["margin"] = 0.0 if is_tie or margin is None else float(margin)
        yield row


def consensus_of(group: Any) -> tuple[list[list[int]], str]:
    """The task's answer: an admin's resolved ranking, else the gold answer, else the
    Bradley-Terry consensus of the exported judgments."""
    if group.resolved_ranking:
        return group.resolved_ranking, "resolved"
    if group.is_gold and group.gold_ranking:
        return group.gold_ranking, "gold"
    return metrics.consensus([j[5] for j in group.judgments]).ranking, "bradley_terry"


def _consensus_rows(ctx: Context) -> Iterator[dict[str, Any]]:
    keep_ties = ctx.params.ties == "margin0"
    dedupe: set[int] | None = set() if ctx.params.dedupe else None
    agreement_min = ctx.params.min_agreement
    for group in task_groups(ctx):
        rankings = [j[5] for j in group.judgments]
        if agreement_min is not None:
            value = task_agreement(rankings)
            if value is None or value < agreement_min - 1e-12:
                continue
        for j in group.judgments:
            ctx.saw(group.campaign_id, j[3], j[13])
        ranking, how = consensus_of(group)
        items = {cid: (text, chash) for cid, text, _source, chash in group.items}
        preferences = [metrics.pair_preferences(r) for r in rankings]
        prompt = prompt_value(ctx, group.prompt_text, group.prompt_messages)
        for chosen, rejected, is_tie, _ in pairs_from_ranking(ranking):
            if is_tie and not keep_ties:
                continue
            if ctx.flagged is not None and (chosen in ctx.flagged or rejected in ctx.flagged):
                continue
            if chosen not in items or rejected not in items:
                continue
            if dedupe is not None:
                key = row_key(group.prompt_hash, items[chosen][1], items[rejected][1])
                if key in dedupe:
                    continue
                dedupe.add(key)
            pair = (min(chosen, rejected), max(chosen, rejected))
            agreeing = [
                p[pair] if pair[0] == chosen else 1.0 - p[pair] for p in preferences if pair in p
            ]
            row = {
                "prompt": prompt,
                "chosen": answer_value(ctx, items[chosen][0]),
                "rejected": answer_value(ctx, items[rejected][0]),
                "is_tie": is_tie,
                "task_id": group.task_id,
                "votes": len(agreeing),
                "agreement": sum(agreeing) / len(agreeing) if agreeing else None,
                "consensus_source": how,
                "prompt_id": group.prompt_id,
                "chosen_id": chosen,
                "rejected_id": rejected,
                "campaign": ctx.slugs[group.campaign_id],
                "split": ctx.split(group.prompt_hash),
            }
            if ctx.with_margin:
                row["margin"] = 0.0
            yield row


# --- rankings -------------------------------------------------------------------------------


def rankings_schema(ctx: Context) -> pa.Schema:
    judgment = pa.struct(
        [
            ("judgment_id", pa.int64()),
            ("annotator", pa.string()),
            ("source", pa.string()),
            ("ranking", RANKING),
            ("strength", pa.int64()),
            (
                "flags",
                pa.list_(
                    pa.struct([("completion_id", pa.int64()), ("flags", pa.list_(pa.string()))])
                ),
            ),
            (
                "ratings",
                pa.list_(pa.struct([("completion_id", pa.int64()), ("rating", pa.int64())])),
            ),
            ("display_order", pa.list_(pa.int64())),
            ("time_on_task_ms", pa.int64()),
            ("comment", pa.string()),
            ("confidence", pa.int64()),
            ("guidelines_version", pa.int64()),
            ("created_at", pa.string()),
        ]
    )
    completion = pa.struct([("id", pa.int64()), ("text", pa.string()), ("source", pa.string())])
    return pa.schema(
        [
            ("prompt", _text_type(ctx)),
            ("completions", pa.list_(completion)),
            ("judgments", pa.list_(judgment)),
            ("consensus", RANKING),
            ("consensus_source", pa.string()),
            ("agreement", pa.float64()),
            ("is_gold", pa.bool_()),
            ("gold_ranking", RANKING),
            ("task_id", pa.int64()),
            ("prompt_id", pa.int64()),
            ("campaign", pa.string()),
            ("split", pa.string()),
        ]
    )


def rankings_rows(ctx: Context) -> Iterator[dict[str, Any]]:
    agreement_min = ctx.params.min_agreement
    for group in task_groups(ctx):
        ids = [item[0] for item in group.items]
        if ctx.flagged is not None and any(cid in ctx.flagged for cid in ids):
            continue
        rankings = [j[5] for j in group.judgments]
        agreement = task_agreement(rankings)
        if agreement_min is not None and (agreement is None or agreement < agreement_min - 1e-12):
            continue
        ranking, how = consensus_of(group)
        judgments = []
        for (
            _task_id,
            judgment_id,
            campaign_id,
            user_id,
            kind,
            judged,
            strength,
            flags,
            ratings,
            display_order,
            time_on_task_ms,
            comment,
            confidence,
            guidelines_version,
            created_at,
        ) in group.judgments:
            ctx.saw(campaign_id, user_id, guidelines_version)
            judgments.append(
                {
                    "judgment_id": judgment_id,
                    "annotator": ctx.pseudonym(user_id),
                    "source": source_of(kind),
                    "ranking": judged,
                    "strength": strength,
                    "flags": [
                        {"completion_id": int(cid), "flags": list(names)}
                        for cid, names in sorted((flags or {}).items(), key=lambda x: int(x[0]))
                        if names
                    ],
                    "ratings": [
                        {"completion_id": int(cid), "rating": int(value)}
                        for cid, value in sorted((ratings or {}).items(), key=lambda x: int(x[0]))
                    ],
                    "display_order": list(display_order or []),
                    "time_on_task_ms": time_on_task_ms,
                    "comment": comment or "",
                    "confidence": confidence,
                    "guidelines_version": guidelines_version,
                    "created_at": created_at.isoformat(),
                }
            )
        yield {
            "prompt": prompt_value(ctx, group.prompt_text, group.prompt_messages),
            "completions": [
                {"id": cid, "text": text, "source": _value(source)}
                for cid, text, source, _hash in group.items
            ],
            "judgments": judgments,
            "consensus": ranking,
            "consensus_source": how,
            "agreement": agreement,
            "is_gold": bool(group.is_gold),
            "gold_ranking": group.gold_ranking if group.is_gold else None,
            "task_id": group.task_id,
            "prompt_id": group.prompt_id,
            "campaign": ctx.slugs[group.campaign_id],
            "split": ctx.split(group.prompt_hash),
        }


# --- soft labels ----------------------------------------------------------------------------


def soft_schema(ctx: Context) -> pa.Schema:
    text_type = _text_type(ctx)
    return pa.schema(
        [
            ("prompt", text_type),
            ("chosen", text_type),
            ("rejected", text_type),
            ("p_chosen", pa.float64()),
            ("votes_chosen", pa.int64()),
            ("votes_tie", pa.int64()),
            ("votes_rejected", pa.int64()),
            ("votes", pa.int64()),
            ("prior", pa.float64()),
            ("prompt_id", pa.int64()),
            ("chosen_id", pa.int64()),
            ("rejected_id", pa.int64()),
            ("campaign", pa.string()),
            ("split", pa.string()),
        ]
    )


def soft_probability(wins: float, losses: float, ties: int, prior: float, count_ties: bool):
    """P(first > second) = (wins + prior) / (votes + 2 * prior); with `count_ties`, a tie is
    half a win for each side, else ties stay out of P. 0.5 when there is nothing to count."""
    if count_ties:
        wins, losses = wins + ties / 2, losses + ties / 2
    denominator = wins + losses + 2 * prior
    return (wins + prior) / denominator if denominator > 0 else 0.5


def soft_rows(ctx: Context) -> Iterator[dict[str, Any]]:
    prior = ctx.params.soft_prior
    count_ties = ctx.params.ties == "margin0"
    current: tuple[int, int, int] | None = None
    state: dict[str, Any] = {}

    def close() -> Iterator[dict[str, Any]]:
        if current is None:
            return
        lo_wins, hi_wins, ties = state["lo"], state["hi"], state["tie"]
        p_lo = soft_probability(lo_wins, hi_wins, ties, prior, count_ties)
        lo, hi = current[1], current[2]
        if p_lo >= 0.5:
            chosen, rejected, p, won, lost = lo, hi, p_lo, lo_wins, hi_wins
        else:
            chosen, rejected, p, won, lost = hi, lo, 1.0 - p_lo, hi_wins, lo_wins
        texts = state["texts"]
        yield {
            "prompt": state["prompt"],
            "chosen": answer_value(ctx, texts[chosen]),
            "rejected": answer_value(ctx, texts[rejected]),
            "p_chosen": p,
            "votes_chosen": won,
            "votes_tie": ties,
            "votes_rejected": lost,
            "votes": won + ties + lost,
            "prior": prior,
            "prompt_id": current[0],
            "chosen_id": chosen,
            "rejected_id": rejected,
            "campaign": state["campaign"],
            "split": state["split"],
        }

    for row in comparison_rows(ctx, keep_ties=True, by_pair=True):
        chosen_id, rejected_id = row[5], row[6]
        lo, hi = min(chosen_id, rejected_id), max(chosen_id, rejected_id)
        key = (row[2], lo, hi)
        if key != current:
            yield from close()
            current = key
            state = {
                "lo": 0,
                "hi": 0,
                "tie": 0,
                "prompt": prompt_value(ctx, row[12], row[13]),
                "texts": {chosen_id: row[15], rejected_id: row[17]},
                "campaign": ctx.slugs[row[1]],
                "split": ctx.split(row[14]),
            }
        ctx.saw(row[1], row[4], row[11])
        if row[7]:
            state["tie"] += 1
        elif chosen_id == lo:
            state["lo"] += 1
        else:
            state["hi"] += 1
    yield from close()


# --- demonstrations (SFT) -------------------------------------------------------------------


def sft_schema(ctx: Context) -> pa.Schema:
    ids = [
        ("prompt_id", pa.int64()),
        ("completion_id", pa.int64()),
        ("judgment_id", pa.int64()),
        ("annotator", pa.string()),
        ("source", pa.string()),
        ("campaign", pa.string()),
        ("split", pa.string()),
    ]
    if ctx.params.sft_style == "messages":
        return pa.schema([("messages", MESSAGES), *ids])
    text_type = _text_type(ctx)
    return pa.schema([("prompt", text_type), ("completion", text_type), *ids])


def sft_rows(ctx: Context) -> Iterator[dict[str, Any]]:
    dedupe: set[int] | None = set() if ctx.params.dedupe else None
    as_messages = ctx.params.sft_style == "messages"
    for source, row in demonstration_rows(ctx):
        if source == "import":
            _task, campaign_id, prompt_id, p_text, p_chat, p_hash, cid, c_text, c_hash = row
            judgment_id = user_id = guidelines_version = None
        else:
            (
                judgment_id,
                campaign_id,
                user_id,
                _kind,
                guidelines_version,
                prompt_id,
                p_text,
                p_chat,
                p_hash,
                cid,
                c_text,
                c_hash,
            ) = row
        if source not in ctx.params.sources:
            continue
        if dedupe is not None:
            key = row_key(p_hash, c_hash)
            if key in dedupe:
                continue
            dedupe.add(key)
        ctx.saw(campaign_id, user_id, guidelines_version)
        out: dict[str, Any] = {
            "prompt_id": prompt_id,
            "completion_id": cid,
            "judgment_id": judgment_id,
            "annotator": ctx.pseudonym(user_id),
            "source": source,
            "campaign": ctx.slugs[campaign_id],
            "split": ctx.split(p_hash),
        }
        if as_messages:
            chat = messages(p_chat) if p_chat is not None else [{"role": "user", "content": p_text}]
            out["messages"] = [*chat, {"role": "assistant", "content": c_text}]
        else:
            out["prompt"] = prompt_value(ctx, p_text, p_chat)
            out["completion"] = answer_value(ctx, c_text)
        yield out


SCHEMAS = {"trl": trl_schema, "rankings": rankings_schema, "soft": soft_schema, "sft": sft_schema}
ROWS = {"trl": trl_rows, "rankings": rankings_rows, "soft": soft_rows, "sft": sft_rows}


def schema_for(ctx: Context) -> pa.Schema:
    return SCHEMAS[ctx.params.format](ctx)


def rows_for(ctx: Context) -> Iterator[dict[str, Any]]:
    return ROWS[ctx.params.format](ctx)
