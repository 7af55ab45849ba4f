"""Reading an export's data: one consistent read, streamed in primary-key order.

Everything here runs inside `read_session`: one REPEATABLE READ transaction on PostgreSQL
(a deferred read transaction on SQLite, which in WAL mode is a snapshot too and does not
block labelers), with `statement_timeout` off for the export alone. Rows are fetched with a
server-side cursor (`yield_per`), never all at once.

The data is read as of a high-water mark (`AsOf`): comparisons, judgments and completions
with a larger id are left out, and a judgment superseded by a later edit counts as it stood.
Re-reading with the same mark gives the same rows even while labeling goes on. Admin
decisions (exclusions, resolved and gold rankings) and account states apply as they are at
read time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Text,
    and_,
    case,
    cast,
    create_engine,
    event,
    exists,
    false,
    func,
    or_,
    select,
    text,
)
from sqlalchemy.orm import Session, aliased

from app.auth.models import User, UserKind
from app.campaigns.models import Campaign, CampaignMode
from app.db import Database
from app.exports.schemas import AsOf, ExportError, ExportParams
from app.labeling.models import (
    Comparison,
    Completion,
    CompletionSource,
    Judgment,
    Prompt,
    Task,
    TaskCompletion,
)
from app.quality import metrics
from app.quality.service import not_excluded

YIELD_PER = 2_000


# --- the read transaction ------------------------------------------------------------------


@contextmanager
def read_session(database: Database) -> Iterator[Session]:
    """A session in one consistent, read-only transaction; rolled back and closed after."""
    bind = database.sessionmaker.kw.get("bind")
    if isinstance(bind, Connection):  # tests: sessions inside an outer transaction
        with database.sessionmaker() as session:
            try:
                yield session
            finally:
                session.rollback()
        return
    engine = database.engine
    if engine.dialect.name == "sqlite":
        # The app's engine begins every transaction IMMEDIATE (a write lock); an export only
        # reads, so it gets an engine of its own whose transactions are deferred snapshots.
        reader = create_engine(engine.url, connect_args={"check_same_thread": False})

        @event.listens_for(reader, "connect")
        def _connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None

        @event.listens_for(reader, "begin")
        def _begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN DEFERRED")

        try:
            with reader.connect() as conn, Session(bind=conn) as session:
                try:
                    yield session
                finally:
                    session.rollback()
        finally:
            reader.dispose()
        return
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with Session(bind=conn) as session:
            session.execute(text("SET TRANSACTION READ ONLY"))
            session.execute(text("SET LOCAL statement_timeout = 0"))
            try:
                yield session
            finally:
                session.rollback()


# --- what the export covers ----------------------------------------------------------------


@dataclass(frozen=True)
class CampaignInfo:
    id: int
    slug: str
    name: str
    mode: str
    guidelines_version: int


def resolve_campaigns(db: Session, slugs: list[str]) -> list[CampaignInfo]:
    """The campaigns named, in the order given; ExportError 404 naming any unknown slug."""
    found = {
        c.slug: CampaignInfo(c.id, c.slug, c.name, c.mode.value, c.guidelines_version)
        for c in db.scalars(select(Campaign).where(Campaign.slug.in_(slugs)))
    }
    missing = [slug for slug in slugs if slug not in found]
    if missing:
        raise ExportError(f"no campaign {', '.join(repr(s) for s in missing)}", 404)
    return [found[slug] for slug in slugs]


def high_water(db: Session) -> AsOf:
    """The newest comparison, judgment and completion ids now."""
    row = db.execute(
        select(
            select(func.coalesce(func.max(Comparison.id), 0)).scalar_subquery(),
            select(func.coalesce(func.max(Judgment.id), 0)).scalar_subquery(),
            select(func.coalesce(func.max(Completion.id), 0)).scalar_subquery(),
        )
    ).one()
    return AsOf(comparison_id=row[0], judgment_id=row[1], completion_id=row[2])


def _day_start(day: dt.date) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)


def split_of(seed: int, prompt_hash: str, test_fraction: float) -> str:
    """ "test" for a deterministic `test_fraction` of prompts (by content), else "train"."""
    if test_fraction <= 0:
        return "train"
    digest = hashlib.sha256(f"{seed}:{prompt_hash}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def row_key(*parts: object) -> int:
    """A 64-bit fingerprint of a row's identity, for deduplication in little memory."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@dataclass
class Context:
    """One export's decisions, made once at the start of the read."""

    db: Session
    params: ExportParams
    campaigns: list[CampaignInfo]
    as_of: AsOf
    secret_key: str
    conversational: bool = False  # every prompt as chat messages
    with_margin: bool = False  # trl: a margin column
    flagged: set[int] | None = None  # completion ids some labeler flagged (flagged=drop)
    gold_ok: set[tuple[int, int]] | None = None  # (campaign, labeler) passing min gold accuracy
    agreeing_tasks: set[int] | None = None  # tasks passing min_agreement (trl labeled pairs)
    # What the rows turned out to contain, for the manifest and the card.
    seen: set[tuple[int, int | None, int | None]] = field(default_factory=set)
    _pseudonyms: dict[int, str] = field(default_factory=dict)
    _splits: dict[str, str] = field(default_factory=dict)

    @property
    def campaign_ids(self) -> list[int]:
        return [c.id for c in self.campaigns]

    @property
    def slugs(self) -> dict[int, str]:
        return {c.id: c.slug for c in self.campaigns}

    def pseudonym(self, user_id: int | None) -> str | None:
        """An annotator id that names nobody: an HMAC of the user id under the secret key,
        salted with the export's parameters (`snapshot`) or not (`stable`)."""
        if user_id is None:
            return None
        known = self._pseudonyms.get(user_id)
        if known is None:
            if self.params.pseudonyms == "stable":
                message, prefix = f"stable:{user_id}", "s-"
            else:
                salt = json.dumps(self.params.canonical(), sort_keys=True)
                message, prefix = f"snapshot:{salt}:{user_id}", "a-"
            digest = hmac.new(self.secret_key.encode(), message.encode(), hashlib.sha256)
            known = self._pseudonyms[user_id] = prefix + digest.hexdigest()[:12]
        return known

    def saw(self, campaign_id: int, user_id: int | None, guidelines_version: int | None) -> None:
        """Note who labeled an exported row, under which guidelines (for the manifest)."""
        self.seen.add((campaign_id, user_id, guidelines_version))

    @property
    def labelers(self) -> set[int]:
        return {user for _, user, _ in self.seen if user is not None}

    @property
    def guidelines(self) -> dict[str, set[int]]:
        slugs, out = self.slugs, {}
        for campaign_id, _, version in self.seen:
            if version is not None:
                out.setdefault(slugs[campaign_id], set()).add(version)
        return out

    def split(self, prompt_hash: str) -> str:
        known = self._splits.get(prompt_hash)
        if known is None:
            if len(self._splits) > 10_000:
                self._splits.clear()
            known = self._splits[prompt_hash] = split_of(
                self.params.seed, prompt_hash, self.params.test_fraction
            )
        return known

    def labeler_passes(self, campaign_id: int, user_id: int | None) -> bool:
        return self.gold_ok is None or user_id is None or (campaign_id, user_id) in self.gold_ok


def make_context(db: Session, params: ExportParams, secret_key: str) -> Context:
    """Resolve the campaigns, fix the high-water mark and prepare the filters."""
    campaigns = resolve_campaigns(db, params.campaigns)
    as_of = params.as_of or high_water(db)
    params = params.model_copy(update={"as_of": as_of})
    ctx = Context(db, params, campaigns, as_of, secret_key)
    ids = ctx.campaign_ids
    ctx.conversational = bool(
        db.scalar(select(exists().where(Prompt.campaign_id.in_(ids), Prompt.messages.is_not(None))))
    )
    if params.format == "trl":
        ctx.with_margin = params.ties == "margin0" or (
            params.pairs == "labeled"
            and bool(
                db.scalar(
                    select(
                        exists().where(
                            Comparison.campaign_id.in_(ids),
                            Comparison.id <= as_of.comparison_id,
                            Comparison.margin.is_not(None),
                        )
                    )
                )
            )
        )
    if params.flagged == "drop":
        ctx.flagged = flagged_completions(ctx)
    if params.min_gold_accuracy is not None:
        ctx.gold_ok = gold_passing(ctx, params.min_gold_accuracy)
    if params.min_agreement is not None and params.format in ("trl", "soft"):
        ctx.agreeing_tasks = agreeing_tasks(ctx, params.min_agreement)
    return ctx


# --- filters --------------------------------------------------------------------------------


_Successor = aliased(Judgment, name="successor")


def judgment_current_as_of(judgment: Any, as_of: AsOf) -> ColumnElement[bool]:
    """Current then: current now, or superseded only by an edit made after the mark."""
    return or_(
        judgment.is_current.is_(True),
        exists().where(_Successor.supersedes_id == judgment.id, _Successor.id > as_of.judgment_id),
    )


def _kinds(sources: list[str]) -> list[UserKind] | None:
    kinds = [k for k, s in ((UserKind.human, "human"), (UserKind.ai, "ai")) if s in sources]
    return None if len(kinds) == 2 else kinds


def judgment_filters(ctx: Context) -> list[ColumnElement[bool]]:
    """Judgments (joined with their User) the export may read."""
    p, as_of = ctx.params, ctx.as_of
    clauses = [
        Judgment.campaign_id.in_(ctx.campaign_ids),
        Judgment.id <= as_of.judgment_id,
        Judgment.recheck_of_id.is_(None),
        judgment_current_as_of(Judgment, as_of),
    ]
    if p.since is not None:
        clauses.append(Judgment.created_at >= _day_start(p.since))
    if p.until is not None:
        clauses.append(Judgment.created_at < _day_start(p.until) + dt.timedelta(days=1))
    if not p.include_excluded:
        clauses.append(not_excluded(Judgment.user_id, Judgment.campaign_id))
    if not p.include_inactive:
        clauses.append(User.is_active.is_(True))
    kinds = _kinds(p.sources)
    if kinds is not None:
        clauses.append(User.kind.in_(kinds) if kinds else false())
    return clauses


def comparison_filters(ctx: Context, *, keep_ties: bool) -> list[ColumnElement[bool]]:
    """Comparisons (outer-joined with their User) the export may read."""
    p, as_of = ctx.params, ctx.as_of
    clauses = [
        Comparison.campaign_id.in_(ctx.campaign_ids),
        Comparison.id <= as_of.comparison_id,
        or_(
            Comparison.is_active.is_(True),
            and_(
                Comparison.judgment_id.is_not(None),
                exists().where(
                    _Successor.supersedes_id == Comparison.judgment_id,
                    _Successor.id > as_of.judgment_id,
                ),
            ),
        ),
        Comparison.source.in_(p.sources),
    ]
    if not keep_ties:
        clauses.append(Comparison.is_tie.is_(False))
    if p.since is not None:
        clauses.append(Comparison.created_at >= _day_start(p.since))
    if p.until is not None:
        clauses.append(Comparison.created_at < _day_start(p.until) + dt.timedelta(days=1))
    if not p.include_excluded:
        clauses.append(not_excluded(Comparison.user_id, Comparison.campaign_id))
    if not p.include_inactive:
        clauses.append(or_(Comparison.user_id.is_(None), User.is_active.is_(True)))
    return clauses


def _stream(db: Session, statement: Any) -> Iterator[Any]:
    # Core rows through the session's connection (no ORM loading layer), fetched in batches
    # from a server-side cursor; by partition, since row-at-a-time iteration costs a fetch
    # call per row (a third of a Parquet export's time).
    result = db.connection().execute(statement.execution_options(yield_per=YIELD_PER))
    for partition in result.partitions():
        yield from partition


def flagged_completions(ctx: Context) -> set[int]:
    """Completions flagged in any current judgment of the campaigns (whoever judged)."""
    query = select(Judgment.flags).where(
        Judgment.campaign_id.in_(ctx.campaign_ids),
        Judgment.id <= ctx.as_of.judgment_id,
        judgment_current_as_of(Judgment, ctx.as_of),
        func.length(cast(Judgment.flags, Text)) > 2,  # not "{}"
    )
    out: set[int] = set()
    for (flags,) in _stream(ctx.db, query):
        out.update(int(cid) for cid, names in (flags or {}).items() if names)
    return out


def gold_passing(ctx: Context, minimum: float) -> set[tuple[int, int]]:
    """(campaign, labeler) whose mean agreement with gold answers is at least `minimum`
    (the quality report's gold accuracy); labelers who judged no gold task do not pass."""
    query = (
        select(Judgment.campaign_id, Judgment.user_id, Judgment.ranking, Task.gold_ranking)
        .join(Task, Task.id == Judgment.task_id)
        .join(User, User.id == Judgment.user_id)
        .where(
            *judgment_filters(ctx),
            Task.is_gold.is_(True),
            Task.gold_ranking.is_not(None),
            Judgment.ranking.is_not(None),
        )
        .order_by(Judgment.id)
    )
    scores: dict[tuple[int, int], list[float]] = {}
    for campaign_id, user_id, ranking, gold in _stream(ctx.db, query):
        value = metrics.pairwise_agreement(ranking, gold)
        if not math.isnan(value):
            scores.setdefault((campaign_id, user_id), []).append(value)
    return {key for key, v in scores.items() if sum(v) / len(v) >= minimum - 1e-12}


def task_agreement(rankings: list[list[list[int]]]) -> float | None:
    """Mean pairwise agreement of every two judgments of a task; None under two."""
    values = [metrics.pairwise_agreement(a, b) for a, b in combinations(rankings, 2)]
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else None


def agreeing_tasks(ctx: Context, minimum: float) -> set[int]:
    """Tasks whose exported judgments agree at least `minimum` on average."""
    query = (
        select(Judgment.task_id, Judgment.campaign_id, Judgment.user_id, Judgment.ranking)
        .join(User, User.id == Judgment.user_id)
        .where(*judgment_filters(ctx), Judgment.ranking.is_not(None))
        .order_by(Judgment.task_id, Judgment.id)
    )
    out: set[int] = set()
    current: int | None = None
    rankings: list[Any] = []

    def close() -> None:
        value = task_agreement(rankings)
        if current is not None and value is not None and value >= minimum - 1e-12:
            out.add(current)

    for task_id, campaign_id, user_id, ranking in _stream(ctx.db, query):
        if task_id != current:
            close()
            current, rankings = task_id, []
        if ctx.labeler_passes(campaign_id, user_id):
            rankings.append(ranking)
    close()
    return out


# --- streams ---------------------------------------------------------------------------------

_Chosen = aliased(Completion, name="chosen")
_Rejected = aliased(Completion, name="rejected")


def comparison_rows(ctx: Context, *, keep_ties: bool, by_pair: bool = False) -> Iterator[Any]:
    """Comparisons with their texts, in id order (or by prompt and unordered pair, then id),
    after every filter."""
    lo = case(
        (Comparison.chosen_id < Comparison.rejected_id, Comparison.chosen_id),
        else_=Comparison.rejected_id,
    )
    hi = case(
        (Comparison.chosen_id < Comparison.rejected_id, Comparison.rejected_id),
        else_=Comparison.chosen_id,
    )
    query = (
        select(
            Comparison.id,
            Comparison.campaign_id,
            Comparison.prompt_id,
            Comparison.judgment_id,
            Comparison.user_id,
            Comparison.chosen_id,
            Comparison.rejected_id,
            Comparison.is_tie,
            Comparison.margin,
            Comparison.source,
            Judgment.task_id,
            Judgment.guidelines_version,
            Prompt.text,
            Prompt.messages,
            Prompt.content_hash,
            _Chosen.text,
            _Chosen.content_hash,
            _Rejected.text,
            _Rejected.content_hash,
        )
        .join(Prompt, Prompt.id == Comparison.prompt_id)
        .join(_Chosen, _Chosen.id == Comparison.chosen_id)
        .join(_Rejected, _Rejected.id == Comparison.rejected_id)
        .outerjoin(Judgment, Judgment.id == Comparison.judgment_id)
        .outerjoin(User, User.id == Comparison.user_id)
        .where(*comparison_filters(ctx, keep_ties=keep_ties))
    )
    query = (
        query.order_by(Comparison.prompt_id, lo, hi, Comparison.id)
        if by_pair
        else query.order_by(Comparison.id)
    )
    flagged, agreeing = ctx.flagged, ctx.agreeing_tasks
    for row in _stream(ctx.db, query):
        if flagged is not None and (row[5] in flagged or row[6] in flagged):
            continue
        if row[3] is not None:  # a judgment's pair: labeler and task filters
            if not ctx.labeler_passes(row[1], row[4]):
                continue
            if agreeing is not None and row[10] not in agreeing:
                continue
        yield row


@dataclass
class TaskGroup:
    task_id: int
    campaign_id: int
    prompt_id: int
    is_gold: bool
    gold_ranking: list[list[int]] | None
    resolved_ranking: list[list[int]] | None
    prompt_text: str | None
    prompt_messages: list[dict[str, Any]] | None
    prompt_hash: str
    items: list[Any]  # (completion id, text, source, content hash) in task order
    judgments: list[Any]  # judgment rows, in id order


def task_groups(ctx: Context) -> Iterator[TaskGroup]:
    """Each task with its completions and its exported (ranked) judgments, in task order;
    tasks with no judgment left after the filters are skipped. Three ordered cursors,
    merged here, so memory holds one task at a time."""
    ids = ctx.campaign_ids
    tasks = _stream(
        ctx.db,
        select(
            Task.id,
            Task.campaign_id,
            Task.prompt_id,
            Task.is_gold,
            Task.gold_ranking,
            Task.resolved_ranking,
            Prompt.text,
            Prompt.messages,
            Prompt.content_hash,
        )
        .join(Prompt, Prompt.id == Task.prompt_id)
        .where(Task.campaign_id.in_(ids))
        .order_by(Task.id),
    )
    items = _stream(
        ctx.db,
        select(
            TaskCompletion.task_id,
            Completion.id,
            Completion.text,
            Completion.source,
            Completion.content_hash,
        )
        .join(Task, Task.id == TaskCompletion.task_id)
        .join(Completion, Completion.id == TaskCompletion.completion_id)
        .where(Task.campaign_id.in_(ids))
        .order_by(TaskCompletion.task_id, TaskCompletion.position),
    )
    judgments = _stream(
        ctx.db,
        select(
            Judgment.task_id,
            Judgment.id,
            Judgment.campaign_id,
            Judgment.user_id,
            User.kind,
            Judgment.ranking,
            Judgment.pairwise_strength,
            Judgment.flags,
            Judgment.ratings,
            Judgment.display_order,
            Judgment.time_on_task_ms,
            Judgment.comment,
            Judgment.confidence,
            Judgment.guidelines_version,
            Judgment.created_at,
        )
        .join(User, User.id == Judgment.user_id)
        .where(*judgment_filters(ctx), Judgment.ranking.is_not(None))
        .order_by(Judgment.task_id, Judgment.id),
    )
    next_item = next(items, None)
    next_judgment = next(judgments, None)
    for task in tasks:
        task_id = task[0]
        mine_items = []
        while next_item is not None and next_item[0] <= task_id:
            if next_item[0] == task_id:
                mine_items.append(tuple(next_item[1:]))
            next_item = next(items, None)
        mine = []
        while next_judgment is not None and next_judgment[0] <= task_id:
            if next_judgment[0] == task_id and ctx.labeler_passes(
                next_judgment[2], next_judgment[3]
            ):
                mine.append(next_judgment)
            next_judgment = next(judgments, None)
        if not mine:
            continue
        yield TaskGroup(
            task_id,
            task[1],
            task[2],
            task[3],
            task[4],
            task[5],
            task[6],
            task[7],
            task[8],
            mine_items,
            mine,
        )


def demonstration_rows(ctx: Context) -> Iterator[tuple[str, Any]]:
    """SFT material: ("human" | "ai", row) for labelers' demonstrations in judgment order,
    then ("import", row) for imported answers on demonstration-campaign tasks."""
    demo = aliased(Completion, name="demo")
    query = (
        select(
            Judgment.id,
            Judgment.campaign_id,
            Judgment.user_id,
            User.kind,
            Judgment.guidelines_version,
            Task.prompt_id,
            Prompt.text,
            Prompt.messages,
            Prompt.content_hash,
            demo.id,
            demo.text,
            demo.content_hash,
        )
        .join(User, User.id == Judgment.user_id)
        .join(Task, Task.id == Judgment.task_id)
        .join(Prompt, Prompt.id == Task.prompt_id)
        .join(demo, demo.id == Judgment.demonstration_id)
        .where(*judgment_filters(ctx), Judgment.demonstration_id.is_not(None))
        .order_by(Judgment.id)
    )
    for row in _stream(ctx.db, query):
        if not ctx.labeler_passes(row[1], row[2]):
            continue
        if ctx.flagged is not None and row[9] in ctx.flagged:
            continue
        yield ("ai" if row[3] == UserKind.ai else "human"), row
    if "import" not in ctx.params.sources:
        return
    p = ctx.params
    clauses = [
        Task.campaign_id.in_(ctx.campaign_ids),
        Campaign.mode == CampaignMode.demonstration,
        Completion.source == CompletionSource.imported,
        Completion.id <= ctx.as_of.completion_id,
    ]
    if p.since is not None:
        clauses.append(Completion.created_at >= _day_start(p.since))
    if p.until is not None:
        clauses.append(Completion.created_at < _day_start(p.until) + dt.timedelta(days=1))
    query = (
        select(
            Task.id,
            Task.campaign_id,
            Task.prompt_id,
            Prompt.text,
            Prompt.messages,
            Prompt.content_hash,
            Completion.id,
            Completion.text,
            Completion.content_hash,
        )
        .join(Campaign, Campaign.id == Task.campaign_id)
        .join(TaskCompletion, TaskCompletion.task_id == Task.id)
        .join(Completion, Completion.id == TaskCompletion.completion_id)
        .join(Prompt, Prompt.id == Task.prompt_id)
        .where(*clauses)
        .order_by(Completion.id, Task.id)
    )
    for row in _stream(ctx.db, query):
        if ctx.flagged is not None and row[6] in ctx.flagged:
            continue
        yield "import", row


def source_of(kind: Any) -> str:
    return "ai" if kind == UserKind.ai else "human"
