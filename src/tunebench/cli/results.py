"""``tunebench show``, ``ls`` and ``strategies``: reading a results store (and the strategy registry)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..analysis.evidence import Evidence, analyze
from ..analysis.leaderboard import default_metric, leaderboard, trial_json
from ..config import DEFAULT_STORE
from ..evaluation.groups import SMALL
from ..report import p_range, points
from ..errors import TunebenchError
from ..store.results import Store
from .common import (DEFAULT_METRIC_HELP, METRICS, JsonOpt, StoreOpt, StudyArg, check_metric, err, fail, json_default,
                     out, print_json, resolve_study, setup_logging)


def _fmt_params(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def print_leaderboard(name: str, rows: list[dict], metric: str, console: Console) -> None:
    board = leaderboard(rows, metric)
    table = Table(title=f"{name}: {metric} on test (mean ± std over seeds)", title_justify="left")
    table.add_column("strategy", overflow="fold", min_width=12, max_width=40)
    table.add_column("family", no_wrap=True)
    second = board[0]["secondary"] if board else "macro_f1"
    cv = next((e for e in board if "cv_mean" in e), None)
    cv_cols = [f"cv {cv['cv_metric']} ({cv['cv_k']}-fold)"] if cv else []
    for col in ("train n", "seeds", metric, second, *cv_cols, "train s", "p50 ms", "tokens/req", "trainable"):
        table.add_column(col, justify="right", no_wrap=True)
    for e in board:
        q = f"{e['quality_mean']:.3f} ± {e['quality_std']:.3f}" if len(e["seeds"]) > 1 else f"{e['quality_mean']:.3f}"
        f1 = f"{e['secondary_mean']:.3f}"
        tokens = e.get("tokens_per_request")
        cv_cell = [f"{e['cv_mean']:.3f} ± {e['cv_std']:.3f}" if "cv_mean" in e else "-"] if cv else []
        label = f"{e['label']} ⚑" if e.get("flags") else e["label"]
        table.add_row(label, e["family"], str(e["train_size"] or "-"), str(len(e["seeds"])), q, f1, *cv_cell,
                      f"{e['train_seconds']:.1f}", f"{e['latency_ms_p50']:.1f}",
                      "-" if tokens is None or tokens != tokens else f"{tokens:.0f}", _fmt_params(e["trainable_params"]))
    console.print(table)
    for e in board:
        for flag in e.get("flags") or []:
            console.print(f"⚑ {escape(e['label'])} (train n {e['train_size'] or '-'}): {escape(flag)}", highlight=False)


def print_distill(rows: list[dict], console: Console) -> None:
    """Each distill trial: its teacher, what labelling the pool cost and the audit of the teacher's labels against
    the pool's gold labels (agreement, then per class: gold and teacher counts, the teacher's precision and recall)."""
    for r in sorted((r for r in rows if r["record"].get("distill")), key=lambda r: (r["label"], r["seed"])):
        d = r["record"]["distill"]
        lab, pool, audit, t = d["labelling"], d["pool"], d["audit"], d["teacher"]
        console.print(f"[bold]{escape(r['label'])}[/] seed {r['seed']}: teacher {t['strategy']} @{t['model']} "
                      f"(key {d.get('teacher_key') or '-'}{', its stored predictor' if d.get('teacher_reused') else ''}); labelled {lab['calls']} of {pool['size']} pool inputs "
                      f"({lab['prompt_tokens'] + lab['completion_tokens']} tokens, {lab['dollars']:.4f} dollars, "
                      f"{lab['seconds']:.1f}s"
                      + (f"; {lab['reused']} of them reused, bought by an earlier trial with this teacher"
                         if lab.get("reused") else "")
                      + f"), trained on {pool['kept']}"
                      + (" (soft labels)" if pool.get("soft") else ""), highlight=False)
        if lab.get("stopped"):
            console.print(f"  stopped early: {escape(lab['stopped'])}", highlight=False)
        if not audit["n"]:
            console.print("  label audit: no pool input has a gold label", highlight=False)
            continue
        kept = (f"; on the {audit['n_kept']} kept: {audit['agreement_kept']:.3f}"
                if audit.get("agreement_kept") is not None else "")
        console.print(f"  label audit on {audit['n']} gold-labelled input(s): agreement {audit['agreement']:.3f}"
                      f"{kept}; unparsed {audit['unparsed']}", highlight=False)
        table = Table(title_justify="left", box=None, padding=(0, 2))
        for col in ("class", "gold", "teacher", "precision", "recall"):
            table.add_column(col, justify="left" if col == "class" else "right")
        for name, c in audit["per_class"].items():
            table.add_row(escape(name), str(c["gold"]), str(c["teacher"]), f"{c['precision']:.3f}", f"{c['recall']:.3f}")
        console.print(table)


def print_distill_curves(curves: list[dict], metric: str, console: Console) -> None:
    """Each distillation curve (``pool_sizes``): the student's metric per teacher labels bought, the gold-label curve
    of the same student strategy, and how many teacher labels are worth one gold label."""
    for c in curves:
        table = Table(title=escape(f"distillation curve: {c['name']} @{c['model']} (train n {c['train_size']})"),
                      title_justify="left")
        for col in ("labels", "kind", metric, "95% CI", "seeds"):
            table.add_column(col, justify="left" if col == "kind" else "right")
        for p in c["points"]:
            table.add_row(f"{p['labels']:,.0f}", "teacher", f"{p['mean']:.3f}", _ci(p["ci"]), str(p["seeds"]))
        for p in c["gold"]:
            table.add_row(f"{p['train_size']:,}", "gold", f"{p['mean']:.3f}", _ci(p["ci"]), str(p["seeds"]))
        console.print(table)
        if not c["gold"]:
            console.print(f"  no gold-label trial of {c['student']} on {c['model']} in this study: no exchange rate",
                          highlight=False)
        for e in c["exchange"]:
            console.print(f"  {escape(e['text'])}", highlight=False)


def print_cascade(rows: list[dict], console: Console) -> None:
    """Each cascade trial: the threshold chosen on dev for its target, what that point gives on test beside the
    student and the teacher alone, and the whole test curve."""
    for r in sorted((r for r in rows if r["record"].get("cascade")), key=lambda r: (r["label"], r["seed"])):
        c = r["record"]["cascade"]
        t, dev, test = c["teacher"], c["dev"], c["test"]
        target = ", ".join(f"{k} {v:g}" for k, v in (c["target"] or {}).items()) or "none (the most accurate on dev)"
        console.print(f"[bold]{escape(r['label'])}[/] seed {r['seed']}: cascade to teacher {t['strategy']} "
                      f"@{t['model']}; target {target}" + ("" if c["target_met"] else " (not reached on dev)"),
                      highlight=False)
        console.print(f"  chosen on dev: threshold {c['threshold']:.4f} (dev accuracy {dev['accuracy']:.3f}, fallback "
                      f"{dev['fallback_rate']:.1%}); on test: accuracy {test['accuracy']:.3f}, fallback "
                      f"{test['fallback_rate']:.1%}, cost per 1k requests {1000 * test['cost_per_request']:.4g}, "
                      f"latency p50/p95 {test['latency_ms_p50']:.1f}/{test['latency_ms_p95']:.1f} ms; student alone "
                      f"{c['student']['test_accuracy']:.3f}, teacher alone {c['teacher_alone']['test_accuracy']:.3f}",
                      highlight=False)
        table = Table(title="  cascade curve on test", title_justify="left", box=None, padding=(0, 2))
        for col in ("threshold", "accuracy", "fallback", "cost/1k", "p50 ms", "p95 ms"):
            table.add_column(col, justify="right")
        for i, p in enumerate(c["curve"]):
            table.add_row(f"{p['threshold']:.4f}" + (" *" if i == c.get("curve_index") else ""), f"{p['accuracy']:.3f}",
                          f"{p['fallback_rate']:.1%}", f"{1000 * p['cost_per_request']:.4g}",
                          f"{p['latency_ms_p50']:.1f}", f"{p['latency_ms_p95']:.1f}")
        console.print(table)
        console.print("  * routes as the threshold chosen on dev (what `tunebench serve` on the trial routes by)",
                      highlight=False)


def print_trial_ids(rows: list[dict], metric: str, console: Console) -> None:
    table = Table(title=f"trials ({metric} on test)", title_justify="left")
    for col in ("id", "strategy", "seed", "train n", metric):
        table.add_column(col, overflow="fold", justify="right" if col in ("seed", "train n", metric) else "left")
    for r in sorted(rows, key=lambda r: (r["label"], r["train_size"], r["seed"])):
        value = r["metrics"].get(metric)
        table.add_row(r["key"][:8], r["label"], str(r["seed"]), str(r["train_size"] or "-"),
                      "-" if value is None else f"{value:.3f}")
    console.print(table)


def print_prompts(rows: list[dict], console: Console) -> None:
    """Each prompting trial's exact template and one rendered example (the first test input)."""
    seen = set()
    shown = 0
    for r in rows:
        info = r["record"].get("prompt")
        if not info or r["label"] in seen:
            continue
        seen.add(r["label"])
        shown += 1
        if "label_template" in info:  # an encoder prompt search: what it embeds and how it compares
            how = f"soft nearest neighbour, tau {info.get('tau')}" if info.get("scorer") == "kernel" else "prototypes"
            console.rule(f"[bold]{r['label']}[/] (encoder prompt search: demonstrations {info.get('demos')} "
                         f"({info.get('demonstrations')}) as {how}, label-prompt weight {info.get('weight')}, "
                         f"centred: {'yes' if info.get('calibrate') else 'no'})")
            console.print("[bold]label prompt[/]", highlight=False)
            console.print(info["label_template"], markup=False, highlight=False)
            continue
        console.rule(f"[bold]{r['label']}[/] ({info.get('mode')}, demonstrations: {info.get('demonstrations')}, "
                     f"chat template: {'yes' if info.get('chat_template') else 'no'})")
        if info.get("instruction"):
            console.print("[bold]instruction[/]", highlight=False)
            console.print(info["instruction"], markup=False, highlight=False)
        console.print("[bold]template[/]", highlight=False)
        console.print(info["template"], markup=False, highlight=False)
        if "example" in info:
            console.print("[bold]rendered (first test example)[/]", highlight=False)
            console.print(info["example"], markup=False, highlight=False)
    if not shown:
        console.print("no trial of this study used a prompt (prompts are stored for causal-model trials)")


def _ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "(no interval)"


def groups_json(ev: Evidence) -> dict:
    """Each strategy of the comparison set with its results by group (``show --groups --json``)."""
    return {"study": ev.study, "metric": ev.metric, "group_columns": ev.group_columns, "note": ev.groups_note(),
            "strategies": [{"label": g.label, "family": g.family, "train_size": g.train_size, "seeds": g.seeds,
                            "mean": g.mean, "ci": None if g.ci is None else list(g.ci),
                            "groups": [b.to_dict() for b in ev.by_group(g)]} for g in ev.final]}


def print_groups(ev: Evidence, console: Console) -> None:
    """Per strategy and group column: each group's n and metrics with 95% intervals, the worst group and the gap
    between the best and the worst group with its paired interval; small groups flagged."""
    if not ev.group_columns:
        console.print(ev.groups_note() or f"study '{ev.study}' names no task.groups: add `groups: [COLUMN, ...]` to "
                      "its task (columns of the test data) and run it again; no trial is rerun", highlight=False)
        return
    metrics = ev.group_metrics
    for col in ev.group_columns:
        table = Table(title=f"{ev.study}: {', '.join(metrics)} on test by {col} (95% intervals: bootstrap over "
                            f"seeds and items, within each group)", title_justify="left")
        table.add_column("strategy", overflow="fold", min_width=12, max_width=36)
        table.add_column(col, overflow="fold", max_width=24)
        table.add_column("n", justify="right", no_wrap=True)
        for m in metrics:
            table.add_column(m, justify="right", no_wrap=True)
        table.add_column("", no_wrap=True)
        summary = []
        for g in ev.final:
            bd = next((b for b in ev.by_group(g) if b.column == col), None)
            if bd is None:
                table.add_row(escape(g.label), "-", "-", *["-"] * len(metrics), "no per-item results")
                continue
            for i, s in enumerate(bd.groups):
                mark = "worst" if s.name == bd.worst and bd.best != bd.worst else ""
                table.add_row(escape(g.label) if i == 0 else "", escape(s.name), f"{s.n}{' ⚠' if s.small else ''}",
                              *[f"{s.values[m]:.3f} {_ci(s.ci[m])}" for m in metrics], mark)
            gap = (f"{bd.gap:.3f} {_ci(bd.gap_ci)}" if bd.best != bd.worst else "one group")
            table.add_row("", f"[italic]gap {escape(bd.best)} − {escape(bd.worst)}[/]", "", gap,
                          *[""] * (len(metrics) - 1), "", end_section=True)
            summary.append((g, bd))
        console.print(table)
        if any(b.small for _, b in summary):
            console.print(f"⚠ small group: under {SMALL} test items, so its interval is wide (a single item gets "
                          "none); shown, not hidden", highlight=False)
        if summary:
            avg = max(summary, key=lambda x: x[0].mean)
            floor = max(summary, key=lambda x: x[1].group(x[1].worst).values[ev.metric])
            lo = floor[1].group(floor[1].worst)
            line = (f"best on average: {avg[0].label} ({ev.metric} {avg[0].mean:.3f}, worst group "
                    f"{avg[1].worst} {avg[1].group(avg[1].worst).values[ev.metric]:.3f}); best worst group: "
                    f"{floor[0].label} ({floor[1].worst} {lo.values[ev.metric]:.3f} {_ci(lo.ci[ev.metric])})")
            console.print(escape(line), highlight=False)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def consistency_json(ev: Evidence, doc: dict | None = None) -> dict:
    """Each strategy of the comparison set with its consistency (as in ``report.json``): seed agreement, flip rate
    per perturbation, sample agreement and the counterfactual swaps (``show --consistency --json``); added to the
    strategies of ``doc`` (``groups_json``) where given."""
    doc = doc or {"study": ev.study, "strategies": [{"label": g.label, "family": g.family, "train_size": g.train_size,
                                                     "seeds": g.seeds} for g in ev.final]}
    for entry, g in zip(doc["strategies"], ev.final):
        entry["consistency"] = g.consistency()
    return doc


def print_consistency(ev: Evidence, console: Console) -> None:
    """The report's consistency table (seed agreement, flip rate per perturbation, sample agreement), then the
    counterfactual swaps: per strategy and swap, the items it changed, their flip rate, accuracy on the original
    and swapped inputs, the change and McNemar's exact p (per seed: a range where several)."""
    doc = [{"label": s["label"], **s["consistency"]} for s in consistency_json(ev)["strategies"]]
    kinds = list(dict.fromkeys(k for s in doc for k in s["perturbation"]))
    table = Table(title=f"{ev.study}: consistency (flip rate: share of predictions a meaning-preserving edit "
                        "changes)", title_justify="left")
    table.add_column("strategy", overflow="fold", min_width=12, max_width=40)
    for col in ("seed agreement", *[f"flip: {k}" for k in kinds], "mean flip", "sample agreement"):
        table.add_column(col, justify="right", no_wrap=True)
    for s in doc:
        table.add_row(escape(s["label"]), _pct(s["seed_agreement"]), *[_pct(s["perturbation"].get(k)) for k in kinds],
                      _pct(s["flip_rate"]), _pct(s["sample_agreement"]))
    console.print(table)
    swapped = [s for s in doc if s["counterfactual"]]
    if not swapped:
        console.print("no counterfactual swaps stored: add consistency: {counterfactual: {names: true, pronouns: "
                      "true, pairs_file: swaps.csv}} to the study; trials that ran without it keep their results",
                      highlight=False)
        return
    table = Table(title=f"{ev.study}: counterfactual swaps (only the test items a swap changed count)",
                  title_justify="left")
    table.add_column("strategy", overflow="fold", min_width=12, max_width=40)
    table.add_column("swap", no_wrap=True)
    for col in ("n", "flip rate", "original", "swapped", "change", "McNemar p"):
        table.add_column(col, justify="right", no_wrap=True)
    for s in swapped:
        for i, (kind, c) in enumerate(s["counterfactual"].items()):
            table.add_row(escape(s["label"]) if i == 0 else "", kind, str(c["n_changed"]), _pct(c["flip_rate"]),
                          _pct(c["original"]), _pct(c["swapped"]), points(c["change"]),
                          p_range((c["p_min"], c["p_max"])), end_section=i == len(s["counterfactual"]) - 1)
    console.print(table)
    if any(c["metric"] == "exact_match" for s in swapped for c in s["counterfactual"].values()):
        console.print("original / swapped: exact match against the reference (swapped likewise)", highlight=False)
    else:
        console.print("original / swapped: accuracy on the changed items before and after the swap", highlight=False)


def judge_json(ev: Evidence) -> dict:
    """The judge's trust figures, each strategy's judge scores and the stored pairwise comparisons (``show
    --json`` adds them where the study has a judge)."""
    return {"trust": ev.judge_trust(), "scores": [{"label": g.label, **(g.judge() or {})} for g in ev.final
                                                  if g.judge() is not None], "pairwise": ev.pairwise}


def _money(v: float | None) -> str:
    return "not priced (costs.api)" if v is None else f"${v:.4f}"


def print_judge(ev: Evidence, console: Console) -> None:
    """The judge's trust figures first (self-agreement, agreement with people, missing calls, its own cost), then
    each strategy's judge score, then the stored pairwise comparisons."""
    trust = ev.judge_trust()
    if trust is None:
        return
    agree, human, cost = trust["self_agreement"], trust["human"], trust["cost"]
    lines = [f"self-agreement {_pct(agree['all_criteria'])} (items whose {trust['repeats']} calls gave the same "
             f"scores, of {agree['items']})" if agree["items"] else
             f"self-agreement not measured ({trust['repeats']} call per answer; repeats: 3 measures it)",
             "agreement with people: " + (f"Kendall tau-b {human['tau']:.3f} {_ci(human['tau_ci'])}, Cohen kappa "
                                          f"(quadratic) {human['kappa']:.3f} {_ci(human['kappa_ci'])} on {human['n']} "
                                          "rated items" if human and human.get("tau") is not None
                                          and human.get("kappa") is not None else "not measured (task.human_score)"),
             f"missing calls {_pct(trust['missing_rate'])} ({trust['missing']} of {trust['calls']}, "
             f"{trust['retried']} retried; never counted as 0)",
             f"the judge's own cost: {cost['requests']} requests, {cost['prompt_tokens']} + "
             f"{cost['completion_tokens']} tokens, {_money(cost['dollars'])} (not in any strategy's cost)"]
    console.print(escape(f"Judge {trust['model']} (rubric {trust['rubric'].get('ref') or trust['rubric'].get('name')}"
                         f", {', '.join(trust['criteria'])} on {trust['scale']}): can it be trusted?"),
                  highlight=False)
    for line in lines:
        console.print(escape(f"  {line}"), highlight=False)
    for w in trust["warnings"]:
        console.print(f"  [yellow]⚠ {escape(w)}[/]", highlight=False)
    table = Table(title="The judge's scores (95% interval over items)", title_justify="left")
    table.add_column("strategy", overflow="fold", min_width=12, max_width=36)
    table.add_column("overall", justify="right", no_wrap=True)
    for c in trust["criteria"]:
        table.add_column(c, justify="right", no_wrap=True)
    table.add_column("missing", justify="right", no_wrap=True)
    for g in ev.final:
        j = g.judge()
        if j is None:
            continue
        table.add_row(escape(g.label), "-" if j["overall"] is None else f"{j['overall']:.2f} {_ci(j['overall_ci'])}",
                      *["-" if j["scores"].get(c) is None else f"{j['scores'][c]:.2f}" for c in trust["criteria"]],
                      _pct(j["missing_rate"]))
    console.print(table)
    print_pairwise(ev.pairwise, console)


def print_pairwise(comparisons: list[dict], console: Console) -> None:
    """Stored pairwise comparisons: A's wins, ties and losses against B, its win rate (ties count half) with its
    interval, how often the verdict changed with the order, the missing items and the judge's own cost."""
    if not comparisons:
        return
    table = Table(title="Pairwise: the judge asked which answer is better, each item in both orders (a verdict that "
                        "changes with the order is a tie)", title_justify="left")
    for col in ("A", "B"):
        table.add_column(col, overflow="fold", min_width=10, max_width=30)
    for col in ("A wins", "ties", "A loses", "A's win rate (95% CI)", "order flips", "missing", "judge cost"):
        table.add_column(col, justify="right", no_wrap=True)
    for c in comparisons:
        ci = c.get("win_rate_ci")
        rate = "-" if c["win_rate"] is None else f"{100 * c['win_rate']:.1f}%" + (
            f" [{100 * ci[0]:.1f}%, {100 * ci[1]:.1f}%]" if ci else "")
        table.add_row(escape(c["a_label"]), escape(c["b_label"]), str(c["wins"]), f"{c['ties']} ({c['order_ties']} "
                      "by order)", str(c["losses"]), rate, _pct(c["order_flip_rate"]),
                      f"{c['missing']} of {c['items']}", _money(c["cost"]["dollars"]))
    console.print(table)


def show(study: str = StudyArg, store: Optional[str] = StoreOpt,
         metric: Optional[str] = typer.Option(None, help=f"One of {', '.join(METRICS)} (default: "
                                              f"{DEFAULT_METRIC_HELP} for generation)."),
         prompts: bool = typer.Option(False, "--prompts", help="Print each trial's template and a rendered example."),
         ids: bool = typer.Option(False, "--ids", help="List every trial with its id (for serve and export)."),
         groups: bool = typer.Option(False, "--groups", help="Results by the groups of task.groups: per group n, "
                                     "metrics with 95% intervals, the worst group and the gap between groups."),
         consistency: bool = typer.Option(False, "--consistency", help="Consistency per strategy: seed agreement, "
                                          "flip rate per perturbation, sample agreement and the counterfactual swaps "
                                          "(flip rate, accuracy change, McNemar)."),
         as_json: bool = JsonOpt) -> None:
    """Leaderboard of a study: quality mean ± std over seeds, train time, latency, tokens, trainable parameters."""
    setup_logging(False)
    try:
        check_metric(metric)
        name, root = resolve_study(study, store)
        st = Store(root, create=False)
        current = st.current_keys(name)
        rows = st.trials(name, current)
        running = [c for c in st.claims(name) if c["key"] in current and not c["expired"]]
        failed = [f for f in st.failures(name) if f["key"] in current]
    except TunebenchError as exc:
        fail(exc)
    if (running or failed) and not as_json:
        err.print(f"{len(current) - len(rows)} of {len(current)} trials not finished: {len(running)} running now, "
                  f"{len(failed)} failed last time (`tunebench store status` lists them)", highlight=False)
    metric = metric or default_metric(rows)
    if rows and metric not in rows[0]["metrics"]:
        fail(TunebenchError(f"--metric: this study's trials have no '{metric}' "
                            f"(they have {', '.join(k for k in METRICS if k in rows[0]['metrics'])})"))
    if prompts and not as_json:
        print_prompts(rows, out)
        return
    if ids and not as_json:
        print_trial_ids(rows, metric, out)
        return
    if (groups or consistency) and rows:
        try:
            ev = analyze(st, name, metric=metric)
        except TunebenchError as exc:
            fail(exc)
        if as_json:
            doc = groups_json(ev) if groups else None
            print_json(consistency_json(ev, doc) if consistency else doc, default=json_default)
            return
        if groups:
            print_groups(ev, out)
        if consistency:
            print_consistency(ev, out)
        return
    ev = None
    if any(isinstance(r["metrics"].get("judge"), dict) for r in rows):
        try:
            ev = analyze(st, name, metric=metric)
        except TunebenchError as exc:
            fail(exc)
    if as_json:
        print_json({"study": name, "leaderboard": leaderboard(rows, metric), "trials": [trial_json(r) for r in rows],
                    "pending": {"planned": len(current), "running": len(running), "failed": failed},
                    **({"judge": judge_json(ev)} if ev is not None else {})}, default=json_default)
        return
    if not rows:
        err.print(f"study '{name}' has no finished trial yet")
        return
    print_leaderboard(name, rows, metric, out)
    print_distill(rows, out)
    if ev is not None:
        print_judge(ev, out)
    pools = {(r["label"], r["params"].get("pool_size")) for r in rows if r["strategy"] == "distill"}
    if len({size for _, size in pools}) > 1:  # two pool sizes or more: a distillation curve may be drawn
        try:
            curves = (ev or analyze(st, name, metric=metric)).distill_curves()
        except TunebenchError as exc:
            fail(exc)
        print_distill_curves(curves, metric, out)
    print_cascade(rows, out)


def list_studies(store: Optional[str] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """List the studies in a results store."""
    setup_logging(False)
    try:
        st = Store(store or Path(DEFAULT_STORE), create=False)
    except TunebenchError as exc:
        fail(exc)
    studies = st.studies()
    if as_json:
        print_json({"store": st.display, "studies": studies})
        return
    table = Table(title=f"studies in {st.display}", title_justify="left")
    for col in ("study", "finished trials", "source"):
        table.add_column(col)
    for s in studies:
        table.add_row(s["name"], str(s["trials"]), s["source"] or "")
    out.print(table)


def strategies() -> None:
    """List the registered strategies and their parameters."""
    from ..strategies import registry  # heavy: strategies load torch
    from ..strategies.defaults import RULES, SCALED_KEYS  # heavy: the strategies package loads torch

    for name, cls in registry.all().items():
        out.print(f"[bold]{name}[/] ({cls.family}): {(cls.config_cls.__doc__ or '').strip()}")
        defaults = cls.config_cls()
        for f in dataclasses.fields(cls.config_cls):
            scaled = "  [dim](encoder: scaled with the training-set size)[/]" if (
                name in RULES and f.name in SCALED_KEYS) else ""
            out.print(f"    {f.name} = {getattr(defaults, f.name)!r}{scaled}  {escape(f.metadata.get('help', ''))}",
                      highlight=False)
