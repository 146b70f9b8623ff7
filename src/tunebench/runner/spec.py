"""``TrialSpec``: one unit of work, everything needed to run it anywhere (this process, a Ray worker, a retry)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import SearchConfig
from ..data import Split, stratified_order
from ..strategies import StrategyConfig, registry


@dataclass
class TrialSpec:
    """A strategy config (or a search around it), a seed, a train size, a model: a trial to run.

    ``name`` is what people read (``lora(r=16) @qwen``); ``key`` is what the store knows the trial by. A spec
    pickles (Ray) and turns into plain JSON (:meth:`to_dict`).
    """

    study: str
    strategy: str
    config: StrategyConfig
    seed: int
    train_size_spec: str
    train_size: int
    key: str
    name: str
    model: str = "default"
    search: SearchConfig | None = None
    cv: int | None = None
    judge: dict | None = None  # the study's judge with its rubric resolved: config, template, registry name

    @property
    def strategy_cls(self):
        return registry.get(self.strategy)

    def describe(self) -> str:
        return f"{self.name} seed={self.seed} n={self.train_size}"

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["config"] = self.config.to_dict()
        d["search"] = self.search.model_dump() if self.search is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialSpec:
        d = dict(d)
        d["config"] = registry.get(d["strategy"]).config_from_dict(d["config"])
        d["search"] = SearchConfig.model_validate(d["search"]) if d.get("search") is not None else None
        return cls(**d)


def trial_key(ident: dict[str, Any]) -> str:
    """The trial key: a hash of everything that changes a trial's result."""
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20]


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
        text = v if isinstance(v, str) else _nested(v) or json.dumps(v)
        parts.append(f"{k}={text}")
    if search is not None and search.auto:
        parts.append("search=auto" + (f"+{','.join(search.space)}" if search.space else "")
                     + (f", trials={search.trials}" if "trials" in search.model_fields_set else ""))
    elif search is not None:
        parts.append(f"search={','.join(search.space)}, trials={search.trials}")
        if search.seconds is not None:
            parts.append(f"seconds={search.seconds:g}")
    return f"{strategy}({', '.join(parts)})" if parts else strategy


def _nested(value: Any) -> str | None:
    """A nested strategy block (a distill teacher or student: ``{strategy, model, params}``) as its own label,
    ``few_shot(shots=2) @gpt``; None for any other value."""
    if not (isinstance(value, dict) and isinstance(value.get("strategy"), str) and value["strategy"] in registry.all()
            and isinstance(value.get("params") or {}, dict)):
        return None
    config = registry.get(value["strategy"]).config_from_dict(value.get("params") or {})
    return describe_params(value["strategy"], config) + (f" @{value['model']}" if value.get("model") else "")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_subset(spec: TrialSpec, train: Split) -> Split:
    """The trial's train-size subset of ``train`` (nested across sizes for one seed)."""
    n = spec.train_size if spec.train_size_spec not in ("all", "none") else 0
    if n and n < len(train):
        return train.subset(np.sort(stratified_order(train.labels, spec.seed)[:n]))
    return train
