"""k-fold cross-validation of one trial over train + dev pooled (``cv: k`` in a study)."""

from __future__ import annotations

import logging
import numpy as np

from ..config.metrics import headline_metrics
from ..data import Split, TaskData, concat, stratified_folds, stratified_split
from ..evaluation.metrics import classification_metrics, generation_metrics
from ..progress import Reporter
from .spec import TrialSpec, set_seed, train_subset

log = logging.getLogger(__name__)

CV_SELECTION = 0.15  # share of each cross-validation training part held out for epoch selection


def cross_validate(spec: TrialSpec, data: TaskData, backend, reporter: Reporter) -> tuple[dict, Split, Split]:
    """Cross-validate ``spec``; returns the summary and the final model's train and selection splits.

    The pool is dealt into k stratified folds (seeded by the trial seed). For fold i the other folds are the
    training part: a stratified ``CV_SELECTION`` share of it selects epochs (dev), and the trial's train size
    is taken from the rest (the nested subset of the full study). The model is scored on fold i.
    The final model is trained the same way on the whole pool (selection share held out) and scored once on
    test by the caller; test items are never in the pool.
    """
    k = spec.cv
    pool = concat(data.train, data.dev, "train")
    folds = stratified_folds(pool.labels, k, spec.seed)

    def parts(idx: np.ndarray) -> tuple[Split, Split]:
        kept, sel = stratified_split(pool.labels[idx], CV_SELECTION, spec.seed)
        dev = pool.subset(idx[sel])
        dev.name = "dev"
        return train_subset(spec, pool.subset(idx[kept])), dev

    scores = []
    for i, held in enumerate(folds):
        train, dev = parts(np.sort(np.concatenate([f for j, f in enumerate(folds) if j != i])))
        set_seed(spec.seed)
        reporter.start(f"cv fold {i + 1}/{k}", 1)
        predictor = spec.strategy_cls(spec.config, seed=spec.seed).adapt(backend, data, train=train, dev=dev)
        scores.append(_fold_scores(predictor, pool.subset(held), data, len(train)))
        reporter.advance()
        reporter.stop()
    cv = _summary(scores, k)
    log.info("trial %s seed=%d: cv %s %.4f ± %.4f over %d folds", spec.name, spec.seed, cv["metric"], cv["mean"],
             cv["std"], k)
    train, dev = parts(np.arange(len(pool)))
    return cv, train, dev


def _fold_scores(predictor, test: Split, data: TaskData, n_train: int) -> dict:
    preds = predictor.predict(test.records())
    if data.test.targets is not None:
        m = generation_metrics(list(preds), test.targets)
    else:
        m = classification_metrics(test.labels, np.asarray(preds), data.label_names)
    return {"n": len(test), "n_train": n_train, **{key: float(m[key]) for key in headline_metrics(m)}}


def _summary(scores: list[dict], k: int) -> dict:
    names = [key for key in scores[0] if key not in ("n", "n_train")]
    summary = {name: {"mean": float(np.mean([s[name] for s in scores])),
                      "std": float(np.std([s[name] for s in scores], ddof=1))} for name in names}
    main = names[0]
    return {"k": k, "metric": main, "folds": scores, "mean": summary[main]["mean"], "std": summary[main]["std"],
            "metrics": summary, "selection_share": CV_SELECTION}
