"""The item explorer: test items × chosen trials, filtered, sorted and paged on the server.

A trial's per-item results never change once committed, so they are parsed once into numpy arrays and kept in a
small cache; every filter is a vectorised mask over those arrays, so a study of 20,000 items × 12 trials pages in
milliseconds. Rows hold the input, the truth, and per trial the prediction, whether it is right, its confidence
(classification: softmax probability of the predicted label) or per-item metrics (generation).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config.metrics import headline_metrics
from ..errors import StoreError
from ..store import Store

FILTERS = {"all": "all items", "wrong_any": "wrong in any", "wrong_all": "wrong in all",
           "disagree": "trials disagree"}
SORTS = {"index": "test order", "confidence": "least confident first", "disagreement": "most disagreement first"}
MAX_TRIALS = 12
MAX_PER_PAGE = 500


@dataclass
class TrialItems:
    """One trial's per-item results as arrays (the cached unit)."""

    key: str
    preds: np.ndarray  # label ids (classification) or texts (object array, generation)
    correct: np.ndarray  # bool
    confidence: np.ndarray | None
    scores: dict[str, np.ndarray]


@dataclass
class Truth:
    labels: np.ndarray | None  # label ids (classification)
    label_names: list[str]
    targets: list[str] | None  # references (generation)
    inputs: list[str] | None
    lowered: list[str] | None = None

    @property
    def n(self) -> int:
        return len(self.labels) if self.labels is not None else len(self.targets or [])


class _Cache:
    def __init__(self, size: int):
        self.size, self.data, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key, make):
        with self.lock:
            if key in self.data:
                self.data.move_to_end(key)
                return self.data[key]
        value = make()
        with self.lock:
            self.data[key] = value
            while len(self.data) > self.size:
                self.data.popitem(last=False)
        return value


_ITEMS = _Cache(96)
_TRUTH = _Cache(8)


@dataclass
class Query:
    """The explorer's state (all of it lives in the URL)."""

    trials: list[str] = field(default_factory=list)
    filter: str = "all"
    true: str = ""
    pred: str = ""
    q: str = ""
    sort: str = "index"
    baseline: str = ""
    diff: bool = False
    page: int = 1
    per_page: int = 50

    def clean(self) -> Query:
        self.filter = self.filter if self.filter in FILTERS else "all"
        self.sort = self.sort if self.sort in SORTS else "index"
        self.page = max(1, int(self.page))
        self.per_page = min(MAX_PER_PAGE, max(1, int(self.per_page)))
        self.trials = [t for t in dict.fromkeys(self.trials) if t][:MAX_TRIALS]
        return self


def _correct(items: dict, generation: bool) -> np.ndarray:
    scores = items.get("scores") or {}
    if not generation:
        return np.asarray(scores.get("accuracy", []), dtype=float) >= 0.5
    if "exact_match" in scores:
        return np.asarray(scores["exact_match"], dtype=float) >= 0.5
    first = headline_metrics({k: 0.0 for k in scores})
    return np.asarray(scores[first[0]] if first else [], dtype=float) >= 0.5


def trial_items(store: Store, key: str, generation: bool) -> TrialItems:
    def make() -> TrialItems:
        items = store.items([key]).get(key)
        if items is None:
            raise StoreError(f"trial {key[:8]} has no per-item results (stored by an older tunebench)")
        preds = items["predictions"]
        arr = np.asarray(preds, dtype=object) if generation else np.asarray(preds, dtype=np.int64)
        conf = np.asarray(items["confidence"], dtype=float) if items.get("confidence") else None
        return TrialItems(key, arr, _correct(items, generation), conf,
                          {k: np.asarray(v, dtype=float) for k, v in (items.get("scores") or {}).items()})

    return _ITEMS.get((store.location, key), make)


def truth_of(store: Store, fingerprint: str) -> Truth:
    def make() -> Truth:
        doc = store.test_set(fingerprint)
        if doc is None:
            raise StoreError(f"the test set {fingerprint[:8]} of these trials is not stored")
        inputs = doc.get("inputs")
        labels = np.asarray(doc["labels"], dtype=np.int64) if "labels" in doc else None
        return Truth(labels, list(doc.get("label_names") or []), doc.get("targets"), inputs,
                     [s.lower() for s in inputs] if inputs else None)

    return _TRUTH.get((store.location, fingerprint), make)


@dataclass
class Page:
    """One page of the explorer: the rows, how many items match, gains and losses against the baseline."""

    trials: list[dict]
    rows: list[dict]
    matching: int
    total: int
    pages: int
    versus: dict[str, dict[str, int]]
    label_names: list[str]
    generation: bool
    has_inputs: bool


def explore(store: Store, rows: list[dict], query: Query) -> Page:
    """Apply ``query`` to the per-item results of ``rows`` (stored trials of one study, one test set)."""
    query.clean()
    by_key = {r["key"]: r for r in rows}
    chosen = [_resolve(t, by_key) for t in query.trials] or _default_trials(rows)
    chosen = [k for k in chosen if k is not None]
    if not chosen:
        raise StoreError("no finished trial with per-item results to show")
    fp = by_key[chosen[0]]["record"]["fingerprints"]["test"]
    chosen = [k for k in chosen if by_key[k]["record"]["fingerprints"]["test"] == fp]  # one test set at a time
    truth = truth_of(store, fp)
    generation = truth.targets is not None
    trials = [trial_items(store, k, generation) for k in chosen]
    P = np.stack([t.preds for t in trials])
    C = np.stack([t.correct for t in trials])
    mask = _mask(query, P, C, truth)
    base = _resolve(query.baseline, {k: None for k in chosen}) if query.baseline else None
    versus = {}
    if base is not None:
        b = chosen.index(base)
        for i, k in enumerate(chosen):
            if i != b:
                versus[k] = {"gains": int((C[i] & ~C[b]).sum()), "losses": int((~C[i] & C[b]).sum()),
                             "changed": int((P[i] != P[b]).sum())}
        if query.diff:
            others = [i for i in range(len(chosen)) if i != b]
            mask &= (P[others] != P[b]).any(axis=0) if others else np.zeros_like(mask)
    idx = np.flatnonzero(mask)
    idx = _sorted(query.sort, idx, P, trials)
    pages = max(1, math.ceil(len(idx) / query.per_page))
    page_idx = idx[(query.page - 1) * query.per_page: query.page * query.per_page]
    meta = [{"key": k, "label": by_key[k]["label"], "seed": by_key[k]["seed"],
             "train_size": by_key[k]["train_size"], "baseline": k == base} for k in chosen]
    return Page(meta, [_row(int(i), truth, trials, generation) for i in page_idx], len(idx), truth.n, pages,
                versus, truth.label_names, generation, truth.inputs is not None)


def _resolve(ref: str, keys: dict) -> str | None:
    hits = [k for k in keys if k.startswith(ref)] if ref else []
    return hits[0] if len(hits) == 1 else None


def _default_trials(rows: list[dict]) -> list[str]:
    """One trial per strategy label (its first seed at its largest train size), up to six."""
    best: dict[str, dict] = {}
    for r in rows:
        cur = best.get(r["label"])
        if cur is None or (r["train_size"], -r["seed"]) > (cur["train_size"], -cur["seed"]):
            best[r["label"]] = r
    return [r["key"] for r in best.values()][:6]


def _mask(query: Query, P: np.ndarray, C: np.ndarray, truth: Truth) -> np.ndarray:
    mask = np.ones(P.shape[1], dtype=bool)
    if query.filter == "wrong_any":
        mask &= ~C.all(axis=0)
    elif query.filter == "wrong_all":
        mask &= ~C.any(axis=0)
    elif query.filter == "disagree":
        mask &= (P != P[0]).any(axis=0)
    names = truth.label_names
    if query.true and truth.labels is not None:
        mask &= truth.labels == (names.index(query.true) if query.true in names else -2)
    if query.pred and truth.labels is not None:
        mask &= (P == (names.index(query.pred) if query.pred in names else -2)).any(axis=0)
    if query.q and truth.lowered is not None:
        needle = query.q.lower()
        mask &= np.fromiter((needle in s for s in truth.lowered), dtype=bool, count=len(truth.lowered))
    return mask


def _sorted(sort: str, idx: np.ndarray, P: np.ndarray, trials: list[TrialItems]) -> np.ndarray:
    if sort == "confidence":
        confs = [t.confidence for t in trials if t.confidence is not None]
        if confs:
            low = np.min(np.stack(confs), axis=0)[idx]
            return idx[np.argsort(low, kind="stable")]
    if sort == "disagreement":
        sub = P[:, idx]
        distinct = np.array([len(set(col)) for col in sub.T.tolist()]) if len(idx) else np.array([], dtype=int)
        return idx[np.argsort(-distinct, kind="stable")]
    return idx


def _row(i: int, truth: Truth, trials: list[TrialItems], generation: bool) -> dict[str, Any]:
    names = truth.label_names
    cells = []
    for t in trials:
        p = t.preds[i]
        cell = {"prediction": p if generation else (names[p] if 0 <= p < len(names) else "(no label)"),
                "correct": bool(t.correct[i]),
                "confidence": None if t.confidence is None else float(t.confidence[i])}
        if generation:
            cell["scores"] = {k: float(v[i]) for k, v in t.scores.items()}
        cells.append(cell)
    truth_text = truth.targets[i] if generation else names[int(truth.labels[i])]
    return {"index": i, "input": truth.inputs[i] if truth.inputs else None, "truth": truth_text, "cells": cells}
