"""The jobs pages (admins and researchers): queue a training job (reward model, PPO, RLOO,
SFT or DPO: a `JobForm` each, routed by `add_form`), follow every job (a progress bar that
polls itself, live metric charts, the log tail), cancel and retry, and look at the model
versions a job produced beside the humans' rankings.

One URL per thing: htmx asks the same URL for a fragment (a job's row in the list, or its
status panel) and the page answers with that block of the same template."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, ValidationError
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.responses import RedirectResponse, Response

from app.auth.models import Role
from app.campaigns import service as campaigns
from app.campaigns.models import Campaign
from app.db import MAX_ID
from app.jobs import api, generation, registry, training
from app.jobs import service as jobs
from app.jobs.models import Job, JobState, ModelKind, ModelVersion
from app.jobs.specs import (
    DPOJobSpec,
    GenerateJobSpec,
    PPOJobSpec,
    RewardJobSpec,
    RLOOJobSpec,
    ScoreJobSpec,
    SFTJobSpec,
    SpecError,
    bundled_backbone,
)
from app.loop.audits import win_rates
from app.loop.models import LoopIteration, PolicyLoop
from app.validation import humane_errors
from app.web import (
    CurrentPrincipal,
    DbSession,
    RowId,
    flash,
    is_htmx,
    render,
    render_block,
    require_roles,
)

router = APIRouter(dependencies=[Depends(require_roles(Role.admin, Role.researcher))])

LIST_TEMPLATE = "jobs/list.html"
DETAIL_TEMPLATE = "jobs/detail.html"
MODEL_TEMPLATE = "jobs/model.html"
ACTIVE = (JobState.queued, JobState.running, JobState.failed)
STATE_FILTERS = ("active", "finished", "all")
TASKS_SHOWN = 20


def state_filter(which: str) -> list[JobState] | None:
    if which == "active":
        return list(ACTIVE)
    if which == "finished":
        return [JobState.succeeded, JobState.dead, JobState.cancelled]
    return None


def campaign_slugs(db: Any, ids: set[int]) -> dict[int, str]:
    if not ids:
        return {}
    return dict(
        db.execute(select(Campaign.id, Campaign.slug).where(Campaign.id.in_(ids))).tuples().all()
    )


def row_context(db: Any, found: list[Job]) -> dict[str, Any]:
    creators = {j.created_by_id for j in found if j.created_by_id}
    return {
        "jobs": found,
        "models": training.models_of(db, [j.id for j in found]),
        "names": training.usernames(db, creators),
        "campaign_slugs": campaign_slugs(db, {j.campaign_id for j in found if j.campaign_id}),
    }


@router.get("/jobs")
def jobs_page(request: Request, db: DbSession, state: Annotated[str, Query()] = "all") -> Response:
    """Queued, running and finished jobs, newest first; active rows refresh themselves."""
    which = state if state in STATE_FILTERS else "all"
    found = jobs.list_jobs(db, states=state_filter(which), limit=200)
    context = row_context(db, found) | {"which": which, "filters": STATE_FILTERS}
    return render(request, LIST_TEMPLATE, context, db=db)


# --- the forms that queue training jobs ----------------------------------------------------------

# Form fields: (name, label, input type, hint); the values are the spec's fields, or its
# training options', of the same name.
FormField = tuple[str, str, str, str]
SEED: FormField = ("seed", "Seed", "number", "")
GRAD_ACCUMULATION: FormField = ("grad_accumulation_steps", "Gradient accumulation", "number", "")
MAX_TOKENS: FormField = ("max_length", "Max tokens", "number", "The prompt's start is cut first.")
# PPO's and RLOO's in common
RL_LEARNING_RATE: FormField = (
    "learning_rate",
    "Learning rate",
    "number",
    "AdamW; small (3e-6 is the default).",
)
RL_SAMPLING: tuple[FormField, ...] = (
    ("max_new_tokens", "Max new tokens", "number", "Response length cap."),
    ("temperature", "Sampling temperature", "number", "Log-probs always use logits / temperature."),
)
MIN_AGREEMENT: FormField = (
    "min_agreement",
    "Minimum task agreement (0-1)",
    "number",
    "Tasks judged once are dropped.",
)
MISSING_EOS: FormField = ("missing_eos_penalty", "Penalty without EOS", "number", "Empty: none.")
ONLINE_RL_INPUTS = (
    "policy_id",
    "reward_model_id",
    "name",
    "kl_budget",
    "max_prompts",
    "processes",
    "sharding",
)


def data_fields(
    held_out: str, at_most: FormField, *, agreement: bool = True
) -> tuple[FormField, ...]:
    """The Data fieldset of a job that reads an export (see `specs.export_filters`): the days,
    the quality floors, the held-out share (`held_out`: what it is for), the split, a cap."""
    return (
        ("since", "From (UTC day)", "date", ""),
        ("until", "Until (UTC day, included)", "date", ""),
        *((MIN_AGREEMENT,) if agreement else ()),
        ("min_gold_accuracy", "Minimum labeler gold accuracy (0-1)", "number", ""),
        ("test_fraction", "Held-out prompts (0-0.5)", "number", held_out),
        ("split_seed", "Split seed", "number", ""),
        at_most,
    )


def campaign_query(campaign: Annotated[str | None, Query()] = None) -> dict[str, Any]:
    """`?campaign=SLUG`: that campaign ticked."""
    return {"campaigns": [campaign] if campaign else []}


def policy_query(
    policy: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    reward: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    campaign: Annotated[str | None, Query()] = None,
) -> dict[str, Any]:
    """`?policy=ID&reward=ID&campaign=SLUG`: the policy version PPO or RLOO starts from, the
    reward model it optimises against, a campaign."""
    return {"policy_id": policy, "reward_model_id": reward, **campaign_query(campaign)}


def model_query(
    model: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    campaign: Annotated[str | None, Query()] = None,
) -> dict[str, Any]:
    """`?model=ID&campaign=SLUG`: the policy version SFT or DPO starts from, a campaign."""
    return {"model_id": model, **campaign_query(campaign)}


@dataclass(frozen=True)
class JobForm:
    """The form of one kind of training job: its page, the spec its input becomes and the
    function that queues it, its fields, and the campaigns and model versions it offers.
    Inputs are the spec's fields (`top`, the data fields) or its training options'
    (`training`, the training fields); empty ones keep their defaults."""

    name: str  # of its routes: new_<name>_job and create_<name>_job
    template: str
    spec: type[BaseModel]
    queue: Callable[..., Job]  # training.queue_*(db, spec, actor_id=...)
    what: str  # once queued, "a worker will <what>"
    query: Callable[..., dict[str, Any]]  # what the GET's query fills in (a dependency)
    shows: str  # the GET's and the POST's docstrings
    queues: str
    training_fields: tuple[FormField, ...]
    data_fields: tuple[FormField, ...] = ()
    top: tuple[str, ...] = ()
    training: tuple[str, ...] = ()
    top_checks: tuple[str, ...] = ()  # checkboxes: true when sent
    training_checks: tuple[str, ...] = ()
    demonstrations: bool = False  # offer demonstration campaigns, else the others
    # (context name, model kind, the field it fills or "" when optional) listed to choose
    models: tuple[tuple[str, str, str], ...] = ()
    own_defaults: Callable[[], dict[str, Any]] = dict
    own_context: Callable[[], dict[str, Any]] = dict
    refill: bool = False  # a refused form shows the defaults in the fields sent empty

    def inputs(self) -> tuple[set[str], set[str]]:
        """The names of the spec's own inputs, and of its training options'."""
        top = {name for name, *_ in self.data_fields} | {*self.top, *self.top_checks}
        options = {name for name, *_ in self.training_fields}
        return top, options | {*self.training, *self.training_checks}

    def defaults(self) -> dict[str, Any]:
        """Every input at the spec's default (what is required stays empty)."""
        fields = self.spec.model_fields
        options = fields["training"].get_default(call_default_factory=True).model_dump()
        top, training_inputs = self.inputs()
        form = {
            name: fields[name].get_default(call_default_factory=True)
            for name in top
            if not fields[name].is_required()
        }
        return form | {name: options[name] for name in training_inputs} | self.own_defaults()

    def context(
        self, db: Any, form: dict[str, Any], error: str | None = None, *, preselect: bool = False
    ) -> dict[str, Any]:
        """The page's context; `preselect` (a GET) fills in the obvious choices left empty."""
        offered = [
            row
            for row in campaigns.list_campaigns(db)
            if (row.campaign.mode.value == "demonstration") == self.demonstrations
        ]
        listed = {key: training.list_models(db, kind=kind) for key, kind, _ in self.models}
        if preselect:
            form = self.preselected(db, form, offered, listed)
        return {
            "form": form,
            "error": error,
            "campaign_list": offered,
            "data_fields": self.data_fields,
            "training_fields": self.training_fields,
            **listed,
            **self.own_context(),
        }

    def preselected(
        self, db: Any, form: dict[str, Any], offered: list[Any], listed: dict[str, list[Any]]
    ) -> dict[str, Any]:
        """The form with the obvious choices made where the query left them empty: the only
        version a required model field can take; the campaign a chosen version was trained
        on when it is offered, else the only campaign offered."""
        form = dict(form)
        for key, _kind, field in self.models:
            if field and not form.get(field) and len(listed[key]) == 1:
                form[field] = listed[key][0].id
        if form.get("campaigns"):
            return form
        slugs = {row.campaign.id: row.campaign.slug for row in offered}
        chosen = [form[field] for _, _, field in self.models if field and form.get(field)]
        theirs = [
            slugs[model.campaign_id]
            for model_id in chosen
            if (model := db.get(ModelVersion, int(model_id))) is not None
            and model.campaign_id in slugs
        ]
        if theirs or len(slugs) == 1:
            form["campaigns"] = theirs[:1] or list(slugs.values())
        return form

    def spec_input(self, form: Any) -> dict[str, Any]:
        top, training_inputs = self.inputs()
        return spec_input(
            form,
            top=top,
            training=training_inputs,
            top_checks=self.top_checks,
            training_checks=self.training_checks,
        )


def spec_input(
    form: Any,
    *,
    top: set[str],
    training: set[str],
    top_checks: tuple[str, ...] = (),
    training_checks: tuple[str, ...] = (),
) -> dict[str, Any]:
    """A job form as its spec's input: `campaigns` (checkboxes), the `top` fields, the
    `training` options under "training"; empty fields keep their defaults, and a checkbox is
    true when it was sent."""
    raw: dict[str, Any] = {"campaigns": [str(v) for v in form.getlist("campaigns")]}
    options: dict[str, Any] = {}
    for key, value in form.multi_items():
        if not isinstance(value, str) or not value.strip() or key == "csrf_token":
            continue
        if key in training:
            options[key] = value.strip()
        elif key in top:
            raw[key] = value.strip()
    raw.update({name: form.get(name) is not None for name in top_checks})
    options.update({name: form.get(name) is not None for name in training_checks})
    raw["training"] = options
    return raw


def queue_from_form(
    request: Request, db: Any, principal: Any, form: JobForm, raw: dict[str, Any]
) -> Response:
    """Queue a job from a form's input and go to its page; a bad field (a pydantic
    ValidationError is a ValueError) shows the form again with the reason and queues nothing."""
    try:
        job = form.queue(db, form.spec.model_validate(raw), actor_id=principal.user.id)
    except (SpecError, ValueError) as error:
        db.rollback()
        message = humane_errors(error) if isinstance(error, ValidationError) else str(error)
        sent = (form.defaults() if form.refill else {}) | raw | raw.get("training", {})
        context = form.context(db, sent, message)
        return render(request, form.template, context, status_code=422, db=db)
    flash(db, principal, f"Job #{job.id} is queued: a worker (`prefloop worker`) will {form.what}.")
    db.commit()
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)


def add_form(form: JobForm, *, new: str, create: str) -> None:
    """Route a form: GET `new` shows it (the query fills some in), POST `create` queues it."""

    def show(
        request: Request, db: DbSession, filled: dict[str, Any] = Depends(form.query)
    ) -> Response:
        context = form.context(db, form.defaults() | filled, preselect=True)
        return render(request, form.template, context, db=db)

    async def submit(request: Request, db: DbSession, principal: CurrentPrincipal) -> Response:
        raw = form.spec_input(await request.form())
        return await run_in_threadpool(queue_from_form, request, db, principal, form, raw)

    show.__doc__, submit.__doc__ = form.shows, form.queues
    router.add_api_route(new, show, methods=["GET"], name=f"new_{form.name}_job")
    router.add_api_route(create, submit, methods=["POST"], name=f"create_{form.name}_job")


REWARD_FORM = JobForm(
    name="reward",
    template="jobs/new_reward.html",
    spec=RewardJobSpec,
    queue=training.queue_reward_training,
    what="train it",
    query=campaign_query,
    shows="The form that queues a reward model for one or more campaigns.",
    queues="Queue a reward-model job from the form; a bad field shows the form again, queues "
    "nothing.",
    data_fields=data_fields(
        "No prompt is on both sides.",
        ("max_judgments", "At most this many judgments", "number", "Empty: all of them."),
    ),
    training_fields=(
        ("learning_rate", "Learning rate", "number", "Peak AdamW rate, linear warmup and decay."),
        ("epochs", "Epochs", "number", "InstructGPT: a second epoch overfits."),
        ("batch_size", "Judgments per batch", "number", "Each judgment's K completions at once."),
        GRAD_ACCUMULATION,
        MAX_TOKENS,
        SEED,
    ),
    top=("backbone", "init_model_id", "labeler_weights", "name", "processes", "sharding"),
    training=("ties",),
    top_checks=("include_excluded",),
    training_checks=("use_margin",),
    models=(("rewards", "reward", ""),),  # to warm-start from: optional
    own_defaults=lambda: {"backbone": bundled_backbone() or ""},
    own_context=lambda: {"bundled": bundled_backbone()},
    refill=True,
)
PPO_FORM = JobForm(
    name="ppo",
    template="jobs/new_ppo.html",
    spec=PPOJobSpec,
    queue=training.queue_ppo,
    what="run PPO",
    query=policy_query,
    shows="The form that queues PPO of a policy version against a reward model version.",
    queues="Queue PPO from the form; a bad field shows the form again and queues nothing.",
    training_fields=(
        ("total_steps", "PPO steps", "number", "Each samples a rollout batch, then updates."),
        ("rollout_batch_size", "Responses per step", "number", ""),
        ("minibatch_size", "Responses per optimizer step", "number", ""),
        ("ppo_epochs", "Epochs over each rollout", "number", ""),
        RL_LEARNING_RATE,
        *RL_SAMPLING,
        ("kl_coef", "KL coefficient (beta)", "number", "Initial beta when adaptive."),
        ("kl_target", "Target KL (nats, adaptive)", "number", "Ziegler et al. use 6."),
        MISSING_EOS,
        SEED,
    ),
    top=ONLINE_RL_INPUTS,
    training=("value_init",),
    training_checks=("adaptive_kl", "use_lora"),
    models=(("policies", "policy", "policy_id"), ("rewards", "reward", "reward_model_id")),
)
RLOO_FORM = JobForm(
    name="rloo",
    template="jobs/new_rloo.html",
    spec=RLOOJobSpec,
    queue=training.queue_rloo,
    what="run RLOO",
    query=policy_query,
    shows="The form that queues RLOO of a policy version against a reward model version.",
    queues="Queue RLOO from the form; a bad field shows the form again and queues nothing.",
    training_fields=(
        (
            "total_steps",
            "RLOO steps",
            "number",
            "Each samples k responses per prompt, then updates.",
        ),
        ("prompts_per_step", "Prompts per step", "number", ""),
        (
            "k",
            "Responses per prompt (k)",
            "number",
            "At least 2: each one's baseline is the others' mean.",
        ),
        (
            "minibatch_size",
            "Responses per optimizer step",
            "number",
            "Empty: the whole step at once.",
        ),
        ("epochs", "Epochs over each step", "number", "1 with one minibatch is plain REINFORCE."),
        RL_LEARNING_RATE,
        *RL_SAMPLING,
        (
            "kl_coef",
            "KL coefficient (beta)",
            "number",
            "On the response's summed KL; initial when adaptive.",
        ),
        ("kl_target", "Target KL (nats, adaptive)", "number", ""),
        MISSING_EOS,
        SEED,
    ),
    top=ONLINE_RL_INPUTS,
    training_checks=("adaptive_kl", "use_lora", "whiten_advantages"),
    models=(("policies", "policy", "policy_id"), ("rewards", "reward", "reward_model_id")),
)
SFT_FORM = JobForm(
    name="sft",
    template="jobs/new_sft.html",
    spec=SFTJobSpec,
    queue=training.queue_sft,
    what="fine-tune",
    query=model_query,
    shows="The form that queues supervised fine-tuning of a policy version on demonstrations.",
    queues="Queue SFT from the form; a bad field shows the form again and queues nothing.",
    data_fields=data_fields(
        "For the eval loss; 0: none.",
        ("max_examples", "At most this many demonstrations", "number", "Empty: all of them."),
        agreement=False,
    ),
    training_fields=(
        ("learning_rate", "Learning rate", "number", "Peak AdamW rate; warmup, then cosine decay."),
        ("epochs", "Epochs", "number", ""),
        ("batch_size", "Examples per batch", "number", "Packed: rows per batch."),
        GRAD_ACCUMULATION,
        MAX_TOKENS,
        SEED,
    ),
    top=("model_id", "name", "processes", "sharding"),
    top_checks=("include_excluded",),
    training_checks=("packing",),
    demonstrations=True,
    models=(("policies", "policy", "model_id"),),
)
DPO_FORM = JobForm(
    name="dpo",
    template="jobs/new_dpo.html",
    spec=DPOJobSpec,
    queue=training.queue_dpo,
    what="run DPO",
    query=model_query,
    shows="The form that queues DPO of a policy version on the campaigns' comparisons.",
    queues="Queue DPO from the form; a bad field shows the form again and queues nothing.",
    data_fields=data_fields(
        "For the eval reward accuracy.",
        ("max_pairs", "At most this many pairs", "number", "Empty: all of them."),
    ),
    training_fields=(
        ("beta", "Beta", "number", "Pull toward the starting policy; 0.1 is the usual choice."),
        ("label_smoothing", "Label smoothing", "number", "Conservative DPO: 0 to 0.5 (exclusive)."),
        (
            "learning_rate",
            "Learning rate",
            "number",
            "Peak AdamW rate; small (1e-6 is the default).",
        ),
        ("epochs", "Epochs", "number", ""),
        ("batch_size", "Pairs per batch", "number", "Chosen and rejected in one forward pass."),
        GRAD_ACCUMULATION,
        (
            "max_length",
            "Max tokens",
            "number",
            "Per prompt + answer; the prompt's start is cut first.",
        ),
        SEED,
    ),
    top=("model_id", "name", "processes", "sharding"),
    top_checks=("include_excluded",),
    models=(("policies", "policy", "model_id"),),
)
# Before /jobs/{job_id}, which would take /jobs/new for a job id.
add_form(REWARD_FORM, new="/jobs/new", create="/jobs")
add_form(PPO_FORM, new="/jobs/new/ppo", create="/jobs/new/ppo")
add_form(RLOO_FORM, new="/jobs/new/rloo", create="/jobs/new/rloo")
add_form(SFT_FORM, new="/jobs/new/sft", create="/jobs/new/sft")
add_form(DPO_FORM, new="/jobs/new/dpo", create="/jobs/new/dpo")


def detail_context(db: Any, job: Job) -> dict[str, Any]:
    models = training.models_of(db, [job.id]).get(job.id, [])
    names = training.usernames(db, {job.created_by_id} if job.created_by_id else set())
    latest = jobs.latest_metrics(db, job.id)
    warnings: list[str] = []
    if job.kind in ("ppo", "rloo"):
        series, _ = training.metric_series(db, job.id)
        warnings = training.ppo_warnings(series, job.config or {})
    return {
        "job": job,
        "job_models": models,
        "creator": names.get(job.created_by_id or 0),
        "latest": latest,
        "active": job.state in ACTIVE,
        "warnings": warnings,
        "loop_step": loop_step_of(db, job),
    }


def loop_step_of(db: Any, job: Job) -> dict[str, Any] | None:
    """Which loop iteration this job is a step of, if any (for the link to the loop)."""
    iteration = db.scalar(
        select(LoopIteration).where(
            (LoopIteration.reward_job_id == job.id)
            | (LoopIteration.policy_job_id == job.id)
            | (LoopIteration.generate_job_id == job.id)
        )
    )
    if iteration is None:
        return None
    loop = db.get_one(PolicyLoop, iteration.loop_id)
    campaign = db.get_one(Campaign, loop.campaign_id)
    return {"campaign": campaign.slug, "number": iteration.number, "stage": iteration.stage.value}


@router.get("/jobs/{job_id}")
def job_page(job_id: RowId, request: Request, db: DbSession) -> Response:
    """A job: its state and progress, the live charts of its metrics, the log tail, the
    model versions it produced. htmx: `HX-Target: job-<id>` is its row in the list, anything
    else its status panel."""
    job = api.job_or_404(db, job_id)
    if is_htmx(request):
        if request.headers.get("hx-target") == f"job-{job.id}":
            return render_block(
                request, LIST_TEMPLATE, "row", row_context(db, [job]) | {"job": job}
            )
        return render_block(request, DETAIL_TEMPLATE, "status", detail_context(db, job))
    return render(request, DETAIL_TEMPLATE, detail_context(db, job), db=db)


def _change(request: Request, db: Any, principal: Any, job_id: int, action: str) -> Response:
    change = jobs.cancel if action == "cancel" else jobs.retry
    try:
        job = change(db, job_id, actor_id=principal.user.id)
    except jobs.JobNotFound as error:
        raise HTTPException(404, str(error)) from error
    except jobs.InvalidTransition as error:
        db.rollback()
        if is_htmx(request):
            job = api.job_or_404(db, job_id)
            context = detail_context(db, job) | {"notice": str(error)}
            return render_block(request, DETAIL_TEMPLATE, "status", context, status_code=409)
        flash(db, principal, str(error), "error")
        db.commit()
        return RedirectResponse(f"/jobs/{job_id}", status_code=303)
    db.commit()
    if is_htmx(request):
        return render_block(request, DETAIL_TEMPLATE, "status", detail_context(db, job))
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)


@router.post("/jobs/{job_id}/cancel")
def cancel_job(
    job_id: RowId, request: Request, db: DbSession, principal: CurrentPrincipal
) -> Response:
    """Cancel a waiting job, or ask a running one to stop at its next heartbeat."""
    return _change(request, db, principal, job_id, "cancel")


@router.post("/jobs/{job_id}/retry")
def retry_job(
    job_id: RowId, request: Request, db: DbSession, principal: CurrentPrincipal
) -> Response:
    """Queue a failed, dead or cancelled job again; it resumes from its checkpoint."""
    return _change(request, db, principal, job_id, "retry")


def _score(request: Request, db: Any, principal: Any, model_id: int, raw: str) -> Response:
    api.model_or_404(db, model_id)
    try:
        task_ids = [int(part) for part in raw.replace(",", " ").split()]
        spec = ScoreJobSpec(model_id=model_id, task_ids=task_ids or None)
        job = training.queue_scoring(db, spec, actor_id=principal.user.id)
    except (SpecError, ValueError) as error:
        db.rollback()
        message = str(error) if isinstance(error, SpecError) else "task ids are numbers"
        flash(db, principal, f"Nothing was queued: {message}", "error")
        db.commit()
        return RedirectResponse(f"/models/{model_id}", status_code=303)
    flash(db, principal, f"Job #{job.id} scores {len(task_ids)} task(s) with this model.")
    db.commit()
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)


@router.post("/models/{model_id}/score")
async def score_tasks(
    model_id: RowId, request: Request, db: DbSession, principal: CurrentPrincipal
) -> Response:
    """Queue a job in which the model scores the given tasks; their rankings then show here."""
    raw = str((await request.form()).get("task_ids") or "")
    return await run_in_threadpool(_score, request, db, principal, model_id, raw)


@router.get("/models/{model_id}")
def model_page(
    model_id: RowId,
    request: Request,
    db: DbSession,
    task: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
) -> Response:
    """A model version: how it was trained and on what, its evaluation beside the labelers'
    own agreement, and its ranking of held-out tasks beside the humans'."""
    model: ModelVersion = api.model_or_404(db, model_id)
    task_ids = training.scored_task_ids(model)
    shown = [task] if task else task_ids[:TASKS_SHOWN]
    comparisons = [c for t in shown if (c := training.compare_task(db, model, t)) is not None]
    context = {
        "model": model,
        "metrics": model.metrics or {},
        "comparisons": comparisons,
        "scored": len(task_ids),
        "one_task": task,
        "win": win_rates(db, [model.id]).get(model.id),  # a policy's audits against its parent
        "location": registry.location(request.app.state.settings.data_dir, model.path),
    }
    return render(request, MODEL_TEMPLATE, context, db=db)


# --- the model registry and generation jobs ------------------------------------------------------

MODELS_TEMPLATE = "jobs/models.html"
GENERATE_TEMPLATE = "jobs/generate.html"
GENERATE_FIELDS = (
    ("temperature", "Temperature", "number", "0 decodes greedily (only for one completion)."),
    ("top_p", "Top-p", "number", "Nucleus sampling: 1 keeps every token."),
    ("max_new_tokens", "Max new tokens", "number", "A completion stops at EOS or here."),
    ("max_prompts", "Number of prompts", "number", "Empty: every prompt that lacks completions."),
    ("batch_size", "Prompts per batch", "number", ""),
    ("seed", "Seed", "number", ""),
)
ENDPOINT_FIELDS = ("base_url", "model", "api", "api_key_env")


def models_context(db: Any, principal: Any, form: dict[str, Any], error: str | None = None):
    found = registry.list_versions(db)
    return {
        "versions": found,
        "parents": registry.model_names(db, {m.parent_id for m in found if m.parent_id}),
        "is_admin": principal.user.role == Role.admin,
        "form": form,
        "error": error,
    }


@router.get("/models")
def models_page(request: Request, db: DbSession, principal: CurrentPrincipal) -> Response:
    """Every model version of every kind; admins register models trained elsewhere here."""
    context = models_context(db, principal, {"kind": "policy"})
    return render(request, MODELS_TEMPLATE, context, db=db)


def _register(request: Request, db: Any, principal: Any, form: dict[str, Any]) -> Response:
    try:
        parent = int(form["parent_id"]) if form.get("parent_id") else None
        model = registry.register(
            db,
            name=form.get("name", ""),
            path=form.get("path", ""),
            kind=form.get("kind") or "policy",
            algorithm=form.get("algorithm") or None,
            parent_id=parent,
            data_dir=request.app.state.settings.data_dir,
            actor_id=principal.user.id,
        )
    except (registry.RegistryError, ValueError) as error:
        db.rollback()
        message = str(error) if isinstance(error, registry.RegistryError) else "parent: a number"
        context = models_context(db, principal, form, message)
        return render(request, MODELS_TEMPLATE, context, status_code=422, db=db)
    flash(db, principal, f"Registered model version #{model.id}: {model.name}.")
    db.commit()
    return RedirectResponse("/models", status_code=303)


@router.post("/models", dependencies=[Depends(require_roles(Role.admin))])
async def register_model(request: Request, db: DbSession, principal: CurrentPrincipal) -> Response:
    """Register a model folder or hub id as a version (admins); a bad field shows the form again."""
    raw = await request.form()
    form = {key: str(value).strip() for key, value in raw.items() if key != "csrf_token"}
    return await run_in_threadpool(_register, request, db, principal, form)


def generate_defaults(campaign: str | None, model: int | None) -> dict[str, Any]:
    defaults = GenerateJobSpec.model_fields
    form = {name: defaults[name].default for name, *_ in GENERATE_FIELDS}
    form |= {name: defaults[name].default for name in generation.LINKED}
    return form | {"campaign": campaign or "", "model_id": model, "source": "model", "api": "chat"}


def generate_context(db: Any, form: dict[str, Any], error: str | None = None) -> dict[str, Any]:
    due = None
    found = campaigns.get_by_slug(db, form.get("campaign") or "")
    if found is not None and form.get("source") == "model" and form.get("model_id"):
        try:
            spec = GenerateJobSpec(campaign=found.slug, model_id=int(form["model_id"]))
            due = len(registry.due_prompts(db, found, spec))
        except ValueError:
            due = None
    return {
        "form": form,
        "error": error,
        "campaign_list": campaigns.list_campaigns(db),
        "policies": registry.list_versions(db, kind="policy"),
        "rewards": registry.list_versions(db, kind="reward"),
        "fields": GENERATE_FIELDS,
        "due": due,
        "per_task": registry.per_task(found) if found is not None else None,
    }


def _number(text: str | None) -> int | None:
    """A row id from a form field's text, or None (ASCII digits only: "²" is a digit too)."""
    digits = (text or "").strip()
    if not (digits.isascii() and digits.isdigit()):
        return None
    return int(digits) if 0 < int(digits) <= MAX_ID else None


@router.get("/generate")
def generate_form(
    request: Request,
    db: DbSession,
    campaign: Annotated[str | None, Query()] = None,
    model: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    model_id: Annotated[str | None, Query()] = None,
    source: Annotated[str | None, Query()] = None,
) -> Response:
    """The form that queues a generation job: a campaign, a policy version or an endpoint,
    and how to sample; `?model=ID` fills in that version's campaign, sampling settings and
    links (reward model, reference, audits). htmx, for the selects (`model_id`, `source`:
    the form's): the count of prompts that lack completions, or with `HX-Target:
    generate-panel` the whole form refilled from the chosen version."""
    chosen = model or _number(model_id)
    version = db.get(ModelVersion, chosen) if chosen else None
    if version is not None and campaign is None and version.campaign_id:
        campaign = campaign_slugs(db, {version.campaign_id}).get(version.campaign_id)
    if not is_htmx(request):
        # What the selects show when nothing is asked for, so the count matches them.
        newest = select(Campaign.slug).order_by(Campaign.id.desc()).limit(1)  # as listed
        campaign = campaign or db.scalar(newest)
    found = campaigns.get_by_slug(db, campaign or "")
    if not is_htmx(request) and version is None:
        # The newest policy trained on this campaign, else the newest of all (as the select).
        policies = registry.list_versions(db, kind="policy")
        ours = [m for m in policies if found is not None and m.campaign_id == found.id]
        if policies:
            version = (ours or policies)[0]
            chosen = version.id
    form = generate_defaults(campaign, chosen) | {"source": source or "model"}
    panel = is_htmx(request) and request.headers.get("hx-target") == "generate-panel"
    if is_htmx(request) and not panel:
        return render_block(request, GENERATE_TEMPLATE, "due", generate_context(db, form))
    if version is not None and version.kind == ModelKind.policy and found is not None:
        # A loop's generate options that no longer pass leave the plain defaults.
        with contextlib.suppress(SpecError):
            form |= generation.form_defaults(db, version, found)
    if panel:
        context = generate_context(db, form) | {"refilled": True}
        return render_block(request, GENERATE_TEMPLATE, "panel", context)
    return render(request, GENERATE_TEMPLATE, generate_context(db, form), db=db)


def generate_input(form: dict[str, str]) -> dict[str, Any]:
    """The form as a GenerateJobSpec's input: empty fields keep their defaults."""
    raw: dict[str, Any] = {"campaign": form.get("campaign", "")}
    for name, *_ in GENERATE_FIELDS:
        if form.get(name):
            raw[name] = form[name]
    if form.get("source") == "endpoint":
        endpoint = {
            name: form[f"endpoint_{name}"]
            for name in ENDPOINT_FIELDS
            if form.get(f"endpoint_{name}")
        }
        raw["endpoint"] = endpoint
    elif form.get("model_id"):
        raw["model_id"] = form["model_id"]
        raw |= {name: form[name] for name in generation.LINKED if form.get(name)}
        if not form.get("audit_against_id"):
            raw.pop("audit_share", None)  # no audits: the share means nothing
    return raw


def _already(db: Any, principal: Any, job: Job, spec: GenerateJobSpec) -> Response:
    flash(
        db,
        principal,
        f"Nothing new was queued: job #{job.id} ({job.state.value}) already samples from this "
        f"model for {spec.campaign}; queue another once it has finished.",
        "warning",
    )
    db.commit()
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)


def _generate(request: Request, db: Any, principal: Any, form: dict[str, str]) -> Response:
    raw = generate_input(form)
    try:
        spec = GenerateJobSpec.model_validate(raw)
        job, queued = generation.queue_unless_waiting(db, spec, actor_id=principal.user.id)
    except (SpecError, ValueError) as error:
        db.rollback()
        message = humane_errors(error) if isinstance(error, ValidationError) else str(error)
        context = generate_context(db, form, message)
        return render(request, GENERATE_TEMPLATE, context, status_code=422, db=db)
    if not queued:
        return _already(db, principal, job, spec)
    flash(db, principal, f"Job #{job.id} is queued: a worker will sample the completions.")
    db.commit()
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)


@router.post("/generate")
async def create_generate_job(
    request: Request, db: DbSession, principal: CurrentPrincipal
) -> Response:
    """Queue a generation job from the form; a bad field shows the form again, queues nothing."""
    raw = await request.form()
    form = {key: str(value).strip() for key, value in raw.items() if key != "csrf_token"}
    return await run_in_threadpool(_generate, request, db, principal, form)


def _generate_now(request: Request, db: Any, principal: Any, model_id: int) -> Response:
    model = api.model_or_404(db, model_id)
    campaign = db.get(Campaign, model.campaign_id) if model.campaign_id else None
    try:
        if campaign is None:
            raise SpecError("this policy belongs to no campaign: use Generate completions")
        if model.kind != ModelKind.policy:
            raise SpecError(f"model #{model.id} is a {model.kind.value} model, not a policy")
        spec = generation.version_spec(db, model, campaign)
        job, queued = generation.queue_unless_waiting(db, spec, actor_id=principal.user.id)
    except SpecError as error:
        db.rollback()
        flash(db, principal, f"Nothing was queued: {error}", "error")
        db.commit()
        return RedirectResponse(f"/models/{model_id}", status_code=303)
    if not queued:
        return _already(db, principal, job, spec)
    flash(
        db, principal, f"Job #{job.id} samples completions from {model.name} for {spec.campaign}."
    )
    db.commit()
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)


@router.post("/models/{model_id}/generate")
def generate_now(
    model_id: RowId, request: Request, db: DbSession, principal: CurrentPrincipal
) -> Response:
    """One click: a policy version samples completions for its campaign's prompts that lack
    them, as its run sampled, scored and audited as the loop's generate step would (the form
    at /generate has every setting); an identical job still waiting is shown instead."""
    return _generate_now(request, db, principal, model_id)
