#!/usr/bin/env python
"""Calibration of the tuning strategies' size-scaled defaults (docs/architecture.md, "Tuning defaults").

For each dataset, training-set size and strategy, trains the default model (all-MiniLM-L6-v2) over a small grid
of learning rates with the epoch count and batch size the defaults give for that size, and prints the dev
accuracy of each (the best epoch kept, as ``fit`` does). Selection data only: the training subset and a disjoint
dev set are both drawn from ``../shared`` *train* files with a fixed seed; no test or ``dev.tsv`` row is read.

    python bench/calibrate_defaults.py                         # SST-2 and BANKING77 at 100 / 1,000 / 10,000
    python bench/calibrate_defaults.py --datasets sst2 --sizes 1000 --strategies lora --lrs 5e-4 1e-3 2e-3

Each line: dataset, n, strategy, lr, epochs, batch, best epoch, dev accuracy, training seconds. A final table
gives, per (dataset, n, strategy), the best lr and how far the size-scaled default is from it (accuracy points).
Takes about an hour on 2 cores for the full grid; ``--sizes 100 1000`` takes minutes.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, read_tsv, task_config  # noqa: E402

GRID = {"full": [3e-5, 1e-4, 3e-4], "lora": [3e-4, 1e-3, 3e-3], "linear_probe": [1e-3, 3e-3, 1e-2],
        "gradual_unfreeze": [3e-5, 1e-4, 3e-4], "soft_prompt": [3e-3, 1e-2, 3e-2]}


def load(name: str):
    """(texts, labels, label names) of a dataset's train file."""
    if name == "sst2":
        texts, labels = read_tsv(DATA / "sst2" / "train.tsv")
        return texts, labels, ["negative", "positive"]
    names = json.loads((DATA / "banking77" / "categories.json").read_text(encoding="utf-8"))
    index = {n: i for i, n in enumerate(names)}
    texts, labels = [], []
    with open(DATA / "banking77" / "train.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            texts.append(row["text"])
            labels.append(index[row["category"]])
    return texts, labels, names


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["sst2", "banking77"], choices=["sst2", "banking77"])
    p.add_argument("--sizes", nargs="+", type=int, default=[100, 1000, 10000])
    p.add_argument("--strategies", nargs="+", default=["full", "lora", "linear_probe"], choices=sorted(GRID))
    p.add_argument("--lrs", nargs="+", type=float, default=None, help="learning rates (default: a grid per strategy)")
    p.add_argument("--epochs", type=int, default=None, help="override the default's epochs")
    p.add_argument("--dev", type=int, default=1000, help="dev examples (disjoint from every training subset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="append each result as a JSON line to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not DATA.resolve().is_dir():
        print(f"SKIP: {DATA.resolve()} not found; the calibration needs ../shared/data")
        return 0
    import numpy as np
    import torch
    import transformers

    from tunebench.backends import load_backend
    from tunebench.config import LabelSpec, ModelConfig
    from tunebench.data import Split, TaskData
    from tunebench.strategies import registry
    from tunebench.strategies.defaults import scaled_defaults

    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = load_backend(ModelConfig(path="default"))
    results = []
    for ds in args.datasets:
        texts, labels, names = load(ds)
        full = Split("train", texts, np.asarray(labels, dtype=np.int64))
        order = np.random.default_rng(args.seed).permutation(len(full))
        dev = full.subset(order[: args.dev])
        dev.name = "dev"
        pool = order[args.dev:]
        specs = [LabelSpec(value=str(i), name=n) for i, n in enumerate(names)]
        for n in args.sizes:
            if n > len(pool):
                print(f"{ds}: n={n} exceeds the {len(pool)} rows left after dev; skipped")
                continue
            train = full.subset(pool[:n])
            task = TaskData(config=task_config(), labels=specs, train=train, dev=dev, test=dev)
            for name in args.strategies:
                cls = registry.get(name)
                base = scaled_defaults(name, n, len(names), "encoder")
                for lr in args.lrs or GRID[name]:
                    params = {**base, "lr": lr, **({"epochs": args.epochs} if args.epochs else {})}
                    cfg = cls.config_from_dict(params)
                    torch.manual_seed(args.seed)
                    t0 = time.perf_counter()
                    pred = cls(cfg, seed=args.seed).adapt(backend, task, train=train, dev=dev)
                    wall = time.perf_counter() - t0
                    res = pred.train_result
                    best = max(h["dev_accuracy"] for h in res.history)
                    row = {"dataset": ds, "n": n, "strategy": name, "lr": lr, "epochs": cfg.epochs,
                           "batch_size": cfg.batch_size, "best_epoch": res.best_epoch, "dev_accuracy": best,
                           "curve": [round(h["dev_accuracy"], 4) for h in res.history],
                           "train_s": round(res.train_seconds, 1), "wall_s": round(wall, 1),
                           "default_lr": base.get("lr")}
                    results.append(row)
                    print(f"{ds:<9} n={n:<6} {name:<16} lr={lr:<8g} epochs={cfg.epochs:<3} bs={cfg.batch_size:<3} "
                          f"best_epoch={res.best_epoch:<3} dev_acc={best:.4f} curve={row['curve']} "
                          f"train={res.train_seconds:.0f}s", flush=True)
                    if args.out:
                        with open(args.out, "a", encoding="utf-8") as f:
                            f.write(json.dumps(row) + "\n")
    print("\nbest lr per (dataset, n, strategy); gap = best dev accuracy minus the default lr's")
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["n"], r["strategy"]), []).append(r)
    for (ds, n, name), rows in groups.items():
        top = max(rows, key=lambda r: r["dev_accuracy"])
        at_default = [r for r in rows if r["lr"] == r["default_lr"]]
        gap = f"{(top['dev_accuracy'] - at_default[0]['dev_accuracy']) * 100:+.1f} pts" if at_default else "n/a"
        print(f"  {ds:<9} n={n:<6} {name:<16} best lr {top['lr']:g} ({top['dev_accuracy']:.4f}); default lr "
              f"{rows[0]['default_lr']:g}: gap {gap}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
