"""A hyperparameter search block: the searched space, the budget and options (checked against the strategy by
:mod:`tunebench.strategies.resolve`)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from ..errors import ConfigError
from .base import _Strict

SEARCH_KEYS = ("trials", "seconds", "metric", "pruning", "startup", "auto")


class SearchConfig(_Strict):
    """A hyperparameter search over one strategy's parameters (Optuna TPE, median pruning on dev per epoch).

    In the YAML every key other than the budget and options below is a parameter of the strategy: a list is a
    set of choices, ``{low, high, log, step}`` a range (integers when ``low`` and ``high`` are integers).
    ``search: auto`` (or ``{auto: true, trials: N}``) searches a predefined space for the strategy, with a budget
    that shrinks as the training set grows (``tunebench.strategies.defaults.auto_search``).
    """

    auto: bool = Field(False, description="Search the strategy's predefined space (learning rate, epochs, LoRA rank "
                       "and alpha, virtual tokens) instead of a given one; explicit keys add to or replace it.")
    trials: int = Field(10, ge=1, le=100_000, description="Configurations tried (the budget; also bounded by seconds). "
                        "With auto and no trials given: from the training-set size.")
    seconds: float | None = Field(None, gt=0, le=30 * 86400, description="Wall-clock budget of the search in seconds.")
    metric: str | None = Field(None, description="Dev metric maximised (default: accuracy for classification, "
                               "token_f1 for generation).")
    pruning: Literal["median", "none"] = Field("median", description="median: stop a configuration whose dev "
                                               "score after an epoch is below the median of earlier ones.")
    startup: int = Field(3, ge=0, le=100_000, description="Configurations run in full before pruning starts.")
    space: dict[str, Any] = Field(description="Searched parameters: a list of choices or {low, high, log, step}.")

    @model_validator(mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        if v == "auto":
            return {"auto": True, "space": {}}
        if not isinstance(v, dict):
            raise ValueError("give auto, or a mapping of parameters to search, e.g. {lr: {low: 1.0e-5, high: 5.0e-4, "
                             "log: true}, r: [4, 8, 16], trials: 12}")
        if isinstance(v.get("space"), dict):  # the stored (dumped) form
            return v
        out = {k: v[k] for k in SEARCH_KEYS if k in v}
        out["space"] = {k: x for k, x in v.items() if k not in SEARCH_KEYS}
        return out

    @model_validator(mode="after")
    def _nonempty(self) -> SearchConfig:
        if not self.space and not self.auto:
            raise ValueError("name at least one parameter to search, e.g. lr: {low: 1.0e-5, high: 5.0e-4, log: true}, "
                             "or use search: auto")
        return self

    def key_dump(self) -> dict[str, Any]:
        """What enters a trial's key (without ``auto`` when off: keys of stores written before it stay valid)."""
        return self.model_dump(exclude=None if self.auto else {"auto"})

    def names(self) -> list[str]:
        return list(self.space)


def check_range(spec: dict, at: str) -> list:
    """Both ends of a valid ``{low, high, log, step}`` range."""
    unknown = sorted(set(spec) - {"low", "high", "log", "step"})
    if unknown or "low" not in spec or "high" not in spec:
        raise ConfigError(f"{at}: a range is {{low, high}} with optional log and step (got keys {sorted(spec)})")
    for end in ("low", "high", "step"):  # YAML reads 1e-5 (no dot) as a string; a plain parameter would accept it
        if isinstance(spec.get(end), str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", spec[end].strip()):
            spec[end] = float(spec[end])
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    num = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    if not num(low) or not num(high):
        raise ConfigError(f"{at}: low and high must be numbers (got {low!r}, {high!r})")
    if not low < high:
        raise ConfigError(f"{at}: low ({low}) must be below high ({high})")
    if not isinstance(log, bool):
        raise ConfigError(f"{at}: log must be true or false")
    if log and low <= 0:
        raise ConfigError(f"{at}: a log range needs low > 0 (got {low})")
    if step is not None:
        if not num(step) or step <= 0:
            raise ConfigError(f"{at}: step must be a positive number (got {step!r})")
        if log:
            raise ConfigError(f"{at}: give either log or step, not both")
    if isinstance(low, int) and isinstance(high, int):
        if step is not None and not isinstance(step, int):
            raise ConfigError(f"{at}: an integer range needs an integer step")
        return [low, high]
    return [low, high]
