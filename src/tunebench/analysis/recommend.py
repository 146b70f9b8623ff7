"""The recommendation: which approach to ship under the user's constraints, with its reasons in plain words.

It says ``tie`` when the evidence cannot separate the best candidates on quality (and then names the cheapest of
them), and ``not enough evidence`` when the data cannot answer the question asked (a quality bar inside the
best candidate's interval, or no per-item results to compare).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..evaluation.groups import SMALL
from .evidence import PROMPTING, Evidence, Group
from .leaderboard import group_flags
from ..config import CostConfig
from ..config.costs import parse_amount  # noqa: F401  (it lived here; callers still import it from here)


@dataclass
class Constraints:
    """What the user needs. ``None`` means no constraint; volume and horizon default to the study's cost table."""

    volume_per_day: float | None = field(default=None, metadata={
        "help": "Expected requests per day (default: the study's costs.volume_per_day)."})
    horizon_days: float | None = field(default=None, metadata={
        "help": "Days the cost is counted over (default: the study's costs.horizon_days)."})
    latency_p95_ms: float | None = field(default=None, metadata={"help": "Most p95 latency per request, in milliseconds."})
    min_quality: float | None = field(default=None, metadata={
        "help": "Least acceptable value of the study's metric (accuracy, or exact match)."})
    budget: float | None = field(default=None, metadata={
        "help": "Most total cost over the horizon (training + serving)."})
    changes_often: bool = field(default=False, metadata={
        "help": "The task changes often: tuned models are retrained once a month over the horizon, prompts are "
                "edited."})
    max_group_gap: float | None = field(default=None, metadata={
        "help": "Largest allowed gap between the best and the worst group of any task.groups column (the study's "
                "metric, point estimate)."})
    min_group_accuracy: float | None = field(default=None, metadata={
        "help": "Least accuracy every group of every task.groups column must reach (generation: the study's "
                "metric)."})


def _level(cmp) -> str:
    """The confidence level a comparison's interval is printed at (95%, or wider after Holm's correction)."""
    return f"{100 * cmp.level:.1f}%".replace(".0%", "%")


def _money(x: float, cur: str) -> str:
    if x == 0:
        return f"{cur}0"
    if abs(x) < 0.01:
        return f"{cur}{x:.2g}"
    return f"{cur}{x:,.2f}"


def _volume(v: float) -> str:
    return f"{v:,.0f}"


class Recommender:
    """Ranks the study's final candidates (each strategy at its largest train size) under ``Constraints``."""

    def __init__(self, evidence: Evidence, constraints: Constraints):
        self.ev = evidence
        self.c = constraints
        base = evidence.costs
        self.costs: CostConfig = base.model_copy(update={
            "volume_per_day": base.volume_per_day if constraints.volume_per_day is None else constraints.volume_per_day,
            "horizon_days": base.horizon_days if constraints.horizon_days is None else constraints.horizon_days})

    def _assess(self, g: Group) -> dict:
        ev, c, costs = self.ev, self.c, self.costs
        pricing = ev.pricing(g, costs)
        trainings = ev.trainings(g, costs.horizon_days, c.changes_often)
        total = pricing.total(costs.volume_per_day, costs.horizon_days, trainings)
        p95 = g.cost_mean("latency_ms_p95")
        checks, problems, doubts = {}, [], []
        if c.min_quality is not None:
            lo, hi = g.ci if g.ci is not None else (g.mean, g.mean)
            if g.mean < c.min_quality:
                checks["quality"] = "fail"
                problems.append(f"{ev.metric} {g.mean:.3f} is below the required {c.min_quality:g}")
            elif lo < c.min_quality:
                checks["quality"] = "uncertain"
                doubts.append(f"{ev.metric} {g.mean:.3f} meets {c.min_quality:g}, but its 95% interval "
                              f"[{lo:.3f}, {hi:.3f}] reaches below it")
            else:
                checks["quality"] = "pass"
        if c.latency_p95_ms is not None:
            ok = p95 is not None and p95 <= c.latency_p95_ms
            checks["latency"] = "pass" if ok else "fail"
            if not ok:
                problems.append(f"p95 latency {p95:.1f} ms exceeds {c.latency_p95_ms:g} ms")
        if c.budget is not None:
            ok = total <= c.budget
            checks["budget"] = "pass" if ok else "fail"
            if not ok:
                problems.append(f"costs {_money(total, costs.currency)} over {costs.horizon_days:g} days, above the "
                                f"budget of {_money(c.budget, costs.currency)}")
        unfair = self._check_groups(g, checks, doubts)
        problems.extend(unfair)
        return {"group": g, "pricing": pricing, "trainings": trainings, "total": total, "p95": p95,
                "checks": checks, "problems": problems, "doubts": doubts, "group_problems": unfair}

    def _check_groups(self, g: Group, checks: dict, doubts: list[str]) -> list[str]:
        """``max_group_gap`` and ``min_group_accuracy``, judged on point estimates (a group's interval is wide
        by nature: as a bar it would leave nearly every study undecided); the reasons give the intervals."""
        ev, c = self.ev, self.c
        problems: list[str] = []
        if c.max_group_gap is None and c.min_group_accuracy is None:
            return problems
        breakdowns = ev.by_group(g)
        if not breakdowns:
            why = ev.groups_note() or "the study names no task.groups column"
            if c.max_group_gap is not None:
                checks["group_gap"] = "unknown"
            if c.min_group_accuracy is not None:
                checks["group_quality"] = "unknown"
            doubts.append(f"no per-group results to check the group constraints against: {why}")
            return problems
        if c.max_group_gap is not None:
            wide = [b for b in breakdowns if b.gap > c.max_group_gap]
            checks["group_gap"] = "fail" if wide else "pass"
            for b in wide:
                problems.append(f"{b.metric} differs by {b.gap:.3f} between groups of {b.column}, above the allowed "
                                f"{c.max_group_gap:g}: {_group_pair(b)}")
        if c.min_group_accuracy is not None:
            metric = "accuracy" if "accuracy" in ev.group_metrics else ev.metric
            low = [(b, s) for b in breakdowns for s in b.groups if s.values[metric] < c.min_group_accuracy]
            checks["group_quality"] = "fail" if low else "pass"
            for b, s in low:
                problems.append(f"{metric} on {b.column} = {s.name} is {s.values[metric]:.3f} {_group_ci(s, metric)}, "
                                f"below the {c.min_group_accuracy:g} every group must reach")
        return problems

    def _reasons(self, a: dict, top: Group | None) -> list[str]:
        ev, costs, g = self.ev, self.costs, a["group"]
        cur = costs.currency
        out = []
        q = f"{ev.metric} {g.mean:.3f}"
        if g.ci is not None:
            q += f" (95% CI {g.ci[0]:.3f}–{g.ci[1]:.3f}"
            q += f", ± {g.std:.3f} over {len(g.rows)} seeds)" if len(g.rows) > 1 else ")"
        if top is not None and g is not top:
            cmp = ev.compare(g, top)
            if cmp is not None:
                rel = "tied with" if cmp.tied else ("worse than" if cmp.diff < 0 else "better than")
                q += (f"; {rel} {top.label}: difference {cmp.diff:+.3f} ({_level(cmp)} CI {cmp.ci[0]:+.3f} to "
                      f"{cmp.ci[1]:+.3f})")
                if cmp.note:
                    q += f"; {cmp.note}"
        out.append(q)
        p = a["pricing"]
        per_1k = _money(p.per_request * 1000, cur)
        retrain = f" x {a['trainings']} trainings" if a["trainings"] > 1 else ""
        cost = (f"cost at {_volume(costs.volume_per_day)} requests/day over {costs.horizon_days:g} days: "
                f"{_money(a['total'], cur)} ({_money(p.upfront, cur)} training{retrain} + {per_1k} per 1,000 "
                f"requests, by {p.basis})")
        out.append(cost)
        if a["p95"] is not None:
            out.append(f"latency p95 {a['p95']:.1f} ms per single request")
        need = ev.data_needed(g)
        if g.family in PROMPTING:
            out.append("needs no training: a task change is a prompt edit" + (
                f" (demonstrations drawn from {g.train_size} labelled examples)" if g.train_size else ""))
        else:
            data = f"trained on {g.train_size} labelled examples"
            if need is not None and need < g.train_size:
                data += f"; the learning curve reaches this level from {need}"
            out.append(data + ("; each task change means relabelling and retraining" if self.c.changes_often
                               else ""))
        for b in ev.by_group(g):
            out.append(f"by {b.column}: worst group {_group_pair(b)}"
                       + (f"; small groups (under {SMALL} items, wide intervals): "
                          + ", ".join(f"{s.name} (n={s.n})" for s in b.small) if b.small else ""))
        flags = group_flags(g.rows)
        if flags:
            out.append("may be under-tuned, so its score is not final: " + "; ".join(flags))
        judge = g.judge()
        if judge is not None and judge["overall"] is not None:
            ci = judge["overall_ci"]
            out.append(f"judge {judge['model']}: {judge['overall']:.2f} on {judge['scale']}"
                       + (f" (95% CI {ci[0]:.2f}–{ci[1]:.2f})" if ci else "")
                       + f", {100 * (judge['missing_rate'] or 0):.1f}% of its calls missing (trust figures: report)")
        elif judge is not None:
            out.append(f"judge {judge['model']}: no score, every call missing")
        return out

    def recommend(self) -> dict:
        ev, costs = self.ev, self.costs
        cands = [g for g in ev.final if g.mean == g.mean]
        assessed = [self._assess(g) for g in cands]
        feasible = [a for a in assessed if not a["problems"]]
        trust = ev.judge_trust()
        out = {"study": ev.study, "metric": ev.metric, "constraints": {**asdict(self.c),
               "volume_per_day": costs.volume_per_day, "horizon_days": costs.horizon_days},
               "currency": costs.currency, "judge_warnings": trust["warnings"] if trust else []}
        if not cands:
            return {**out, "verdict": "not enough evidence", "summary": "no finished trial to judge", "ranking": []}
        missing = [g.label for g in cands if g.fn is None]
        if not feasible:
            closest = max(assessed, key=lambda a: a["group"].mean)
            summary = (f"no approach meets every constraint; the closest is {closest['group'].label}: "
                       + "; ".join(closest["problems"]))
            ranking = self._rank(assessed, None, [])
            return {**out, "verdict": "none feasible", "recommended": None, "summary": summary, "ranking": ranking}
        top = max(feasible, key=lambda a: a["group"].mean)
        tied_groups = ev.tied_with(top["group"], [a["group"] for a in feasible]) if top["group"].fn else [top["group"]]
        tied = [a for a in feasible if a["group"] in tied_groups]
        tied.sort(key=lambda a: (a["total"], a["p95"] or 0.0))
        pick = tied[0]
        ranking = self._rank(assessed, top["group"], [a["group"] for a in tied])
        g = pick["group"]
        cur = costs.currency
        if top["group"].fn is None:
            verdict = "not enough evidence"
            summary = (f"{top['group'].label} scores highest ({ev.metric} {top['group'].mean:.3f}) but its trials "
                       "have no per-item results to test the difference (stored by an older tunebench): rerun the "
                       "study into a fresh store")
        elif pick["doubts"]:
            verdict = "not enough evidence"
            summary = (f"{g.label} is the best candidate, but the test set cannot confirm the quality bar: "
                       + pick["doubts"][0] + "; more test data would settle it")
        elif len(tied) > 1:
            verdict = "tie"
            others = ", ".join(a["group"].label for a in tied[1:])
            summary = (f"tie on {ev.metric}: {g.label} and {others} cannot be separated on this test set; "
                       f"{g.label} is the cheapest of them ({_money(pick['total'], cur)} over "
                       f"{costs.horizon_days:g} days at {_volume(costs.volume_per_day)} requests/day)")
            seedy = [c for c in (ev.compare(a["group"], top["group"]) for a in tied if a is not top) if c is not None
                     and c.seeds_needed and (c.seed_share or 0) > 0.5]
            if seedy:
                need = max(c.seeds_needed for c in seedy)
                summary += (f". Seed-to-seed variation dominates the differences: about {need} seeds per strategy "
                            "would separate them at the differences seen")
        else:
            verdict = "recommend"
            runner = max((a for a in feasible if a is not pick), key=lambda a: a["group"].mean, default=None)
            summary = f"{g.label}: best {ev.metric} ({g.mean:.3f})"
            if runner is not None:
                cmp = ev.compare(runner["group"], g)
                if cmp is not None:
                    summary += (f", ahead of {runner['group'].label} by {-cmp.diff:.3f} ({_level(cmp)} CI "
                                f"{-cmp.ci[1]:.3f} to {-cmp.ci[0]:.3f})")
            summary += f"; {_money(pick['total'], cur)} over {costs.horizon_days:g} days at your volume"
        by_groups = [a for a in assessed if a["group"].mean > g.mean and a["group_problems"]]
        if by_groups:
            best_avg = max(by_groups, key=lambda a: a["group"].mean)
            summary += (f". {best_avg['group'].label} scores higher on average ({ev.metric} "
                        f"{best_avg['group'].mean:.3f}) but fails the group constraints: "
                        f"{best_avg['group_problems'][0]}")
        flagged = {a["group"].label: group_flags(a["group"].rows) for a in assessed}
        under = {label: flags for label, flags in flagged.items() if flags}
        if under:
            summary += (f". Not final for {', '.join(under)}: "
                        + ("its" if len(under) == 1 else "their") + " tuning may not have converged (see the reasons)")
        return {**out, "verdict": verdict, "recommended": g.label, "tied": [a["group"].label for a in tied],
                "summary": summary, "ranking": ranking, "missing_items": missing, "undertuned": under}

    def _rank(self, assessed: list[dict], top: Group | None, tied: list[Group]) -> list[dict]:
        def key(a: dict):
            feasible = not a["problems"]
            return (not feasible, a["group"] not in tied, a["total"] if a["group"] in tied else 0.0,
                    -a["group"].mean)

        out = []
        for rank, a in enumerate(sorted(assessed, key=key), 1):
            g = a["group"]
            out.append({"rank": rank, "label": g.label, "family": g.family, "feasible": not a["problems"],
                        "tied_with_top": g in tied, "quality": g.mean, "ci": None if g.ci is None else list(g.ci),
                        "total_cost": a["total"], "upfront_cost": a["pricing"].upfront * a["trainings"],
                        "cost_per_1k": a["pricing"].per_request * 1000, "latency_p95_ms": a["p95"],
                        "checks": a["checks"], "problems": a["problems"], "doubts": a["doubts"],
                        "groups": [_group_summary(b) for b in self.ev.by_group(g)],
                        "reasons": self._reasons(a, top)})
        return out


def _group_ci(s, metric: str) -> str:
    ci = s.ci.get(metric)
    small = ", small group" if s.small else ""
    return f"(n={s.n}{small}, 95% CI {ci[0]:.3f}–{ci[1]:.3f})" if ci else f"(n={s.n}{small}, no interval)"


def _group_pair(b) -> str:
    """The worst group against the best, with values, sizes and the gap's paired interval."""
    lo, hi = b.group(b.worst), b.group(b.best)
    gap = f"gap {b.gap:.3f}" + (f" (95% CI {b.gap_ci[0]:+.3f} to {b.gap_ci[1]:+.3f})" if b.gap_ci else " (no interval)")
    if b.best == b.worst:
        return f"{lo.name} {b.metric} {lo.values[b.metric]:.3f} {_group_ci(lo, b.metric)} (one group only)"
    return (f"{lo.name} {b.metric} {lo.values[b.metric]:.3f} {_group_ci(lo, b.metric)} against {hi.name} "
            f"{hi.values[b.metric]:.3f} {_group_ci(hi, b.metric)}: {gap}")


def _group_summary(b) -> dict:
    return {"column": b.column, "metric": b.metric, "worst": b.worst, "worst_value": b.group(b.worst).values[b.metric],
            "best": b.best, "best_value": b.group(b.best).values[b.metric], "gap": b.gap,
            "gap_ci": None if b.gap_ci is None else list(b.gap_ci), "small": [s.name for s in b.small]}


def recommend(evidence: Evidence, constraints: Constraints | None = None) -> dict:
    """Rank the study's approaches under ``constraints``; see the module docstring for the verdicts."""
    return Recommender(evidence, constraints or Constraints()).recommend()
