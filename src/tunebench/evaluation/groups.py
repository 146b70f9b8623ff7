"""Per-group results: a strategy's metrics within each group of a test-data column (channel, region, segment),
with intervals, the gap between its best and worst group, and which group is worst.

Point values are Fairlearn's ``MetricFrame`` (per-group ``count`` and each metric, computed per seed run and
averaged over seeds, like every other value in tunebench). Fairlearn's own bootstrap is not used for the
intervals: it resamples the rows of one prediction set, not seeds, lets a small group vanish from a resample,
and its interval of ``difference()`` is of the largest minus the smallest group on each resample (the worst
group chosen again every time, which biases the gap upward). Intervals here are the two-level bootstrap of
:mod:`tunebench.evaluation.stats`, stratified by group: every resample draws seeds once, then items within each
group, so group sizes are those of the test set. The gap between the best and the worst group (by point
estimate) is taken on the same resamples, so its interval is paired at both levels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .metrics import classification_metrics, corpus_bleu_chrf
from .stats import ALPHA, CORPUS_METRICS, ITEM_METRICS, distribution, metric_fn, stratified_draws

SMALL = 30  # a group with fewer test items is flagged: its interval is wide and the bootstrap approximate


@dataclass
class GroupScore:
    """One group: its size, its value of each metric and the 95% interval (None with fewer than 2 items)."""

    name: str
    n: int
    values: dict[str, float]
    ci: dict[str, tuple[float, float] | None]

    @property
    def small(self) -> bool:
        return self.n < SMALL

    def to_dict(self) -> dict:
        return {"name": self.name, "n": self.n, "small": self.small, "values": self.values,
                "ci": {k: None if v is None else [float(v[0]), float(v[1])] for k, v in self.ci.items()}}


@dataclass
class Breakdown:
    """A strategy's results by the groups of one column. ``metric`` judges the gap and the worst group; the gap
    is best minus worst group, both chosen by point estimate, with a paired 95% interval (None when either group
    has fewer than 2 items, or there is one group)."""

    column: str
    metric: str
    groups: list[GroupScore]
    best: str
    worst: str
    gap: float
    gap_ci: tuple[float, float] | None
    metrics: list[str] = field(default_factory=list)

    def group(self, name: str) -> GroupScore:
        return next(g for g in self.groups if g.name == name)

    @property
    def small(self) -> list[GroupScore]:
        return [g for g in self.groups if g.small]

    def to_dict(self) -> dict:
        return {"column": self.column, "metric": self.metric, "metrics": self.metrics,
                "groups": [g.to_dict() for g in self.groups], "best": self.best, "worst": self.worst,
                "gap": self.gap, "gap_ci": None if self.gap_ci is None else [float(x) for x in self.gap_ci],
                "small": [g.name for g in self.small]}


def _slice_run(run: dict, idx: np.ndarray) -> dict:
    preds = run["predictions"]
    return {"predictions": [preds[i] for i in idx],
            "scores": {k: [v[i] for i in idx] for k, v in (run.get("scores") or {}).items()}}


def _slice_truth(truth: dict, idx: np.ndarray) -> dict:
    out = {k: v for k, v in truth.items() if k in ("label_names",)}
    for k in ("labels", "targets"):
        if k in truth:
            out[k] = [truth[k][i] for i in idx]
    return out


def _frame_metrics(metrics: Sequence[str], truth: dict, run: dict) -> tuple[dict, dict, object, object]:
    """MetricFrame's ``metrics``, ``sample_params``, ``y_true`` and ``y_pred`` for one run."""
    from fairlearn.metrics import count  # heavy: fairlearn loads pandas and scikit-learn

    fns: dict = {"n": count}
    params: dict = {}
    classification = "labels" in truth
    y_true = np.asarray(truth["labels"] if classification else truth["targets"], dtype=np.int64 if classification
                        else object)
    y_pred = np.asarray(run["predictions"], dtype=np.int64 if classification else object)
    for m in metrics:
        if m in ITEM_METRICS:
            fns[m] = _mean_score
            params[m] = {"score": np.asarray(run["scores"][m], dtype=float)}
        elif m == "macro_f1":
            names = truth["label_names"]
            fns[m] = lambda yt, yp, names=names: classification_metrics(yt, yp, names)["macro_f1"]
        elif m in CORPUS_METRICS:
            k = CORPUS_METRICS.index(m)
            fns[m] = lambda yt, yp, k=k: corpus_bleu_chrf(list(yp), list(yt))[k]
        else:
            raise ValueError(f"no per-group form of metric '{m}'")
    return fns, params, y_true, y_pred


def _mean_score(y_true, y_pred, score) -> float:  # noqa: ARG001 (MetricFrame passes truth and predictions first)
    return float(np.mean(score))


def point_values(column: str, values: Sequence[str], runs: Sequence[dict], truth: dict,
                 metrics: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{group: {"n": size, metric: value}}``: Fairlearn's ``MetricFrame.by_group`` of each run, averaged over
    the runs (seeds)."""
    from fairlearn.metrics import MetricFrame  # heavy: fairlearn loads pandas and scikit-learn

    tables = []
    for run in runs:
        fns, params, y_true, y_pred = _frame_metrics(metrics, truth, run)
        frame = MetricFrame(metrics=fns, y_true=y_true, y_pred=y_pred,
                            sensitive_features={column: np.asarray(values, dtype=object)}, sample_params=params)
        tables.append(frame.by_group)
    by = tables[0].index.tolist()
    return {str(g): {"n": int(tables[0].loc[g, "n"]),
                     **{m: float(np.mean([t.loc[g, m] for t in tables])) for m in metrics}} for g in by}


def breakdown(column: str, values: Sequence[str], runs: Sequence[dict], truth: dict, *, metric: str,
              metrics: Sequence[str] | None = None, seeds: Sequence[int] | None = None, seed: int = 0,
              n_resamples: int | None = None, alpha: float = ALPHA) -> Breakdown:
    """A strategy's results by the groups in ``values`` (each test item's group under ``column``).

    ``runs``: the stored items of each seed run; ``truth``: the stored test set; ``metric`` judges the gap and
    the worst group; ``metrics`` (default: ``metric`` alone) are reported per group, each with its interval."""
    metrics = list(dict.fromkeys([metric, *(metrics or [])]))
    seeds = list(seeds) if seeds is not None else list(range(len(runs)))
    values = np.asarray([str(v) for v in values], dtype=object)
    n = len(runs[0]["predictions"])
    if len(values) != n:
        raise ValueError(f"group column '{column}' has {len(values)} values for {n} test items")
    points = point_values(column, values, runs, truth, metrics)
    names = sorted(points)
    index = {g: np.flatnonzero(values == g) for g in names}
    dists: dict[str, dict[str, np.ndarray | None]] = {m: {} for m in metrics}
    for m in metrics:
        fns = {g: metric_fn(m, [_slice_run(r, index[g]) for r in runs], _slice_truth(truth, index[g]), seeds)
               for g in names}
        B = n_resamples or min(f.n_resamples for f in fns.values())
        for g, d in zip(names, stratified_draws([len(index[g]) for g in names], seeds, B, seed)):
            dists[m][g] = distribution(fns[g], d) if len(index[g]) >= 2 else None
    scores = [GroupScore(g, points[g]["n"], {m: points[g][m] for m in metrics},
                         {m: _interval(dists[m][g], alpha) for m in metrics}) for g in names]
    worst = min(scores, key=lambda s: s.values[metric]).name
    best = max(scores, key=lambda s: s.values[metric]).name
    gap = points[best][metric] - points[worst][metric]
    hi, lo = dists[metric][best], dists[metric][worst]
    gap_ci = _interval(hi - lo, alpha) if best != worst and hi is not None and lo is not None else None
    return Breakdown(column, metric, scores, best, worst, gap, gap_ci, metrics)


def _interval(dist: np.ndarray | None, alpha: float) -> tuple[float, float] | None:
    if dist is None:
        return None
    lo, hi = np.quantile(dist, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)
