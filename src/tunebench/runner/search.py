"""Hyperparameter search: Optuna TPE over one strategy's parameters, median pruning on per-epoch dev scores.

Every configuration is adapted on the trial's train data with the trial's seed and scored on dev; the runner refits
the best one and scores it once on test (see :func:`tunebench.runner.execute.execute`). What the search optimises is the same for
every strategy: the adapted predictor's predictions on dev, scored with ``SearchConfig.metric`` (default:
accuracy for classification, token F1 of the generated answers for generation). Pruning compares, epoch by
epoch, the score :func:`~tunebench.strategies.training.fit` selects epochs on (dev ``metric`` where the loop
reports it, otherwise the negated dev loss); strategies without epochs (prompting) are scored once and never
pruned.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import SearchConfig
from ..config.metrics import DEFAULT_SEARCH_METRIC
from ..data import Split, TaskData
from ..evaluation.metrics import classification_metrics, generation_metrics
from ..progress import NULL_REPORTER, Reporter
from ..strategies.training import on_epoch
from .spec import set_seed

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """What a search found: the best parameters (the full strategy config), its dev score and every attempt."""

    best_params: dict[str, Any]
    best_score: float
    metric: str
    trace: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    n_trials: int = 0
    n_pruned: int = 0

    def to_dict(self, search: SearchConfig) -> dict:
        """The trial record's ``search`` entry."""
        return {"space": search.space, "metric": self.metric,
                "budget": {"trials": search.trials, "seconds": search.seconds},
                "pruning": search.pruning, "startup": search.startup,
                "best_params": {k: self.best_params[k] for k in search.space}, "best_dev_score": self.best_score,
                "trace": self.trace, "n_trials": self.n_trials, "n_pruned": self.n_pruned,
                "seconds": round(self.seconds, 4)}


def search_metric(search: SearchConfig, task_type: str) -> str:
    return search.metric or DEFAULT_SEARCH_METRIC[task_type]


def dev_score(predictor, dev: Split, task_type: str, metric: str) -> float:
    """``metric`` of ``predictor`` on ``dev``: the search objective, computed alike for every strategy."""
    preds = predictor.predict(dev.records())
    if task_type == "generation":
        return float(generation_metrics(list(preds), dev.targets)[metric])
    labels = predictor.labels
    return float(classification_metrics(dev.labels, np.asarray(preds), labels)[metric])


def _suggest(trial, name: str, spec: Any) -> Any:
    if isinstance(spec, list):
        if all(v is None or isinstance(v, (bool, int, float, str)) for v in spec):
            return trial.suggest_categorical(name, spec)
        return spec[trial.suggest_categorical(name, list(range(len(spec))))]  # e.g. lists: choose by position
    low, high, step, log = spec["low"], spec["high"], spec.get("step"), bool(spec.get("log", False))
    if isinstance(low, int) and isinstance(high, int):
        return trial.suggest_int(name, low, high, step=step or 1, log=log)
    return trial.suggest_float(name, float(low), float(high), step=step, log=log)


def run_search(strategy_cls, base_params: dict[str, Any], search: SearchConfig, backend, task: TaskData,
               train: Split, dev: Split, seed: int, reporter: Reporter = NULL_REPORTER) -> SearchResult:
    """Search ``search.space`` around ``base_params`` (the strategy's resolved config as a dict).

    Each configuration is seeded with ``seed`` (configurations differ only by their parameters) and trained on
    ``train`` with ``dev`` for epoch selection; the sampler is seeded too, so the same seed and a budget in
    trials give the same trace. ``search.seconds`` stops the search once the budget is spent (the running
    configuration finishes first).
    """
    import optuna  # heavy: optuna loads only when a study searches

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    task_type = task.type
    metric = search_metric(search, task_type)
    sampler = optuna.samplers.TPESampler(seed=seed)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=search.startup) if search.pruning == "median"
              else optuna.pruners.NopPruner())
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    errors: list[str] = []

    def objective(trial) -> float:
        params = {name: _suggest(trial, name, spec) for name, spec in search.space.items()}
        trial.set_user_attr("params", params)
        epochs = 0

        def report(epoch: int, dev_metrics: dict[str, float], score: float) -> None:
            nonlocal epochs
            epochs = epoch
            value = dev_metrics.get(metric, score)
            trial.report(float(value), epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch}")

        t0 = time.perf_counter()
        try:
            config = strategy_cls.config_from_dict({**base_params, **params})
            set_seed(seed)
            strategy = strategy_cls(config, seed=seed)  # no reporter: the search draws one bar per configuration
            with on_epoch(report):
                predictor = strategy.adapt(backend, task, train=train, dev=dev)
            return dev_score(predictor, dev, task_type, metric)
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            log.warning("search trial %d (%s) failed: %s", trial.number, params, errors[-1])
            raise
        finally:
            trial.set_user_attr("seconds", time.perf_counter() - t0)
            trial.set_user_attr("epochs", epochs)
            reporter.advance()

    reporter.start(f"search ({search.trials} configurations)", search.trials)
    t0 = time.perf_counter()
    try:
        study.optimize(objective, n_trials=search.trials, timeout=search.seconds, catch=(Exception,))
    finally:
        reporter.stop()
    seconds = time.perf_counter() - t0
    trace = [_trace_entry(t) for t in study.trials]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise RuntimeError(f"search: none of {len(study.trials)} configurations finished"
                           + (f"; first error: {errors[0]}" if errors else ""))
    best = study.best_trial
    best_params = strategy_cls.config_from_dict({**base_params, **best.user_attrs["params"]}).to_dict()
    n_pruned = sum(e["state"] == "pruned" for e in trace)
    log.info("search: %d configurations (%d pruned) in %.1fs; best dev %s %.4f with %s", len(trace), n_pruned,
             seconds, metric, best.value, best.user_attrs["params"])
    return SearchResult(best_params, float(best.value), metric, trace, seconds, len(trace), n_pruned)


def _trace_entry(t) -> dict:
    import optuna  # heavy: optuna loads only when a study searches

    state = {optuna.trial.TrialState.COMPLETE: "complete", optuna.trial.TrialState.PRUNED: "pruned"}.get(t.state, "failed")
    score = t.value if state == "complete" else (t.intermediate_values[max(t.intermediate_values)]
                                                  if state == "pruned" and t.intermediate_values else None)
    return {"number": t.number, "params": t.user_attrs.get("params", {}),
            "dev_score": None if score is None or math.isnan(score) else float(score), "state": state,
            "seconds": round(float(t.user_attrs.get("seconds", 0.0)), 4), "epochs": t.user_attrs.get("epochs", 0)}
