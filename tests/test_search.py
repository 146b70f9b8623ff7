"""Hyperparameter search (budget, pruning, refit, reproducibility, cost) and k-fold cross-validation."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest

from tunebench.config import SearchConfig, parse_study
from tunebench.strategies.resolve import resolve_strategies
from tunebench.errors import ConfigError
from tunebench.strategies.base import StrategyConfig, Strategy
from tunebench.strategies.training import epoch_hook


def study_dict(tmp_path, toy_files, tiny_model_dir, strategies, **extra) -> dict:
    return {
        "name": "toy-search",
        "task": {"type": "classification", "data": {k: str(v) for k, v in toy_files.items()},
                 "text": "text", "label": "label", "labels": {"neg": "negative", "pos": "positive"}},
        "model": {"backend": "encoder", "path": str(tiny_model_dir), "precision": "fp32"},
        "training": {"batch_size": 16, "max_length": 32},
        "strategies": strategies,
        "consistency": {"perturbations": []},
        "store": str(tmp_path / "runs"),
        **extra,
    }


SEARCHED = [{"linear_probe": {"epochs": 2, "search": {"lr": {"low": 1e-4, "high": 0.3, "log": True},
                                                       "dropout": [0.0, 0.3], "trials": 4}}}]


def run_study(doc: dict, base):
    from tunebench.runner.study import Study

    study = Study(parse_study(doc), base_dir=base)
    rows = study.run()
    assert not study.failures, study.failures
    return study, rows


# ---- a fake strategy: deterministic per-epoch dev scores, no model -----------------------------------------------
@dataclass
class FakeConfig(StrategyConfig):
    quality: float = 0.5
    epochs: int = 4
    sleep: float = 0.0


class FakePredictor:
    def __init__(self, quality: float, labels: list[str]):
        self.quality, self.labels = quality, labels

    def predict(self, records):  # the first `quality` share of dev right, the rest wrong
        n = len(records)
        right = int(round(self.quality * n))
        return np.asarray([1] * right + [0] * (n - right))


class Fake(Strategy):
    name = "fake"
    config_cls = FakeConfig
    family = "weight_tuning"
    predictor_cls = None

    def adapt(self, backend, task, *, train, dev):
        hook = epoch_hook()
        for epoch in range(1, self.config.epochs + 1):
            time.sleep(self.config.sleep)
            if hook is not None:
                hook(epoch, {"accuracy": self.config.quality}, self.config.quality)
        return FakePredictor(self.config.quality, task.label_names)


@pytest.fixture()
def all_pos_task(toy_task):
    """The toy task with every dev label 'positive' (id 1), so FakePredictor's accuracy is its quality."""
    toy_task.dev.labels = np.ones(len(toy_task.dev), dtype=np.int64)
    return toy_task


def fake_search(task, seed=0, **search):
    from tunebench.runner.search import run_search

    cfg = SearchConfig.model_validate({"quality": {"low": 0.0, "high": 1.0}, **search})
    return run_search(Fake, FakeConfig().to_dict(), cfg, None, task, task.train, task.dev, seed)


def test_trials_budget_gives_that_many_configurations(all_pos_task):
    result = fake_search(all_pos_task, trials=5, pruning="none")
    assert result.n_trials == 5 and [e["number"] for e in result.trace] == list(range(5))
    assert result.best_score == max(e["dev_score"] for e in result.trace)
    assert result.best_params["quality"] == pytest.approx(result.best_score, abs=1 / len(all_pos_task.dev))


def test_seconds_budget_stops_early(all_pos_task):
    result = fake_search(all_pos_task, trials=200, seconds=0.5, sleep={"low": 0.05, "high": 0.06}, epochs=[2],
                         pruning="none")
    assert 1 <= result.n_trials < 200
    assert result.seconds < 10


def test_worse_than_median_configurations_are_pruned_and_the_hook_is_removed(all_pos_task):
    assert epoch_hook() is None
    result = fake_search(all_pos_task, trials=12, startup=2)
    pruned = [e for e in result.trace if e["state"] == "pruned"]
    assert result.n_pruned == len(pruned) >= 1
    assert all(e["epochs"] < 4 for e in pruned)
    complete = [e for e in result.trace if e["state"] == "complete"]
    assert all(e["epochs"] == 4 for e in complete)
    # a pruned configuration scored below the median of the earlier ones at the epoch it stopped
    first = pruned[0]
    earlier = [e["dev_score"] for e in complete if e["number"] < first["number"]]
    assert first["dev_score"] < np.median(earlier)
    assert epoch_hook() is None  # nothing leaks into later trials
    assert fake_search(all_pos_task, trials=12, startup=2, pruning="none").n_pruned == 0


def test_failed_configurations_are_recorded_and_the_hook_is_removed(all_pos_task):
    from tunebench.runner.search import run_search

    class Broken(Fake):
        def adapt(self, backend, task, *, train, dev):
            if self.config.quality < 0.5:
                raise RuntimeError("boom")
            return super().adapt(backend, task, train=train, dev=dev)

    cfg = SearchConfig.model_validate({"quality": [0.2, 0.8], "trials": 6, "pruning": "none"})
    result = run_search(Broken, FakeConfig().to_dict(), cfg, None, all_pos_task, all_pos_task.train,
                        all_pos_task.dev, 0)
    states = Counter(e["state"] for e in result.trace)
    assert states["failed"] >= 1 and states["complete"] >= 1 and result.best_params["quality"] == 0.8
    assert epoch_hook() is None


def test_searched_study_refits_the_best_and_counts_the_search(tmp_path, toy_files, tiny_model_dir):
    from tunebench.analysis.selection import load_trial
    from tunebench.store import Store

    doc = study_dict(tmp_path, toy_files, tiny_model_dir, SEARCHED)
    _, rows = run_study(doc, tmp_path)
    (row,) = rows
    search = row["record"]["search"]
    assert row["label"] == "linear_probe(epochs=2, search=lr,dropout, trials=4)"
    assert search["n_trials"] == len(search["trace"]) == 4
    assert {e["state"] for e in search["trace"]} <= {"complete", "pruned"}
    # what was refit and stored is the best configuration
    assert {k: row["params"][k] for k in ("lr", "dropout")} == search["best_params"]
    assert row["params"]["epochs"] == 2
    # the refit (same seed, same data) reproduces the search's best dev score
    assert row["metrics"]["dev_accuracy"] == pytest.approx(search["best_dev_score"])
    cost = row["cost"]
    assert cost["search_trials"] == 4 and cost["search_seconds"] > 0
    assert cost["train_seconds"] >= cost["search_seconds"] and cost["adapt_seconds"] >= cost["search_seconds"]
    loaded = load_trial(tmp_path / "runs", "toy-search", row["key"][:8])
    assert loaded.predictor.config.to_dict() == row["params"]
    items = Store(tmp_path / "runs").items([row["key"]])[row["key"]]
    test = parse_study(doc)
    from tunebench.data import load_task

    records = load_task(test.task, tmp_path).test.records()
    assert loaded.predictor.predict(records).tolist() == items["predictions"]


def test_same_seed_reproduces_the_search(tmp_path, toy_files, tiny_model_dir):
    from tunebench.store import Store

    results = []
    for run in ("a", "b"):
        doc = study_dict(tmp_path, toy_files, tiny_model_dir, SEARCHED)
        doc["store"] = str(tmp_path / run)
        _, (row,) = run_study(doc, tmp_path)
        items = Store(tmp_path / run).items([row["key"]])[row["key"]]
        results.append((row, items))
    (a, ia), (b, ib) = results
    sa, sb = a["record"]["search"], b["record"]["search"]
    assert [e["params"] for e in sa["trace"]] == [e["params"] for e in sb["trace"]]
    assert [e["state"] for e in sa["trace"]] == [e["state"] for e in sb["trace"]]
    assert sa["best_params"] == sb["best_params"] and a["params"] == b["params"]
    assert ia["predictions"] == ib["predictions"]
    assert a["key"] == b["key"]


def test_search_changes_the_key_only_when_present(tmp_path, toy_files, tiny_model_dir):
    from tunebench.runner.study import Study

    plain = study_dict(tmp_path, toy_files, tiny_model_dir, [{"linear_probe": {"epochs": 2}}])
    searched = study_dict(tmp_path, toy_files, tiny_model_dir, SEARCHED)
    more = study_dict(tmp_path, toy_files, tiny_model_dir, [{"linear_probe": {
        "epochs": 2, "search": {**SEARCHED[0]["linear_probe"]["search"], "trials": 5}}}])
    keys = [Study(parse_study(d), base_dir=tmp_path).plan()[0].key for d in (plain, searched, more)]
    assert len(set(keys)) == 3


@pytest.mark.parametrize("search, message", [
    ({"lrr": [1e-3]}, "strategies[0].linear_probe.search.lrr: unknown parameter"),
    ({"lr": {"low": 0.1, "high": 0.01}}, "strategies[0].linear_probe.search.lr: low (0.1) must be below high"),
    ({"lr": {"low": 0.0, "high": 0.1, "log": True}}, "search.lr: a log range needs low > 0"),
    ({"lr": {"lo": 0.0, "high": 0.1}}, "search.lr: a range is {low, high}"),
    ({"epochs": [2, 0]}, "strategies[0].linear_probe.search.epochs: value 0 is not valid"),
    ({"epochs": {"low": 1.0, "high": 3.0}}, "search.epochs: 'epochs' is an integer"),
    ({"dropout": "high"}, "search.dropout: give a list of choices or a range"),
    ({"lr": [1e-3], "metric": "rouge_l"}, "search.metric: 'rouge_l' is not a classification metric"),
])
def test_search_config_errors_name_the_field(tmp_path, toy_files, tiny_model_dir, search, message):
    doc = study_dict(tmp_path, toy_files, tiny_model_dir, [{"linear_probe": {"search": search}}])
    with pytest.raises(ConfigError) as exc:
        resolve_strategies(parse_study(doc))
    assert message in str(exc.value)


def test_search_options_are_validated_and_cv_with_search_is_refused(tmp_path, toy_files, tiny_model_dir):
    bad = study_dict(tmp_path, toy_files, tiny_model_dir, [{"linear_probe": {"search": {"lr": [1e-3], "trials": 0}}}])
    with pytest.raises(ConfigError, match=r"strategies.0.search.trials"):
        parse_study(bad)
    both = study_dict(tmp_path, toy_files, tiny_model_dir, SEARCHED, cv=3)
    with pytest.raises(ConfigError, match="nested cross-validation"):
        parse_study(both)
    with pytest.raises(ConfigError, match="cv"):
        parse_study(study_dict(tmp_path, toy_files, tiny_model_dir, [{"linear_probe": {}}], cv=1))


def test_stored_config_with_a_search_validates_again(tmp_path, toy_files, tiny_model_dir):
    from tunebench.config import StudyConfig

    cfg = parse_study(study_dict(tmp_path, toy_files, tiny_model_dir, SEARCHED))
    again = StudyConfig.model_validate(cfg.model_dump())
    assert again.strategies[0].search == cfg.strategies[0].search
    assert again.strategies[0].search.trials == 4 and set(again.strategies[0].search.space) == {"lr", "dropout"}


# ---- cross-validation -----------------------------------------------------------------------------------------
def test_stratified_folds_balance_classes_and_cover_everything():
    from tunebench.data import stratified_folds

    labels = np.asarray([0] * 17 + [1] * 9 + [2] * 5)
    folds = stratified_folds(labels, 3, seed=4)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(labels)))
    for c in range(3):
        counts = [int((labels[f] == c).sum()) for f in folds]
        assert max(counts) - min(counts) <= 1
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    assert [f.tolist() for f in stratified_folds(labels, 3, seed=4)] == [f.tolist() for f in folds]


def test_cv_reports_fold_scores_and_scores_test_once(tmp_path, toy_files, tiny_model_dir):
    from typer.testing import CliRunner

    from tunebench.cli import app
    from tunebench.runner import Study
    from tunebench.runner.cv import CV_SELECTION

    doc = study_dict(tmp_path, toy_files, tiny_model_dir, [{"linear_probe": {"epochs": 2}}], cv=3)
    plain_key = Study(parse_study({**doc, "cv": None}), base_dir=tmp_path).plan()[0].key
    study, rows = run_study(doc, tmp_path)
    (row,) = rows  # one trial per config and seed: the folds are inside it
    assert row["key"] != plain_key
    cv = row["metrics"]["cv"]
    assert cv["k"] == 3 and cv["metric"] == "accuracy" and len(cv["folds"]) == 3
    accs = [f["accuracy"] for f in cv["folds"]]
    assert cv["mean"] == pytest.approx(np.mean(accs)) and cv["std"] == pytest.approx(np.std(accs, ddof=1))
    assert cv["metrics"]["macro_f1"]["mean"] == pytest.approx(np.mean([f["macro_f1"] for f in cv["folds"]]))
    pool = len(study.data.train) + len(study.data.dev)
    assert sum(f["n"] for f in cv["folds"]) == pool  # folds cover train + dev, never test
    assert row["record"]["n_test"] == len(study.data.test) == 16
    assert row["train_size"] == pool - round(CV_SELECTION * 40) * 2  # the final model: pool minus its selection share
    assert row["cost"]["cv_seconds"] > 0

    show = CliRunner().invoke(app, ["show", "toy-search", "--store", str(tmp_path / "runs")])
    assert show.exit_code == 0 and "cv accuracy" in show.stdout
    from tunebench.analysis import analyze
    from tunebench.store import Store

    entry = analyze(Store(tmp_path / "runs"), "toy-search").to_dict()["strategies"][0]
    assert entry["cv"]["cv_mean"] == pytest.approx(cv["mean"]) and entry["cv"]["cv_k"] == 3
