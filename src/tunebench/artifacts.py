"""Finding a stored trial and loading it back as a working predictor (what ``serve`` and ``export`` start from)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ModelConfig, StudyConfig
from .errors import StoreError
from .store import Store

log = logging.getLogger(__name__)

MIN_PREFIX = 6


@dataclass
class LoadedTrial:
    """A stored trial with its model loaded: the backend, the predictor rebuilt from its artifact, its facts."""

    study: str
    row: dict
    model_config: ModelConfig
    backend: Any
    predictor: Any
    task_type: str
    task: dict
    artifact: Path

    @property
    def key(self) -> str:
        return self.row["key"]

    @property
    def labels(self) -> list[str]:
        return list(self.predictor.labels)

    @property
    def name(self) -> str:
        """The id clients use (``model`` in OpenAI requests): the study and the trial's short key."""
        return f"{self.study}:{self.key[:8]}"


def find_trial(store: Store, study: str, trial: str | None = None, *, best: bool = False,
               metric: str | None = None) -> dict:
    """The stored row of ``trial`` (a key or a unique prefix of at least 6 characters), or of the best trial.

    Best: the top strategy of the study's leaderboard (each strategy at its largest train size, ranked by the
    metric's mean over seeds), and among its seeds the one that scored highest.
    """
    rows = store.trials(study, store.current_keys(study))
    if not rows:
        raise StoreError(f"study '{study}' has no finished trial in {store.root}; run it first")
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
    from .analysis import analyze

    evidence = analyze(store, study, metric=metric)
    top = evidence.best
    if top is None:
        raise StoreError(f"study '{study}' has no scored trial")
    m = evidence.metric
    return max(top.rows, key=lambda r: r["metrics"].get(m, float("-inf")))


def load_trial(store_root: str | Path, study: str, trial: str | None = None, *, best: bool = False,
               metric: str | None = None, backend=None) -> LoadedTrial:
    """Load a stored trial's predictor on its model (``backend`` may be passed when already loaded)."""
    from .backends import load_backend
    from .strategies import load_predictor

    store = Store(store_root, create=False)
    row = find_trial(store, study, trial, best=best, metric=metric)
    doc = store.study_config(study)["config"]
    try:
        cfg = StudyConfig.model_validate(doc)
    except Exception as exc:  # a store written by another version
        raise StoreError(f"study '{study}': its stored config no longer validates: {exc}") from None
    models = {m.name: m for m in cfg.all_models()}
    model_name = row["record"].get("model") or next(iter(models))
    if model_name not in models:
        raise StoreError(f"trial {row['key'][:8]}: its model '{model_name}' is not in the study's config any more")
    if not row.get("artifact"):
        raise StoreError(f"trial {row['key'][:8]} ({row['label']}) has no saved artifact")
    artifact = store.root / row["artifact"]
    mc = models[model_name]
    if backend is None:
        backend = load_backend(mc)
    predictor = load_predictor(artifact, backend)
    log.info("loaded trial %s (%s) from %s", row["key"][:8], row["label"], artifact)
    return LoadedTrial(study, row, mc, backend, predictor, cfg.task.type, cfg.task.model_dump(), artifact)
