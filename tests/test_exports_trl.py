"""Real clients of the exports: `datasets` loads every format, and TRL's RewardTrainer and
DPOTrainer take a training step on a tiny model built from config (no model hub)."""

from __future__ import annotations

import copy
import json

import pytest

from app.exports.schemas import ExportParams
from app.exports.service import export_to_file
from tests.tiny_models import causal_lm, reward_model, tokenizer_for


def export(database, settings, tmp_path, name: str, **params) -> list[dict]:
    output = tmp_path / name
    export_to_file(database, ExportParams(**params), output, settings)
    from datasets import load_dataset

    kind = "parquet" if name.endswith(".parquet") else "json"
    dataset = load_dataset(kind, data_files=str(output), split="train")
    return dataset


def texts_of(dataset) -> list[str]:
    out = []
    for row in dataset:
        for key in ("prompt", "chosen", "rejected", "completion"):
            value = row.get(key)
            if isinstance(value, str):
                out.append(value)
            elif isinstance(value, list):
                out += [m["content"] for m in value]
    return out


def changed(before, model) -> bool:
    import torch

    return any(
        not torch.equal(before[name], param.detach()) for name, param in model.named_parameters()
    )


@pytest.mark.parametrize("file_name", ["trl.jsonl", "trl.parquet", "trl.jsonl.gz"])
def test_trl_preference_export_trains_a_reward_model_and_dpo(
    database, settings, judged, tmp_path, file_name
):
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    dataset = export(database, settings, tmp_path, file_name, campaigns=["quality"], format="trl")
    assert len(dataset) > 0 and {"prompt", "chosen", "rejected"} <= set(dataset.column_names)
    tokenizer = tokenizer_for(texts_of(dataset))
    common = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 1,
        "per_device_train_batch_size": 4,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "logging_steps": 1,
    }

    model = reward_model(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = RewardTrainer(
        model=model,
        args=RewardConfig(**common),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    loss = trainer.train().training_loss
    assert loss == loss and loss > 0  # finite, a real Bradley-Terry loss
    assert changed(before, model)

    policy = causal_lm(tokenizer)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    trainer = DPOTrainer(
        model=policy,
        ref_model=copy.deepcopy(policy),
        args=DPOConfig(**common),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    loss = trainer.train().training_loss
    assert loss == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the first step
    assert changed(before, policy)


@pytest.mark.parametrize("fmt", ["rankings", "soft"])
def test_rankings_and_soft_labels_load_with_datasets(database, settings, judged, tmp_path, fmt):
    for name in (f"{fmt}.jsonl", f"{fmt}.parquet"):
        dataset = export(database, settings, tmp_path, name, campaigns=["quality"], format=fmt)
        assert len(dataset) > 0
        first = dataset[0]
        # Every row survives the round trip through the file format with its structure.
        assert json.loads(json.dumps(first)) == first
