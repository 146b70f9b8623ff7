"""The leaderboard: stored trials grouped by strategy and train size, mean and spread over seeds."""

from __future__ import annotations

import re
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
            "flags": group_flags(rs),
        })
    out.sort(key=lambda e: (-e["train_size"], -(e["quality_mean"] if e["quality_mean"] == e["quality_mean"] else -1)))
    return out


def trial_json(row: dict) -> dict:
    """The public JSON shape of one stored trial (``tunebench run --json``)."""
    return {"strategy": row["strategy"], "label": row["label"], "family": row["family"], "params": row["params"],
            "seed": row["seed"], "train_size": row["train_size"], "metrics": row["metrics"], "cost": row["cost"],
            "history": row["history"], "artifact": row["artifact"], "key": row["key"],
            "prompt": row["record"].get("prompt"), "model": row["record"].get("model"),
            "search": row["record"].get("search"),
            **{k: row["record"][k] for k in ("distill", "cascade") if row["record"].get(k)}}


EDGE = 0.02  # a searched value within 2% of its range's end (in log space for log ranges) sits at the edge


def tuning_flags(row: dict) -> list[str]:
    """Why a tuning trial's score may not be its strategy's best: its dev curve was still improving at the last
    epoch, or its search chose a value at the edge of a range it was given. Empty when neither.

    Example:
        >>> tuning_flags({"history": [{"dev_accuracy": 0.70}, {"dev_accuracy": 0.80}], "params": {},
        ...               "record": {"best_epoch": 2}})
        ['dev accuracy still improving at the last epoch (0.700 → 0.800): may improve with more epochs']
    """
    flags = []
    stuck = _not_learned(row.get("history") or [], row.get("record") or {}, row.get("strategy"))
    if stuck:
        return [stuck]  # more epochs or a wider search is not the first thing to try
    rising = _still_improving(row.get("history") or [], row.get("params") or {}, (row.get("record") or {}))
    if rising:
        flags.append(rising)
    search = (row.get("record") or {}).get("search") or {}
    for name, spec in (search.get("space") or {}).items():
        edge = _edge(spec, (search.get("best_params") or {}).get(name))
        if edge:
            flags.append(f"search: {name}={search['best_params'][name]:g} at the {edge} edge of its range "
                         f"{_range_text(spec)}: widen the range")
    return flags


def _not_learned(history: list[dict], record: dict, strategy: str | None) -> str | None:
    """A classification trial whose dev accuracy never beat a constant answer (the most frequent dev class)."""
    base = record.get("dev_majority")
    accs = [h["dev_accuracy"] for h in history if isinstance(h.get("dev_accuracy"), (int, float))]
    if not isinstance(base, (int, float)) or not accs or max(accs) > base + 0.01:
        return None
    hint = ("check the learning rate and what the strategy trains"
            + (" (on a causal LM: embeddings: true, target_modules: all-linear)" if strategy == "lora" else ""))
    return (f"did not learn: best dev accuracy {max(accs):.3f} is no better than always answering the most frequent "
            f"class ({base:.3f}); {hint}")


def _still_improving(history: list[dict], params: dict, record: dict) -> str | None:
    if len(history) < 2 or record.get("best_epoch") != len(history):
        return None
    key = "dev_loss" if "dev_loss" in history[-1] else f"dev_{params.get('metric') or 'accuracy'}"
    prev, last = history[-2].get(key), history[-1].get(key)
    if not isinstance(prev, (int, float)) or not isinstance(last, (int, float)):
        return None
    lower_is_better = key == "dev_loss"
    gain = (prev - last) / max(abs(prev), 1e-12) if lower_is_better else last - prev
    if gain <= (0.01 if lower_is_better else 0.001):
        return None
    what = "dev loss still falling" if lower_is_better else f"dev {key[4:]} still improving"
    return f"{what} at the last epoch ({prev:.3f} → {last:.3f}): may improve with more epochs"


def _edge(spec, best) -> str | None:
    if not isinstance(best, (int, float)) or isinstance(best, bool):
        return None
    if isinstance(spec, dict) and isinstance(spec.get("low"), (int, float)) and isinstance(spec.get("high"), (int, float)):
        low, high = float(spec["low"]), float(spec["high"])
        if spec.get("log") and low > 0 and best > 0:
            low, high, best = np.log(low), np.log(high), np.log(best)
        if high <= low:
            return None
        where = (best - low) / (high - low)
    elif isinstance(spec, list) and sum(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec) >= 3:
        nums = sorted(v for v in spec if isinstance(v, (int, float)) and not isinstance(v, bool))
        where = 0.0 if best == nums[0] else 1.0 if best == nums[-1] else 0.5
    else:
        return None
    return "lower" if where <= EDGE else "upper" if where >= 1 - EDGE else None


def _range_text(spec) -> str:
    if isinstance(spec, dict):
        return f"[{spec['low']:g}, {spec['high']:g}]{' (log)' if spec.get('log') else ''}"
    return "[" + ", ".join(f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in spec) + "]"


def group_flags(rows: list[dict]) -> list[str]:
    """The flags of a group of trials (one strategy over seeds), each with the seeds it applies to."""
    seen: dict[str, list[int]] = {}
    for r in rows:
        for f in tuning_flags(r):
            key = re.sub(r" \([^)]*→[^)]*\)", "", f)  # the same reason with other numbers is one flag
            seen.setdefault(key, []).append(r["seed"])
    n = len(rows)
    return [k if len(s) == n else f"{k} (seed{'s' if len(s) > 1 else ''} {', '.join(map(str, sorted(s)))})"
            for k, s in seen.items()]
