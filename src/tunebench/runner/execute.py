"""``execute``: run one trial from its spec: adapt (searching first when asked), measure, save the artifact.

No store access: the result is handed to :func:`tunebench.runner.commit.commit` by whoever drives the study, so
the same function runs in this process, in a Ray worker or in a retry.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..backends import Backend, load_backend
from ..config import StudyConfig
from ..config.judge import JudgeConfig
from ..config.metrics import headline_metrics
from ..data import Split, TaskData
from ..errors import TunebenchError
from ..evaluation.cost import PeakMemory
from ..evaluation.judge import judge_test
from ..evaluation.measure import Measurement, cost_of, measure, versions
from ..progress import StudyReporter
from ..store.labels import LabelCache
from ..store.locations import ArtifactRoot, local_copy
from ..strategies import Strategy, load_predictor
from .cv import cross_validate
from .plan import reusable_key
from .search import run_search
from .spec import TrialSpec, set_seed, train_subset

log = logging.getLogger(__name__)

BackendFor = Callable[[str], Backend]  # a study model's name -> its (loaded) backend
ADAPTED_FILE = "adapted.json"  # beside a trial's saved predictor: its key and adaptation seconds (for reuse)


@dataclass
class TrialResult:
    """A finished trial, ready to commit: its row, per-item results, test truth and where its artifact is."""

    row: dict
    items: dict
    test_set: tuple[str, dict]  # (test fingerprint, truth)
    artifact_dir: Path | str | None  # staged artifact (a path or URL); None where this process does not write


@dataclass
class Staging:
    """Where a driver's trials stage their artifacts before commit: the store's artifact root and the driver's
    claim owner (each owner stages apart). ``root`` None: this process writes no artifact (the non-zero ranks of
    ``accelerate launch``). Picklable: Ray workers get it with each trial."""

    root: ArtifactRoot | None
    owner: str

    def location(self, key: str) -> str | None:
        """A fresh, empty staging location for ``key`` (a retried trial starts clean)."""
        return None if self.root is None else self.root.staging(key, self.owner)


def is_main_process() -> bool:
    """False only in the non-zero ranks of a multi-process (``accelerate launch``) run."""
    from accelerate import PartialState  # heavy: initialises the distributed state only when a trial runs

    return PartialState().is_main_process


def execute_staged(spec: TrialSpec, study: StudyConfig, data: TaskData, staging: Staging, *,
                   backend: Backend | None = None, reporter: StudyReporter | None = None,
                   judge_backend: Backend | None = None, backend_for: BackendFor | None = None) -> TrialResult:
    """:func:`execute` with the artifact written to ``spec``'s staging location: directly on a directory root, via
    a local temporary directory and an upload on a URL root (``s3://...``)."""
    loc = staging.location(spec.key)
    opts = {"backend": backend, "reporter": reporter, "judge_backend": judge_backend, "backend_for": backend_for,
            "artifacts": staging.root}
    if loc is None or staging.root.is_local:
        result = execute(spec, study, data, Path(loc) if loc else None, **opts)
    else:
        with tempfile.TemporaryDirectory(prefix="tunebench-artifact-") as tmp:
            result = execute(spec, study, data, Path(tmp) / "artifact", **opts)
            if result.artifact_dir is not None:
                staging.root.upload(Path(result.artifact_dir), loc)
                result.artifact_dir = loc
    result.row["record"]["ran_on"] = {"host": socket.gethostname(), "pid": os.getpid()}
    return result


def peer_backends(spec: TrialSpec, study: StudyConfig, backend_for: BackendFor | None = None) -> dict[str, Backend]:
    """The backends of the other models ``spec``'s strategy uses (a distill teacher's), by model name: from
    ``backend_for`` (an executor's loaded models) or loaded here."""
    models = {m.name: m for m in study.all_models()}
    names = {m for m in spec.strategy_cls.peer_models(spec.config).values() if m != spec.model}
    return {m: backend_for(m) if backend_for is not None else load_backend(models[m]) for m in sorted(names)}


def execute(spec: TrialSpec, study: StudyConfig, data: TaskData, artifact_dir: Path | None, *,
            backend: Backend | None = None, reporter: StudyReporter | None = None,
            judge_backend: Backend | None = None, backend_for: BackendFor | None = None,
            artifacts: ArtifactRoot | None = None) -> TrialResult:
    """Run ``spec`` on ``data`` and write its predictor into ``artifact_dir`` (None: measure only); a study with a
    judge then has the test answers judged (``judge_backend``: the judge's model, loaded here when not given).
    ``backend_for`` (optional) gives the backend of another study model a strategy uses (a distill teacher's);
    without it such a model is loaded. ``artifacts`` (the store's artifact root, optional) is where a strategy
    that can reuse another trial's predictor (a distill teacher's own trial) finds it."""
    reporter = reporter or StudyReporter()
    if backend is None:
        backend = backend_for(spec.model) if backend_for is not None else load_backend(
            {m.name: m for m in study.all_models()}[spec.model])
    peers = peer_backends(spec, study, backend_for)
    set_seed(spec.seed)
    cls = spec.strategy_cls
    cv, cv_s = None, 0.0
    if spec.cv is not None:
        t0 = time.perf_counter()
        cv, train, dev = cross_validate(spec, data, backend, reporter)
        cv_s = time.perf_counter() - t0
        set_seed(spec.seed)
    else:
        train, dev = train_subset(spec, data.train), data.dev
    config, searched, search_s = spec.config, None, 0.0
    with PeakMemory(backend.device) as mem:
        if spec.search is not None:  # the search is part of adapting: its time is the approach's cost
            searched = run_search(cls, spec.config.to_dict(), spec.search, backend, data, train, dev, spec.seed,
                                  reporter)
            search_s = searched.seconds
            config = cls.config_from_dict(searched.best_params)
            set_seed(spec.seed)  # the refit is seeded exactly like an unsearched trial
        strategy = cls(config, seed=spec.seed, reporter=reporter, peers=peers, costs=study.costs)
        reuse = reusable_key(cls, config, study, data, spec.model, spec.seed, len(train))
        if reuse is not None and artifacts is not None:
            adopt_stored(strategy, reuse, spec, artifacts, backend, peers)
        t0 = time.perf_counter()
        predictor = strategy.adapt(backend, data, train=train, dev=dev)
        adapt_s = time.perf_counter() - t0
        m = measure(predictor, data, seed=spec.seed, consistency=study.consistency, clock=time.perf_counter,
                    reporter=reporter)
    if spec.judge is not None:
        _judge(spec, study, data, m, judge_backend, reporter)
    result = getattr(predictor, "train_result", None)
    cost = cost_of(m, train_result=result, adapt_s=adapt_s, search_s=search_s, peak_mb=mem.peak_mb)
    row = _row(spec, study, data, backend, predictor, m, cost, config=config, train=train, reuse=reuse,
               searched=searched,
               search_s=search_s, cv=cv, cv_s=cv_s)
    written = None
    if artifact_dir is not None and is_main_process():  # under `accelerate launch`, one process writes
        predictor.save(artifact_dir)
        (Path(artifact_dir) / ADAPTED_FILE).write_text(json.dumps({"key": spec.key, "adapt_seconds": adapt_s}),
                                                       encoding="utf-8")
        written = artifact_dir
    log.info("trial %s seed=%d n=%d: %s", spec.name, spec.seed, row["train_size"],
             ", ".join(f"{k} {m.metrics[k]:.4f}" for k in headline_metrics(m.metrics)))
    return TrialResult(row, m.items, (data.fingerprints()["test"], m.truth), written)


def adopt_stored(strategy: Strategy, key: str, spec: TrialSpec, artifacts: ArtifactRoot, backend: Backend,
                 peers: dict[str, Backend]) -> None:
    """Hand ``strategy`` the stored predictor of the trial ``key`` it may reuse (a distill teacher's own trial)
    when the artifact root holds it with its adaptation time (otherwise it adapts its own), and the labels other
    trials with that teacher bought."""
    model = strategy.reusable_trial(strategy.config)[2]
    strategy.share_labels(LabelCache(artifacts, key, spec.key))
    loc = artifacts.final(key)
    if not artifacts.exists(loc):
        return
    try:
        directory = local_copy(loc)
        adapted = directory / ADAPTED_FILE
        if not adapted.is_file():  # stored before adaptation times were kept: what it cost is unknown, adapt again
            return
        seconds = float(json.loads(adapted.read_text(encoding="utf-8"))["adapt_seconds"])
        predictor = load_predictor(directory, peers.get(model, backend) if model else backend)
    except (TunebenchError, OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("trial %s: the stored trial %s could not be loaded (%s); adapting it again", spec.name,
                    key[:8], exc)
        return
    strategy.adopt(predictor, seconds, key)


def _judge(spec: TrialSpec, study: StudyConfig, data: TaskData, m: Measurement, backend: Backend | None,
           reporter: StudyReporter) -> None:
    """The judge's scores and trust figures into ``m``: the summary under ``metrics.judge`` (its own cost inside,
    apart from the strategy's), the per-item scores under ``items.judge``."""
    cfg = JudgeConfig.model_validate(spec.judge["config"])
    model = {mc.name: mc for mc in study.all_models()}[cfg.model]
    if backend is None:
        backend = load_backend(model)
    api = study.costs.api.get(cfg.model)
    price = None if api is None else (api.input_per_1m, api.output_per_1m)
    reporter.start(f"judging with {cfg.model}", 1)
    try:
        summary, items = judge_test(cfg, spec.judge["template"], backend, data, list(m.output.predictions),
                                    price=price, cache=getattr(backend, "judged", None))
    finally:
        reporter.advance()
        reporter.stop()
    summary["rubric"] = {"name": spec.judge["name"], "ref": cfg.rubric, "template": spec.judge["template"]}
    m.metrics["judge"] = summary
    m.items["judge"] = items
    log.info("trial %s: judge %s scored %s (missing %.1f%%)", spec.name, cfg.model,
             "n/a" if summary["overall"] is None else f"{summary['overall']:.2f}", 100 * (summary["missing_rate"] or 0))


def _row(spec: TrialSpec, study: StudyConfig, data: TaskData, backend: Backend, predictor, m: Measurement,
         cost: dict[str, Any], *, config, train: Split, reuse: str | None, searched, search_s: float,
         cv: dict | None, cv_s: float) -> dict:
    """The stored row: what ran (params actually fit), how it scored, what it cost, and its record (``reuse``:
    the key of the trial the strategy may reuse, a distill teacher's)."""
    cls = spec.strategy_cls
    metrics = m.metrics
    if searched is not None:
        cost.update({"search_seconds": round(search_s, 4), "search_trials": searched.n_trials})
    prompt_searched = getattr(predictor, "search_trace", None)  # prompt_search: every candidate it scored
    if prompt_searched:  # its search is inside adapt, so already in train_seconds
        cost["prompt_search_calls"] = int(prompt_searched["calls"])
        cost["prompt_search_seconds"] = round(float(prompt_searched["seconds"]), 4)
        metrics["dev_score"] = prompt_searched["best_dev_score"]
    if cv is not None:
        metrics["cv"] = cv
        cost["cv_seconds"] = round(cv_s, 4)  # measurement, not the approach's cost: not in train_seconds
    distilled = getattr(predictor, "distill", None)
    if distilled:  # the teacher's adaptation and labelling are what the student's labels cost: upfront
        lab, teacher = distilled["labelling"], distilled["teacher"]
        api = (teacher["model"] or spec.model) in study.costs.api  # labelling paid in tokens, else in hardware time
        teacher_s = distilled["teacher_seconds"] + (0.0 if api else lab["seconds"])
        cost["train_seconds"] = round(cost["train_seconds"] + teacher_s, 4)
        cost.update({"teacher_seconds": round(distilled["teacher_seconds"] + lab["seconds"], 4),
                     "labelling_calls": lab["calls"], "labelling_tokens": lab["prompt_tokens"] + lab["completion_tokens"],
                     "labelling_dollars": lab["dollars"], "upfront_dollars": lab["dollars"] if api else 0.0})
        distilled["teacher_key"] = reuse
    cascade = getattr(predictor, "cascade", None)
    if cascade:  # the chosen point is the trial: the teacher's API tokens on the inputs that fell back are per request
        metrics["fallback_rate"] = cascade["test"]["fallback_rate"]
        cost["api_dollars_per_request"] = cascade["api_dollars_per_request"]
        sel = cascade.get("selection")
        if sel:  # both models over dev to choose the threshold: upfront, like the teacher's labelling
            api = (cascade["teacher"]["model"] or spec.model) in study.costs.api
            cost["train_seconds"] = round(cost["train_seconds"] + (0.0 if api else sel["seconds"]), 4)
            cost["upfront_dollars"] = round(cost.get("upfront_dollars", 0.0) + sel["dollars"], 6)
            cost["selection_seconds"] = sel["seconds"]
    result = getattr(predictor, "train_result", None)
    if result:
        best = result.history[result.best_epoch - 1]
        metrics.update({k: v for k, v in best.items() if k.startswith("dev_")})
    family = cls.family
    if family == "prompting" and getattr(backend.config, "tuned", None):  # prompting a model tuned elsewhere
        family = "hybrid"
    train_size = (len(train) if cv is not None or not spec.train_size else spec.train_size) if cls.uses_train else 0
    return {"key": spec.key, "study": spec.study, "strategy": spec.strategy, "family": family,
            "label": spec.name, "params": config.to_dict(), "seed": spec.seed, "train_size": train_size,
            "train_size_spec": spec.train_size_spec, "metrics": metrics, "cost": cost,
            "history": result.history if result else [],
            "record": _record(spec, study, data, backend, predictor, m, searched, prompt_searched)}


def _record(spec: TrialSpec, study: StudyConfig, data: TaskData, backend: Backend, predictor, m: Measurement,
            searched, prompt_searched: dict | None) -> dict:
    """What the trial ran on and with: config, backend, versions, data fingerprints and checks, the prompt."""
    records = m.records
    result = getattr(predictor, "train_result", None)
    record = {"config": study.model_dump(), "backend": backend.describe(), "versions": versions(),
              "fingerprints": data.fingerprints(), "data_checks": data.checks, "data_warnings": data.warnings,
              "best_epoch": result.best_epoch if result else None, "n_test": len(records),
              "dev_majority": getattr(result, "dev_majority", None),
              "prompt": predictor.prompt_info(records[0]) if records else None,
              "model": spec.model, "consistency": m.consistency}
    if searched is not None:
        record["search"] = searched.to_dict(spec.search)
    if prompt_searched:
        record["prompt_search"] = prompt_searched
    if getattr(predictor, "distill", None):
        record["distill"] = predictor.distill
    if getattr(predictor, "cascade", None):
        record["cascade"] = predictor.cascade
    if m.output.generated is not None:
        record["sample_outputs"] = [{"input": r["input"], "output": g} for r, g in
                                    zip(records[:3], m.output.generated[:3])]
    return record
