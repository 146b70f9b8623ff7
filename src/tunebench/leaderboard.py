"""The leaderboard: stored trials grouped by strategy and train size, mean and spread over seeds."""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def leaderboard(rows: list[dict], metric: str = "accuracy") -> list[dict]:
    """One entry per (strategy label, train size): quality mean ± std over seeds and mean costs.

    Example:
        >>> leaderboard(store.trials("demo"))[0]["label"]  # doctest: +SKIP
        'full'
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["label"], r["train_size"])].append(r)
    out = []
    for (label, size), rs in groups.items():
        q_mean, q_std = _mean_std([r["metrics"][metric] for r in rs])
        f_mean, f_std = _mean_std([r["metrics"]["macro_f1"] for r in rs])
        out.append({
            "label": label, "strategy": rs[0]["strategy"], "family": rs[0]["family"], "train_size": size,
            "seeds": sorted(r["seed"] for r in rs), "metric": metric,
            "quality_mean": q_mean, "quality_std": q_std, "macro_f1_mean": f_mean, "macro_f1_std": f_std,
            "train_seconds": _mean_std([r["cost"]["train_seconds"] for r in rs])[0],
            "latency_ms_p50": _mean_std([r["cost"]["latency_ms_p50"] for r in rs])[0],
            "trainable_params": int(max(r["cost"]["trainable_params"] for r in rs)),
        })
    out.sort(key=lambda e: (-e["train_size"], -e["quality_mean"]))
    return out
