"""``tunebench track``: a study's finished trials reported to MLflow (a backfill), and the ``--mlflow`` options
``run`` shares with it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError
from rich.markup import escape

from ..config import DEFAULT_STORE, MlflowTracking, StudyConfig
from ..config.tracking import resolve_uri
from ..errors import ConfigError, TunebenchError
from ..store import Store
from ..tracking import MlflowTracker, SyncSummary, tracker_for
from .common import EXIT_TRIALS_FAILED, JsonOpt, StoreOpt, StudyArg, VerboseOpt, err, fail, out, print_json, \
    setup_logging

MlflowOpt = typer.Option(None, "--mlflow", help="MLflow tracking URI: a directory (an MLflow file store, relative to "
                         "the current directory) or http://HOST:5000; each finished trial becomes a run, the study "
                         "an experiment (default: the study's tracking.mlflow).")
ExperimentOpt = typer.Option(None, "--mlflow-experiment", help="MLflow experiment name (default: the study's "
                             "tracking.mlflow.experiment, else the study name).")


def _mlflow_block(data: dict, flag: str) -> MlflowTracking:
    try:
        return MlflowTracking.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"{flag}: {first['msg']}") from None


def with_tracking(cfg: StudyConfig, uri: Optional[str], experiment: Optional[str]) -> StudyConfig:
    """The study with ``--mlflow``/``--mlflow-experiment`` over its ``tracking.mlflow`` (a directory given on the
    command line is relative to the current directory)."""
    if uri is None and experiment is None:
        return cfg
    current = cfg.tracking.mlflow
    if uri is None and current is None:
        raise ConfigError("--mlflow-experiment: give --mlflow URI too (the study has no tracking.mlflow)")
    data = current.model_dump(exclude_unset=True) if current is not None else {}
    if uri is not None:
        data["uri"] = resolve_uri(_mlflow_block({"uri": uri}, "--mlflow").uri, Path.cwd())
    if experiment is not None:
        data["experiment"] = experiment
    block = _mlflow_block(data, "--mlflow-experiment" if uri is None else "--mlflow")
    return cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"mlflow": block})})


def describe(summary: SyncSummary) -> str:
    """One line: what tracking did."""
    made = len(summary.created) + len(summary.recreated)
    text = (f"MLflow: {made} run(s) created, {len(summary.existing)} already there, in experiment "
            f"'{summary.experiment}' at {summary.to_dict()['uri']}")
    if summary.recreated:
        text += f" ({len(summary.recreated)} made again: deleted in MLflow)"
    if summary.failed:
        text += f"; {len(summary.failed)} failed"
    return text


def report_tracking(summary: SyncSummary | None) -> None:
    """After ``run``: what tracking did, or why it stopped (the run itself succeeded either way)."""
    if summary is None:
        return
    if summary.error:
        err.print(f"[yellow]warning:[/] {escape(summary.error)}", highlight=False)
    else:
        out.print(escape(describe(summary)), highlight=False)


def _study_tracker(study: str, store: Optional[str], uri: Optional[str],
                   experiment: Optional[str]) -> tuple[str, Store, MlflowTracker]:
    path = Path(study)
    if path.suffix in (".yaml", ".yml"):
        from ..runner import load_study  # heavy: the runner loads torch

        cfg, base = load_study(path)
        st = Store(store if store is not None else cfg.store_path(base), create=False)
        if uri is not None:
            uri = resolve_uri(_mlflow_block({"uri": uri}, "--mlflow").uri, Path.cwd())
        tracker = tracker_for(cfg, st, base_dir=base, uri=uri, experiment=experiment)
        if tracker is None:
            raise ConfigError(f"{study}: give --mlflow URI (the study has no tracking.mlflow)")
        return cfg.name, st, tracker
    st = Store(store if store is not None else DEFAULT_STORE, create=False)
    saved = (st.study_config(study)["config"].get("tracking") or {}).get("mlflow") or {}
    if uri is None:  # the study's own setting, where the stored config says where without its file's directory
        stored_uri = saved.get("uri")
        if not stored_uri or not (stored_uri.startswith(("http://", "https://")) or Path(stored_uri).is_absolute()):
            raise ConfigError("give --mlflow URI (or the study YAML, whose tracking.mlflow is used)")
        uri = stored_uri
    block = _mlflow_block({"uri": uri}, "--mlflow")
    return study, st, MlflowTracker(st, study, resolve_uri(block.uri, Path.cwd()), experiment or saved.get("experiment"),
                                    log_artifacts=bool(saved.get("log_artifacts")))


def track(study: str = StudyArg, mlflow: Optional[str] = MlflowOpt, experiment: Optional[str] = ExperimentOpt,
          store: Optional[str] = StoreOpt, as_json: bool = JsonOpt, verbose: bool = VerboseOpt) -> None:
    """Report a study's finished trials to MLflow: each trial of its current plan without a run gets one (a
    backfill, e.g. after the tracking server was down). Safe to repeat: runs made before are kept, and a run
    deleted in MLflow is made again."""
    setup_logging(verbose)
    try:
        name, st, tracker = _study_tracker(study, store, mlflow, experiment)
        keys = st.current_keys(name)
        rows = st.trials(name, keys)
    except TunebenchError as exc:
        fail(exc, study)
    summary = tracker.sync(rows, verify=True)
    if as_json:
        print_json({"study": name, "store": st.display, "trials": len(rows), **summary.to_dict()})
    elif not summary.error:
        out.print(f"{escape(name)}: {len(rows)} finished trial(s). {escape(describe(summary))}", highlight=False)
    if summary.error or summary.failed:
        if not as_json:
            err.print(f"[red]error:[/] {escape(summary.error or 'some trials were not tracked; see above')}",
                      highlight=False)
        raise typer.Exit(EXIT_TRIALS_FAILED)
