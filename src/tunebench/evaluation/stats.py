"""Uncertainty: bootstrap confidence intervals over test items, paired comparisons and McNemar's test.

Every statistic here is a function of a vector of test-item indices, so one resampling scheme serves all metrics
and pairing is automatic: two strategies are compared on the same resampled items. With several seeds, a
strategy's value on a resample is the mean over its seeds (the interval covers test-set sampling; the spread over
seeds is reported separately as a standard deviation).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import stats as sps

from ..config.metrics import METRICS
from .metrics import classification_metrics, corpus_bleu_chrf

log = logging.getLogger(__name__)

ALPHA = 0.05
ITEM_METRICS = tuple(name for name, m in METRICS.items() if m.per_item)  # means of per-item scores
CORPUS_METRICS = ("bleu", "chrf")  # need the whole corpus per resample: slow, fewer resamples
N_RESAMPLES = 2000
N_RESAMPLES_CORPUS = 200


@dataclass
class MetricFn:
    """A metric as a function of item indices: ``fn(idx)`` with ``idx`` of shape (..., k) returns shape (...)."""

    fn: Callable[[np.ndarray], np.ndarray]
    n_items: int
    vectorized: bool
    per_item: np.ndarray | None = None  # seed-averaged item scores, when the metric is a mean of them

    @property
    def n_resamples(self) -> int:
        return N_RESAMPLES if self.vectorized else N_RESAMPLES_CORPUS

    def value(self) -> float:
        return float(self.fn(np.arange(self.n_items)))


def metric_fn(metric: str, runs: Sequence[dict], truth: dict) -> MetricFn:
    """Build ``metric`` over test items from one or more runs (seeds) of a strategy.

    ``runs``: the stored items of each seed (``predictions`` and per-item ``scores``); ``truth``: the stored test
    set (``labels`` or ``targets``).
    """
    if not runs:
        raise ValueError("no runs")
    n = len(runs[0]["predictions"])
    if metric in ITEM_METRICS:
        scores = np.asarray([r["scores"][metric] for r in runs], dtype=float).mean(0)
        return MetricFn(lambda idx: scores[idx].mean(-1), n, True, scores)
    if metric == "macro_f1":
        y = np.asarray(truth["labels"], dtype=np.int64)
        names = truth["label_names"]
        preds = [np.asarray(r["predictions"], dtype=np.int64) for r in runs]

        def f1(idx: np.ndarray) -> np.ndarray:
            idx = np.asarray(idx)
            flat = idx.reshape(-1, idx.shape[-1])
            vals = [np.mean([classification_metrics(y[i], p[i], names)["macro_f1"] for p in preds]) for i in flat]
            return np.asarray(vals).reshape(idx.shape[:-1])

        return MetricFn(f1, n, False)
    if metric in CORPUS_METRICS:
        refs = list(truth["targets"])
        preds_s = [list(r["predictions"]) for r in runs]
        k = CORPUS_METRICS.index(metric)

        def corpus(idx: np.ndarray) -> np.ndarray:
            idx = np.asarray(idx)
            flat = idx.reshape(-1, idx.shape[-1])
            vals = [np.mean([corpus_bleu_chrf([p[j] for j in i], [refs[j] for j in i])[k] for p in preds_s])
                    for i in flat]
            return np.asarray(vals).reshape(idx.shape[:-1])

        return MetricFn(corpus, n, False)
    raise ValueError(f"no item-level form of metric '{metric}'")


def _bootstrap(stat: Callable[[np.ndarray], np.ndarray], n: int, *, vectorized: bool, n_resamples: int,
               seed: int, level: float):
    def statistic(idx, axis=-1):
        return stat(np.moveaxis(np.asarray(idx), axis, -1))

    return sps.bootstrap((np.arange(n),), statistic, vectorized=True, n_resamples=n_resamples,
                         confidence_level=level, method="percentile", rng=np.random.default_rng(seed),
                         batch=200 if vectorized else 50)


def bootstrap_ci(m: MetricFn, *, seed: int = 0, level: float = 0.95,
                 n_resamples: int | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of the metric, resampling test items with replacement (seeded)."""
    if m.n_items < 2:
        v = m.value()
        return v, v
    res = _bootstrap(m.fn, m.n_items, vectorized=m.vectorized, n_resamples=n_resamples or m.n_resamples,
                     seed=seed, level=level)
    lo, hi = res.confidence_interval
    v = m.value()
    if np.isnan(lo):  # a degenerate (constant) distribution
        return v, v
    return float(lo), float(hi)


def mcnemar(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> dict:
    """McNemar's exact test on paired right/wrong outcomes: a two-sided binomial test on the discordant pairs.

    ``b``: items A gets right and B wrong; ``c``: the reverse. With no discordant pair the p-value is 1.

    Example:
        >>> round(mcnemar([1] * 10 + [0] * 2, [0] * 10 + [1] * 2)["p_value"], 4)  # 2 * P(X <= 2 | 12, 1/2)
        0.0386
    """
    a = np.asarray(a_correct, dtype=bool)
    b_ = np.asarray(b_correct, dtype=bool)
    b = int((a & ~b_).sum())
    c = int((~a & b_).sum())
    p = 1.0 if b + c == 0 else float(sps.binomtest(min(b, c), b + c, 0.5).pvalue)
    return {"b": b, "c": c, "p_value": min(1.0, p)}


@dataclass
class Comparison:
    """A strategy against the reference (usually the best): difference, its interval and whether they are tied."""

    diff: float
    ci: tuple[float, float]
    p_bootstrap: float
    p_mcnemar: float | None
    tied: bool
    identical: bool

    def to_dict(self) -> dict:
        return {"diff": self.diff, "ci": list(self.ci), "p_bootstrap": self.p_bootstrap,
                "p_mcnemar": self.p_mcnemar, "tied": self.tied, "identical": self.identical}


def compare(a: MetricFn, b: MetricFn, *, correct_pairs: Sequence[tuple] | None = None, seed: int = 0,
            alpha: float = ALPHA, n_resamples: int | None = None) -> Comparison:
    """Paired bootstrap of ``a - b`` on the same resampled test items, and McNemar's test when per-item
    right/wrong outcomes are given (``correct_pairs``: one ``(a_correct, b_correct)`` pair per seed pairing; the
    median p-value over pairings is reported). Tied unless both tests separate them at level ``alpha``: the
    interval of the difference excludes 0 and McNemar's p-value (when available) is below ``alpha``."""
    if a.n_items != b.n_items:
        raise ValueError(f"paired comparison needs the same test items ({a.n_items} vs {b.n_items})")
    diff = a.value() - b.value()
    identical = (a.per_item is not None and b.per_item is not None and np.array_equal(a.per_item, b.per_item))
    mc = None
    if correct_pairs:
        mc = float(np.median([mcnemar(x, y)["p_value"] for x, y in correct_pairs]))
    if identical or a.n_items < 2:
        return Comparison(diff, (diff, diff), 1.0, mc, True, identical)
    res = _bootstrap(lambda idx: a.fn(idx) - b.fn(idx), a.n_items, vectorized=a.vectorized and b.vectorized,
                     n_resamples=n_resamples or min(a.n_resamples, b.n_resamples), seed=seed, level=1 - alpha)
    dist = np.asarray(res.bootstrap_distribution)
    lo, hi = res.confidence_interval
    if np.isnan(lo):
        lo = hi = diff
    p_boot = float(min(1.0, 2 * min(np.mean(dist <= 0), np.mean(dist >= 0))))
    separated = (lo > 0 or hi < 0) and (mc is None or mc < alpha)
    return Comparison(diff, (float(lo), float(hi)), p_boot, mc, not separated, False)
