"""Pydantic's validation errors in words for a person: what every form, spec and import
shows ("training.epochs: Input should be greater than or equal to 1", "campaigns: choose at
least one", "unknown option colour"). A message may name what was sent (an unknown key,
a validator's own words), so it is text to escape wherever it is shown, never markup."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError


def humane_message(error: Mapping[str, Any]) -> str:
    """One pydantic error in words for a person; types not handled here keep pydantic's text."""
    kind = error.get("type", "")
    ctx = error.get("ctx") or {}
    loc = error.get("loc") or ()
    if kind == "missing":
        return "required"
    if kind == "too_short" and isinstance(error.get("input"), list | tuple | set | frozenset):
        least = int(ctx.get("min_length", 1))
        return "choose at least one" if least == 1 else f"choose at least {least}"
    if kind == "extra_forbidden":
        return f"unknown option {'.'.join(str(part) for part in loc)}" if loc else "unknown option"
    return str(error.get("msg", "invalid")).removeprefix("Value error, ")


def humane_errors(exc: ValidationError) -> str:
    """Every error of `exc` as "field: message", joined with "; " (a form shows them all)."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()))
        message = humane_message(error)
        if error.get("type") == "extra_forbidden" or not where:
            parts.append(message)  # the message names the field already
        else:
            parts.append(f"{where}: {message}")
    return "; ".join(parts)
