"""Campaign input, validated once for the admin form, the CLI and the service.

Values arrive as strings from a form or a command line; pydantic's lax mode turns "4" into
4. Every rule gives a message a person can act on, keyed by field, so a form can show it
next to its input and the CLI can print it on one line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from app.campaigns.models import DEFAULT_FLAGS, Campaign, CampaignMode, CampaignStatus

SLUG_PATTERN = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
SLUG_MIN, SLUG_MAX = 2, 64
# Path segments of the admin pages that a slug would shadow.
# Path segments that sit beside /admin/campaigns/{slug} and /label/{slug}.
RESERVED_SLUGS = frozenset({"new", "preview", "history", "judgments"})
K_MIN, K_MAX = 2, 9
OVERLAP_MAX = 50
LEASE_MAX_MINUTES = 24 * 60
RECHECK_RATE_MAX = 0.5  # at most every other served task repeats one of the labeler's own
NAME_MAX = 200
DESCRIPTION_MAX = 5_000
GUIDELINES_MAX = 100_000
FLAG_MAX_LENGTH = 40
FLAGS_MAX = 20

# pydantic's own messages for type errors, in the words the form and the CLI use.
_TYPE_MESSAGES = {
    "int_parsing": "Enter a whole number.",
    "int_from_float": "Enter a whole number.",
    "int_type": "Enter a whole number.",
    "float_parsing": "Enter a number.",
    "float_type": "Enter a number.",
    "finite_number": "Enter a number.",
    "bool_parsing": "Enter yes or no.",
    "bool_type": "Enter yes or no.",
    "string_type": "Enter text.",
    "list_type": "Enter a list of flags.",
    "missing": "This field is required.",
}


class InvalidCampaign(ValueError):
    """Campaign input that cannot be used: `errors` maps each field to one message."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        self.errors = dict(errors)
        super().__init__("; ".join(f"{field}: {message}" for field, message in self.errors.items()))


def _in_range(value: float, low: float, high: float, message: str) -> None:
    if not low <= value <= high:
        raise ValueError(message)


def split_flags(value: Any) -> Any:
    """A flag list from text (one per line or comma-separated) or from a list."""
    if isinstance(value, str):
        value = re.split(r"[,\n]", value)
    if isinstance(value, list | tuple):
        return [item.strip() if isinstance(item, str) else item for item in value if item != ""]
    return value


class CampaignSettings(BaseModel):
    """Everything about a campaign an admin may change after creating it."""

    model_config = ConfigDict(str_strip_whitespace=True, extra="forbid")

    name: str
    description: str = ""
    guidelines_md: str = ""
    k: int = 4
    mode: CampaignMode = CampaignMode.rank
    overlap: int = 3
    gold_rate: float = 0.0
    recheck_rate: float = 0.0
    lease_minutes: int = 30
    allow_ties: bool = True
    flags: list[str] = list(DEFAULT_FLAGS)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value:
            raise ValueError("Give the campaign a name.")
        if len(value) > NAME_MAX:
            raise ValueError(f"Keep the name to {NAME_MAX} characters.")
        return value

    @field_validator("description")
    @classmethod
    def _description(cls, value: str) -> str:
        if len(value) > DESCRIPTION_MAX:
            raise ValueError(f"Keep the description to {DESCRIPTION_MAX:,} characters.")
        return value

    @field_validator("guidelines_md", mode="before")
    @classmethod
    def _guidelines(cls, value: Any) -> Any:
        if isinstance(value, str):
            # Browsers send CRLF; store one newline style so an unchanged text stays unchanged.
            value = value.replace("\r\n", "\n")
            if len(value) > GUIDELINES_MAX:
                raise ValueError(f"Keep the guidelines to {GUIDELINES_MAX:,} characters.")
        return value

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip() not in CampaignMode.__members__:
            raise ValueError("Choose rank, pairwise or demonstration.")
        return value.strip() if isinstance(value, str) else value

    @field_validator("k")
    @classmethod
    def _k(cls, value: int) -> int:
        _in_range(value, K_MIN, K_MAX, f"K must be between {K_MIN} and {K_MAX}.")
        return value

    @field_validator("overlap")
    @classmethod
    def _overlap(cls, value: int) -> int:
        _in_range(value, 1, OVERLAP_MAX, f"Overlap must be between 1 and {OVERLAP_MAX}.")
        return value

    @field_validator("gold_rate")
    @classmethod
    def _gold_rate(cls, value: float) -> float:
        _in_range(value, 0.0, 1.0, "The gold rate must be between 0 and 1 (0 % to 100 %).")
        return value

    @field_validator("recheck_rate")
    @classmethod
    def _recheck_rate(cls, value: float, info: ValidationInfo) -> float:
        _in_range(
            value,
            0.0,
            RECHECK_RATE_MAX,
            f"The re-check rate must be between 0 and {RECHECK_RATE_MAX:g} "
            f"(0 % to {RECHECK_RATE_MAX * 100:g} %).",
        )
        # A re-check compares two rankings; a written demonstration has none. (The mode is
        # declared before the rate, so it is validated first.)
        if value > 0 and info.data.get("mode") == CampaignMode.demonstration:
            raise ValueError("Re-checks work in rank and pairwise campaigns only; use 0.")
        return value

    @field_validator("lease_minutes")
    @classmethod
    def _lease(cls, value: int) -> int:
        _in_range(
            value, 1, LEASE_MAX_MINUTES, f"The lease must be 1 to {LEASE_MAX_MINUTES} minutes."
        )
        return value

    @field_validator("flags", mode="before")
    @classmethod
    def _split_flags(cls, value: Any) -> Any:
        return split_flags(value)

    @field_validator("flags")
    @classmethod
    def _flags(cls, value: list[str]) -> list[str]:
        if len(value) > FLAGS_MAX:
            raise ValueError(f"Use at most {FLAGS_MAX} flags.")
        seen: set[str] = set()
        for flag in value:
            if not flag.isprintable():
                raise ValueError(f"The flag {flag!r} contains control characters.")
            if len(flag) > FLAG_MAX_LENGTH:
                raise ValueError(f"Keep each flag to {FLAG_MAX_LENGTH} characters: '{flag}'.")
            if flag.casefold() in seen:
                raise ValueError(f"The flag '{flag}' is listed twice.")
            seen.add(flag.casefold())
        return value

    @model_validator(mode="after")
    def _pairwise_is_two(self) -> Self:
        # Pairwise means exactly two completions per task, whatever K was given.
        if self.mode == CampaignMode.pairwise:
            self.k = 2
        return self


class CampaignCreate(CampaignSettings):
    """A new campaign: its settings plus the slug (fixed for life) and the starting status."""

    slug: str
    status: CampaignStatus = CampaignStatus.active

    @field_validator("slug")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not SLUG_MIN <= len(value) <= SLUG_MAX or not SLUG_PATTERN.fullmatch(value):
            raise ValueError(
                f"Use {SLUG_MIN} to {SLUG_MAX} lower-case letters, digits and hyphens, "
                "starting and ending with a letter or digit."
            )
        if value in RESERVED_SLUGS:
            raise ValueError(f"'{value}' is reserved; choose another slug.")
        return value

    @field_validator("status", mode="before")
    @classmethod
    def _status(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip() not in CampaignStatus.__members__:
            raise ValueError("Choose draft, active, paused or archived.")
        return value.strip() if isinstance(value, str) else value

    def settings(self) -> CampaignSettings:
        return CampaignSettings.model_validate(self.model_dump(exclude={"slug", "status"}))


SETTINGS_FIELDS = tuple(CampaignSettings.model_fields)


def settings_of(campaign: Campaign) -> dict[str, Any]:
    """A campaign's current settings, as input for `CampaignSettings` (to change a few)."""
    return {name: getattr(campaign, name) for name in SETTINGS_FIELDS}


def _field_errors(exc: ValidationError) -> dict[str, str]:
    errors: dict[str, str] = {}
    for error in exc.errors():
        location = [str(part) for part in error.get("loc", ()) if not isinstance(part, int)]
        field = location[0] if location else "__all__"
        if error["type"] == "extra_forbidden":
            message = "Not a campaign setting."
        else:
            message = _TYPE_MESSAGES.get(error["type"]) or str(error["msg"]).removeprefix(
                "Value error, "
            )
        errors.setdefault(field, message)
    return errors


def parse_create(values: Mapping[str, Any]) -> CampaignCreate:
    """Validate a new campaign; raises InvalidCampaign with a message per bad field."""
    try:
        return CampaignCreate.model_validate(dict(values))
    except ValidationError as exc:
        raise InvalidCampaign(_field_errors(exc)) from None


def parse_settings(values: Mapping[str, Any]) -> CampaignSettings:
    """Validate a campaign's settings; raises InvalidCampaign with a message per bad field."""
    try:
        return CampaignSettings.model_validate(dict(values))
    except ValidationError as exc:
        raise InvalidCampaign(_field_errors(exc)) from None


def parse_status(value: str) -> CampaignStatus:
    try:
        return CampaignStatus(value.strip())
    except ValueError:
        raise InvalidCampaign({"status": "Choose draft, active, paused or archived."}) from None
