"""What the training jobs' tests share: a database of its own for a worker's run, a tiny model
saved as a job reads it, and the check that a job spec's training options are its trainer's
config fields."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from app.db import Database
from tests.conftest import make_settings
from tests.tiny_models import causal_lm, tokenizer_for

JOB_DEFAULTS = {
    "save_every": 50
}  # a job checkpoints every 50 steps, so a killed worker loses little


@pytest.fixture(name="live")
def live_fixture(fresh_database_url, tmp_path):
    """(database, settings) of a fresh database, for a worker that opens its own sessions."""
    database = Database(fresh_database_url)
    settings = make_settings(database_url=fresh_database_url, data_dir=tmp_path / "data")
    yield database, settings
    database.dispose()


def tiny_model(folder: Path, texts: Iterable[str], make: Callable[[Any], Any] = causal_lm) -> str:
    """A tiny model (`make(tokenizer)`, a causal LM by default) and its tokenizer, trained on
    `texts`, saved to `folder`; returns the folder."""
    tokenizer = tokenizer_for(texts)
    make(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def assert_spec_mirrors(training: Any, config_class: type, *, all_fields: bool = True) -> None:
    """Every option of the spec's `training` model is a `config_class` field with the same
    default (but JOB_DEFAULTS), and with `all_fields` every field but the model's path is an
    option: a job never carries an option the trainer would ignore or refuse."""
    trainer_fields = {f.name: f for f in dataclasses.fields(config_class)}
    for name, field in training.model_fields.items():
        assert name in trainer_fields, f"{name} is not a {config_class.__name__} field"
        assert field.default == JOB_DEFAULTS.get(name, trainer_fields[name].default), name
    if all_fields:
        missing = set(trainer_fields) - set(training.model_fields) - {"model_name_or_path"}
        assert missing == set()
