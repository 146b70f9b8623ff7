"""``plan``: a study's trials, in order, each with a key that changes when anything that matters changes.

Pure: it reads the config, the data fingerprints and (for ``prompt:`` references) the store's prompt registry;
it runs nothing and writes nothing.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from ..config import SearchConfig, StudyConfig
from ..data import TaskData
from ..errors import ConfigError, TunebenchError
from ..evaluation.judge import DEFAULT_RUBRIC, check_human
from ..prompts import PromptTemplate, parse_ref
from ..store import Store
from ..store.prompts import PromptRegistry, backfill
from ..strategies import StrategyConfig, registry
from ..strategies.base import PromptConfig
from ..strategies.defaults import SCALED_KEYS, auto_search, is_scaled, patience, scaled_defaults
from ..strategies.resolve import check_templates, resolve_entries, shared_params
from .spec import TrialSpec, describe_params, trial_key

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Plan:
    """The trials of a study, and the ``prompt:`` references left unresolved for want of a store."""

    trials: list[TrialSpec]
    unchecked_prompts: list[str]


def plan(study: StudyConfig, data: TaskData, store: Store | None = None) -> Plan:
    """Every trial of ``study`` on ``data``; ``prompt:`` references resolve against ``store``'s registry."""
    _check_cv(study, data)
    models = {m.name: m for m in study.all_models()}
    prompts = _Prompts(store)
    judge = _judge(study, data, prompts)
    judge_only = {judge["config"]["model"]} if judge else set()  # a model only the judge names is no candidate
    several = len(set(models) - judge_only) > 1
    trials: list[TrialSpec] = []
    seen: set[str] = set()
    for i, ((name, config, only), entry) in enumerate(zip(resolve_entries(study), study.strategies)):
        cls = registry.get(name)
        baseline = cls.config_from_dict(shared_params(study, cls)).to_dict()
        targets = [models[m] for m in only] if only else [m for m in models.values() if m.backend in cls.backends
                                                         and m.name not in judge_only]
        written_keys = set(cls.merge_shared(study.training, entry.params))
        explicit = written_keys | set(entry.search.space if entry.search else ())
        for model in targets:
            for written in cls.expand(config):
                cfg = prompts.resolve(f"strategies[{i}].{name}", cls.for_model(written, model.name))
                check_templates(f"strategies[{i}].{name}", cfg, data)
                shown = _label_baseline(baseline, set(entry.params) - set(study.training), name, model.backend, study)
                label = describe_params(name, written, shown, entry.search) + (f" @{model.name}" if several else "")
                combos = ([(seed, spec) for spec in study.train_sizes for seed in study.seeds] if cls.uses_train
                          else [(study.seeds[0], "none")])
                for seed, spec in combos:
                    n = 0 if spec == "none" else (len(data.train) if spec == "all" else min(int(spec), len(data.train)))
                    sized = _sized(study, name, cfg, n, data, model.backend, explicit)
                    search = _auto(entry.search, name, n, data, model.backend, sized, written_keys, f"strategies[{i}]")
                    ident = _ident(study, data, name, sized, seed, n, model.name)
                    if entry.search is not None:  # only when set: keys of existing stores stay valid
                        ident["search"] = search.key_dump()
                    if study.cv is not None:
                        ident["cv"] = study.cv
                    if judge is not None:  # only when set: keys of studies without a judge stay as they were
                        ident["judge"] = judge["ident"]
                    key = trial_key(ident)
                    if key in seen:
                        continue
                    seen.add(key)
                    trials.append(TrialSpec(study.name, name, sized, seed, str(spec), n, key, label, model.name,
                                            search, study.cv, judge))
    return Plan(trials, prompts.unchecked)


def _judge(study: StudyConfig, data: TaskData, prompts: _Prompts) -> dict | None:
    """The study's judge with its rubric's text (a registry reference resolved, the inline one, or the built-in)
    and what of it goes into trial keys: the judge model's identity, the rubric text, criteria, scale, repeats and
    the human ratings it is checked against."""
    cfg = study.judge
    if cfg is None:
        return None
    where = "metrics[0].judge"
    if cfg.rubric is not None:
        try:
            parse_ref(cfg.rubric)
        except ConfigError as exc:
            raise ConfigError(f"{where}.rubric: {exc}") from None
        text = prompts._text(f"{where}.rubric", cfg.rubric, kinds=("rubric", "prompt"))
        name = parse_ref(cfg.rubric)[0]
    elif cfg.template is not None:
        text, name = cfg.template, f"{study.name}.judge"
    else:
        text, name = DEFAULT_RUBRIC, "builtin.judge"
    if text is not None:  # None: a reference left unresolved for want of a store (validate without one)
        PromptTemplate(text, f"{where} rubric")  # syntax errors before any trial
    check_human(cfg, data)
    model = {m.name: m for m in study.all_models()}[cfg.model]
    human = data.test.human
    ident = {"model": model.identity(), "rubric": text if text is not None else cfg.rubric, "criteria": cfg.criteria, "scale": cfg.scale,
             "repeats": cfg.repeats, "max_new_tokens": cfg.max_new_tokens, "max_items": cfg.max_items,
             "human": trial_key({"ratings": human}) if human else None}
    return {"config": cfg.model_dump(), "template": text, "name": name, "ident": ident}


def _ident(study: StudyConfig, data: TaskData, name: str, cfg: StrategyConfig, seed: int, n: int,
           model: str) -> dict:
    """What a trial's key hashes (without its search and cv): study, strategy, the keyed params, seed, train size,
    model, data and labels, plus the models and data a strategy reads besides (only where it has any)."""
    cls = registry.get(name)
    models = {m.name: m for m in study.all_models()}
    params = cls.key_params(cfg.to_dict(), models[model].backend)
    if params.get("prompt") is None:  # keys of trials without a registry reference stay as before
        params.pop("prompt", None)
    ident = {"study": study.name, "strategy": name, "params": params, "seed": seed, "train_size": n,
             "model": models[model].identity(), "data": data.fingerprints(),
             "labels": [lab.model_dump() for lab in data.labels]}
    peers = cls.peer_models(cfg)
    if peers:
        ident["peers"] = {field: models[m].identity() for field, m in peers.items()}
    ident.update(cls.ident_extra(cfg, data))
    return ident


def peer_trial_key(study: StudyConfig, data: TaskData, name: str, cfg: StrategyConfig, model: str, seed: int,
                   n: int) -> str:
    """The key the study's own trial of ``name`` with ``cfg`` on ``model`` would have (a distill teacher's): a
    strategy that ignores training data runs once, on the first seed and no training examples."""
    cls = registry.get(name)
    seed, n = (seed, n) if cls.uses_train else (study.seeds[0], 0)
    return trial_key(_ident(study, data, name, cfg, seed, n, model))


def reusable_key(cls: type, config: StrategyConfig, study: StudyConfig, data: TaskData, model: str, seed: int,
                 n: int) -> str | None:
    """The key of the study trial that a trial of ``cls`` with ``config`` on ``model`` may reuse (a distill
    teacher's own trial, ``Strategy.reusable_trial``); None for a strategy that reuses none."""
    reusable = cls.reusable_trial(config)
    if reusable is None:
        return None
    name, cfg, peer = reusable
    return peer_trial_key(study, data, name, cfg, peer or model, seed, n)


def _label_baseline(baseline: dict, written: set[str], name: str, backend: str, study: StudyConfig) -> dict:
    """What a trial's label is compared with: a key the entry itself wrote that would otherwise be size-scaled is
    always shown (``full(epochs=4)`` is not the scaled ``full`` even where 4 is the fixed default; keys of
    ``training:`` are shared by every entry, so they tell no two apart)."""
    if study.tuning_defaults != "scaled" or not is_scaled(name, backend):
        return baseline
    return {k: v for k, v in baseline.items() if not (k in written and k in SCALED_KEYS)}


def _sized(study: StudyConfig, name: str, cfg: StrategyConfig, n: int, data: TaskData, backend: str,
           explicit: set[str]) -> StrategyConfig:
    """``cfg`` with the size-scaled defaults of a trial on ``n`` training examples where the study set no value
    (``tuning_defaults: scaled``); unchanged for strategies with nothing calibrated."""
    if study.tuning_defaults != "scaled" or not n:
        return cfg
    n_classes = len(data.labels) if data.type == "classification" else 0
    scaled = {k: v for k, v in scaled_defaults(name, n, n_classes, backend).items() if k not in explicit}
    if "early_stopping" in scaled and "epochs" in explicit:  # patience follows the epochs the study asked for
        scaled["early_stopping"] = patience(getattr(cfg, "epochs", 0))
    return dataclasses.replace(cfg, **scaled) if scaled else cfg


def _auto(search: SearchConfig | None, name: str, n: int, data: TaskData, backend: str, cfg: StrategyConfig,
          written: set[str], where: str) -> SearchConfig | None:
    """A trial's search: ``search: auto`` made concrete for its strategy and training-set size (the study's own
    keys: its parameters are not searched, its searched ranges and budget replace auto's)."""
    if search is None or not search.auto:
        return search
    n_classes = len(data.labels) if data.type == "classification" else 0
    space, trials = auto_search(name, n, n_classes, backend, cfg.to_dict(), written - set(search.space))
    space = {**space, **search.space}
    if not space:
        raise ConfigError(f"{where}.{name}.search: auto has nothing left to search (every parameter it would "
                          "search is set in the study); drop search or give the parameters to search")
    budget = search.trials if "trials" in search.model_fields_set else trials
    return search.model_copy(update={"space": space, "trials": budget})


def _check_cv(study: StudyConfig, data: TaskData) -> None:
    k = study.cv
    if k is None:
        return
    pool = len(data.train) + len(data.dev)
    if k > pool // 2:
        raise ConfigError(f"cv: {k} folds, but train + dev hold only {pool} examples (each fold needs at least "
                          f"2); use cv: 5 or 10, or at most {max(2, pool // 2)}")
    if data.test.targets is None:
        smallest = int(np.bincount(np.concatenate([data.train.labels, data.dev.labels])).min())
        if smallest < k:
            log.warning("cv: %d folds but the smallest class has %d examples in train + dev: some folds "
                        "will not contain it", k, smallest)


class _Prompts:
    """Resolves ``prompt:`` references through the store's registry, once per reference per plan."""

    def __init__(self, store: Store | None):
        self.store = store
        self.resolved: dict[str, str] = {}
        self.unchecked: list[str] = []

    def resolve(self, where: str, cfg: StrategyConfig) -> StrategyConfig:
        """``cfg`` with the text of its ``prompt:`` reference as its ``template``.

        ``prompt`` stays in the params, so keys change with the reference and with the text it resolves to (an
        ``@latest`` that moved). A hybrid's reference sits in its ``prompt_params``. Without a store (``validate``
        given none) references are listed in ``unchecked`` and left unresolved.
        """
        prompt_params = getattr(cfg, "prompt_params", None)
        if isinstance(prompt_params, dict) and prompt_params.get("prompt"):
            text = self._text(f"{where}.prompt_params.prompt", prompt_params["prompt"])
            return cfg if text is None else dataclasses.replace(cfg, prompt_params={**prompt_params, "template": text})
        if isinstance(cfg, PromptConfig) and cfg.prompt:
            text = self._text(f"{where}.prompt", cfg.prompt)
            return cfg if text is None else dataclasses.replace(cfg, template=text)
        return cfg

    def _text(self, where: str, ref: str, kinds: tuple[str, ...] = ("prompt",)) -> str | None:
        if ref in self.resolved:
            return self.resolved[ref]
        if not isinstance(self.store, Store):
            self.unchecked.append(f"{where}: {ref}")
            return None
        if not self.resolved:  # a store written before the registry: its templates become referable
            backfill(self.store)
        try:
            pv = PromptRegistry(self.store).get(ref)
        except TunebenchError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if pv.kind not in kinds:
            raise ConfigError(f"{where}: {pv.ref} is a {pv.kind} template; {where.rsplit('.', 1)[-1]}: takes a "
                              f"{' or '.join(kinds)} template (`tunebench prompts list` shows each name's kinds)")
        log.info("%s: %s resolved to %s (#%s)", where, ref, pv.ref, pv.short)
        self.resolved[ref] = pv.template
        return pv.template
