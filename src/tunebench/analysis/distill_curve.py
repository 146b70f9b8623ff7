"""The distillation learning curve: a distilled student's quality against the teacher labels bought for it (one
``distill`` trial per size of ``pool_sizes``), beside the gold-label learning curve of the same student strategy,
and the exchange rate between the two: how many teacher labels buy what one gold label buys.

The exchange rate at a gold train size ``n`` is read off the curves: the number of teacher labels at which the
distilled curve reaches the quality of the gold-trained student at ``n``, interpolated linearly in the logarithm of
the labels between the two pool sizes around it (pool sizes are usually geometric), divided by ``n``. Where the
distilled curve never reaches that quality, or is already above it at its smallest pool, there is no crossing and
the result says so rather than extrapolating.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any

import numpy as np

POOL_SIZE = re.compile(r"pool_size=\d+")


def curve_name(label: str) -> str:
    """A distill trial's label without its ``pool_size``: the name of the curve its pool sizes make."""
    name = POOL_SIZE.sub("", label)
    name = re.sub(r"\(\s*,\s*", "(", name)
    name = re.sub(r",\s*,", ",", name)
    name = re.sub(r",\s*\)", ")", name)
    return name.replace("()", "")


def crossing(distilled: list[dict], quality: float) -> dict[str, Any]:
    """Where the distilled curve (``[{labels, mean}]``, fewest labels first) first reaches ``quality``.

    ``status``: ``crossed`` (``labels`` interpolated between the points around the crossing), ``above`` (the
    smallest pool already reaches it: ``labels`` is an upper bound) or ``below`` (no pool reaches it; ``labels`` is
    None)."""
    pts = [p for p in distilled if p["mean"] == p["mean"]]
    if not pts:
        return {"status": "below", "labels": None}
    if pts[0]["mean"] >= quality:
        return {"status": "above", "labels": float(pts[0]["labels"])}
    for lo, hi in zip(pts, pts[1:]):
        if hi["mean"] >= quality:
            t = (quality - lo["mean"]) / (hi["mean"] - lo["mean"])
            a, b = math.log(lo["labels"]), math.log(hi["labels"])
            return {"status": "crossed", "labels": float(math.exp(a + t * (b - a)))}
    return {"status": "below", "labels": None}


def exchange(distilled: list[dict], gold: list[dict]) -> list[dict]:
    """Per gold point (``[{train_size, mean}]``): the teacher labels that match it and their ratio to the gold
    labels (``rate``: teacher labels per gold label), with a sentence that says when the curves do not cross."""
    out = []
    best = max((p for p in distilled if p["mean"] == p["mean"]), key=lambda p: p["mean"], default=None)
    for g in gold:
        if not g["train_size"] or g["mean"] != g["mean"]:
            continue
        c = crossing(distilled, g["mean"])
        n = g["train_size"]
        if c["status"] == "crossed":
            text = (f"about {c['labels']:,.0f} teacher labels match {n:,} gold labels ({g['mean']:.3f}): "
                    f"{c['labels'] / n:.2f} teacher labels per gold label")
        elif c["status"] == "above":
            text = (f"the smallest pool ({c['labels']:,.0f} teacher labels) already matches {n:,} gold labels "
                    f"({g['mean']:.3f}): at most {c['labels'] / n:.2f} teacher labels per gold label (the curves do "
                    "not cross inside the pool sizes tried)")
        elif best is None:
            text = f"no distilled result to set against {n:,} gold labels"
        else:
            text = (f"the curves do not cross: no pool size reaches {n:,} gold labels ({g['mean']:.3f}); the "
                    f"distilled student's best is {best['mean']:.3f} at {best['labels']:,.0f} teacher labels")
        out.append({"gold": n, "gold_mean": g["mean"], "status": c["status"], "teacher_labels": c["labels"],
                    "rate": None if c["labels"] is None else c["labels"] / n, "text": text})
    return out


def _labels_bought(g) -> float:
    """The teacher labels a distill group bought, averaged over its seeds (the configured pool size where a stored
    row has no labelling record)."""
    vals = [(r["record"].get("distill") or {}).get("labelling", {}).get("calls") for r in g.rows]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else float(g.rows[0]["params"].get("pool_size") or 0)


def _gold(groups: list, student: dict, model: str) -> tuple[str | None, list]:
    """The gold-label curve of the distill student's strategy on its model: the label whose params hold the
    student's own params (else any label of that strategy), with the most train sizes."""
    by_label: dict[str, list] = defaultdict(list)
    for g in groups:
        if g.strategy == student.get("strategy") and g.model == model and g.train_size:
            by_label[g.label].append(g)
    if not by_label:
        return None, []
    wanted = student.get("params") or {}

    def score(label: str) -> tuple[bool, int]:
        params = by_label[label][0].rows[0]["params"]
        return all(params.get(k) == v for k, v in wanted.items()), len(by_label[label])

    label = max(sorted(by_label), key=score)
    return label, sorted(by_label[label], key=lambda g: g.train_size)


def distill_curves(groups: list, ci=lambda g: g.ci) -> list[dict]:
    """Every distillation curve of a study's groups (distill trials differing only in ``pool_size``, at one train
    size, two pool sizes or more): its points, the gold-label curve of the same student strategy where the study
    has one, and the exchange rate at each gold size. ``ci`` gives a group's interval (None: none)."""
    curves: dict[tuple, list] = defaultdict(list)
    for g in groups:
        if g.strategy == "distill" and g.rows:
            curves[(curve_name(g.label), g.model, g.train_size)].append(g)
    out = []
    for (name, model, size), gs in sorted(curves.items()):
        if len({g.rows[0]["params"].get("pool_size") for g in gs}) < 2:
            continue
        points = sorted(({"label": g.label, "pool_size": g.rows[0]["params"].get("pool_size"),
                          "labels": _labels_bought(g), "mean": g.mean, "std": g.std, "ci": _pair(ci(g)),
                          "seeds": len(g.rows)} for g in gs), key=lambda p: p["labels"])
        student = gs[0].rows[0]["params"].get("student") or {}
        gold_label, gold = _gold(groups, student, model)
        gold_pts = [{"train_size": g.train_size, "mean": g.mean, "std": g.std, "ci": _pair(ci(g)),
                     "seeds": len(g.rows)} for g in gold]
        out.append({"name": name, "model": model, "train_size": size, "teacher": (gs[0].rows[0]["params"].get(
                    "teacher") or {}).get("strategy"), "student": student.get("strategy"), "points": points,
                    "gold_label": gold_label, "gold": gold_pts, "exchange": exchange(points, gold_pts)})
    return out


def _pair(ci) -> list[float] | None:
    return None if ci is None else [float(ci[0]), float(ci[1])]
