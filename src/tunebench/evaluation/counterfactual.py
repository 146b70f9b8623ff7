"""Counterfactual checks: terms swapped that should not change the answer (names, pronouns, the study's own pairs).

A swap is a fixed table of whole words applied in one pass (``he`` → ``she`` and ``she`` → ``he`` at once), so the
same text always gets the same swap and nothing is drawn at random. Only the items a swap changed count, at most
``max_items`` of them (the first in test order): the share whose prediction changed (the flip rate), accuracy on
the original and on the swapped inputs, and McNemar's exact test on the paired right/wrong outcomes
(:func:`~tunebench.evaluation.stats.mcnemar`). For generation, "right" is an exact match, and the reference and the
original output are swapped too: an answer that only follows the swap ("Dear Emily" → "Dear Priya") is neither a
flip nor an error.

The shipped lists (English) are in ``evaluation/counterfactual.json``.
"""

from __future__ import annotations

import json
import re
from functools import cache, lru_cache
from importlib import resources
from typing import Callable, Mapping, Sequence

import numpy as np

from ..config import CounterfactualConfig
from .consistency import edit_records, rerun, same, shown_flips
from .stats import mcnemar

_NEXT_WORD = re.compile(r"\s*([^\W\d_][\w'-]*)")


@lru_cache(maxsize=1)
def shipped() -> dict:
    """The shipped swap lists: ``names_gender`` and ``names_region`` (pairs of first names) and ``pronouns``."""
    return json.loads((resources.files("tunebench") / "evaluation" / "counterfactual.json").read_text("utf-8"))


def _key(text: str) -> str:
    return " ".join(text.split()).lower()


class Swap:
    """Whole words (or phrases) and their replacements, swapped in one pass.

    ``table`` maps each term to its replacement, or to ``{"before_word": ..., "otherwise": ...}`` for a term that
    stands for two words: ``her`` is ``his`` before a word that is not one of ``function_words`` ("her order") and
    ``him`` otherwise ("call her back", "thank her."). A term matches only as a whole word ("he" is not found in
    "the" or "theory"; "Sam" not in "Samuel"; "Sam's" is Sam) and in any case. A term found as written gets its
    replacement as written (iPhone → Pixel); otherwise the replacement takes the case of the text it replaces
    (He → She, HE → SHE, paris → lagos). With ``exact_case`` (names) a term matches only as written or in
    capitals: "Emily" and "EMILY", not "emily".

    Example:
        >>> Swap.from_pairs([("he", "she")]).apply("He said she would, in theory.")
        'She said he would, in theory.'
    """

    def __init__(self, table: Mapping[str, str | Mapping[str, str]], *, exact_case: bool = False,
                 function_words: Sequence[str] = ()):
        self.table = {_key(k): v for k, v in table.items()}
        self.written = {_key(k): " ".join(k.split()) for k in table}
        self.exact_case = exact_case
        self.function_words = frozenset(w.lower() for w in function_words)
        terms = sorted(self.table, key=len, reverse=True)  # the longest term wins where two start at one place
        alternatives = "|".join(r"\s+".join(map(re.escape, t.split())) for t in terms)
        self.pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE) if terms else None

    @classmethod
    def from_pairs(cls, pairs: Sequence[Sequence[str]], *, exact_case: bool = False) -> Swap:
        """A swap of each pair both ways (``[("he", "she")]``: he → she and she → he)."""
        table: dict[str, str] = {}
        for a, b in pairs:
            table[a], table[b] = b, a
        return cls(table, exact_case=exact_case)

    def apply(self, text: str) -> str:
        """``text`` with every listed term swapped (unchanged where it has none)."""
        return self.pattern.sub(self._replace, text) if self.pattern is not None else text

    def _replace(self, m: re.Match) -> str:
        old = m.group()
        key = _key(old)
        if key not in self.table:  # a case-insensitive match whose lower case differs (rare Unicode folds)
            return old
        as_written = " ".join(old.split()) == self.written[key]
        capitals = old.isupper() and len(old) > 1
        if self.exact_case and not (as_written or capitals):
            return old
        new = self.table[key]
        if not isinstance(new, str):
            nxt = _NEXT_WORD.match(m.string, m.end())
            new = new["before_word"] if nxt and nxt.group(1).lower() not in self.function_words else new["otherwise"]
        if as_written:
            return new
        if capitals:
            return new.upper()
        if old.islower():
            return new.lower()
        return new[:1].upper() + new[1:] if old[:1].isupper() else new


@cache
def _shipped_swap(kind: str) -> Swap:
    data = shipped()
    if kind == "pronouns":
        return Swap(data["pronouns"]["swap"], function_words=data["pronouns"]["function_words"])
    return Swap.from_pairs(data[kind], exact_case=True)


def swaps(cfg: CounterfactualConfig) -> dict[str, Swap]:
    """The swaps ``consistency.counterfactual`` asks for, by kind (``names_gender``, ``names_region``, ``pronouns``,
    ``pairs``)."""
    return {k: Swap.from_pairs(cfg.pairs) if k == "pairs" else _shipped_swap(k) for k in cfg.kinds()}


def _swapped(value, swap: Swap):
    """A generated text with the swap applied (what the swapped input should produce); a label id as it is."""
    return swap.apply(value) if isinstance(value, str) else value


def measure(predictor, records: list[dict], predictions: Sequence, truth: Sequence | None,
            swaps: Mapping[str, Swap], *, fields: Sequence[str], join: Callable[[dict], str],
            max_items: int) -> tuple[dict, dict]:
    """Per swap kind, over the first ``max_items`` of ``records`` that the swap changed: ``n_changed``, the flip
    rate, the accuracy (exact match for generated text) on the original and on the swapped inputs, its change
    and McNemar's exact test (``b``: right before the swap and wrong after it, ``c``: the reverse). Also returns
    the first flips per kind, as the trial page shows them. ``predictions`` are the predictions on ``records``;
    ``truth`` their labels or reference texts (None: no accuracy)."""
    results, flips = {}, {}
    metric = "exact_match" if any(isinstance(p, str) for p in predictions) else "accuracy"
    for kind, swap in swaps.items():
        edited, changed = edit_records(records, lambda text, _i, s=swap: s.apply(text), fields, join)
        entry: dict = {"n_changed": 0, "flip_rate": None, "metric": metric, "original": None, "swapped": None,
                       "change": None, "mcnemar": None}
        results[kind] = entry
        if not changed.any():
            continue
        idx, before, after = rerun(predictor, edited, changed, predictions, max_items)
        flipped = [not same(_swapped(b, swap), a) for b, a in zip(before, after)]
        entry.update(n_changed=len(idx), flip_rate=float(np.mean(flipped)))
        flips[kind] = shown_flips(idx, edited, before, after, flipped, records)
        if truth is not None:
            right_before = [same(b, truth[i]) for b, i in zip(before, idx)]
            right_after = [same(a, _swapped(truth[i], swap)) for a, i in zip(after, idx)]
            original, swapped = float(np.mean(right_before)), float(np.mean(right_after))
            entry.update(original=original, swapped=swapped, change=swapped - original,
                         mcnemar=mcnemar(right_before, right_after))
    return results, flips


def summarize(per_seed: Sequence[tuple[int, Mapping[str, dict]]]) -> dict[str, dict]:
    """One strategy's counterfactual results over its seeds: per kind, the items changed, the mean flip rate and
    accuracies, and McNemar per seed (``p_min``, ``p_max``: the range of its p-values; the seeds are not pooled,
    since every seed is scored on the same items)."""
    kinds: list[str] = []
    for _, cf in per_seed:
        kinds += [k for k in cf if k not in kinds]
    out = {}
    for kind in kinds:
        runs = [(seed, cf[kind]) for seed, cf in per_seed if kind in cf]
        mean = {key: _mean([r.get(key) for _, r in runs]) for key in ("flip_rate", "original", "swapped", "change")}
        tests = [{"seed": seed, **r["mcnemar"]} for seed, r in runs if r.get("mcnemar")]
        ps = [t["p_value"] for t in tests]
        out[kind] = {"n_changed": max(r["n_changed"] for _, r in runs), "metric": runs[0][1].get("metric"), **mean,
                     "mcnemar": tests, "p_min": min(ps) if ps else None, "p_max": max(ps) if ps else None,
                     "seeds": len(runs)}
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None
