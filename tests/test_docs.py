"""The README stays true: every setting and every CLI command is documented."""

from __future__ import annotations

from pathlib import Path

import typer.main

from app.cli import cli
from app.config import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def command_paths(group, prefix: str = "prefloop") -> list[str]:
    paths = []
    for name, command in group.commands.items():
        path = f"{prefix} {name}"
        if hasattr(command, "commands"):  # a sub-group (typer may bundle its own click)
            paths += command_paths(command, path)
        else:
            paths.append(path)
    return paths


def test_every_setting_is_in_the_readme():
    missing = [
        f"PREFLOOP_{name.upper()}"
        for name in Settings.model_fields
        if f"`PREFLOOP_{name.upper()}`" not in README
    ]
    assert missing == []


def test_every_cli_command_is_in_the_readme():
    paths = command_paths(typer.main.get_command(cli))
    assert len(paths) >= 10
    assert [path for path in paths if f"`{path}" not in README] == []


def test_readme_gives_the_two_quick_start_commands():
    assert "make demo" in README and "make test" in README
