"""The report's figures, drawn with matplotlib (Agg backend) from the analysis JSON; each returns PNG bytes."""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
import numpy as np  # noqa: E402

FAMILY_COLOURS = {"prompting": "#2a7ab0", "prompt_tuning": "#8e5ea2", "weight_tuning": "#d1652a", "hybrid": "#3a9a5b"}
DPI = 110


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _colour(family: str) -> str:
    return FAMILY_COLOURS.get(family, "#666666")


def _legend_families(ax, families) -> None:
    from matplotlib.patches import Patch

    seen = [f for f in FAMILY_COLOURS if f in set(families)]
    ax.legend(handles=[Patch(color=_colour(f), label=f.replace("_", " ")) for f in seen], loc="lower right",
              fontsize=8, frameon=False)


def leaderboard(a: dict) -> bytes:
    """Each strategy's metric with its 95% bootstrap interval; those tied with the best are drawn solid."""
    rows = list(reversed(a["strategies"]))
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(rows) + 1.2))
    y = np.arange(len(rows))
    means = [r["mean"] for r in rows]
    for i, r in enumerate(rows):
        ax.barh(i, r["mean"], color=_colour(r["family"]), alpha=1.0 if r["tied_with_best"] else 0.45)
        if r["ci"]:
            ax.errorbar(r["mean"], i, xerr=[[r["mean"] - r["ci"][0]], [r["ci"][1] - r["mean"]]], fmt="none",
                        ecolor="black", capsize=3, lw=1)
    ax.set_yticks(y, [r["label"] for r in rows], fontsize=8)
    ax.set_xlabel(f"{a['metric']} on test (95% CI); faded: worse than the best with significance")
    ax.set_xlim(0, min(1.0, max(max((r["ci"] or [0, m])[1] for r, m in zip(rows, means)), 0.05) * 1.05))
    _legend_families(ax, [r["family"] for r in rows])
    return _png(fig)


def learning_curves(a: dict) -> bytes:
    """Metric against train size per strategy, with the bootstrap band; strategies without training data are
    horizontal bands."""
    fam = {s["label"]: s["family"] for s in a["strategies"]}
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    sizes = sorted({p["train_size"] for pts in a["curves"].values() for p in pts if p["train_size"]})
    lo_x, hi_x = (min(sizes), max(sizes)) if sizes else (1, 2)
    cmap = plt.get_cmap("tab10")
    for i, (label, pts) in enumerate(sorted(a["curves"].items())):
        colour = cmap(i % 10)
        style = "--" if fam.get(label) == "prompting" else "-"
        if len(pts) == 1 and pts[0]["train_size"] == 0:
            p = pts[0]
            ax.hlines(p["mean"], lo_x, hi_x, colors=[colour], linestyles="dotted", label=f"{label} (no training)")
            if p["ci"]:
                ax.fill_between([lo_x, hi_x], p["ci"][0], p["ci"][1], color=colour, alpha=0.1)
            continue
        xs = [p["train_size"] for p in pts]
        ax.plot(xs, [p["mean"] for p in pts], style, marker="o", color=colour, label=label)
        if all(p["ci"] for p in pts):
            ax.fill_between(xs, [p["ci"][0] for p in pts], [p["ci"][1] for p in pts], color=colour, alpha=0.15)
    cross = a.get("crossover") or {}
    if cross.get("status") == "reached":
        ax.axvline(cross["train_size"], color="black", lw=0.8, ls=":")
        ax.annotate(f"crossover: {cross['train_size']}", (cross["train_size"], ax.get_ylim()[0]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    if len(sizes) > 1 and hi_x / max(lo_x, 1) >= 8:
        ax.set_xscale("log")
    ax.set_xlabel("labelled training examples")
    ax.set_ylabel(f"{a['metric']} on test")
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    ax.grid(alpha=0.3)
    return _png(fig)


def distill_curves(a: dict) -> bytes:
    """Each distilled student's metric against the teacher labels bought for it (solid, with 95% intervals), beside
    the gold-label learning curve of the same student strategy (dashed, against gold labels), on one log axis of
    labels: where a gold curve reaches a level with fewer labels, a gold label is worth more than a teacher's."""
    curves = a["distill_curves"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    cmap = plt.get_cmap("tab10")
    for i, c in enumerate(curves):
        colour = cmap(i % 10)
        pts = c["points"]
        xs = [max(p["labels"], 1) for p in pts]
        ax.plot(xs, [p["mean"] for p in pts], "-", marker="o", color=colour,
                label=f"{c['name']} (n={c['train_size']}): teacher labels")
        for x, p in zip(xs, pts):
            if p["ci"]:
                ax.vlines(x, p["ci"][0], p["ci"][1], color=colour, lw=1.5, alpha=0.6)
        if c["gold"]:
            gx = [p["train_size"] for p in c["gold"]]
            ax.plot(gx, [p["mean"] for p in c["gold"]], "--", marker="s", color=colour, alpha=0.8,
                    label=f"{c['gold_label']}: gold labels")
            if all(p["ci"] for p in c["gold"]):
                ax.fill_between(gx, [p["ci"][0] for p in c["gold"]], [p["ci"][1] for p in c["gold"]], color=colour,
                                alpha=0.1)
    ax.set_xscale("log")
    ax.set_xlabel("labels: teacher labels bought (solid) or gold labels (dashed)")
    ax.set_ylabel(f"{a['metric']} on test")
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    ax.grid(alpha=0.3)
    return _png(fig)


def pareto(a: dict) -> bytes:
    """Quality against cost per 1,000 requests; the Pareto front (nothing both cheaper and better) is joined."""
    rows = a["strategies"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    xs = [max(r["cost"]["per_1k_requests"], 1e-9) for r in rows]
    ys = [r["mean"] for r in rows]
    for r, x, y in zip(rows, xs, ys):
        ax.scatter([x], [y], color=_colour(r["family"]), s=40, zorder=3)
        if r["ci"]:
            ax.vlines(x, r["ci"][0], r["ci"][1], color=_colour(r["family"]), alpha=0.5)
        ax.annotate(r["label"], (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    order = sorted(range(len(rows)), key=lambda i: (xs[i], -ys[i]))
    front, best = [], -math.inf
    for i in order:
        if ys[i] > best:
            front.append(i)
            best = ys[i]
    ax.plot([xs[i] for i in front], [ys[i] for i in front], color="black", lw=0.8, ls="--", label="Pareto front")
    if max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    cur = a["cost_model"].get("currency", "$")
    ax.set_xlabel(f"cost per 1,000 requests ({cur})")
    ax.set_ylabel(f"{a['metric']} on test")
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    ax.grid(alpha=0.3)
    return _png(fig)


def latency(a: dict) -> bytes:
    """Single-request latency distribution per strategy (all seeds' samples)."""
    rows = [r for r in a["strategies"] if r["latency_ms_samples"]]
    fig, ax = plt.subplots(figsize=(7.5, 0.4 * len(rows) + 1.4))
    data = [r["latency_ms_samples"] for r in rows] or [[0.0]]
    bp = ax.boxplot(data, vert=False, patch_artist=True, showfliers=True, widths=0.6)
    for patch, r in zip(bp["boxes"], rows):
        patch.set_facecolor(_colour(r["family"]))
        patch.set_alpha(0.6)
    ax.set_yticks(range(1, len(rows) + 1), [r["label"] for r in rows] or ["-"], fontsize=8)
    ax.set_xlabel("latency per single request (ms)")
    ax.grid(alpha=0.3, axis="x")
    return _png(fig)


def confusion(a: dict, limit: int = 6) -> bytes | None:
    """Confusion matrices (summed over seeds) of the best ``limit`` strategies; rows true, columns predicted."""
    rows = [r for r in a["strategies"] if r.get("confusion_matrix")][:limit]
    names = a.get("labels") or []
    if not rows or not names:
        return None
    cols = min(3, len(rows))
    n = len(names)
    size = max(2.8, 0.28 * n + 1.2)
    fig, axes = plt.subplots(math.ceil(len(rows) / cols), cols, figsize=(size * cols, size * math.ceil(len(rows) / cols)),
                             squeeze=False)
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    for ax, r in zip(axes.flat, rows):
        cm = np.asarray(r["confusion_matrix"], dtype=float)
        norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        ax.set_title(r["label"], fontsize=8)
        ticks = range(n)
        short = [s if len(s) <= 14 else s[:13] + "…" for s in names]
        ax.set_xticks(ticks, short if n <= 20 else [""] * n, rotation=90, fontsize=6)
        ax.set_yticks(ticks, short if n <= 20 else [""] * n, fontsize=6)
        if n <= 12:
            for i in range(n):
                for j in range(n):
                    if cm[i, j]:
                        ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6,
                                color="white" if norm[i, j] > 0.5 else "black")
    fig.supxlabel("predicted", fontsize=8)
    fig.supylabel("true", fontsize=8)
    return _png(fig)


def break_even(a: dict) -> bytes:
    """Total cost over the horizon against daily request volume, one line per strategy (log-log)."""
    cm = a["cost_model"]
    days = cm["horizon_days"]
    vol = max(cm["volume_per_day"], 1.0)
    xs = np.logspace(math.log10(max(vol / 1000, 1)), math.log10(vol * 1000), 200)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for r in a["strategies"]:
        c = r["cost"]
        total = c["upfront"] + c["per_request"] * xs * days
        ax.plot(xs, np.maximum(total, 1e-9), color=_colour(r["family"]),
                ls="--" if r["family"] == "prompting" else "-", label=r["label"])
    ax.axvline(vol, color="black", lw=0.8, ls=":")
    ax.annotate("your volume", (vol, ax.get_ylim()[0]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("requests per day")
    ax.set_ylabel(f"total cost over {days:g} days ({cm.get('currency', '$')})")
    ax.legend(fontsize=7, frameon=False)
    ax.grid(alpha=0.3, which="both")
    return _png(fig)


def groups(a: dict) -> bytes | None:
    """Per strategy (one row each), its metric in every group of each ``task.groups`` column with 95% intervals;
    the black tick is the strategy's overall value, the worst group is ringed, small groups are hollow."""
    cols = a.get("group_columns") or []
    rows = [s for s in a["strategies"] if s.get("groups")]
    if not cols or not rows:
        return None
    metric = a["metric"]
    fig, axes = plt.subplots(len(cols), 1, figsize=(7.5, (0.5 * len(rows) + 1.3) * len(cols)), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, col in zip(axes[:, 0], cols):
        names = next((b["groups"] for s in rows for b in s["groups"] if b["column"] == col), [])
        names = [g["name"] for g in names]
        step = 0.6 / max(1, len(names))
        for i, s in enumerate(reversed(rows)):
            bd = next((b for b in s["groups"] if b["column"] == col), None)
            if bd is None:
                continue
            ax.plot([s["mean"], s["mean"]], [i - 0.38, i + 0.38], color="black", lw=1.5)
            for j, g in enumerate(bd["groups"]):
                y = i - 0.3 + step * (j + 0.5)
                v, ci, colour = g["values"][metric], g["ci"].get(metric), cmap(names.index(g["name"]) % 10)
                if ci:
                    ax.plot(ci, [y, y], color=colour, lw=1.2)
                ax.scatter([v], [y], s=28, zorder=3, facecolors="none" if g["small"] else colour, edgecolors=colour)
                if g["name"] == bd["worst"] and bd["best"] != bd["worst"]:
                    ax.scatter([v], [y], s=90, zorder=2, facecolors="none", edgecolors="#b23b3b", lw=1.2)
        ax.set_yticks(range(len(rows)), [s["label"] for s in reversed(rows)], fontsize=8)
        ax.set_xlabel(f"{metric} on test by {col} (95% CI; black tick: overall; ringed: worst group; hollow: "
                      f"under {a.get('small_group', 30)} items)", fontsize=8)
        ax.legend(handles=[Line2D([], [], marker="o", ls="", color=cmap(k % 10), label=n) for k, n in enumerate(names)],
                  fontsize=7, frameon=False, loc="upper left", ncol=min(4, max(1, len(names))))
        ax.grid(alpha=0.3, axis="x")
    return _png(fig)


def cascade(a: dict) -> bytes | None:
    """Each cascade's test curve (first seed): accuracy against the share of inputs sent to the teacher, with the
    point chosen on dev ringed; the student alone is the curve's left end, the teacher alone its right end."""
    rows = [s for s in a["strategies"] if s.get("cascade")]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, s in enumerate(rows):
        run = s["cascade"]["seeds"][0]
        colour = colours[i % len(colours)]
        pts = sorted(run["curve"], key=lambda p: p["fallback_rate"])
        ax.step([p["fallback_rate"] for p in pts], [p["accuracy"] for p in pts], where="post", color=colour,
                label=f"{s['label']} (seed {run['seed']})")
        ax.scatter([run["test"]["fallback_rate"]], [run["test"]["accuracy"]], s=90, facecolors="none",
                   edgecolors=colour, linewidths=1.6, zorder=3)
    ax.set_xlabel("fallback rate on test (share of inputs answered by the teacher)")
    ax.set_ylabel("accuracy on test")
    ax.set_xlim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    return _png(fig)
