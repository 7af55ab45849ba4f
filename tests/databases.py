"""Find or start the databases the suite runs on, and make throwaway copies of them.

PostgreSQL, in order: PREFLOOP_TEST_DATABASE_URL; the server on 127.0.0.1:5432 if one
answers; a throwaway cluster started from the local PostgreSQL binaries. Under CI=true,
no PostgreSQL is a failure, never a skip.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from app.config import normalize_database_url
from app.db import make_engine
from app.migrate import upgrade

DEFAULT_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _libpq_url(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(_libpq_url(url), connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ThrowawayCluster:
    """A PostgreSQL cluster in a temp folder, for machines without a running server."""

    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="prefloop-pg-")))
    port: int = field(default_factory=_free_port)

    @staticmethod
    def binaries() -> Path | None:
        for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
            if Path(candidate, "initdb").exists():
                return Path(candidate)
        initdb = shutil.which("initdb")
        return Path(initdb).parent if initdb else None

    def start(self) -> str:
        bin_dir = self.binaries()
        if bin_dir is None:
            raise RuntimeError("no PostgreSQL binaries (initdb) found")
        data = self.directory / "data"
        run_as: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            shutil.chown(self.directory, "postgres")
            run_as = ["runuser", "-u", "postgres", "--"]
        subprocess.run(
            [*run_as, bin_dir / "initdb", "-D", data, "-U", "postgres", "-A", "trust"],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                *run_as,
                bin_dir / "pg_ctl",
                "-D",
                data,
                "-l",
                self.directory / "log",
                "-w",
                "-o",
                f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off",
                "start",
            ],
            check=True,
            capture_output=True,
        )
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        bin_dir = self.binaries()
        run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if bin_dir is not None:
            subprocess.run(
                [
                    *run_as,
                    bin_dir / "pg_ctl",
                    "-D",
                    self.directory / "data",
                    "-m",
                    "immediate",
                    "stop",
                ],
                capture_output=True,
                check=False,
            )
        shutil.rmtree(self.directory, ignore_errors=True)


class PostgresServer:
    """A PostgreSQL server the suite may create and drop databases on."""

    def __init__(self) -> None:
        self.cluster: ThrowawayCluster | None = None
        explicit = os.environ.get("PREFLOOP_TEST_DATABASE_URL")
        if explicit:
            self.url = normalize_database_url(explicit)
            if not _answers(self.url):
                raise RuntimeError(f"PREFLOOP_TEST_DATABASE_URL does not answer: {self.url}")
        elif _answers(DEFAULT_SERVER):
            self.url = DEFAULT_SERVER
        else:
            self.cluster = ThrowawayCluster()
            self.url = self.cluster.start()
        self.created: list[str] = []

    def _admin(self) -> psycopg.Connection:
        return psycopg.connect(_libpq_url(self.url), autocommit=True)

    def create_database(self, *, template: str | None = None) -> str:
        name = f"prefloop_test_{uuid.uuid4().hex[:12]}"
        with self._admin() as conn:
            suffix = f" TEMPLATE {template}" if template else ""
            conn.execute(f"CREATE DATABASE {name}{suffix}")
        self.created.append(name)
        return make_url(self.url).set(database=name).render_as_string(hide_password=False)

    def drop_database(self, url: str) -> None:
        name = make_url(url).database
        with self._admin() as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        if name in self.created:
            self.created.remove(name)

    def close(self) -> None:
        for name in list(self.created):
            self.drop_database(
                make_url(self.url).set(database=name).render_as_string(hide_password=False)
            )
        if self.cluster is not None:
            self.cluster.stop()


class Backend:
    """One database kind with a migrated template; `clone()` gives a fresh, migrated database."""

    def __init__(self, name: str, workdir: Path, server: PostgresServer | None = None) -> None:
        self.name = name
        self.server = server
        self.workdir = workdir
        if name == "sqlite":
            self.template_url = f"sqlite:///{workdir / 'template.db'}"
        else:
            assert server is not None
            self.template_url = server.create_database()
        engine = make_engine(self.template_url)
        upgrade(engine)
        engine.dispose()

    def clone(self) -> str:
        if self.name == "sqlite":
            path = self.workdir / f"{uuid.uuid4().hex[:12]}.db"
            shutil.copyfile(self.workdir / "template.db", path)
            return f"sqlite:///{path}"
        assert self.server is not None
        return self.server.create_database(template=make_url(self.template_url).database)

    def drop(self, url: str) -> None:
        if self.name == "sqlite":
            for suffix in ("", "-wal", "-shm"):
                Path(make_url(url).database + suffix).unlink(missing_ok=True)
        else:
            assert self.server is not None
            self.server.drop_database(url)


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


free_port = _free_port
