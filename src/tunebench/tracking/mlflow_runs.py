"""Stored trials as MLflow runs: one run per trial, the study (or the configured name) as the experiment.

A run carries the trial's parameters (nested ones flattened with dots), seed and train size; its final test
metrics with a 95% bootstrap interval of the headline metrics where the store has the per-item results
(``accuracy_ci_low``/``accuracy_ci_high``); the per-epoch dev history as steps (``history/dev_accuracy`` at step =
epoch); its cost (``cost/train_seconds`` ...); tags for strategy, family, model and the trial key; the artifact's
location as the ``tunebench.artifact`` tag (or the artifact itself with ``log_artifacts``); and the whole stored
row as ``tunebench/trial.json`` (parameters too long for an MLflow parameter are cut there, never in that file).

Idempotent: the run id is kept in the store (``tracked``, by trial key and target), and every run is tagged with
its trial key, so a run written before the store row was (a crash in between) is found and adopted. A run
deleted in MLflow is made again. Tracking is secondary: a tracker that cannot reach its server logs a warning
and stops for the rest of the process; the trials stay in the store, and ``tunebench track`` backfills them.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import httpx

from ..config.metrics import headline_metrics
from ..config.tracking import is_uri, resolve_uri
from ..evaluation.stats import bootstrap_ci, metric_fn
from ..store import Store
from ..store.locations import is_url

log = logging.getLogger(__name__)

PARAM_MAX = 500  # the smallest limit of MLflow servers still about (newer ones take 6000)
TAG_MAX = 5000
KEY_MAX = 250
BATCH_PARAMS = 100  # MLflow's per-request limits: 100 params or tags, 1000 metrics
BATCH_METRICS = 1000
PROBE_TIMEOUT = 5.0
_NAME_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")
_HEX = re.compile(r"^[0-9a-f]{8,64}$")


def redact(uri: str) -> str:
    """The URI without a password, for messages."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", uri)


@dataclass
class RunContent:
    """What one trial's MLflow run holds (built from the stored row alone, so it is testable without MLflow)."""

    name: str
    params: dict[str, str]
    metrics: list[tuple[str, float, int]]  # (name, value, step)
    tags: dict[str, str]
    start_ms: int
    end_ms: int
    truncated: list[str] = field(default_factory=list)  # parameters cut to PARAM_MAX characters


@dataclass
class SyncSummary:
    """What a sync did, by trial key: runs created, made again (deleted in MLflow), already there, or failed."""

    uri: str
    experiment: str
    experiment_id: str | None = None
    created: list[str] = field(default_factory=list)
    recreated: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    error: str | None = None  # why tracking stopped (the server unreachable ...)

    def add(self, other: SyncSummary) -> None:
        """Count ``other``'s outcomes in this summary too (a study's per-trial syncs added up)."""
        self.experiment_id = self.experiment_id or other.experiment_id
        self.created += other.created
        self.recreated += other.recreated
        self.existing += other.existing
        self.failed.update(other.failed)
        self.error = self.error or other.error

    def keys(self) -> set[str]:
        """Every trial this summary accounts for."""
        return {*self.created, *self.recreated, *self.existing, *self.failed}

    def to_dict(self) -> dict[str, Any]:
        return {"uri": redact(self.uri), "experiment": self.experiment, "experiment_id": self.experiment_id,
                "created": len(self.created), "recreated": len(self.recreated), "existing": len(self.existing),
                "failed": len(self.failed), "failures": self.failed, "error": self.error}


# ---- a stored row → run content (pure) ----------------------------------------------------------------------
def _name(text: str) -> str:
    return _NAME_BAD.sub("_", str(text))[:KEY_MAX] or "_"


def _flat(d: dict, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from _flat(v, name + ".")
        else:
            yield name, v


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)


def run_content(row: dict, *, intervals: dict[str, tuple[float, float]] | None = None,
                artifact: str | None = None) -> RunContent:
    """The MLflow run of a stored trial row: parameters, metrics (finals at step 0, history at step = epoch),
    tags and times. ``intervals``: ``{metric: (low, high)}``; ``artifact``: the artifact's location."""
    record = row.get("record") or {}
    params: dict[str, str] = {"seed": str(row["seed"]), "train_size": str(row["train_size"]),
                              "train_size_spec": str(row.get("train_size_spec", "")),
                              "strategy": row["strategy"], "model": str(record.get("model", ""))}
    truncated = []
    for k, v in _flat(row.get("params") or {}):
        name = _name(k if k not in params else f"params.{k}")
        text = _text(v)
        if len(text) > PARAM_MAX:
            text = text[:PARAM_MAX - 3] + "..."
            truncated.append(name)
        params[name] = text
    metrics: list[tuple[str, float, int]] = []
    for k, v in _flat(row.get("metrics") or {}):
        x = _number(v)
        if x is not None:
            metrics.append((_name(k), x, 0))
    for metric, (low, high) in (intervals or {}).items():
        for suffix, x in (("ci_low", low), ("ci_high", high)):
            if _number(x) is not None:
                metrics.append((_name(f"{metric}_{suffix}"), float(x), 0))
    for k, v in _flat(row.get("cost") or {}):
        x = _number(v)
        if x is not None:
            metrics.append((_name(f"cost/{k}"), x, 0))
    for i, entry in enumerate(row.get("history") or []):
        step = int(entry.get("epoch", i + 1))
        for k, v in entry.items():
            x = _number(v)
            if k != "epoch" and x is not None:
                metrics.append((_name(f"history/{k}"), x, step))
    tags = {"tunebench.key": row["key"], "key": row["key"], "strategy": row["strategy"], "family": row["family"],
            "model": str(record.get("model", "")), "tunebench.study": row["study"], "tunebench.label": row["label"],
            "seed": str(row["seed"]), "train_size": str(row["train_size"])}
    if artifact:
        tags["tunebench.artifact"] = artifact
    version = (record.get("versions") or {}).get("tunebench")
    if version:
        tags["tunebench.version"] = str(version)
    if truncated:
        tags["tunebench.truncated_params"] = ", ".join(truncated)
    tags = {_name(k): v[:TAG_MAX] for k, v in tags.items()}
    end = float(row.get("finished_at") or 0.0)
    spent = _number((row.get("cost") or {}).get("adapt_seconds")) or 0.0
    return RunContent(name=f"{row['label']} seed={row['seed']} n={row['train_size']}", params=params,
                      metrics=metrics, tags=tags, start_ms=int((end - spent) * 1000), end_ms=int(end * 1000),
                      truncated=truncated)


# ---- the tracker --------------------------------------------------------------------------------------------
class MlflowTracker:
    """Reports a study's stored trials to MLflow at ``uri`` (a directory: a file store; or a tracking server),
    into ``experiment`` (default: the study name). ``sync`` never raises for MLflow's sake: failures are counted,
    logged as warnings, and an unreachable server stops the tracker for the rest of the process."""

    def __init__(self, store: Store, study: str, uri: str, experiment: str | None = None, *,
                 log_artifacts: bool = False, base_dir: str | Path = "."):
        self.store = store
        self.study = study
        self.uri = resolve_uri(uri, base_dir)
        self.experiment = experiment or study
        self.log_artifacts = log_artifacts
        self.target = f"mlflow|{self.uri}|{self.experiment}"
        self.display = redact(self.uri)
        self.unavailable: str | None = None
        self._client = None
        self._experiment_id: str | None = None

    def __repr__(self) -> str:
        return f"MlflowTracker({self.display!r}, experiment={self.experiment!r})"

    @property
    def is_server(self) -> bool:
        return self.uri.startswith(("http://", "https://"))

    def track(self, row: dict) -> SyncSummary:
        """Report one just-stored trial (the runner calls this after each commit)."""
        return self.sync([row])

    def sync(self, rows: list[dict], *, verify: bool = True) -> SyncSummary:
        """Make sure each stored trial row has its finished MLflow run: reuse the recorded one, adopt a finished
        run tagged with its key, or create one (again, where the recorded run was deleted). ``verify=False``
        trusts the store's record of runs made before (no request per such trial; a resumed study uses it)."""
        summary = SyncSummary(self.uri, self.experiment)
        if self.unavailable is not None:
            summary.error = self.unavailable
            return summary
        if not rows:
            return summary
        if not verify and {r["key"] for r in rows} <= self._known_keys():
            summary.existing = [r["key"] for r in rows]  # nothing new: MLflow is not even contacted
            return summary
        try:
            client, exp_id = self._connect()
        except Exception as exc:  # noqa: BLE001 - tracking is secondary: any failure is reported, never raised
            summary.error = self._give_up(exc)
            return summary
        summary.experiment_id = exp_id
        known = self.store.tracked_runs(self.study, self.target)
        for row in rows:
            key = row["key"]
            if not verify and key in known:
                summary.existing.append(key)
                continue
            try:
                outcome = self._ensure(client, exp_id, row, known.get(key))
            except Exception as exc:  # noqa: BLE001 - see above
                summary.failed[key] = f"{type(exc).__name__}: {_first_line(exc)}"
                problem = self._probe()
                if problem is not None:
                    summary.error = self._give_up(problem)
                    break
                log.warning("MLflow at %s: trial %s (%s) not tracked: %s", self.display, key[:8], row["label"],
                            summary.failed[key])
                continue
            getattr(summary, outcome).append(key)
        return summary

    # -- internals --------------------------------------------------------------------------------------------
    def _known_keys(self) -> set[str]:
        return set(self.store.tracked_runs(self.study, self.target))

    def _give_up(self, problem: BaseException | str) -> str:
        reason = problem if isinstance(problem, str) else f"{type(problem).__name__}: {_first_line(problem)}"
        self.unavailable = (f"MLflow tracking at {self.display} is unavailable ({reason}); the trials are stored "
                            f"in the results store, and `tunebench track {self.study} --mlflow {self.display}` "
                            "reports them later")
        log.warning("%s", self.unavailable)
        return self.unavailable

    def _probe(self) -> str | None:
        """Why a tracking server cannot be reached (None: it answers, or the URI is not a server)."""
        if not self.is_server:
            return None
        try:
            httpx.get(self.uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {_first_line(exc) or 'no answer'}"
        return None

    def _connect(self):
        if self._client is not None:
            return self._client, self._experiment_id
        problem = self._probe()  # before MLflow's own client, which retries a dead server for minutes
        if problem is not None:
            raise ConnectionError(problem)
        try:
            from mlflow.tracking import MlflowClient  # heavy: mlflow is optional and slow to import
        except ModuleNotFoundError:
            raise ModuleNotFoundError("the mlflow package is not installed: pip install 'tunebench[mlflow]'") from None
        client_uri = self.uri
        if not is_uri(self.uri):  # a directory: MLflow's file store, which MLflow 3 serves only when asked to
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            Path(self.uri).mkdir(parents=True, exist_ok=True)
            client_uri = Path(self.uri).as_uri()
        client = MlflowClient(tracking_uri=client_uri)
        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            try:
                exp_id = client.create_experiment(self.experiment, tags={"tunebench.study": self.study})
            except Exception:  # another driver created it meanwhile
                exp = client.get_experiment_by_name(self.experiment)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        else:
            exp_id = exp.experiment_id
            if exp.lifecycle_stage == "deleted":
                log.warning("MLflow at %s: experiment %s was deleted; restoring it", self.display, self.experiment)
                client.restore_experiment(exp_id)
        self._client, self._experiment_id = client, exp_id
        return client, exp_id

    def _ensure(self, client, exp_id: str, row: dict, known: str | None) -> str:
        key = row["key"]
        if known is not None:
            run = _get_run(client, known)
            if (run is not None and run.info.lifecycle_stage == "active" and run.info.status == "FINISHED"
                    and run.info.experiment_id == exp_id):
                return "existing"
        found = []
        if _HEX.match(key):  # trial keys are hex; anything else is never put into a filter string
            found = client.search_runs([exp_id], filter_string=f"tags.`tunebench.key` = '{key}'", max_results=50)
        done = [r for r in found if r.info.status == "FINISHED"]
        if done:
            run_id = done[0].info.run_id
            if run_id != known:
                self.store.set_tracked_run(self.study, key, self.target, run_id, exp_id)
            return "existing"
        for r in found:  # half-written by a process killed while logging it
            client.delete_run(r.info.run_id)
        run_id = self._create(client, exp_id, row)
        self.store.set_tracked_run(self.study, key, self.target, run_id, exp_id)
        if known is not None:
            log.info("MLflow at %s: trial %s's run %s was deleted; made run %s", self.display, key[:8], known, run_id)
        return "recreated" if known is not None else "created"

    def _create(self, client, exp_id: str, row: dict) -> str:
        from mlflow.entities import Metric, Param  # heavy: mlflow is optional and slow to import

        artifact = self.store.artifact_location(row)
        content = run_content(row, intervals=self._intervals(row), artifact=artifact)
        run = client.create_run(exp_id, start_time=content.start_ms, tags=content.tags, run_name=content.name)
        run_id = run.info.run_id
        params = [Param(k, v) for k, v in content.params.items()]
        for i in range(0, len(params), BATCH_PARAMS):
            client.log_batch(run_id, params=params[i:i + BATCH_PARAMS])
        metrics = [Metric(k, v, content.end_ms, step) for k, v, step in content.metrics]
        for i in range(0, len(metrics), BATCH_METRICS):
            client.log_batch(run_id, metrics=metrics[i:i + BATCH_METRICS])
        client.log_dict(run_id, _summary(row), "tunebench/trial.json")
        if self.log_artifacts and artifact and not is_url(artifact) and Path(artifact).is_dir():
            client.log_artifacts(run_id, artifact, "artifact")
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):  # MLflow prints run links to stdout (where --json goes)
            client.set_terminated(run_id, "FINISHED", end_time=content.end_ms)
        if printed.getvalue().strip():
            log.info("%s", printed.getvalue().strip())
        return run_id

    def _intervals(self, row: dict) -> dict[str, tuple[float, float]]:
        """95% bootstrap intervals (over test items) of the trial's headline metrics, where the store has its
        per-item results and the test truth (older trials have none)."""
        key = row["key"]
        items = self.store.items([key]).get(key)
        fingerprint = ((row.get("record") or {}).get("fingerprints") or {}).get("test")
        truth = self.store.test_set(fingerprint) if fingerprint else None
        if not items or truth is None:
            return {}
        out = {}
        for metric in headline_metrics(row.get("metrics") or {}):
            try:
                out[metric] = bootstrap_ci(metric_fn(metric, [items], truth, [row["seed"]]), seed=0)
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                log.debug("trial %s: no interval for %s (%s)", key[:8], metric, exc)
        return out


def _get_run(client, run_id: str):
    """The run, or None when MLflow has no such run (a deleted file-store run may be gone entirely)."""
    from mlflow.exceptions import MlflowException  # heavy: mlflow is optional and slow to import

    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        if getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _summary(row: dict) -> dict:
    """The stored row as one JSON document (parameters uncut); per-latency samples left out."""
    cost = {k: v for k, v in (row.get("cost") or {}).items() if k != "latency_ms_samples"}
    return {k: row.get(k) for k in ("key", "study", "strategy", "family", "label", "params", "seed", "train_size",
                                    "train_size_spec", "metrics", "history", "record", "artifact", "finished_at")} | {
        "cost": cost}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return redact(text.splitlines()[0][:300]) if text else ""


def tracker_for(config, store: Store, *, base_dir: str | Path = ".", uri: str | None = None,
                experiment: str | None = None) -> MlflowTracker | None:
    """The study's MLflow tracker: ``uri``/``experiment`` (the command line) over its ``tracking.mlflow``; a
    command-line directory is relative to the current directory, one in the study to the study file. None when
    neither asks for MLflow."""
    cfg = config.tracking.mlflow
    if uri is None and cfg is None:
        return None
    if uri is not None:
        return MlflowTracker(store, config.name, uri, experiment or (cfg.experiment if cfg else None),
                             log_artifacts=bool(cfg and cfg.log_artifacts), base_dir=".")
    return MlflowTracker(store, config.name, cfg.uri, experiment or cfg.experiment, log_artifacts=cfg.log_artifacts,
                         base_dir=base_dir)
