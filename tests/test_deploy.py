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


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [node.module]
    return []


def test_app_source_never_imports_trainer_dependencies():
    """`app/` must install and run without torch: no module in it imports the trainer stack.

    One exception: a command-line module may import `trainer` inside the function of a
    command that runs the model here (`prefloop worker`, `prefloop reward eval`), so that only
    that command needs the trainer extra. torch and transformers are never imported directly.
    """
    offenders = []
    for path in (ROOT / "app").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        lazy = set()
        if path.name == "cli.py" or path.name.endswith("_cli.py"):
            for function in ast.walk(tree):
                if isinstance(function, ast.FunctionDef):
                    lazy |= {id(n) for n in ast.walk(function)}
        for node in ast.walk(tree):
            for name in _imported(node):
                top = name.split(".")[0]
                if top in TRAINER_ONLY and not (top == "trainer" and id(node) in lazy):
                    offenders.append(f"{path.relative_to(ROOT)}: {name}")
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
