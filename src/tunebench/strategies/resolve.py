"""Strategy entries of a study resolved against the registry: ``training`` merged under each entry's params,
each validated as its strategy's config, searches checked against the strategy's parameters.

``config`` keeps the entries raw (it imports no strategy); this is where they meet the registry, once.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from ..config import SearchConfig, StudyConfig
from ..config.metrics import metric_names
from ..config.search import SEARCH_KEYS, check_range
from ..data import TaskData
from ..errors import ConfigError
from ..prompts import PromptTemplate, demo_record
from .base import PromptConfig, registry
from .causal import answers, make_builder
from .defaults import AUTO_SEARCHED as AUTO_STRATEGIES


def shared_params(study: StudyConfig, strategy_cls) -> dict[str, Any]:
    """The study-wide ``training`` keys that this strategy takes (its defaults in this study)."""
    return strategy_cls.merge_shared(study.training, {})


def resolve_strategies(study: StudyConfig) -> list[tuple[str, Any]]:
    """Each strategy entry as ``(name, <Name>Config)``, study-wide ``training`` merged under its params."""
    return [(name, cfg) for name, cfg, _ in resolve_entries(study)]


def resolve_entries(study: StudyConfig) -> list[tuple[str, Any, list[str] | None]]:
    """Each strategy entry as ``(name, <Name>Config, model names or None for all)``; a ``ConfigError`` names the
    entry (``strategies[i].<name>``) and the field."""
    out = []
    kinds = {m.name: m.backend for m in study.all_models()}
    unknown_shared = sorted(set(study.training) - _all_config_keys())
    for i, entry in enumerate(study.strategies):
        try:
            cls = registry.get(entry.name)
        except KeyError as exc:
            raise ConfigError(f"strategies[{i}]: {exc.args[0]}") from None
        if unknown_shared:
            raise ConfigError(f"training: unknown key(s) {unknown_shared}")
        merged = cls.merge_shared(study.training, entry.params)
        try:
            merged = _one_template_source(merged, entry.params, f"strategies[{i}].{entry.name}")
            config = cls.config_from_dict(merged)
        except ConfigError as exc:
            raise ConfigError(f"strategies[{i}].{entry.name}: {exc}") from None
        where = f"strategies[{i}].{entry.name}"
        if not cls.nested_runs and (entry.search is not None or study.cv is not None):
            raise ConfigError(f"{where}: runs neither inside a search nor under cv; drop "
                              f"{'its search' if entry.search is not None else 'cv'} (or run it in its own study)")
        if entry.search is not None:
            check_search(entry.search, cls, merged, where, study.task.type)
        models = _named_models(cls, config, entry.models, kinds, where)
        wrong = [m for m in models or [] if kinds[m] not in cls.backends]
        if wrong:
            raise ConfigError(f"strategies[{i}].{entry.name}: runs on {' or '.join(cls.backends)} models, not on "
                              f"{wrong} ({', '.join(kinds[m] for m in wrong)})")
        out.append((entry.name, config, models))
    return out


def _named_models(cls, config: Any, models: list[str] | None, kinds: dict[str, str], where: str) -> list[str] | None:
    """The models an entry runs on, with the models its config names checked against the study's: a pinned one
    (a distill student's) is where it runs; another one (a distill teacher's) must exist."""
    known = ", ".join(kinds)
    for field, name in cls.peer_models(config).items():
        if name not in kinds:
            raise ConfigError(f"{where}.{field}: no model named '{name}' in this study (its models: {known})")
    if cls.pinned_model(config) is None:
        return models
    field, pinned = cls.pinned_model(config)
    if pinned not in kinds:
        raise ConfigError(f"{where}.{field}: no model named '{pinned}' in this study (its models: {known})")
    if models and models != [pinned]:
        raise ConfigError(f"{where}: models {models} and {field} '{pinned}' disagree; give one of them")
    return [pinned]


def _one_template_source(merged: dict[str, Any], own: dict[str, Any], where: str) -> dict[str, Any]:
    """A prompt comes from ``template`` (or ``template_file``) or from ``prompt`` (a registered template), not both.

    Both in one place is an error naming the field; an entry's own key wins over the other from ``training``.
    """
    def both(params: Any) -> bool:
        return isinstance(params, dict) and params.get("template") is not None and params.get("prompt") is not None

    if both(own):
        raise ConfigError(f"{where}: give either template (or template_file) or prompt (a registered template, "
                          "e.g. prompt: support-intent@3), not both")
    if isinstance(own.get("prompt_params"), dict) and both(own["prompt_params"]):
        raise ConfigError(f"{where}.prompt_params: give either template (or template_file) or prompt, not both")
    if both(merged):  # one of them came from the study-wide training keys
        if own.get("template") is None and own.get("prompt") is None:
            raise ConfigError("training: give either template (or template_file) or prompt, not both")
        merged = dict(merged)
        merged.pop("prompt" if own.get("template") is not None else "template")
    return merged


def _all_config_keys() -> set[str]:
    return {f.name for cls in registry.all().values() for f in dataclasses.fields(cls.config_cls)}


def check_search(search: SearchConfig, strategy_cls, base: dict[str, Any], where: str, task_type: str) -> None:
    """Raise :class:`ConfigError` naming ``<where>.search.<key>`` for unknown parameters, bad ranges, or values
    the strategy rejects (every choice and both ends of every range are validated as its config)."""
    if search.auto and strategy_cls.name not in AUTO_STRATEGIES:
        raise ConfigError(f"{where}.search: auto is defined for the tuning strategies ({', '.join(AUTO_STRATEGIES)}); "
                          f"for {strategy_cls.name} give the parameters to search, e.g. search: {{trials: 8, ...}}")
    valid = [f.name for f in dataclasses.fields(strategy_cls.config_cls)]
    hints = typing.get_type_hints(strategy_cls.config_cls)
    metrics = metric_names(task_type, searchable=True)
    if search.metric is not None and search.metric not in metrics:
        raise ConfigError(f"{where}.search.metric: '{search.metric}' is not a {task_type} metric "
                          f"(use {', '.join(metrics)})")
    for key, spec in search.space.items():
        at = f"{where}.search.{key}"
        if key not in valid:
            raise ConfigError(f"{at}: unknown parameter '{key}' (valid: {', '.join(valid)}; search options: "
                              f"{', '.join(SEARCH_KEYS)})")
        if isinstance(spec, list):
            if not spec:
                raise ConfigError(f"{at}: give at least one choice")
            values = spec
        elif isinstance(spec, dict):
            values = check_range(spec, at)
            integer = isinstance(values[0], int) and isinstance(values[1], int)
            if hints.get(key) is int and not integer:
                raise ConfigError(f"{at}: '{key}' is an integer; give integer low and high "
                                  f"(got {values[0]!r}, {values[1]!r})")
        else:
            raise ConfigError(f"{at}: give a list of choices or a range {{low, high, log, step}}, not {spec!r}")
        for value in values:
            try:
                strategy_cls.config_from_dict({**base, key: value})
            except ConfigError as exc:
                raise ConfigError(f"{at}: value {value!r} is not valid: {exc}") from None


def check_templates(where: str, config: Any, task: TaskData) -> None:
    """Render every template of a strategy config once, on the first training example, so that a template that
    cannot render (a missing variable, a division by zero, a bound of the sandbox) fails before any trial runs.

    The error names the strategy entry and the template."""
    if not len(task.train):
        return
    record = task.train.records()[0]
    demo = demo_record(record, answers(task, task.train)[0])
    configs = [("", config)]
    prompt_params = getattr(config, "prompt_params", None)
    if isinstance(prompt_params, dict) and isinstance(prompt_params.get("template"), str):
        configs.append((".prompt_params", PromptConfig(template=prompt_params["template"])))
    for part, cfg in configs:
        try:
            if isinstance(cfg, PromptConfig) and isinstance(cfg.template, str):
                make_builder(cfg, task, demos=[demo]).render(record)
            for t in getattr(cfg, "label_templates", None) or []:
                lab = task.labels[0] if task.labels else None
                PromptTemplate(t, "label_templates").render(
                    {"label": lab.name if lab else "", "description": (lab.description or "") if lab else ""})
        except ConfigError as exc:
            raise ConfigError(f"{where}{part}: {exc} (rendered on the first training example)") from None
