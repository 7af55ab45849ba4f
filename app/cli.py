"""The `prefloop` command line. Every command has --help; errors are one line on stderr."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Annotated

import typer
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth import service as auth_service
from app.auth.models import Role, User
from app.auth.passwords import PasswordPolicyError
from app.campaigns.cli import campaign_cli
from app.cli_support import fail, load_settings, open_database
from app.config import get_settings
from app.db import redact_url
from app.exports.cli import export_command
from app.jobs.cli import job_cli, worker_command
from app.jobs.models_cli import generate_command, model_cli
from app.jobs.train_cli import reward_cli, train_cli
from app.labeling.import_cli import import_file
from app.loop.cli import loop_cli, policies_command

cli = typer.Typer(
    help="prefloop: human preference labeling and the RLHF loop that uses it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_cli = typer.Typer(help="Database schema: upgrade and check.", no_args_is_help=True)
user_cli = typer.Typer(
    help="Accounts: add, list, disable, enable, set passwords.", no_args_is_help=True
)
token_cli = typer.Typer(help="API tokens for scripts and the trainer.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")
cli.add_typer(user_cli, name="user")
cli.add_typer(token_cli, name="token")
cli.add_typer(campaign_cli, name="campaign")
cli.command("import")(import_file)
cli.command("export")(export_command)
cli.add_typer(job_cli, name="job")
cli.command("worker")(worker_command)
cli.add_typer(train_cli, name="train")
cli.add_typer(reward_cli, name="reward")
cli.add_typer(model_cli, name="model")
cli.command("generate")(generate_command)
cli.add_typer(loop_cli, name="loop")
cli.command("policies")(policies_command)


# --- serve ------------------------------------------------------------------------------------


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes (PostgreSQL only).")] = 1,
    reload: Annotated[bool, typer.Option(help="Restart on code changes (development).")] = False,
) -> None:
    """Serve the web app and the API."""
    import uvicorn

    settings = load_settings()
    open_database(settings).dispose()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if workers > 1 and settings.is_sqlite:
        fail("several workers need PostgreSQL; SQLite takes one writer at a time", 2)
    typer.echo(
        f"prefloop serving on http://{host}:{port} (database {redact_url(settings.database_url)})"
    )
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        reload=reload,
        proxy_headers=True,
        forwarded_allow_ips=os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1"),
        log_level=settings.log_level.lower(),
    )


# --- db ---------------------------------------------------------------------------------------


@db_cli.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Apply migrations up to REVISION (default: the latest)."""
    from app import migrate

    settings = load_settings()
    database = open_database(settings, require_schema=False)
    migrate.upgrade(database.engine, revision)
    typer.echo(
        f"database {redact_url(settings.database_url)} is at {migrate.current_revision(database.engine)}"
    )
    database.dispose()


@db_cli.command("check")
def db_check() -> None:
    """Exit 0 when the database answers and its schema is current; else 1 with the reason."""
    from app import migrate

    settings = load_settings()
    database = open_database(settings)
    typer.echo(
        f"ok: {redact_url(settings.database_url)} at {migrate.current_revision(database.engine)}"
    )
    database.dispose()


# --- users ------------------------------------------------------------------------------------


def read_password(password_stdin: bool, *, confirm: bool = True) -> str:
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            fail("no password on standard input")
        return password
    return typer.prompt("Password", hide_input=True, confirmation_prompt=confirm)


UsernameArg = Annotated[str, typer.Argument(help="The account's username.")]


def _get_user(session: Session, username: str) -> User:
    user = auth_service.get_user_by_username(session, username)
    if user is None:
        fail(f"no user named '{username}'")
    return user


@user_cli.command("add")
def user_add(
    username: Annotated[
        str, typer.Argument(help="Login name (lower-case letters, digits, . _ -).")
    ],
    role: Annotated[Role, typer.Option(help="What the account may do.")] = Role.labeler,
    display_name: Annotated[str, typer.Option(help="Name shown in the UI.")] = "",
    password_stdin: Annotated[
        bool, typer.Option(help="Read the password from standard input.")
    ] = False,
) -> None:
    """Create an account. The password is prompted for (or read with --password-stdin)."""
    settings = load_settings()
    database = open_database(settings)
    password = read_password(password_stdin)
    with database.session() as session:
        try:
            user = auth_service.create_user(
                session, username=username, role=role, password=password, display_name=display_name
            )
        except (auth_service.AuthError, PasswordPolicyError) as exc:
            fail(str(exc))
        session.commit()
        typer.echo(f"created {user.role.value} '{user.username}'")


@user_cli.command("list")
def user_list() -> None:
    """List accounts: username, role, state, last login."""
    database = open_database(load_settings())
    with database.session() as session:
        users = session.scalars(select(User).order_by(User.role, User.username)).all()
        if not users:
            typer.echo("no users yet: add one with `prefloop user add NAME --role admin`")
            return
        typer.echo(f"{'USERNAME':<24} {'ROLE':<11} {'STATE':<9} LAST LOGIN (UTC)")
        for user in users:
            last = user.last_login_at.strftime("%Y-%m-%d %H:%M") if user.last_login_at else "never"
            state = "active" if user.is_active else "disabled"
            typer.echo(f"{user.username:<24} {user.role.value:<11} {state:<9} {last}")


def _set_active(username: str, active: bool, reason: str | None) -> None:
    database = open_database(load_settings())
    with database.session() as session:
        user = _get_user(session, username)
        if user.is_active == active:
            typer.echo(f"'{user.username}' is already {'active' if active else 'disabled'}")
            return
        auth_service.set_active(session, user, active, actor_id=None, reason=reason)
        session.commit()
        typer.echo(f"{'enabled' if active else 'disabled'} '{user.username}'")


@user_cli.command("disable")
def user_disable(
    username: str,
    reason: Annotated[str | None, typer.Option(help="Recorded in the audit trail.")] = None,
) -> None:
    """Disable an account: its sessions end at once and its API tokens stop working."""
    _set_active(username, False, reason)


@user_cli.command("enable")
def user_enable(username: UsernameArg) -> None:
    """Re-enable a disabled account."""
    _set_active(username, True, None)


@user_cli.command("set-password")
def user_set_password(
    username: UsernameArg,
    password_stdin: Annotated[
        bool, typer.Option(help="Read the password from standard input.")
    ] = False,
) -> None:
    """Set a new password; the account's sessions are ended."""
    database = open_database(load_settings())
    password = read_password(password_stdin)
    with database.session() as session:
        user = _get_user(session, username)
        try:
            auth_service.set_password(session, user, password, actor_id=None)
        except PasswordPolicyError as exc:
            fail(str(exc))
        session.commit()
        typer.echo(f"password set for '{user.username}'")


# --- tokens -----------------------------------------------------------------------------------


@token_cli.command("create")
def token_create(
    username: Annotated[str, typer.Argument(help="The account the token acts as.")],
    name: Annotated[str, typer.Option(help="A label to recognise the token by.")] = "cli",
    expires_days: Annotated[
        int | None, typer.Option(help="Days until it expires (default: never).")
    ] = None,
) -> None:
    """Create an API token for USERNAME and print it once (only its hash is stored)."""
    database = open_database(load_settings())
    with database.session() as session:
        user = _get_user(session, username)
        if not user.is_active:
            fail(f"'{user.username}' is disabled")
        new = auth_service.create_api_token(session, user, name=name, expires_in_days=expires_days)
        session.commit()
    typer.echo(new.secret)
    typer.echo(
        f"token '{new.token.name}' for {user.username} ({user.role.value}); shown once, store it now",
        err=True,
    )


@token_cli.command("list")
def token_list(username: UsernameArg) -> None:
    """List USERNAME's tokens (prefix, name, state); secrets are never shown again."""
    database = open_database(load_settings())
    with database.session() as session:
        user = _get_user(session, username)
        tokens = auth_service.list_api_tokens(session, user)
        if not tokens:
            typer.echo(f"'{user.username}' has no tokens")
        for token in tokens:
            state = "revoked" if token.revoked_at else "active"
            typer.echo(f"{token.id:>5}  {token.prefix}…  {state:<8} {token.name}")


@token_cli.command("revoke")
def token_revoke(
    username: UsernameArg,
    token_id: Annotated[
        int, typer.Argument(help="The token's number, from `prefloop token list`.")
    ],
) -> None:
    """Revoke USERNAME's token TOKEN_ID (see `prefloop token list`)."""
    database = open_database(load_settings())
    with database.session() as session:
        user = _get_user(session, username)
        if not auth_service.revoke_api_token(session, user, token_id):
            fail(f"'{user.username}' has no active token {token_id}")
        session.commit()
        typer.echo(f"revoked token {token_id}")


# --- demo -------------------------------------------------------------------------------------


@cli.command()
def demo(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    serve_after: Annotated[
        bool, typer.Option("--serve/--no-serve", help="Start the server afterwards.")
    ] = True,
    with_worker: Annotated[
        bool,
        typer.Option(
            "--worker/--no-worker", help="Run a training worker beside the server (needs torch)."
        ),
    ] = True,
) -> None:
    """Set up a local demo: migrate, create demo accounts (printing passwords), seed a campaign, serve."""
    from app import demo as demo_data
    from app import migrate

    os.environ.setdefault("PREFLOOP_ENV", "dev")
    get_settings.cache_clear()
    settings = load_settings()
    if settings.env != "dev":
        # The demo resets the demo accounts' passwords: never against a real deployment.
        fail(
            "prefloop demo only runs in dev mode (PREFLOOP_ENV=dev); it resets the demo accounts", 2
        )
    database = open_database(settings, require_schema=False)
    migrate.upgrade(database.engine)
    with database.session() as session:
        accounts = demo_data.reset_demo_accounts(session)
        campaign, created = demo_data.seed_demo_campaign(session)
        session.commit()
    database.dispose()
    typer.echo(f"database: {redact_url(settings.database_url)}")
    typer.echo(f"campaign '{campaign.slug}': {'seeded' if created else 'already there'}")
    typer.echo("demo accounts (passwords are new each run):")
    for username, role, password in accounts:
        typer.echo(f"  {role:<11} {username:<12} {password}")
    if serve_after:
        worker = _start_demo_worker() if with_worker else None
        try:
            serve(host=host, port=port, workers=1, reload=False)
        finally:
            if worker is not None:
                _stop_demo_worker(worker)


def _start_demo_worker() -> subprocess.Popen[bytes] | None:
    """`prefloop worker` in a child process, so jobs queued in the demo run; None (with a
    note) when the trainer's dependencies are not installed."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        typer.echo("no training worker: torch is not installed (pip install -e '.[trainer]')")
        return None
    command = [sys.executable, "-m", "app.cli", "worker", "--poll-seconds", "2"]
    typer.echo("training worker started beside the server (prefloop worker)")
    return subprocess.Popen(command, env=dict(os.environ))  # noqa: S603


def _stop_demo_worker(worker: subprocess.Popen[bytes]) -> None:
    """SIGTERM: the worker hands its job back to the queue and exits."""
    if worker.poll() is None:
        worker.terminate()
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
