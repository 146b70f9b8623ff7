"""The one table of quality metrics: name, task types, direction and display format.

The CLI (``--metric`` choices), the search (``search.metric``), the leaderboard, the analysis and the report
read it; ``evaluation.metrics`` computes the values under these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TaskType = Literal["classification", "generation"]


@dataclass(frozen=True)
class Metric:
    name: str
    task_types: tuple[str, ...]
    description: str
    higher_is_better: bool = True
    fmt: str = ".3f"
    headline: bool = False  # shown in one-line summaries
    searchable: bool = True  # a hyperparameter search may maximise it (an item-level dev score)
    secondary: str | None = None  # shown beside it in the leaderboard
    per_item: bool = False  # a mean of per-item scores (resampled item by item by the bootstrap)


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("accuracy", ("classification",), "share of test items labelled correctly", headline=True,
           secondary="macro_f1", per_item=True),
    Metric("macro_f1", ("classification",), "F1 averaged over classes (each class counts alike)", headline=True,
           secondary="accuracy"),
    Metric("exact_match", ("generation",), "normalised answer equals the reference", headline=True,
           secondary="rouge_l", per_item=True),
    Metric("token_f1", ("generation",), "token overlap F1 with the reference (normalised)", headline=True,
           secondary="exact_match", per_item=True),
    Metric("rouge_l", ("generation",), "ROUGE-L F-measure", headline=True, secondary="exact_match", per_item=True),
    Metric("bleu", ("generation",), "corpus BLEU (sacrebleu), as a fraction", secondary="chrf"),
    Metric("chrf", ("generation",), "corpus chrF (sacrebleu), as a fraction", secondary="bleu"),
)}

DEFAULT_METRIC = {"classification": "accuracy", "generation": "exact_match"}  # what the leaderboard sorts by
DEFAULT_SEARCH_METRIC = {"classification": "accuracy", "generation": "token_f1"}  # what a search maximises


def metric_names(task_type: str | None = None, *, searchable: bool = False) -> tuple[str, ...]:
    """Metric names in table order, for one task type (or all) and optionally only the searchable ones."""
    return tuple(m.name for m in METRICS.values()
                 if (task_type is None or task_type in m.task_types) and (m.searchable or not searchable))


def headline_metrics(metrics: dict) -> list[str]:
    """The metrics a one-line summary shows: accuracy and macro-F1, or exact match, token F1 and ROUGE-L."""
    task = "classification" if "accuracy" in metrics else "generation"
    return [name for name in metric_names(task) if METRICS[name].headline and name in metrics]


def secondary_metric(name: str) -> str | None:
    """The metric the leaderboard shows beside ``name``."""
    return METRICS[name].secondary if name in METRICS else None


def task_type_of(metrics: dict) -> str:
    """classification or generation, from a stored trial's metrics."""
    return "generation" if "exact_match" in metrics else "classification"
