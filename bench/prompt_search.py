#!/usr/bin/env python
"""Searched prompt vs the best hand-written zero-shot and few-shot prompts on BANKING77, side by side.

1. Splits ../shared/data/banking77/train.csv 80/20 (stratified, seeded): the 20% is this benchmark's test set,
   never read by any selection. From the 80% it draws the labelled budget every strategy shares: ``--train``
   examples per class as train and ``--dev`` per class as dev.
2. Runs one tunebench study on the default model (all-MiniLM-L6-v2) with
   - hand-written zero-shot: several label prompts (each its own trial),
   - hand-written few-shot: prototypes and k-NN with 1, 2, 4 ... shots per class up to the train budget,
   - ``prompt_search`` with its defaults (a budget of model calls).
3. Picks the best hand-written zero-shot and the best hand-written few-shot prompt **by dev accuracy** (the
   same data the search selects on), then compares all three on test: accuracy with a 95% bootstrap interval,
   the searched prompt's paired difference against each (bootstrap interval + McNemar's exact test), and the
   cost of getting there (model calls / seconds of adaptation).

Target (issue 6): the searched prompt beats the best hand-written prompting strategy by a significant margin
(paired 95% interval above 0 and McNemar p < 0.05).

Usage:
    python bench/prompt_search.py                    # 8 train + 4 dev examples per class
    python bench/prompt_search.py --train 4 --dev 4 --seed 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import banking77_split, per_class, write_rows  # noqa: E402

HAND_ZERO_SHOT = ["{{ label }}", "A customer asks about {{ label }}.", "Banking question: {{ label }}",
                  "I need help with {{ label }}."]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=8, help="labelled train examples per class (every strategy)")
    p.add_argument("--dev", type=int, default=4, help="labelled dev examples per class (selection, every strategy)")
    p.add_argument("--seed", type=int, default=0, help="seed of the 80/20 split, the budget draw and the search")
    p.add_argument("--budget-calls", type=int, default=None, help="prompt_search budget (default: its own default)")
    p.add_argument("--keep", type=Path, default=None, help="keep the study and its store here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    loaded = banking77_split(args.seed)
    if loaded is None:
        return 0
    from tunebench.analysis.selection import load_trial
    from tunebench.config import parse_study
    from tunebench.evaluation.stats import bootstrap_ci, compare, metric_fn
    from tunebench.runner.study import Study

    texts, cats, names, y, pool, test = loaded
    rng = np.random.default_rng(args.seed)
    train = per_class(y, pool, args.train, rng)
    dev = per_class(y, np.setdiff1d(pool, train), args.dev, rng)
    work = args.keep or Path(tempfile.mkdtemp(prefix="tunebench-prompt-search-"))
    work.mkdir(parents=True, exist_ok=True)
    files = {k: write_rows(work / f"{k}.csv", texts, cats, idx) for k, idx in (("train", train), ("dev", dev),
                                                                          ("test", test))}
    shots = [s for s in (1, 2, 4, 8, 16) if s <= args.train]
    few = [{"few_shot": {"shots": s, "classifier": c, **({"k": 5} if c == "knn" else {})}}
           for s in shots for c in ("prototype", "knn")]
    search = {"budget_calls": args.budget_calls} if args.budget_calls else {}
    raw = {"name": "banking77-prompt-search", "store": str(work / "store"),
           "task": {"data": files, "text": "text", "label": "category"},
           "strategies": [{"zero_shot": {"label_templates": HAND_ZERO_SHOT}}, *few, {"prompt_search": search}],
           "seeds": [args.seed], "consistency": {"perturbations": []}}
    cfg = parse_study(raw, source="bench/prompt_search.py")
    print(f"BANKING77: {len(names)} intents; labelled budget {len(train)} train ({args.train}/class) + {len(dev)} dev "
          f"({args.dev}/class); test {len(test)} (20% held out); model all-MiniLM-L6-v2; seed {args.seed}", flush=True)
    t0 = time.perf_counter()
    study = Study(cfg, base_dir=work)
    rows = study.run()
    print(f"study ran in {time.perf_counter() - t0:.0f}s ({len(rows)} trials)", flush=True)
    if study.failures:
        print(f"FAILED trials: {study.failures}")
        return 1

    dev_records = study.data.dev.records()
    dev_y = study.data.dev.labels
    table = []
    for row in rows:
        if row["strategy"] == "prompt_search":
            dev_acc = row["metrics"]["dev_score"]
        else:  # hand-written prompts are chosen by dev accuracy, as the search is
            loaded = load_trial(cfg.store_path(work), cfg.name, row["key"])
            dev_acc = float((np.asarray(loaded.predictor.predict(dev_records)) == dev_y).mean())
        table.append({**row, "dev_acc": dev_acc})
    best = {}
    for family, pick in (("zero_shot", "zero_shot"), ("few_shot", "few_shot"), ("prompt_search", "prompt_search")):
        cands = [r for r in table if r["strategy"] == pick]
        best[family] = max(cands, key=lambda r: r["dev_acc"])

    items = study.store.items([r["key"] for r in best.values()])
    truth = {"labels": study.data.test.labels.tolist(), "label_names": study.data.label_names}
    fns = {k: metric_fn("accuracy", [items[r["key"]]], truth) for k, r in best.items()}
    print("\nall trials (dev accuracy selects; test shown for reference):")
    for r in sorted(table, key=lambda r: -r["dev_acc"]):
        print(f"  {r['label'][:70]:<70} dev {100 * r['dev_acc']:6.2f}%  test {100 * r['metrics']['accuracy']:6.2f}%")
    print(f"\n== BANKING77 test ({len(test)} queries), same labelled budget ({len(train)} train + {len(dev)} dev) ==")
    print(f"{'strategy':<52} {'dev acc':>8} {'test acc':>9} {'95% CI':>17} {'adapt s':>8} {'calls':>7}")
    for k, r in best.items():
        lo, hi = bootstrap_ci(fns[k], seed=0)
        calls = r["cost"].get("prompt_search_calls", "")
        print(f"{k + ': ' + r['label']:<52.52} {100 * r['dev_acc']:7.2f}% {100 * fns[k].value():8.2f}% "
              f"[{100 * lo:6.2f}, {100 * hi:6.2f}] {r['cost']['adapt_seconds']:8.1f} {calls!s:>7}")
    ok = True
    for base in ("zero_shot", "few_shot"):
        a, b = items[best["prompt_search"]["key"]], items[best[base]["key"]]
        pairs = [((args.seed, args.seed), a["scores"]["accuracy"], b["scores"]["accuracy"])]  # one seed each
        cmp = compare(fns["prompt_search"], fns[base], correct_pairs=pairs, seed=0)
        sig = not cmp.tied and cmp.diff > 0
        ok = ok and sig
        print(f"prompt_search - best hand-written {base}: {100 * cmp.diff:+.2f} pt, 95% CI "
              f"[{100 * cmp.ci[0]:+.2f}, {100 * cmp.ci[1]:+.2f}], McNemar p = {cmp.p_mcnemar:.2g}: "
              f"{'significant' if sig else 'not significant'}")
    chosen = best["prompt_search"]["record"]["prompt_search"]["chosen"]
    print(f"searched prompt: {json.dumps(chosen)}")
    print(f"\ntarget: prompt search beats the best hand-written prompting strategy significantly: "
          f"{'MET' if ok else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
