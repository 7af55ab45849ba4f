# ruff: noqa: S311, S603
"""Exports at 1,000,000 comparisons: TRL preference pairs to Parquet and to JSON Lines.

Seeds a fresh PostgreSQL database (COPY, a few seconds per table) with one rank campaign of
``--tasks`` tasks (K=4), each judged by 3 of 30 labelers, which gives 18 comparisons per
task: 55,556 tasks make 1,000,008 comparisons. Then runs each export in a fresh process
(`export_to_file`, the path `prefloop export` takes) and prints rows/s and the process's
peak memory (ru_maxrss), next to the goal from issue 5: 1M rows to Parquet in under 30 s,
peak memory under 500 MB. The database is dropped afterwards unless ``--keep``.

    .venv/bin/python bench/export.py
    .venv/bin/python bench/export.py --tasks 5556          # 100,008 comparisons, a quick run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labeling_load import DEFAULT_PG_ADMIN_URL, BenchDatabase, _filler, _libpq_url

CAMPAIGN_SLUG = "bench-export"
GOAL_SECONDS, GOAL_MB = 30.0, 500.0


def seed(url: str, *, tasks: int, k: int = 4, overlap: int = 3, labelers: int = 30) -> int:
    """Migrate, then COPY prompts, completions, tasks, judgments and comparisons."""
    import psycopg
    from sqlalchemy.orm import Session

    from app.auth import service as auth_service
    from app.auth.models import Role
    from app.campaigns.models import Campaign, CampaignGuidelines, CampaignMode, CampaignStatus
    from app.db import make_engine
    from app.migrate import upgrade

    engine = make_engine(url)
    upgrade(engine)
    with Session(engine) as db:
        campaign = Campaign(
            slug=CAMPAIGN_SLUG,
            name="Export benchmark",
            k=k,
            mode=CampaignMode.rank,
            overlap=overlap,
            status=CampaignStatus.active,
            guidelines_md="Prefer the helpful and correct answer.",
        )
        db.add(campaign)
        db.flush()
        db.add(CampaignGuidelines(campaign_id=campaign.id, version=1, guidelines_md="-"))
        people = [
            auth_service.create_user(
                db, username=f"labeler-{i:03d}", role=Role.labeler, password=None
            ).id
            for i in range(labelers)
        ]
        campaign_id = campaign.id
        db.commit()
    engine.dispose()

    rng = random.Random(5)
    prompts = [_filler(rng, rng.randint(10, 60)) + "?" for _ in range(500)]
    answers = [_filler(rng, rng.randint(20, 120)) for _ in range(1000)]
    now = "2026-11-01 12:00:00+00"
    judgment_id = comparison_id = 0
    with psycopg.connect(_libpq_url(url)) as conn, conn.cursor() as cur:

        def copy(table: str, columns: str, rows) -> None:
            with cur.copy(f"COPY {table} ({columns}) FROM STDIN") as out:
                for row in rows:
                    out.write_row(row)

        copy(
            "prompts",
            "id, campaign_id, text, content_hash, metadata, created_at",
            (
                (t, campaign_id, f"[{t}] {prompts[t % 500]}", _sha(f"p{t}"), "{}", now)
                for t in range(1, tasks + 1)
            ),
        )
        copy(
            "completions",
            "id, prompt_id, text, source, generation_params, content_hash, created_at",
            (
                (c, (c - 1) // k + 1, answers[c % 1000], "import", "{}", _sha(f"c{c}"), now)
                for c in range(1, tasks * k + 1)
            ),
        )
        copy(
            "tasks",
            "id, campaign_id, prompt_id, status, priority, required_judgments, judgment_count, "
            "assigned_count, is_gold, created_at",
            (
                (t, campaign_id, t, "complete", 0, overlap, overlap, overlap, False, now)
                for t in range(1, tasks + 1)
            ),
        )
        copy(
            "task_completions",
            "task_id, position, completion_id",
            ((t, p, (t - 1) * k + p + 1) for t in range(1, tasks + 1) for p in range(k)),
        )
        judgments, comparisons = [], []

        def flush() -> None:
            copy(
                "judgments",
                "id, task_id, campaign_id, user_id, ranking, ratings, flags, comment, "
                "time_on_task_ms, display_order, guidelines_version, idempotency_key, "
                "payload_hash, is_current, created_at",
                judgments,
            )
            copy(
                "comparisons",
                "id, campaign_id, prompt_id, judgment_id, user_id, chosen_id, rejected_id, "
                "is_tie, source, is_active, created_at",
                comparisons,
            )
            judgments.clear()
            comparisons.clear()

        for t in range(1, tasks + 1):
            ids = [(t - 1) * k + p + 1 for p in range(k)]
            for user in rng.sample(people, overlap):
                order = ids[:]
                if rng.random() < 0.3:
                    i = rng.randrange(k - 1)
                    order[i], order[i + 1] = order[i + 1], order[i]
                judgment_id += 1
                shown = rng.sample(ids, k)
                judgments.append(
                    (
                        judgment_id, t, campaign_id, user, json.dumps([[c] for c in order]),
                        "{}", "{}", "", 20_000, json.dumps(shown), 1, f"k{judgment_id}",
                        "x", True, now,
                    )
                )  # fmt: skip
                for a, b in combinations(order, 2):
                    comparison_id += 1
                    comparisons.append(
                        (comparison_id, campaign_id, t, judgment_id, user, a, b, False, "human",
                         True, now)
                    )  # fmt: skip
            if len(comparisons) >= 100_000:
                flush()
        flush()
        for table in ("prompts", "completions", "tasks", "judgments", "comparisons"):
            cur.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "  # noqa: S608
                f"(SELECT max(id) FROM {table}))"
            )
        conn.commit()
        conn.autocommit = True
        cur.execute("VACUUM ANALYZE")
    return comparison_id


def _sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def export_once(url: str, file_format: str, output: str) -> None:
    """In a fresh process: one export, then its figures as JSON on stdout."""
    from app.config import Settings
    from app.db import Database
    from app.exports.schemas import ExportParams
    from app.exports.service import export_to_file

    settings = Settings(
        env="dev", database_url=url, secret_key="b" * 48, data_dir=Path(output).parent
    )
    database = Database(settings.database_url)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    began = time.perf_counter()
    made = export_to_file(
        database,
        ExportParams(campaigns=[CAMPAIGN_SLUG], format="trl", file_format=file_format),
        Path(output),
        settings,
    )
    seconds = time.perf_counter() - began
    database.dispose()
    print(
        json.dumps(
            {
                "rows": made["row_counts"]["total"],
                "seconds": seconds,
                "bytes": made["bytes"],
                "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "start_mb": rss_before / 1024,
            }
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg-admin-url", default=DEFAULT_PG_ADMIN_URL, help="may CREATE DATABASE")
    parser.add_argument("--tasks", type=int, default=55_556, help="tasks (18 comparisons each)")
    parser.add_argument("--keep", action="store_true", help="keep the database and files")
    parser.add_argument("--export-only", nargs=3, metavar=("URL", "FORMAT", "OUTPUT"))
    args = parser.parse_args()
    if args.export_only:
        export_once(*args.export_only)
        return 0

    tmpdir = Path(tempfile.mkdtemp(prefix="prefloop-bench-export-"))
    bench_db = BenchDatabase.create("postgresql", args.pg_admin_url, tmpdir)
    try:
        began = time.perf_counter()
        comparisons = seed(bench_db.url, tasks=args.tasks)
        print(f"seeded {comparisons:,} comparisons in {time.perf_counter() - began:.1f} s")
        results = {}
        for file_format, name in (("parquet", "trl.parquet"), ("jsonl", "trl.jsonl")):
            done = subprocess.run(
                [sys.executable, __file__, "--export-only", bench_db.url, file_format,
                 str(tmpdir / name)],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return 1
            result = results[file_format] = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"trl labeled pairs -> {file_format:<8} {result['rows']:>10,} rows in "
                f"{result['seconds']:6.1f} s = {result['rows'] / result['seconds']:>9,.0f} rows/s; "
                f"file {result['bytes'] / 1e6:,.0f} MB; peak memory {result['peak_mb']:,.0f} MB "
                f"(process after imports {result['start_mb']:,.0f} MB)"
            )
        parquet = results["parquet"]
        scale = 1_000_000 / max(parquet["rows"], 1)
        met = parquet["seconds"] * scale < GOAL_SECONDS and parquet["peak_mb"] < GOAL_MB
        print(
            f"goal (1M rows to Parquet under {GOAL_SECONDS:.0f} s, peak under {GOAL_MB:.0f} MB): "
            f"{'MET' if met else 'NOT MET'}"
            + ("" if parquet["rows"] >= 1_000_000 else f" (time scaled from {parquet['rows']:,})")
        )
    finally:
        if not args.keep:
            bench_db.drop()
            for path in tmpdir.iterdir():
                path.unlink()
            tmpdir.rmdir()
        else:
            print(f"kept {bench_db.url} and {tmpdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
