"""Export snapshots: create one (a pending row), build it (files, manifest, dataset card),
or export straight to one file (the CLI).

A snapshot is built in a temporary folder under `PREFLOOP_DATA_DIR/exports` and renamed to
its final folder only when every file is written and checksummed; a failure leaves no
folder and the row in state `failed` with the reason. The data is read in one consistent
transaction (`query.read_session`) as of a high-water mark recorded in the parameters
(`as_of`), so exporting the same parameters again gives the same bytes.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app import __version__
from app.config import Settings
from app.db import Database
from app.exports import formats
from app.exports.models import ExportSnapshot
from app.exports.query import Context, make_context, read_session, resolve_campaigns
from app.exports.schemas import ExportError, ExportParams
from app.exports.writers import Writer, file_digest, open_writer

log = logging.getLogger("prefloop.exports")

PROGRESS_EVERY = 5_000
SPLITS = ("train", "test")
FILE_SUFFIXES = {".parquet": "parquet", ".gz": "jsonl.gz", ".jsonl": "jsonl", ".json": "jsonl"}

FORMAT_DESCRIPTIONS = {
    "trl": "Preference pairs in TRL's format (`prompt`, `chosen`, `rejected`), for reward "
    "modelling (RewardTrainer) and DPO.",
    "rankings": "One row per task: the prompt, every completion, each labeler's raw judgment "
    "(ranking with ties, flags, ratings, display order, time on task, comment, confidence, "
    "guidelines version) and the task's consensus.",
    "soft": "One row per completion pair with the vote counts and a smoothed probability "
    "that `chosen` is better than `rejected`.",
    "sft": "Demonstrations for supervised fine-tuning: responses written by labelers and "
    "imported reference answers.",
}


def exports_root(settings: Settings) -> Path:
    return Path(settings.data_dir) / "exports"


def snapshot_folder(settings: Settings, snapshot: ExportSnapshot) -> Path:
    """Where a (ready) snapshot's files are."""
    return exports_root(settings) / (snapshot.path or f"snapshot-{snapshot.id:06d}")


def create_snapshot(db: Session, params: ExportParams, *, actor_id: int | None) -> ExportSnapshot:
    """Check the campaigns and add a pending snapshot (the caller commits, then builds)."""
    resolve_campaigns(db, params.campaigns)
    snapshot = ExportSnapshot(
        created_by_id=actor_id,
        format=params.format,
        parameters=params.canonical(),
        row_counts={},
        files=[],
        state="pending",
    )
    db.add(snapshot)
    db.flush()
    return snapshot


# --- writing rows ---------------------------------------------------------------------------


def _write_rows(
    ctx: Context,
    writers: dict[str, Writer],
    progress: Callable[[int], None] | None,
) -> dict[str, int]:
    counts = dict.fromkeys(SPLITS, 0)
    total = 0
    for row in formats.rows_for(ctx):
        split = row["split"]
        writers[split].write(row)
        counts[split] += 1
        total += 1
        if progress is not None and total % PROGRESS_EVERY == 0:
            progress(total)
    if progress is not None:
        progress(total)
    return {**counts, "total": total}


def _summary(ctx: Context) -> dict[str, Any]:
    return {
        "labelers": len(ctx.labelers),
        "guidelines_versions": {slug: sorted(v) for slug, v in sorted(ctx.guidelines.items())},
        "campaigns": [
            {
                "slug": c.slug,
                "name": c.name,
                "mode": c.mode,
                "guidelines_version": c.guidelines_version,
            }
            for c in ctx.campaigns
        ],
        "conversational": ctx.conversational,
    }


def file_format_for(output: Path, default: str) -> str:
    """The file format an output path asks for (`.parquet`, `.jsonl.gz`, `.jsonl`)."""
    return FILE_SUFFIXES.get(output.suffix.lower(), default)


def export_to_file(
    database: Database,
    params: ExportParams,
    output: Path,
    settings: Settings,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Export to one file (train and test rows together, told apart by their `split`
    column). The file's suffix decides its format. Written to a temporary file beside it and
    renamed at the end: a failure leaves nothing. Returns what a manifest would say."""
    output = Path(output)
    params = params.model_copy(update={"file_format": file_format_for(output, params.file_format)})
    if not output.parent.is_dir():
        raise ExportError(f"no such folder: {output.parent}", 422)
    handle, partial = tempfile.mkstemp(prefix=f".{output.name}.", dir=output.parent)
    os.close(handle)
    temp = Path(partial)
    try:
        with read_session(database) as db:
            ctx = make_context(db, params, settings.secret_key)
            writer = open_writer(temp, params.file_format, formats.schema_for(ctx))
            try:
                counts = _write_rows(ctx, {s: writer for s in SPLITS}, progress)
            except BaseException:
                writer.abort()
                raise
            writer.close()
            summary = _summary(ctx)
            parameters = ctx.params.canonical()
        os.replace(temp, output)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return {
        "file": output.name,
        "bytes": output.stat().st_size,
        "sha256": file_digest(output),
        "row_counts": counts,
        "parameters": parameters,
        "prefloop_version": __version__,
        **summary,
    }


# --- snapshots ------------------------------------------------------------------------------


def build_snapshot(
    database: Database,
    snapshot_id: int,
    settings: Settings,
    progress: Callable[[int], None] | None = None,
) -> ExportSnapshot:
    """Write a pending snapshot's files and mark it ready, or failed (no folder is left).
    Opens its own sessions, so it can run on a background thread."""
    with database.session() as db:
        snapshot = db.get(ExportSnapshot, snapshot_id)
        if snapshot is None:
            raise ExportError(f"no export snapshot {snapshot_id}", 404)
        if snapshot.state == "ready":
            return snapshot
        stored = dict(snapshot.parameters)
        created_by_id, created_at = snapshot.created_by_id, snapshot.created_at
    root = exports_root(settings)
    temp: Path | None = None
    final: Path | None = None
    try:
        params = ExportParams.model_validate(stored)
        root.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f".snapshot-{snapshot_id:06d}-", dir=root))
        extension = params.file_format
        names = {s: f"{s}.{extension}" for s in SPLITS if s == "train" or params.test_fraction}
        with read_session(database) as db:
            ctx = make_context(db, params, settings.secret_key)
            schema = formats.schema_for(ctx)
            writers = {s: open_writer(temp / name, extension, schema) for s, name in names.items()}
            writers.setdefault("test", writers["train"])  # no test split: nothing goes there
            try:
                counts = _write_rows(ctx, writers, progress)
            except BaseException:
                for writer in writers.values():
                    writer.abort()
                raise
            for writer in writers.values():
                writer.close()
            summary = _summary(ctx)
            parameters = ctx.params.canonical()
        files = [_file_entry(temp / name) for name in names.values()]
        quality = _quality_figures(database, params, ctx)
        manifest = {
            "snapshot_id": snapshot_id,
            "created_by_id": created_by_id,
            "created_at": created_at.isoformat(),
            "format": params.format,
            "parameters": parameters,
            "row_counts": counts,
            "prefloop_version": __version__,
            **summary,
            "agreement": quality,
        }
        card = dataset_card(manifest, files)
        (temp / "README.md").write_text(card, encoding="utf-8")
        files.append(_file_entry(temp / "README.md"))
        manifest["files"] = files
        (temp / "manifest.json").write_text(
            json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
            encoding="utf-8",
        )
        manifest_entry = _file_entry(temp / "manifest.json")
        folder_name = f"snapshot-{snapshot_id:06d}"
        final = root / folder_name
        if final.exists():  # left by an attempt whose row update failed
            shutil.rmtree(final)
        os.replace(temp, final)
        temp = None
        with database.session() as db:
            snapshot = db.get(ExportSnapshot, snapshot_id)
            snapshot.parameters = parameters
            snapshot.row_counts = counts
            snapshot.files = [*files, manifest_entry]
            snapshot.manifest_sha256 = manifest_entry["sha256"]
            snapshot.path = folder_name
            snapshot.state = "ready"
            snapshot.error = None
            db.commit()
            return snapshot
    except Exception as exc:
        log.exception("export snapshot %s failed", snapshot_id)
        for leftover in (temp, final):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
        message = str(exc) if isinstance(exc, ExportError) else f"{type(exc).__name__}: {exc}"
        with database.session() as db:
            snapshot = db.get(ExportSnapshot, snapshot_id)
            snapshot.state = "failed"
            snapshot.error = message[:2000]
            snapshot.path = None
            db.commit()
            return snapshot


def _file_entry(path: Path) -> dict[str, Any]:
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": file_digest(path)}


def quality_reports(
    database: Database, params: ExportParams, campaigns: list[Any]
) -> dict[str, dict[str, Any]]:
    """Each ranked campaign's quality report on the export's date range and exclusions (the
    stored report when it is fresh), by slug. A campaign whose report fails is left out: the
    figures describe the data, they never stop an export or a training job."""
    from app.campaigns.models import Campaign
    from app.quality.service import Filters, cached_report

    until = (
        dt.datetime.combine(params.until, dt.time(), tzinfo=dt.UTC) + dt.timedelta(days=1)
        if params.until
        else None
    )
    since = dt.datetime.combine(params.since, dt.time(), tzinfo=dt.UTC) if params.since else None
    filters = Filters(since=since, until=until, include_excluded=params.include_excluded)
    out: dict[str, dict[str, Any]] = {}
    for info in campaigns:
        if info.mode == "demonstration":
            continue
        try:
            with database.session() as db:
                campaign = db.get(Campaign, info.id)
                stored = cached_report(db, campaign, filters)
                db.commit()
            if stored is not None:
                out[info.slug] = stored.report
        except Exception:
            log.exception("the quality report of %s could not be computed", info.slug)
    return out


def _quality_figures(database: Database, params: ExportParams, ctx: Context) -> dict[str, Any]:
    """Each campaign's agreement figures, for the manifest and the dataset card."""
    reports = quality_reports(database, params, ctx.campaigns)
    return {slug: report["agreement"] for slug, report in reports.items()}


# --- the dataset card -----------------------------------------------------------------------


def _figure(value: Any) -> str:
    if not isinstance(value, dict) or value.get("value") is None:
        return "n/a"
    text = f"{value['value']:.3f}"
    low, high = (value.get("interval") or [None, None])[:2]
    if low is not None and high is not None:
        text += f" (95 % interval {low:.3f}-{high:.3f})"
    return text


def dataset_card(manifest: dict[str, Any], files: list[dict[str, Any]]) -> str:
    """README.md: a Hugging Face dataset card. No usernames or emails: annotators are
    pseudonyms and the creator is an id."""
    p = manifest["parameters"]
    counts = manifest["row_counts"]
    data_files = [f for f in files if f["name"].split(".")[0] in SPLITS]
    lines = [
        "---",
        "license:  # fill in: the licence this dataset is released under",
        f"pretty_name: prefloop export {manifest['snapshot_id']} ({manifest['format']})",
        "configs:",
        "- config_name: default",
        "  data_files:",
    ]
    for f in data_files:
        lines += [f"  - split: {f['name'].split('.')[0]}", f"    path: {f['name']}"]
    campaigns = ", ".join(
        f"`{c['slug']}` ({c['name']}, {c['mode']})" for c in manifest["campaigns"]
    )
    lines += [
        "---",
        "",
        f"# prefloop export snapshot {manifest['snapshot_id']}",
        "",
        FORMAT_DESCRIPTIONS[manifest["format"]],
        "",
        f"- Campaigns: {campaigns}",
        f"- Created: {manifest['created_at']} by user id {manifest['created_by_id']}",
        f"- prefloop {manifest['prefloop_version']}; read as of {json.dumps(p['as_of'])}",
        f"- Rows: {counts['total']:,} (train {counts['train']:,}, test {counts['test']:,})",
        f"- Labelers: {manifest['labelers']}",
        "",
        "## Files",
        "",
        "| File | Bytes | SHA-256 |",
        "| --- | --- | --- |",
    ]
    lines += [f"| `{f['name']}` | {f['bytes']:,} | `{f['sha256']}` |" for f in data_files]
    lines += ["", "`manifest.json` has the parameters, counts and checksums in full.", ""]
    lines += ["## Guidelines", ""]
    versions = manifest["guidelines_versions"]
    for c in manifest["campaigns"]:
        used = ", ".join(str(v) for v in versions.get(c["slug"], [])) or "none"
        lines.append(
            f"- `{c['slug']}`: current version {c['guidelines_version']}; versions in this data: {used}"
        )
    lines += ["", "## Agreement between labelers", ""]
    agreement = manifest.get("agreement") or {}
    if not agreement:
        lines.append("No agreement figures (no ranked judgments, or not computed).")
    for slug, figures in agreement.items():
        lines += [
            f"- `{slug}`: {figures.get('tasks_compared', 0):,} tasks judged by two or more "
            f"labelers; pairwise agreement {_figure(figures.get('pairwise_agreement'))} "
            "(InstructGPT reports 0.726 +/- 0.015); Kendall's tau "
            f"{_figure(figures.get('kendall_tau'))}; Krippendorff's alpha "
            f"{_figure(figures.get('krippendorff_alpha'))}; Fleiss' kappa "
            f"{_figure(figures.get('fleiss_kappa'))}.",
        ]
    lines += [
        "",
        "Figures from prefloop's quality report on the same campaigns, date range and "
        "exclusions (not narrowed by the other filters).",
        "",
        "## Filters",
        "",
    ]
    shown = {k: v for k, v in p.items() if k not in ("campaigns", "as_of")}
    lines += [f"- `{k}`: `{json.dumps(v)}`" for k, v in shown.items()]
    lines += [
        "",
        "## Split",
        "",
        f"Prompts go to the test split when sha256(seed:prompt content hash) falls below "
        f"{p['test_fraction']} (seed {p['seed']}): every row of a prompt is on one side, and "
        "the same prompt text lands on the same side in any campaign.",
        "",
        "## Annotators",
        "",
        (
            "Annotator ids are stable pseudonyms: an HMAC of the user id under the server's "
            "secret key, the same in every export from this server."
            if p["pseudonyms"] == "stable"
            else "Annotator ids are pseudonyms for this export only: an HMAC of the user id "
            "under the server's secret key, salted with the export's parameters."
        ),
        " No usernames or email addresses are included. Imported pairs have no annotator.",
        "",
    ]
    if manifest["format"] == "soft":
        lines += [
            "## Soft labels",
            "",
            f"p_chosen = (wins + {p['soft_prior']}) / (votes + 2 * {p['soft_prior']}); "
            + (
                "a tie counts half a win for each side."
                if p["ties"] == "margin0"
                else "tie votes are counted in votes_tie but left out of p_chosen."
            ),
            "",
        ]
    lines += ["## Licence", "", "Left for the dataset's owner to fill in (front matter).", ""]
    return "\n".join(lines)
