"""`prefloop import FILE --campaign SLUG`."""

from __future__ import annotations

import gzip
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, BinaryIO

import typer

from app.campaigns import service as campaigns
from app.cli_support import fail, load_settings, open_database
from app.labeling.importer import (
    ImportFormat,
    ImportRejected,
    ImportResult,
    import_stream,
)


@contextmanager
def _open(file: str) -> Iterator[tuple[BinaryIO, str]]:
    """The file as a byte stream, gunzipped on the fly for `.gz`; `-` is standard input."""
    if file == "-":
        yield sys.stdin.buffer, "stdin"
        return
    path = Path(file)
    if not path.is_file():
        fail(f"no such file: {file}")
    try:
        raw = path.open("rb")
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror or exc}")
    with raw, gzip.GzipFile(fileobj=raw) if path.suffix == ".gz" else raw as stream:
        yield stream, path.name


def _print_result(result: ImportResult) -> None:
    formats = ", ".join(f"{name} {count}" for name, count in sorted(result.formats.items()))
    typer.echo(
        f"imported {result.file_name} into campaign '{result.campaign}'"
        + (" as judged comparisons" if result.as_judged else "")
        + (f" (formats: {formats})" if formats else "")
    )
    for name, value in result.counts().items():
        if name == "invalid" and not value:
            continue
        label = {"duplicates": "duplicates skipped", "invalid": "bad lines skipped"}.get(name, name)
        typer.echo(f"  {label:<20} {value:>9}")
    for error in result.errors:
        typer.echo(f"warning: skipped {error}", err=True)
    if result.more_errors:
        typer.echo(f"warning: skipped {result.more_errors} more bad lines", err=True)


def _print_rejection(exc: ImportRejected, *, skip_invalid: bool) -> None:
    for error in exc.errors:
        typer.echo(f"error: {error}", err=True)
    if exc.more:
        typer.echo(f"error: ... and {exc.more} more bad lines", err=True)
    if any(error.line is not None for error in exc.errors):
        hint = "" if skip_invalid else " (fix them, or pass --skip-invalid to import the rest)"
        typer.echo(
            f"error: nothing was imported: {exc.total} of {exc.lines} lines are bad{hint}",
            err=True,
        )


def import_file(
    file: Annotated[
        str,
        typer.Argument(
            help="A JSON Lines or CSV file (UTF-8; .gz is unpacked); - reads standard input."
        ),
    ],
    campaign: Annotated[str, typer.Option(help="Slug of the campaign to import into.")],
    format: Annotated[
        ImportFormat,
        typer.Option(
            help="Row format: auto detects it per line; prompt, hh or trl forces one.",
            case_sensitive=False,
        ),
    ] = ImportFormat.auto,
    as_judged: Annotated[
        bool,
        typer.Option(
            "--as-judged",
            help="Import chosen/rejected pairs as already-judged comparisons, not as tasks.",
        ),
    ] = False,
    skip_invalid: Annotated[
        bool,
        typer.Option(
            "--skip-invalid",
            help="Import the good lines and list the bad ones (default: a bad line stops all).",
        ),
    ] = False,
) -> None:
    """Import prompts, completions or comparisons from a JSON Lines or CSV file.

    Rows are {"prompt" | "messages", "completions"}, HH-RLHF {"chosen", "rejected"} or TRL
    {"prompt", "chosen", "rejected"}; CSV files have a header naming the same columns. One
    transaction: a file with a bad line imports nothing. Re-importing skips what is there.
    """
    settings = load_settings()
    database = open_database(settings)
    try:
        with _open(file) as (stream, name), database.session() as session:
            target = campaigns.get_by_slug(session, campaign)
            if target is None:
                fail(f"no campaign '{campaign}' (see `prefloop campaign list`)")
            try:
                result = import_stream(
                    session,
                    target,
                    stream,
                    file_name=name,
                    fmt=format,
                    as_judged=as_judged,
                    skip_invalid=skip_invalid,
                    on_progress=lambda lines: typer.echo(f"  read {lines:,} lines...", err=True),
                )
            except ImportRejected as exc:
                _print_rejection(exc, skip_invalid=skip_invalid)
                raise typer.Exit(1) from None
            except (OSError, EOFError, zlib.error) as exc:  # a truncated or corrupt .gz file
                fail(f"cannot read {file}: {exc}")
            session.commit()
    finally:
        database.dispose()
    _print_result(result)
