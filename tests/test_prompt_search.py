"""prompt_search: searches on train/dev only, within its budget, reproducibly; its trace and prompt are stored."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import toy_rows, write_csv
from tests.test_causal import colour_rows
from tunebench.analysis.selection import load_trial
from tunebench.cli import app
from tunebench.config import TaskConfig, parse_study
from tunebench.data import load_task
from tunebench.errors import ConfigError
from tunebench.strategies import registry
from tunebench.runner.study import Study

runner = CliRunner()


def poisoned(path: Path, out: Path) -> str:
    """The same test inputs with every label swapped: a search that read test labels would choose differently."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    swap = {"pos": "neg", "neg": "pos"}
    write_csv(out, [(t, swap[y]) for t, y in rows[1:]])
    return str(out)


def untimed(trace: list[dict]) -> list[dict]:
    return [{k: v for k, v in t.items() if k != "seconds"} for t in trace]


def encoder_study(tmp_path: Path, files: dict, model_dir: Path, name: str = "ps", **params) -> dict:
    return {"name": name, "store": str(tmp_path / "runs"),
            "task": {"data": {k: str(v) for k, v in files.items()}, "text": "text", "label": "label",
                     "labels": {"neg": "negative", "pos": "positive"}},
            "model": {"path": str(model_dir), "precision": "fp32"},
            "strategies": [{"prompt_search": {"trials": 12, "demo_sets": 2, "shots": 2, **params}}],
            "consistency": {"perturbations": []}}


def run(raw: dict, base: Path) -> tuple[Study, dict]:
    study = Study(parse_study(raw), base_dir=base)
    rows = study.run()
    assert not study.failures, study.failures
    (row,) = rows
    return study, row


def test_encoder_search_stores_its_trace_and_the_winner_is_the_artifact(tmp_path, toy_files, tiny_model_dir):
    study, row = run(encoder_study(tmp_path, toy_files, tiny_model_dir), tmp_path)
    trace = row["record"]["prompt_search"]
    # every candidate is listed, each proposal has its score and cost, the budget was kept
    assert "{{ label }}" in trace["candidates"]["label_template"] and len(trace["candidates"]["label_template"]) > 1
    assert {"none", "typical", "all"} <= set(trace["candidates"]["demos"])
    proposals = [t for t in trace["trace"] if t["trial"] != "final"]
    assert len(proposals) == trace["proposals"] == 12
    assert all({"score", "items", "calls", "label_template", "demos", "weight"} <= set(t) for t in proposals)
    assert trace["calls"] <= trace["budget_calls"] and row["cost"]["prompt_search_calls"] == trace["calls"]
    assert row["cost"]["train_seconds"] >= row["cost"]["prompt_search_seconds"] > 0  # search effort is the trial's cost
    # the best proposal's dev score is what the stored artifact scores on dev
    # candidates are selected on dev plus every train example left out of its own demonstrations
    assert max(p["score"] for p in proposals) == pytest.approx(trace["best_score"])
    assert trace["best_items"] == len(study.data.dev) + len(study.data.train)
    assert trace["best_dev_items"] == len(study.data.dev)
    assert row["metrics"]["dev_score"] == pytest.approx(trace["best_dev_score"])
    loaded = load_trial(tmp_path / "runs", "ps", row["key"])
    dev = study.data.dev
    got = float((np.asarray(loaded.predictor.predict(dev.records())) == dev.labels).mean())
    assert got == pytest.approx(trace["best_dev_score"])
    assert loaded.predictor.prompt_info()["label_template"] == trace["chosen"]["label_template"]
    # and the chosen label prompt is in the registry, with the trial that used it
    shown = runner.invoke(app, ["prompts", "log", "ps.prompt_search.label", "--store", str(tmp_path / "runs")])
    assert shown.exit_code == 0, shown.output
    assert row["key"][:8] in shown.output
    # show --prompts and the report describe what the search chose (a study of prompting strategies only)
    shown = runner.invoke(app, ["show", "ps", "--store", str(tmp_path / "runs"), "--prompts"])
    assert shown.exit_code == 0, shown.output
    assert "encoder prompt search" in shown.output and trace["chosen"]["label_template"] in shown.output
    report = runner.invoke(app, ["report", "ps", "--store", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")])
    assert report.exit_code == 0, report.output
    html = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    assert "encoder prompt search" in html


def test_search_never_reads_test_labels(tmp_path, toy_files, tiny_model_dir):
    clean_dir, bad_dir = tmp_path / "clean", tmp_path / "poisoned"
    clean_dir.mkdir()
    bad_dir.mkdir()
    _, clean = run(encoder_study(clean_dir, toy_files, tiny_model_dir), clean_dir)
    files = {**toy_files, "test": poisoned(toy_files["test"], tmp_path / "poisoned-test.csv")}
    _, bad = run(encoder_study(bad_dir, files, tiny_model_dir), bad_dir)
    # the search saw the same train/dev: same proposals, same scores, same winner ...
    assert untimed(bad["record"]["prompt_search"]["trace"]) == untimed(clean["record"]["prompt_search"]["trace"])
    assert bad["record"]["prompt_search"]["chosen"] == clean["record"]["prompt_search"]["chosen"]
    # ... while the test labels really differ: the same predictions score 1 - accuracy
    assert bad["metrics"]["accuracy"] == pytest.approx(1 - clean["metrics"]["accuracy"])


def test_adapt_gets_no_test_split(tiny_backend, toy_task):
    """The strategy is handed train and dev; a test split that explodes when touched is never touched."""

    class Explodes:
        def __getattr__(self, name):
            raise AssertionError(f"prompt_search read the test split ({name})")

        def __len__(self):
            raise AssertionError("prompt_search read the test split (len)")

    toy_task.test = Explodes()
    cls = registry.get("prompt_search")
    strategy = cls(cls.config_from_dict({"trials": 6, "shots": 2}), seed=0)
    predictor = strategy.adapt(tiny_backend, toy_task, train=toy_task.train, dev=toy_task.dev)
    assert predictor.search_trace["proposals"] == 6


def test_budget_of_calls_is_respected_and_too_small_a_budget_fails_clearly(tiny_llama, tmp_path):
    task = load_task(TaskConfig(data={k: str(write_csv(tmp_path / f"{k}.csv", colour_rows(n, s)))
                                      for k, n, s in (("train", 32, 1), ("dev", 24, 2), ("test", 8, 3))},
                                text="text", label="label", instruction="Name the colour."))
    cls = registry.get("prompt_search")
    cfg = cls.config_from_dict({"trials": 50, "minibatch": 8, "budget_calls": 60, "propose": 2, "shots": 1,
                                "demo_sets": 1, "max_new_tokens": 4})
    predictor = cls(cfg, seed=0).adapt(tiny_llama, task, train=task.train, dev=task.dev)
    trace = predictor.search_trace
    assert trace["calls"] <= 60
    assert trace["proposals"] < 50  # stopped by the budget, not by the number of trials
    # one minibatch per proposal (twice the calls with retrieved demonstrations: each input is embedded too)
    assert all(t["calls"] <= 16 for t in trace["trace"] if t["trial"] != "final")
    # the model's own instructions are candidates, next to the user's and the pattern library's
    assert trace["candidates"]["instruction"][0] == "Name the colour."
    assert len(trace["candidates"]["instruction"]) >= 5
    assert {"none", "balanced#0"} <= set(trace["candidates"]["demos"])
    small = cls.config_from_dict({"budget_calls": 3, "propose": 0})
    with pytest.raises(ConfigError, match="budget_calls=3"):
        cls(small, seed=0).adapt(tiny_llama, task, train=task.train, dev=task.dev)


def test_causal_search_reproduces_with_its_seed_and_serves_what_it_chose(tmp_path, tiny_llama_dir, tiny_model_dir):
    files = {k: str(write_csv(tmp_path / f"{k}.csv", colour_rows(n, s)))
             for k, n, s in (("train", 32, 1), ("dev", 16, 2), ("test", 8, 3))}

    def raw(store: str) -> dict:
        return {"name": "cps", "store": str(tmp_path / store),
                "task": {"data": files, "text": "text", "label": "label", "instruction": "Name the colour."},
                "model": {"backend": "causal", "path": str(tiny_llama_dir), "precision": "fp32",
                          "retriever": str(tiny_model_dir)},
                "strategies": [{"prompt_search": {"trials": 8, "minibatch": 8, "propose": 1, "shots": 1,
                                                  "demo_sets": 1, "max_length": 256}}],
                "consistency": {"perturbations": []}, "seeds": [3]}

    _, a = run(raw("a"), tmp_path)
    _, b = run(raw("b"), tmp_path)
    ta, tb = a["record"]["prompt_search"], b["record"]["prompt_search"]
    assert untimed(ta["trace"]) == untimed(tb["trace"]) and ta["chosen"] == tb["chosen"] and ta["candidates"] == tb["candidates"]
    assert "retrieved" in ta["candidates"]["demos"]
    # the stored prompt is the chosen one, and the reloaded trial predicts as it was scored
    assert a["record"]["prompt"]["template"] == ta["chosen"]["template"]
    assert a["record"]["prompt"]["instruction"] in (ta["chosen"]["instruction"], None)
    loaded = load_trial(tmp_path / "a", "cps", a["key"])
    study = Study(parse_study(raw("a")), base_dir=tmp_path)
    items = study.store.items([a["key"]])[a["key"]]
    assert list(loaded.predictor.predict(study.data.test.records())) == items["predictions"]


def test_config_errors_name_the_field():
    cls = registry.get("prompt_search")
    for params, field in (({"budget_calls": 0}, "budget_calls"), ({"minibatch": 0}, "minibatch"),
                          ({"label_templates": ["no label here"]}, "label"), ({"colour": 1}, "colour")):
        with pytest.raises(ConfigError, match=field):
            cls.config_from_dict(params)


def test_a_searched_encoder_prompt_exports_and_the_card_code_reproduces_it(tmp_path, toy_files, tiny_model_dir):
    from tests.test_export import snippet
    from tunebench.export import export_trial

    # force the soft nearest-neighbour scorer with calibration and label prompts: the parts a card must carry
    _, row = run(encoder_study(tmp_path, toy_files, tiny_model_dir, trials=25), tmp_path)
    loaded = load_trial(tmp_path / "runs", "ps", row["key"])
    pred = loaded.predictor
    export_trial(loaded, tmp_path / "hf", "hf")
    ns = snippet(tmp_path / "hf")
    texts = [t for t, _ in toy_rows(12, 9)]
    np.testing.assert_allclose(ns["predict_scores"](texts).numpy(), pred.predict_scores(texts), atol=1e-4)
    # and the same holds for the kernel scorer, whichever the search chose here
    pred.mode, pred.tau, pred.label_weight = "kernel", 0.07, 0.3
    pred.center = pred.anchors.mean(0)
    pred.label_anchors = pred.anchors[:2].clone()
    export_trial(loaded, tmp_path / "hf-kernel", "hf")
    ns = snippet(tmp_path / "hf-kernel")
    np.testing.assert_allclose(ns["predict_scores"](texts).numpy(), pred.predict_scores(texts), atol=1e-4)


def test_a_search_started_from_a_registered_prompt_does_not_rewrite_it():
    from tunebench.store.prompts import templates_of

    row = {"study": "s", "strategy": "prompt_search", "label": "prompt_search", "key": "k",
           "params": {"prompt": "support-intent@2", "template": "Text: {{ input }}\nAnswer:"},
           "record": {"prompt": {"template": "### Task\n{{ input }}", "instruction": None}, "config": {"task": {}}}}
    assert [n for n, *_ in templates_of(row)] == ["s.prompt_search"]  # the winner is another template
    row["record"]["prompt"]["template"] = row["params"]["template"]
    assert [n for n, *_ in templates_of(row)] == ["support-intent"]  # it kept the referenced text
