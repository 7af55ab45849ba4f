"""`prefloop campaign ...`: create, list, show and update campaigns from scripts.

Values are taken as text and validated by the same schema as the admin form, so a bad
value is one `error: --option: message` line and exit status 2 (an unknown slug: 1).
A new campaign starts active unless --status says otherwise, so a script can import
data and have it labeled right away.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from sqlalchemy.orm import Session

from app.campaigns import service
from app.campaigns.models import Campaign
from app.campaigns.schemas import (
    InvalidCampaign,
    parse_create,
    parse_settings,
    parse_status,
    settings_of,
)
from app.cli_support import fail, load_settings, open_database

campaign_cli = typer.Typer(help="Campaigns: create, list, show, update.", no_args_is_help=True)

# Schema field -> the option that sets it, for error messages.
OPTION_NAMES = {
    "slug": "SLUG",
    "name": "--name",
    "description": "--description",
    "guidelines_md": "--guidelines-file",
    "k": "--k",
    "mode": "--mode",
    "overlap": "--overlap",
    "gold_rate": "--gold-rate",
    "recheck_rate": "--recheck-rate",
    "lease_minutes": "--lease-minutes",
    "allow_ties": "--ties/--no-ties",
    "flags": "--flags",
    "status": "--status",
}

SlugArg = Annotated[str, typer.Argument(help="The campaign's slug.")]
NameOpt = Annotated[str | None, typer.Option(help="Display name (default for create: the slug).")]
DescriptionOpt = Annotated[str | None, typer.Option(help="A sentence on what is labeled.")]
KOpt = Annotated[
    str | None, typer.Option("--k", metavar="N", help="Completions per task, 2..9 (default 4).")
]
ModeOpt = Annotated[
    str | None,
    typer.Option(
        metavar="MODE",
        help="rank, pairwise (always K=2) or demonstration (default rank).",
    ),
]
OverlapOpt = Annotated[
    str | None, typer.Option(metavar="N", help="Judgments per task, 1..50 (default 3).")
]
GoldRateOpt = Annotated[
    str | None,
    typer.Option(metavar="RATE", help="Share of served tasks that are gold, 0..1 (default 0)."),
]
RecheckRateOpt = Annotated[
    str | None,
    typer.Option(
        metavar="RATE",
        help="Share of served tasks that repeat one of the labeler's own earlier tasks in a new "
        "order (self-consistency), 0..0.5; rank and pairwise only (default 0).",
    ),
]
LeaseOpt = Annotated[
    str | None,
    typer.Option(metavar="MINUTES", help="How long a labeler holds a task, 1..1440 (default 30)."),
]
TiesOpt = Annotated[
    bool | None, typer.Option("--ties/--no-ties", help="Allow ties in rankings (default: allow).")
]
FlagsOpt = Annotated[
    str | None,
    typer.Option(
        metavar="LIST",
        help='Per-completion flags, comma-separated: "harmful,off-topic" ("" for none).',
    ),
]
GuidelinesOpt = Annotated[
    Path | None,
    typer.Option(
        metavar="PATH", help="Markdown file with the labeling guidelines (- reads stdin)."
    ),
]
StatusOpt = Annotated[
    str | None,
    typer.Option(metavar="STATUS", help="draft, active, paused or archived (create: active)."),
]


def _invalid(exc: InvalidCampaign) -> NoReturn:
    parts = [
        f"{OPTION_NAMES.get(field, field)}: {message.rstrip('.')}"
        for field, message in exc.errors.items()
    ]
    fail("; ".join(parts), 2)


def _read_guidelines(path: Path | None) -> str | None:
    if path is None:
        return None
    if str(path) == "-":
        return sys.stdin.read()
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        fail(f"--guidelines-file: cannot read {path}: {reason}", 2)


def _given(**options: Any) -> dict[str, Any]:
    """The options that were given (None means "not given")."""
    return {name: value for name, value in options.items() if value is not None}


def _get(session: Session, slug: str) -> Campaign:
    campaign = service.get_by_slug(session, slug)
    if campaign is None:
        fail(f"no campaign '{slug}'")
    return campaign


def _summary(campaign: Campaign) -> str:
    return (
        f"{campaign.mode.value}, K={campaign.k}, overlap {campaign.overlap}, "
        f"{campaign.status.value}"
    )


@campaign_cli.command("create")
def campaign_create(
    slug: Annotated[
        str, typer.Argument(help="Lower-case letters, digits and hyphens; fixed for life.")
    ],
    name: NameOpt = None,
    description: DescriptionOpt = None,
    k: KOpt = None,
    mode: ModeOpt = None,
    overlap: OverlapOpt = None,
    gold_rate: GoldRateOpt = None,
    recheck_rate: RecheckRateOpt = None,
    lease_minutes: LeaseOpt = None,
    ties: TiesOpt = None,
    flags: FlagsOpt = None,
    guidelines_file: GuidelinesOpt = None,
    status: StatusOpt = None,
) -> None:
    """Create a campaign (active unless --status says otherwise)."""
    values = _given(
        description=description,
        k=k,
        mode=mode,
        overlap=overlap,
        gold_rate=gold_rate,
        recheck_rate=recheck_rate,
        lease_minutes=lease_minutes,
        allow_ties=ties,
        flags=flags,
        guidelines_md=_read_guidelines(guidelines_file),
        status=status,
    )
    try:
        data = parse_create({"slug": slug, "name": slug if name is None else name, **values})
    except InvalidCampaign as exc:
        _invalid(exc)
    database = open_database(load_settings())
    with database.session() as session:
        try:
            campaign = service.create(session, data=data, actor=None)
        except InvalidCampaign as exc:
            _invalid(exc)
        session.commit()
        typer.echo(f"created campaign '{campaign.slug}' ({_summary(campaign)})")
    database.dispose()


@campaign_cli.command("list")
def campaign_list() -> None:
    """List campaigns with their settings and task, judgment and comparison counts."""
    database = open_database(load_settings())
    with database.session() as session:
        rows = service.list_campaigns(session)
        if not rows:
            typer.echo("no campaigns yet: create one with `prefloop campaign create SLUG`")
            return
        typer.echo(
            f"{'SLUG':<24} {'MODE':<13} {'K':>2} {'OVERLAP':>7} {'GOLD':>5} {'STATUS':<8} "
            f"{'OPEN':>6} {'DONE':>6} {'JUDGMENTS':>9} {'COMPARISONS':>11}  NAME"
        )
        for row in rows:
            c, n = row.campaign, row.counts
            typer.echo(
                f"{c.slug:<24} {c.mode.value:<13} {c.k:>2} {c.overlap:>7} {c.gold_rate:>5.2f} "
                f"{c.status.value:<8} {n.open_tasks:>6} {n.complete_tasks:>6} {n.judgments:>9} "
                f"{n.comparisons:>11}  {c.name}"
            )
    database.dispose()


@campaign_cli.command("show")
def campaign_show(slug: SlugArg) -> None:
    """Show one campaign: settings, counts and guidelines versions."""
    database = open_database(load_settings())
    with database.session() as session:
        campaign = _get(session, slug)
        counts = service.counts(session, [campaign.id])[campaign.id]
        versions = service.guidelines_versions(session, campaign)
        facts = [
            ("slug", campaign.slug),
            ("name", campaign.name),
            ("description", campaign.description),
            ("status", campaign.status.value),
            ("mode", campaign.mode.value),
            ("k", campaign.k),
            ("overlap", campaign.overlap),
            ("gold rate", f"{campaign.gold_rate:g}"),
            ("re-check rate", f"{campaign.recheck_rate:g}"),
            ("lease minutes", campaign.lease_minutes),
            ("ties", "allowed" if campaign.allow_ties else "not allowed"),
            ("flags", ", ".join(campaign.flags) or "(none)"),
            ("guidelines", f"version {campaign.guidelines_version} of {len(versions)}"),
            ("tasks", f"{counts.open_tasks} open, {counts.complete_tasks} complete"),
            ("judgments", counts.judgments),
            ("comparisons", counts.comparisons),
        ]
        for label, value in facts:
            typer.echo(f"{label + ':':<15} {value}")
    database.dispose()


@campaign_cli.command("update")
def campaign_update(
    slug: SlugArg,
    name: NameOpt = None,
    description: DescriptionOpt = None,
    k: KOpt = None,
    mode: ModeOpt = None,
    overlap: OverlapOpt = None,
    gold_rate: GoldRateOpt = None,
    recheck_rate: RecheckRateOpt = None,
    lease_minutes: LeaseOpt = None,
    ties: TiesOpt = None,
    flags: FlagsOpt = None,
    guidelines_file: GuidelinesOpt = None,
    status: StatusOpt = None,
) -> None:
    """Change a campaign's settings, guidelines (a new version) or status; the rest stay."""
    values = _given(
        name=name,
        description=description,
        k=k,
        mode=mode,
        overlap=overlap,
        gold_rate=gold_rate,
        recheck_rate=recheck_rate,
        lease_minutes=lease_minutes,
        allow_ties=ties,
        flags=flags,
        guidelines_md=_read_guidelines(guidelines_file),
    )
    try:
        new_status = parse_status(status) if status is not None else None
    except InvalidCampaign as exc:
        _invalid(exc)
    database = open_database(load_settings())
    with database.session() as session:
        campaign = _get(session, slug)
        try:
            data = parse_settings({**settings_of(campaign), **values})
            changed = sorted(service.changes(campaign, data))
            service.update(session, campaign=campaign, data=data, actor=None)
        except InvalidCampaign as exc:
            _invalid(exc)
        if new_status is not None and new_status != campaign.status:
            service.set_status(session, campaign=campaign, status=new_status, actor=None)
            changed.append("status")
        session.commit()
        if not changed:
            typer.echo(f"'{campaign.slug}' unchanged")
        else:
            typer.echo(
                f"updated '{campaign.slug}': {', '.join(changed)} ({_summary(campaign)}, "
                f"guidelines v{campaign.guidelines_version})"
            )
    database.dispose()
