"""``cascade``: a distilled student that hands its low-confidence inputs back to its teacher.

A cascade is a ``distill`` trial (same teacher, pool, labelling, student and budget keys) plus a ``target``: after
the student is trained, both models predict the gold dev split and the test split; the student's confidence (its
top label's softmax probability) below a threshold sends an input to the teacher. The threshold is chosen on dev
for the target (:mod:`tunebench.evaluation.cascade`), never on test; the whole test curve (threshold -> accuracy,
fallback rate, blended cost per request, blended latency) is stored with the trial. The trial's predictor is the
cascade at the chosen threshold, so the runner measures it like any other candidate: its per-item correctness,
single-request latency (the teacher's time included where an input falls back) and tokens are the cascade's.

It is a strategy of its own rather than a key of ``distill`` so that a study holding both compares the student
alone with the student behind its fallback, each a row of the leaderboard. Its saved artifact holds both models:
``student/`` and ``teacher/`` (each a predictor artifact of its own: the student's weights, the teacher's template and
demonstrations) and ``cascade.json`` (the threshold and the teacher's strategy and model). It loads with the teacher's
model handed over as a peer (``load_predictor(dir, backend, peers={teacher model: its backend})``), which is how
``tunebench serve`` serves the cascade: the student locally, the teacher through its own backend.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..config.costs import CostConfig
from ..data import Split
from ..errors import ConfigError, StoreError
from ..evaluation.cascade import CascadeTable, at, check_target, choose, curve, pareto
from ..evaluation.cost import latency_ms, price
from .base import PREDICTOR_FILE, Output, Predictor, doc, load_predictor, register
from .distill import Distill, DistillConfig, softmax

log = logging.getLogger(__name__)

LATENCY_ITEMS = 16  # single requests timed per model for the curve's latency and serving cost
STUDENT_DIR, TEACHER_DIR, CASCADE_FILE = "student", "teacher", "cascade.json"  # the parts of a cascade's artifact


@dataclass
class CascadeConfig(DistillConfig):
    """Cascade: a distilled student whose inputs below a confidence threshold go to the teacher."""

    target: Optional[dict[str, float]] = doc(
        "What the threshold is chosen for, on the gold dev split: {min_accuracy: x} (the least fallback that "
        "reaches x) or {max_fallback: y} (the most accurate within y); default: the most accurate dev point, with "
        "the dev Pareto set (accuracy against fallback) stored for the user to pick from.", default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target is not None:
            try:
                check_target(self.target)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None


def confidence(scores: np.ndarray) -> np.ndarray:
    """The student's confidence per input: its top label's softmax probability."""
    return softmax(scores, 1.0).max(axis=1)


class CascadePredictor(Predictor):
    """The student, with the inputs it is less sure of than ``threshold`` answered by the teacher.

    ``requests`` and ``fallbacks`` count the inputs it has routed and those that went to the teacher (what a server
    reports); ``teacher_model`` names the study model the teacher runs on (what loading it needs as a peer)."""

    kind = "cascade"
    peered = True

    def __init__(self, student: Predictor, teacher: Predictor, threshold: float, teacher_model: str | None = None):
        super().__init__("cascade", student.config, student.labels)
        self.student, self.teacher, self.threshold = student, teacher, float(threshold)
        self.teacher_model = teacher_model
        self.backend = student.backend
        self.train_result = getattr(student, "train_result", None)  # the student's epochs, as the runner reads them
        self.requests = self.fallbacks = 0

    def route(self, inputs) -> tuple[Output, np.ndarray]:
        """The cascade's output and, per input, whether it fell back to the teacher."""
        inputs = list(inputs)
        out = self.student.run(inputs)
        if out.scores is None:  # a student that answers without class scores: its scored labels, as on dev
            out.scores = np.asarray(self.student.predict_scores(inputs))
            out.predictions = out.scores.argmax(axis=1)
        back = confidence(out.scores) < self.threshold
        preds = np.asarray(out.predictions, dtype=np.int64).copy()
        prompt = list(out.prompt_tokens) or [0] * len(inputs)
        completion = list(out.completion_tokens) or [0] * len(inputs)
        idx = np.flatnonzero(back)
        if len(idx):
            taught = self.teacher.run([inputs[i] for i in idx])
            preds[idx] = np.asarray(taught.predictions, dtype=np.int64)
            for j, i in enumerate(idx):  # a fallback pays for both models' tokens
                prompt[i] += int(taught.prompt_tokens[j]) if j < len(taught.prompt_tokens) else 0
                completion[i] += int(taught.completion_tokens[j]) if j < len(taught.completion_tokens) else 0
        self.requests += len(inputs)
        self.fallbacks += len(idx)
        return Output(preds, prompt, completion), back

    def run(self, inputs) -> Output:
        return self.route(inputs)[0]

    def predict(self, inputs):
        return self.run(inputs).predictions

    def predict_scores(self, inputs) -> np.ndarray:
        """One-hot scores of the cascade's answers (its two models' scores are not on one scale); an answer that
        names no label scores zero everywhere."""
        preds = self.predict(inputs)
        out = np.zeros((len(preds), len(self.labels)), dtype=np.float32)
        ok = preds >= 0
        out[np.flatnonzero(ok), preds[ok]] = 1.0
        return out

    def save(self, directory) -> None:
        """Both models, each as its own artifact (``student/``, ``teacher/``), with ``cascade.json`` naming the
        threshold and the teacher's model. (The predictor file names no strategy config: the parts carry theirs.)"""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.student.save(directory / STUDENT_DIR)
        self.teacher.save(directory / TEACHER_DIR)
        self._save(directory)
        meta = {"kind": self.kind, "strategy": "cascade", "config": {}, "labels": self.labels}
        (directory / PREDICTOR_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")

    def _save(self, directory: Path) -> None:
        teacher = dict(getattr(self, "cascade", {}).get("teacher") or {})
        teacher.setdefault("model", self.teacher_model)
        meta = {"threshold": self.threshold, "teacher": teacher, "student": STUDENT_DIR, "teacher_dir": TEACHER_DIR}
        (directory / CASCADE_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")

    @classmethod
    def _load(cls, directory: Path, backend, strategy: str, config, labels: list[str]) -> Predictor:
        return cls._load_peered(directory, backend, {}, labels)

    @classmethod
    def _load_peered(cls, directory: Path, backend, peers: dict, labels: list[str]) -> Predictor:
        """The student on ``backend``, the teacher on ``peers[teacher model]`` (``backend`` when the teacher ran on
        the student's own model)."""
        meta = json.loads((directory / CASCADE_FILE).read_text(encoding="utf-8"))
        model = (meta.get("teacher") or {}).get("model")
        if model in peers:
            teacher_backend = peers[model]
        elif not peers:
            raise StoreError(f"{directory}: a cascade loads with its teacher's model ('{model}') handed over as a "
                             "peer; open the trial from its store (tunebench serve STUDY --trial ID)")
        else:
            raise StoreError(f"{directory}: the cascade's teacher runs on model '{model}', which was not loaded "
                             f"(loaded: {', '.join(sorted(peers))})")
        student = load_predictor(directory / meta.get("student", STUDENT_DIR), backend)
        teacher = load_predictor(directory / meta.get("teacher_dir", TEACHER_DIR), teacher_backend)
        if list(teacher.labels) != list(student.labels):
            raise StoreError(f"{directory}: the teacher's labels {teacher.labels} differ from the student's "
                             f"{student.labels}")
        return cls(student, teacher, meta["threshold"], model)


def _side(student: Predictor, teacher: Predictor, split: Split) -> dict[str, Any]:
    """Both models on one labelled split: the student's confidence and correctness, the teacher's correctness and
    tokens per item."""
    records = split.records()
    scores = student.predict_scores(records)
    out = teacher.run(records)
    gold = np.asarray(split.labels)
    return {"confidence": confidence(scores), "student": scores.argmax(axis=1) == gold,
            "teacher": np.asarray(out.predictions) == gold,
            "prompt_tokens": np.asarray(out.prompt_tokens or [0] * len(records), dtype=np.float64),
            "completion_tokens": np.asarray(out.completion_tokens or [0] * len(records), dtype=np.float64)}


def per_request(model: str, ms: float, side: dict | None, costs: CostConfig) -> float:
    """What one request to ``model`` costs as the cost model prices it: API tokens (the mean over ``side``'s items)
    for a model in ``costs.api``, else ``ms`` of serving time."""
    cost = {"latency_ms_mean": ms}
    if side is not None:
        cost.update(prompt_tokens_mean=float(side["prompt_tokens"].mean()),
                    completion_tokens_mean=float(side["completion_tokens"].mean()))
    return price(cost, model, costs).per_request


@register
class Cascade(Distill):
    """A distilled student serving, with its low-confidence inputs answered by the teacher."""

    name = "cascade"
    config_cls = CascadeConfig
    config: CascadeConfig

    def adapt(self, backend, task, *, train, dev) -> Predictor:
        student = super().adapt(backend, task, train=train, dev=dev)
        teacher = self.taught
        cfg, costs = self.config, self.costs or CostConfig()
        t0 = time.perf_counter()
        on_dev = _side(student, teacher, dev)  # choosing the threshold is part of building the cascade: upfront
        dev_s = time.perf_counter() - t0
        on_test = _side(student, teacher, task.test)  # measurement, like any trial's pass over test
        sample = task.test.records()
        student_ms = float(np.mean(latency_ms(student.predict, sample, n=LATENCY_ITEMS)))
        teacher_ms = float(np.mean(latency_ms(teacher.predict, sample, n=LATENCY_ITEMS)))
        teacher_model = cfg.teacher["model"] or ""
        student_cost = per_request(cfg.student["model"] or "", student_ms, None, costs)
        teacher_cost = per_request(teacher_model, teacher_ms, on_test, costs)

        def table(side: dict) -> CascadeTable:
            return CascadeTable(side["confidence"], side["student"], side["teacher"], student_cost, teacher_cost,
                                student_ms, teacher_ms)

        dev_curve = curve(table(on_dev))
        target = cfg.target or {"max_fallback": 1.0}  # no target: the most accurate dev point
        chosen = choose(dev_curve, target)
        met = chosen is not None
        if chosen is None:  # only min_accuracy can be out of reach: take the most accurate dev point, and say so
            chosen = choose(dev_curve, {"max_fallback": 1.0})
            log.warning("cascade: no threshold reaches %s on dev (best %.3f at fallback %.3f); using that point",
                        target, chosen.accuracy, chosen.fallback_rate)
        on_test_point = at(table(on_test), chosen.threshold)
        test_curve = curve(table(on_test))  # the test point at the chosen threshold routes as curve[curve_index]
        back = on_test["confidence"] < chosen.threshold
        api = costs.api.get(teacher_model)
        dev_dollars = 0.0 if api is None else float(np.sum(
            on_dev["prompt_tokens"] * api.input_per_1m + on_dev["completion_tokens"] * api.output_per_1m) / 1e6)
        api_dollars = 0.0 if api is None else float(np.sum(
            (on_test["prompt_tokens"] * api.input_per_1m + on_test["completion_tokens"] * api.output_per_1m)[back])
            / 1e6 / len(back))
        predictor = CascadePredictor(student, teacher, chosen.threshold, teacher_model)
        predictor.distill = student.distill
        predictor.cascade = {
            "teacher": {"strategy": cfg.teacher["strategy"], "model": cfg.teacher["model"]},
            "target": cfg.target, "target_met": met, "threshold": chosen.threshold,
            "dev": chosen.to_dict(), "test": on_test_point.to_dict(),
            "curve": [p.to_dict() for p in test_curve],
            "curve_index": int(np.searchsorted([p.threshold for p in test_curve], chosen.threshold)),
            "dev_pareto": [p.to_dict() for p in pareto(dev_curve)],
            "student": {"test_accuracy": float(on_test["student"].mean()), "latency_ms": round(student_ms, 3),
                        "cost_per_request": student_cost},
            "teacher_alone": {"test_accuracy": float(on_test["teacher"].mean()), "latency_ms": round(teacher_ms, 3),
                              "cost_per_request": teacher_cost},
            "api_dollars_per_request": api_dollars,
            "selection": {"items": len(dev), "seconds": round(dev_s, 4), "dollars": round(dev_dollars, 6)}}
        log.info("cascade: threshold %.4f chosen on dev (accuracy %.3f, fallback %.3f); on test accuracy %.3f, "
                 "fallback %.3f", chosen.threshold, chosen.accuracy, chosen.fallback_rate, on_test_point.accuracy,
                 on_test_point.fallback_rate)
        return predictor
