"""`prefloop model add|list` (the model registry) and `prefloop generate` (queue a generation
job). Neither needs torch: the worker loads the model."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from app.cli_support import fail, load_settings, open_database
from app.jobs import generation, registry, training
from app.jobs.specs import SpecError, parse_generate_spec

model_cli = typer.Typer(help="Model versions: register one, list them.", no_args_is_help=True)


@model_cli.command("add")
def model_add(
    name: Annotated[str, typer.Argument(help="The version's name, e.g. llama-3.1-8b-sft.")],
    path: Annotated[
        str,
        typer.Option(
            "--path", help="A model folder (absolute, or under PREFLOOP_DATA_DIR) or a hub id."
        ),
    ],
    kind: Annotated[str, typer.Option(help="policy or reward.")] = "policy",
    algorithm: Annotated[
        str | None, typer.Option(help="How it was made: base or sft (policy), reward.")
    ] = None,
    parent: Annotated[
        int | None, typer.Option("--parent", help="The version it was trained from.")
    ] = None,
) -> None:
    """Register a model trained elsewhere (a base or SFT policy, a reward model)."""
    if kind not in ("policy", "reward"):
        fail(f"--kind {kind!r}: use policy or reward", 2)
    settings = load_settings()
    database = open_database(settings)
    try:
        with database.session() as db:
            try:
                model = registry.register(
                    db,
                    name=name,
                    path=path,
                    data_dir=settings.data_dir,
                    kind=kind,
                    algorithm=algorithm,
                    parent_id=parent,
                    actor_id=None,
                )
            except registry.RegistryError as error:
                fail(str(error), 2)
            db.commit()
            typer.echo(
                f"registered model version {model.id} ({model.kind.value}, {model.algorithm}): "
                f"{model.name} at {model.path}"
            )
    finally:
        database.dispose()


@model_cli.command("list")
def model_list(
    kind: Annotated[str | None, typer.Option(help="Only policy, reward or reference.")] = None,
) -> None:
    """Every model version, newest first: id, kind, algorithm, name, path, parent, job."""
    if kind is not None and kind not in ("policy", "reward", "reference"):
        fail(f"--kind {kind!r}: use policy, reward or reference", 2)
    settings = load_settings()
    database = open_database(settings)
    try:
        with database.session() as db:
            found = registry.list_versions(db, kind=kind)
            if not found:
                typer.echo("no model versions (register one with `prefloop model add`)")
                return
            typer.echo(
                f"{'ID':>5}  {'KIND':<9} {'ALGORITHM':<9} {'PARENT':>6} {'JOB':>6}  NAME  PATH"
            )
            for m in found:
                typer.echo(
                    f"{m.id:>5}  {m.kind.value:<9} {m.algorithm or '-':<9} "
                    f"{m.parent_id or '-':>6} {m.job_id or '-':>6}  {m.name}  {m.path}"
                )
    finally:
        database.dispose()


def generate_command(
    campaign: Annotated[str, typer.Option("--campaign", help="The campaign's slug.")],
    model: Annotated[
        str | None,
        typer.Option("--model", help="A policy model version's id or name (a local sampler)."),
    ] = None,
    endpoint: Annotated[
        str | None,
        typer.Option(help="Instead of --model: an OpenAI-compatible base URL (…/v1)."),
    ] = None,
    endpoint_model: Annotated[
        str | None, typer.Option(help="The model name the endpoint serves.")
    ] = None,
    api: Annotated[str, typer.Option(help="chat or completions (with --endpoint).")] = "chat",
    api_key_env: Annotated[
        str | None,
        typer.Option(help="The environment variable holding the endpoint's key, on the worker."),
    ] = None,
    prompts: Annotated[
        int | None, typer.Option("--prompts", help="At most this many prompts (default all).")
    ] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling.")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per completion.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Prompts sampled together.")] = 8,
    resample_rounds: Annotated[int, typer.Option(help="Rounds of re-sampling duplicates.")] = 4,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    priority: Annotated[int, typer.Option(help="The job's priority (higher runs first).")] = 0,
) -> None:
    """Queue a job that samples the campaign's K completions for each prompt lacking them and
    makes tasks of them; a worker runs it. Nothing is queued while a job from the same model
    or endpoint waits for the campaign."""
    if (model is None) == (endpoint is None):
        fail("give --model VERSION, or --endpoint URL with --endpoint-model NAME", 2)
    if endpoint is not None and not endpoint_model:
        fail("--endpoint needs --endpoint-model (the name the server serves)", 2)
    raw: dict[str, Any] = {
        "campaign": campaign,
        "max_prompts": prompts,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "resample_rounds": resample_rounds,
        "seed": seed,
    }
    if endpoint is not None:
        raw["endpoint"] = {
            "base_url": endpoint,
            "model": endpoint_model,
            "api": api,
            "api_key_env": api_key_env,
        }
    settings = load_settings()
    database = open_database(settings)
    try:
        with database.session() as db:
            if model is not None:
                version = training.get_model(db, model)
                if version is None or version.kind.value != "policy":
                    fail(f"no policy model version '{model}' (see `prefloop model list`)", 1)
                raw["model_id"] = version.id
            try:
                spec = parse_generate_spec(raw)
            except SpecError as error:
                fail(str(error), 2)
            try:
                job, queued = generation.queue_unless_waiting(
                    db, spec, actor_id=None, priority=priority
                )
            except SpecError as error:
                fail(str(error), 1)
            db.commit()
            source = f"model version {spec.model_id}" if spec.model_id else f"{endpoint}"
            if not queued:
                typer.echo(
                    f"nothing new was queued: job {job.id} ({job.state.value}) already "
                    f"generates for {campaign} from {source}; queue another once it has finished"
                )
                return
            typer.echo(f"queued job {job.id} (generate for {campaign} from {source})")
            typer.echo(
                f"  run it with `prefloop worker`; follow it with `prefloop job show {job.id}` "
                f"or on /jobs/{job.id}"
            )
    finally:
        database.dispose()
