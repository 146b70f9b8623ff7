"""Measuring an adapted predictor on test: quality, per-item scores, latency, tokens, perplexity, consistency.

The same code measures every strategy. A predictor is anything with ``run(records) -> Output`` (predictions and
token counts) and ``predict(records)``; evaluation never imports a strategy.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..config import ConsistencyConfig, TaskConfig
from ..data import TaskData
from ..progress import NULL_REPORTER, Reporter
from ..textfmt import render
from ..version import __version__
from . import counterfactual
from .consistency import measure as measure_consistency
from .cost import latency_ms
from .metrics import classification_metrics, generation_item_scores, generation_metrics


@dataclass
class Measurement:
    """What one trial's predictor did on test."""

    records: list[dict]  # the test inputs as the predictor saw them
    output: Any  # the predictor's Output on the test records (predictions, token counts, generated text)
    metrics: dict
    items: dict  # per-item predictions and scores (what paired statistics need)
    truth: dict  # the test labels or reference texts
    latencies: list[float]
    infer_seconds: float
    consistency: dict | None


def measure(predictor, data: TaskData, *, seed: int, consistency: ConsistencyConfig, clock: Callable[[], float],
            reporter: Reporter = NULL_REPORTER) -> Measurement:
    """Predict every test item once (timed), sample single-request latency, score the predictions, take the
    perplexity of references where the predictor has one, and the consistency under ``consistency``."""
    records = data.test.records()
    reporter.start("evaluating on test", 1)
    t0 = clock()
    out = predictor.run(records)
    infer_s = clock() - t0
    latencies = latency_ms(predictor.predict, records)
    nll = None
    if data.test.targets is not None and hasattr(predictor, "reference_nll"):
        nll = predictor.reference_nll(records, data.test.targets)
    reporter.advance()
    reporter.stop()
    expected = data.test.targets if data.test.targets is not None else data.test.labels.tolist()
    stability = measure_stability(predictor, records, out.predictions, seed, consistency, data.config, reporter,
                                  truth=expected)
    metrics, items, truth = score_test(data, out.predictions, out.scores)
    if nll is not None:
        metrics["perplexity"] = float(np.exp(np.mean(nll)))
    return Measurement(records, out, metrics, items, truth, latencies, infer_s, stability)


def score_test(data: TaskData, predictions, class_scores: np.ndarray | None = None) -> tuple[dict, dict, dict]:
    """Test metrics, per-item predictions and scores, and the truth they were scored against (with the test
    inputs, which the item explorer shows, and each item's group under every ``task.groups`` column, which the
    per-group analysis reads). ``class_scores`` (n, labels), where the predictor has them, give each item's
    confidence: the softmax probability of the predicted label."""
    inputs = list(data.test.texts)
    groups = {"groups": {c: list(v) for c, v in data.test.groups.items()}} if data.test.groups else {}
    if data.test.targets is not None:
        preds = list(predictions)
        metrics = generation_metrics(preds, data.test.targets)
        items = {"predictions": preds, "scores": generation_item_scores(preds, data.test.targets)}
        return metrics, items, {"targets": list(data.test.targets), "inputs": inputs, **groups}
    metrics = classification_metrics(data.test.labels, predictions, data.label_names)
    preds = [int(p) for p in predictions]
    items = {"predictions": preds,
             "scores": {"accuracy": [float(p == y) for p, y in zip(preds, data.test.labels.tolist())]}}
    if class_scores is not None and len(class_scores) == len(preds):
        z = np.asarray(class_scores, dtype=np.float64)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        items["confidence"] = [round(float(c), 5) for c in z.max(axis=1) / z.sum(axis=1)]
    return metrics, items, {"labels": data.test.labels.tolist(), "label_names": data.label_names, "inputs": inputs,
                            **groups}


def measure_stability(predictor, records: list[dict], predictions, seed: int, cfg: ConsistencyConfig,
                      task: TaskConfig, reporter: Reporter = NULL_REPORTER, *, truth=None) -> dict | None:
    """Flip rates under the configured perturbations (first ``max_items`` test items), sample agreement and the
    counterfactual swaps (first ``max_items`` test items each swap changes; ``truth``: the test labels or
    references, for accuracy before and after a swap)."""
    swaps = counterfactual.swaps(cfg.counterfactual)
    if not cfg.perturbations and cfg.samples < 2 and not swaps:
        return None

    def join(row: dict) -> str:
        return render(task.text_template, row) if task.text_template else row[task.text[0]]

    n = min(cfg.max_items, len(records))
    reporter.start("consistency", 1)
    try:
        out = measure_consistency(predictor, records[:n], list(predictions[:n]), kinds=cfg.perturbations, seed=seed,
                                  fields=task.text, join=join, samples=cfg.samples)
        if swaps:
            out["counterfactual"], flips = counterfactual.measure(
                predictor, records, list(predictions), truth, swaps, fields=task.text, join=join,
                max_items=cfg.max_items)
            out["flips"].update(flips)
        return out
    finally:
        reporter.advance()
        reporter.stop()


def cost_of(m: Measurement, *, train_result, adapt_s: float, search_s: float, peak_mb: float) -> dict[str, Any]:
    """The trial's cost record: trainable parameters, training time (a search counts), latency, tokens, memory."""
    lat = m.latencies
    p50, p95 = (float(np.percentile(lat, q)) for q in (50, 95))
    n_test = len(m.output.predictions)
    r = train_result
    return {
        "trainable_params": int(r.trainable_params if r else 0),
        "train_seconds": round((r.train_seconds if r else adapt_s) + search_s, 4),
        "adapt_seconds": round(adapt_s + search_s, 4),
        "train_examples_per_s": round(r.examples_per_s, 2) if r else None,
        "latency_ms_p50": round(p50, 3),
        "latency_ms_p95": round(p95, 3),
        "latency_ms_mean": round(float(np.mean(lat)), 3),
        "latency_ms_samples": [round(x, 3) for x in lat],
        "throughput_per_s": round(n_test / m.infer_seconds, 2) if m.infer_seconds > 0 else None,
        **token_stats(m.output.prompt_tokens, m.output.completion_tokens),
        "peak_memory_mb": round(peak_mb, 1),
    }


def token_stats(prompt: list[int], completion: list[int]) -> dict[str, float]:
    """Tokens per request: prompt and completion, mean and p95, and the mean total."""
    p = np.asarray(prompt or [0], dtype=float)
    c = np.asarray(completion or [0], dtype=float)
    return {"prompt_tokens_mean": round(float(p.mean()), 2), "prompt_tokens_p95": round(float(np.percentile(p, 95)), 2),
            "completion_tokens_mean": round(float(c.mean()), 2),
            "completion_tokens_p95": round(float(np.percentile(c, 95)), 2),
            "tokens_per_request": round(float(p.mean() + c.mean()), 2)}


def versions() -> dict[str, str]:
    """Library versions a trial record carries."""
    import datasets  # heavy: imported only when a trial is recorded
    import peft
    import transformers

    return {"tunebench": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "datasets": datasets.__version__}
