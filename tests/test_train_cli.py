"""`prefloop train reward`, `prefloop worker --once` and `prefloop reward eval` as real
processes on a real database: queue a reward model from labels, train it, then measure it on
preference files it never saw (TRL rows, and real HH-RLHF pairs from ../shared); bad input is
one line and a non-zero exit."""

from __future__ import annotations

import json
import re
from pathlib import Path

from app.db import Database
from tests.factories import make_campaign, make_labeler, make_task
from tests.test_cli import cli_env, run_cli
from tests.test_import import HH_BAD_LINES, HH_SAMPLE
from tests.test_reward_job import answers, rank_by_truth, tiny_backbone

TASKS = 16


def seed(url: str) -> None:
    database = Database(url)
    try:
        with database.session() as db:
            campaign = make_campaign(db, slug="cli-reward", k=3, overlap=2)
            truth = {}
            for n in range(TASKS):
                task = make_task(db, campaign, prompt=f"question {n}", completions=answers(n))
                truth[task.id] = [item.completion_id for item in task.items]
            rank_by_truth(
                db, campaign, [make_labeler(db, "cli-a"), make_labeler(db, "cli-b")], truth
            )
            db.commit()
    finally:
        database.dispose()


def test_train_then_evaluate_a_reward_model_from_the_command_line(
    fresh_database_url: str, tmp_path: Path
) -> None:
    seed(fresh_database_url)
    env = cli_env(fresh_database_url, tmp_path / "data", secret_key="s" * 48)
    backbone = tiny_backbone(tmp_path / "backbone")

    unknown = run_cli(
        "train", "reward", "--campaign", "nope", "--backbone", backbone, env=env, cwd=tmp_path
    )
    assert unknown.returncode == 1 and "no campaign 'nope'" in unknown.stderr
    bad = run_cli(
        "train",
        "reward",
        "--campaign",
        "cli-reward",
        "--backbone",
        backbone,
        "--learning-rate",
        "0",
        env=env,
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "training.learning_rate" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    reward = ("train", "reward", "--campaign", "cli-reward", "--backbone", backbone)
    unsharded = run_cli(*reward, "--sharding", "fsdp", env=env, cwd=tmp_path)
    assert unsharded.returncode == 2 and "needs processes >= 2" in unsharded.stderr

    queued = run_cli(
        "train",
        "reward",
        "--campaign",
        "cli-reward",
        "--backbone",
        backbone,
        "--name",
        "cli-rm",
        "--max-length",
        "64",
        "--batch-size",
        "4",
        "--learning-rate",
        "0.003",
        "--epochs",
        "2",
        env=env,
        cwd=tmp_path,
    )
    assert queued.returncode == 0, queued.stderr
    match = re.match(r"queued job (\d+) \(train_reward on cli-reward\)", queued.stdout)
    assert match, queued.stdout
    job_id = match.group(1)

    worker = run_cli(
        "worker", "--once", "--poll-seconds", "0.1", env=env, cwd=tmp_path, timeout=300
    )
    assert worker.returncode == 0, worker.stderr
    shown = run_cli("job", "show", job_id, env=env, cwd=tmp_path)
    assert "succeeded" in shown.stdout, shown.stdout + shown.stderr

    # TRL rows in the campaign's vocabulary, and real HH-RLHF dialogues
    trl = tmp_path / "held-out.jsonl"
    trl.write_text(
        "".join(
            json.dumps(
                {"prompt": f"question {n}", "chosen": answers(n)[0], "rejected": answers(n)[2]}
            )
            + "\n"
            for n in range(100, 130)
        )
    )
    hh = tmp_path / "hh.jsonl"
    hh.write_text("".join(HH_SAMPLE.read_text(encoding="utf-8").splitlines(keepends=True)[:25]))
    hh_pairs = 25 - sum(1 for line in HH_BAD_LINES if line <= 25)
    for data, pairs in ((trl, 30), (hh, hh_pairs)):
        result = run_cli(
            "reward",
            "eval",
            "--model",
            "cli-rm",
            "--data",
            str(data),
            "--json",
            "--skip-invalid",
            env=env,
            cwd=tmp_path,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        figures = json.loads(result.stdout)
        assert figures["skipped_lines"] == (0 if data is trl else 25 - hh_pairs)
        assert (
            figures["pairs"] == pairs and 0 <= figures["accuracy"] <= 1 and 0 <= figures["ece"] <= 1
        )
    text = run_cli(
        "reward",
        "eval",
        "--model",
        "cli-rm",
        "--data",
        str(trl),
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert text.returncode == 0 and "pair accuracy" in text.stdout and "30 pairs" in text.stdout

    broken = tmp_path / "broken.jsonl"
    broken.write_text(trl.read_text().splitlines()[0] + "\n{not json\n")
    refused = run_cli(
        "reward", "eval", "--model", "cli-rm", "--data", str(broken), env=env, cwd=tmp_path
    )
    assert refused.returncode == 2 and "line 2" in refused.stderr
    prompts_only = tmp_path / "prompts.jsonl"
    prompts_only.write_text(json.dumps({"prompt": "hi", "completions": ["a", "b"]}) + "\n")
    refused = run_cli(
        "reward", "eval", "--model", "cli-rm", "--data", str(prompts_only), env=env, cwd=tmp_path
    )
    assert refused.returncode == 2 and "not a preference pair" in refused.stderr
    missing = run_cli(
        "reward", "eval", "--model", "nope", "--data", str(trl), env=env, cwd=tmp_path
    )
    assert missing.returncode == 1 and "no reward model version 'nope'" in missing.stderr

    # Continue from the trained version: queued as its child, by name; a wrong name queues nothing.
    lost = run_cli(
        "train", "reward", "--campaign", "cli-reward", "--warm-start", "nope", env=env, cwd=tmp_path
    )
    assert lost.returncode == 1 and "--warm-start: no model version 'nope'" in lost.stderr
    warm = run_cli(
        "train",
        "reward",
        "--campaign",
        "cli-reward",
        "--warm-start",
        "cli-rm",
        env=env,
        cwd=tmp_path,
    )
    assert warm.returncode == 0, warm.stderr
    warm_id = re.match(r"queued job (\d+)", warm.stdout).group(1)
    shown = run_cli("job", "show", warm_id, env=env, cwd=tmp_path)
    config = json.loads(re.search(r"^  config +(\{.*\})$", shown.stdout, re.M).group(1))
    listed = run_cli("model", "list", "--kind", "reward", env=env, cwd=tmp_path).stdout
    trained_id = int(re.search(r"^ +(\d+) .* cli-rm ", listed, re.M).group(1))
    assert config["init_model_id"] == trained_id
