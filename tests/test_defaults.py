"""Tuning defaults that scale with the data, and ``search: auto`` (issue 18)."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from tests.test_search import run_study, study_dict
from tunebench.config import parse_study
from tunebench.errors import ConfigError
from tunebench.runner.study import Study
from tunebench.strategies import registry
from tunebench.strategies.defaults import AUTO_SEARCHED, RULES, auto_search, patience, scaled_defaults


@pytest.mark.parametrize("strategy,n,classes,expected", [
    # few examples: small batches, the epoch ceiling, patience a fifth of it
    ("full", 100, 2, {"lr": 1e-4, "epochs": 20, "batch_size": 16, "early_stopping": 4}),
    ("lora", 100, 2, {"lr": 1e-3, "epochs": 20, "batch_size": 16, "early_stopping": 4}),
    # 1,000 examples of 2 classes: 32 steps per epoch, 400 steps in all
    ("full", 1000, 2, {"lr": 1e-4, "epochs": 13, "batch_size": 32, "early_stopping": 2}),
    # many classes with few examples each: twice the steps, 3x the learning rate
    ("full", 1000, 77, {"lr": 3e-4, "epochs": 20, "batch_size": 32, "early_stopping": 4}),
    ("lora", 100, 77, {"lr": 3e-3, "epochs": 20, "batch_size": 16, "early_stopping": 4}),
    ("lora", 10_000, 77, {"lr": 1e-3, "epochs": 3, "batch_size": 32, "early_stopping": 0}),  # 130 per class
    # 10,000 examples: the floor of 3 epochs, no early stopping
    ("lora", 10_000, 2, {"lr": 1e-3, "epochs": 3, "batch_size": 32, "early_stopping": 0}),
    ("gradual_unfreeze", 10_000, 2, {"lr": 1e-4, "epochs": 6, "batch_size": 32, "early_stopping": 2}),
])
def test_scaled_defaults_table(strategy, n, classes, expected):
    assert scaled_defaults(strategy, n, classes, "encoder") == expected


def test_scaled_defaults_are_valid_configs_and_only_for_calibrated_cases():
    for name in RULES:
        for n in (1, 10, 100, 999, 1000, 5000, 10_000, 1_000_000):
            for classes in (0, 2, 77, 500):
                values = scaled_defaults(name, n, classes, "encoder")
                registry.get(name).config_from_dict(values)  # every value in range for the strategy
                assert values["epochs"] >= RULES[name].min_epochs
    assert scaled_defaults("lora", 100, 2, "causal") == {}  # not calibrated on causal LMs
    assert scaled_defaults("zero_shot", 100, 2, "encoder") == {}
    assert scaled_defaults("linear_probe", 100, 2, "encoder") == {}  # not calibrated: its fixed defaults
    assert scaled_defaults("full", 100, 2, "encoder")["epochs"] >= scaled_defaults("full", 10_000, 2, "encoder")["epochs"]
    assert [patience(e) for e in (1, 4, 5, 10, 20)] == [0, 0, 2, 2, 4]


def plan(tmp_path, toy_files, tiny_model_dir, strategies, **extra):
    doc = study_dict(tmp_path, toy_files, tiny_model_dir, strategies, **extra)
    doc["training"] = {"max_length": 32}
    return Study(parse_study(doc), base_dir=tmp_path).plan()


def test_explicit_values_win_over_scaled_defaults(tmp_path, toy_files, tiny_model_dir):
    trials = plan(tmp_path, toy_files, tiny_model_dir, [{"lora": {"lr": 5e-4}}, {"full": {"epochs": 2}}, "linear_probe"],
                  train_sizes=[32, "all"])
    by = {(t.strategy, t.train_size): t.config for t in trials}
    assert {n for _, n in by} == {32, 64}
    lora, full = by[("lora", 32)], by[("full", 64)]
    assert lora.lr == 5e-4 and lora.epochs == 20 and lora.batch_size == 16  # lr written; the rest scaled
    assert full.epochs == 2 and full.early_stopping == 0 and full.lr == 1e-4  # patience follows the written epochs
    assert by[("linear_probe", 32)] == registry.get("linear_probe").config_from_dict({"max_length": 32})
    labels = [t.name for t in plan(tmp_path, toy_files, tiny_model_dir, ["full", {"full": {"epochs": 4, "lr": 1e-4}}])]
    assert labels == ["full", "full(lr=0.0001, epochs=4)"]  # written values that override scaling are shown
    fixed = plan(tmp_path, toy_files, tiny_model_dir, ["lora"], tuning_defaults="fixed")
    assert fixed[0].config == registry.get("lora").config_from_dict({"max_length": 32})
    assert {t.key for t in fixed}.isdisjoint(t.key for t in trials)


def test_search_auto_is_concrete_per_trial(tmp_path, toy_files, tiny_model_dir):
    trials = plan(tmp_path, toy_files, tiny_model_dir,
                  [{"lora": {"r": 4, "search": "auto"}}, {"full": {"search": {"auto": True, "trials": 3, "epochs": [1, 2]}}}])
    lora, full = trials
    assert lora.name == "lora(r=4, search=auto)" and full.name == "full(search=auto+epochs, trials=3)"
    space, budget = auto_search("lora", 64, 2, "encoder", lora.config.to_dict(), {"r", "max_length", "batch_size"})
    assert lora.search.space == space and lora.search.trials == budget == 12
    assert "r" not in lora.search.space and set(lora.search.space) == {"lr", "epochs", "alpha"}
    assert lora.search.space["lr"] == {"low": 2.5e-4, "high": 4e-3, "log": True}
    assert full.search.trials == 3 and full.search.space["epochs"] == [1, 2] and "lr" in full.search.space
    assert auto_search("full", 100_000, 2, "encoder", {"lr": 1e-4, "epochs": 3})[1] == 6  # fewer when dearer
    for name in AUTO_SEARCHED:  # every auto space holds values its strategy accepts
        base = registry.get(name).config_from_dict({}).to_dict()
        for key, spec in auto_search(name, 100, 2, "encoder", base)[0].items():
            for value in (spec if isinstance(spec, list) else [spec["low"], spec["high"]]):
                registry.get(name).config_from_dict({key: value})


def test_search_auto_where_it_does_not_apply(tmp_path, toy_files, tiny_model_dir):
    with pytest.raises(ConfigError, match=r"strategies\[0\]\.zero_shot\.search: auto is defined for the tuning"):
        plan(tmp_path, toy_files, tiny_model_dir, [{"zero_shot": {"search": "auto"}}])
    with pytest.raises(ConfigError, match="auto has nothing left to search"):
        plan(tmp_path, toy_files, tiny_model_dir,
             [{"linear_probe": {"lr": 1e-3, "epochs": 2, "weight_decay": 0.0, "search": "auto"}}])


def test_search_auto_runs_within_budget_and_records_its_trials(tmp_path, toy_files, tiny_model_dir):
    doc = study_dict(tmp_path, toy_files, tiny_model_dir,
                     [{"linear_probe": {"epochs": 3, "search": {"auto": True, "trials": 3}}}])
    _, rows = run_study(doc, tmp_path)
    (row,) = rows
    search = row["record"]["search"]
    assert search["budget"]["trials"] == 3 and search["n_trials"] == len(search["trace"]) <= 3
    assert set(search["space"]) == {"lr", "weight_decay"} and set(search["best_params"]) == {"lr", "weight_decay"}
    assert row["cost"]["search_trials"] == search["n_trials"] and row["cost"]["search_seconds"] > 0
    assert row["params"]["lr"] == search["best_params"]["lr"]  # the refit ran the best configuration


def test_a_rerun_gives_stored_trials_their_current_label(tmp_path, toy_files, tiny_model_dir):
    """Labels follow the code: a trial stored under an older label ('full' for what is now
    'full(lr=0.0001, epochs=2)') takes the current one on the next run, without training again, so `show` no
    longer groups two configs under one name."""
    from tunebench.store import Store

    doc = study_dict(tmp_path, toy_files, tiny_model_dir, [{"linear_probe": {"epochs": 2}}])
    _, rows = run_study(doc, tmp_path)
    (row,) = rows
    store = Store(str(tmp_path / "runs"))
    store._write(lambda con: con.execute(text("UPDATE trials SET label = 'stale' WHERE key = :k"),
                                         {"k": row["key"]}), "age the label")
    assert store.trials("toy-search")[0]["label"] == "stale"
    _, again = run_study(doc, tmp_path)
    assert [(r["key"], r["label"], r["finished_at"]) for r in again] == [(row["key"], row["label"],
                                                                         row["finished_at"])]
