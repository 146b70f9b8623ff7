"""Studies: planning, the JSON output, the leaderboard, and resume after kill -9 or Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tunebench.cli import app

from .conftest import toy_study

runner = CliRunner()


@pytest.fixture()
def study_path(tmp_path, toy_files, tiny_model_dir) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(toy_study(tmp_path, toy_files, tiny_model_dir), sort_keys=False), encoding="utf-8")
    return path


def stored(store: Path) -> list[tuple]:
    db = store / "tunebench.db"
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db, timeout=1) as con:
            return con.execute("SELECT key, finished_at FROM trials").fetchall()
    except sqlite3.OperationalError:
        return []


def planned_keys(path: Path) -> set[str]:
    from tunebench.runner import load_study
    from tunebench.runner.study import Study

    cfg, base = load_study(path)
    return {t.key for t in Study(cfg, base_dir=base).plan()}


def test_plan_expands_templates_seeds_and_sizes(study_path):
    keys = planned_keys(study_path)
    # zero_shot: 2 templates, once each (no training data, no seed); 3 trained strategies x 2 seeds x 2 sizes
    assert len(keys) == 2 + 3 * 2 * 2


def test_run_json_prints_one_document(study_path, tmp_path):
    result = runner.invoke(app, ["run", str(study_path), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["study"] == "toy-ladder"
    assert doc["data"]["checks"]["n_train"] == 64 and doc["data"]["labels"] == ["negative", "positive"]
    assert len(doc["trials"]) == 14
    for t in doc["trials"]:
        assert {"strategy", "params", "seed", "train_size", "metrics", "cost"} <= set(t)
        assert {"accuracy", "macro_f1", "per_class", "confusion_matrix"} <= set(t["metrics"])
        assert {"trainable_params", "train_seconds", "train_examples_per_s", "latency_ms_p50", "latency_ms_p95",
                "peak_memory_mb", "throughput_per_s"} <= set(t["cost"])
        assert 0.0 <= t["metrics"]["accuracy"] <= 1.0
        assert t["cost"]["latency_ms_p95"] >= t["cost"]["latency_ms_p50"] > 0
        assert (tmp_path / "runs" / t["artifact"] / "predictor.json").is_file()
    sizes = {t["train_size"] for t in doc["trials"] if t["strategy"] == "full"}
    assert sizes == {16, 64}

    again = runner.invoke(app, ["run", str(study_path), "--json"])  # everything finished: nothing reruns
    assert [t["key"] for t in json.loads(again.stdout)["trials"]] == [t["key"] for t in doc["trials"]]

    show = runner.invoke(app, ["show", "toy-ladder", "--store", str(tmp_path / "runs"), "--json"])
    board = json.loads(show.stdout)["leaderboard"]
    full = next(e for e in board if e["label"] == "full(epochs=1)" and e["train_size"] == 64)
    accs = [t["metrics"]["accuracy"] for t in doc["trials"] if t["label"] == "full(epochs=1)" and t["train_size"] == 64]
    assert full["seeds"] == [0, 1] and full["quality_mean"] == pytest.approx(sum(accs) / 2)
    table = runner.invoke(app, ["show", str(study_path)])
    assert table.exit_code == 0 and "linear_probe" in table.stdout
    ls = runner.invoke(app, ["ls", "--store", str(tmp_path / "runs"), "--json"])
    assert json.loads(ls.stdout)["studies"][0]["trials"] == 14


def _start(study_path: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "tunebench", "run", str(study_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_trials(proc: subprocess.Popen, store: Path, n: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while len(stored(store)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "study made no progress"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_killed_study_resumes_with_each_trial_once(study_path, tmp_path, sig):
    store = tmp_path / "runs"
    proc = _start(study_path)
    _wait_for_trials(proc, store, 3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "resume" in err
    before = dict(stored(store))
    assert 3 <= len(before) < 14

    result = runner.invoke(app, ["run", str(study_path), "--json"])
    assert result.exit_code == 0, result.output
    after = dict(stored(store))
    keys = [t["key"] for t in json.loads(result.stdout)["trials"]]
    assert len(keys) == len(set(keys)) == 14
    assert set(after) == set(keys) == planned_keys(study_path)
    assert all(after[k] == v for k, v in before.items())  # finished trials were not run again
    leftovers = [p.name for p in (store / "artifacts").iterdir() if p.name.endswith(".partial")]
    assert leftovers == []


def test_show_lists_only_the_current_plan(study_path, tmp_path):
    assert runner.invoke(app, ["run", str(study_path)]).exit_code == 0
    study = yaml.safe_load(study_path.read_text())
    study["strategies"] = [{"linear_probe": {}}]
    study["training"]["epochs"] = 1  # same labels as before, different trials
    study_path.write_text(yaml.safe_dump(study, sort_keys=False))
    assert runner.invoke(app, ["run", str(study_path)]).exit_code == 0
    doc = json.loads(runner.invoke(app, ["show", str(study_path), "--json"]).stdout)
    assert {t["strategy"] for t in doc["trials"]} == {"linear_probe"}
    assert all(len(e["seeds"]) == 2 for e in doc["leaderboard"])  # old trials are not averaged in
    from tunebench.store import Store

    assert len(Store(tmp_path / "runs").trials("toy-ladder")) == 14 + 4  # the old ones are kept


def test_store_in_the_study_is_relative_to_the_study_file(tmp_path):
    from tunebench.config import parse_study

    base = {"name": "s", "task": {"data": "x.csv", "text": "t", "label": "l"}, "strategies": ["zero_shot"]}
    assert parse_study({**base, "store": "runs"}).store_path(tmp_path) == tmp_path / "runs"
    assert parse_study(base).store_path(tmp_path) == Path("tunebench-runs")  # default: the working directory


def test_a_study_of_several_models_reopens_its_trials(tmp_path, toy_files, tiny_model_dir):
    """The stored config of a `models:` study (its dump carries the default `model` too) loads again: serve, export
    and the judge's comparisons open trials through it."""
    from tunebench.analysis.selection import load_trial
    from tunebench.config import StudyConfig

    doc = toy_study(tmp_path, toy_files, tiny_model_dir, seeds=[0], train_sizes=["all"],
                    strategies=[{"linear_probe": {}}])
    model = doc.pop("model")
    doc["models"] = [{**model, "name": "a"}, {**model, "name": "b", "precision": "auto"}]  # two identities
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    result = CliRunner().invoke(app, ["run", str(path), "--json"])
    assert result.exit_code == 0, result.output
    stored = StudyConfig.model_validate(doc).model_dump()
    with pytest.raises(ValueError, match="not both"):  # what reopening did before: the dump is not a written config
        StudyConfig.model_validate(stored)
    assert [m.name for m in StudyConfig.from_stored(stored).all_models()] == ["a", "b"]
    keys = {t["model"]: t["key"] for t in json.loads(result.stdout)["trials"]}
    for name in ("a", "b"):
        loaded = load_trial(doc["store"], "toy-ladder", keys[name])
        assert loaded.model_config.name == name and loaded.predictor.predict(["good"]).shape == (1,)
