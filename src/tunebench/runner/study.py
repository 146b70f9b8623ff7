"""The study runner: expands (strategy, params, seed, train size) trials, runs the pending ones, stores each."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..version import __version__
from ..backends import Backend, load_backend
from ..config import SearchConfig, StudyConfig
from ..config.metrics import headline_metrics
from ..data import Split, TaskData, concat, load_task, stratified_folds, stratified_order, stratified_split
from ..errors import ConfigError, TunebenchError
from ..evaluation.cost import PeakMemory, latency_ms
from ..evaluation.consistency import measure
from ..evaluation.metrics import classification_metrics, generation_item_scores, generation_metrics
from ..textfmt import render
from ..progress import StudyReporter
from ..store.results import Store
from ..strategies import StrategyConfig, registry
from ..strategies.base import PromptConfig
from ..strategies.resolve import resolve_entries, shared_params

log = logging.getLogger(__name__)

CV_SELECTION = 0.15  # share of each cross-validation training part held out for epoch selection


@dataclass
class Trial:
    """One unit of work: a strategy config (or a search around it), a seed and a train size."""

    strategy: str
    config: StrategyConfig
    seed: int
    train_size_spec: str
    train_size: int
    key: str
    label: str
    model: str = "default"
    search: SearchConfig | None = None


def versions() -> dict[str, str]:
    import datasets
    import peft
    import transformers

    return {"tunebench": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "datasets": datasets.__version__}


def describe_params(strategy: str, config: StrategyConfig, baseline: dict | None = None,
                    search: SearchConfig | None = None) -> str:
    """``lora(r=16)``: the strategy name and the parameters that differ from ``baseline`` (default: its defaults).

    A searched entry shows what is searched and its budget instead of those parameters'
    base values: ``lora(epochs=3, search=lr,r, trials=12)``."""
    defaults = baseline if baseline is not None else registry.get(strategy).config_cls().to_dict()
    searched = set(search.space) if search is not None else set()
    diff = {k: v for k, v in config.to_dict().items() if defaults.get(k) != v and k not in searched}
    parts = []
    for k, v in diff.items():
        if isinstance(v, list) and len(v) == 1:
            v = v[0]
        text = v if isinstance(v, str) else json.dumps(v)
        parts.append(f"{k}={text}")
    if search is not None:
        parts.append(f"search={','.join(search.space)}, trials={search.trials}")
        if search.seconds is not None:
            parts.append(f"seconds={search.seconds:g}")
    return f"{strategy}({', '.join(parts)})" if parts else strategy


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Study:
    """Runs a study's trials against a store; finished trials are skipped, so a rerun resumes.

    Example:
        >>> cfg, base = load_study("study.yaml")  # doctest: +SKIP
        >>> rows = Study(cfg, base_dir=base).run()
    """

    def __init__(self, config: StudyConfig, *, base_dir: str | Path = ".", store: Store | None = None,
                 reporter: StudyReporter | None = None, source: str | None = None):
        self.config = config
        self.base_dir = Path(base_dir)
        self.store = store if store is not None else Store(self._store_path())
        self.reporter = reporter or StudyReporter()
        self.source = source
        self._data: TaskData | None = None
        self.failures: list[tuple[str, BaseException]] = []
        self.unchecked_prompts: list[str] = []  # prompt references planned without a store (validate)

    def _store_path(self) -> Path:
        return self.config.store_path(self.base_dir)

    @property
    def data(self) -> TaskData:
        if self._data is None:
            self._data = load_task(self.config.task, self.base_dir)
        return self._data

    def plan(self) -> list[Trial]:
        """Every trial of the study, in order, with a key that changes when anything that matters changes."""
        data = self.data
        k = self.config.cv
        if k is not None:
            pool = len(data.train) + len(data.dev)
            if k > pool // 2:
                raise ConfigError(f"cv: {k} folds, but train + dev hold only {pool} examples (each fold needs at least "
                                  f"2); use cv: 5 or 10, or at most {max(2, pool // 2)}")
            if data.test.targets is None:
                smallest = int(np.bincount(np.concatenate([data.train.labels, data.dev.labels])).min())
                if smallest < k:
                    log.warning("cv: %d folds but the smallest class has %d examples in train + dev: some folds "
                                "will not contain it", k, smallest)
        fingerprints = data.fingerprints()
        models = {m.name: m for m in self.config.all_models()}
        several = len(models) > 1
        trials, seen = [], set()
        resolved: dict[str, str] = {}
        entries = resolve_entries(self.config)
        for i, ((name, config, only), entry) in enumerate(zip(entries, self.config.strategies)):
            search = entry.search
            cls = registry.get(name)
            baseline = cls.config_from_dict(shared_params(self.config, cls)).to_dict()
            targets = [models[m] for m in only] if only else [m for m in models.values() if m.backend in cls.backends]
            for model in targets:
                for written in cls.expand(config):
                    cfg = self._resolve_prompt(f"strategies[{i}].{name}", written, resolved)
                    if cls.uses_train:
                        combos = [(seed, spec) for spec in self.config.train_sizes for seed in self.config.seeds]
                    else:
                        combos = [(self.config.seeds[0], "none")]
                    label = describe_params(name, written, baseline, search) + (f" @{model.name}" if several else "")
                    params = cfg.to_dict()
                    if params.get("prompt") is None:  # keys of trials without a registry reference stay as before
                        params.pop("prompt", None)
                    for seed, spec in combos:
                        n = 0 if spec == "none" else (len(data.train) if spec == "all" else min(int(spec), len(data.train)))
                        ident = {"study": self.config.name, "strategy": name, "params": params, "seed": seed,
                                 "train_size": n, "model": model.identity(), "data": fingerprints,
                                 "labels": [lab.model_dump() for lab in data.labels]}
                        if search is not None:  # only when set: keys of existing stores stay valid
                            ident["search"] = search.model_dump()
                        if self.config.cv is not None:
                            ident["cv"] = self.config.cv
                        key = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20]
                        if key in seen:
                            continue
                        seen.add(key)
                        trials.append(Trial(name, cfg, seed, str(spec), n, key, label, model.name, search))
        return trials

    def _resolve_prompt(self, where: str, cfg: StrategyConfig, resolved: dict[str, str]) -> StrategyConfig:
        """``cfg`` with the text of its ``prompt:`` reference (from the store's registry) as its ``template``.

        ``prompt`` stays in the params, so keys change with the reference and with the text it resolves to (an
        ``@latest`` that moved). A hybrid's reference sits in its ``prompt_params``. Without a store (``validate``
        given none) references are listed in ``unchecked_prompts`` and left unresolved.
        """
        prompt_params = getattr(cfg, "prompt_params", None)
        if isinstance(prompt_params, dict) and prompt_params.get("prompt"):
            text = self._prompt_text(f"{where}.prompt_params.prompt", prompt_params["prompt"], resolved)
            return cfg if text is None else dataclasses.replace(cfg, prompt_params={**prompt_params, "template": text})
        if isinstance(cfg, PromptConfig) and cfg.prompt:
            text = self._prompt_text(f"{where}.prompt", cfg.prompt, resolved)
            return cfg if text is None else dataclasses.replace(cfg, template=text)
        return cfg

    def _prompt_text(self, where: str, ref: str, resolved: dict[str, str]) -> str | None:
        if ref in resolved:
            return resolved[ref]
        if not isinstance(self.store, Store):
            self.unchecked_prompts.append(f"{where}: {ref}")
            return None
        from ..store.prompts import PromptRegistry, backfill

        if not resolved:  # a store written before the registry: its templates become referable
            backfill(self.store)
        try:
            pv = PromptRegistry(self.store).get(ref)
        except TunebenchError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if pv.kind != "prompt":
            raise ConfigError(f"{where}: {pv.ref} is a {pv.kind} template; prompt: takes a prompt template "
                              "(`tunebench prompts list` shows each name's kinds)")
        log.info("%s: %s resolved to %s (#%s)", where, ref, pv.ref, pv.short)
        resolved[ref] = pv.template
        return pv.template

    def run(self, backend: Backend | None = None) -> list[dict]:
        """Run pending trials; returns the stored rows of every trial in the plan.

        ``backend`` (optional) serves a single-model study; otherwise each model is loaded when first needed.
        """
        trials = self.plan()
        self.store.save_study(self.config.name, self.config.model_dump(), self.source, [t.key for t in trials])
        done = self.store.done_keys(self.config.name)
        pending = [t for t in trials if t.key not in done]
        log.info("study %s: %d trials, %d already finished, %d to run", self.config.name, len(trials),
                 len(trials) - len(pending), len(pending))
        models = {m.name: m for m in self.config.all_models()}
        backends: dict[str, Backend] = {}
        if backend is not None:
            backends = {name: backend for name in models}
        checked = set()
        for t in pending:  # load models, check capabilities, lengths and model preparation: before any work
            if t.model not in backends:
                backends[t.model] = load_backend(models[t.model])
            if (t.label, t.model) not in checked:
                checked.add((t.label, t.model))
                registry.get(t.strategy)(t.config).preflight(backends[t.model], self.config.task.type)
        for i, trial in enumerate(pending, 1):
            self.reporter.trial_started(i, len(pending), f"{trial.label} seed={trial.seed} n={trial.train_size}")
            try:
                row = self._run_trial(trial, backends[trial.model])
            except (TunebenchError, KeyboardInterrupt):
                raise
            except Exception as exc:  # one broken trial must not lose the others
                log.exception("trial %s failed", trial.label)
                self.failures.append((trial.label, exc))
                self.reporter.trial_failed(trial.label, exc)
                continue
            self.reporter.trial_finished(row)
        return self.store.trials(self.config.name, {t.key for t in trials})

    def _subset(self, trial: Trial, train: Split) -> Split:
        """The trial's train-size subset of ``train`` (nested across sizes for one seed)."""
        n = trial.train_size if trial.train_size_spec not in ("all", "none") else 0
        if n and n < len(train):
            return train.subset(np.sort(stratified_order(train.labels, trial.seed)[:n]))
        return train

    def _run_trial(self, trial: Trial, backend: Backend) -> dict:
        data = self.data
        set_seed(trial.seed)
        cls = registry.get(trial.strategy)
        cv = None
        cv_s = 0.0
        if self.config.cv is not None:
            t0 = time.perf_counter()
            cv, train, dev = self._cross_validate(trial, cls, backend)
            cv_s = time.perf_counter() - t0
            set_seed(trial.seed)
        else:
            train, dev = self._subset(trial, data.train), data.dev
        test_records = data.test.records()
        config, searched, search_s = trial.config, None, 0.0
        with PeakMemory(backend.device) as mem:
            if trial.search is not None:  # the search is part of adapting: its time is the approach's cost
                from .search import run_search

                searched = run_search(cls, trial.config.to_dict(), trial.search, backend, data, train, dev,
                                      trial.seed, self.reporter)
                search_s = searched.seconds
                config = cls.config_from_dict(searched.best_params)
                set_seed(trial.seed)  # the refit is seeded exactly like an unsearched trial
            strategy = cls(config, seed=trial.seed, reporter=self.reporter)
            t0 = time.perf_counter()
            predictor = strategy.adapt(backend, data, train=train, dev=dev)
            adapt_s = time.perf_counter() - t0
            self.reporter.start("evaluating on test", 1)
            t1 = time.perf_counter()
            out = predictor.run(test_records)
            infer_s = time.perf_counter() - t1
            latencies = latency_ms(predictor.predict, test_records)
            p50, p95 = (float(np.percentile(latencies, q)) for q in (50, 95))
            nll = None
            if data.test.targets is not None and hasattr(predictor, "reference_nll"):
                nll = predictor.reference_nll(test_records, data.test.targets)
            self.reporter.advance()
            self.reporter.stop()
            stability = self._consistency(predictor, test_records, out.predictions, trial.seed)
        if data.test.targets is not None:
            metrics = generation_metrics(list(out.predictions), data.test.targets)
            if nll is not None:
                metrics["perplexity"] = float(np.exp(np.mean(nll)))
            items = {"predictions": list(out.predictions),
                     "scores": generation_item_scores(list(out.predictions), data.test.targets)}
            truth = {"targets": list(data.test.targets)}
        else:
            metrics = classification_metrics(data.test.labels, out.predictions, data.label_names)
            preds = [int(p) for p in out.predictions]
            items = {"predictions": preds,
                     "scores": {"accuracy": [float(p == y) for p, y in zip(preds, data.test.labels.tolist())]}}
            truth = {"labels": data.test.labels.tolist(), "label_names": data.label_names}
        result = getattr(predictor, "train_result", None)
        trainable = result.trainable_params if result else 0
        cost: dict[str, Any] = {
            "trainable_params": int(trainable),
            "train_seconds": round((result.train_seconds if result else adapt_s) + search_s, 4),
            "adapt_seconds": round(adapt_s + search_s, 4),
            "train_examples_per_s": round(result.examples_per_s, 2) if result else None,
            "latency_ms_p50": round(p50, 3),
            "latency_ms_p95": round(p95, 3),
            "latency_ms_mean": round(float(np.mean(latencies)), 3),
            "latency_ms_samples": [round(x, 3) for x in latencies],
            "throughput_per_s": round(len(test_records) / infer_s, 2) if infer_s > 0 else None,
            **token_stats(out.prompt_tokens, out.completion_tokens),
            "peak_memory_mb": round(mem.peak_mb, 1),
        }
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
        if result:
            best = result.history[result.best_epoch - 1]
            metrics.update({k: v for k, v in best.items() if k.startswith("dev_")})
        record = {"config": self.config.model_dump(), "backend": backend.describe(), "versions": versions(),
                  "fingerprints": data.fingerprints(), "data_checks": data.checks, "data_warnings": data.warnings,
                  "best_epoch": result.best_epoch if result else None, "n_test": len(test_records),
                  "prompt": predictor.prompt_info(test_records[0]) if test_records else None,
                  "model": trial.model, "consistency": stability}
        if searched is not None:
            record["search"] = searched.to_dict(trial.search)
        if prompt_searched:
            record["prompt_search"] = prompt_searched
        if out.generated is not None:
            record["sample_outputs"] = [{"input": r["input"], "output": g} for r, g in
                                        zip(test_records[:3], out.generated[:3])]
        family = cls.family
        if family == "prompting" and getattr(backend.config, "tuned", None):  # prompting a model tuned elsewhere
            family = "hybrid"
        row = {"key": trial.key, "study": self.config.name, "strategy": trial.strategy, "family": family,
               "label": trial.label, "params": config.to_dict(), "seed": trial.seed,
               "train_size": (len(train) if cv is not None or not trial.train_size else trial.train_size)
               if cls.uses_train else 0,
               "train_size_spec": trial.train_size_spec, "metrics": metrics, "cost": cost,
               "history": result.history if result else [], "record": record}
        if is_main_process():  # under `accelerate launch`, one process writes the store
            staged = self.store.staging_dir(trial.key)
            predictor.save(staged)
            self.store.add_trial(row, staged, items, (data.fingerprints()["test"], truth))
        log.info("trial %s seed=%d n=%d: %s", trial.label, trial.seed, row["train_size"],
                 ", ".join(f"{k} {metrics[k]:.4f}" for k in headline_metrics(metrics)))
        return row

    def _cross_validate(self, trial: Trial, cls, backend: Backend) -> tuple[dict, Split, Split]:
        """k-fold cross-validation of ``trial`` over train + dev pooled; returns the summary and the final model's
        train and selection splits.

        The pool is dealt into k stratified folds (seeded by the trial seed). For fold i the other folds are the
        training part: a stratified ``CV_SELECTION`` share of it selects epochs (dev), and the trial's train size
        is taken from the rest (the nested subset of the full study). The model is scored on fold i. The final
        model is trained the same way on the whole pool (selection share held out) and scored once on test by
        the caller; test items are never in the pool.
        """
        data = self.data
        k = self.config.cv
        pool = concat(data.train, data.dev, "train")
        generation = data.test.targets is not None
        folds = stratified_folds(pool.labels, k, trial.seed)

        def parts(idx: np.ndarray) -> tuple[Split, Split]:
            kept, sel = stratified_split(pool.labels[idx], CV_SELECTION, trial.seed)
            dev = pool.subset(idx[sel])
            dev.name = "dev"
            return self._subset(trial, pool.subset(idx[kept])), dev

        scores = []
        for i, held in enumerate(folds):
            train, dev = parts(np.sort(np.concatenate([f for j, f in enumerate(folds) if j != i])))
            set_seed(trial.seed)
            self.reporter.start(f"cv fold {i + 1}/{k}", 1)
            predictor = cls(trial.config, seed=trial.seed).adapt(backend, data, train=train, dev=dev)
            test = pool.subset(held)
            preds = predictor.predict(test.records())
            if generation:
                m = generation_metrics(list(preds), test.targets)
            else:
                m = classification_metrics(test.labels, np.asarray(preds), data.label_names)
            scores.append({"n": len(held), "n_train": len(train),
                           **{key: float(m[key]) for key in headline_metrics(m)}})
            self.reporter.advance()
            self.reporter.stop()
        names = [key for key in scores[0] if key not in ("n", "n_train")]
        summary = {name: {"mean": float(np.mean([s[name] for s in scores])),
                          "std": float(np.std([s[name] for s in scores], ddof=1))} for name in names}
        main = names[0]
        cv = {"k": k, "metric": main, "folds": scores, "mean": summary[main]["mean"], "std": summary[main]["std"],
              "metrics": summary, "selection_share": CV_SELECTION}
        log.info("trial %s seed=%d: cv %s %.4f ± %.4f over %d folds", trial.label, trial.seed, main, cv["mean"],
                 cv["std"], k)
        train, dev = parts(np.arange(len(pool)))
        return cv, train, dev

    def _consistency(self, predictor, records: list[dict], predictions, seed: int) -> dict | None:
        """Flip rates under the configured perturbations (first ``max_items`` test items) and sample agreement."""
        cfg = self.config.consistency
        task = self.config.task
        if not cfg.perturbations and cfg.samples < 2:
            return None

        def join(row: dict) -> str:
            return render(task.text_template, row) if task.text_template else row[task.text[0]]

        n = min(cfg.max_items, len(records))
        self.reporter.start("consistency", 1)
        try:
            return measure(predictor, records[:n], list(predictions[:n]), kinds=cfg.perturbations, seed=seed,
                           fields=task.text, join=join, samples=cfg.samples)
        finally:
            self.reporter.advance()
            self.reporter.stop()


def token_stats(prompt: list[int], completion: list[int]) -> dict[str, float]:
    """Tokens per request: prompt and completion, mean and p95, and the mean total."""
    p = np.asarray(prompt or [0], dtype=float)
    c = np.asarray(completion or [0], dtype=float)
    return {"prompt_tokens_mean": round(float(p.mean()), 2), "prompt_tokens_p95": round(float(np.percentile(p, 95)), 2),
            "completion_tokens_mean": round(float(c.mean()), 2),
            "completion_tokens_p95": round(float(np.percentile(c, 95)), 2),
            "tokens_per_request": round(float(p.mean() + c.mean()), 2)}


def is_main_process() -> bool:
    """False only in the non-zero ranks of a multi-process (``accelerate launch``) run."""
    from accelerate import PartialState

    return PartialState().is_main_process


def trial_json(row: dict) -> dict:
    """The public JSON shape of one stored trial (``tunebench run --json``)."""
    return {"strategy": row["strategy"], "label": row["label"], "family": row["family"], "params": row["params"],
            "seed": row["seed"], "train_size": row["train_size"], "metrics": row["metrics"], "cost": row["cost"],
            "history": row["history"], "artifact": row["artifact"], "key": row["key"],
            "prompt": row["record"].get("prompt"), "model": row["record"].get("model"),
            "search": row["record"].get("search")}

