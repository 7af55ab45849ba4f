"""What a labeler sends and gets back, shared by the HTML views and the JSON API."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MAX_COMMENT_CHARS = 5_000
MAX_DEMONSTRATION_CHARS = 100_000
MAX_SKIP_REASON_CHARS = 500
SKIP_REASONS = (
    "I can't judge this (outside my expertise)",
    "The prompt is unclear or broken",
    "The completions are unreadable",
    "Other",
)
# Pairwise strength scale: negative prefers A (shown first), positive prefers B.
STRENGTH_LABELS = {
    -3: "A is much better",
    -2: "A is better",
    -1: "A is slightly better",
    0: "About the same",
    1: "B is slightly better",
    2: "B is better",
    3: "B is much better",
}


class JudgmentIn(BaseModel):
    """One answer to a task. Which fields are needed depends on the campaign's mode.

    Completion ids are the ids the task was served with. `strength` is relative to the
    order the two completions were shown in (A = first shown).
    """

    model_config = ConfigDict(extra="forbid")

    ranking: list[list[int]] | None = Field(
        default=None,
        description="Rank mode: tiers of completion ids, best first; a tier of several ids is a tie.",
        examples=[[[12], [10, 13], [11]]],
    )
    strength: int | None = Field(
        default=None,
        ge=-3,
        le=3,
        description="Pairwise mode: -3 (A much better) .. 0 (about the same) .. 3 (B much better).",
    )
    demonstration: str | None = Field(
        default=None,
        max_length=MAX_DEMONSTRATION_CHARS,
        description="Demonstration mode: the response the labeler wrote.",
    )
    ratings: dict[int, int] = Field(
        default_factory=dict, description="Optional 1-7 quality rating per completion id."
    )
    flags: dict[int, list[str]] = Field(
        default_factory=dict, description="Flags from the campaign's set, per completion id."
    )
    comment: str = Field(default="", max_length=MAX_COMMENT_CHARS)
    confidence: int | None = Field(default=None, ge=1, le=5, description="1 (guess) .. 5 (sure).")
    time_on_task_ms: int = Field(default=0, ge=0, description="Measured by the client.")

    def fingerprint(self) -> dict[str, Any]:
        """The parts that make two submits the same answer (time on task may differ)."""
        return self.model_dump(exclude={"time_on_task_ms"})


class SkipIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(default="", max_length=MAX_SKIP_REASON_CHARS)


class EditIn(JudgmentIn):
    """An edit of a past judgment; the key makes a retried edit count once."""

    idempotency_key: str = Field(min_length=16, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")


class CompletionOut(BaseModel):
    id: int
    label: str = Field(description="A, B, C, ... in display order.")
    text: str


class PromptOut(BaseModel):
    text: str | None
    messages: list[dict[str, Any]] | None


class TaskOut(BaseModel):
    """A leased task: everything needed to render it and to submit the answer."""

    submit_key: str = Field(description="Send it back with the answer: /assignments/{key}/...")
    task_id: int
    campaign: str
    mode: str
    allow_ties: bool
    flags: list[str]
    guidelines_version: int
    lease_expires_at: dt.datetime
    prompt: PromptOut
    completions: list[CompletionOut] = Field(description="In the order shown to this labeler.")


class JudgmentOut(BaseModel):
    id: int
    task_id: int
    campaign: str
    ranking: list[list[int]] | None
    strength: int | None = Field(description="In the order the completions were shown.")
    demonstration: str | None
    ratings: dict[int, int]
    flags: dict[int, list[str]]
    comment: str
    confidence: int | None
    time_on_task_ms: int
    display_order: list[int]
    guidelines_version: int
    supersedes_id: int | None
    is_current: bool
    created_at: dt.datetime
    comparisons: int = Field(description="Pairwise comparisons derived from this judgment.")


class SubmitOut(BaseModel):
    judgment: JudgmentOut
    created: bool = Field(description="False when this key was already submitted (a retry).")
