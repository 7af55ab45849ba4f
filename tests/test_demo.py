"""`prefloop demo --no-serve`: demo accounts that really log in, and a seeded campaign."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.auth.models import Role, User
from app.campaigns.models import Campaign
from app.db import Database
from app.demo import DEMO_SLUG, SAMPLE_PATH
from app.labeling.models import Completion, Prompt, Task, TaskCompletion
from app.main import create_app
from app.web import home_path
from tests.conftest import csrf_from, make_settings
from tests.test_cli import cli_env, run_cli

EXPECTED_ACCOUNTS = {
    "admin": Role.admin,
    "alice": Role.labeler,
    "bob": Role.labeler,
    "rita": Role.researcher,
}
ACCOUNT_LINE = re.compile(r"^\s+(admin|labeler|researcher)\s+(\S+)\s+(\S+)\s*$")
K = 4


def sample_items() -> list[dict]:
    lines = SAMPLE_PATH.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_demo_sample_is_well_formed() -> None:
    items = sample_items()
    assert len(items) >= 5
    ids = [item.get("id") for item in items]
    assert all(ids) and len(set(ids)) == len(ids)
    for item in items:
        assert item.get("prompt") or item.get("messages"), item
        assert len(item["completions"]) == K, item.get("id")
        assert all(isinstance(text, str) and text.strip() for text in item["completions"])
        assert len(set(item["completions"])) == K, item.get("id")  # four different answers


def run_demo(env: dict[str, str], cwd: Path) -> tuple[str, dict[str, tuple[str, str]]]:
    """Run the demo; returns its output and {username: (role, password)}."""
    result = run_cli("demo", "--no-serve", env=env, cwd=cwd, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    accounts = {}
    for line in result.stdout.splitlines():
        if match := ACCOUNT_LINE.match(line):
            role, username, password = match.groups()
            accounts[username] = (role, password)
    assert {name: Role(role) for name, (role, _) in accounts.items()} == EXPECTED_ACCOUNTS, (
        result.stdout
    )
    return result.stdout, accounts


def login_status(client: TestClient, username: str, password: str) -> tuple[int, str]:
    """Log in through the real form; (status, redirect location)."""
    client.cookies.clear()
    page = client.get("/login")
    assert page.status_code == 200
    response = client.post(
        "/login",
        data={"username": username, "password": password, "csrf_token": csrf_from(page.text)},
        follow_redirects=False,
    )
    return response.status_code, response.headers.get("location", "")


@pytest.fixture
def web(fresh_database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    app = create_app(make_settings(database_url=fresh_database_url, data_dir=tmp_path / "data"))
    try:
        with TestClient(app, base_url="http://testserver") as client:
            yield client
    finally:
        app.state.db.dispose()


def campaign_contents(url: str) -> tuple[int, list[tuple[int, str, list[str]]]]:
    """(number of demo campaigns, [(task id, prompt key, completion texts by position)])."""
    database = Database(url)
    try:
        with database.session() as session:
            campaigns = session.scalars(select(Campaign).where(Campaign.slug == DEMO_SLUG)).all()
            tasks = []
            for campaign in campaigns:
                for task in session.scalars(
                    select(Task).where(Task.campaign_id == campaign.id).order_by(Task.id)
                ):
                    rows = session.execute(
                        select(TaskCompletion.position, Completion.text, Completion.prompt_id)
                        .join(Completion, Completion.id == TaskCompletion.completion_id)
                        .where(TaskCompletion.task_id == task.id)
                        .order_by(TaskCompletion.position)
                    ).all()
                    assert [row.position for row in rows] == list(range(len(rows)))
                    assert {row.prompt_id for row in rows} == {task.prompt_id}
                    prompt = session.get(Prompt, task.prompt_id)
                    assert prompt is not None and prompt.campaign_id == campaign.id
                    tasks.append((task.id, prompt.external_id, [row.text for row in rows]))
            total_prompts = session.scalar(select(func.count()).select_from(Prompt))
            total_completions = session.scalar(select(func.count()).select_from(Completion))
            assert total_prompts == len(tasks)
            assert total_completions == K * len(tasks)
            return len(campaigns), tasks
    finally:
        database.dispose()


def test_demo_seeds_accounts_and_campaign_idempotently(
    fresh_database_url: str, tmp_path: Path, web: TestClient
) -> None:
    env = cli_env(fresh_database_url, tmp_path / "data")
    del env["PREFLOOP_ENV"]  # the demo defaults to dev mode by itself
    items = sample_items()

    first_output, first = run_demo(env, tmp_path)
    assert "seeded" in first_output
    for username, (role, password) in first.items():
        status, location = login_status(web, username, password)
        assert status == 303, (username, status)
        assert location == home_path(Role(role)), (username, location)
        home = web.get(location)
        assert home.status_code == 200, (username, location)

    campaigns, tasks = campaign_contents(fresh_database_url)
    assert campaigns == 1
    assert len(tasks) == len(items)
    by_id = {item["id"]: item["completions"] for item in items}
    assert sorted(external_id for _, external_id, _ in tasks) == sorted(by_id)
    reordered = 0
    for _, external_id, texts in tasks:
        assert len(texts) == K
        assert sorted(texts) == sorted(by_id[external_id])  # the same four answers
        reordered += texts != by_id[external_id]
    # Shuffled, so the best answer (first in the file) is not always shown first.
    assert reordered > 0
    assert any(texts[0] != by_id[external_id][0] for _, external_id, texts in tasks)

    second_output, second = run_demo(env, tmp_path)
    assert "already there" in second_output
    assert campaign_contents(fresh_database_url) == (1, tasks)  # no duplicates, nothing changed
    for username, (role, password) in second.items():
        assert password != first[username][1]
        old_status, _ = login_status(web, username, first[username][1])
        assert old_status == 401, (username, "the first run's password still works")
        status, location = login_status(web, username, password)
        assert (status, location) == (303, home_path(Role(role))), username


def test_demo_refuses_to_run_outside_dev_mode(tmp_path: Path, fresh_database_url: str) -> None:
    """The demo resets the demo accounts' passwords: a production database must be safe from it."""
    env = cli_env(fresh_database_url, tmp_path / "data")
    env["PREFLOOP_ENV"] = "prod"
    env["PREFLOOP_SECRET_KEY"] = "p" * 48
    result = run_cli("demo", "--no-serve", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "dev mode" in result.stderr and "Traceback" not in result.stderr
    database = Database(fresh_database_url)
    with database.session() as session:
        assert session.scalar(select(func.count()).select_from(User)) == 0
    database.dispose()
