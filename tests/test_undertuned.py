"""A tuning rung whose dev curve was still improving at its last epoch, or whose search chose a value at the edge
of its range, is flagged as possibly under-tuned in `show`, the report and the recommendation."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from tunebench.analysis.leaderboard import group_flags, tuning_flags
from tunebench.cli import app

from .conftest import write_csv
from .test_causal import colour_rows


def row(history=(), best_epoch=None, metric="accuracy", search=None, seed=0) -> dict:
    return {"history": [dict(h) for h in history], "params": {"metric": metric}, "seed": seed,
            "record": {"best_epoch": best_epoch, **({"search": search} if search else {})}}


@pytest.mark.parametrize("case, flagged", [
    (row([{"dev_accuracy": 0.70}, {"dev_accuracy": 0.80}], best_epoch=2), "still improving"),
    (row([{"dev_accuracy": 0.70}, {"dev_accuracy": 0.7005}], best_epoch=2), None),  # within 0.001: flat
    (row([{"dev_accuracy": 0.80}, {"dev_accuracy": 0.70}], best_epoch=1), None),  # peaked earlier
    (row([{"dev_accuracy": 0.80}], best_epoch=1), None),  # one epoch: no curve to read
    (row([{"dev_macro_f1": 0.5, "dev_accuracy": 0.9}, {"dev_macro_f1": 0.6, "dev_accuracy": 0.9}], best_epoch=2,
         metric="macro_f1"), "dev macro_f1 still improving"),
    (row([{"dev_loss": 2.0}, {"dev_loss": 1.5}], best_epoch=2), "dev loss still falling"),
    (row([{"dev_loss": 2.0}, {"dev_loss": 1.995}], best_epoch=2), None),  # under 1% relative
    (row([], search={"space": {"lr": {"low": 1e-5, "high": 1e-3, "log": True}}, "best_params": {"lr": 1e-3}}),
     "search: lr=0.001 at the upper edge of its range [1e-05, 0.001] (log)"),
    (row([], search={"space": {"lr": {"low": 1e-5, "high": 1e-3, "log": True}}, "best_params": {"lr": 1e-4}}), None),
    (row([], search={"space": {"epochs": {"low": 1, "high": 10}}, "best_params": {"epochs": 1}}),
     "search: epochs=1 at the lower edge"),
    (row([], search={"space": {"r": [4, 8, 16]}, "best_params": {"r": 16}}), "search: r=16 at the upper edge"),
    (row([], search={"space": {"r": [4, 16]}, "best_params": {"r": 16}}), None),  # two choices: no inside
    (row([], search={"space": {"predict": ["score", "generate"]}, "best_params": {"predict": "score"}}), None),
])
def test_tuning_flags_table(case, flagged):
    flags = tuning_flags(case)
    if flagged is None:
        assert flags == []
    else:
        assert len(flags) == 1 and flagged in flags[0], flags


def test_group_flags_name_the_seeds_they_apply_to():
    rising = [{"dev_accuracy": 0.7}, {"dev_accuracy": 0.8}]
    flat = [{"dev_accuracy": 0.8}, {"dev_accuracy": 0.8}]
    assert group_flags([row(rising, 2, seed=0), row(rising, 2, seed=1)]) == [
        "dev accuracy still improving at the last epoch: may improve with more epochs"]
    assert group_flags([row(rising, 2, seed=0), row(flat, 1, seed=1)]) == [
        "dev accuracy still improving at the last epoch: may improve with more epochs (seed 0)"]


def test_a_run_stopped_while_its_dev_curve_improves_is_flagged_everywhere(tmp_path, tiny_llama_dir):
    """Two epochs of full fine-tuning of the tiny random Llama on a generation task: its dev loss is still falling
    fast after epoch 2, so `show`, the report and the recommendation say the rung may improve."""
    rows = [(w, f"the {c}") for w, c in colour_rows(64, 5)]
    data = str(write_csv(tmp_path / "gen.csv", rows, header=("word", "phrase")))
    study = {"name": "under", "task": {"type": "generation", "data": data, "text": "word", "target": "phrase"},
             "model": {"backend": "causal", "path": str(tiny_llama_dir), "precision": "fp32"},
             "strategies": [{"zero_shot": {"max_new_tokens": 4}},
                            {"full": {"epochs": 2, "lr": 1e-3, "batch_size": 16, "max_length": 48}}],
             "store": str(tmp_path / "runs")}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study), encoding="utf-8")
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(path), "--json"])
    assert result.exit_code == 0, result.output
    trial = next(t for t in json.loads(result.stdout)["trials"] if t["strategy"] == "full")
    losses = [h["dev_loss"] for h in trial["history"]]
    assert losses[1] < 0.99 * losses[0], losses  # the premise: still falling at the last epoch

    shown = runner.invoke(app, ["show", str(path)])
    assert shown.exit_code == 0
    text = " ".join(shown.output.split())
    assert "⚑ full(" in text and "dev loss still falling at the last epoch" in text
    assert text.count("⚑") == 2 and "⚑ zero_shot" not in text  # the mark in the table and its footnote

    rec = runner.invoke(app, ["recommend", str(path), "--json"])
    doc = json.loads(rec.stdout)
    assert len(doc["undertuned"]) == 1 and next(iter(doc["undertuned"])).startswith("full")
    assert "Not final for full" in doc["summary"]
    full = next(r for r in doc["ranking"] if r["label"].startswith("full"))
    assert any(r.startswith("may be under-tuned") for r in full["reasons"])

    report = runner.invoke(app, ["report", str(path), "--out", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    html = (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
    assert "⚑ dev loss still falling at the last epoch" in html
