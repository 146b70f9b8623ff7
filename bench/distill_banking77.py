#!/usr/bin/env python
"""Distillation and a cascade on BANKING77: the prompted model teaches, a fine-tuned student serves (issue 16).

1. Splits ../shared/data/banking77/train.csv 80/20 (stratified, seeded): the 20% is this benchmark's test set,
   never read by any selection. From the 80% it draws ``--dev`` examples per class as the gold dev split; the
   rest is train.
2. Study ``banking77-distill`` (train size ``--labelled``, a seeded subset of train; every strategy gets the same):
   - the teacher's own trial: ``prompt_search`` on the default model (the best prompting strategy there,
     bench/prompt_search.py), adapted on the labelled subset and dev;
   - ``distill``: that teacher labels ``--pool`` train inputs outside the labelled subset (``pool: train``: their
     gold labels hidden from teacher and student, used only by the label audit), and a ``full`` student of the
     default model trains on the teacher's labels, selecting epochs on gold dev;
   - ``cascade``: the same teacher and student, inputs below a confidence threshold going to the teacher, the
     threshold chosen on dev for ``--max-fallback``.
3. Study ``banking77-gold``: ``full`` on ``--pool`` gold-labelled train examples (same dev, same test), the
   reference a labelling budget of that size would buy.
4. The distillation curve: the distill entry runs ``pool_sizes`` (``--curve`` sizes and ``--pool``, nested pools
   whose teacher labels are bought once), the gold study the same ``train_sizes``; printed side by side with the
   number of teacher labels one gold label is worth.

Prints teacher and student test accuracy with 95% bootstrap intervals, the paired difference (bootstrap interval
and McNemar's exact test), each one's cost per request from its measured latency (the study's cost table), the
label audit, the cascade's test curve and its chosen point, and the gold student.

Targets (issue 16): the student within 1 point of the teacher or better, at >= 10x lower cost per request; a
cascade point that beats both the student and the teacher alone, or matches the teacher at <= 30% fallback.

Usage:
    python bench/distill_banking77.py                       # 8 labelled/class, 8 dev/class, pool 4000
    python bench/distill_banking77.py --pool 1000 --keep /tmp/distill
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import banking77_split, per_class, write_rows  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--labelled", type=int, default=8, help="gold train examples per class the teacher adapts on")
    p.add_argument("--dev", type=int, default=8, help="gold dev examples per class (selection, every strategy)")
    p.add_argument("--pool", type=int, default=4000, help="train inputs the teacher labels (and the gold size)")
    p.add_argument("--curve", type=int, nargs="*", default=[250, 1000],
                   help="smaller pool sizes for the distillation curve, each beside a gold student of that size")
    p.add_argument("--max-fallback", type=float, default=0.3, help="the cascade's target: fallback at most this")
    p.add_argument("--labels", choices=("hard", "soft"), default="hard", help="the student's targets")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the draws, the search and training")
    p.add_argument("--keep", type=Path, default=None, help="keep the studies and their store here")
    return p.parse_args(argv)


def pct(x: float) -> str:
    return f"{100 * x:6.2f}%"


def main(argv=None) -> int:
    args = parse_args(argv)
    loaded = banking77_split(args.seed)
    if loaded is None:
        return 0
    from tunebench.config import parse_study
    from tunebench.evaluation.cost import price
    from tunebench.evaluation.stats import bootstrap_ci, compare, metric_fn
    from tunebench.runner.study import Study

    texts, cats, names, y, rest, test = loaded
    dev = per_class(y, rest, args.dev, np.random.default_rng(args.seed))
    train = np.setdiff1d(rest, dev)
    labelled = args.labelled * len(names)
    if labelled + args.pool > len(train):
        print(f"error: --labelled {args.labelled}/class ({labelled}) + --pool {args.pool} exceeds the {len(train)} "
              f"train examples", file=sys.stderr)
        return 2
    work = args.keep or Path(tempfile.mkdtemp(prefix="tunebench-distill-"))
    work.mkdir(parents=True, exist_ok=True)
    files = {k: write_rows(work / f"{k}.csv", texts, cats, idx) for k, idx in (("train", train), ("dev", dev),
                                                                               ("test", test))}
    teacher = {"strategy": "prompt_search", "model": None, "params": {}}
    student = {"strategy": "full", "model": None, "params": {}}
    distill = {"teacher": teacher, "student": student, "pool": "train", "pool_size": args.pool,
               "labels": args.labels}
    common = {"store": str(work / "store"), "seeds": [args.seed], "consistency": {"perturbations": []},
              "task": {"data": files, "text": "text", "label": "category"}, "training": {"max_length": 64}}
    sizes = sorted({*args.curve, args.pool})
    curve = {k: v for k, v in distill.items() if k != "pool_size"} | {"pool_sizes": sizes}  # same keys per size
    studies = {
        "distill": {"name": "banking77-distill", **common, "train_sizes": [labelled],
                    "strategies": [{"prompt_search": {}}, {"distill": curve if len(sizes) > 1 else distill},
                                   {"cascade": {**distill, "target": {"max_fallback": args.max_fallback}}}]},
        "gold": {"name": "banking77-gold", **common, "train_sizes": sizes, "strategies": [{"full": {}}]},
    }
    print(f"BANKING77: {len(names)} intents; test {len(test)} (20% held out); dev {len(dev)} ({args.dev}/class); "
          f"train {len(train)}: teacher adapts on {labelled} labelled, labels a pool of {args.pool} others; "
          f"model all-MiniLM-L6-v2; seed {args.seed}; work dir {work}", flush=True)
    rows, sized = {}, {}  # sized: (distill | gold, labels) -> row, the curves
    for which, raw in studies.items():
        t0 = time.perf_counter()
        study = Study(parse_study(raw, source="bench/distill_banking77.py"), base_dir=work)
        done = study.run()
        print(f"study {raw['name']} ran in {time.perf_counter() - t0:.0f}s ({len(done)} trials)", flush=True)
        if study.failures:
            print(f"FAILED trials: {study.failures}")
            return 1
        for r in done:
            n = r["record"]["distill"]["pool"]["size"] if r["strategy"] == "distill" else r["train_size"]
            if which == "gold" or r["strategy"] == "distill":
                sized[("gold" if which == "gold" else "distill", n)] = r
            if n == args.pool or r["strategy"] in ("prompt_search", "cascade"):
                rows["gold" if which == "gold" else r["strategy"]] = r
        data, store, costs = study.data, study.store, study.config.costs  # same test, store and cost table

    items = store.items([r["key"] for r in [*rows.values(), *sized.values()]])  # one store: both studies' trials
    truth = {"labels": data.test.labels.tolist(), "label_names": data.label_names}
    fns = {k: metric_fn("accuracy", [items[r["key"]]], truth) for k, r in rows.items()}
    prices = {k: price(r["cost"], r["record"]["model"], costs) for k, r in rows.items()}
    what = {"prompt_search": "teacher: prompt_search", "distill": f"student: full on {args.pool} teacher labels",
            "cascade": "cascade (student, teacher below threshold)", "gold": f"reference: full on {args.pool} gold"}
    print(f"\n== BANKING77 test ({len(test)} queries) ==")
    print(f"{'':<46} {'test acc':>9} {'95% CI':>17} {'$/1k requests':>14} {'latency ms':>11} {'upfront s':>10}")
    for k in ("prompt_search", "distill", "cascade", "gold"):
        r, fn = rows[k], fns[k]
        lo, hi = bootstrap_ci(fn, seed=0)
        secs = r["cost"].get("train_seconds", 0.0)
        print(f"{what[k]:<46} {pct(fn.value()):>9} [{pct(lo)}, {pct(hi)}] {1000 * prices[k].per_request:14.5f} "
              f"{r['cost'].get('latency_ms_mean', float('nan')):11.2f} {secs:10.0f}")

    def paired(a: str, b: str) -> tuple[float, object]:
        ia, ib = items[rows[a]["key"]], items[rows[b]["key"]]
        cmp = compare(fns[a], fns[b], correct_pairs=[((args.seed, args.seed), ia["scores"]["accuracy"],
                                                      ib["scores"]["accuracy"])], seed=0)
        print(f"{what[a]} - {what[b]}: {100 * cmp.diff:+.2f} pt, 95% CI [{100 * cmp.ci[0]:+.2f}, "
              f"{100 * cmp.ci[1]:+.2f}], McNemar p = {cmp.p_mcnemar:.2g}")
        return cmp.diff, cmp

    print()
    gap, _ = paired("distill", "prompt_search")
    paired("cascade", "prompt_search")
    paired("cascade", "distill")
    paired("gold", "distill")
    ratio = prices["prompt_search"].per_request / max(prices["distill"].per_request, 1e-12)
    print(f"cost per request, teacher / student: {ratio:.2f}x (both from measured single-request latency on this "
          f"machine: {costs.serve_per_hour}/h serving, concurrency {costs.concurrency})")

    record = rows["distill"]["record"]["distill"]
    audit, lab = record["audit"], record["labelling"]
    print(f"\nlabel audit (teacher vs the hidden gold labels of the pool): agreement {pct(audit['agreement'])} on "
          f"{audit['n']} items; labelling: {lab.get('calls')} calls in {record['teacher_seconds']:.1f}s of teacher "
          f"adaptation + {lab.get('seconds', float('nan')):.1f}s labelling")
    worst = sorted(((c, v) for c, v in audit.get("per_class", {}).items() if v.get("gold")),
                   key=lambda kv: kv[1].get("recall") or 0.0)[:5]
    if worst:
        print("  teacher's lowest-recall intents: " + ", ".join(f"{c} {v.get('recall', 0):.2f}" for c, v in worst))

    casc = rows["cascade"]["record"]["cascade"]
    pick = casc["test"]
    print(f"\ncascade on test (threshold chosen on dev for fallback <= {args.max_fallback:.0%}: "
          f"{casc['threshold']:.4f}; target met on dev: {casc['target_met']})")
    print(f"  student alone {pct(casc['student']['test_accuracy'])}, teacher alone "
          f"{pct(casc['teacher_alone']['test_accuracy'])}")
    print(f"  {'fallback':>9} {'accuracy':>9} {'$/1k requests':>14} {'p50 ms':>8} {'p95 ms':>8}")
    curve = casc["curve"]
    for f in (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0):
        p = min(curve, key=lambda p: abs(p["fallback_rate"] - f))
        print(f"  {pct(p['fallback_rate']):>9} {pct(p['accuracy']):>9} {1000 * p['cost_per_request']:14.5f} "
              f"{p['latency_ms_p50']:8.2f} {p['latency_ms_p95']:8.2f}")
    print(f"  chosen: fallback {pct(pick['fallback_rate'])}, accuracy {pct(pick['accuracy'])}")
    best = max((p for p in curve if p["fallback_rate"] <= args.max_fallback), key=lambda p: p["accuracy"])
    print(f"  best test point within {args.max_fallback:.0%} fallback (for reference, not selectable): accuracy "
          f"{pct(best['accuracy'])} at fallback {pct(best['fallback_rate'])}")

    if len(sizes) > 1:
        print_curve(sizes, sized, items, truth)
    teacher_acc, student_acc = fns["prompt_search"].value(), fns["distill"].value()
    t1 = gap >= -0.01 and ratio >= 10
    t2 = (pick["accuracy"] > max(teacher_acc, student_acc)
          or (pick["accuracy"] >= teacher_acc and pick["fallback_rate"] <= 0.3))
    print(f"\ntarget 1: student within 1 pt of the teacher or better ({100 * gap:+.2f} pt: "
          f"{'yes' if gap >= -0.01 else 'no'}) at >= 10x lower cost per request ({ratio:.2f}x: "
          f"{'yes' if ratio >= 10 else 'no'}): {'MET' if t1 else 'NOT MET'}")
    print(f"target 2: the cascade's chosen point beats both alone, or matches the teacher at <= 30% fallback: "
          f"{'MET' if t2 else 'NOT MET'}")
    return 0


def print_curve(sizes: list[int], sized: dict, items: dict, truth: dict) -> None:
    """Student accuracy against teacher labels bought, beside the gold student of each size, and how many teacher
    labels one gold label is worth (tunebench's own exchange-rate analysis)."""
    from tunebench.analysis.distill_curve import exchange
    from tunebench.evaluation.stats import bootstrap_ci, metric_fn

    print("\ndistillation curve (test accuracy, 95% CI): the student on N teacher labels vs on N gold labels")
    print(f"  {'N':>6} {'teacher labels':>26} {'reused':>7} {'gold labels':>26}")
    points = {"distill": [], "gold": []}
    for n in sizes:
        cells = []
        for kind in ("distill", "gold"):
            fn = metric_fn("accuracy", [items[sized[(kind, n)]["key"]]], truth)
            lo, hi = bootstrap_ci(fn, seed=0)
            cells.append(f"{pct(fn.value())} [{pct(lo)}, {pct(hi)}]")
            points[kind].append({"labels": n, "train_size": n, "mean": fn.value()})
        reused = sized[("distill", n)]["record"]["distill"]["labelling"].get("reused", 0)
        print(f"  {n:>6} {cells[0]:>26} {reused:>7} {cells[1]:>26}")
    for e in exchange(points["distill"], points["gold"]):
        print(f"  {e['text']}")


if __name__ == "__main__":
    raise SystemExit(main())
