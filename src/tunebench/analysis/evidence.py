"""Evidence: stored trials turned into intervals, paired comparisons, learning curves, consistency and costs.

Everything here reads the store only (trial rows, per-item predictions, the stored test truth): a report or a
recommendation never reruns a trial.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from ..config import CostConfig
from ..errors import StoreError
from ..evaluation import counterfactual
from ..evaluation.consistency import agreement
from ..evaluation.cost import Pricing, break_even, price
from ..evaluation.groups import SMALL, Breakdown, breakdown
from ..evaluation.judge import mean_interval, trust_warnings
from ..evaluation.stats import Comparison, MetricFn, bootstrap_ci, compare, holm, metric_fn
from .distill_curve import distill_curves
from .pairwise import stored_comparisons
from .leaderboard import SECONDARY, cv_summary, default_metric, group_flags
from ..store.results import Store

log = logging.getLogger(__name__)

PROMPTING = ("prompting",)
TUNING = ("weight_tuning", "prompt_tuning", "hybrid")


@dataclass(eq=False)  # compared by identity: a group is one stored set of trials
class Group:
    """All seeds of one strategy label at one train size."""

    label: str
    strategy: str
    family: str
    model: str
    train_size: int
    rows: list[dict]
    items: list[dict]  # per-seed stored items (empty for trials stored before tunebench kept them)
    metric: str
    truth: dict | None

    @property
    def seeds(self) -> list[int]:
        return sorted(r["seed"] for r in self.rows)

    @property
    def values(self) -> list[float]:
        return [r["metrics"][self.metric] for r in self.rows if self.metric in r["metrics"]]

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else float("nan")

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else 0.0

    @property
    def has_items(self) -> bool:
        return bool(self.items) and len(self.items) == len(self.rows) and self.truth is not None

    @cached_property
    def fn(self) -> MetricFn | None:
        return metric_fn(self.metric, self.items, self.truth, self.seeds) if self.has_items else None

    @cached_property
    def ci(self) -> tuple[float, float] | None:
        return bootstrap_ci(self.fn) if self.fn is not None else None

    @property
    def correct(self) -> list[tuple[int, np.ndarray]] | None:
        """Per seed: the seed and, per item, right or wrong (McNemar's outcomes); classification only."""
        if not self.has_items or "accuracy" not in self.items[0]["scores"]:
            return None
        return [(s, np.asarray(it["scores"]["accuracy"]) > 0.5) for s, it in zip(self.seeds, self.items)]

    def cost_mean(self, key: str) -> float | None:
        vals = [r["cost"].get(key) for r in self.rows if r["cost"].get(key) is not None]
        return float(np.mean(vals)) if vals else None

    @property
    def cost(self) -> dict[str, float]:
        keys = ("train_seconds", "adapt_seconds", "latency_ms_p50", "latency_ms_p95", "latency_ms_mean",
                "prompt_tokens_mean", "completion_tokens_mean", "tokens_per_request", "throughput_per_s",
                "peak_memory_mb", "trainable_params", "train_examples_per_s", "upfront_dollars", "teacher_seconds",
                "labelling_calls", "labelling_tokens", "labelling_dollars", "api_dollars_per_request")
        return {k: v for k in keys if (v := self.cost_mean(k)) is not None}

    def distill(self) -> dict | None:
        """A distill group's teacher and its label audit: per seed, and the mean agreement with gold."""
        recs = [(r["seed"], r["record"].get("distill")) for r in self.rows]
        recs = [(seed, d) for seed, d in recs if d]
        if not recs:
            return None
        agree = [d["audit"]["agreement"] for _, d in recs if d["audit"].get("agreement") is not None]
        return {"teacher": recs[0][1]["teacher"]["strategy"], "teacher_model": recs[0][1]["teacher"]["model"],
                "agreement_mean": float(np.mean(agree)) if agree else None,
                "seeds": [{"seed": seed, "teacher_key": d.get("teacher_key"), "labelling": d["labelling"],
                           "pool": d["pool"], "audit": d["audit"]} for seed, d in recs]}

    def cascade(self) -> dict | None:
        """A cascade group's threshold, chosen on dev, and its test curve per seed, with the mean test accuracy and
        fallback rate of the chosen points and of the student and teacher alone."""
        recs = [(r["seed"], r["record"].get("cascade")) for r in self.rows]
        recs = [(seed, c) for seed, c in recs if c]
        if not recs:
            return None

        def mean(get) -> float:
            return float(np.mean([get(c) for _, c in recs]))

        return {"teacher": recs[0][1]["teacher"], "target": recs[0][1]["target"],
                "accuracy_mean": mean(lambda c: c["test"]["accuracy"]),
                "fallback_mean": mean(lambda c: c["test"]["fallback_rate"]),
                "student_accuracy_mean": mean(lambda c: c["student"]["test_accuracy"]),
                "teacher_accuracy_mean": mean(lambda c: c["teacher_alone"]["test_accuracy"]),
                "seeds": [{"seed": seed, **c} for seed, c in recs]}

    @property
    def latency_samples(self) -> list[float]:
        return [x for r in self.rows for x in r["cost"].get("latency_ms_samples", [])]

    def consistency(self) -> dict[str, Any]:
        """Seed agreement (share of items all seeds predict alike), flip rates per perturbation, sample agreement,
        and the counterfactual swaps over the seeds (:func:`~tunebench.evaluation.counterfactual.summarize`)."""
        out: dict[str, Any] = {"seed_agreement": None, "perturbation": {}, "flip_rate": None, "sample_agreement": None,
                               "n_items": None, "counterfactual": {}}
        if self.has_items and len(self.items) > 1:
            out["seed_agreement"] = agreement([it["predictions"] for it in self.items])
        recs = [r["record"].get("consistency") for r in self.rows if r["record"].get("consistency")]
        if recs:
            out["n_items"] = max(rec.get("n_items", 0) for rec in recs)
            kinds = {k for rec in recs for k in rec.get("perturbation", {})}
            for k in sorted(kinds):
                vals = [rec["perturbation"].get(k) for rec in recs if rec["perturbation"].get(k) is not None]
                out["perturbation"][k] = float(np.mean(vals)) if vals else None
            flips = [rec["flip_rate"] for rec in recs if rec.get("flip_rate") is not None]
            out["flip_rate"] = float(np.mean(flips)) if flips else None
            samples = [rec["sample_agreement"] for rec in recs if rec.get("sample_agreement") is not None]
            out["sample_agreement"] = float(np.mean(samples)) if samples else None
            out["counterfactual"] = counterfactual.summarize(
                [(r["seed"], r["record"]["consistency"]["counterfactual"]) for r in self.rows
                 if (r["record"].get("consistency") or {}).get("counterfactual")])
        return out

    def judge(self) -> dict[str, Any] | None:
        """The judge's results over this group's seeds (None: not judged); see :func:`judge_over_rows`."""
        return judge_over_rows(self.rows, self.items if self.has_items else [])

    def confusion(self) -> list[list[int]] | None:
        cms = [np.asarray(r["metrics"]["confusion_matrix"]) for r in self.rows if "confusion_matrix" in r["metrics"]]
        return np.sum(cms, axis=0).tolist() if cms else None


@dataclass
class Evidence:
    """The analysed study: groups, the final comparison set, curves and prices. ``to_dict()`` is the JSON."""

    study: str
    metric: str
    groups: list[Group]
    costs: CostConfig
    config: dict
    truth: dict | None
    pairwise: list[dict] = field(default_factory=list)  # stored judge comparisons of two trials (`tunebench judge`)
    _cmp: dict = field(default_factory=dict)
    _by_group: dict = field(default_factory=dict)

    # ---- the comparison set: each label at the most training data it saw -------------------------------------
    @cached_property
    def final(self) -> list[Group]:
        best: dict[str, Group] = {}
        for g in self.groups:
            if g.label not in best or g.train_size > best[g.label].train_size:
                best[g.label] = g
        return sorted(best.values(), key=lambda g: -g.mean if g.mean == g.mean else math.inf)

    @property
    def best(self) -> Group | None:
        return self.final[0] if self.final else None

    def group(self, label: str, train_size: int | None = None) -> Group:
        for g in self.final if train_size is None else self.groups:
            if g.label == label and (train_size is None or g.train_size == train_size):
                return g
        raise KeyError(label)

    def compare(self, a: Group, b: Group) -> Comparison | None:
        """``a`` against ``b`` on the same resampled seeds and test items (cached); None without stored items.

        Between two strategies of the comparison set the result is Holm-corrected over the family "every
        strategy against ``b``" (the leaderboard's "against the best" is one such family)."""
        key = _key(a, b)
        if key not in self._cmp:
            if any(a is g for g in self.final) and any(b is g for g in self.final):
                others = [g for g in self.final if g is not b]
                for g, c in zip(others, holm([self._raw(g, b) for g in others])):
                    self._cmp[_key(g, b)] = c
            else:
                self._cmp[key] = self._raw(a, b)
        return self._cmp[key]

    def _raw(self, a: Group, b: Group) -> Comparison | None:
        """The uncorrected comparison (cached: a family and the crossover reuse it)."""
        key = ("raw", *_key(a, b))
        if key not in self._cmp:
            if a.fn is None or b.fn is None or a.fn.n_items != b.fn.n_items:
                self._cmp[key] = None
            else:
                pairs = _seed_pairs(a.correct, b.correct) if self.metric == "accuracy" else None
                self._cmp[key] = compare(a.fn, b.fn, correct_pairs=pairs)
        return self._cmp[key]

    def tied_with(self, ref: Group, candidates: list[Group]) -> list[Group]:
        """The candidates the evidence cannot separate from ``ref`` (``ref`` included)."""
        out = []
        for g in candidates:
            if g is ref:
                out.append(g)
                continue
            c = self.compare(g, ref)
            if c is not None and c.tied:
                out.append(g)
        return out

    # ---- groups of users (task.groups) ---------------------------------------------------------------------
    @property
    def group_columns(self) -> list[str]:
        """The study's ``task.groups`` columns whose values are stored with its test set (older stores: none)."""
        stored = (self.truth or {}).get("groups") or {}
        return [c for c in self.config.get("task", {}).get("groups") or [] if c in stored]

    @property
    def group_metrics(self) -> list[str]:
        """What each group reports: accuracy and macro-F1 for classification, else the study's metric; the
        study's metric first (it judges the gap and the worst group)."""
        if (self.truth or {}).get("labels") is not None:
            return list(dict.fromkeys([self.metric, "accuracy", "macro_f1"]))
        return [self.metric]

    def groups_note(self) -> str | None:
        """Why ``task.groups`` shows nothing, where it names columns."""
        named = self.config.get("task", {}).get("groups") or []
        missing = [c for c in named if c not in self.group_columns]
        if not missing:
            return None
        if self.truth is None:
            return "per-group results need one stored test set (these trials were scored on different test splits)"
        return (f"no stored group values for {', '.join(missing)}: the trials were stored before task.groups named "
                "them; `tunebench run` on the study records them (no trial is rerun)")

    def by_group(self, g: Group) -> list[Breakdown]:
        """``g``'s results by each group column (cached); empty without stored items or group values."""
        key = (g.label, g.train_size)
        if key not in self._by_group:
            out = []
            if g.has_items:
                for col in self.group_columns:
                    try:
                        out.append(breakdown(col, self.truth["groups"][col], g.items, g.truth, metric=self.metric,
                                             metrics=self.group_metrics, seeds=g.seeds))
                    except ValueError as exc:  # a metric without a per-item form, a column of the wrong length
                        log.warning("%s: no per-group results for %s: %s", g.label, col, exc)
            self._by_group[key] = out
        return self._by_group[key]

    # ---- the judge (metrics: - judge) ----------------------------------------------------------------------------
    def judge_trust(self) -> dict[str, Any] | None:
        """The judge's trust figures over the comparison set: self-agreement (items of every trial pooled),
        missing calls, agreement with people (the same rated texts for every trial: the first trial that judged
        them), its total cost, and the warnings they call for. None when no trial was judged."""
        judged = [(g, j) for g in self.final if (j := g.judge()) is not None]
        if not judged:
            return None
        out = judge_over_rows([r for g, _ in judged for r in g.rows], [])
        assert out is not None
        out = {k: out[k] for k in ("model", "criteria", "scale", "repeats", "rubric", "calls", "missing",
                                   "missing_rate", "retried", "errors", "self_agreement", "human", "cost")}
        out["warnings"] = trust_warnings(out)
        return out

    # ---- prices ------------------------------------------------------------------------------------------------
    def pricing(self, g: Group, costs: CostConfig | None = None) -> Pricing:
        return price(g.cost, g.model, costs or self.costs)

    def trainings(self, g: Group, horizon_days: float, changes_often: bool) -> int:
        """Training runs paid over the horizon: one, or one a month when the task changes often."""
        if not changes_often or g.family in PROMPTING:
            return 1
        return max(1, math.ceil(horizon_days / 30))

    # ---- learning curves -------------------------------------------------------------------------------------
    def curves(self) -> dict[str, list[dict]]:
        by_label: dict[str, list[Group]] = defaultdict(list)
        for g in self.groups:
            by_label[g.label].append(g)
        out = {}
        for label, gs in by_label.items():
            out[label] = [{"train_size": g.train_size, "mean": g.mean, "std": g.std, "ci": _pair(g.ci),
                           "seeds": len(g.rows)} for g in sorted(gs, key=lambda g: g.train_size)]
        return out

    def distill_curves(self) -> list[dict]:
        """Distilled students against teacher labels bought (``pool_sizes``), beside the gold-label curve of the
        same student strategy, and how many teacher labels are worth one gold label
        (:func:`~tunebench.analysis.distill_curve.distill_curves`)."""
        return distill_curves(self.groups)

    @cached_property
    def _crossover(self) -> dict:
        return self._find_crossover()

    def crossover(self) -> dict:
        """The smallest train size at which the best tuning strategy beats the best prompting strategy with
        significance, Holm-corrected across the sizes tried (computed once)."""
        return self._crossover

    def _find_crossover(self) -> dict:
        """The smallest train size at which the best tuning strategy beats the best prompting strategy with
        significance (prompting that uses no training data counts at every size)."""
        tuning = [g for g in self.groups if g.family in TUNING]
        prompting = [g for g in self.groups if g.family in PROMPTING]
        if not tuning or not prompting:
            return {"status": "not applicable", "train_size": None,
                    "reason": "the study needs at least one prompting and one tuning strategy"}
        sizes = sorted({g.train_size for g in tuning})
        steps, cmps = [], []
        for s in sizes:
            t_best = max((g for g in tuning if g.train_size == s), key=lambda g: g.mean)
            avail = [g for g in prompting if g.train_size in (0, s)]
            if not avail:
                continue
            p_best = max(avail, key=lambda g: g.mean)
            steps.append({"train_size": s, "tuning": t_best.label, "tuning_mean": t_best.mean,
                          "prompting": p_best.label, "prompting_mean": p_best.mean})
            cmps.append(self._raw(t_best, p_best))
        for step, c in zip(steps, holm(cmps)):  # Holm across the train sizes tried
            step.update(diff=None if c is None else c.diff, ci=None if c is None else list(c.ci),
                        p_holm=None if c is None else c.p_holm,
                        significant=c is not None and not c.tied and c.diff > 0)
        for step in steps:
            if step["significant"]:
                return {"status": "reached", "train_size": step["train_size"], "tuning": step["tuning"],
                        "prompting": step["prompting"], "steps": steps}
        return {"status": "not reached", "train_size": None, "steps": steps}

    def data_needed(self, g: Group) -> int | None:
        """The smallest train size at which this strategy's mean reaches its full-data interval (None: no curve)."""
        gs = sorted((x for x in self.groups if x.label == g.label), key=lambda x: x.train_size)
        if len(gs) < 2 or g.ci is None:
            return None
        return next((x.train_size for x in gs if x.mean >= g.ci[0]), g.train_size)

    # ---- break-even ------------------------------------------------------------------------------------------
    def break_evens(self, costs: CostConfig | None = None) -> list[dict]:
        costs = costs or self.costs
        out = []
        for p in (g for g in self.final if g.family in PROMPTING):
            for t in (g for g in self.final if g.family in TUNING):
                be = break_even(self.pricing(p, costs), self.pricing(t, costs))
                per_day = None if be["requests"] is None else be["requests"] / costs.horizon_days
                out.append({"prompting": p.label, "tuning": t.label, **be, "per_day_over_horizon": per_day})
        return out

    # ---- JSON --------------------------------------------------------------------------------------------------
    def entry(self, g: Group, costs: CostConfig | None = None) -> dict:
        costs = costs or self.costs
        best = self.best
        c = self.compare(g, best) if best is not None and g is not best else None
        pricing = self.pricing(g, costs)
        second = SECONDARY.get(self.metric, self.metric)
        sec = [r["metrics"][second] for r in g.rows if second in r["metrics"]]
        return {
            "label": g.label, "strategy": g.strategy, "family": g.family, "model": g.model,
            "train_size": g.train_size, "seeds": g.seeds, "metric": self.metric, "mean": g.mean, "std": g.std,
            "ci": _pair(g.ci), "secondary": second, "secondary_mean": float(np.mean(sec)) if sec else None,
            "vs_best": None if c is None else c.to_dict(),
            "tied_with_best": g is best or (c is not None and c.tied),
            "cost": {**g.cost, **pricing.to_dict(),
                     "total_over_horizon": pricing.total(costs.volume_per_day, costs.horizon_days)},
            "consistency": g.consistency(), "data_needed": self.data_needed(g),
            "latency_ms_samples": g.latency_samples, "confusion_matrix": g.confusion(),
            "prompt": g.rows[0]["record"].get("prompt"), "params": g.rows[0]["params"],
            "format_failure_rate": float(np.mean([r["metrics"].get("format_failure_rate", 0.0) for r in g.rows])),
            "cv": cv_summary(g.rows, self.metric) or None,
            "flags": group_flags(g.rows),
            "groups": [b.to_dict() for b in self.by_group(g)],
            "judge": g.judge(),
            "distill": g.distill(),
            "cascade": g.cascade(),
        }

    def to_dict(self) -> dict:
        return {
            "study": self.study, "metric": self.metric,
            "n_test": len(self.best.items[0]["predictions"]) if self.best and self.best.has_items else None,
            "labels": (self.truth or {}).get("label_names"),
            "task_type": self.config.get("task", {}).get("type", "classification"),
            "strategies": [self.entry(g) for g in self.final],
            "leaderboard": [{"label": g.label, "family": g.family, "train_size": g.train_size, "seeds": g.seeds,
                             "mean": g.mean, "std": g.std, "ci": _pair(g.ci), "cv": cv_summary(g.rows, self.metric) or None}
                            for g in sorted(self.groups, key=lambda g: (-g.train_size, -g.mean))],
            "curves": self.curves(), "crossover": self.crossover(), "distill_curves": self.distill_curves(),
            "cost_model": self.costs.model_dump(), "break_even": self.break_evens(),
            "missing_items": sorted({g.label for g in self.groups if not g.has_items}),
            "group_columns": self.group_columns, "group_metrics": self.group_metrics if self.group_columns else [],
            "groups_note": self.groups_note(), "small_group": SMALL, "judge": self.judge_trust(),
            "pairwise": self.pairwise,
        }


def judge_over_rows(rows: list[dict], items: list[dict]) -> dict[str, Any] | None:
    """Stored judge summaries (``metrics.judge``) of several trials as one: scores averaged over trials, the overall
    score's interval from the pooled per-item scores (``items``, where given), calls and missing calls summed,
    self-agreement weighted by the items it was measured on, the human agreement of the trial that judged the rated
    texts, the judge's cost summed (kept apart from the strategies' costs)."""
    js = [r["metrics"]["judge"] for r in rows if isinstance(r["metrics"].get("judge"), dict)]
    if not js:
        return None
    first = js[0]
    crit = first.get("criteria") or []
    scores = {c: _nanmean([j["scores"].get(c) for j in js]) for c in crit}
    pooled = [x for it in items for x in ((it.get("judge") or {}).get("overall") or []) if x is not None]
    calls = sum(j.get("calls", 0) for j in js)
    missing = sum(j.get("missing", 0) for j in js)
    agreements = [(j["self_agreement"]["items"], j["self_agreement"]) for j in js
                  if (j.get("self_agreement") or {}).get("items")]
    weight = sum(n for n, _ in agreements)
    agreement = {"items": weight, "all_criteria": None, "by_criterion": {}, "mean_spread": None}
    if weight:
        agreement["all_criteria"] = sum(n * a["all_criteria"] for n, a in agreements) / weight
        agreement["by_criterion"] = {c: sum(n * a["by_criterion"][c] for n, a in agreements) / weight for c in crit}
        agreement["mean_spread"] = sum(n * a["mean_spread"] for n, a in agreements) / weight
    humans = [j["human"] for j in js if j.get("human")]
    human = next((h for h in humans if not h.get("reused")), humans[0] if humans else None)
    costs = [j.get("cost") or {} for j in js] + [h["cost"] for h in humans if h.get("cost")]
    cost = {k: sum(c.get(k) or 0 for c in costs) for k in ("requests", "prompt_tokens", "completion_tokens", "seconds")}
    priced = [c.get("dollars") for c in costs]
    cost["dollars"] = None if any(d is None for d in priced) else sum(priced)
    errors: dict[str, int] = {}
    for j in js:
        for reason, n in (j.get("errors") or {}).items():
            errors[reason] = errors.get(reason, 0) + n
    return {"model": first.get("model"), "criteria": crit, "scale": first.get("scale"),
            "repeats": first.get("repeats"), "rubric": {k: v for k, v in (first.get("rubric") or {}).items()
                                                         if k != "template"},
            "scores": scores, "overall": _nanmean([j.get("overall") for j in js]),
            "overall_ci": mean_interval(np.asarray(pooled)) if pooled else (first.get("overall_ci") if len(js) == 1
                                                                            else None),
            "items": sum(j.get("items", 0) for j in js), "items_scored": sum(j.get("items_scored", 0) for j in js),
            "calls": calls, "missing": missing, "missing_rate": missing / calls if calls else None,
            "retried": sum(j.get("retried", 0) for j in js),
            "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
            "self_agreement": agreement, "human": human, "cost": cost, "trials": len(js)}


def _nanmean(values: list) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _key(a: Group, b: Group) -> tuple:
    return a.label, a.train_size, b.label, b.train_size


def _seed_pairs(a: list[tuple[int, np.ndarray]] | None, b: list[tuple[int, np.ndarray]] | None) -> list[tuple] | None:
    """``((seed_a, seed_b), a_correct, b_correct)`` paired seed by seed (a single-seed side pairs with every seed
    of the other; otherwise equal seeds pair, or runs in order where the seed numbers differ)."""
    if not a or not b:
        return None
    if len(a) == 1 or len(b) == 1:
        return [((sa, sb), x, y) for sa, x in a for sb, y in b]
    by_b = dict(b)
    if all(sa in by_b for sa, _ in a):
        return [((sa, sa), x, by_b[sa]) for sa, x in a]
    return [((sa, sb), x, y) for (sa, x), (sb, y) in zip(a, b)]


def _pair(ci: tuple[float, float] | None) -> list[float] | None:
    return None if ci is None else [float(ci[0]), float(ci[1])]


def analyze(store: Store, study: str, *, metric: str | None = None, costs: CostConfig | None = None) -> Evidence:
    """Read a study's current trials from the store and build its evidence (nothing is rerun)."""
    doc = store.study_config(study)
    rows = store.trials(study, set(doc["keys"]))
    if not rows:
        raise StoreError(f"study '{study}' has no finished trial yet; run it first (`tunebench run STUDY.yaml`)")
    metric = metric or default_metric(rows)
    if metric not in rows[0]["metrics"]:
        raise StoreError(f"metric '{metric}': this study's trials have no such metric "
                         f"(they have {', '.join(k for k, v in rows[0]['metrics'].items() if isinstance(v, float))})")
    config = doc["config"]
    if costs is None:
        costs = CostConfig(**config["costs"]) if config.get("costs") else CostConfig()
    items = store.items([r["key"] for r in rows])
    fps = {r["record"]["fingerprints"]["test"] for r in rows}
    truth = store.test_set(next(iter(fps))) if len(fps) == 1 else None
    if len(fps) > 1:
        log.warning("study %s: trials were scored on different test splits; paired statistics are off", study)
    grouped: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        grouped[(r["label"], r["train_size"])].append(r)
    groups = []
    for (label, size), rs in grouped.items():
        rs.sort(key=lambda r: r["seed"])
        its = [items[r["key"]] for r in rs if r["key"] in items]
        groups.append(Group(label, rs[0]["strategy"], rs[0]["family"], rs[0]["record"].get("model", "default"), size,
                            rs, its if len(its) == len(rs) else [], metric, truth))
    return Evidence(study, metric, groups, costs, config, truth, stored_comparisons(store, study, set(doc["keys"])))
