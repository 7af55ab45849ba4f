"""`prefloop export --campaign SLUG --format trl|rankings|soft|sft --output PATH`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from app.cli_support import fail, load_settings, open_database
from app.exports.schemas import ExportError, parse_params


def _file_format(output: Path) -> str:
    name = output.name.lower()
    if name.endswith(".jsonl.gz"):
        return "jsonl.gz"
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    fail(f"--output must end in .jsonl, .jsonl.gz or .parquet, not '{output.name}'", 2)


def _as_of(manifest: Path | None) -> dict[str, Any] | None:
    if manifest is None:
        return None
    try:
        return json.loads(manifest.read_text(encoding="utf-8"))["parameters"]["as_of"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        fail(f"--as-of: cannot read the as_of mark from {manifest}: {exc}", 2)


class _Progress:
    """A row counter on stderr: rewritten in place on a terminal, a line now and then
    otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = 0

    def __call__(self, rows: int) -> None:
        if self.tty:
            typer.echo(f"\r  exported {rows:,} rows", nl=False, err=True)
        elif rows - self.last >= 100_000:
            typer.echo(f"  exported {rows:,} rows", err=True)
            self.last = rows

    def done(self) -> None:
        if self.tty:
            typer.echo("", err=True)


def export_command(
    campaign: Annotated[
        list[str], typer.Option("--campaign", help="Campaign slug; repeat for several.")
    ],
    format: Annotated[
        str, typer.Option("--format", help="trl, rankings, soft or sft.", metavar="FORMAT")
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output", help="PATH.jsonl, PATH.jsonl.gz or PATH.parquet (its suffix decides)."
        ),
    ],
    pairs: Annotated[
        str, typer.Option(help="trl: labeled (one row per judgment and pair) or consensus.")
    ] = "labeled",
    since: Annotated[str | None, typer.Option(help="First UTC day, YYYY-MM-DD.")] = None,
    until: Annotated[str | None, typer.Option(help="Last UTC day (included), YYYY-MM-DD.")] = None,
    min_agreement: Annotated[
        float | None,
        typer.Option(help="Keep tasks whose labelers agree at least this much (0-1)."),
    ] = None,
    min_gold_accuracy: Annotated[
        float | None, typer.Option(help="Keep labelers with at least this gold accuracy (0-1).")
    ] = None,
    include_excluded: Annotated[
        bool, typer.Option("--include-excluded", help="Keep labelers an admin excluded.")
    ] = False,
    include_inactive: Annotated[
        bool, typer.Option("--include-inactive", help="Keep labelers whose account is disabled.")
    ] = False,
    drop_flagged: Annotated[
        bool,
        typer.Option("--drop-flagged", help="Leave out pairs with a completion someone flagged."),
    ] = False,
    source: Annotated[
        list[str] | None,
        typer.Option("--source", help="human, import or ai; repeat for several (default: all)."),
    ] = None,
    ties: Annotated[str, typer.Option(help="drop, or margin0 to keep ties with margin 0.")] = (
        "drop"
    ),
    no_dedupe: Annotated[
        bool, typer.Option("--no-dedupe", help="Keep identical rows (default: written once).")
    ] = False,
    test_fraction: Annotated[
        float, typer.Option(help="Share of prompts in the test split (0-0.5).")
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the train/test split.")] = 0,
    pseudonyms: Annotated[
        str, typer.Option(help="snapshot (new for this export) or stable (across exports).")
    ] = "snapshot",
    soft_prior: Annotated[
        float, typer.Option(help="soft: P = (wins + prior) / (votes + 2 prior).")
    ] = 1.0,
    sft_style: Annotated[str, typer.Option(help="sft: completion or messages.")] = "completion",
    as_of: Annotated[
        Path | None,
        typer.Option(
            "--as-of", help="A snapshot's manifest.json: read the data as of its mark (reproduce)."
        ),
    ] = None,
) -> None:
    """Export preference data to one file, train and test rows told apart by a `split`
    column. Written to a temporary file and renamed at the end: an error leaves nothing."""
    from app.exports.service import export_to_file

    raw: dict[str, Any] = {
        "campaigns": campaign,
        "format": format,
        "file_format": _file_format(output),
        "pairs": pairs,
        "since": since,
        "until": until,
        "min_agreement": min_agreement,
        "min_gold_accuracy": min_gold_accuracy,
        "include_excluded": include_excluded,
        "include_inactive": include_inactive,
        "flagged": "drop" if drop_flagged else "keep",
        "ties": ties,
        "dedupe": not no_dedupe,
        "test_fraction": test_fraction,
        "seed": seed,
        "pseudonyms": pseudonyms,
        "soft_prior": soft_prior,
        "sft_style": sft_style,
        "as_of": _as_of(as_of),
    }
    if source:
        raw["sources"] = source
    try:
        params = parse_params(raw)
    except ExportError as exc:
        fail(str(exc), 2)
    if output.exists() and output.is_dir():
        fail(f"--output {output} is a folder", 2)
    if not output.parent.is_dir():
        fail(f"no such folder: {output.parent}", 2)
    settings = load_settings()
    database = open_database(settings)
    progress = _Progress()
    try:
        made = export_to_file(database, params, output, settings, progress=progress)
    except ExportError as exc:
        progress.done()
        fail(str(exc), 1)
    except OSError as exc:
        progress.done()
        fail(f"cannot write {output}: {exc.strerror or exc}", 1)
    finally:
        database.dispose()
    progress.done()
    counts = made["row_counts"]
    typer.echo(
        f"wrote {counts['total']:,} {params.format} rows (train {counts['train']:,}, "
        f"test {counts['test']:,}) to {output}"
    )
    typer.echo(f"  sha256 {made['sha256']}  {made['bytes']:,} bytes")
    typer.echo(f"  as of {json.dumps(made['parameters']['as_of'], sort_keys=True)}")
