"""A store written by tunebench before the layered rewrite (``tests/fixtures/old_store``, made by
``tests/fixtures/make_old_store.py`` on the old code) still works: a rerun plans the same trial keys and runs
nothing (with the options that reproduce what its trials ran: ``tuning_defaults: fixed``, and ``embeddings: false``
for LoRA on a causal LM), and ``show``, ``report``, ``serve`` and ``export`` read it."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from tunebench.analysis.selection import load_trial
from tunebench.cli import app
from tunebench.runner import Study, load_study
from tunebench.serve import create_app, trial_engine
from tunebench.store import Store

FIXTURE = Path(__file__).parent / "fixtures" / "old_store"
runner = CliRunner()


@pytest.fixture()
def old(tmp_path, monkeypatch) -> Path:
    """A copy of the fixture (its paths are relative to the working directory, as the old study files wrote them)."""
    work = tmp_path / "old"
    shutil.copytree(FIXTURE, work)
    monkeypatch.chdir(work)
    return work


def finished(work: Path) -> dict[str, float]:
    with sqlite3.connect(work / "tunebench-runs" / "tunebench.db") as con:
        return dict(con.execute("SELECT key, finished_at FROM trials").fetchall())


def pinned(study: str) -> str:
    """The study as the old code ran it: fixed tuning defaults, LoRA without adapted embeddings."""
    doc = yaml.safe_load(Path(study).read_text())
    doc["tuning_defaults"] = "fixed"
    for entry in doc["strategies"]:
        if "lora" in entry:
            entry["lora"] = {**(entry["lora"] or {}), "embeddings": False}
    out = f"pinned-{study}"
    Path(out).write_text(yaml.safe_dump(doc))
    return out


def test_rerun_plans_the_stored_keys_and_runs_nothing(old):
    before = finished(old)
    assert len(before) == 8
    for study in (pinned("study.yaml"), pinned("causal.yaml")):
        cfg, base = load_study(study)
        keys = {t.key for t in Study(cfg, base_dir=base, store=Store("tunebench-runs")).plan()}
        assert keys <= set(before), f"{study}: the new code plans keys the old store does not have"
        result = runner.invoke(app, ["run", study, "--json"])
        assert result.exit_code == 0, result.output
        doc = json.loads(result.stdout)
        assert {t["key"] for t in doc["trials"]} == keys
    assert finished(old) == before  # nothing rerun, nothing rewritten


def test_new_defaults_replan_only_the_trials_they_change(old):
    """As written, the old studies get size-scaled tuning defaults and causal LoRA adapts the embeddings. The encoder
    study writes its epochs and batch size, and the scaled learning rates and patience equal the fixed ones there:
    its keys stay. The causal LoRA trial now trains differently: it gets a new key, so a rerun trains it again."""
    before = set(finished(old))
    for study, tuned in (("study.yaml", set()), ("causal.yaml", {"lora"})):
        cfg, base = load_study(study)
        trials = Study(cfg, base_dir=base, store=Store("tunebench-runs")).plan()
        assert {t.strategy for t in trials if t.key not in before} == tuned
        assert all(t.key in before for t in trials if t.strategy not in tuned)


def test_show_and_report_read_the_old_store(old):
    rows = {r["key"]: r for r in Store("tunebench-runs").trials("old-encoder")}
    result = runner.invoke(app, ["show", "old-encoder", "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert {t["key"] for t in shown["trials"]} == set(rows)
    for t in shown["trials"]:
        assert t["metrics"]["accuracy"] == rows[t["key"]]["metrics"]["accuracy"]
    out = old / "rep"
    result = runner.invoke(app, ["report", "old-encoder", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["analysis"]["study"] == "old-encoder"
    assert (out / "report.html").stat().st_size > 1000


@pytest.mark.parametrize("study,strategy", [("old-encoder", "lora"), ("old-encoder", "few_shot"),
                                            ("old-causal", "lora")])
def test_old_artifacts_load_and_predict_what_was_stored(old, study, strategy):
    store = Store("tunebench-runs")
    row = next(r for r in store.trials(study) if r["strategy"] == strategy)
    loaded = load_trial("tunebench-runs", study, row["key"])
    cfg, base = load_study("study.yaml" if study == "old-encoder" else "causal.yaml")
    records = Study(cfg, base_dir=base).data.test.records()
    predicted = [int(p) for p in loaded.predictor.predict(records)]
    assert predicted == store.items([row["key"]])[row["key"]]["predictions"]


def test_serve_and_export_work_on_the_old_store(old):
    store = Store("tunebench-runs")
    lora = next(r for r in store.trials("old-encoder") if r["strategy"] == "lora")
    app_ = create_app(trial_engine(Path("tunebench-runs"), "old-encoder", lora["key"], best=False),
                      api_keys={"k" * 24})
    with TestClient(app_) as client:
        r = client.post("/v1/classify", json={"input": "the movie was great"},
                        headers={"Authorization": f"Bearer {'k' * 24}"})
    assert r.status_code == 200, r.text
    scores = r.json()["data"][0]["scores"]
    assert set(scores) == {"negative", "positive"} and np.isclose(sum(scores.values()), 1.0)
    for study, strategy, fmt in (("old-encoder", "lora", "merged"), ("old-causal", "lora", "hf")):
        key = next(r["key"] for r in store.trials(study) if r["strategy"] == strategy)
        result = runner.invoke(app, ["export", study, "--trial", key, "--format", fmt, "--out", f"exp-{fmt}",
                                     "--json"])
        assert result.exit_code == 0, result.output
        assert (old / f"exp-{fmt}" / "README.md").is_file()
