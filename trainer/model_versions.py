"""Publishing what a job trained: the finished run's folder becomes a model version.

The folder moves to `PREFLOOP_DATA_DIR/models/<prefix>-<job>-<attempt>`, named for this
attempt, so a late worker's copy can never land on a recorded version's files; the
`ModelVersion` row is written in the transaction that marks the job succeeded
(`ctx.on_complete`), so a worker that lost its lease records nothing.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app.jobs.models import ModelKind, ModelVersion


def finite(values: dict[str, Any]) -> dict[str, Any]:
    """NaN and infinities as None: JSON has no NaN (and PostgreSQL's jsonb refuses it)."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()
    }


def publish(
    ctx: Any,
    work_dir: Path,
    prefix: str,
    *,
    name: str,
    kind: ModelKind,
    algorithm: str,
    metrics: dict[str, Any],
    parent_id: int | None = None,
) -> Path:
    """Move the finished run (its resumable checkpoint removed) to its version folder and
    record the version with the job's success. Returns the folder."""
    data_dir = Path(ctx.settings.data_dir)
    models = data_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    folder = models / f"{prefix}-{ctx.job_id:06d}-{ctx.attempt}"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.rmtree(work_dir / "checkpoint", ignore_errors=True)
    os.replace(work_dir, folder)

    def record(db: Session) -> None:
        db.add(
            ModelVersion(
                name=name,
                kind=kind,
                path=str(folder.relative_to(data_dir)),
                parent_id=parent_id,
                campaign_id=ctx.campaign_id,
                job_id=ctx.job_id,
                algorithm=algorithm,
                metrics=metrics,
            )
        )

    ctx.on_complete(record)
    return folder
