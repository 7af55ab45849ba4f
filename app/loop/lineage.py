"""The policy versions page's data: every policy version in its lineage (base -> SFT ->
PPO/DPO/RLOO -> ...), and per version what its samples say (reward-model score, KL from the
reference, response length) beside what people say (the win rate against its parent)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select, union_all
from sqlalchemy.orm import Session

from app.jobs.models import ModelKind, ModelVersion
from app.labeling.models import Completion
from app.loop.audits import WinRate, win_rates

# Samples read per version for its means: the newest ones.
SAMPLES_PER_VERSION = 2_000
UNION_CHUNK = 100
VERSIONS_LIMIT = 500


@dataclass
class SampleStats:
    """Means over a version's measured samples (what the generation job stored on them)."""

    samples: int = 0  # completions of this version
    reward: float | None = None
    reward_models: list[int] = field(default_factory=list)  # which reward models scored them
    kl: float | None = None  # mean log pi/ref: the k1 estimate of KL(pi || ref)
    reference_id: int | None = None
    tokens: float | None = None
    characters: float | None = None


@dataclass
class VersionRow:
    model: ModelVersion
    depth: int
    stats: SampleStats
    win: WinRate | None

    @property
    def training(self) -> dict[str, Any]:
        """The training job's own last metrics, where it reported them."""
        return ((self.model.metrics or {}).get("eval")) or {}

    def as_json(self) -> dict[str, Any]:
        win = self.win
        return {
            "id": self.model.id,
            "name": self.model.name,
            "algorithm": self.model.algorithm,
            "parent_id": self.model.parent_id,
            "job_id": self.model.job_id,
            "depth": self.depth,
            "created_at": self.model.created_at.isoformat(),
            "samples": self.stats.samples,
            "reward_model_score": self.stats.reward,
            "reward_models": self.stats.reward_models,
            "kl_from_reference": self.stats.kl,
            "reference_id": self.stats.reference_id,
            "response_tokens": self.stats.tokens,
            "response_characters": self.stats.characters,
            "win_rate": None
            if win is None
            else {
                "against_id": win.old_model_id,
                "judgments": win.judgments,
                "audit_pairs": win.pairs,
                "rate": win.rate,
                "interval_95": list(win.interval) if win.judgments else None,
                "ties": win.ties,
                "verdict": win.verdict,
                "reward_model_rate": win.reward_rate,
                "reward_model_new_score": win.new_score,
                "reward_model_old_score": win.old_score,
                "goodhart": win.goodhart,
            },
        }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _newest_samples(db: Session, model_ids: list[int]) -> Iterator[Any]:
    """(model id, text length, generation params) of each version's newest
    SAMPLES_PER_VERSION completions, oldest first: an index range per version, a statement
    per UNION_CHUNK versions (SQLite allows 500 terms in a compound select)."""
    for start in range(0, len(model_ids), UNION_CHUNK):
        parts = []
        for model_id in model_ids[start : start + UNION_CHUNK]:
            newest = (
                select(
                    Completion.id,
                    Completion.model_version_id,
                    func.length(Completion.text).label("length"),
                    Completion.generation_params,
                )
                .where(Completion.model_version_id == model_id)
                .order_by(Completion.id.desc())
                .limit(SAMPLES_PER_VERSION)
                .subquery()
            )
            parts.append(select(*newest.c))
        everything = union_all(*parts).subquery()
        yield from db.execute(
            select(
                everything.c.model_version_id,
                everything.c.length,
                everything.c.generation_params,
            ).order_by(everything.c.id)
        )


def sample_stats(db: Session, model_ids: list[int]) -> dict[int, SampleStats]:
    """Per version: how many completions it wrote, and the means over the newest
    SAMPLES_PER_VERSION of what was measured on them."""
    out = {model_id: SampleStats() for model_id in model_ids}
    if not model_ids:
        return out
    counts = db.execute(
        select(Completion.model_version_id, func.count(Completion.id))
        .where(Completion.model_version_id.in_(model_ids))
        .group_by(Completion.model_version_id)
    )
    for model_id, count in counts:
        out[model_id].samples = int(count)
    measured: dict[int, dict[str, list[float]]] = {}
    reward_models: dict[int, set[int]] = {}
    written = [model_id for model_id in model_ids if out[model_id].samples]
    for model_id, length, params in _newest_samples(db, written):
        params = params or {}
        stats = out[model_id]
        values = measured.setdefault(
            model_id, {"reward": [], "kl": [], "tokens": [], "characters": []}
        )
        values["characters"].append(float(length))
        if params.get("reward") is not None:
            values["reward"].append(float(params["reward"]))
            if params.get("reward_model_id"):
                reward_models.setdefault(model_id, set()).add(int(params["reward_model_id"]))
        if params.get("log_ratio") is not None:
            values["kl"].append(float(params["log_ratio"]))
            # oldest first: the newest sample's reference is the one kept
            stats.reference_id = params.get("reference_id") or stats.reference_id
        if params.get("tokens") is not None:
            values["tokens"].append(float(params["tokens"]))
    for model_id, values in measured.items():
        stats = out[model_id]
        stats.reward, stats.kl = _mean(values["reward"]), _mean(values["kl"])
        stats.tokens, stats.characters = _mean(values["tokens"]), _mean(values["characters"])
        stats.reward_models = sorted(reward_models.get(model_id, ()))
    return out


def lineage(db: Session, *, campaign_id: int | None = None) -> list[VersionRow]:
    """Every policy version, parents before their children (a depth-first walk from the
    roots, oldest first), with its sample statistics and win rate."""
    query = select(ModelVersion).where(ModelVersion.kind == ModelKind.policy)
    if campaign_id is not None:
        query = query.where(
            (ModelVersion.campaign_id == campaign_id) | ModelVersion.campaign_id.is_(None)
        )
    versions = list(db.scalars(query.order_by(ModelVersion.id).limit(VERSIONS_LIMIT)))
    ids = [v.id for v in versions]
    known = set(ids)
    children: dict[int | None, list[ModelVersion]] = {}
    for version in versions:
        parent = version.parent_id if version.parent_id in known else None
        children.setdefault(parent, []).append(version)
    stats = sample_stats(db, ids)
    wins = win_rates(db, ids)
    rows: list[VersionRow] = []
    stack = [(v, 0) for v in reversed(children.get(None, []))]
    while stack:
        version, depth = stack.pop()
        rows.append(VersionRow(version, depth, stats[version.id], wins.get(version.id)))
        stack.extend((child, depth + 1) for child in reversed(children.get(version.id, [])))
    return rows
