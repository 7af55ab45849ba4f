"""The production compose file parses, resolves, and refuses to run without its secrets."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_docker_compose_config_accepts_the_stack():
    # The script installs a pinned Docker Compose v2 if missing and runs `docker compose
    # config` with and without the secrets (see scripts/compose-check.sh for each check).
    result = subprocess.run(
        ["bash", str(ROOT / "scripts/compose-check.sh")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "refuses without POSTGRES_PASSWORD" in result.stderr
    assert "refuses without PREFLOOP_SECRET_KEY" in result.stderr


TRAINER_ONLY = {"torch", "transformers", "accelerate", "peft", "trainer"}


def test_app_source_never_imports_trainer_dependencies():
    """`app/` must install and run without torch: no module in it imports the trainer stack."""
    offenders = []
    for path in (ROOT / "app").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [
                f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in TRAINER_ONLY
            ]
    assert offenders == []


def test_importing_the_app_loads_no_trainer_dependency():
    """The web server must run without the trainer's dependencies, even where they are installed."""
    code = (
        "import sys, app.main, app.cli, app.models\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'accelerate', 'trainer') if m in sys.modules)\n"
        "print(','.join(heavy))"
    )
    result = subprocess.run(
        ["python", "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
        env={"PATH": str(Path(sys.executable).parent), "PREFLOOP_ENV": "dev"},
    )
    assert result.stdout.strip() == ""
