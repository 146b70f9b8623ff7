"""Pairwise comparison of two stored trials by the study's judge (``metrics: - judge: {pairwise: true}``).

An analysis-time step: both trials' answers to the test items are in the store (``items.predictions``), with the
inputs and references of their test split, so nothing is rerun; only the judge is called, each item in both orders
(see :class:`~tunebench.evaluation.judge.PairwiseJudge`). The result is stored under a key made of the two trials
and the judge (model identity, rubric, criteria, answer length, ``max_items``), so asking again reads it back.

Example:
    >>> result = compare_trials(Store("runs"), "support", "zero_shot", "lora")  # doctest: +SKIP
    >>> result["wins"], result["ties"], result["losses"], result["win_rate_ci"]  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from ..config import StudyConfig
from ..errors import ConfigError, JudgeError, StoreError
from ..evaluation.judge import PAIRWISE_RUBRIC, Generator, compare_answers
from ..store.results import Store

log = logging.getLogger(__name__)


def resolve_trial(rows: list[dict], ref: str) -> dict:
    """The stored trial a user named: a trial id (or a unique prefix of one, as `show --ids` lists), or a strategy
    label (its trial at the largest train size, lowest seed)."""
    by_label = sorted((r for r in rows if r["label"] == ref), key=lambda r: (-r["train_size"], r["seed"]))
    if by_label:
        return by_label[0]
    by_key = [r for r in rows if r["key"].startswith(ref)] if len(ref) >= 4 else []
    if len(by_key) == 1:
        return by_key[0]
    if len(by_key) > 1:
        raise ConfigError(f"--pair: '{ref}' starts {len(by_key)} trial ids; give more of the id")
    labels = sorted({r["label"] for r in rows})
    raise ConfigError(f"--pair: no trial or strategy '{ref}' in this study (strategies: {', '.join(labels)}; "
                      "`tunebench show STUDY --ids` lists trial ids)")


def pair_key(a: str, b: str, ident: dict[str, Any]) -> str:
    """The stored comparison's key: the two trials (in either order: both orders are always asked) and what of the
    judge changes verdicts."""
    return hashlib.sha256(json.dumps({"trials": sorted([a, b]), "judge": ident}, sort_keys=True,
                                     default=str).encode()).hexdigest()


_OTHER = {"A": "B", "B": "A", "tie": "tie", None: None}


def mirrored(doc: dict[str, Any]) -> dict[str, Any]:
    """A stored comparison of A with B read as B with A: wins and losses swapped, the win rate and its interval
    from B's side, each item's verdicts mirrored (the order-flip figures do not change)."""
    out = {**doc, "a": doc["b"], "b": doc["a"], "a_label": doc["b_label"], "b_label": doc["a_label"],
           "wins": doc["losses"], "losses": doc["wins"],
           "win_rate": None if doc["win_rate"] is None else 1 - doc["win_rate"],
           "win_rate_ci": None if not doc.get("win_rate_ci") else [1 - doc["win_rate_ci"][1],
                                                                   1 - doc["win_rate_ci"][0]]}
    detail = doc.get("items_detail")
    if detail:
        out["items_detail"] = {"a_first": [_OTHER[v] for v in detail["b_first"]],
                               "b_first": [_OTHER[v] for v in detail["a_first"]],
                               "outcome": [_OTHER[v] for v in detail["outcome"]]}
    return out


def compare_trials(store: Store, study: str, a: str, b: str, *, config: StudyConfig | None = None,
                   backend: Generator | None = None, again: bool = False) -> dict[str, Any]:
    """Compare trials ``a`` and ``b`` (ids or strategy labels) with the study's judge, or read the stored result.
    Returns the stored document: the summary, ``a``/``b`` (keys), ``a_label``/``b_label``, ``cached`` (True when it
    was read back) and the per-item verdicts under ``items_detail``. ``backend``: the judge's model (loaded from the
    study's config when not given); ``config``: the study as read from its YAML (default: as stored by its last
    run), so ``pairwise: true`` added to the file needs no run."""
    doc = store.study_config(study)
    cfg = config if config is not None else StudyConfig.from_stored(doc["config"])
    judge = cfg.judge
    if judge is None:
        raise ConfigError(f"study '{study}' has no judge; add metrics: [{{judge: {{model: NAME, pairwise: true}}}}] "
                          "and run it")
    if not judge.pairwise:
        raise ConfigError(f"study '{study}': pairwise comparison costs 2 judge calls per test item and pair; turn it "
                          "on with pairwise: true under metrics[0].judge in the study file and pass the file")
    rows = store.trials(study, set(doc["keys"]))
    ta, tb = resolve_trial(rows, a), resolve_trial(rows, b)
    if ta["key"] == tb["key"]:
        raise ConfigError(f"--pair: '{a}' and '{b}' are the same trial; name two strategies or trial ids")
    model = {m.name: m for m in cfg.all_models()}[judge.model]
    ident = {"model": model.identity(), "rubric": PAIRWISE_RUBRIC, "criteria": judge.criteria,
             "max_new_tokens": judge.max_new_tokens, "max_items": judge.max_items}
    key = pair_key(ta["key"], tb["key"], ident)
    stored = store.pairwise(study, key)
    if stored and not again:
        doc = stored[0] if stored[0]["a"] == ta["key"] else mirrored(stored[0])
        return {**doc, "cached": True}
    items = store.items([ta["key"], tb["key"]])
    missing = [t["label"] for t in (ta, tb) if t["key"] not in items]
    if missing:
        raise StoreError(f"trial {missing[0]} has no stored answers (trials stored before tunebench kept them); "
                         "rerun it to compare it")
    fps = {t["record"]["fingerprints"]["test"] for t in (ta, tb)}
    truth = store.test_set(next(iter(fps))) if len(fps) == 1 else None
    if truth is None or truth.get("targets") is None or truth.get("inputs") is None:
        raise StoreError(f"trials {ta['label']} and {tb['label']} were not scored on one stored generation test "
                         "split with its inputs (trials stored before tunebench kept inputs lack them); only "
                         "answers to the same items can be compared")
    if backend is None:
        from ..backends import load_backend  # heavy: the backends import torch, which show/report never need

        backend = load_backend(model)
    api = cfg.costs.api.get(judge.model)
    price = None if api is None else (api.input_per_1m, api.output_per_1m)
    result = compare_answers(judge, backend, truth["inputs"], truth["targets"], items[ta["key"]]["predictions"],
                             items[tb["key"]]["predictions"], instruction=cfg.task.instruction, price=price)
    if not result["compared"]:
        raise JudgeError(f"judge {judge.model}: no item could be compared (every one of {result['calls']} calls "
                         f"failed after its retry: {'; '.join(result['errors']) or 'no reason given'}); nothing "
                         "stored, ask again when the judge answers")
    result.update({"a_label": ta["label"], "b_label": tb["label"], "rubric": {"name": "builtin.judge_pairwise",
                                                                               "template": PAIRWISE_RUBRIC}})
    store.add_pairwise(study, key, ta["key"], tb["key"], result)
    log.info("judge %s: %s vs %s: %d wins, %d ties, %d losses (%d missing)", judge.model, ta["label"], tb["label"],
             result["wins"], result["ties"], result["losses"], result["missing"])
    return {**result, "key": key, "a": ta["key"], "b": tb["key"], "cached": False}


def stored_comparisons(store: Store, study: str, keys: set[str]) -> list[dict]:
    """The study's stored comparisons between its current trials, the latest per pair, without per-item detail."""
    latest: dict[tuple[str, ...], dict] = {}
    for c in store.pairwise(study):
        if c["a"] in keys and c["b"] in keys:
            pair = tuple(sorted((c["a"], c["b"])))
            latest[pair] = {k: v for k, v in c.items() if k not in ("items_detail", "rubric")}
    return list(latest.values())
