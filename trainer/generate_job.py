"""The `generate` job: a policy samples K completions for each prompt of a campaign that lacks
them, and each prompt's K become a task for the labelers.

    prefloop generate --campaign helpful --model 3 --temperature 0.8   # queue it
    prefloop worker --once                                             # run it

1. Which prompts: those of the campaign with no open task and fewer than K completions from
   this generator (`app.jobs.registry.due_prompts`), oldest first, at most `max_prompts`.
   The first attempt writes the list to the job's checkpoint folder; a later attempt takes
   the same list and skips the prompts an earlier one already wrote.
2. Sample in batches of `batch_size` prompts, with a local Hugging Face model
   (`trainer.generate.HFSampler`: left padding, KV cache, chat template, EOS) or an
   OpenAI-compatible endpoint (`trainer.openai_client`). Completions whose content hash
   repeats another of the prompt's (new, or stored before) are dropped and sampled again,
   up to `resample_rounds` times; a prompt still short of K distinct completions gets no
   task (it stays due, and is counted in the result).
3. Each batch is written in one transaction that first checks this attempt still holds the
   job (the row locked): completions with source `model`, the model version, and how they
   were sampled (`generation_params`), then one task per prompt with the campaign's overlap.
   A stopped job keeps the batches it wrote; a worker that lost its lease writes nothing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.campaigns import service as campaigns
from app.jobs import registry
from app.jobs.models import Job, JobState, ModelVersion
from app.jobs.specs import GenerateJobSpec, parse_generate_spec
from app.labeling.models import Completion
from app.loop.audits import add_audit_task, is_audit_prompt, old_sample
from trainer.generate import HFSampler, Prompt, Sampler, sample_distinct, text_hash
from trainer.openai_client import OpenAIClient

PROMPTS_FILE = "prompts.json"


def model_location(data_dir: Path, path: str) -> str:
    """A model version's files: a folder (absolute, or under PREFLOOP_DATA_DIR), or else the
    path itself as a hub id."""
    local = Path(data_dir) / path  # an absolute path stays itself
    return str(local) if local.is_dir() else path


def seed_for(spec: GenerateJobSpec, batch: int, round_number: int, index: int = 0) -> int:
    """A different seed for every batch, re-sampling round and prompt, fixed by the job's seed:
    a re-sampled round must not draw the same samples again."""
    return (spec.seed * 1_000_003 + batch * 10_007 + round_number * 101 + index) % 2**31


class Backend:
    """One way of sampling: make_sampler(batch) -> Sampler, and what each completion records."""

    params: dict[str, Any]

    def make_sampler(self, batch: int) -> Sampler:
        raise NotImplementedError

    def close(self) -> None:
        return None


class LocalBackend(Backend):
    def __init__(self, spec: GenerateJobSpec, location: str, device: str) -> None:
        self.spec = spec
        self.sampler = HFSampler(location, device, max_prompt_tokens=spec.max_prompt_tokens)
        self.params = {
            "path": location,
            "chat_template": self.sampler.chat_template,
            "dtype": "bfloat16" if self.sampler.bf16 else "float32",
        }

    def make_sampler(self, batch: int) -> Sampler:
        spec = self.spec

        def sample(prompts: Sequence[Prompt], n: int, round_number: int) -> Any:
            return self.sampler.sample(
                prompts,
                n,
                temperature=spec.temperature,
                top_p=spec.top_p,
                max_new_tokens=spec.max_new_tokens,
                seed=seed_for(spec, batch, round_number),
            )

        return sample


class EndpointBackend(Backend):
    def __init__(self, spec: GenerateJobSpec, log: Any) -> None:
        endpoint = spec.endpoint
        assert endpoint is not None
        key = None
        if endpoint.api_key_env:
            key = os.environ.get(endpoint.api_key_env)
            if not key:
                raise ValueError(
                    f"endpoint.api_key_env: the variable {endpoint.api_key_env} is not set "
                    "on this worker"
                )
        self.spec = spec
        self.client = OpenAIClient(
            endpoint.base_url,
            endpoint.model,
            api=endpoint.api,
            api_key=key,
            timeout=endpoint.timeout_seconds,
            max_retries=endpoint.max_retries,
            log=log.warning,
        )
        self.pool = ThreadPoolExecutor(max_workers=endpoint.concurrency)
        self.params = {"api": endpoint.api}

    def make_sampler(self, batch: int) -> Sampler:
        spec = self.spec

        def sample(prompts: Sequence[Prompt], n: int, round_number: int) -> Any:
            futures = [
                self.pool.submit(
                    self.client.sample,
                    prompt,
                    n,
                    temperature=spec.temperature,
                    top_p=spec.top_p,
                    max_tokens=spec.max_new_tokens,
                    seed=seed_for(spec, batch, round_number, index),
                )
                for index, prompt in enumerate(prompts)
            ]
            return [future.result() for future in futures]

        return sample

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.client.close()


def _held(db: Any, ctx: Any) -> bool:
    """Lock the job row if this attempt still holds it (else another worker took it over)."""
    found = db.scalar(
        select(Job.id)
        .where(
            Job.id == ctx.job_id,
            Job.worker_id == ctx.worker_id,
            Job.attempt == ctx.attempt,
            Job.state == JobState.running,
        )
        .with_for_update()
    )
    return found is not None


def plan(ctx: Any, spec: GenerateJobSpec) -> tuple[list[int], int]:
    """The prompts this job samples for (fixed by its first attempt) that are still due, and
    how many the plan held in all."""
    mark = Path(ctx.checkpoint_dir) / PROMPTS_FILE
    with ctx.database.session() as db:
        campaign = campaigns.get_by_slug(db, spec.campaign)
        if campaign is None:
            raise ValueError(f"there is no campaign '{spec.campaign}'")
        if mark.is_file():
            planned = json.loads(mark.read_text())
            due = set(
                registry.due_prompts(db, campaign, spec.model_copy(update={"max_prompts": None}))
            )
            return [pid for pid in planned if pid in due], len(planned)
        planned = registry.due_prompts(db, campaign, spec)
    Path(ctx.checkpoint_dir).mkdir(parents=True, exist_ok=True)
    mark.write_text(json.dumps(planned))
    return planned, len(planned)


def run(ctx: Any) -> dict[str, Any]:
    """The worker's entry point for `generate` jobs (ctx: trainer.worker.JobContext)."""
    spec = parse_generate_spec(ctx.config)
    ctx.report(0.0, "finding the prompts that lack completions")
    todo, planned = plan(ctx, spec)
    with ctx.database.session() as db:
        campaign = campaigns.get_by_slug(db, spec.campaign)
        assert campaign is not None
        k = registry.per_task(campaign)
        location = None
        if spec.model_id is not None:
            location = version_location(db, ctx, spec.model_id)
        # Audits, scoring and KL: the other models' folders (the spec allows them with a
        # local model only).
        others = {
            name: version_location(db, ctx, getattr(spec, name))
            for name in ("audit_against_id", "reward_model_id", "reference_id")
            if getattr(spec, name) is not None
        }
        db.expunge(campaign)
    ctx.log.info(
        "%s prompt(s) planned, %s still to sample, K = %s, %s",
        planned,
        len(todo),
        k,
        f"model {location}" if location else f"endpoint {spec.endpoint.base_url}",
    )
    totals = {
        "tasks_created": 0,
        "completions": 0,
        "sampled": 0,
        "duplicates_resampled": 0,
        "audit_tasks": 0,
    }
    short: list[int] = []
    if not todo:
        ctx.report(1.0, "no prompt lacks completions")
        result = _result(spec, planned, 0, totals, short, 0.0)
        if not planned:  # the job page says why, and what to do
            with ctx.database.session() as db:
                result["none_due"] = registry.why_none_due(db, campaign, spec)
        return result
    ctx.report(0.01, f"loading {'the model' if location else 'the endpoint client'}")
    backend: Backend = (
        LocalBackend(spec, location, ctx.device) if location else EndpointBackend(spec, ctx.log)
    )
    audits = Audits(spec, ctx, backend, others) if location else None
    params = {
        **registry.generator_key(spec),
        **spec.sampling(),
        **backend.params,
        "job_id": ctx.job_id,
    }
    done = planned - len(todo)
    first_step = done // spec.batch_size  # a resumed job's steps carry on from the last one's
    seconds = 0.0
    try:
        for batch_number, start in enumerate(range(0, len(todo), spec.batch_size)):
            ctx.check_stop()
            batch = todo[start : start + spec.batch_size]
            with ctx.database.session() as db:
                contents = registry.prompt_contents(db, batch)
                existing = registry.existing_hashes(db, batch)
            batch = [pid for pid in batch if pid in contents]
            audited = [pid for pid in batch if audits is not None and audits.wanted(pid)]
            plain = [pid for pid in batch if pid not in audited]
            prompts = [contents[pid] for pid in plain]
            step = first_step + batch_number + 1
            began = time.perf_counter()
            found = sample_distinct(
                backend.make_sampler(step),
                prompts,
                k,
                existing=[existing[pid] for pid in plain],
                max_rounds=spec.resample_rounds,
            )
            pairs = audits.sample(step, audited, contents, existing) if audits and audited else []
            seconds += time.perf_counter() - began
            measured = audits.measure(prompts, found.completions) if audits else None
            ctx.check_stop()  # a stopped job does not write a batch sampled after the stop
            written = _write(ctx, spec, campaign, plain, found.completions, k, params, measured)
            audit_written = audits.write(campaign, pairs, params) if pairs else 0
            totals["tasks_created"] += written + audit_written
            totals["audit_tasks"] += audit_written
            totals["completions"] += written * k + audit_written * 2
            totals["sampled"] += found.sampled
            totals["duplicates_resampled"] += found.duplicates
            short += [plain[i] for i in found.short]
            short += [p.prompt_id for p in pairs if p.new is None or p.old is None]
            done += len(batch)
            rate = found.sampled / found.seconds if found.seconds else 0.0
            ctx.metrics(
                step,
                {
                    "generate/completions_per_second": rate,
                    "generate/duplicates_resampled": totals["duplicates_resampled"],
                    "generate/tasks_created": totals["tasks_created"],
                    "generate/short_prompts": len(short),
                },
            )
            ctx.report(
                0.02 + 0.98 * done / planned,
                f"{done} of {planned} prompts, {totals['tasks_created']} tasks, "
                f"{rate:.1f} completions/s",
            )
            ctx.log.info(
                "batch %s: %s prompts, %s sampled, %s duplicates re-sampled, %s short, %.2f s",
                step,
                len(batch),
                found.sampled,
                found.duplicates,
                len(found.short),
                found.seconds,
            )
    finally:
        backend.close()
    if audits is not None:
        totals["sampled"] += audits.sampled
    ctx.report(1.0, "done")
    return _result(spec, planned, done, totals, short, seconds)


def _write(
    ctx: Any,
    spec: GenerateJobSpec,
    campaign: Any,
    batch: list[int],
    completions: list[list[tuple[str, str]]],
    k: int,
    params: dict[str, Any],
    measured: list[list[dict[str, Any]]] | None = None,
) -> int:
    """One batch's completions and tasks, in one fenced transaction; how many tasks.
    `measured`: per prompt, per completion, what the evaluator measured (stored with it)."""
    written = 0
    with ctx.database.session() as db:
        if not _held(db, ctx):
            raise RuntimeError("this attempt no longer holds the job; nothing written")
        for index, (prompt_id, group) in enumerate(zip(batch, completions, strict=True)):
            if len(group) < k:
                continue
            extra = measured[index] if measured else [{} for _ in group]
            registry.add_generated_task(
                db,
                campaign=campaign,
                prompt_id=prompt_id,
                texts=[text for text, _ in group],
                params=[
                    {**params, "finish_reason": reason, **more}
                    for (_, reason), more in zip(group, extra, strict=True)
                ],
                model_version_id=spec.model_id,
                priority=spec.task_priority,
            )
            written += 1
        db.commit()
    return written


def version_location(db: Any, ctx: Any, model_id: int) -> str:
    model = db.get(ModelVersion, model_id)
    if model is None:
        raise ValueError(f"there is no model version {model_id}")
    return model_location(ctx.settings.data_dir, model.path)


@dataclass
class AuditPlan:
    """One audited prompt: the new policy's sample and the old version's (a stored
    completion's id and text, or a fresh sample), and the reward model's scores."""

    prompt_id: int
    new: tuple[str, str] | None = None  # (text, finish_reason)
    old_id: int | None = None  # a stored completion of the old version
    old: tuple[str, str] | None = None  # its (text, finish reason), stored or fresh
    measured: dict[str, Any] = field(default_factory=dict)  # of the new sample
    old_score: float | None = None


class Audits:
    """The generation job's audits and measurements (local models only): which prompts get
    an audit pair (a seeded share), sampling the new and the old version for them, and each
    new sample's reward-model score and log-ratio to the reference."""

    def __init__(
        self, spec: GenerateJobSpec, ctx: Any, backend: Backend, others: dict[str, str]
    ) -> None:
        self.spec, self.ctx, self.backend = spec, ctx, backend
        self.others = others
        self.old_backend: LocalBackend | None = None  # loaded when a prompt needs it
        self.sampled = 0  # samples drawn for audits, new and old
        self.evaluator = None
        if spec.reward_model_id is not None or spec.reference_id is not None:
            from trainer.policy_eval import SampleEvaluator

            assert isinstance(backend, LocalBackend)
            self.evaluator = SampleEvaluator(
                backend.sampler,
                reward_model=others.get("reward_model_id"),
                reference=others.get("reference_id"),
                temperature=spec.temperature,
                batch_size=spec.batch_size,
            )

    def wanted(self, prompt_id: int) -> bool:
        return self.spec.audit_against_id is not None and is_audit_prompt(
            prompt_id, self.spec.audit_share, self.spec.seed
        )

    def measure(
        self, prompts: Sequence[Prompt], groups: Sequence[Sequence[tuple[str, str]]]
    ) -> list[list[dict[str, Any]]] | None:
        """Per prompt, per sample: reward, log_ratio, tokens (None without an evaluator)."""
        if self.evaluator is None:
            return None
        if not any(groups):  # every prompt of the batch came up short: nothing to measure
            return [[] for _ in groups]
        flat = [
            (p, text, reason) for p, g in zip(prompts, groups, strict=True) for text, reason in g
        ]
        values = self.evaluator.evaluate(
            [p for p, _, _ in flat], [t for _, t, _ in flat], [r == "stop" for _, _, r in flat]
        )
        extra = {
            "reward_model_id": self.spec.reward_model_id,
            "reference_id": self.spec.reference_id,
        }
        out, position = [], 0
        for group in groups:
            out.append([{**values[position + i], **extra} for i in range(len(group))])
            position += len(group)
        return out

    def sample(
        self,
        step: int,
        prompt_ids: list[int],
        contents: dict[int, Prompt],
        existing: dict[int, set[str]],
    ) -> list[AuditPlan]:
        """The new sample of each audited prompt, and the old version's: a completion it
        already wrote (seeded pick) or, when it has none, a fresh one from it."""
        spec = self.spec
        assert spec.audit_against_id is not None
        plans = [AuditPlan(pid) for pid in prompt_ids]
        with self.ctx.database.session() as db:
            for plan in plans:
                stored = old_sample(db, plan.prompt_id, spec.audit_against_id, spec.seed)
                if stored is not None:
                    plan.old_id, plan.old = stored.id, (stored.text, "stored")
        need_old = [p for p in plans if p.old is None]
        if need_old:
            if self.old_backend is None:
                self.old_backend = LocalBackend(
                    spec, self.others["audit_against_id"], self.ctx.device
                )
            fresh = sample_distinct(
                self.old_backend.make_sampler(step),
                [contents[p.prompt_id] for p in need_old],
                1,
                existing=[existing[p.prompt_id] for p in need_old],
                max_rounds=spec.resample_rounds,
            )
            for plan, group in zip(need_old, fresh.completions, strict=True):
                plan.old = group[0] if group else None
            self.sampled += fresh.sampled
        # The new sample must differ from the old one (a tie by identity says nothing).
        new = sample_distinct(
            self.backend.make_sampler(step),
            [contents[p.prompt_id] for p in plans],
            1,
            existing=[
                existing[p.prompt_id] | ({text_hash(p.old[0])} if p.old else set()) for p in plans
            ],
            max_rounds=spec.resample_rounds,
        )
        for plan, group in zip(plans, new.completions, strict=True):
            plan.new = group[0] if group else None
        self.sampled += new.sampled
        ready = [p for p in plans if p.new is not None and p.old is not None]
        if self.evaluator is not None and ready:
            prompts = [contents[p.prompt_id] for p in ready]
            measured = self.measure(prompts, [[p.new] for p in ready]) or []
            old_scores = self.evaluator.rewards(prompts, [p.old[0] for p in ready])
            for plan, values, score in zip(ready, measured, old_scores, strict=True):
                plan.measured, plan.old_score = values[0], score
        return plans

    def write(self, campaign: Any, plans: list[AuditPlan], params: dict[str, Any]) -> int:
        """The audit tasks of one batch, in one fenced transaction; how many."""
        spec, ctx = self.spec, self.ctx
        assert spec.model_id is not None and spec.audit_against_id is not None
        old_params = {**params, "model_id": spec.audit_against_id, "audit": True}
        written = 0
        with ctx.database.session() as db:
            if not _held(db, ctx):
                raise RuntimeError("this attempt no longer holds the job; nothing written")
            for plan in plans:
                if plan.new is None or plan.old is None:
                    continue
                text, reason = plan.new
                old: Any = (
                    db.get_one(Completion, plan.old_id)
                    if plan.old_id is not None
                    else (plan.old[0], {**old_params, "finish_reason": plan.old[1]})
                )
                add_audit_task(
                    db,
                    campaign=campaign,
                    prompt_id=plan.prompt_id,
                    new=(text, {**params, "finish_reason": reason, "audit": True, **plan.measured}),
                    new_model_id=spec.model_id,
                    old=old,
                    old_model_id=spec.audit_against_id,
                    job_id=ctx.job_id,
                    reward_model_id=spec.reward_model_id,
                    scores=(plan.measured.get("reward"), plan.old_score),
                    seed=spec.seed,
                    priority=spec.task_priority,
                )
                written += 1
            db.commit()
        return written


def _result(
    spec: GenerateJobSpec,
    planned: int,
    done: int,
    totals: dict[str, int],
    short: list[int],
    seconds: float,
) -> dict[str, Any]:
    return {
        "campaign": spec.campaign,
        "model_id": spec.model_id,
        "endpoint": spec.endpoint.model_dump(include={"base_url", "model", "api"})
        if spec.endpoint
        else None,
        "prompts_planned": planned,
        "prompts_done": done,
        **totals,
        "short_prompts": short[:100],
        "short_prompt_count": len(short),
        "completions_per_second": round(totals["sampled"] / seconds, 3) if seconds else 0.0,
    }
