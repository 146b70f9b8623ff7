"""Uncertainty: a two-level bootstrap over seeds and test items, paired comparisons, Holm's correction, McNemar.

A strategy run with several seeds varies for two reasons: which test items were drawn, and which seed (data
order, initialisation, demonstrations) it ran with. The interval of a metric resamples both: a resample draws
seeds with replacement, then test items with replacement, and takes the mean over the drawn seeds of the metric
on the drawn items (a two-level bootstrap, Davison & Hinkley, *Bootstrap Methods and their Application*, 1997,
sec. 3.8). Seeds and items are crossed, not nested (every seed is scored on the same items), and resampling both
levels of a crossed design counts the item-level noise twice (McCullagh, "Resampling and exchangeable arrays",
Bernoulli 2000); the seed level is therefore scaled by a moment estimate of the between-seed variance (see
:func:`distribution`). With one seed it reduces to the ordinary item bootstrap. Two strategies are compared on the
same draws: the same items and the same seed numbers (a strategy that lacks a drawn seed, such as zero-shot with
its single run, uses its own runs), so the interval of their difference is paired at both levels.

A family of comparisons (every strategy against the best) is corrected with Holm's step-down method (Holm, 1979):
each comparison's interval is printed at the level its Holm-adjusted p-value implies, so "tied" is exactly "the
printed interval contains 0". McNemar's exact test, per seed pairing, is a diagnostic shown where it disagrees.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
from scipy import stats as sps

from ..config.metrics import METRICS
from .metrics import classification_metrics, corpus_bleu_chrf

log = logging.getLogger(__name__)

ALPHA = 0.05
POWER = 0.8
ITEM_METRICS = tuple(name for name, m in METRICS.items() if m.per_item)  # means of per-item scores
CORPUS_METRICS = ("bleu", "chrf")  # need the whole corpus per resample: slow, fewer resamples
N_RESAMPLES = 2000
N_RESAMPLES_CORPUS = 200
_CHUNK_ITEMS = 2_000_000  # resamples x items drawn at once (bounds memory on large test sets)


@dataclass
class MetricFn:
    """A metric of one strategy as a function of test-item indices, per seed.

    ``per_seed(idx)`` with ``idx`` of shape (B, k) returns shape (n_seeds, B): the metric of each seed's run on
    each row of drawn items. ``seeds`` are the seed numbers of the runs, in that order."""

    per_seed: Callable[[np.ndarray], np.ndarray]
    n_items: int
    vectorized: bool
    seeds: list[int] = field(default_factory=lambda: [0])
    per_item: np.ndarray | None = None  # seed-averaged item scores, when the metric is a mean of them

    @property
    def n_resamples(self) -> int:
        return N_RESAMPLES if self.vectorized else N_RESAMPLES_CORPUS

    def seed_values(self) -> np.ndarray:
        """The metric of each seed's run on the whole test set."""
        return self.per_seed(np.arange(self.n_items)[None, :])[:, 0]

    def value(self) -> float:
        return float(self.seed_values().mean())


def metric_fn(metric: str, runs: Sequence[dict], truth: dict, seeds: Sequence[int] | None = None) -> MetricFn:
    """Build ``metric`` over test items from one or more runs (seeds) of a strategy.

    ``runs``: the stored items of each seed (``predictions`` and per-item ``scores``); ``truth``: the stored test
    set (``labels`` or ``targets``); ``seeds``: the seed number of each run (default 0, 1, ...).
    """
    if not runs:
        raise ValueError("no runs")
    n = len(runs[0]["predictions"])
    seeds = list(seeds) if seeds is not None else list(range(len(runs)))
    if metric in ITEM_METRICS:
        scores = np.asarray([r["scores"][metric] for r in runs], dtype=float)
        return MetricFn(lambda idx: scores[:, idx].mean(-1), n, True, seeds, scores.mean(0))
    if metric == "macro_f1":
        y = np.asarray(truth["labels"], dtype=np.int64)
        names = truth["label_names"]
        preds = [np.asarray(r["predictions"], dtype=np.int64) for r in runs]

        def f1(idx: np.ndarray) -> np.ndarray:
            return np.asarray([[classification_metrics(y[i], p[i], names)["macro_f1"] for i in idx] for p in preds])

        return MetricFn(f1, n, False, seeds)
    if metric in CORPUS_METRICS:
        refs = list(truth["targets"])
        preds_s = [list(r["predictions"]) for r in runs]
        k = CORPUS_METRICS.index(metric)

        def corpus(idx: np.ndarray) -> np.ndarray:
            return np.asarray([[corpus_bleu_chrf([p[j] for j in i], [refs[j] for j in i])[k] for i in idx]
                               for p in preds_s])

        return MetricFn(corpus, n, False, seeds)
    raise ValueError(f"no item-level form of metric '{metric}'")


@dataclass
class Draws:
    """Shared resamples, generated chunk by chunk from a seed (so they need not all sit in memory): each chunk
    holds item indices (b, n) and seed numbers (b, u) drawn from the union of seeds. The same arguments give the
    same draws, so comparisons within a family are paired."""

    n_items: int
    universe: list[int]
    n_resamples: int
    seed: int = 0

    @property
    def chunk(self) -> int:
        return max(1, _CHUNK_ITEMS // max(1, self.n_items))

    @property
    def key(self) -> tuple:
        """What identifies these draws (a metric's distribution is cached under it)."""
        return self.n_items, tuple(self.universe), self.n_resamples, self.seed

    def chunks(self):
        u = np.asarray(self.universe)
        for c, lo in enumerate(range(0, self.n_resamples, self.chunk)):
            b = min(self.chunk, self.n_resamples - lo)
            rng = np.random.default_rng([self.seed, c])
            items = rng.integers(0, self.n_items, size=(b, self.n_items))
            picked = u[rng.integers(0, len(u), size=(b, len(u)))]
            yield items, picked


@dataclass
class StratumDraws(Draws):
    """One stratum's part of a stratified resample (a group of test items, resampled within itself so its size
    never changes). Every stratum of one resample draws the same seeds (``rows`` resamples per chunk, shared by
    all strata, and the seed draw depends only on ``seed`` and the chunk), so strata are paired at the seed level;
    items are drawn per stratum. ``n_items`` is the stratum's size, indices are within the stratum."""

    stratum: int = 0
    rows: int = 1

    @property
    def chunk(self) -> int:
        return self.rows

    @property
    def key(self) -> tuple:
        return (*super().key, "stratum", self.stratum, self.rows)

    def chunks(self):
        u = np.asarray(self.universe)
        for c, lo in enumerate(range(0, self.n_resamples, self.chunk)):
            b = min(self.chunk, self.n_resamples - lo)
            picked = u[np.random.default_rng([self.seed, c]).integers(0, len(u), size=(b, len(u)))]
            items = np.random.default_rng([self.seed, c, self.stratum + 1]).integers(0, self.n_items,
                                                                                    size=(b, self.n_items))
            yield items, picked


def draws(n_items: int, seeds: Sequence[int], n_resamples: int, seed: int = 0) -> Draws:
    """Two-level draws over ``seeds`` (their union) and ``n_items`` test items."""
    return Draws(n_items, sorted(set(seeds)), n_resamples, seed)


def stratified_draws(sizes: Sequence[int], seeds: Sequence[int], n_resamples: int,
                     seed: int = 0) -> list[StratumDraws]:
    """Two-level draws of a test set split into strata of ``sizes`` items: seeds drawn once per resample (shared
    by every stratum), items drawn within each stratum."""
    rows = max(1, _CHUNK_ITEMS // max(1, sum(sizes)))
    return [StratumDraws(n, sorted(set(seeds)), n_resamples, seed, stratum=j, rows=rows) for j, n in enumerate(sizes)]


def distribution(m: MetricFn, d: Draws) -> np.ndarray:
    """The metric on each resample: its seed mean on the drawn items, plus the mean over the drawn seeds of those
    seeds' deviations from it, scaled so the seed level adds the between-seed variance once.

    Unscaled, a crossed seeds × items resample counts the item-level noise of each seed's deviation twice (once
    in the seed mean, once in the deviations) and shrinks the seed variance by (k-1)/k; the scale ``lam`` removes
    the first by a moment estimate of the between-seed variance (observed spread of the seeds' scores minus what
    item sampling alone puts into it) and undoes the second. One seed: the ordinary item bootstrap."""
    return _components(m, d)[1]


def _components(m: MetricFn, d: Draws) -> tuple[np.ndarray, np.ndarray]:
    """``(item_only, two_level)`` on each resample of ``d``: the seed mean on the drawn items, and that plus the
    scaled seed term (see :func:`distribution`). Cached per metric and draws: a family's reference is drawn once."""
    key = d.key
    cache = m.__dict__.setdefault("_components", {})
    if key in cache:
        return cache[key]
    own = {s: i for i, s in enumerate(m.seeds)}
    k = len(m.seeds)
    lookup = np.asarray([own.get(s, j % k) for j, s in enumerate(d.universe)])
    parts, picks = [], []
    for items, p in d.chunks():
        parts.append(np.asarray(m.per_seed(items)))
        picks.append(p)
    V, picked = np.concatenate(parts, axis=1), np.concatenate(picks, axis=0)  # (k, B), (B, u)
    mean = V.mean(0)
    if k == 1:
        cache[key] = (mean, mean)
        return cache[key]
    dev = V - mean
    spread = float(np.var(m.seed_values(), ddof=1))  # between-seed variance + item noise in each seed's score
    noise = float(np.mean(np.var(dev, axis=1))) * k / (k - 1)  # item noise of one seed's score around the mean
    lam = np.sqrt(max(0.0, spread - noise) * k / ((k - 1) * spread)) if spread > 0 else 0.0
    run = lookup[np.searchsorted(d.universe, picked)]  # (B, u): which of m's runs each drawn seed is
    cache[key] = (mean, mean + lam * dev[run, np.arange(len(run))[:, None]].mean(1))
    return cache[key]


def _interval(dist: np.ndarray, level: float, point: float) -> tuple[float, float]:
    lo, hi = np.quantile(dist, [(1 - level) / 2, (1 + level) / 2])
    if np.isnan(lo):
        return point, point
    return float(lo), float(hi)


def bootstrap_ci(m: MetricFn, *, seed: int = 0, level: float = 0.95,
                 n_resamples: int | None = None) -> tuple[float, float]:
    """Percentile interval of the metric under the two-level bootstrap (seeds, then items; seeded)."""
    v = m.value()
    if m.n_items < 2:
        return v, v
    d = draws(m.n_items, m.seeds, n_resamples or m.n_resamples, seed)
    return _interval(distribution(m, d), level, v)


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
    """A strategy against a reference: the difference, its interval at the (corrected) level, the verdict.

    ``tied`` is exactly "``ci`` contains 0". ``ci_uncorrected`` is the plain 95% interval; ``p_holm`` the
    Holm-adjusted p-value within the family the comparison belongs to (equal to ``p_bootstrap`` alone).
    ``mcnemar`` holds McNemar's p per seed pairing (classification); ``note`` says where it disagrees with the
    verdict, or that seed variance dominates and how many seeds would separate the pair."""

    diff: float
    ci: tuple[float, float]
    p_bootstrap: float
    p_mcnemar: float | None
    tied: bool
    identical: bool
    ci_uncorrected: tuple[float, float] | None = None
    p_holm: float | None = None
    level: float = 1 - ALPHA
    mcnemar: list[dict] = field(default_factory=list)
    seed_share: float | None = None  # share of the difference's variance that comes from seeds
    seeds_needed: int | None = None
    note: str | None = None
    dist: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {"diff": self.diff, "ci": list(self.ci), "ci_uncorrected": _pair(self.ci_uncorrected),
                "level": self.level, "p_bootstrap": self.p_bootstrap, "p_holm": self.p_holm,
                "p_mcnemar": self.p_mcnemar, "mcnemar": self.mcnemar, "tied": self.tied,
                "identical": self.identical, "seed_share": self.seed_share, "seeds_needed": self.seeds_needed,
                "note": self.note}


def _pair(ci):
    return None if ci is None else [float(ci[0]), float(ci[1])]


def compare(a: MetricFn, b: MetricFn, *, correct_pairs: Sequence[tuple] | None = None, seed: int = 0,
            alpha: float = ALPHA, n_resamples: int | None = None) -> Comparison:
    """Paired two-level bootstrap of ``a - b`` (same drawn items and seed numbers), uncorrected: a family of one
    (:func:`holm` corrects a family). ``correct_pairs``: ``((seed_a, seed_b), a_correct, b_correct)`` per seed
    pairing, for McNemar's diagnostic."""
    if a.n_items != b.n_items:
        raise ValueError(f"paired comparison needs the same test items ({a.n_items} vs {b.n_items})")
    diff = a.value() - b.value()
    identical = (a.per_item is not None and b.per_item is not None and np.array_equal(a.per_item, b.per_item))
    mc = [{"seeds": list(s), **{k: v for k, v in mcnemar(x, y).items()}} for s, x, y in correct_pairs or []]
    for m in mc:
        m["p"] = m.pop("p_value")
    p_mc = float(np.median([m["p"] for m in mc])) if mc else None
    if identical or a.n_items < 2:
        return Comparison(diff, (diff, diff), 1.0, p_mc, True, identical, (diff, diff), 1.0, 1 - alpha, mc)
    B = n_resamples or min(a.n_resamples, b.n_resamples)
    d = draws(a.n_items, a.seeds + b.seeds, B, seed)
    (items_a, all_a), (items_b, all_b) = _components(a, d), _components(b, d)
    dist = all_a - all_b
    p_boot = float(min(1.0, 2 * min(np.mean(dist <= 0), np.mean(dist >= 0))))
    ci = _interval(dist, 1 - alpha, diff)
    out = Comparison(diff, ci, p_boot, p_mc, not (ci[0] > 0 or ci[1] < 0), False, ci, p_boot, 1 - alpha, mc,
                     dist=dist)
    if len(d.universe) > 1:  # how much of the noise is seeds: against the item-only resample of the same items
        var_items = float(np.var(items_a - items_b))
        var_all = float(np.var(dist))
        out.seed_share = max(0.0, 1 - var_items / var_all) if var_all > 0 else 0.0
        out.seeds_needed = seeds_needed(a, b, diff, alpha)
    return _explain(out, alpha)


def seeds_needed(a: MetricFn, b: MetricFn, diff: float, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """Seeds per strategy that would separate the pair at the observed difference with the observed seed spread
    (normal approximation: n = ((z_{1-alpha/2} + z_power) * sd / |diff|)^2, sd of the per-seed difference)."""
    va, vb = a.seed_values(), b.seed_values()
    common = sorted(set(a.seeds) & set(b.seeds))
    if len(common) >= 2 and len(va) > 1 and len(vb) > 1:
        d = [va[a.seeds.index(s)] - vb[b.seeds.index(s)] for s in common]
        sd = float(np.std(d, ddof=1))
    else:
        sd = float(np.sqrt((np.var(va, ddof=1) if len(va) > 1 else 0.0) + (np.var(vb, ddof=1) if len(vb) > 1 else 0.0)))
    if sd == 0 or diff == 0:
        return None
    z = sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power)
    return max(2, math.ceil((z * sd / abs(diff)) ** 2))


def _explain(c: Comparison, alpha: float) -> Comparison:
    notes = []
    if c.tied and c.seed_share is not None and c.seed_share > 0.5:
        more = f"; about {c.seeds_needed} seeds per strategy would separate them at this difference" \
            if c.seeds_needed else ""
        notes.append(f"seed variance dominates ({c.seed_share:.0%} of the spread of the difference){more}")
    if c.mcnemar:
        def side(m: dict) -> str:
            return "not separated" if m["p"] >= alpha else "ahead" if m["b"] > m["c"] else "behind"

        by: dict[str, list[str]] = {}
        for m in c.mcnemar:
            by.setdefault(side(m), []).append("/".join(str(x) for x in dict.fromkeys(m["seeds"])))
        if len(by) > 1:
            notes.append("McNemar differs by seed: " + ", ".join(f"{k} on seed {', '.join(v)}"
                                                                  for k, v in by.items()))
        elif "not separated" not in by and c.tied:
            notes.append("McNemar separates them on every seed, but the interval, which also counts seed-to-seed "
                         "variation, does not")
        elif "not separated" in by and not c.tied:
            notes.append("McNemar on each seed alone does not separate them; the interval pools the seeds")
    return replace(c, note="; ".join(notes) or None)


def holm(comparisons: Sequence[Comparison | None], alpha: float = ALPHA) -> list[Comparison | None]:
    """Holm's step-down correction over a family: each comparison gets its adjusted p-value and its interval at
    the level that p-value implies (1 - alpha * p / p_holm), so its interval excludes 0 exactly when Holm
    rejects. Comparisons without a distribution (identical runs, None) pass through."""
    idx = [i for i, c in enumerate(comparisons) if c is not None and c.dist is not None]
    adjusted = holm_adjust([comparisons[i].p_bootstrap for i in idx])
    out = list(comparisons)
    for i, p_adj in zip(idx, adjusted):
        c = comparisons[i]
        level = 1 - alpha / len(idx) if p_adj == 0 else min(1.0, 1 - alpha * c.p_bootstrap / p_adj)
        level = max(level, 1 - alpha)
        ci = _interval(c.dist, level, c.diff)
        out[i] = _explain(replace(c, ci=ci, p_holm=p_adj, level=level, tied=not (ci[0] > 0 or ci[1] < 0)), alpha)
    return out


def holm_adjust(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values: sorted ascending, p_(i) * (m - i), made monotone, capped at 1.

    Example:
        >>> [round(p, 3) for p in holm_adjust([0.01, 0.04, 0.03])]
        [0.03, 0.06, 0.06]
    """
    m = len(pvalues)
    order = np.argsort(pvalues, kind="stable")
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out
