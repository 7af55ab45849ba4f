"""What a researcher asks an export for: the format, the file type and the filters.

One model, `ExportParams`, behind the CLI (`prefloop export`), the API and the researcher
page; it is stored on the snapshot (`export_snapshots.parameters`) together with the
high-water mark the data was read at (`as_of`), so a snapshot can be rebuilt byte for byte.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.validation import humane_errors

Format = Literal["trl", "rankings", "soft", "sft"]
FileFormat = Literal["jsonl", "jsonl.gz", "parquet"]
Source = Literal["human", "import", "ai"]
SOURCES: tuple[Source, ...] = ("human", "import", "ai")


class ExportError(Exception):
    """An export that cannot be made as asked; `status_code` is the HTTP status to answer."""

    status_code: int = 400

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code

    def __str__(self) -> str:
        return self.message


class AsOf(BaseModel):
    """The newest row ids the export read: rows added later are left out, and judgments
    superseded later count as they stood, so a re-export gives the same bytes."""

    model_config = ConfigDict(extra="forbid")

    comparison_id: int = Field(ge=0)
    judgment_id: int = Field(ge=0)
    completion_id: int = Field(ge=0)


class ExportParams(BaseModel):
    """An export's parameters. Filters narrow the data; every default keeps everything a
    trainer should see (current judgments of active, non-excluded labelers, no ties)."""

    model_config = ConfigDict(extra="forbid")

    campaigns: list[str] = Field(
        min_length=1, description="Campaign slugs (at least one); unknown slugs are refused."
    )
    format: Format = Field(
        description="trl: prompt/chosen/rejected; rankings: one row per task with every "
        "labeler's raw judgment; soft: one row per completion pair with vote counts and "
        "P(chosen > rejected); sft: demonstrations as prompt/completion or messages."
    )
    file_format: FileFormat = Field("jsonl", description="jsonl, jsonl.gz or parquet.")
    pairs: Literal["labeled", "consensus"] = Field(
        "labeled",
        description="trl only: one row per (judgment, pair) as labeled, or one per consensus "
        "pair of each task (an admin's resolved ranking, the gold answer, else Bradley-Terry).",
    )
    since: dt.date | None = Field(None, description="First UTC day of labels to include.")
    until: dt.date | None = Field(None, description="Last UTC day of labels to include.")
    min_agreement: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Keep tasks whose labelers' mean pairwise agreement is at least this; "
        "tasks judged by fewer than two labelers have no agreement and are dropped.",
    )
    min_gold_accuracy: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Keep labelers whose gold accuracy in the campaign is at least this; "
        "labelers with no judged gold task are dropped.",
    )
    include_excluded: bool = Field(False, description="Keep labelers an admin excluded.")
    include_inactive: bool = Field(False, description="Keep labelers whose account is disabled.")
    flagged: Literal["keep", "drop"] = Field(
        "keep", description="drop: leave out every pair or row with a completion a labeler flagged."
    )
    sources: list[Source] = Field(
        default_factory=lambda: list(SOURCES),
        min_length=1,
        description="Where labels come from: human labelers, imports, AI labelers.",
    )
    ties: Literal["drop", "margin0"] = Field(
        "drop", description="drop ties, or keep them as pairs with margin 0."
    )
    dedupe: bool = Field(
        True,
        description="Write identical rows once: the same prompt/chosen/rejected texts from "
        "the same annotator (labeled pairs) or at all (consensus pairs, demonstrations).",
    )
    test_fraction: float = Field(
        0.0, ge=0, le=0.5, description="Share of prompts in the test split (0 to 0.5)."
    )
    seed: int = Field(0, description="Seed of the train/test split.")
    pseudonyms: Literal["snapshot", "stable"] = Field(
        "snapshot",
        description="Annotator ids: new for each export, or stable across exports "
        "(an HMAC of the user id under the server's secret key).",
    )
    soft_prior: float = Field(
        1.0,
        ge=0,
        le=1000,
        description="soft only: P = (wins + prior) / (votes + 2 * prior).",
    )
    sft_style: Literal["completion", "messages"] = Field(
        "completion", description='sft only: {"prompt", "completion"} or {"messages"}.'
    )
    as_of: AsOf | None = Field(
        None, description="Read as of these row ids (set by the export; give it to reproduce one)."
    )

    @field_validator("campaigns")
    @classmethod
    def _campaigns(cls, value: list[str]) -> list[str]:
        cleaned: list[str] = []
        for slug in value:
            slug = slug.strip()
            if not slug:
                raise ValueError("a campaign slug is empty")
            if slug not in cleaned:
                cleaned.append(slug)
        return cleaned

    @field_validator("sources")
    @classmethod
    def _sources(cls, value: list[Source]) -> list[Source]:
        return [s for s in SOURCES if s in value]  # canonical order, each once

    @model_validator(mode="after")
    def _check(self) -> ExportParams:
        if self.since and self.until and self.since > self.until:
            raise ValueError("since must be on or before until")
        if self.format != "trl" and self.pairs != "labeled":
            raise ValueError("pairs=consensus applies to the trl format only")
        return self

    def canonical(self) -> dict[str, Any]:
        """The parameters as JSON, in a fixed form (what the snapshot records)."""
        return self.model_dump(mode="json")

    @property
    def extension(self) -> str:
        return self.file_format


def parse_params(data: dict[str, Any]) -> ExportParams:
    """Validate parameters, raising ExportError (422) with a readable message."""
    try:
        return ExportParams.model_validate(data)
    except ValidationError as exc:
        raise ExportError(humane_errors(exc), 422) from None
