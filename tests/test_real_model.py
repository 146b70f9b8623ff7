"""The real embedded model (all-MiniLM-L6-v2, loaded offline) learns, and the demo runs end to end."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tunebench.backends import load_backend
from tunebench.cli import app
from tunebench.config import ModelConfig, TaskConfig
from tunebench.data import load_task
from tunebench.evaluation import classification_metrics
from tunebench.strategies import registry

from .conftest import assert_verdicts_follow_intervals


@pytest.fixture(scope="module")
def default_backend():
    return load_backend(ModelConfig(path="default"))


@pytest.fixture(scope="module")
def support_slice():
    path = resources.files("tunebench") / "examples" / "support_intents.csv"
    data = load_task(TaskConfig(data=str(path), text="text", label="intent", split={"dev": 0.1, "test": 0.25}))
    train = data.train.subset(range(96))  # a small slice: 96 messages over 8 intents
    return data, train


def test_default_model_loads_offline(default_backend):
    emb = default_backend.embed(["where is my parcel", "where is my package", "reset my password"])
    assert emb.shape == (3, 384)
    sims = emb @ emb.T
    assert sims[0, 1] > sims[0, 2]  # a real pretrained encoder, not random weights


def test_full_fine_tuning_learns_on_a_small_slice(default_backend, support_slice):
    data, train = support_slice
    cls = registry.get("full")
    cfg = cls.config_from_dict({"epochs": 3, "batch_size": 16, "max_length": 64})
    strategy = cls(cfg, seed=0)
    untrained = strategy.build_model(default_backend, len(data.label_names))  # same seed: the starting point
    from tunebench.strategies.training import predict_logits

    ids = default_backend.tokenize(data.test.texts, 64)
    before = classification_metrics(data.test.labels, predict_logits(untrained, default_backend, ids).argmax(1),
                                    data.label_names)["accuracy"]
    predictor = strategy.adapt(default_backend, data, train=train, dev=data.dev)
    after = classification_metrics(data.test.labels, predictor.predict(data.test.texts), data.label_names)["accuracy"]
    losses = [h["train_loss"] for h in predictor.train_result.history]
    assert losses[-1] < losses[0]
    assert after > 0.6 > 1 / 8 and after > before + 0.3, (before, after)


def test_demo_runs(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--store", str(tmp_path / "runs"), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["study"] == "demo-support-intents"
    strategies = {t["strategy"] for t in doc["trials"]}
    # the demo model is an encoder; distill and cascade need a pool and a teacher (test_distill.py, test_cascade.py)
    assert strategies == {n for n, c in registry.all().items() if "encoder" in c.backends and n not in ("distill", "cascade")}
    by = {}
    for t in doc["trials"]:
        by.setdefault(t["strategy"], []).append(t["metrics"]["accuracy"])
    chance = 1 / 8
    assert all(np.mean(v) > 2 * chance for v in by.values()), by
    assert np.mean(by["full"]) > 0.8 and np.mean(by["lora"]) > 0.8
    report = Path(doc["report"]["html"])
    assert report.is_file() and report.parent == tmp_path / "runs" / "reports" / "demo-support-intents"
    assert doc["recommendation"]["verdict"] in ("recommend", "tie", "not enough evidence")
    analysis = json.loads(Path(doc["report"]["json"]).read_text())["analysis"]
    assert len(analysis["strategies"]) == len({t["label"] for t in doc["trials"]})
    assert assert_verdicts_follow_intervals(Path(doc["report"]["json"]), report.read_text()) >= len(analysis["strategies"]) - 1
