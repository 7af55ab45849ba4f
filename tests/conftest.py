"""Fixtures: every database test runs on SQLite and PostgreSQL, isolated by a rolled-back
outer transaction (in-process tests) or a fresh database cloned from a migrated template
(tests that start a real server or CLI process)."""

from __future__ import annotations

import datetime as dt
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Connection
from sqlalchemy.orm import Session

from app.auth import service as auth_service
from app.auth.models import Role, User
from app.auth.passwords import hash_password
from app.config import Settings
from app.db import Database, make_engine
from app.labeling import service as labeling
from app.labeling.schemas import JudgmentIn
from app.main import create_app
from tests.databases import Backend, PostgresServer
from tests.factories import make_campaign, make_labeler, make_task

IN_CI = os.environ.get("CI", "").lower() == "true"
PASSWORD = "correct horse battery staple"
BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer()
    except Exception as exc:
        if IN_CI:
            pytest.fail(f"PostgreSQL is required under CI=true: {exc}")
        pytest.skip(f"no PostgreSQL available: {exc}")
    yield server
    server.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked postgres_only are not collected for SQLite (deselected, not skipped)."""
    keep, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        sqlite_run = params.get("backend") == "sqlite"
        (dropped if sqlite_run and item.get_closest_marker("postgres_only") else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(scope="session", params=BACKENDS)
def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    """A database kind with a migrated template. Parametrizes every test that uses a database."""
    workdir = tmp_path_factory.mktemp(f"db-{request.param}")
    server = request.getfixturevalue("postgres_server") if request.param == "postgresql" else None
    backend = Backend(request.param, workdir, server)
    yield backend


@pytest.fixture
def fresh_database_url(backend: Backend) -> Iterator[str]:
    """A migrated database of its own, for tests whose code commits in other processes."""
    url = backend.clone()
    yield url
    backend.drop(url)


@pytest.fixture
def live(fresh_database_url: str, tmp_path: Path) -> Iterator[tuple[Database, Settings]]:
    """A database of its own and settings with a data folder, for tests that run a real
    worker (which commits) against the app."""
    database = Database(fresh_database_url)
    settings = make_settings(database_url=fresh_database_url, data_dir=tmp_path / "data")
    yield database, settings
    database.dispose()


@pytest.fixture
def connection(backend: Backend) -> Iterator[Connection]:
    """A connection in an outer transaction that is rolled back after the test."""
    engine = make_engine(backend.template_url)
    with engine.connect() as conn:
        transaction = conn.begin()
        yield conn
        transaction.rollback()
    engine.dispose()


@pytest.fixture
def database(connection: Connection) -> Database:
    return Database.bound_to(connection)


@pytest.fixture
def db(database: Database) -> Iterator[Session]:
    """A session for arranging and checking data; its commits are savepoints."""
    with database.sessionmaker() as session:
        yield session


def make_settings(**overrides: object) -> Settings:
    values: dict[str, object] = {"env": "dev", "secret_key": "t" * 48, "log_level": "warning"}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def settings(backend: Backend, tmp_path: Path) -> Settings:
    return make_settings(database_url=backend.template_url, data_dir=tmp_path / "data")


@pytest.fixture
def app(settings: Settings, database: Database) -> FastAPI:
    return create_app(settings, database)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, base_url="http://testserver") as test_client:
        yield test_client


@dataclass
class Accounts:
    labeler: User
    admin: User
    researcher: User

    def __getitem__(self, role: Role | str) -> User:
        return getattr(self, Role(role).value)


@pytest.fixture(scope="session")
def password_hash() -> str:
    """A real argon2id hash of PASSWORD, computed once: hashing is slow on purpose."""
    return hash_password(PASSWORD)


@pytest.fixture
def users(db: Session, password_hash: str) -> Accounts:
    """One active account per role, all with the password PASSWORD."""
    made = {
        role: auth_service.create_user(db, username=f"test-{role.value}", role=role, password=None)
        for role in Role
    }
    for user in made.values():
        user.password_hash = password_hash
    db.commit()
    return Accounts(
        labeler=made[Role.labeler], admin=made[Role.admin], researcher=made[Role.researcher]
    )


CSRF_META = re.compile(r'"X-CSRF-Token": "([^"]+)"')
CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_from(html: str) -> str:
    match = CSRF_META.search(html) or CSRF_FIELD.search(html)
    assert match, "no CSRF token on the page"
    return match.group(1)


def login(client: TestClient, username: str, password: str = PASSWORD) -> str:
    """Log in through the real form; returns the session's CSRF token."""
    page = client.get("/login")
    response = client.post(
        "/login",
        data={"username": username, "password": password, "csrf_token": csrf_from(page.text)},
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text
    home = client.get(response.headers["location"])
    assert home.status_code == 200
    return csrf_from(home.text)


@pytest.fixture
def as_role(client: TestClient, users: Accounts):
    """Log the test client in as a role: `csrf = as_role("admin")`."""

    def _login(role: Role | str) -> str:
        client.cookies.clear()
        return login(client, users[role].username)

    return _login


QUALITY_TASKS = 30


@pytest.fixture
def judged(db):
    """Three careful labelers who rank by the true order, and one who picks what is shown first."""
    campaign = make_campaign(db, slug="quality", overlap=4, k=4, gold_rate=1.0)  # gold first
    truth = {}
    for _ in range(QUALITY_TASKS):
        task = make_task(db, campaign)
        truth[task.id] = [item.completion_id for item in task.items]  # canonical = true order
    gold = make_task(db, campaign, is_gold=True, gold_ranking_positions=[[0], [1], [2], [3]])
    truth[gold.id] = [item.completion_id for item in gold.items]
    careful = [make_labeler(db, f"careful-{i}") for i in range(3)]
    lazy = make_labeler(db, "lazy")
    rng = random.Random(4)
    for user in [*careful, lazy]:
        while (lease := labeling.next_task(db, user=user, campaign=campaign, rng=rng)) is not None:
            if user is lazy:
                ranking = [[cid] for cid in lease.display_order]
            else:
                ranking = [[cid] for cid in truth[lease.task_id]]
            labeling.submit(
                db,
                user=user,
                submit_key=lease.submit_key,
                answer=JudgmentIn(ranking=ranking, time_on_task_ms=2000),
                # Three seconds after the lease: the server caps time on task at that.
                now=lease.leased_at + dt.timedelta(seconds=3),
            )
    db.commit()
    return campaign, careful, lazy
