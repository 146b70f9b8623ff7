"""The leaderboard: stored trials grouped by strategy and train size, mean and spread over seeds."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from ..config.metrics import DEFAULT_METRIC, METRICS, task_type_of


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


SECONDARY = {name: m.secondary for name, m in METRICS.items() if m.secondary}  # shown beside the sorted metric


def default_metric(rows: list[dict]) -> str:
    """accuracy for classification studies, exact_match for generation."""
    return DEFAULT_METRIC[task_type_of(rows[0]["metrics"]) if rows else "classification"]


def cv_summary(rows: list[dict], metric: str) -> dict:
    """Cross-validation of a group of trials: ``metric`` mean ± std over every fold of every seed (empty when
    the trials were not cross-validated)."""
    cvs = [r["metrics"]["cv"] for r in rows if isinstance(r["metrics"].get("cv"), dict)]
    if not cvs:
        return {}
    name = metric if metric in cvs[0]["folds"][0] else cvs[0]["metric"]
    values = [f[name] for cv in cvs for f in cv["folds"] if name in f]
    mean, std = _mean_std(values)
    return {"cv_metric": name, "cv_k": cvs[0]["k"], "cv_mean": mean, "cv_std": std, "cv_folds": len(values)}


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
        q_mean, q_std = _mean_std([r["metrics"].get(metric) for r in rs])
        second = SECONDARY.get(metric, metric)
        f_mean, f_std = _mean_std([r["metrics"].get(second) for r in rs])
        out.append({
            "label": label, "strategy": rs[0]["strategy"], "family": rs[0]["family"], "train_size": size,
            "seeds": sorted(r["seed"] for r in rs), "metric": metric,
            "quality_mean": q_mean, "quality_std": q_std, "secondary": second,
            "secondary_mean": f_mean, "secondary_std": f_std,
            "train_seconds": _mean_std([r["cost"]["train_seconds"] for r in rs])[0],
            "latency_ms_p50": _mean_std([r["cost"]["latency_ms_p50"] for r in rs])[0],
            "trainable_params": int(max(r["cost"]["trainable_params"] for r in rs)),
            "tokens_per_request": _mean_std([r["cost"].get("tokens_per_request") for r in rs])[0],
            **cv_summary(rs, metric),
        })
    out.sort(key=lambda e: (-e["train_size"], -(e["quality_mean"] if e["quality_mean"] == e["quality_mean"] else -1)))
    return out


def trial_json(row: dict) -> dict:
    """The public JSON shape of one stored trial (``tunebench run --json``)."""
    return {"strategy": row["strategy"], "label": row["label"], "family": row["family"], "params": row["params"],
            "seed": row["seed"], "train_size": row["train_size"], "metrics": row["metrics"], "cost": row["cost"],
            "history": row["history"], "artifact": row["artifact"], "key": row["key"],
            "prompt": row["record"].get("prompt"), "model": row["record"].get("model"),
            "search": row["record"].get("search")}
