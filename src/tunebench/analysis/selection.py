"""Choosing a stored trial: by id prefix, or the best of a study by the analysis' comparison."""

from __future__ import annotations

from pathlib import Path

from ..errors import StoreError
from ..store import Store
from ..store.artifacts import LoadedTrial, open_trial
from .evidence import analyze

MIN_PREFIX = 6


def find_trial(store: Store, study: str, trial: str | None = None, *, best: bool = False,
               metric: str | None = None) -> dict:
    """The stored row of ``trial`` (a key or a unique prefix of at least 6 characters), or of the best trial.

    Best: the top strategy of the study's leaderboard (each strategy at its largest train size, ranked by the
    metric's mean over seeds), and among its seeds the one that scored highest.
    """
    rows = store.trials(study, store.current_keys(study))
    if not rows:
        raise StoreError(f"study '{study}' has no finished trial in {store.display}; run it first")
    if trial is not None:
        if len(trial) < MIN_PREFIX:
            raise StoreError(f"--trial: give at least {MIN_PREFIX} characters of the trial id (`tunebench show "
                             f"{study}` lists them)")
        found = [r for r in rows if r["key"].startswith(trial)]
        if not found:
            raise StoreError(f"--trial: study '{study}' has no trial '{trial}' (`tunebench show {study}` lists them)")
        if len(found) > 1:
            raise StoreError(f"--trial: '{trial}' matches {len(found)} trials; give more characters")
        return found[0]
    if not best:
        raise StoreError("say which trial: --trial ID, or --best for the top of the leaderboard")
    evidence = analyze(store, study, metric=metric)
    top = evidence.best
    if top is None:
        raise StoreError(f"study '{study}' has no scored trial")
    m = evidence.metric
    return max(top.rows, key=lambda r: r["metrics"].get(m, float("-inf")))


def load_trial(store_root: str | Path, study: str, trial: str | None = None, *, best: bool = False,
               metric: str | None = None, backend=None) -> LoadedTrial:
    """Find a stored trial (``trial`` id prefix, or ``best``) and load its predictor on its model."""
    store = Store(store_root, create=False)
    return open_trial(store, study, find_trial(store, study, trial, best=best, metric=metric), backend)
