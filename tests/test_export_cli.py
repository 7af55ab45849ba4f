"""`prefloop export`, run as a real process against a real database (SQLite and
PostgreSQL): every format and file type, the REPEATABLE READ path, bad input."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq

from app.campaigns.models import CampaignMode
from app.db import Database
from app.exports import service
from app.exports.schemas import ExportParams
from tests.conftest import make_settings
from tests.factories import make_campaign, make_labeler, make_task
from tests.test_cli import cli_env, run_cli, run_cli_together
from tests.test_exports import judge


def seed(url: str) -> None:
    """A rank campaign with two labelers on five tasks, and a demonstration campaign."""
    database = Database(url)
    try:
        with database.session() as db:
            rank = make_campaign(db, slug="cli-rank", k=3, overlap=2)
            demo = make_campaign(
                db, slug="cli-demo", k=2, overlap=1, mode=CampaignMode.demonstration
            )
            first, second = make_labeler(db, "first-person"), make_labeler(db, "second-person")
            for n in range(5):
                task = make_task(db, rank, completions=[f"good {n}", f"fair {n}", f"bad {n}"])
                order = [[item.completion_id] for item in task.items]
                judge(db, first, task, rank, ranking=order)
                judge(db, second, task, rank, ranking=order if n % 2 else order[::-1])
            haiku = make_task(db, demo, prompt="Write a haiku", completions=[])
            judge(db, first, haiku, demo, demonstration="Autumn moonlight")
            db.commit()
    finally:
        database.dispose()


def lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    return [json.loads(line) for line in data.decode().splitlines()]


def test_prefloop_export_end_to_end(fresh_database_url: str, tmp_path: Path) -> None:
    seed(fresh_database_url)
    env = cli_env(fresh_database_url, tmp_path / "data", secret_key="s" * 48)
    out = tmp_path / "out"
    out.mkdir()
    trl, rankings, soft, sft = run_cli_together(
        ("export", "--campaign", "cli-rank", "--format", "trl", "--output", str(out / "trl.jsonl")),
        ("export", "--campaign", "cli-rank", "--format", "rankings", "--output",
         str(out / "rankings.parquet"), "--test-fraction", "0.4", "--seed", "2"),
        ("export", "--campaign", "cli-rank", "--format", "soft", "--output",
         str(out / "soft.jsonl.gz"), "--ties", "margin0", "--pseudonyms", "stable"),
        ("export", "--campaign", "cli-demo", "--format", "sft", "--output", str(out / "sft.jsonl"),
         "--source", "human"),
        env=env,
        cwd=tmp_path,
    )  # fmt: skip
    for done in (trl, rankings, soft, sft):
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
    assert "wrote 30 trl rows (train 30, test 0)" in trl.stdout  # 5 tasks x 2 labelers x 3
    rows = lines(out / "trl.jsonl")
    assert len(rows) == 30 and {"prompt", "chosen", "rejected", "annotator"} <= rows[0].keys()
    sha = trl.stdout.split("sha256 ")[1].split()[0]
    assert sha == hashlib.sha256((out / "trl.jsonl").read_bytes()).hexdigest()
    table = pq.read_table(out / "rankings.parquet").to_pylist()
    assert len(table) == 5 and {r["split"] for r in table} <= {"train", "test"}
    assert len(lines(out / "soft.jsonl.gz")) == 15
    assert [(r["prompt"], r["completion"]) for r in lines(out / "sft.jsonl")] == [
        ("Write a haiku", "Autumn moonlight")
    ]
    everything = b"".join(p.read_bytes() for p in out.iterdir())
    assert b"person" not in everything and b"person" not in gzip.decompress(
        (out / "soft.jsonl.gz").read_bytes()
    )
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left

    # The same command again gives the same bytes (same data, same parameters).
    again = run_cli(
        "export", "--campaign", "cli-rank", "--format", "trl", "--output", str(out / "again.jsonl"),
        env=env, cwd=tmp_path,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert (out / "again.jsonl").read_bytes() == (out / "trl.jsonl").read_bytes()


def test_prefloop_export_bad_input(fresh_database_url: str, tmp_path: Path) -> None:
    seed(fresh_database_url)
    env = cli_env(fresh_database_url, tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    target = str(out / "x.jsonl")
    unknown, bad_format, bad_filter, bad_suffix, bad_dates, no_folder = run_cli_together(
        ("export", "--campaign", "nope", "--format", "trl", "--output", target),
        ("export", "--campaign", "cli-rank", "--format", "csv", "--output", target),
        ("export", "--campaign", "cli-rank", "--format", "trl", "--output", target,
         "--min-agreement", "1.5"),
        ("export", "--campaign", "cli-rank", "--format", "trl", "--output", str(out / "x.csv")),
        ("export", "--campaign", "cli-rank", "--format", "trl", "--output", target,
         "--since", "2026-02-01", "--until", "2026-01-01"),
        ("export", "--campaign", "cli-rank", "--format", "trl", "--output",
         str(out / "missing" / "x.jsonl")),
        env=env,
        cwd=tmp_path,
    )  # fmt: skip
    assert unknown.returncode == 1 and "no campaign 'nope'" in unknown.stderr
    assert bad_format.returncode == 2 and "format" in bad_format.stderr
    assert bad_filter.returncode == 2 and "min_agreement" in bad_filter.stderr
    assert bad_suffix.returncode == 2 and ".parquet" in bad_suffix.stderr
    assert bad_dates.returncode == 2 and "since must be on or before until" in bad_dates.stderr
    assert no_folder.returncode == 2 and "no such folder" in no_folder.stderr
    for done in (unknown, bad_format, bad_filter, bad_suffix, bad_dates, no_folder):
        assert "Traceback" not in done.stderr and done.stderr.startswith("error: ")
    assert list(out.iterdir()) == []  # nothing half-written


def test_snapshot_on_a_real_database(fresh_database_url: str, tmp_path: Path) -> None:
    """build_snapshot through its own REPEATABLE READ (PostgreSQL) or deferred snapshot
    (SQLite) connection, as the web app's background thread runs it."""
    seed(fresh_database_url)
    settings = make_settings(database_url=fresh_database_url, data_dir=tmp_path / "data")
    database = Database(fresh_database_url, statement_timeout_ms=30_000)
    try:
        with database.session() as db:
            snapshot = service.create_snapshot(
                db,
                ExportParams(campaigns=["cli-rank"], format="trl", file_format="jsonl.gz"),
                actor_id=None,
            )
            db.commit()
        built = service.build_snapshot(database, snapshot.id, settings)
        assert built.state == "ready", built.error
        folder = service.snapshot_folder(settings, built)
        assert len(lines(folder / "train.jsonl.gz")) == built.row_counts["total"] == 30
        output = tmp_path / "same.jsonl.gz"
        service.export_to_file(
            database, ExportParams.model_validate(built.parameters), output, settings
        )
        assert output.read_bytes() == (folder / "train.jsonl.gz").read_bytes()
    finally:
        database.dispose()
