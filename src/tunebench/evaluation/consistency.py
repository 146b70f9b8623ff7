"""Consistency: do predictions survive meaning-preserving edits, other seeds and other samples?

The perturbations are deterministic given (kind, seed, item index): a rerun edits the same words the same way.
"""

from __future__ import annotations

import json
import logging
import random
import re
from functools import lru_cache
from importlib import resources
from typing import Callable, Sequence

import numpy as np

from ..prompts import normalize

log = logging.getLogger(__name__)

_WORD = re.compile(r"[A-Za-z]+")


@lru_cache(maxsize=1)
def synonyms() -> dict[str, list[str]]:
    """The shipped synonym list: each lower-case word maps to the other words of its group."""
    groups = json.loads((resources.files("tunebench") / "evaluation" / "synonyms.json").read_text("utf-8"))
    table: dict[str, list[str]] = {}
    for group in groups:
        for word in group:
            table.setdefault(word, [])
            table[word] += [w for w in group if w != word and w not in table[word]]
    return table


def _match_case(new: str, old: str) -> str:
    if old.isupper() and len(old) > 1:
        return new.upper()
    if old[:1].isupper():
        return new[:1].upper() + new[1:]
    return new


def perturb_case(text: str, rng: random.Random) -> str:
    """All lower case; text that already is gets its first letter capitalised."""
    low = text.lower()
    return low if low != text else text[:1].upper() + text[1:]


def perturb_punctuation(text: str, rng: random.Random) -> str:
    """Drop the final punctuation mark, or add a full stop where there is none."""
    stripped = text.rstrip()
    if stripped and stripped[-1] in ".!?;,":
        return stripped.rstrip(".!?;,")
    return stripped + "."


def perturb_whitespace(text: str, rng: random.Random) -> str:
    """A doubled space between two words and a trailing space."""
    gaps = [m.start() for m in re.finditer(r" ", text)]
    if not gaps:
        return text + " "
    at = rng.choice(gaps)
    return text[:at] + "  " + text[at + 1:] + " "


def perturb_typo(text: str, rng: random.Random) -> str:
    """Two neighbouring letters swapped inside one word of four letters or more."""
    words = [m for m in _WORD.finditer(text) if len(m.group()) >= 4]
    if not words:
        return text
    m = rng.choice(words)
    w = m.group()
    i = rng.randrange(1, len(w) - 2)
    if w[i] == w[i + 1]:
        i = next((j for j in range(1, len(w) - 2) if w[j] != w[j + 1]), i)
    w2 = w[:i] + w[i + 1] + w[i] + w[i + 2:]
    return text[:m.start()] + w2 + text[m.end():]


def perturb_synonym(text: str, rng: random.Random) -> str:
    """One word replaced by a synonym from the shipped list (text without a listed word is left as is)."""
    table = synonyms()
    words = [m for m in _WORD.finditer(text) if m.group().lower() in table]
    if not words:
        return text
    m = rng.choice(words)
    new = rng.choice(table[m.group().lower()])
    return text[:m.start()] + _match_case(new, m.group()) + text[m.end():]


PERTURBATIONS: dict[str, Callable[[str, random.Random], str]] = {
    "case": perturb_case, "punctuation": perturb_punctuation, "whitespace": perturb_whitespace,
    "typo": perturb_typo, "synonym": perturb_synonym,
}


def perturb(text: str, kind: str, seed: int, index: int) -> str:
    """``text`` edited by perturbation ``kind``, the same way every time for the same (seed, index)."""
    rng = random.Random(f"{kind}:{seed}:{index}")
    return PERTURBATIONS[kind](text, rng)


def edit_records(records: list[dict], edit: Callable[[str, int], str], fields: Sequence[str],
                 join: Callable[[dict], str]) -> tuple[list[dict], np.ndarray]:
    """``edit(text, index)`` applied to the text fields of each record, its ``input`` rebuilt; also returns which
    records actually changed (a synonym edit needs a listed word, a swap a listed term)."""
    out, changed = [], []
    for i, r in enumerate(records):
        new = dict(r)
        for f in fields:
            new[f] = edit(r[f], i)
        new["input"] = join(new)
        out.append(new)
        changed.append(new["input"] != r["input"])
    return out, np.asarray(changed, dtype=bool)


def perturb_records(records: list[dict], kind: str, seed: int, fields: Sequence[str],
                    join: Callable[[dict], str]) -> tuple[list[dict], np.ndarray]:
    """Apply ``kind`` to the text fields of each record and rebuild its ``input`` (:func:`edit_records`)."""
    return edit_records(records, lambda text, i: perturb(text, kind, seed, i), fields, join)


def same(a, b) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return normalize(str(a)) == normalize(str(b))
    return int(a) == int(b)


def flip_rate(before: Sequence, after: Sequence, mask: np.ndarray | None = None) -> float | None:
    """Share of (masked) items whose prediction changed; generated text is compared after normalisation."""
    idx = range(len(before)) if mask is None else np.flatnonzero(mask)
    pairs = [(before[i], after[i]) for i in idx]
    if not pairs:
        return None
    return float(np.mean([not same(a, b) for a, b in pairs]))


def agreement(runs: Sequence[Sequence]) -> float | None:
    """Share of items on which every run gives the same prediction (seeds, orders or samples)."""
    if len(runs) < 2:
        return None
    n = min(len(r) for r in runs)
    if n == 0:
        return None
    return float(np.mean([all(same(runs[0][i], r[i]) for r in runs[1:]) for i in range(n)]))


MAX_FLIPS_SHOWN = 20


def plain(v):
    return v.item() if hasattr(v, "item") else v


def rerun(predictor, edited: list[dict], changed: np.ndarray, base_predictions: Sequence,
          limit: int | None = None) -> tuple[np.ndarray, list, list]:
    """The first ``limit`` changed items: their indices, their predictions before the edit and after it."""
    idx = np.flatnonzero(changed)[:limit]
    after = list(predictor.run([edited[i] for i in idx]).predictions)
    return idx, [base_predictions[i] for i in idx], after


def shown_flips(idx: np.ndarray, edited: list[dict], before: Sequence, after: Sequence, flipped: Sequence[bool],
                records: list[dict] | None = None) -> list[dict]:
    """The first edits that changed the answer, as the trial page shows them (with the input before the edit when
    ``records`` is given)."""
    out = []
    for i, b, a, f in zip(idx, before, after, flipped):
        if f and len(out) < MAX_FLIPS_SHOWN:
            out.append({"item": int(i), "text": edited[i]["input"], "before": plain(b), "after": plain(a),
                        **({"original": records[i]["input"]} if records is not None else {})})
    return out


def measure(predictor, records: list[dict], base_predictions: Sequence, *, kinds: Sequence[str], seed: int,
            fields: Sequence[str], join: Callable[[dict], str], samples: int) -> dict:
    """Flip rate per perturbation kind (over the items the edit changed) and, for sampled generation, the
    agreement of ``samples`` samples per input. ``records`` is the bounded subset already predicted as
    ``base_predictions``."""
    out: dict = {"n_items": len(records), "perturbation": {}, "perturbed_items": {}, "flips": {}}
    for kind in kinds:
        edited, changed = perturb_records(records, kind, seed, fields, join)
        if not changed.any():
            out["perturbation"][kind] = None
            out["perturbed_items"][kind] = 0
            continue
        idx, before, preds = rerun(predictor, edited, changed, base_predictions)
        out["perturbation"][kind] = flip_rate(before, preds)
        out["perturbed_items"][kind] = int(changed.sum())
        out["flips"][kind] = shown_flips(idx, edited, before, preds,
                                         [plain(b) != plain(a) for b, a in zip(before, preds)])
    rates = [v for v in out["perturbation"].values() if v is not None]
    out["flip_rate"] = float(np.mean(rates)) if rates else None
    decode = getattr(predictor, "decode", None)
    if decode is not None and getattr(decode, "temperature", 0) > 0 and hasattr(predictor, "seed"):
        base_seed = predictor.seed
        runs = [list(base_predictions)]
        try:
            for k in range(1, samples):
                predictor.seed = base_seed + 7919 * k
                runs.append(list(predictor.run(records).predictions))
        finally:
            predictor.seed = base_seed
        out["sample_agreement"] = agreement(runs)
        out["samples"] = samples
    return out
