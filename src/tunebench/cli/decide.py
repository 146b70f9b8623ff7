"""``tunebench recommend`` and ``report``: the decision under the user's constraints, from the store.

The constraint and cost options are built from ``Constraints`` and ``CostConfig`` (help and defaults), their
amounts parsed by ``config.costs``; the analysis and the recommendation are the library's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..analysis.evidence import Evidence, analyze
from ..analysis.recommend import Constraints
from ..analysis.recommend import recommend as make_recommendation
from ..config import CostConfig
from ..config.costs import check_api_models, override_costs, parse_flag_amount
from ..errors import TunebenchError
from ..store.results import Store
from .common import (DEFAULT_METRIC_HELP, JsonOpt, StoreOpt, StudyArg, check_metric, fail, field_option, json_default,
                     out, print_json, resolve_study, setup_logging, spinner)

_STUDY_DEFAULT = " (default: the study's costs.{field}, else {default})."
VolumeOpt = field_option(CostConfig, "volume_per_day", "--volume", default=None,
                         help="{help}, e.g. 50000/day or 50k" + _STUDY_DEFAULT)
HorizonOpt = field_option(CostConfig, "horizon_days", "--horizon", default=None,
                          help="{help}, e.g. 90d or 12w" + _STUDY_DEFAULT)
LatencyOpt = field_option(Constraints, "latency_p95_ms", "--latency-p95", help="{help}, e.g. 100ms.")
MinQualityOpt = field_option(Constraints, "min_quality", "--min-accuracy", "--min-quality", help="{help}, e.g. 0.9.")
BudgetOpt = field_option(Constraints, "budget", "--budget", help="{help}, e.g. 200.")
ChangesOpt = field_option(Constraints, "changes_often", "--changes-often")
GroupGapOpt = field_option(Constraints, "max_group_gap", "--max-group-gap", help="{help}, e.g. 0.05.")
GroupQualityOpt = field_option(Constraints, "min_group_accuracy", "--min-group-accuracy", help="{help}, e.g. 0.8.")
_OVERRIDE = "Override costs.{field}: {help}" + _STUDY_DEFAULT
TrainRateOpt = field_option(CostConfig, "train_per_hour", "--train-per-hour", default=None, help=_OVERRIDE)
ServeRateOpt = field_option(CostConfig, "serve_per_hour", "--serve-per-hour", default=None, help=_OVERRIDE)
ConcurrencyOpt = field_option(CostConfig, "concurrency", "--concurrency", default=None, help=_OVERRIDE)
ApiPriceOpt = typer.Option(None, "--api-price", help="MODEL=IN/OUT: price a model by tokens, per 1M input/output "
                           "tokens (repeatable), e.g. gpt-4o-mini=0.15/0.60.")
MetricOpt = typer.Option(None, help=f"Metric to judge by (default: {DEFAULT_METRIC_HELP}).")


def _evidence_and_constraints(study: str, store: Optional[Path], metric: Optional[str], volume, horizon, latency,
                              min_quality, budget, changes_often, train_rate, serve_rate, concurrency,
                              api_price, group_gap=None, group_quality=None) -> tuple[Evidence, Constraints, Store]:
    """Open the store, analyse the study with the (overridden) cost table, parse the constraints."""
    check_metric(metric)
    name, root = resolve_study(study, store)
    st = Store(root, create=False)
    base = CostConfig(**(st.study_config(name)["config"].get("costs") or {}))
    costs = override_costs(base, train_per_hour=train_rate, serve_per_hour=serve_rate, concurrency=concurrency,
                           api_price=api_price)
    constraints = Constraints(
        volume_per_day=parse_flag_amount("--volume", volume, "volume", "50000/day or 50k"),
        horizon_days=parse_flag_amount("--horizon", horizon, "days", "90d"),
        latency_p95_ms=parse_flag_amount("--latency-p95", latency, "ms", "100ms"),
        min_quality=parse_flag_amount("--min-accuracy", min_quality, "money", "0.9"),
        budget=parse_flag_amount("--budget", budget, "money", "200"), changes_often=changes_often,
        max_group_gap=parse_flag_amount("--max-group-gap", group_gap, "money", "0.05"),
        min_group_accuracy=parse_flag_amount("--min-group-accuracy", group_quality, "money", "0.8"))
    if constraints.horizon_days == 0:
        raise TunebenchError("--horizon: give a positive number of days, e.g. 90d")
    evidence = analyze(st, name, metric=metric, costs=costs)
    check_api_models(base, costs, (g.model for g in evidence.groups), name)
    return evidence, constraints, st


def write_report(evidence: Evidence, constraints: Constraints, out_dir: Optional[Path], store_root: Path) -> dict:
    """The recommendation and the report files (under ``out_dir``, default STORE/reports/STUDY)."""
    from .. import report  # heavy: report writing loads matplotlib for its plots

    rec = make_recommendation(evidence, constraints)
    target = out_dir or store_root / "reports" / evidence.study
    with spinner("writing the report (statistics, plots)"):
        paths = report.write(evidence, rec, target)
    return {"recommendation": rec, "paths": paths}


def report_cmd(study: str = StudyArg, store: Optional[str] = StoreOpt,
               out_dir: Optional[Path] = typer.Option(None, "--out", help="Directory for report.html, report.md and "
                                                      "report.json (default: STORE/reports/STUDY)."),
               metric: Optional[str] = MetricOpt,
               volume: Optional[str] = VolumeOpt, horizon: Optional[str] = HorizonOpt,
               latency: Optional[str] = LatencyOpt, min_quality: Optional[str] = MinQualityOpt,
               budget: Optional[str] = BudgetOpt, changes_often: bool = ChangesOpt,
               group_gap: Optional[str] = GroupGapOpt, group_quality: Optional[str] = GroupQualityOpt,
               train_rate: Optional[float] = TrainRateOpt, serve_rate: Optional[float] = ServeRateOpt,
               concurrency: Optional[int] = ConcurrencyOpt, api_price: Optional[list[str]] = ApiPriceOpt,
               as_json: bool = JsonOpt) -> None:
    """Write the study's report from the store (no trial is rerun): HTML (self-contained), Markdown and JSON."""
    setup_logging(False)
    try:
        ev, constraints, st = _evidence_and_constraints(study, store, metric, volume, horizon, latency, min_quality,
                                                        budget, changes_often, train_rate, serve_rate, concurrency,
                                                        api_price, group_gap, group_quality)
        result = write_report(ev, constraints, out_dir, st.root)
    except TunebenchError as exc:
        fail(exc)
    paths = result["paths"]
    if as_json:
        print_json({"study": ev.study, **{k: str(v) for k, v in paths.items()},
                    "verdict": result["recommendation"]["verdict"],
                    "recommended": result["recommendation"].get("recommended")})
        return
    rec = result["recommendation"]
    out.print(f"[bold]{rec['verdict']}[/]: {rec['summary']}", highlight=False)
    out.print(f"Report: {paths['html']} (also {paths['md'].name} and {paths['json'].name})", highlight=False)


def recommend_cmd(study: str = StudyArg, store: Optional[str] = StoreOpt,
                  metric: Optional[str] = MetricOpt,
                  volume: Optional[str] = VolumeOpt, horizon: Optional[str] = HorizonOpt,
                  latency: Optional[str] = LatencyOpt, min_quality: Optional[str] = MinQualityOpt,
                  budget: Optional[str] = BudgetOpt, changes_often: bool = ChangesOpt,
                  group_gap: Optional[str] = GroupGapOpt, group_quality: Optional[str] = GroupQualityOpt,
                  train_rate: Optional[float] = TrainRateOpt, serve_rate: Optional[float] = ServeRateOpt,
                  concurrency: Optional[int] = ConcurrencyOpt, api_price: Optional[list[str]] = ApiPriceOpt,
                  as_json: bool = JsonOpt) -> None:
    """Which approach to ship under your constraints, ranked, with reasons; says 'tie' or 'not enough evidence'
    when that is the truth."""
    setup_logging(False)
    try:
        ev, constraints, _ = _evidence_and_constraints(study, store, metric, volume, horizon, latency, min_quality,
                                                       budget, changes_often, train_rate, serve_rate, concurrency,
                                                       api_price, group_gap, group_quality)
        rec = make_recommendation(ev, constraints)
    except TunebenchError as exc:
        fail(exc)
    if as_json:
        print_json(rec, default=json_default)
        return
    colour = {"recommend": "green", "tie": "yellow", "not enough evidence": "yellow"}.get(rec["verdict"], "red")
    out.print(f"[bold {colour}]{rec['verdict'].upper()}[/]" + (f": [bold]{rec['recommended']}[/]"
                                                               if rec.get("recommended") else ""))
    out.print(rec["summary"], highlight=False)
    for line in rec.get("judge_warnings") or []:
        out.print(f"[yellow]Judge: {line}[/]", highlight=False)
    for r in rec["ranking"]:
        mark = "[green]✓[/]" if r["feasible"] else "[red]✗[/]"
        out.print(f"\n{r['rank']}. {mark} [bold]{r['label']}[/] ({r['family'].replace('_', ' ')})", highlight=False)
        for line in r["problems"]:
            out.print(f"   [red]- {line}[/]", highlight=False)
        for line in r["doubts"]:
            out.print(f"   [yellow]- {line}[/]", highlight=False)
        for line in r["reasons"]:
            out.print(f"   - {line}", highlight=False)
