# ruff: noqa: S311, S603
"""Labeling under load: N simulated labelers run next + submit against a real server.

Each simulated labeler loops over ``POST /api/v1/campaigns/{slug}/next`` and
``POST /api/v1/assignments/{key}/judgment`` (a random valid ranking, sometimes with a tie)
against a real ``prefloop serve`` process, closed-loop by default (no think time). After a
short warm-up that is not counted, it measures for a fixed time and prints cycles/s, the
p50/p95/p99 latency of each call and of the whole cycle, errors by status, and the CPU used
by the client, the server and PostgreSQL. A small share of submits is sent twice at once to
check idempotency under load. Then the server is stopped and the database is checked:

* exact overlap: no task has more live or submitted assignments than it requires, and
  ``tasks.assigned_count`` equals that count;
* no labeler got a task twice (assignments, and current judgments, per task and labeler);
* every acknowledged submit exists once with the ranking the client sent, no judgment
  exists that the client was not told about (those whose submit timed out are counted
  apart), ``tasks.judgment_count`` equals the current judgments;
* each judgment of K completions has exactly K*(K-1)/2 comparisons.

It exits 1 on any violation (2 when the setup fails); missing the speed goal is reported,
not an error. Everything runs on a fresh database that is removed afterwards (``--keep``
keeps it).

Run it from the repository root with the project's virtual environment::

    .venv/bin/python bench/labeling_load.py                      # PostgreSQL, 64 labelers, 30 s
    .venv/bin/python bench/labeling_load.py --database sqlite    # SQLite, one server worker
    .venv/bin/python bench/labeling_load.py --database sqlite --labelers 8
    .venv/bin/python bench/labeling_load.py --labelers 64 --duration 30 --server-workers 2 \\
        --client-procs 2 --pg-admin-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres
    .venv/bin/python bench/labeling_load.py --help

PostgreSQL is reached through ``--pg-admin-url`` (a role that may CREATE DATABASE); the
benchmark creates ``prefloop_bench_<random>`` there and drops it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import multiprocessing
import os
import random
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
CAMPAIGN_SLUG = "bench-load"

# The goal from the issue, and peer figures quoted from it (not measured by this script).
GOAL_CYCLES_PER_S = 300.0
GOAL_P99_CYCLE_MS = 250.0
GOAL_LABELERS = 64
LABEL_STUDIO_QUOTED = (
    # (what, cycles/s, clients, p99 seconds or None)
    ("Label Studio 1.23 on PostgreSQL, peak", 18.0, 8, None),
    ("Label Studio 1.23 on PostgreSQL", 15.0, 32, 2.6),
)

FILLER = (
    "the model answer should explain why a result holds and cite the step that fails when "
    "it does not while keeping the tone plain and the length short enough to read quickly "
    "a careful reviewer checks each claim against the prompt and prefers the response that "
    "is correct complete and honest about what it does not know"
)
WORDS = tuple(FILLER.split())


# --- setup ------------------------------------------------------------------------------------


def _libpq_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class BenchDatabase:
    kind: str
    url: str
    admin_url: str | None = None
    name: str | None = None
    tmpdir: Path | None = None

    @classmethod
    def create(cls, kind: str, admin_url: str, tmpdir: Path) -> BenchDatabase:
        if kind == "sqlite":
            return cls(kind, f"sqlite:///{tmpdir / 'bench.db'}", tmpdir=tmpdir)
        import psycopg
        from sqlalchemy.engine import make_url

        name = f"prefloop_bench_{secrets.token_hex(6)}"
        with psycopg.connect(_libpq_url(admin_url), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        return cls(kind, url, admin_url=admin_url, name=name)

    def sessions(self) -> int | None:
        """Sessions ever opened to the database (PostgreSQL 14+ statistics), or None."""
        if self.kind != "postgresql" or not self.admin_url:
            return None
        import psycopg

        try:
            with psycopg.connect(_libpq_url(self.admin_url), autocommit=True) as conn:
                conn.execute("SELECT pg_stat_force_next_flush()")
                row = conn.execute(
                    "SELECT sessions FROM pg_stat_database WHERE datname = %s", (self.name,)
                ).fetchone()
        except psycopg.Error:
            return None
        return int(row[0]) if row and row[0] is not None else None

    def drop(self) -> None:
        if self.kind == "postgresql" and self.name and self.admin_url:
            import psycopg

            with psycopg.connect(_libpq_url(self.admin_url), autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")


@dataclass
class Labeler:
    index: int
    user_id: int
    token: str


def _filler(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def seed_database(url: str, *, tasks: int, k: int, overlap: int, labelers: int) -> list[Labeler]:
    """Migrate, then create the campaign, its tasks (Core bulk inserts) and the labelers."""
    from sqlalchemy import insert
    from sqlalchemy.orm import Session

    from app.auth import service as auth_service
    from app.auth.models import Role
    from app.campaigns.models import Campaign, CampaignGuidelines, CampaignMode, CampaignStatus
    from app.db import make_engine, utcnow
    from app.labeling.models import (
        Completion,
        CompletionSource,
        Prompt,
        Task,
        TaskCompletion,
        TaskStatus,
    )
    from app.migrate import upgrade

    engine = make_engine(url)
    upgrade(engine)
    rng = random.Random(1234)
    # A few hundred distinct bodies, varied per task, so responses have a realistic size.
    prompt_bodies = [_filler(rng, rng.randint(20, 60)) for _ in range(200)]
    completion_bodies = [_filler(rng, rng.randint(60, 160)) for _ in range(400)]
    with Session(engine) as db:
        campaign = Campaign(
            slug=CAMPAIGN_SLUG,
            name="Load benchmark",
            k=k,
            mode=CampaignMode.rank,
            overlap=overlap,
            allow_ties=True,
            status=CampaignStatus.active,
            guidelines_md="Prefer the **helpful** and correct answer.",
            lease_minutes=30,
        )
        db.add(campaign)
        db.flush()
        db.add(
            CampaignGuidelines(
                campaign_id=campaign.id, version=1, guidelines_md=campaign.guidelines_md
            )
        )
        campaign_id = campaign.id
        made: list[tuple[int, str]] = []
        for i in range(labelers):
            user = auth_service.create_user(
                db, username=f"bench-labeler-{i:03d}", role=Role.labeler, password=None
            )
            token = auth_service.create_api_token(db, user, name="load benchmark")
            made.append((user.id, token.secret))
        db.commit()

    now = utcnow()
    batch = 2000
    with engine.begin() as conn:
        for start in range(0, tasks, batch):
            n = min(batch, tasks - start)
            prompt_rows = []
            for i in range(start, start + n):
                text = f"[{i}] {prompt_bodies[i % len(prompt_bodies)]}"
                prompt_rows.append(
                    {
                        "campaign_id": campaign_id,
                        "text": text,
                        "content_hash": hashlib.sha256(text.encode()).hexdigest(),
                        "meta": {},
                        "created_at": now,
                    }
                )
            prompt_ids = (
                conn.execute(
                    insert(Prompt.__table__).returning(
                        Prompt.__table__.c.id, sort_by_parameter_order=True
                    ),
                    prompt_rows,
                )
                .scalars()
                .all()
            )
            completion_rows = []
            for j, prompt_id in enumerate(prompt_ids):
                for c in range(k):
                    body = completion_bodies[((start + j) * k + c * 7) % len(completion_bodies)]
                    text = f"{body} ({start + j}.{c})"
                    completion_rows.append(
                        {
                            "prompt_id": prompt_id,
                            "text": text,
                            "source": CompletionSource.imported,
                            "generation_params": {},
                            "content_hash": hashlib.sha256(text.encode()).hexdigest(),
                            "created_at": now,
                        }
                    )
            completion_ids = (
                conn.execute(
                    insert(Completion.__table__).returning(
                        Completion.__table__.c.id, sort_by_parameter_order=True
                    ),
                    completion_rows,
                )
                .scalars()
                .all()
            )
            task_rows = [
                {
                    "campaign_id": campaign_id,
                    "prompt_id": prompt_id,
                    "status": TaskStatus.open,
                    "priority": 0,
                    "required_judgments": overlap,
                    "judgment_count": 0,
                    "assigned_count": 0,
                    "is_gold": False,
                    "created_at": now,
                }
                for prompt_id in prompt_ids
            ]
            task_ids = (
                conn.execute(
                    insert(Task.__table__).returning(
                        Task.__table__.c.id, sort_by_parameter_order=True
                    ),
                    task_rows,
                )
                .scalars()
                .all()
            )
            conn.execute(
                insert(TaskCompletion.__table__),
                [
                    {"task_id": task_id, "position": c, "completion_id": completion_ids[j * k + c]}
                    for j, task_id in enumerate(task_ids)
                    for c in range(k)
                ],
            )
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
    engine.dispose()
    return [Labeler(i, uid, tok) for i, (uid, tok) in enumerate(made)]


# --- the server -------------------------------------------------------------------------------


class Server:
    def __init__(self, url: str, *, port: int, workers: int, workdir: Path) -> None:
        self.port = port
        self.log_path = workdir / "server.log"
        prefloop = Path(sys.executable).parent / "prefloop"
        command = (
            [str(prefloop)]
            if prefloop.exists()
            else [sys.executable, "-c", "from app.cli import cli; cli()"]
        )
        command += ["serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
        env = dict(os.environ)
        env.update(
            PREFLOOP_ENV="prod",
            PREFLOOP_SECRET_KEY="".join(
                secrets.choice(string.ascii_letters + string.digits) for _ in range(48)
            ),
            PREFLOOP_DATABASE_URL=url,
            PREFLOOP_LOG_LEVEL="warning",
            PREFLOOP_DATA_DIR=str(workdir / "data"),
        )
        self._log = self.log_path.open("wb")
        # Run from the temp folder so a developer's ./.env cannot change the settings.
        self.process = subprocess.Popen(
            command,
            cwd=workdir,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_healthy(self, timeout: float = 60.0) -> None:
        import httpx2 as httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the server did not answer /healthz within {timeout:.0f} s")

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self._log.close()
        return self.process.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# --- CPU accounting (Linux /proc) ---------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(comm, ppid, own CPU ticks, reaped children's CPU ticks), or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    return (
        comm,
        int(fields[1]),
        int(fields[11]) + int(fields[12]),
        int(fields[13]) + int(fields[14]),
    )


def _all_procs() -> dict[int, tuple[str, int, int, int]]:
    procs = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
            procs[int(entry.name)] = stat
    return procs


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def cpu_snapshot(
    server_pid: int, client_pids: list[int], database: str | None
) -> dict[str, Any] | None:
    try:
        procs = _all_procs()
        busy, total = _machine_ticks()
    except (OSError, ValueError, IndexError):
        return None
    children: dict[int, list[int]] = defaultdict(list)
    for pid, (_comm, ppid, _ticks, _reaped) in procs.items():
        children[ppid].append(pid)
    tree, stack = set(), [server_pid]
    while stack:
        pid = stack.pop()
        if pid in procs and pid not in tree:
            tree.add(pid)
            stack.extend(children[pid])
    return {
        "time": time.monotonic(),
        "busy": busy,
        "total": total,
        "server": {pid: procs[pid][2] for pid in tree},
        "client": {pid: procs[pid][2] for pid in client_pids if pid in procs},
        # Backends of the benchmark's database (their title names it); other postgres
        # processes (other databases, background workers) are counted apart.
        "postgres": {
            pid: t
            for pid, (comm, _pp, t, _r) in procs.items()
            if comm == "postgres" and database and f" {database} " in _cmdline(pid)
        },
        "postgres_other": {
            pid: t
            for pid, (comm, _pp, t, _r) in procs.items()
            if comm == "postgres" and not (database and f" {database} " in _cmdline(pid))
        },
        # Backends that exit (a connection closed) are reaped by the postmaster; their CPU
        # shows up only in its children's time.
        "postgres_exited": {
            pid: reaped
            for pid, (comm, ppid, _t, reaped) in procs.items()
            if comm == "postgres" and procs.get(ppid, ("",))[0] != "postgres"
        },
    }


def cpu_between(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, float] | None:
    """Cores used over the interval: the machine, the server's process tree, postgres."""
    if not a or not b:
        return None
    wall = b["time"] - a["time"]
    cores = os.cpu_count() or 1

    def used(key: str) -> float:
        ticks = sum(b[key][pid] - a[key][pid] for pid in b[key] if pid in a[key])
        return ticks / CLK_TCK / wall

    result = {
        "machine": (b["busy"] - a["busy"]) / max(b["total"] - a["total"], 1) * cores,
        "server": used("server"),
        "postgres": used("postgres"),
        "postgres_other": used("postgres_other"),
        "postgres_exited": used("postgres_exited"),
        "client": used("client"),
        "cores": float(cores),
    }
    result["other"] = max(
        result["machine"]
        - result["server"]
        - result["postgres"]
        - result["postgres_other"]
        - result["postgres_exited"]
        - result["client"],
        0.0,
    )
    return result


# --- the client -------------------------------------------------------------------------------


@dataclass
class ClientConfig:
    base_url: str
    slug: str
    t0: float  # time.time() when the warm-up starts
    warmup: float
    duration: float
    think_ms: float
    double_submit_rate: float
    request_timeout: float
    seed: int


@dataclass
class ClientResult:
    next_ms: list[float] = field(default_factory=list)
    submit_ms: list[float] = field(default_factory=list)
    cycle_ms: list[float] = field(default_factory=list)
    cycles_in_window: int = 0
    cycles_total: int = 0
    errors: Counter = field(default_factory=Counter)  # (call, status or exception) -> n
    acks: list[dict[str, Any]] = field(default_factory=list)
    uncertain: list[dict[str, Any]] = field(default_factory=list)  # timed out / cut off
    refused: list[str] = field(default_factory=list)  # submit keys answered with an error
    double_submits: int = 0
    double_mismatch: list[str] = field(default_factory=list)
    double_statuses: Counter = field(default_factory=Counter)
    exhausted: int = 0
    cpu_s: float = 0.0
    wall_s: float = 0.0
    loop: str = "asyncio"

    def merge(self, other: ClientResult) -> None:
        for name in ("next_ms", "submit_ms", "cycle_ms", "acks", "uncertain", "refused"):
            getattr(self, name).extend(getattr(other, name))
        self.double_mismatch.extend(other.double_mismatch)
        self.errors.update(other.errors)
        self.double_statuses.update(other.double_statuses)
        for name in ("cycles_in_window", "cycles_total", "double_submits", "exhausted"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.cpu_s += other.cpu_s
        self.wall_s = max(self.wall_s, other.wall_s)
        self.loop = other.loop


def make_answer(rng: random.Random, task: dict[str, Any], elapsed_ms: int) -> dict[str, Any]:
    """A random valid ranking (sometimes with a tie) and the extras a real labeler sends."""
    ids = [c["id"] for c in task["completions"]]
    rng.shuffle(ids)
    ranking = [[cid] for cid in ids]
    if task.get("allow_ties") and len(ranking) > 2 and rng.random() < 0.2:
        at = rng.randrange(len(ranking) - 1)
        ranking[at : at + 2] = [sorted(ranking[at] + ranking[at + 1])]
    answer: dict[str, Any] = {
        "ranking": ranking,
        "confidence": rng.randint(1, 5),
        "time_on_task_ms": elapsed_ms + rng.randint(2_000, 90_000),
    }
    if rng.random() < 0.5:
        answer["ratings"] = {str(cid): rng.randint(1, 7) for cid in ids}
    if task.get("flags") and rng.random() < 0.1:
        answer["flags"] = {str(rng.choice(ids)): [rng.choice(task["flags"])]}
    if rng.random() < 0.15:
        answer["comment"] = _filler(rng, rng.randint(3, 25))
    return answer


async def _labeler(cfg: ClientConfig, lab: Labeler, client: Any, res: ClientResult, win) -> None:
    import httpx2 as httpx

    rng = random.Random(cfg.seed * 100_003 + lab.index)
    headers = {"Authorization": f"Bearer {lab.token}"}
    next_url = f"{cfg.base_url}/api/v1/campaigns/{cfg.slug}/next"
    start, end = win
    clock = time.perf_counter

    def in_window(t: float) -> bool:
        return start <= t <= end

    async def submit_once(url: str, body: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
        # A dropped connection is retried once with the same key, as a real client would
        # (that is what idempotent submits are for); a timeout is left uncertain.
        for attempt in range(2):
            try:
                response = await client.post(url, json=body, headers=headers)
                break
            except httpx.TimeoutException:
                return "timeout", None
            except httpx.HTTPError as exc:
                if attempt:
                    return type(exc).__name__, None
                res.errors["submit", f"{type(exc).__name__} (retried)"] += 1
        data = None
        if response.status_code in (200, 201):
            data = response.json()
        return str(response.status_code), data

    # Spread the first requests a little so all labelers do not hit the same instant.
    await asyncio.sleep(rng.random() * 0.05)
    while clock() < end:
        t0 = clock()
        try:
            response = await client.post(next_url, headers=headers)
        except httpx.TimeoutException:
            res.errors["next", "timeout"] += 1
            continue
        except httpx.HTTPError as exc:
            res.errors["next", type(exc).__name__] += 1
            await asyncio.sleep(0.05)
            continue
        t1 = clock()
        if in_window(t1):
            res.next_ms.append((t1 - t0) * 1000)
        if response.status_code == 204:
            res.exhausted += 1
            return
        if response.status_code != 200:
            res.errors["next", str(response.status_code)] += 1
            await asyncio.sleep(0.01)
            continue
        task = response.json()
        thought = 0.0
        if cfg.think_ms > 0:
            thought = cfg.think_ms * rng.uniform(0.5, 1.5) / 1000
            await asyncio.sleep(thought)
        body = make_answer(rng, task, int(thought * 1000))
        key = task["submit_key"]
        url = f"{cfg.base_url}/api/v1/assignments/{key}/judgment"
        double = rng.random() < cfg.double_submit_rate
        s0 = clock()
        if double:
            outcomes = list(await asyncio.gather(submit_once(url, body), submit_once(url, body)))
        else:
            outcomes = [await submit_once(url, body)]
        s1 = clock()
        ok = [data for status, data in outcomes if data is not None]
        for status, data in outcomes:
            if data is None:
                res.errors["submit", status] += 1
                record = {"key": key, "ranking": body["ranking"], "user_id": lab.user_id}
                if status.isdigit():
                    res.refused.append(key)
                else:
                    res.uncertain.append(record)
        if ok:
            judgment = ok[0]["judgment"]
            res.acks.append(
                {
                    "id": judgment["id"],
                    "key": key,
                    "task_id": task["task_id"],
                    "user_id": lab.user_id,
                    "ranking": body["ranking"],
                    "created": [d["created"] for d in ok],
                }
            )
        if double:
            res.double_submits += 1
            res.double_statuses[tuple(sorted(status for status, _ in outcomes))] += 1
            ids = {d["judgment"]["id"] for d in ok}
            if len(ok) != 2 or len(ids) != 1:
                res.double_mismatch.append(
                    f"{key}: {[status for status, _ in outcomes]} ids {sorted(ids)}"
                )
        if len(ok) == len(outcomes):
            res.cycles_total += 1
            if in_window(s1):
                res.cycles_in_window += 1
                res.cycle_ms.append((t1 - t0 + s1 - s0) * 1000)
        if in_window(s1):
            res.submit_ms.append((s1 - s0) * 1000)


async def _run_labelers(cfg: ClientConfig, labelers: list[Labeler]) -> ClientResult:
    import httpx2 as httpx

    res = ClientResult()
    # Place the measurement window on this process's perf_counter clock.
    offset = time.perf_counter() - time.time()
    start = cfg.t0 + cfg.warmup + offset
    end = start + cfg.duration
    # Idle connections are dropped before uvicorn's 5 s keep-alive timeout closes them, so
    # a request does not race the server's close on a stale connection.
    limits = httpx.Limits(
        max_connections=2 * len(labelers),
        max_keepalive_connections=2 * len(labelers),
        keepalive_expiry=4.0,
    )
    timeout = httpx.Timeout(cfg.request_timeout)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        delay = cfg.t0 + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)

        async def meter() -> None:
            await asyncio.sleep(max(start - time.perf_counter(), 0))
            cpu0, wall0 = time.process_time(), time.perf_counter()
            await asyncio.sleep(max(end - time.perf_counter(), 0))
            res.cpu_s = time.process_time() - cpu0
            res.wall_s = time.perf_counter() - wall0

        await asyncio.gather(
            meter(), *(_labeler(cfg, lab, client, res, (start, end)) for lab in labelers)
        )
    return res


def run_client(cfg: ClientConfig, labelers: list[Labeler], use_uvloop: bool) -> ClientResult:
    if use_uvloop:
        try:
            import uvloop

            result = uvloop.run(_run_labelers(cfg, labelers))
            result.loop = "uvloop"
            return result
        except ImportError:
            pass
    return asyncio.run(_run_labelers(cfg, labelers))


def _client_process(cfg_dict, labelers, use_uvloop, ready, go, t0, queue) -> None:
    ready.wait()  # every process imported and is ready
    go.wait()
    cfg = ClientConfig(**{**cfg_dict, "t0": t0.value})
    queue.put(run_client(cfg, labelers, use_uvloop))


def run_load(
    cfg: ClientConfig, labelers: list[Labeler], procs: int, use_uvloop: bool, pids: list[int]
) -> ClientResult:
    """Run the labelers in this process (procs=1) or spread over several processes.

    `pids` receives the client processes' ids before `cfg.t0` is set.
    """
    if procs <= 1:
        pids.append(os.getpid())
        cfg.t0 = time.time() + 0.2
        return run_client(cfg, labelers, use_uvloop)
    # Spawned processes import this module afresh; t0 is set once all of them are ready.
    ctx = multiprocessing.get_context("spawn")
    ready, go, queue = ctx.Barrier(procs + 1), ctx.Event(), ctx.Queue()
    t0 = ctx.Value("d", 0.0)
    cfg_dict = {k: v for k, v in cfg.__dict__.items() if k != "t0"}
    workers = [
        ctx.Process(
            target=_client_process,
            args=(cfg_dict, labelers[i::procs], use_uvloop, ready, go, t0, queue),
            daemon=True,
        )
        for i in range(procs)
    ]
    for worker in workers:
        worker.start()
    ready.wait(timeout=120)
    pids.extend(worker.pid for worker in workers if worker.pid)
    t0.value = time.time() + 0.3
    cfg.t0 = t0.value
    go.set()
    merged = ClientResult()
    for _ in workers:
        merged.merge(queue.get(timeout=cfg.warmup + cfg.duration + 4 * cfg.request_timeout + 60))
    for worker in workers:
        worker.join(timeout=10)
    return merged


# --- invariants -------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    violations: list[str]
    detail: str = ""

    @property
    def ok(self) -> bool:
        return not self.violations


def check_invariants(url: str, res: ClientResult) -> tuple[list[Check], dict[str, int]]:
    from sqlalchemy import func, select

    from app.audit.models import AuditEvent
    from app.db import make_engine
    from app.labeling.models import Assignment, AssignmentState, Comparison, Judgment, Task

    engine = make_engine(url)
    checks: list[Check] = []
    facts: dict[str, int] = {}
    live_states = (AssignmentState.active, AssignmentState.submitted)
    with engine.connect() as conn:
        tasks = {
            row.id: row
            for row in conn.execute(
                select(
                    Task.id,
                    Task.required_judgments,
                    Task.assigned_count,
                    Task.judgment_count,
                    Task.status,
                )
            )
        }
        live = dict(
            conn.execute(
                select(Assignment.task_id, func.count())
                .where(Assignment.state.in_(live_states))
                .group_by(Assignment.task_id)
            )
            .tuples()
            .all()
        )
        states = dict(
            conn.execute(select(Assignment.state, func.count()).group_by(Assignment.state))
            .tuples()
            .all()
        )
        dup_assign = conn.execute(
            select(Assignment.task_id, Assignment.user_id, func.count())
            .group_by(Assignment.task_id, Assignment.user_id)
            .having(func.count() > 1)
        ).all()
        dup_judg = conn.execute(
            select(Judgment.task_id, Judgment.user_id, func.count())
            .where(Judgment.is_current.is_(True))
            .group_by(Judgment.task_id, Judgment.user_id)
            .having(func.count() > 1)
        ).all()
        judgments = {
            row.id: row
            for row in conn.execute(
                select(
                    Judgment.id,
                    Judgment.task_id,
                    Judgment.user_id,
                    Judgment.ranking,
                    Judgment.idempotency_key,
                    Judgment.is_current,
                    Judgment.assignment_id,
                )
            )
        }
        current_per_task = Counter(j.task_id for j in judgments.values() if j.is_current)
        submitted_assignments = {
            row.id: row.task_id
            for row in conn.execute(
                select(Assignment.id, Assignment.task_id).where(
                    Assignment.state == AssignmentState.submitted
                )
            )
        }
        comparisons = dict(
            conn.execute(
                select(Comparison.judgment_id, func.count())
                .where(Comparison.is_active.is_(True))
                .group_by(Comparison.judgment_id)
            )
            .tuples()
            .all()
        )
        audit_creates = conn.scalar(
            select(func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.action == "judgment.create")
        )
    engine.dispose()
    facts["judgments"] = len(judgments)
    facts["comparisons"] = sum(comparisons.values())
    for state, n in sorted(states.items()):
        facts[f"assignments {state}"] = n

    # 1. Exact overlap, and the slot counter.
    over, counter = [], []
    for task_id, row in tasks.items():
        n = live.get(task_id, 0)
        if n > row.required_judgments:
            over.append(f"task {task_id}: {n} labelers > {row.required_judgments} required")
        if row.assigned_count != n:
            counter.append(f"task {task_id}: assigned_count {row.assigned_count} != {n} live")
    checks.append(
        Check(
            "exact overlap (live+submitted assignments <= required_judgments)",
            over,
            f"{sum(1 for n in live.values() if n)} tasks touched, max {max(live.values(), default=0)} labelers",
        )
    )
    checks.append(Check("tasks.assigned_count == live+submitted assignments", counter))

    # 2. Never the same task twice to one labeler.
    checks.append(
        Check(
            "no labeler got a task twice (assignments per task+user)",
            [f"task {t} user {u}: {n} assignments" for t, u, n in dup_assign],
        )
    )
    checks.append(
        Check(
            "no labeler judged a task twice (current judgments per task+user)",
            [f"task {t} user {u}: {n} current judgments" for t, u, n in dup_judg],
        )
    )

    # 3. Acknowledged submits are stored once, as sent; nothing else is stored.
    acked: dict[int, dict[str, Any]] = {}
    ack_problems = []
    for ack in res.acks:
        if ack["id"] in acked and acked[ack["id"]]["key"] != ack["key"]:
            ack_problems.append(f"judgment {ack['id']} acknowledged for two keys")
        acked[ack["id"]] = ack
        row = judgments.get(ack["id"])
        if row is None:
            ack_problems.append(f"acknowledged judgment {ack['id']} is missing")
            continue
        if row.idempotency_key != ack["key"]:
            ack_problems.append(f"judgment {ack['id']}: key {row.idempotency_key} != sent key")
        if row.ranking != ack["ranking"]:
            ack_problems.append(f"judgment {ack['id']}: ranking {row.ranking} != {ack['ranking']}")
        if row.user_id != ack["user_id"] or row.task_id != ack["task_id"]:
            ack_problems.append(f"judgment {ack['id']}: wrong user or task")
    keys = Counter(j.idempotency_key for j in judgments.values())
    ack_problems += [f"key {k} stored {n} times" for k, n in keys.items() if n > 1]
    checks.append(
        Check(
            "every acknowledged submit stored exactly once with the ranking sent",
            ack_problems,
            f"{len(acked)} acknowledged",
        )
    )
    uncertain_keys = {u["key"] for u in res.uncertain}
    acked_keys = {a["key"] for a in res.acks}
    refused_keys = set(res.refused) - acked_keys
    stray, from_timeouts = [], 0
    for row in judgments.values():
        if row.id in acked:
            continue
        if row.idempotency_key in uncertain_keys:
            from_timeouts += 1
        else:
            why = (
                " (its submit got an error response)" if row.idempotency_key in refused_keys else ""
            )
            stray.append(f"judgment {row.id} (task {row.task_id}) was never acknowledged{why}")
    checks.append(
        Check(
            "no judgment stored that the client was not acknowledged",
            stray,
            f"{from_timeouts} stored from {len(uncertain_keys)} submits that timed out or were cut off",
        )
    )
    count_problems = [
        f"task {task_id}: judgment_count {row.judgment_count} != {current_per_task.get(task_id, 0)} current"
        for task_id, row in tasks.items()
        if row.judgment_count != current_per_task.get(task_id, 0)
    ]
    status_problems = [
        f"task {task_id}: status {row.status} with {row.judgment_count}/{row.required_judgments}"
        for task_id, row in tasks.items()
        if (row.status == "complete") != (row.judgment_count >= row.required_judgments)
    ]
    checks.append(Check("tasks.judgment_count == current judgments", count_problems))
    checks.append(
        Check(
            "task status is complete exactly when judgment_count reaches required", status_problems
        )
    )
    by_assignment = Counter(j.assignment_id for j in judgments.values())
    link_problems = [
        f"submitted assignment {aid} has {by_assignment.get(aid, 0)} judgments"
        for aid in submitted_assignments
        if by_assignment.get(aid, 0) != 1
    ] + [
        f"judgment {j.id} points at assignment {j.assignment_id}, which is not submitted"
        for j in judgments.values()
        if j.assignment_id not in submitted_assignments
    ]
    checks.append(Check("one judgment per submitted assignment", link_problems))

    # 4. K*(K-1)/2 comparisons per judgment.
    pair_problems = []
    for row in judgments.values():
        k = sum(len(tier) for tier in row.ranking or [])
        if comparisons.get(row.id, 0) != k * (k - 1) // 2:
            pair_problems.append(
                f"judgment {row.id}: {comparisons.get(row.id, 0)} comparisons, expected {k * (k - 1) // 2}"
            )
    checks.append(Check("each judgment of K completions has K*(K-1)/2 comparisons", pair_problems))

    # Idempotency under load and the audit trail.
    checks.append(
        Check(
            "double submits: both answered 200/201 with the same judgment id",
            res.double_mismatch,
            f"{res.double_submits} sent; outcomes {dict(res.double_statuses)}",
        )
    )
    checks.append(
        Check(
            "one judgment.create audit event per judgment",
            []
            if audit_creates == len(judgments)
            else [f"{audit_creates} audit events for {len(judgments)} judgments"],
        )
    )
    return checks, facts


# --- report -----------------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))]


def latency_line(name: str, values: list[float]) -> str:
    if not values:
        return f"  {name:<8} (no samples)"
    return (
        f"  {name:<8} n={len(values):>6}  p50 {pct(values, 50):7.1f} ms  p95 {pct(values, 95):7.1f} ms"
        f"  p99 {pct(values, 99):7.1f} ms  max {max(values):7.1f} ms"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="N simulated labelers run next+submit cycles against `prefloop serve`, "
        "then the database is checked for overlap, duplicate and idempotency violations.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--database", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument("--pg-admin-url", default=DEFAULT_PG_ADMIN_URL, help="may CREATE DATABASE")
    parser.add_argument("--labelers", type=int, default=64, help="simulated labelers")
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds run before measuring")
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks in the campaign")
    parser.add_argument("--k", type=int, default=4, help="completions per task")
    parser.add_argument("--overlap", type=int, default=3, help="judgments required per task")
    parser.add_argument(
        "--server-workers",
        type=int,
        default=None,
        help="`prefloop serve --workers`; default 2 on PostgreSQL, 1 on SQLite",
    )
    parser.add_argument("--client-procs", type=int, default=1, help="client processes")
    parser.add_argument(
        "--think-ms", type=float, default=0.0, help="mean pause between next and submit"
    )
    parser.add_argument(
        "--double-submit-rate", type=float, default=0.02, help="share of submits sent twice at once"
    )
    parser.add_argument("--request-timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument("--port", type=int, default=0, help="server port (0: a free one)")
    parser.add_argument("--seed", type=int, default=1, help="client random seed")
    parser.add_argument(
        "--no-uvloop", action="store_true", help="run the client on asyncio's own loop"
    )
    parser.add_argument("--keep", action="store_true", help="keep the database and temp folder")
    args = parser.parse_args(argv)
    if args.server_workers is None:
        args.server_workers = 2 if args.database == "postgresql" else 1
    if args.database == "sqlite" and args.server_workers > 1:
        parser.error("--server-workers > 1 needs PostgreSQL (SQLite takes one writer at a time)")
    if args.labelers < 1 or args.client_procs < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--labelers, --client-procs and --duration must be positive")
    if not 2 <= args.k <= 9 or args.overlap < 1 or args.tasks < 1:
        parser.error("--k must be 2..9, --overlap and --tasks at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="prefloop-bench-"))
    database: BenchDatabase | None = None
    server: Server | None = None
    try:
        database = BenchDatabase.create(args.database, args.pg_admin_url, workdir)
        print(
            f"setup: {args.database} database {database.name or database.url}; "
            f"{args.tasks} tasks (K={args.k}, overlap {args.overlap}), {args.labelers} labelers",
            flush=True,
        )
        started = time.perf_counter()
        labelers = seed_database(
            database.url,
            tasks=args.tasks,
            k=args.k,
            overlap=args.overlap,
            labelers=args.labelers,
        )
        print(f"setup: seeded in {time.perf_counter() - started:.1f} s", flush=True)
        port = args.port or _free_port()
        server = Server(database.url, port=port, workers=args.server_workers, workdir=workdir)
        server.wait_healthy()
        print(
            f"server: prefloop serve --workers {args.server_workers} on 127.0.0.1:{port} "
            f"(pid {server.process.pid})",
            flush=True,
        )
        cfg = ClientConfig(
            base_url=f"http://127.0.0.1:{port}",
            slug=CAMPAIGN_SLUG,
            t0=0.0,
            warmup=args.warmup,
            duration=args.duration,
            think_ms=args.think_ms,
            double_submit_rate=args.double_submit_rate,
            request_timeout=args.request_timeout,
            seed=args.seed,
        )
        print(
            f"load: {args.labelers} labelers in {args.client_procs} client process(es), "
            f"{args.warmup:g} s warm-up + {args.duration:g} s measured, think {args.think_ms:g} ms",
            flush=True,
        )
        # Sample CPU use over the measured window from a thread (the client may run here);
        # run_load sets cfg.t0 just before the labelers start, and the sampler waits for it.
        snapshots: dict[str, Any] = {}
        server_pid = server.process.pid
        client_pids: list[int] = []

        def sampler() -> None:
            while not cfg.t0:
                time.sleep(0.01)
            window_start = cfg.t0 + cfg.warmup
            time.sleep(max(window_start - time.time(), 0))
            snapshots["start"] = cpu_snapshot(server_pid, client_pids, database.name)
            if (n := database.sessions()) is not None:
                snapshots["sessions_start"] = n
            time.sleep(max(window_start + cfg.duration - time.time(), 0))
            snapshots["end"] = cpu_snapshot(server_pid, client_pids, database.name)
            if (n := database.sessions()) is not None:
                snapshots["sessions_end"] = n

        thread = threading.Thread(target=sampler, daemon=True)
        thread.start()
        result = run_load(cfg, labelers, args.client_procs, not args.no_uvloop, client_pids)
        thread.join(timeout=5)
        returncode = server.stop()
        if returncode not in (0, None, -signal.SIGTERM):  # uvicorn re-raises SIGTERM
            print(f"server: exited with {returncode}; log tail:\n{server.log_tail()}")
        cpu = cpu_between(snapshots.get("start"), snapshots.get("end"))

        checks, facts = check_invariants(database.url, result)
        sessions = None
        if "sessions_start" in snapshots and "sessions_end" in snapshots:
            sessions = snapshots["sessions_end"] - snapshots["sessions_start"]
        return report(args, result, cpu, checks, facts, server, sessions)
    except Exception as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        if server is not None:
            print(f"server log tail:\n{server.log_tail()}", file=sys.stderr)
        return 2
    finally:
        if server is not None and server.process.poll() is None:
            server.stop()
        if database is not None and not args.keep:
            try:
                database.drop()
            except Exception as exc:
                print(f"warning: could not drop {database.name}: {exc}", file=sys.stderr)
        if args.keep:
            print(f"kept: {database.url if database else ''} and {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def report(
    args: argparse.Namespace,
    res: ClientResult,
    cpu: dict[str, float] | None,
    checks: list[Check],
    facts: dict[str, int],
    server: Server,
    sessions: int | None,
) -> int:
    rate = res.cycles_in_window / args.duration
    p99 = pct(res.cycle_ms, 99)
    print()
    print(
        f"== labeling load: {args.database}, {args.labelers} labelers, "
        f"{args.server_workers} server worker(s), {args.client_procs} client process(es), "
        f"{args.duration:g} s measured =="
    )
    print(f"cycles/s: {rate:.1f}  ({res.cycles_in_window} complete cycles in the window)")
    print("latency (calls completed in the window):")
    print(latency_line("next", res.next_ms))
    print(latency_line("submit", res.submit_ms))
    print(latency_line("cycle", res.cycle_ms))
    errors = sorted(res.errors.items())
    print(
        "errors (whole run, warm-up included): "
        + (", ".join(f"{call} {status}: {n}" for (call, status), n in errors) or "none")
    )
    if res.exhausted:
        print(f"note: {res.exhausted} labelers ran out of tasks (204); raise --tasks")
    client_cores = res.cpu_s / res.wall_s if res.wall_s else float("nan")
    print(
        f"client CPU: {res.cpu_s:.1f} s over {res.wall_s:.1f} s = {client_cores:.2f} cores "
        f"in {args.client_procs} process(es), {res.loop} loop "
        f"({client_cores / args.client_procs:.0%} of one core per process)"
    )
    if sessions is not None:
        print(
            f"PostgreSQL sessions opened to this database in the window: {sessions} "
            f"({sessions / args.duration:.1f}/s; a steady pool opens none)"
        )
    if cpu:
        print(
            f"machine CPU (cores busy, of {cpu['cores']:.0f}): total {cpu['machine']:.2f} = "
            f"server {cpu['server']:.2f} + postgres backends of this database "
            f"{cpu['postgres']:.2f} + postgres backends that exited {cpu['postgres_exited']:.2f} "
            f"+ client {cpu['client']:.2f} + other postgres {cpu['postgres_other']:.2f} + "
            f"other processes {cpu['other']:.2f}"
        )
        if cycles := res.cycles_in_window:
            per_cycle = cpu["server"] / rate * 1000 if rate else float("nan")
            pg_cycle = (cpu["postgres"] + cpu["postgres_exited"]) / rate * 1000 if rate else 0
            print(
                f"CPU per cycle: server {per_cycle:.1f} ms, postgres {pg_cycle:.1f} ms "
                f"({cycles} cycles)"
            )
        if cpu["postgres_other"] + cpu["other"] > 0.2:
            print("warning: other work shared this machine during the run; figures are pessimistic")
        if client_cores / args.client_procs > 0.85:
            print(
                "warning: a client process is near 100% of a core; latencies include client queueing"
            )
    print()
    print("invariants (database after the run):")
    for name, n in facts.items():
        if n:
            print(f"  {name}: {n}")
    failed = 0
    for check in checks:
        mark = "PASS" if check.ok else "FAIL"
        extra = f"  [{check.detail}]" if check.detail else ""
        print(f"  {mark}  {check.name}{extra}")
        for line in check.violations[:5]:
            print(f"          {line}")
        if len(check.violations) > 5:
            print(f"          ... and {len(check.violations) - 5} more")
        failed += not check.ok
    print()
    meets_speed = rate >= GOAL_CYCLES_PER_S and p99 < GOAL_P99_CYCLE_MS
    print(
        f"goal (from the issue): >= {GOAL_CYCLES_PER_S:.0f} cycles/s with p99 cycle < "
        f"{GOAL_P99_CYCLE_MS:.0f} ms at {GOAL_LABELERS} labelers on PostgreSQL, and zero "
        "invariant violations on PostgreSQL and on SQLite"
    )
    applies = args.database == "postgresql" and args.labelers == GOAL_LABELERS
    print(
        f"  speed: {rate:.1f} cycles/s ({rate / GOAL_CYCLES_PER_S:.0%} of goal), p99 cycle "
        f"{p99:.0f} ms -> {'MET' if meets_speed else 'NOT MET'}"
        + (
            ""
            if applies
            else " (the speed goal is set for PostgreSQL at 64 labelers; shown for information)"
        )
    )
    print(f"  invariants: {'zero violations' if not failed else f'{failed} checks FAILED'}")
    print(
        "reference (QUOTED from the issue, measured elsewhere on this machine class, NOT by this script):"
    )
    for what, quoted, clients, quoted_p99 in LABEL_STUDIO_QUOTED:
        p99_text = f", p99 {quoted_p99:g} s" if quoted_p99 else ""
        print(
            f"  {what}: ~{quoted:g} cycles/s at {clients} clients{p99_text} -> "
            f"measured here / quoted = {rate / quoted:.1f}x"
        )
    verdict = "PASS" if not failed else "FAIL"
    goal = ("MET" if meets_speed and not failed else "NOT MET") if applies else "n/a"
    print()
    print(
        f"SUMMARY database={args.database} labelers={args.labelers} "
        f"server_workers={args.server_workers} client_procs={args.client_procs} "
        f"cycles_per_s={rate:.1f} p50_cycle_ms={pct(res.cycle_ms, 50):.0f} "
        f"p99_cycle_ms={p99:.0f} errors={sum(res.errors.values())} "
        f"client_cores={client_cores:.2f} invariants={verdict} goal={goal}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
