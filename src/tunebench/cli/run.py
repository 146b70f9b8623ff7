"""``tunebench run``, ``demo`` and ``validate``: running a study with progress bars, and checking one."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.console import Console
from rich.table import Table
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..analysis.evidence import analyze
from ..analysis.leaderboard import default_metric, trial_json
from ..analysis.recommend import Constraints
from pydantic import ValidationError

from ..config import ExecutionConfig, StudyConfig
from ..config.metrics import headline_metrics
from ..errors import ConfigError, TunebenchError
from ..progress import StudyReporter
from ..store.results import Store
from .common import (EXIT_INTERRUPTED, EXIT_TRIALS_FAILED, JsonOpt, StoreOpt, VerboseOpt, err, fail, json_default, out,
                     print_json, setup_logging)
from .decide import write_report
from .results import print_leaderboard
from .track import ExperimentOpt, MlflowOpt, report_tracking, with_tracking


class RichReporter(StudyReporter):
    """Draws an overall trials bar and a bar for the current epoch or evaluation."""

    def __init__(self, console: Console):
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=False)
        self.console = console
        self.trials_task = None
        self.step_task = None
        self.current = ""
        self._waited = None

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def trial_started(self, index, total, label):
        if self.trials_task is None:
            self.trials_task = self.progress.add_task("trials", total=total)
        self.current = label
        self.progress.update(self.trials_task, completed=index - 1, description=f"trial {index}/{total}")

    def trial_finished(self, row):
        m, c = row["metrics"], row["cost"]
        shown = ", ".join(f"{k.replace('_', '-')} {m[k]:.3f}" for k in headline_metrics(m))
        if m.get("format_failure_rate"):
            shown += f", format failures {m['format_failure_rate']:.1%}"
        self.progress.console.print(
            f"[green]✓[/] {row['label']} seed={row['seed']} n={row['train_size']}: {shown}, {c['adapt_seconds']:.1f}s")
        self.progress.advance(self.trials_task)

    def trial_failed(self, label, error):
        self.progress.console.print(f"[red]✗[/] {label}: {type(error).__name__}: {error}")
        self.progress.advance(self.trials_task)

    def trials_status(self, queued, running, finished, failed):
        total = queued + running + finished + failed
        if self.trials_task is None:
            self.trials_task = self.progress.add_task("trials", total=total)
        self.progress.update(self.trials_task, total=total, completed=finished + failed,
                             description=f"trials: {queued} queued, {running} running, {finished} finished, "
                                         f"{failed} failed")

    def waiting(self, trials, owners):
        if (trials, owners) == self._waited:  # said once until it changes
            return
        self._waited = (trials, owners)
        self.progress.console.print(f"[yellow]waiting[/] for {trials} trial(s) claimed by other runs on this store "
                                    f"({', '.join(owners)}); a dead run's claims expire and its trials run here",
                                    highlight=False)

    def start(self, label, total):
        text = f"  {self.current}: {label}"
        if self.step_task is None:
            self.step_task = self.progress.add_task(text, total=total)
        else:
            self.progress.reset(self.step_task, total=total, description=text)

    def advance(self, n=1):
        if self.step_task is not None:
            self.progress.advance(self.step_task, n)


def _run_study(cfg: StudyConfig, base: Path, source: str, store: Optional[str], as_json: bool,
               with_report: bool = False, artifacts: Optional[str] = None) -> None:
    from ..runner import Study  # heavy: the runner loads torch

    study_store = Store(store if store is not None else cfg.store_path(base),
                        artifacts=artifacts if artifacts is not None else cfg.artifacts_path(base))
    with RichReporter(err) as reporter:
        study = Study(cfg, base_dir=base, store=study_store, reporter=reporter, source=source)
        for w in study.data.warnings:
            reporter.console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)
        try:
            rows = study.run()
        except KeyboardInterrupt:
            reporter.progress.stop()
            err.print("[yellow]interrupted[/]: finished trials are saved; run the same command again to resume.")
            raise typer.Exit(EXIT_INTERRUPTED) from None
    report = None
    if with_report and rows:
        report = write_report(analyze(study_store, cfg.name), Constraints(), None, study_store.root)
    if as_json:
        data = {"checks": study.data.checks, "warnings": study.data.warnings, "labels": study.data.label_names}
        doc = {"study": cfg.name, "store": study_store.display, "data": data,
               "trials": [trial_json(r) for r in rows]}
        if study.tracking is not None:
            doc["tracking"] = study.tracking.to_dict()
        if report is not None:
            doc["report"] = {k: str(v) for k, v in report["paths"].items()}
            doc["recommendation"] = report["recommendation"]
        print_json(doc, default=json_default)
    else:
        print_leaderboard(cfg.name, rows, default_metric(rows), out)
        out.print(f"Results: {study_store.db_path or study_store.display} (artifacts in {study_store.artifacts.location}); "
                  f"`tunebench show {cfg.name}` shows them again.")
        report_tracking(study.tracking)
        if report is not None:
            rec = report["recommendation"]
            out.print(f"[bold]{rec['verdict']}[/]: {rec['summary']}", highlight=False)
            out.print(f"Report: {report['paths']['html']}", highlight=False)
    if study.failures:
        err.print(f"[red]{len(study.failures)} trial(s) failed[/]; see the messages above. Rerun to retry them.")
        raise typer.Exit(EXIT_TRIALS_FAILED)


def run(study: Path = typer.Argument(..., help="Study YAML."), store: Optional[str] = StoreOpt,
        artifacts: Optional[str] = typer.Option(
            None, "--artifacts", help="Artifact root: a directory every worker shares or an fsspec URL "
            "(s3://bucket/prefix); default: the study's 'artifacts', else STORE/artifacts."),
        executor: Optional[str] = typer.Option(None, "--executor", help="local (default) or ray: trials as Ray tasks."),
        address: Optional[str] = typer.Option(None, "--address", help="Ray cluster: auto, ray://HOST:10001 (default: "
                                              "the study's execution.address, else a private local cluster)."),
        max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent", min=1,
                                                     help="Ray: trials in flight at once."),
        mlflow: Optional[str] = MlflowOpt, mlflow_experiment: Optional[str] = ExperimentOpt,
        dry_run: bool = typer.Option(False, "--dry-run", help="Plan only: the pending trials and what paid calls "
                                     "(a distill teacher's labelling) would spend; nothing is loaded or spent."),
        as_json: bool = JsonOpt, verbose: bool = VerboseOpt) -> None:
    """Run every pending trial of a study (finished trials are skipped: a rerun resumes). Several runs may share
    one store: they split the trials between them."""
    from ..runner import load_study  # heavy: the runner loads torch

    setup_logging(verbose)
    try:
        cfg, base = load_study(study)
        if dry_run:
            _dry_run(cfg, base, store, as_json)
            return
        cfg = with_execution(cfg, executor=executor, address=address, max_concurrent=max_concurrent)
        cfg = with_tracking(cfg, mlflow, mlflow_experiment)
        _run_study(cfg, base, str(study), store, as_json, artifacts=artifacts)
    except TunebenchError as exc:
        fail(exc, study)


def _dry_run(cfg: StudyConfig, base: Path, store: Optional[str], as_json: bool) -> None:
    """``run --dry-run``: pending trials and the estimated spend of each trial that pays per call."""
    from ..runner import Study  # heavy: the runner loads torch

    try:
        study_store = Store(store if store is not None else cfg.store_path(base), create=False)
    except TunebenchError:  # no store yet: every trial is pending
        study_store = _NoStore()
    plan = Study(cfg, base_dir=base, store=study_store).dry_run()
    if as_json:
        print_json({"study": cfg.name, **plan}, default=json_default)
        return
    out.print(f"{cfg.name}: {plan['trials']} trials, {plan['finished']} finished, {plan['pending']} would run "
              "(dry run: nothing loaded, trained or spent).", highlight=False)
    if not plan["spend"]:
        return
    table = Table(title="paid calls before training (estimates)", title_justify="left")
    for col in ("trial", "seed", "teacher", "pool", "calls", "input tokens", "dollars", "budget"):
        table.add_column(col, justify="left" if col in ("trial", "teacher", "budget") else "right",
                         overflow="fold")
    cur = cfg.costs.currency
    for e in plan["spend"]:
        money = "-" if e["dollars"] is None else f"{cur}{e['dollars']:.4f}"
        budget = ", ".join(f"{k} {v:g}" for k, v in e["budget"].items()) or "none"
        calls = str(e["calls"]) + (f" ({e['reused']} reused)" if e.get("reused") else "")
        table.add_row(escape(e["trial"]), str(e["seed"]), escape(e["teacher"]), str(e["pool"]), calls,
                      f"~{e['input_tokens']}", money, budget)
    out.print(table)
    total = sum(e["calls"] - e.get("reused", 0) for e in plan["spend"])
    reused = sum(e.get("reused", 0) for e in plan["spend"])
    dollars = [e["dollars"] for e in plan["spend"] if e["dollars"] is not None]
    out.print(f"total: {total} teacher calls" + (f" ({reused} more labels reused: a teacher shared by trials labels "
                                                 "an input once)" if reused else "")
              + (f", about {cur}{sum(dollars):.4f} in API tokens" if dollars else "")
              + ". Calls are exact unless a dollar budget stops labelling first; tokens count the inputs at ~4 "
              "characters a token (templates and demonstrations add more); a teacher without API prices is "
              "priced by its measured time.", highlight=False)


def with_execution(cfg: StudyConfig, **options) -> StudyConfig:
    """The study with command-line execution options (those given) over its ``execution:``."""
    given = {k: v for k, v in options.items() if v is not None}
    if not given:
        return cfg
    try:
        execution = ExecutionConfig.model_validate({**cfg.execution.model_dump(exclude_unset=True), **given})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
    return cfg.model_copy(update={"execution": execution})


def demo_study_path() -> Path:
    return Path(str(resources.files("tunebench") / "examples" / "demo.yaml"))


def demo(store: Optional[str] = StoreOpt, as_json: bool = JsonOpt, verbose: bool = VerboseOpt) -> None:
    """Run the bundled demo: customer-support intents, every strategy, the embedded default model, offline; ends by
    writing the HTML report and printing its path."""
    from ..runner import load_study  # heavy: the runner loads torch

    setup_logging(verbose)
    try:
        cfg, base = load_study(demo_study_path())
        if not as_json:
            err.print(f"[bold]tunebench demo[/]: {len(cfg.strategies)} strategies on 400 customer-support messages "
                      f"(8 intents) with all-MiniLM-L6-v2, on CPU. Study file: {demo_study_path()}")
        _run_study(cfg, base, str(demo_study_path()), store, as_json, with_report=True)
    except TunebenchError as exc:
        fail(exc, demo_study_path())


class _NoStore:
    """Stand-in store for ``validate``: planning needs none."""


def validate(study: Path = typer.Argument(..., help="Study YAML."), as_json: bool = JsonOpt) -> None:
    """Check a study's config and data without training anything."""
    from ..runner import Study, load_study  # heavy: the runner loads torch

    setup_logging(False)
    try:
        cfg, base = load_study(study)
        try:  # with a store at hand, prompt: references are checked against its registry
            study_store = Store(cfg.store_path(base), create=False)
        except TunebenchError:
            study_store = _NoStore()
        st = Study(cfg, base_dir=base, store=study_store)
        trials = st.plan()
        data = st.data
    except TunebenchError as exc:
        fail(exc, study)
    summary = {"study": cfg.name, "valid": True, "labels": data.label_names, "unchecked_prompts": st.unchecked_prompts,
               "splits": {s.name: len(s) for s in (data.train, data.dev, data.test)},
               "checks": data.checks, "warnings": data.warnings, "trials": len(trials),
               "strategies": sorted({t.strategy for t in trials})}
    if as_json:
        print_json(summary)
        return
    for w in data.warnings:
        err.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)
    for ref in st.unchecked_prompts:
        err.print(f"[yellow]warning:[/] {escape(ref)}: not checked (no results store at {cfg.store_path(base)} yet)",
                  highlight=False)
    out.print(f"[green]✓[/] {study}: valid. {len(data.label_names)} labels; train {len(data.train)}, "
              f"dev {len(data.dev)}, test {len(data.test)}; {len(trials)} trials "
              f"({', '.join(summary['strategies'])}).", highlight=False)
