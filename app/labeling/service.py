"""Serving tasks to labelers and storing their answers.

Assignment is exact-overlap: a task is served to at most `required_judgments` distinct
labelers, counting live leases and submitted judgments (`Task.assigned_count`), and never
twice to one labeler (a unique constraint on assignments). On PostgreSQL a claim is one
`UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED)` statement, so concurrent
labelers never wait on each other's rows; on SQLite every write transaction is serialized
(BEGIN IMMEDIATE), which makes the same statement correct.

Submits are idempotent: the key rendered with the task becomes the judgment's idempotency
key, so a double click or a retry stores one judgment and answers the same.

Self-consistency re-checks: at the campaign's `recheck_rate`, a new lease may instead serve
one of the labeler's own earlier tasks again, in a different order, looking exactly like any
other task. A re-check takes no slot and changes no task counter; its judgment points at the
original (`recheck_of_id`), is never current and yields no comparisons.

Functions only add and flush; the request (or test) owns the transaction.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
import secrets
from collections import Counter
from dataclasses import dataclass
from itertools import combinations
from typing import Any

from sqlalchemy import (
    and_,
    bindparam,
    case,
    exists,
    false,
    func,
    insert,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.orm import Session, aliased

from app.audit import service as audit
from app.auth.models import User
from app.campaigns.models import Campaign, CampaignMode, CampaignStatus
from app.db import utcnow
from app.labeling.models import (
    Assignment,
    AssignmentState,
    Comparison,
    ComparisonSource,
    Completion,
    CompletionSource,
    Judgment,
    Prompt,
    Task,
    TaskCompletion,
    TaskStatus,
)
from app.labeling.schemas import EditIn, JudgmentIn

RATING_RANGE = range(1, 8)
# PostgreSQL advisory lock key for the lease sweep: one sweeper at a time, others skip it.
SWEEP_LOCK_KEY = 0x70666C_01
SWEEP_EVERY = dt.timedelta(seconds=5)
# A re-check never repeats one of the labeler's latest judgments in the campaign, so the
# repeat is not immediate (and a labeler needs more than this many before any re-check).
RECHECK_MIN_GAP = 10
# Re-checks are drawn at random from the labeler's oldest eligible judgments, at most this
# many, so the lookup stays bounded however much they have labeled.
RECHECK_POOL = 200


class LabelingError(Exception):
    """A request the labeler can understand and fix; `status_code` is its HTTP status."""

    status_code = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(LabelingError):
    status_code = 404


class Forbidden(LabelingError):
    status_code = 403


class Conflict(LabelingError):
    status_code = 409


class InvalidAnswer(LabelingError):
    status_code = 422


@dataclass(frozen=True)
class ServedTask:
    """A leased task as the labeler sees it: completions in their display order."""

    assignment: Assignment
    campaign: Campaign
    prompt: Prompt
    completions: list[Completion]  # display order

    @property
    def task_id(self) -> int:
        return self.assignment.task_id


# --- pure helpers -------------------------------------------------------------------------


def answer_hash(answer: JudgmentIn) -> str:
    """A stable hash of what the answer says, to tell a retry from a different answer."""
    canonical = json.dumps(answer.fingerprint(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def validate_ranking(ranking: list[list[int]], completion_ids: list[int], *, allow_ties: bool):
    """A ranking must order exactly the task's completions, each once, ties only if allowed."""
    if any(not tier for tier in ranking):
        raise InvalidAnswer("the ranking has an empty tier")
    ranked = [cid for tier in ranking for cid in tier]
    if len(ranked) != len(set(ranked)):
        raise InvalidAnswer("the ranking lists a completion twice")
    if set(ranked) != set(completion_ids):
        missing = sorted(set(completion_ids) - set(ranked))
        unknown = sorted(set(ranked) - set(completion_ids))
        parts = []
        if missing:
            parts.append(f"missing completions {missing}")
        if unknown:
            parts.append(f"completions {unknown} are not in this task")
        raise InvalidAnswer(
            "the ranking must order exactly this task's completions: " + "; ".join(parts)
        )
    if not allow_ties and any(len(tier) > 1 for tier in ranking):
        raise InvalidAnswer("this campaign does not allow ties")


def pairs_from_ranking(
    ranking: list[list[int]], *, margin: float | None = None
) -> list[tuple[int, int, bool, float | None]]:
    """All K-choose-2 pairs of a tiered ranking: (chosen, rejected, is_tie, margin).

    Tied completions give one pair marked as a tie (in id order), so exports can drop ties or
    keep them as margin 0.
    """
    pairs = []
    for i, upper in enumerate(ranking):
        for a, b in combinations(sorted(upper), 2):
            pairs.append((a, b, True, 0.0 if margin is not None else None))
        for lower in ranking[i + 1 :]:
            for a in upper:
                for b in lower:
                    pairs.append((a, b, False, margin))
    return pairs


def strength_to_ranking(strength: int, shown: list[int]) -> list[list[int]]:
    """Pairwise strength (negative = A, the first shown, is better) as a ranking."""
    a, b = shown
    if strength < 0:
        return [[a], [b]]
    if strength > 0:
        return [[b], [a]]
    return [[a, b]]


def recheck_order(shown: list[int], rng: random.Random) -> list[int]:
    """A display order for a re-check that differs from the one shown before (for two
    completions, the reverse)."""
    if len(set(shown)) < 2:
        return list(shown)
    if len(shown) == 2:
        return shown[::-1]
    order = list(shown)
    while order == shown:
        rng.shuffle(order)
    return order


def check_answer(
    campaign: Campaign, completion_ids: list[int], shown: list[int], answer: JudgmentIn
):
    """Validate an answer against the task and campaign; returns the ranking to store."""
    allowed_flags = set(campaign.flags)
    for cid, flags in answer.flags.items():
        if cid not in completion_ids:
            raise InvalidAnswer(f"flags given for completion {cid}, which is not in this task")
        unknown = sorted(set(flags) - allowed_flags)
        if unknown:
            raise InvalidAnswer(
                f"unknown flags {unknown}; this campaign's flags are {campaign.flags}"
            )
    for cid, rating in answer.ratings.items():
        if cid not in completion_ids:
            raise InvalidAnswer(f"rating given for completion {cid}, which is not in this task")
        if rating not in RATING_RANGE:
            raise InvalidAnswer("ratings go from 1 to 7")

    if campaign.mode is CampaignMode.rank:
        if answer.ranking is None:
            raise InvalidAnswer("a ranking is required")
        if answer.strength is not None or answer.demonstration is not None:
            raise InvalidAnswer("a rank task takes a ranking only")
        validate_ranking(answer.ranking, completion_ids, allow_ties=campaign.allow_ties)
        return answer.ranking
    if campaign.mode is CampaignMode.pairwise:
        if answer.strength is None:
            raise InvalidAnswer("a strength from -3 to 3 is required")
        if answer.ranking is not None or answer.demonstration is not None:
            raise InvalidAnswer("a pairwise task takes a strength only")
        if len(shown) != 2:
            raise InvalidAnswer("a pairwise task needs exactly two completions")
        if answer.strength == 0 and not campaign.allow_ties:
            raise InvalidAnswer("this campaign does not allow ties: choose A or B")
        return strength_to_ranking(answer.strength, shown)
    # Demonstration.
    if not (answer.demonstration or "").strip():
        raise InvalidAnswer("write a response before submitting")
    if answer.ranking is not None or answer.strength is not None:
        raise InvalidAnswer("a demonstration task takes a written response only")
    return None


# --- leases -------------------------------------------------------------------------------


def expire_leases(db: Session, *, now: dt.datetime | None = None) -> int:
    """Mark leases past their expiry as expired and free their slots. Returns how many."""
    now = now or utcnow()
    if db.get_bind().dialect.name == "postgresql" and not db.scalar(
        text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": SWEEP_LOCK_KEY}
    ):
        return 0  # another transaction is sweeping right now
    expired = db.execute(
        update(Assignment)
        .where(Assignment.state == AssignmentState.active, Assignment.lease_expires_at < now)
        .values(state=AssignmentState.expired, finished_at=now)
        .returning(Assignment.task_id, Assignment.is_recheck)
        .execution_options(synchronize_session=False)
    ).all()
    # A re-check lease holds no slot, so it frees none.
    slots = Counter(task_id for task_id, is_recheck in expired if not is_recheck)
    for task_id, freed in sorted(slots.items()):  # sorted: a stable lock order
        db.execute(
            update(Task)
            .where(Task.id == task_id)
            .values(assigned_count=Task.assigned_count - freed)
            .execution_options(synchronize_session=False)
        )
    return len(expired)


# The hot statements are built once, with bound parameters: building a statement costs more
# Python than running it, and labeling runs them hundreds of times a second.
_LIVE_LEASE = (
    select(
        select(Assignment.id)
        .join(Task, Task.id == Assignment.task_id)
        .where(
            Assignment.user_id == bindparam("user_id"),
            Assignment.state == AssignmentState.active,
            Task.campaign_id == bindparam("campaign_id"),
        )
        .order_by(Assignment.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    .where(User.id == bindparam("user_id"))
    .with_for_update(key_share=True, of=User)
)


def _lock_user_and_find_lease(db: Session, *, user_id: int, campaign_id: int) -> int | None:
    """Lock the labeler's row and return their live lease in this campaign, in one statement.

    The lock makes one labeler's claims run one at a time (SQLite serializes all writers).
    """
    return db.scalar(_LIVE_LEASE, {"user_id": user_id, "campaign_id": campaign_id})


_last_sweep: dt.datetime | None = None


def _sweep_due(now: dt.datetime) -> bool:
    """Expired leases are swept at most every SWEEP_EVERY per process, not on every claim."""
    global _last_sweep
    if _last_sweep is None or now - _last_sweep >= SWEEP_EVERY or now < _last_sweep:
        _last_sweep = now
        return True
    return False


def _claim_statement(*, gold: bool) -> Any:
    """Take a slot on the best available task: UPDATE ... WHERE id = (SELECT ... SKIP LOCKED)."""
    candidate = aliased(Task)
    seen = exists().where(
        Assignment.task_id == candidate.id, Assignment.user_id == bindparam("for_user")
    )
    conditions = [
        candidate.campaign_id == bindparam("in_campaign"),
        candidate.status == TaskStatus.open,
        candidate.is_gold.is_(true()) if gold else candidate.is_gold.is_(false()),
        ~seen,
    ]
    if not gold:  # gold tasks go to every labeler once; they have no overlap limit
        conditions.append(candidate.assigned_count < candidate.required_judgments)
    pick = (
        select(candidate.id)
        .where(*conditions)
        .order_by(candidate.priority.desc(), candidate.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return (
        update(Task)
        .where(Task.id == pick)
        .values(assigned_count=Task.assigned_count + 1)
        .returning(Task.id, Task.prompt_id)
        .execution_options(synchronize_session=False)
    )


_CLAIM = {gold: _claim_statement(gold=gold) for gold in (False, True)}
_TASK_COMPLETIONS = (
    select(Completion)
    .join(TaskCompletion, TaskCompletion.completion_id == Completion.id)
    .where(TaskCompletion.task_id == bindparam("task_id"))
    .order_by(TaskCompletion.position)
)


def _claim(db: Session, *, user_id: int, campaign_id: int, gold: bool) -> tuple[int, int] | None:
    """Take a slot in one statement; returns (task id, prompt id), or None."""
    row = db.execute(_CLAIM[gold], {"for_user": user_id, "in_campaign": campaign_id}).first()
    return (row[0], row[1]) if row else None


def _recheck_candidates_statement() -> Any:
    """The labeler's judgments that may be re-checked, oldest first, at most RECHECK_POOL.

    Eligible: their current judgment (not itself a re-check) of a non-gold task that is not
    withdrawn, that they have not been re-served yet, older than their RECHECK_MIN_GAP
    latest judgments in the campaign (with fewer than that, the cut-off is NULL: none).
    """
    latest = aliased(Judgment)
    cutoff = (
        select(latest.id)
        .where(
            latest.user_id == bindparam("user_id"),
            latest.campaign_id == bindparam("campaign_id"),
        )
        .order_by(latest.id.desc())
        .offset(RECHECK_MIN_GAP - 1)
        .limit(1)
        .scalar_subquery()
    )
    rechecked = exists().where(
        Assignment.task_id == Judgment.task_id,
        Assignment.user_id == Judgment.user_id,
        Assignment.is_recheck.is_(true()),
    )
    return (
        select(Judgment.id, Judgment.task_id, Judgment.display_order)
        .join(Task, Task.id == Judgment.task_id)
        .where(
            Judgment.user_id == bindparam("user_id"),
            Judgment.campaign_id == bindparam("campaign_id"),
            Judgment.is_current.is_(true()),
            Judgment.recheck_of_id.is_(None),
            Judgment.id < cutoff,
            Task.is_gold.is_(false()),
            Task.status != TaskStatus.retired,
            ~rechecked,
        )
        .order_by(Judgment.id)
        .limit(RECHECK_POOL)
    )


_RECHECK_CANDIDATES = _recheck_candidates_statement()


def _lease_recheck(
    db: Session, *, user: User, campaign: Campaign, now: dt.datetime, rng: random.Random
) -> ServedTask | None:
    """Serve one of the labeler's own earlier tasks again, in a new order; None if none fits.

    It takes no slot: the task's counters and status are left alone. The labeler's row is
    locked by the caller, so two claims cannot both re-serve the same task.
    """
    candidates = db.execute(
        _RECHECK_CANDIDATES, {"user_id": user.id, "campaign_id": campaign.id}
    ).all()
    if not candidates:
        return None
    _judgment_id, task_id, shown = rng.choice(candidates)
    assignment = Assignment(
        task_id=task_id,
        user_id=user.id,
        state=AssignmentState.active,
        display_order=recheck_order(list(shown), rng),
        submit_key=secrets.token_urlsafe(24),
        leased_at=now,
        lease_expires_at=now + dt.timedelta(minutes=campaign.lease_minutes),
        is_recheck=True,
    )
    db.add(assignment)
    db.flush()
    return serve(db, assignment)


def lease(
    db: Session,
    *,
    user: User,
    campaign: Campaign,
    now: dt.datetime | None = None,
    rng: random.Random | None = None,
) -> ServedTask | None:
    """The labeler's current task in the campaign, or a newly leased one; None when none left."""
    now = now or utcnow()
    rng = rng or random.SystemRandom()
    if campaign.status != CampaignStatus.active:
        raise Conflict(
            f"campaign '{campaign.slug}' is {CampaignStatus(campaign.status)}, not active"
        )
    live_id = _lock_user_and_find_lease(db, user_id=user.id, campaign_id=campaign.id)
    if live_id is not None:
        current = db.get_one(Assignment, live_id)
        # Its slot is still counted, so renewing it takes nothing from anyone.
        current.lease_expires_at = now + dt.timedelta(minutes=campaign.lease_minutes)
        db.flush()
        return serve(db, current)
    if _sweep_due(now):
        expire_leases(db, now=now)
    if (
        campaign.recheck_rate > 0  # checked first: no extra work when re-checks are off
        and campaign.mode is not CampaignMode.demonstration
        and rng.random() < campaign.recheck_rate
    ):
        recheck = _lease_recheck(db, user=user, campaign=campaign, now=now, rng=rng)
        if recheck is not None:
            return recheck
    want_gold = campaign.gold_rate > 0 and rng.random() < campaign.gold_rate
    claimed = _claim(db, user_id=user.id, campaign_id=campaign.id, gold=want_gold)
    if claimed is None and want_gold:
        claimed = _claim(db, user_id=user.id, campaign_id=campaign.id, gold=False)
    if claimed is None:
        return None
    task_id, prompt_id = claimed
    completions = list(db.scalars(_TASK_COMPLETIONS, {"task_id": task_id}))
    rng.shuffle(completions)
    assignment = Assignment(
        task_id=task_id,
        user_id=user.id,
        state=AssignmentState.active,
        display_order=[c.id for c in completions],
        submit_key=secrets.token_urlsafe(24),
        leased_at=now,
        lease_expires_at=now + dt.timedelta(minutes=campaign.lease_minutes),
    )
    db.add(assignment)
    db.flush()
    return ServedTask(
        assignment=assignment,
        campaign=campaign,
        prompt=db.get_one(Prompt, prompt_id),
        completions=completions,
    )


def next_task(
    db: Session,
    *,
    user: User,
    campaign: Campaign,
    now: dt.datetime | None = None,
    rng: random.Random | None = None,
) -> Assignment | None:
    """Like `lease`, for callers that only need the assignment."""
    served = lease(db, user=user, campaign=campaign, now=now, rng=rng)
    return served.assignment if served else None


def serve(db: Session, assignment: Assignment) -> ServedTask:
    """Load what the task page (or API) shows for an existing lease."""
    task = db.get_one(Task, assignment.task_id)
    by_id = {
        c.id: c
        for c in db.scalars(select(Completion).where(Completion.id.in_(assignment.display_order)))
    }
    return ServedTask(
        assignment=assignment,
        campaign=db.get_one(Campaign, task.campaign_id),
        prompt=db.get_one(Prompt, task.prompt_id),
        completions=[by_id[cid] for cid in assignment.display_order],
    )


_LOCKED_LEASE = (
    select(Assignment, Task, Campaign)
    .join(Task, Task.id == Assignment.task_id)
    .join(Campaign, Campaign.id == Task.campaign_id)
    .where(Assignment.submit_key == bindparam("submit_key"))
    .with_for_update(of=Assignment)
    .execution_options(populate_existing=True)  # what the lock holds, not a cached copy
)


def _assignment_for(
    db: Session, *, user: User, submit_key: str
) -> tuple[Assignment, Task, Campaign]:
    """The lease behind a submit key, locked, with its task and campaign (one statement)."""
    row = db.execute(_LOCKED_LEASE, {"submit_key": submit_key}).first()
    if row is None:
        raise NotFound("no such task: it may have been reset; load the next one")
    assignment, task, campaign = row
    if assignment.user_id != user.id:
        raise Forbidden("this task is leased to someone else")
    return assignment, task, campaign


def _retake_slot(db: Session, assignment: Assignment, task: Task, now: dt.datetime) -> None:
    """An expired lease may still submit if its slot was not given to someone else."""
    conditions = [Task.id == task.id]
    if not task.is_gold:  # gold tasks have no overlap limit
        conditions += [
            Task.status == TaskStatus.open,
            Task.assigned_count < Task.required_judgments,
        ]
    taken = db.execute(
        update(Task)
        .where(*conditions)
        .values(assigned_count=Task.assigned_count + 1)
        .execution_options(synchronize_session=False)
    ).rowcount
    if not taken:
        raise Conflict(
            "your lease on this task expired and it went to another labeler; "
            "your answer was not saved"
        )
    assignment.state = AssignmentState.active


def skip(
    db: Session, *, user: User, submit_key: str, reason: str = "", now: dt.datetime | None = None
) -> Assignment:
    """Give the task back; it will not be served to this labeler again."""
    now = now or utcnow()
    assignment, _, _ = _assignment_for(db, user=user, submit_key=submit_key)
    if assignment.state is AssignmentState.skipped:
        return assignment  # a retried skip
    if assignment.state is AssignmentState.submitted:
        raise Conflict("this task was already submitted")
    if assignment.state is AssignmentState.active and not assignment.is_recheck:
        db.execute(
            update(Task)
            .where(Task.id == assignment.task_id)
            .values(assigned_count=Task.assigned_count - 1)
            .execution_options(synchronize_session=False)
        )
    assignment.state = AssignmentState.skipped
    assignment.skip_reason = reason.strip() or None
    assignment.finished_at = now
    db.flush()
    return assignment


# --- judgments ----------------------------------------------------------------------------


def _write_judgment(
    db: Session,
    *,
    user: User,
    task: Task,
    campaign: Campaign,
    answer: JudgmentIn,
    ranking: list[list[int]] | None,
    shown: list[int],
    key: str,
    assignment_id: int | None,
    supersedes: Judgment | None,
    now: dt.datetime,
    recheck_of: Judgment | None = None,
) -> Judgment:
    """Store a judgment and (unless it is a re-check) its pairwise comparisons."""
    demonstration_id = None
    if campaign.mode is CampaignMode.demonstration:
        demo_text = (answer.demonstration or "").strip()
        completion = Completion(
            prompt_id=task.prompt_id,
            text=demo_text,
            source=CompletionSource.human,
            author_id=user.id,
            content_hash=hashlib.sha256(demo_text.encode()).hexdigest(),
        )
        db.add(completion)
        db.flush()
        demonstration_id = completion.id
    strength_in_task_order = None
    if campaign.mode is CampaignMode.pairwise and answer.strength is not None:
        canonical = [tc.completion_id for tc in task.items]
        flipped = shown != canonical
        strength_in_task_order = -answer.strength if flipped else answer.strength
    judgment = Judgment(
        task_id=task.id,
        campaign_id=campaign.id,
        assignment_id=assignment_id,
        user_id=user.id,
        ranking=ranking,
        pairwise_strength=strength_in_task_order,
        ratings={str(k): v for k, v in answer.ratings.items()},
        flags={str(k): sorted(set(v)) for k, v in answer.flags.items() if v},
        comment=answer.comment.strip(),
        confidence=answer.confidence,
        demonstration_id=demonstration_id,
        time_on_task_ms=answer.time_on_task_ms,
        display_order=shown,
        guidelines_version=campaign.guidelines_version,
        idempotency_key=key,
        payload_hash=answer_hash(answer),
        supersedes_id=supersedes.id if supersedes else None,
        # A re-check is kept beside the judgment it repeats; that one stays current.
        is_current=recheck_of is None,
        recheck_of_id=recheck_of.id if recheck_of else None,
        created_at=now,
    )
    db.add(judgment)
    db.flush()
    if ranking is not None and recheck_of is None:
        margin = float(abs(answer.strength)) if answer.strength is not None else None
        # One multi-row INSERT (executemany), not one ORM round trip per pair.
        db.execute(
            insert(Comparison),
            [
                {
                    "campaign_id": campaign.id,
                    "prompt_id": task.prompt_id,
                    "judgment_id": judgment.id,
                    "user_id": user.id,
                    "chosen_id": chosen,
                    "rejected_id": rejected,
                    "is_tie": is_tie,
                    "margin": pair_margin,
                    "source": ComparisonSource.human,
                    "is_active": True,
                    "created_at": now,
                }
                for chosen, rejected, is_tie, pair_margin in pairs_from_ranking(
                    ranking, margin=margin
                )
            ],
        )
    return judgment


def _replay(db: Session, *, user: User, key: str, answer: JudgmentIn) -> Judgment | None:
    """The judgment already stored under this key, if the answer is the same; else 409."""
    existing = db.scalar(select(Judgment).where(Judgment.idempotency_key == key))
    if existing is None:
        return None
    if existing.user_id != user.id:
        raise Forbidden("this key belongs to someone else's judgment")
    if existing.payload_hash != answer_hash(answer):
        raise Conflict(
            "this task was already submitted with a different answer; "
            "open it from your history to edit it"
        )
    return existing


# SET expressions read the row's old values, so "+ 1 >=" is this judgment completing the task.
_COUNT_JUDGMENT = (
    update(Task)
    .where(Task.id == bindparam("counted_task"))
    .values(
        judgment_count=Task.judgment_count + 1,
        status=case(
            (
                and_(Task.judgment_count + 1 >= Task.required_judgments, Task.is_gold.is_(false())),
                TaskStatus.complete.value,
            ),
            else_=Task.status,
        ),
    )
    .execution_options(synchronize_session=False)
)


# The labeler's current (non-re-check) judgment of a task: what a re-check repeats.
_CURRENT_JUDGMENT = (
    select(Judgment)
    .where(
        Judgment.task_id == bindparam("task_id"),
        Judgment.user_id == bindparam("user_id"),
        Judgment.is_current.is_(true()),
        Judgment.recheck_of_id.is_(None),
    )
    .order_by(Judgment.id.desc())
    .limit(1)
)


def submit(
    db: Session,
    *,
    user: User,
    submit_key: str,
    answer: JudgmentIn,
    now: dt.datetime | None = None,
    ip: str | None = None,
) -> tuple[Judgment, bool]:
    """Store the answer to a leased task with its comparisons; (judgment, created).

    The answer to a re-check is stored beside the judgment it repeats, without comparisons
    and without counting towards the task.
    """
    now = now or utcnow()
    assignment, task, campaign = _assignment_for(db, user=user, submit_key=submit_key)
    if assignment.state is AssignmentState.submitted:
        # Only a submitted lease can have a judgment under its key: a retry, or a conflict.
        if (replayed := _replay(db, user=user, key=submit_key, answer=answer)) is not None:
            return replayed, False
        raise Conflict("this task was already submitted")
    if assignment.state is AssignmentState.skipped:
        raise Conflict("you skipped this task; it can no longer be submitted")
    if task.status is TaskStatus.retired:
        raise Conflict("this task was withdrawn by an admin; load the next one")
    # The display order is exactly the task's completions, shuffled when the lease was made.
    shown = assignment.display_order
    ranking = check_answer(campaign, shown, shown, answer)
    original = None
    if assignment.is_recheck:
        # A re-check holds no slot, so a late one needs none; it repeats the current judgment.
        original = db.scalar(_CURRENT_JUDGMENT, {"task_id": task.id, "user_id": user.id})
        if original is None:
            raise Conflict("this task has no earlier answer of yours any more; skip it")
    elif assignment.state is not AssignmentState.active:  # expired or released
        _retake_slot(db, assignment, task, now)
    # Clamp the client's clock to the server's: no longer than the lease has existed.
    elapsed_ms = int((now - assignment.leased_at).total_seconds() * 1000)
    answer = answer.model_copy(
        update={"time_on_task_ms": min(answer.time_on_task_ms, max(elapsed_ms, 0))}
    )
    judgment = _write_judgment(
        db,
        user=user,
        task=task,
        campaign=campaign,
        answer=answer,
        ranking=ranking,
        shown=assignment.display_order,
        key=submit_key,
        assignment_id=assignment.id,
        supersedes=None,
        now=now,
        recheck_of=original,
    )
    assignment.state = AssignmentState.submitted
    assignment.finished_at = now
    after = {"task_id": task.id, "ranking": ranking, "strength": answer.strength}
    if original is None:
        db.execute(_COUNT_JUDGMENT, {"counted_task": task.id})
        db.expire(task, ["judgment_count", "status"])
    else:  # a re-check counts towards nothing
        after["recheck_of_id"] = original.id
    audit.record(
        db,
        actor_id=user.id,
        action="judgment.create" if original is None else "judgment.recheck",
        entity_type="judgment",
        entity_id=judgment.id,
        after=after,
        ip=ip,
    )
    return judgment, True


def edit(
    db: Session,
    *,
    user: User,
    judgment_id: int,
    answer: EditIn,
    now: dt.datetime | None = None,
    ip: str | None = None,
) -> tuple[Judgment, bool]:
    """Replace one of the labeler's judgments with a new version; the old one is kept."""
    now = now or utcnow()
    old = db.scalar(
        select(Judgment)
        .where(Judgment.id == judgment_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    if old is None:
        raise NotFound("no such judgment")
    if old.user_id != user.id:
        raise Forbidden("you can only edit your own judgments")
    if old.recheck_of_id is not None:
        raise Conflict(
            "this was a second answer to a task you had already judged and cannot be edited; "
            "edit your judgment of the task from your history instead"
        )
    plain = JudgmentIn.model_validate(answer.model_dump(exclude={"idempotency_key"}))
    if (replayed := _replay(db, user=user, key=answer.idempotency_key, answer=plain)) is not None:
        return replayed, False
    if not old.is_current:
        raise Conflict("this judgment has a newer version; edit that one")
    task = db.get_one(Task, old.task_id)
    campaign = db.get_one(Campaign, task.campaign_id)
    if task.status is TaskStatus.retired:
        raise Conflict("this task was withdrawn by an admin and can no longer be edited")
    completion_ids = [tc.completion_id for tc in task.items]
    ranking = check_answer(campaign, completion_ids, old.display_order, plain)
    old.is_current = False
    db.execute(
        update(Comparison)
        .where(Comparison.judgment_id == old.id)
        .values(is_active=False)
        .execution_options(synchronize_session=False)
    )
    db.flush()
    new = _write_judgment(
        db,
        user=user,
        task=task,
        campaign=campaign,
        answer=plain,
        ranking=ranking,
        shown=old.display_order,
        key=answer.idempotency_key,
        assignment_id=old.assignment_id,
        supersedes=old,
        now=now,
    )
    audit.record(
        db,
        actor_id=user.id,
        action="judgment.edit",
        entity_type="judgment",
        entity_id=new.id,
        before={"judgment_id": old.id, "ranking": old.ranking, "strength": old.pairwise_strength},
        after={"judgment_id": new.id, "ranking": new.ranking, "strength": new.pairwise_strength},
        ip=ip,
    )
    return new, True


# --- reading back -------------------------------------------------------------------------


def get_judgment(db: Session, *, user: User, judgment_id: int) -> Judgment:
    judgment = db.get(Judgment, judgment_id)
    if judgment is None:
        raise NotFound("no such judgment")
    if judgment.user_id != user.id:
        raise Forbidden("you can only see your own judgments")
    return judgment


def history(
    db: Session, *, user_id: int, limit: int = 50, before_id: int | None = None
) -> list[Judgment]:
    """The labeler's current judgments, newest first."""
    query = (
        select(Judgment)
        .where(Judgment.user_id == user_id, Judgment.is_current.is_(True))
        .order_by(Judgment.id.desc())
        .limit(limit)
    )
    if before_id is not None:
        query = query.where(Judgment.id < before_id)
    return list(db.scalars(query))


def versions(db: Session, judgment: Judgment) -> list[Judgment]:
    """Every version of a judgment, oldest first, following the supersedes chain back."""
    chain = [judgment]
    while chain[0].supersedes_id is not None:
        chain.insert(0, db.get_one(Judgment, chain[0].supersedes_id))
    return chain


def shown_strength(judgment: Judgment, task: Task) -> int | None:
    """The stored strength (task order) in the order this labeler saw the pair."""
    if judgment.pairwise_strength is None:
        return None
    canonical = [tc.completion_id for tc in task.items]
    return (
        -judgment.pairwise_strength
        if judgment.display_order != canonical
        else judgment.pairwise_strength
    )


def active_campaigns(db: Session) -> list[Campaign]:
    """The campaigns labelers can work on now, oldest first."""
    return list(
        db.scalars(
            select(Campaign).where(Campaign.status == CampaignStatus.active).order_by(Campaign.id)
        )
    )


@dataclass(frozen=True)
class Progress:
    today: int
    total: int
    available: int  # tasks this labeler could still be served, the one leased to them included


def progress(db: Session, *, user_id: int, campaign_ids: list[int], now: dt.datetime | None = None):
    """Per campaign: the labeler's judgments today and overall, and what is left for them."""
    now = now or utcnow()
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    counts = {
        cid: (today or 0, total)
        for cid, today, total in db.execute(
            select(
                Judgment.campaign_id,
                func.count().filter(Judgment.created_at >= midnight),
                func.count(),
            )
            .where(
                Judgment.user_id == user_id,
                Judgment.supersedes_id.is_(None),
                Judgment.campaign_id.in_(campaign_ids),
            )
            .group_by(Judgment.campaign_id)
        )
    }
    seen = exists().where(Assignment.task_id == Task.id, Assignment.user_id == user_id)
    # The task leased to them now is still waiting for them: without it the queue and the
    # task page (which holds the lease) would disagree by one.
    leased_now = exists().where(
        Assignment.task_id == Task.id,
        Assignment.user_id == user_id,
        Assignment.state == AssignmentState.active,
        Assignment.lease_expires_at > now,
        Assignment.is_recheck.is_(False),
    )
    available = dict(
        db.execute(
            select(Task.campaign_id, func.count())
            .where(
                Task.campaign_id.in_(campaign_ids),
                Task.status == TaskStatus.open,
                Task.is_gold.is_(False),
                or_(and_(Task.assigned_count < Task.required_judgments, ~seen), leased_now),
            )
            .group_by(Task.campaign_id)
        )
        .tuples()
        .all()
    )
    return {
        cid: Progress(
            today=int(counts.get(cid, (0, 0))[0]),
            total=counts.get(cid, (0, 0))[1],
            available=available.get(cid, 0),
        )
        for cid in campaign_ids
    }
