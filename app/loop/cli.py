"""`prefloop loop set|show|pause|resume|tick|abandon` and `prefloop policies`: the loop from
the command line (no torch: the workers run its jobs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from app.campaigns import service as campaigns
from app.cli_support import fail, load_settings, open_database
from app.loop import lineage
from app.loop import service as loops
from app.loop.audits import win_rates
from app.loop.models import PolicyLoop

loop_cli = typer.Typer(
    help="A campaign's online-RLHF loop: set it up, follow it, pause it.", no_args_is_help=True
)
CampaignArg = Annotated[str, typer.Argument(help="The campaign's slug.")]


def _session(action: Any) -> Any:
    database = open_database(load_settings())
    try:
        with database.session() as db:
            return action(db)
    finally:
        database.dispose()


def _campaign(db: Any, slug: str) -> Any:
    campaign = campaigns.get_by_slug(db, slug)
    if campaign is None:
        fail(f"there is no campaign '{slug}'", 2)
    return campaign


def _loop(db: Any, slug: str) -> tuple[Any, PolicyLoop]:
    campaign = _campaign(db, slug)
    loop = loops.get_loop(db, campaign.id)
    if loop is None:
        fail(f"campaign '{slug}' has no loop: set one with `prefloop loop set {slug} ...`", 2)
    return campaign, loop


@loop_cli.command("set")
def loop_set(
    campaign: CampaignArg,
    policy: Annotated[int, typer.Option("--policy", help="The policy version to start from.")],
    algorithm: Annotated[str, typer.Option(help="ppo, dpo or rloo.")] = "ppo",
    reward_model: Annotated[
        int | None, typer.Option("--reward-model", help="The reward model to warm-start from.")
    ] = None,
    backbone: Annotated[
        str | None, typer.Option(help="Without a reward model: the backbone to train one on.")
    ] = None,
    min_new: Annotated[
        int, typer.Option("--min-new", help="New human comparisons that start an iteration.")
    ] = 200,
    audit_share: Annotated[
        float, typer.Option(help="Share of the new tasks that audit the new policy (0-1).")
    ] = 0.2,
    options: Annotated[
        Path | None,
        typer.Option(
            help='A JSON file of step options: {"reward": {...}, "policy": {...}, "generate": {...}}.'
        ),
    ] = None,
) -> None:
    """Start the campaign's loop, or change it."""
    extra: dict[str, Any] = {}
    if options is not None:
        try:
            extra = json.loads(options.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            fail(f"--options {options}: {error}", 2)
        if not isinstance(extra, dict) or set(extra) - {"reward", "policy", "generate"}:
            fail("--options: a JSON object with reward, policy and generate objects", 2)
    raw = {
        "algorithm": algorithm,
        "policy_id": policy,
        "reward_model_id": reward_model,
        "reward_backbone": backbone,
        "min_new_comparisons": min_new,
        "audit_share": audit_share,
        **extra,
    }

    def action(db: Any) -> None:
        found = _campaign(db, campaign)
        try:
            loop = loops.configure(db, found, loops.parse_config(raw), actor_id=None)
        except loops.LoopError as error:
            fail(str(error), 2)
        db.commit()
        typer.echo(
            f"loop of '{campaign}' is {loop.state.value}: {loop.algorithm} from policy "
            f"{loop.policy_id}, an iteration every {loop.min_new_comparisons} new comparisons"
        )

    _session(action)


@loop_cli.command("show")
def loop_show(campaign: CampaignArg) -> None:
    """Where the loop stands, and its iterations (the newest first)."""

    def action(db: Any) -> None:
        found, loop = _loop(db, campaign)
        pending, _ = loops.human_comparisons_after(db, found.id, loop.comparison_mark)
        typer.echo(
            f"{campaign}: {loop.state.value}, {loop.algorithm}, policy {loop.policy_id}, "
            f"reward model {loop.reward_model_id or '-'}, "
            f"{pending}/{loop.min_new_comparisons} new comparisons"
        )
        if loop.paused_reason:
            typer.echo(f"paused: {loop.paused_reason}")
        rows = loops.iterations(db, loop)
        wins = win_rates(db, [it.policy_id for it in rows if it.policy_id])
        typer.echo("iteration  stage     reward_job  policy_job  generate_job  policy  win_rate")
        for it in rows:
            win = wins.get(it.policy_id)
            rate = f"{win.rate:.2f} ({win.judgments})" if win and win.judgments else "-"
            typer.echo(
                f"{it.number:<9}  {it.stage.value:<8}  {it.reward_job_id or '-':<10}  "
                f"{it.policy_job_id or '-':<10}  {it.generate_job_id or '-':<12}  "
                f"{it.policy_id or '-':<6}  {rate}"
            )

    _session(action)


def _change(campaign: str, action: str) -> None:
    def run(db: Any) -> None:
        _, loop = _loop(db, campaign)
        message = loops.act(db, loop, action, actor_id=None)
        db.commit()
        typer.echo(f"{campaign}: {message}")

    _session(run)


@loop_cli.command("pause")
def loop_pause(campaign: CampaignArg) -> None:
    """No new step or iteration starts; a running job runs to its end."""
    _change(campaign, "pause")


@loop_cli.command("resume")
def loop_resume(campaign: CampaignArg) -> None:
    """Active again; a step whose job died or was cancelled gets a new job, built from the
    loop's current options."""
    _change(campaign, "resume")


@loop_cli.command("tick")
def loop_tick(campaign: CampaignArg) -> None:
    """Check now, as the workers do between jobs."""
    _change(campaign, "tick")


@loop_cli.command("abandon")
def loop_abandon(campaign: CampaignArg) -> None:
    """End the open iteration as failed (cancelling its job) so a new one can start."""
    _change(campaign, "abandon")


def policies_command(
    campaign: Annotated[
        str | None, typer.Option(help="Only this campaign's versions (and registered ones).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON, as GET /api/v1/policies.")] = False,
) -> None:
    """Every policy version in its lineage, with its reward-model score, KL and win rate."""

    def action(db: Any) -> None:
        found = _campaign(db, campaign) if campaign else None
        rows = lineage.lineage(db, campaign_id=found.id if found else None)
        if as_json:
            typer.echo(json.dumps({"versions": [row.as_json() for row in rows]}, indent=2))
            return
        typer.echo("version                         made_by  samples  rm_score  kl  win_rate")
        for row in rows:
            s, win = row.stats, row.win
            name = f"{'  ' * row.depth}#{row.model.id} {row.model.name}"[:30]
            rate = (
                f"{win.rate:.2f} [{win.interval[0]:.2f}, {win.interval[1]:.2f}] "
                f"n={win.judgments} {win.verdict}{' GOODHART' if win.goodhart else ''}"
                if win and win.judgments
                else "-"
            )
            typer.echo(
                f"{name:<30}  {row.model.algorithm or '-':<7}  {s.samples:<7}  "
                f"{'-' if s.reward is None else f'{s.reward:.3f}':<8}  "
                f"{'-' if s.kl is None else f'{s.kl:.3f}':<3}  {rate}"
            )

    _session(action)
