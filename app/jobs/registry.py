"""The model registry and the generation job's database side (no torch here).

Registry: an admin registers a model that was not trained here (a base or SFT policy, an
outside reward model) as a `ModelVersion`, by its folder or its Hugging Face hub id, and
everyone who may see jobs lists them. Generation: queue a `generate` job, find the prompts
of a campaign that lack completions from a generator, and write what the worker sampled
as completions and tasks, with how they were sampled.

Services only add and flush; the request, command or job that called them commits.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.campaigns import service as campaigns
from app.campaigns.models import Campaign, CampaignMode
from app.jobs import service as jobs
from app.jobs.models import Job, ModelKind, ModelVersion
from app.jobs.specs import GENERATE, GenerateJobSpec, SpecError, canonical_base_url
from app.labeling.importer import completion_hash, task_hash
from app.labeling.models import (
    Completion,
    CompletionSource,
    Prompt,
    Task,
    TaskCompletion,
    TaskStatus,
)

# org/name or name, as the hub spells them.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
ALGORITHMS = {
    ModelKind.policy: ("base", "sft"),
    ModelKind.reward: ("reward",),
    ModelKind.reference: ("base", "sft"),
}
LIST_LIMIT = 500
CHUNK = 500


class RegistryError(ValueError):
    """A model that cannot be registered; the message says why."""


# --- the registry -----------------------------------------------------------------------------


def check_path(path: str, data_dir: Path) -> str:
    """The path to store for a model: an absolute folder, a folder relative to
    PREFLOOP_DATA_DIR, or a hub id (`org/name`). A local folder must hold a config.json;
    a hub id is not looked up (the worker downloads it, if it can reach the hub)."""
    text = path.strip()
    if not text:
        raise RegistryError("path: give a model folder or a hub id")
    if len(text) > 1000:
        raise RegistryError("path: at most 1000 characters")
    given = Path(text).expanduser()
    local = given if given.is_absolute() else Path(data_dir) / given
    # A relative path whose first folder exists under the data dir is meant as a folder there
    # (a typo in models/sft-1 must not become a hub id).
    first = Path(data_dir) / given.parts[0]
    looks_local = (
        given.is_absolute()
        or text.startswith((".", "~"))
        or local.exists()
        or (len(given.parts) > 1 and first.is_dir())
    )
    if looks_local:
        if not given.is_absolute() and ".." in given.parts:
            raise RegistryError("path: a relative folder stays under PREFLOOP_DATA_DIR (no '..')")
        if not local.is_dir():
            raise RegistryError(f"path: there is no folder {local}")
        if not (local / "config.json").is_file():
            raise RegistryError(
                f"path: {local} has no config.json, so it is not a Hugging Face model folder"
            )
        return str(given) if given.is_absolute() else given.as_posix()
    if HUB_ID.match(text) and ".." not in text:
        return text
    raise RegistryError(
        f"path: {text!r} is neither a folder (absolute, or under PREFLOOP_DATA_DIR) "
        "nor a hub id like org/name"
    )


def register(
    db: Session,
    *,
    name: str,
    path: str,
    data_dir: Path,
    kind: ModelKind | str = ModelKind.policy,
    algorithm: str | None = None,
    parent_id: int | None = None,
    actor_id: int | None,
) -> ModelVersion:
    """Record a model trained elsewhere as a version (policy: algorithm "base" unless "sft")."""
    name = name.strip()
    if not name or len(name) > 200:
        raise RegistryError("name: 1 to 200 characters")
    try:
        kind = ModelKind(kind)
    except ValueError as error:
        raise RegistryError(f"kind: {kind!r} is not one of policy, reward, reference") from error
    allowed = ALGORITHMS[kind]
    algorithm = algorithm or allowed[0]
    if algorithm not in allowed:
        raise RegistryError(f"algorithm: a {kind.value} model is {' or '.join(allowed)}")
    if parent_id is not None and db.get(ModelVersion, parent_id) is None:
        raise RegistryError(f"parent: there is no model version {parent_id}")
    stored = check_path(path, data_dir)
    model = ModelVersion(
        name=name,
        kind=kind,
        path=stored,
        parent_id=parent_id,
        algorithm=algorithm,
        metrics={"registered": True},
    )
    db.add(model)
    db.flush()
    audit.record(
        db,
        actor_id=actor_id,
        action="model.register",
        entity_type="model_version",
        entity_id=model.id,
        after={"name": name, "kind": kind.value, "path": stored, "algorithm": algorithm},
    )
    return model


def location(data_dir: Path, path: str) -> dict[str, Any]:
    """Where a version's files are, as the model page shows it: `local` with the resolved
    folder when it is one here (absolute, or under PREFLOOP_DATA_DIR), else a hub id."""
    folder = Path(data_dir) / path  # an absolute path stays itself
    local = folder.is_dir()
    return {"local": local, "path": str(folder.resolve()) if local else path, "data_dir": data_dir}


def list_versions(db: Session, *, kind: str | None = None) -> list[ModelVersion]:
    """Every model version (the newest first), of one kind if given."""
    query = select(ModelVersion).order_by(ModelVersion.id.desc()).limit(LIST_LIMIT)
    if kind:
        query = query.where(ModelVersion.kind == kind)
    return list(db.scalars(query))


def model_names(db: Session, ids: Iterable[int]) -> dict[int, str]:
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    rows = db.execute(select(ModelVersion.id, ModelVersion.name).where(ModelVersion.id.in_(wanted)))
    return dict(rows.tuples().all())


# --- generation: queue ------------------------------------------------------------------------


def per_task(campaign: Campaign) -> int:
    """How many completions one task of the campaign shows: K (2 when pairwise), or one
    suggested answer in a demonstration campaign."""
    if campaign.mode == CampaignMode.demonstration:
        return 1
    if campaign.mode == CampaignMode.pairwise:
        return 2
    return campaign.k


def check_generation(db: Session, spec: GenerateJobSpec) -> Campaign:
    """The spec's campaign, once the spec can run there: an unknown campaign, greedy decoding
    of K > 1 completions, a model version that is missing or of the wrong kind, or a version
    audited against itself is SpecError."""
    campaign = campaigns.get_by_slug(db, spec.campaign)
    if campaign is None:
        raise SpecError(f"campaign: there is no campaign '{spec.campaign}'")
    if spec.temperature == 0 and per_task(campaign) > 1:
        raise SpecError(
            "temperature: 0 decodes greedily, so a prompt's K completions would all be the "
            "same; sample with a temperature above 0"
        )
    if spec.model_id is not None:
        model = db.get(ModelVersion, spec.model_id)
        if model is None or model.kind != ModelKind.policy:
            raise SpecError(f"model_id: there is no policy model version {spec.model_id}")
    for field, kind in (
        ("audit_against_id", ModelKind.policy),
        ("reference_id", ModelKind.policy),
        ("reward_model_id", ModelKind.reward),
    ):
        wanted = getattr(spec, field)
        found = db.get(ModelVersion, wanted) if wanted is not None else None
        if wanted is not None and (found is None or found.kind != kind):
            raise SpecError(f"{field}: there is no {kind.value} model version {wanted}")
    if spec.audit_against_id is not None and spec.audit_against_id == spec.model_id:
        raise SpecError("audit_against_id: a version cannot be audited against itself")
    return campaign


def queue_generation(
    db: Session, spec: GenerateJobSpec, *, actor_id: int | None, priority: int = 0
) -> Job:
    """Queue a `generate` job; a spec that cannot run (`check_generation`) is SpecError and
    queues nothing."""
    return enqueue_generation(db, spec, check_generation(db, spec), actor_id, priority)


def enqueue_generation(
    db: Session, spec: GenerateJobSpec, campaign: Campaign, actor_id: int | None, priority: int
) -> Job:
    """The `generate` job of a spec `check_generation` passed for `campaign`, audited."""
    job = jobs.enqueue(
        db,
        kind=GENERATE,
        config=spec.model_dump(mode="json", exclude_none=True),
        campaign_id=campaign.id,
        created_by_id=actor_id,
        priority=priority,
    )
    source = (
        {"model_id": spec.model_id}
        if spec.model_id
        else {"endpoint": spec.endpoint.base_url, "endpoint_model": spec.endpoint.model}
    )
    audit.record(
        db,
        actor_id=actor_id,
        action="job.create",
        entity_type="job",
        entity_id=job.id,
        after={"kind": job.kind, "campaign": campaign.slug, **source},
    )
    return job


# --- generation: which prompts, and writing what was sampled -----------------------------------


def generator_key(spec: GenerateJobSpec) -> dict[str, Any]:
    """What identifies the generator on its completions (beside model_version_id)."""
    if spec.endpoint is not None:
        return {
            "backend": "openai",
            "base_url": spec.endpoint.base_url,
            "model": spec.endpoint.model,
        }
    return {"backend": "hf", "model_id": spec.model_id}


def _from_generator(key: dict[str, Any], params: dict[str, Any]) -> bool:
    if isinstance(params.get("base_url"), str):  # stored before base URLs were canonical
        params = {**params, "base_url": canonical_base_url(params["base_url"])}
    return all(params.get(name) == value for name, value in key.items())


def due_prompts(db: Session, campaign: Campaign, spec: GenerateJobSpec) -> list[int]:
    """Prompt ids of the campaign that lack completions, oldest first (at most
    `spec.max_prompts`): no open task, and fewer than the campaign's K completions from this
    generator (the model version, or the endpoint's base URL and model)."""
    k = per_task(campaign)
    open_task = exists().where(Task.prompt_id == Prompt.id, Task.status == TaskStatus.open)
    query = select(Prompt.id).where(Prompt.campaign_id == campaign.id, ~open_task)
    if spec.model_id is not None:
        mine = (
            select(func.count(Completion.id))
            .where(Completion.prompt_id == Prompt.id, Completion.model_version_id == spec.model_id)
            .scalar_subquery()
        )
        query = query.where(mine < k).order_by(Prompt.id)
        if spec.max_prompts:
            query = query.limit(spec.max_prompts)
        return list(db.scalars(query))
    # An endpoint is told apart by its generation parameters: counted here, not in SQL (JSON
    # paths differ between PostgreSQL and SQLite).
    key = generator_key(spec)
    due: list[int] = []
    for chunk in _chunks(list(db.scalars(query.order_by(Prompt.id)))):
        counts = dict.fromkeys(chunk, 0)
        for prompt_id, params in db.execute(
            select(Completion.prompt_id, Completion.generation_params).where(
                Completion.prompt_id.in_(chunk),
                Completion.source == CompletionSource.model,
                Completion.model_version_id.is_(None),
            )
        ):
            if _from_generator(key, params or {}):
                counts[prompt_id] += 1
        due.extend(pid for pid in chunk if counts[pid] < k)
        if spec.max_prompts and len(due) >= spec.max_prompts:
            return due[: spec.max_prompts]
    return due


def why_none_due(db: Session, campaign: Campaign, spec: GenerateJobSpec) -> dict[str, int]:
    """Why no prompt of the campaign is due, for a job that found none to show: how many
    prompts it has, how many have an open task, and how many of the others already have K
    completions from this generator."""
    total = db.scalar(select(func.count(Prompt.id)).where(Prompt.campaign_id == campaign.id))
    busy = exists().where(Task.prompt_id == Prompt.id, Task.status == TaskStatus.open)
    open_tasks = db.scalar(
        select(func.count(Prompt.id)).where(Prompt.campaign_id == campaign.id, busy)
    )
    everything = spec.model_copy(update={"max_prompts": None})
    free = (total or 0) - (open_tasks or 0)
    return {
        "prompts": total or 0,
        "open_task": open_tasks or 0,
        "answered": free - len(due_prompts(db, campaign, everything)),
        "per_task": per_task(campaign),
    }


def still_due(db: Session, prompt_ids: Sequence[int]) -> list[int]:
    """Those of `prompt_ids` that have no open task now (a resumed job skips what an earlier
    attempt already wrote)."""
    out: list[int] = []
    for chunk in _chunks(list(prompt_ids)):
        busy = set(
            db.scalars(
                select(Task.prompt_id).where(
                    Task.prompt_id.in_(chunk), Task.status == TaskStatus.open
                )
            )
        )
        out.extend(pid for pid in chunk if pid not in busy)
    return out


def prompt_contents(
    db: Session, prompt_ids: Sequence[int]
) -> dict[int, str | list[dict[str, Any]]]:
    """Each prompt as the model sees it: its chat messages, or its text."""
    out: dict[int, Any] = {}
    for chunk in _chunks(list(prompt_ids)):
        for pid, text, messages in db.execute(
            select(Prompt.id, Prompt.text, Prompt.messages).where(Prompt.id.in_(chunk))
        ):
            out[pid] = messages if messages else text
    return out


def existing_hashes(db: Session, prompt_ids: Sequence[int]) -> dict[int, set[str]]:
    """The content hashes of every completion each prompt already has, whatever its source."""
    out: dict[int, set[str]] = {pid: set() for pid in prompt_ids}
    for chunk in _chunks(list(prompt_ids)):
        for pid, chash in db.execute(
            select(Completion.prompt_id, Completion.content_hash).where(
                Completion.prompt_id.in_(chunk)
            )
        ):
            out[pid].add(chash)
    return out


def add_generated_task(
    db: Session,
    *,
    campaign: Campaign,
    prompt_id: int,
    texts: Sequence[str],
    params: Sequence[dict[str, Any]],
    model_version_id: int | None,
    priority: int = 0,
) -> Task:
    """The sampled completions of one prompt and the task that shows them, in that order."""
    made = [
        sampled_completion(prompt_id, text, extra, model_version_id)
        for text, extra in zip(texts, params, strict=True)
    ]
    db.add_all(made)
    db.flush()
    return open_task(db, campaign, prompt_id, made, priority=priority)


def sampled_completion(
    prompt_id: int, text: str, params: dict[str, Any], model_version_id: int | None
) -> Completion:
    """A completion a model sampled, with how it was sampled (not added to the session)."""
    return Completion(
        prompt_id=prompt_id,
        text=str(text),  # a plain str: a sampler's text may carry its token ids
        source=CompletionSource.model,
        model_version_id=model_version_id,
        generation_params=dict(params),
        content_hash=completion_hash(text),
    )


def open_task(
    db: Session,
    campaign: Campaign,
    prompt_id: int,
    shown: Sequence[Completion],
    *,
    priority: int = 0,
) -> Task:
    """An open task of the campaign that shows these (flushed) completions in this order."""
    prompt = db.get_one(Prompt, prompt_id)
    task = Task(
        campaign_id=campaign.id,
        prompt_id=prompt_id,
        status=TaskStatus.open,
        priority=priority,
        required_judgments=campaign.overlap,
        content_hash=task_hash(prompt.content_hash, [c.content_hash for c in shown]),
    )
    db.add(task)
    db.flush()
    db.add_all(
        TaskCompletion(task_id=task.id, position=i, completion_id=c.id) for i, c in enumerate(shown)
    )
    db.flush()
    return task


def _chunks(values: list[int], size: int = CHUNK) -> Iterable[list[int]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]
