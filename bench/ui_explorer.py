#!/usr/bin/env python
"""Server time of the web UI's item explorer (``/study/NAME/items``) over a large synthetic store.

A synthetic SQLite store is written to a temp dir (no model is trained): one classification study "synthetic"
with 8 labels, ``--items`` test items (default 20,000, each with a ~15-word input) and ``--trials`` trials
(default 12: 6 strategies x 2 seeds), each 70-90% accurate with errors correlated across trials (a shared
per-item difficulty and a shared "confuser" label), plus a softmax-like confidence per prediction.

The app (``tunebench.ui.create_app``) is driven in-process with FastAPI's ``TestClient``: the times are server
times (routing, store reads, the explorer's numpy work, Jinja rendering) with no network or browser. Each kind
of request is sent 2 times to warm up, then ``--repeats`` times, each timed with ``time.perf_counter``:

- ``first page``: all trials selected, page 1 (50 rows)
- ``filtered``: ``filter=wrong_any&true=<label>&sort=confidence``
- ``baseline diff``: ``baseline=<first trial>&diff=1``, page 3
- ``text search``: ``q=<a word in ~5% of the inputs>``

The explorer parses each trial's per-item results into numpy arrays once and keeps them in an in-process LRU
cache (``tunebench.ui.explorer._ITEMS``, test truth in ``_TRUTH``), so only the very first request pays for
reading and parsing the items JSON; it also pays for the study's analysis (the app's per-study evidence cache),
so it is reported on its own line (``cold: first request``) and not in the target. ``rows`` is how many test
items the query matched (the page shows 50 of them). The study page (``/study/synthetic``, analysis + figures)
is timed once cold on a fresh app and then warm, as extra information only.

Target: p95 under 300 ms on this machine for every warm kind; the last line says met / NOT met and the script
exits 1 when it is not met. Timings on a shared 2-core machine are noisy: compare p50s, rerun before trusting
a single p95.

Usage:
    python bench/ui_explorer.py                    # 20,000 items, 12 trials, 30 timed requests per kind
    python bench/ui_explorer.py --items 50000 --repeats 50
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TARGET_P95_MS = 300.0
LABELS = ["billing", "shipping", "returns", "account", "technical", "sales", "complaint", "other"]
STRATEGIES = [("zero_shot", "prompting"), ("few_shot", "prompting"), ("linear_probe", "weight_tuning"),
              ("lora", "weight_tuning"), ("full", "weight_tuning"), ("soft_prompt", "prompt_tuning")]
NEEDLE = "zephyr"  # put into ~5% of the inputs; no generated vocabulary word contains it


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=20_000, help="test items")
    p.add_argument("--trials", type=int, default=12, help="trials (strategies x seeds), at most 12 are shown")
    p.add_argument("--repeats", type=int, default=30, help="timed requests per kind (after 2 warm-ups)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_store(root: Path, n: int, n_trials: int, seed: int):
    from tunebench.store import Store

    rng = np.random.default_rng(seed)
    syll = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "da", "ve", "an", "or", "el", "um", "is", "ba"]
    vocab = sorted({"".join(rng.choice(syll, size=rng.integers(2, 4))) for _ in range(3000)})
    vocab = [w for w in vocab if NEEDLE not in w]
    truth = rng.choice(len(LABELS), size=n, p=rng.dirichlet(np.full(len(LABELS), 5.0)))
    words = rng.choice(vocab, size=(n, 15))
    has_needle = rng.random(n) < 0.05
    words[has_needle, rng.integers(0, 15, size=int(has_needle.sum()))] = NEEDLE
    inputs = [" ".join(w) for w in words.tolist()]
    difficulty = rng.standard_normal(n)  # shared across trials: errors correlate
    confuser = (truth + rng.integers(1, len(LABELS), size=n)) % len(LABELS)  # the usual wrong label, != truth
    fp = hashlib.sha256(f"synthetic-test-{n}-{seed}".encode()).hexdigest()
    keys = [hashlib.sha256(f"synthetic-trial-{i}".encode()).hexdigest() for i in range(n_trials)]
    config = {"name": "synthetic", "task": {"type": "classification", "data": {"train": "x.csv"}, "text": "text",
                                            "label": "label"},
              "strategies": [{"name": s, "params": {}} for s, _ in STRATEGIES]}
    store = Store(root / "runs")
    store.save_study("synthetic", config, None, keys)
    for i, key in enumerate(keys):
        strategy, family = STRATEGIES[i % len(STRATEGIES)]
        s_seed = i // len(STRATEGIES)
        acc_target = rng.uniform(0.70, 0.90)
        score = 0.8 * difficulty + 0.6 * rng.standard_normal(n)
        wrong = score > np.quantile(score, acc_target)
        other = (truth + rng.integers(1, len(LABELS), size=n)) % len(LABELS)
        pred = np.where(wrong, np.where(rng.random(n) < 0.7, confuser, other), truth)
        conf = np.where(wrong, rng.uniform(0.15, 0.7, n), rng.beta(6, 1.5, n) * 0.85 + 0.15)
        correct = pred == truth
        f1s = []
        for c in range(len(LABELS)):
            tp, fp_, fn = np.sum((pred == c) & correct), np.sum((pred == c) & ~correct), np.sum((truth == c) & ~correct)
            f1s.append(2 * tp / max(1, 2 * tp + fp_ + fn))
        tuned = family != "prompting"
        latency = rng.uniform(8, 12, 20) if tuned else rng.uniform(300, 600, 20)
        row = {"key": key, "study": "synthetic", "strategy": strategy, "family": family, "label": strategy,
               "params": {}, "seed": s_seed, "train_size": 1000 if tuned else 0,
               "train_size_spec": "1000" if tuned else "0",
               "metrics": {"accuracy": float(correct.mean()), "macro_f1": float(np.mean(f1s))},
               "cost": {"train_seconds": 120.0 if tuned else 0.0, "adapt_seconds": 120.0 if tuned else 1.0,
                        "latency_ms_p50": float(np.median(latency)), "latency_ms_mean": float(latency.mean()),
                        "latency_ms_samples": latency.round(2).tolist()},
               "history": [], "record": {"model": "default", "fingerprints": {"test": fp}}}
        items = {"predictions": pred.tolist(), "scores": {"accuracy": correct.astype(float).tolist()},
                 "confidence": conf.round(4).tolist()}
        store.add_trial(row, None, items, (fp, {"labels": truth.tolist(), "label_names": LABELS,
                                                "inputs": inputs}))
    return store, keys, float(has_needle.mean())


def timed_get(client, url: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = client.get(url)
    ms = (time.perf_counter() - t0) * 1000
    if r.status_code != 200:
        sys.exit(f"GET {url} -> {r.status_code}: {r.text[:500]}")
    return ms, r.text


def matched(html: str) -> int:
    m = re.search(r"(\d+) of (\d+) items match", html)
    return int(m.group(1)) if m else -1


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    from fastapi.testclient import TestClient

    from tunebench.ui import create_app

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store, keys, needle_share = build_store(Path(tmp), args.items, args.trials, args.seed)
        print(f"store: {args.items:,} items x {len(keys)} trials written in {time.perf_counter() - t0:.1f} s "
              f"('{NEEDLE}' in {needle_share:.1%} of inputs)")
        trials = "&".join(f"trial={k[:10]}" for k in keys[:12])
        base = "/study/synthetic/items?" + trials
        kinds = {"first page": base,
                 "filtered": f"{base}&filter=wrong_any&true={LABELS[0]}&sort=confidence",
                 "baseline diff": f"{base}&baseline={keys[0][:10]}&diff=1&page=3",
                 "text search": f"{base}&q={NEEDLE}"}
        client = TestClient(create_app(store), base_url="http://127.0.0.1")
        cold_ms, cold_html = timed_get(client, kinds["first page"])
        results = []
        for kind, url in kinds.items():
            for _ in range(2):
                timed_get(client, url)
            times, rows = [], 0
            for _ in range(args.repeats):
                ms, html = timed_get(client, url)
                times.append(ms)
                rows = matched(html)
            results.append((kind, np.percentile(times, 50), np.percentile(times, 95), max(times), rows))

        fresh = TestClient(create_app(store), base_url="http://127.0.0.1")  # its own, empty evidence cache
        study_cold, _ = timed_get(fresh, "/study/synthetic")
        study_warm = [timed_get(fresh, "/study/synthetic")[0] for _ in range(max(3, args.repeats // 3))]

        print(f"\n{'request':<22}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}{'rows':>8}")
        print(f"{'cold: first request':<22}{cold_ms:>9.1f}{'':>9}{cold_ms:>9.1f}{matched(cold_html):>8}")
        for kind, p50, p95, mx, rows in results:
            print(f"{kind:<22}{p50:>9.1f}{p95:>9.1f}{mx:>9.1f}{rows:>8}")
        print(f"\nstudy page (extra, not in the target): cold {study_cold:.0f} ms (fresh app: analysis + figures), "
              f"warm p50 {np.percentile(study_warm, 50):.1f} ms")
        worst = max(r[2] for r in results)
        ok = worst < TARGET_P95_MS
        print(f"target p95 < {TARGET_P95_MS:.0f} ms: {'met' if ok else 'NOT met'} (worst p95 {worst:.1f} ms)")
        print(f"total runtime {time.perf_counter() - start:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
