"""Cascade: a distilled student with its low-confidence inputs sent to the teacher; the threshold chosen on dev for
a target, the whole test curve stored, the chosen point measured and compared as a candidate like any other."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from tunebench.cli import app
from tunebench.errors import ConfigError
from tunebench.evaluation.cascade import CascadeTable, at, choose, curve
from tunebench.strategies import cascade as cascade_mod
from tunebench.strategies import registry
from tunebench.strategies.base import Output, Predictor, StrategyConfig
from tunebench.strategies.distill import Distill

QUICK = {"epochs": 1, "batch_size": 16, "max_length": 32}
TEACHER = {"strategy": "few_shot", "params": {"shots": 2}}
STUDENT = {"strategy": "linear_probe", "params": QUICK}
runner = CliRunner()


def study_doc(tmp_path, toy_files, model_dir, strategies: list) -> dict:
    return {"name": "casc", "task": {"data": {k: str(v) for k, v in toy_files.items()}, "text": "text",
                                     "label": "label", "labels": {"neg": "negative", "pos": "positive"}},
            "models": [{"name": "tiny", "backend": "encoder", "path": str(model_dir), "precision": "fp32"}],
            "strategies": strategies, "seeds": [0], "train_sizes": [16], "store": str(tmp_path / "runs")}


def test_cascade_study_end_to_end(tmp_path, toy_files, tiny_model_dir):
    params = {"teacher": TEACHER, "student": STUDENT, "pool": "train", "pool_size": 24,
              "target": {"max_fallback": 0.5}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study_doc(tmp_path, toy_files, tiny_model_dir,
                                             [{"cascade": params}, {"few_shot": {"shots": 2}}])), encoding="utf-8")
    done = runner.invoke(app, ["run", str(path), "--json"])
    assert done.exit_code == 0, done.output
    trials = json.loads(done.stdout)["trials"]
    c = [t for t in trials if t["strategy"] == "cascade"][0]; print(json.dumps({k: c[k] for k in ("metrics", "cost", "label")}), json.dumps(c.get("cascade") or c.keys()))
