"""The `prefloop` command line, run as a real process against a real database.

Every database test runs on SQLite and PostgreSQL (the `backend` fixture parametrizes
`fresh_database_url`). The `run_cli` helper here is shared with test_config and test_demo.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

import app.cli
from app.audit.models import AuditEvent
from app.auth import service as auth_service
from app.auth.models import ApiToken, Role, User
from app.db import Database
from app.main import create_app
from tests.conftest import PASSWORD, make_settings

_CONSOLE_SCRIPT = Path(sys.executable).with_name("prefloop")
PREFLOOP_COMMAND = (
    [str(_CONSOLE_SCRIPT)] if _CONSOLE_SCRIPT.exists() else [sys.executable, "-m", "app.cli"]
)
# Nothing listens on port 1; the password must never reach a message.
DOWN_URL = "postgresql+psycopg://u:hunter2@127.0.0.1:1/x"


def cli_env(database_url: str, data_dir: Path, **overrides: str) -> dict[str, str]:
    """This process's environment without any PREFLOOP_* variable, plus the given ones."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFLOOP_")}
    env.update(
        PREFLOOP_DATABASE_URL=database_url,
        PREFLOOP_ENV="dev",
        PREFLOOP_DATA_DIR=str(data_dir),
        PREFLOOP_LOG_LEVEL="warning",
    )
    env.update({f"PREFLOOP_{key.upper()}": value for key, value in overrides.items()})
    return env


def run_cli(
    *args: str, env: dict[str, str], cwd: Path, input: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `prefloop ARGS...` in `cwd` (so no .env file or ./var of the repository is used)."""
    return subprocess.run(
        [*PREFLOOP_COMMAND, *args],
        env=env,
        cwd=cwd,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_cli_together(
    *calls: tuple[str, ...], env: dict[str, str], cwd: Path, timeout: float = 60
) -> list[subprocess.CompletedProcess[str]]:
    """Run independent `prefloop` commands at the same time (start-up is most of their cost)."""
    processes = [
        subprocess.Popen(
            [*PREFLOOP_COMMAND, *args],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in calls
    ]
    results = []
    for args, process in zip(calls, processes, strict=True):
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise
        results.append(subprocess.CompletedProcess(args, process.returncode, stdout, stderr))
    return results


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The process failed with exactly one `error: ...` line on stderr and no traceback."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture
def env(fresh_database_url: str, tmp_path: Path) -> dict[str, str]:
    return cli_env(fresh_database_url, tmp_path / "data")


@pytest.fixture
def cli_db(fresh_database_url: str) -> Iterator[Database]:
    """The database the CLI process uses, for arranging and checking rows."""
    db = Database(fresh_database_url)
    yield db
    db.dispose()


def make_user(cli_db: Database, username: str, role: Role) -> int:
    with cli_db.session() as session:
        user = auth_service.create_user(session, username=username, role=role, password=PASSWORD)
        session.commit()
        return user.id


# --- help -----------------------------------------------------------------------------------


def _subcommands(command: Any) -> dict[str, Any]:
    # Recent Typer ships its own copy of click, so test for a group by shape, not by class.
    return dict(getattr(command, "commands", None) or {})


def _walk(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, command
    for name, sub in sorted(_subcommands(command).items()):
        yield from _walk(sub, (*path, name))


def test_every_command_and_group_has_help() -> None:
    """Walk the whole command tree: a command added without a docstring, or an option without
    help text, fails here. (In-process: one process per command would cost ~10 s.)"""
    tree = list(_walk(typer.main.get_command(app.cli.cli)))
    leaves = {path for path, command in tree if not _subcommands(command)}
    # The walk really went into the sub-groups.
    assert {("serve",), ("demo",), ("user", "add"), ("token", "revoke"), ("db", "check")} <= leaves
    assert len(leaves) >= 12
    runner = CliRunner()
    for path, command in tree:
        where = " ".join(("prefloop", *path))
        result = runner.invoke(app.cli.cli, [*path, "--help"], prog_name="prefloop")
        assert result.exit_code == 0, (where, result.output, result.exception)
        output = " ".join(result.output.split())
        assert f"Usage: {where}" in output, (where, result.output)
        summary = (command.help or "").strip()
        assert summary, f"`{where}` has no help text (give it a docstring)"
        first_line = " ".join(summary.splitlines()[0].split())
        assert first_line in output, (where, result.output)
        for name in _subcommands(command):
            assert name in output, (where, name, result.output)
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help":
                assert getattr(param, "help", None), f"`{where} {param.opts[0]}` has no help"


def test_help_as_a_real_process(tmp_path: Path) -> None:
    env = cli_env(f"sqlite:///{tmp_path / 'unused.db'}", tmp_path / "data")
    top = run_cli("--help", env=env, cwd=tmp_path)
    assert top.returncode == 0, top.stderr
    for name in ("serve", "db", "user", "token", "demo"):
        assert name in top.stdout
    sub = run_cli("user", "add", "--help", env=env, cwd=tmp_path)
    assert sub.returncode == 0, sub.stderr
    assert "prefloop user add" in sub.stdout and "--password-stdin" in sub.stdout
    # --help must not touch the database.
    assert not (tmp_path / "unused.db").exists()


# --- users ----------------------------------------------------------------------------------


def test_user_add_list_and_duplicate(env: dict[str, str], tmp_path: Path, cli_db: Database) -> None:
    added = run_cli(
        "user", "add", "Carol", "--role", "admin", "--password-stdin",
        env=env, cwd=tmp_path, input=PASSWORD + "\n",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "carol" in added.stdout

    listed = run_cli("user", "list", env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()]
    assert ["carol", "admin", "active", "never"] in rows, listed.stdout

    again = run_cli(
        "user", "add", "carol", "--role", "labeler", "--password-stdin",
        env=env, cwd=tmp_path, input="another good passphrase\n",
    )  # fmt: skip
    assert "already exists" in one_error_line(again)

    with cli_db.session() as session:
        users = session.scalars(select(User).where(User.username == "carol")).all()
        assert len(users) == 1
        assert users[0].role == Role.admin
        assert users[0].password_hash and PASSWORD not in users[0].password_hash
        assert auth_service.authenticate(
            session, make_settings(), username="carol", password=PASSWORD, ip="127.0.0.1"
        )


def test_user_add_refuses_weak_passwords(
    env: dict[str, str], tmp_path: Path, cli_db: Database
) -> None:
    weak = {"short1": "at least 8 characters", "password123": "too common"}
    processes = {
        password: subprocess.Popen(
            [*PREFLOOP_COMMAND, "user", "add", f"dave-{n}", "--password-stdin"],
            env=env,
            cwd=tmp_path,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n, password in enumerate(weak)
    }
    for password, process in processes.items():
        stdout, stderr = process.communicate(password + "\n", timeout=60)
        result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        assert weak[password] in one_error_line(result)
    with cli_db.session() as session:
        assert session.scalars(select(User)).all() == []
        assert session.scalars(select(AuditEvent)).all() == []


def test_user_disable(env: dict[str, str], tmp_path: Path, cli_db: Database) -> None:
    user_id = make_user(cli_db, "erin", Role.labeler)
    result = run_cli("user", "disable", "erin", "--reason", "left the team", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with cli_db.session() as session:
        user = session.get(User, user_id)
        assert user is not None
        assert user.is_active is False
        assert user.disabled_at is not None
        events = session.scalars(
            select(AuditEvent).where(
                AuditEvent.action == "user.disable", AuditEvent.entity_id == str(user_id)
            )
        ).all()
        assert len(events) == 1
        assert events[0].entity_type == "user"
        assert events[0].reason == "left the team"
        assert events[0].after == {"is_active": False}


# --- tokens ---------------------------------------------------------------------------------


def test_token_create_authenticates_and_revoke_stops_it(
    env: dict[str, str], tmp_path: Path, cli_db: Database, fresh_database_url: str
) -> None:
    user_id = make_user(cli_db, "rosa", Role.researcher)
    created = run_cli("token", "create", "rosa", "--name", "trainer", env=env, cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    lines = created.stdout.strip().splitlines()
    assert len(lines) == 1, created.stdout  # only the token goes to stdout, for $(...)
    token = lines[0]
    assert token.startswith("pfl_") and len(token) > 30

    with cli_db.session() as session:
        rows = session.scalars(select(ApiToken).where(ApiToken.user_id == user_id)).all()
        assert len(rows) == 1
        row = rows[0]
        assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()
        assert row.name == "trainer"
        assert row.revoked_at is None
        stored = [getattr(row, column.key) for column in ApiToken.__table__.columns]
        assert not any(isinstance(value, str) and token in value for value in stored)
        assert token[:10] == row.prefix  # the visible prefix, not the secret
        audit_text = repr(
            [(e.before, e.after, e.reason) for e in session.scalars(select(AuditEvent))]
        )
        assert token not in audit_text
        token_id = row.id

    settings = make_settings(database_url=fresh_database_url, data_dir=tmp_path / "data")
    web = create_app(settings)
    try:
        with TestClient(web, base_url="http://testserver") as client:
            headers = {"Authorization": f"Bearer {token}"}
            me = client.get("/api/v1/me", headers=headers)
            assert me.status_code == 200, me.text
            assert me.json()["username"] == "rosa"
            assert me.json()["role"] == "researcher"
            assert me.json()["via_token"] is True
            forged = client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}x"})
            assert forged.status_code == 401

            revoked = run_cli("token", "revoke", "rosa", str(token_id), env=env, cwd=tmp_path)
            assert revoked.returncode == 0, revoked.stderr
            assert client.get("/api/v1/me", headers=headers).status_code == 401
    finally:
        web.state.db.dispose()

    with cli_db.session() as session:
        assert session.get(ApiToken, token_id).revoked_at is not None  # type: ignore[union-attr]


# --- db -------------------------------------------------------------------------------------


def test_db_check_on_a_migrated_database(env: dict[str, str], tmp_path: Path) -> None:
    result = run_cli("db", "check", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: ")


def test_db_check_on_an_empty_sqlite_file_then_upgrade(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    path.touch()
    env = cli_env(f"sqlite:///{path}", tmp_path / "data")

    before = run_cli("db", "check", env=env, cwd=tmp_path)
    assert before.returncode == 1
    assert "prefloop db upgrade" in one_error_line(before)

    upgraded = run_cli("db", "upgrade", env=env, cwd=tmp_path)
    assert upgraded.returncode == 0, upgraded.stderr

    after = run_cli("db", "check", env=env, cwd=tmp_path)
    assert after.returncode == 0, after.stderr
    assert after.stdout.startswith("ok: ")


def test_database_down_at_start_is_one_line_without_the_password(tmp_path: Path) -> None:
    env = cli_env(DOWN_URL, tmp_path / "data")
    started = time.monotonic()
    results = run_cli_together(("serve",), ("db", "check"), env=env, cwd=tmp_path, timeout=30)
    assert time.monotonic() - started < 15
    for result in results:
        assert result.returncode == 1, result
        line = one_error_line(result)
        assert line.startswith("error: cannot connect to the database"), result
        assert "hunter2" not in result.stderr + result.stdout
        assert "127.0.0.1" in line  # it says which database
    assert not (tmp_path / "data").exists()  # serve stopped before preparing anything


def test_unusable_database_url_is_one_line(tmp_path: Path) -> None:
    urls = [
        "not a url",
        "mysql://u:hunter2@127.0.0.1/x",  # no driver installed
        "postgresql+psycopg://u:hunter2@127.0.0.1:notaport/x",
        f"sqlite:///{tmp_path / 'a-file' / 'sub' / 'x.db'}",  # parent is a file
    ]
    (tmp_path / "a-file").write_text("")
    for url in urls:
        env = cli_env(url, tmp_path / "data")
        result = run_cli("db", "check", env=env, cwd=tmp_path)
        assert result.returncode in (1, 2), result  # 2: refused by the settings check
        assert one_error_line(result).startswith(
            ("error: PREFLOOP_DATABASE_URL", "error: cannot use the database")
        )
        assert "hunter2" not in result.stderr
