"""The cascade curve: a student that hands its low-confidence inputs to a teacher, at every threshold.

Read from per-item tables (the student's confidence and correctness, the teacher's correctness on the same items)
and the two models' costs and latencies; nothing is loaded or served. An input whose student confidence is below
the threshold falls back: its answer is the teacher's, and it pays for both models (the student ran first). The
threshold is chosen on dev for a target and then read on test, so the test curve never picks its own point.

The ``cascade`` strategy (:mod:`tunebench.strategies.cascade`) builds these tables on dev and test and stores the
curve with its trial; ``tunebench serve`` does not serve a cascade yet.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError

TARGETS = ("min_accuracy", "max_fallback")


@dataclass(frozen=True)
class CascadeTable:
    """Per item: the student's confidence (its top label's probability), whether the student and the teacher are
    right; per model: cost per request and latency in ms (one value, or one per item)."""

    confidence: np.ndarray
    student_correct: np.ndarray
    teacher_correct: np.ndarray
    student_cost: float
    teacher_cost: float
    student_latency_ms: Any  # float or (n,) array
    teacher_latency_ms: Any

    def __post_init__(self) -> None:
        n = len(self.confidence)
        if not n or len(self.student_correct) != n or len(self.teacher_correct) != n:
            raise ValueError(f"a cascade table needs the same items in every column (confidence {n}, student "
                             f"{len(self.student_correct)}, teacher {len(self.teacher_correct)})")


@dataclass(frozen=True)
class CascadePoint:
    """The cascade at one threshold: inputs below it go to the teacher."""

    threshold: float
    accuracy: float
    fallback_rate: float
    cost_per_request: float
    latency_ms_p50: float
    latency_ms_p95: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def thresholds(confidence: np.ndarray) -> np.ndarray:
    """Every threshold that changes the routing: 0 (no fallback), each distinct confidence (items below it fall
    back), and just above the largest (every input falls back)."""
    c = np.unique(np.asarray(confidence, dtype=np.float64))
    return np.unique(np.concatenate([[0.0], c, [np.nextafter(c[-1], np.inf)]]))


def at(table: CascadeTable, threshold: float) -> CascadePoint:
    """The cascade on ``table`` with inputs of confidence below ``threshold`` sent to the teacher."""
    conf = np.asarray(table.confidence, dtype=np.float64)
    back = conf < threshold
    correct = np.where(back, np.asarray(table.teacher_correct, bool), np.asarray(table.student_correct, bool))
    n = len(conf)
    student_ms = np.broadcast_to(np.asarray(table.student_latency_ms, dtype=np.float64), (n,))
    teacher_ms = np.broadcast_to(np.asarray(table.teacher_latency_ms, dtype=np.float64), (n,))
    latency = student_ms + np.where(back, teacher_ms, 0.0)
    rate = float(back.mean())
    return CascadePoint(float(threshold), float(correct.mean()), rate, table.student_cost + rate * table.teacher_cost,
                        float(np.percentile(latency, 50)), float(np.percentile(latency, 95)))


def curve(table: CascadeTable) -> list[CascadePoint]:
    """The cascade at every threshold that changes the routing, from no fallback to all of it.

    Example:
        >>> t = CascadeTable(np.array([0.9, 0.6, 0.3]), np.array([1, 1, 0]), np.array([1, 0, 1]), 0.001, 0.01,
        ...                  5.0, 200.0)
        >>> [(round(p.accuracy, 3), round(p.fallback_rate, 3)) for p in curve(t)]
        [(0.667, 0.0), (0.667, 0.0), (1.0, 0.333), (0.667, 0.667), (0.667, 1.0)]
    """
    return [at(table, t) for t in thresholds(table.confidence)]


def check_target(target: Any, where: str = "target") -> tuple[str, float]:
    """``{min_accuracy: x}`` or ``{max_fallback: y}`` as ``(name, value)``; a bad one is a ``ConfigError`` naming
    the field."""
    if not isinstance(target, dict) or len(target) != 1 or next(iter(target)) not in TARGETS:
        raise ConfigError(f"{where}: give one of {{min_accuracy: 0.9}} or {{max_fallback: 0.2}}, not {target!r}")
    name, value = next(iter(target.items()))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(f"{where}.{name}: a share in [0, 1], not {value!r}")
    return name, float(value)


def choose(dev: list[CascadePoint], target: dict) -> CascadePoint | None:
    """The dev point that meets ``target`` best: for ``min_accuracy`` the least fallback (the cheapest) among the
    points that reach it; for ``max_fallback`` the most accurate among the points within it (less fallback on a
    tie). None when no point meets it."""
    name, value = check_target(target)
    if name == "min_accuracy":
        ok = [p for p in dev if p.accuracy >= value]
        return min(ok, key=lambda p: (p.fallback_rate, -p.accuracy)) if ok else None
    ok = [p for p in dev if p.fallback_rate <= value]
    return max(ok, key=lambda p: (p.accuracy, -p.fallback_rate)) if ok else None


def select_on_dev(dev: CascadeTable, test: CascadeTable, target: dict) -> dict[str, Any]:
    """The threshold chosen on dev for ``target``, and what it gives on test (with the whole test curve)."""
    chosen = choose(curve(dev), target)
    return {"target": dict(target), "dev": None if chosen is None else chosen.to_dict(),
            "test": None if chosen is None else at(test, chosen.threshold).to_dict(),
            "curve": [p.to_dict() for p in curve(test)]}


def pareto(points: list[CascadePoint]) -> list[CascadePoint]:
    """The points no other point beats on both counts (as accurate or more with less fallback, or more accurate
    with no more fallback), by fallback rate: what a user picks from when no target is set.

    Example:
        >>> pts = [CascadePoint(t, a, f, 0.0, 0.0, 0.0) for t, a, f in [(0, .6, 0), (.5, .6, .3), (.7, .9, .5),
        ...                                                              (1, .8, 1)]]
        >>> [p.threshold for p in pareto(pts)]
        [0, 0.7]
    """
    front, best = [], -np.inf
    for p in sorted(points, key=lambda p: (p.fallback_rate, -p.accuracy)):
        if p.accuracy > best:
            front.append(p)
            best = p.accuracy
    return front
