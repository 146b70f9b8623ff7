"""The strategy interface, predictors, their artifacts and the registry (the single list of strategies)."""

from __future__ import annotations

import dataclasses
import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import ConfigDict, TypeAdapter, ValidationError

from ..errors import ConfigError, StoreError
from ..progress import NULL_REPORTER, Reporter

log = logging.getLogger(__name__)

PREDICTOR_FILE = "predictor.json"


def doc(text: str, **kw: Any) -> Any:
    """A dataclass field with help text (shown by ``tunebench strategies`` and in docs)."""
    return field(metadata={"help": text}, **kw)


@dataclass
class StrategyConfig:
    """Base of every ``<Name>Config``: unknown keys are rejected, values are type-checked by pydantic."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainConfig(StrategyConfig):
    """Hyperparameters shared by every weight-changing strategy (same keys in the YAML)."""

    lr: float = doc("Peak learning rate (AdamW).", default=5e-5)
    batch_size: int = doc("Examples per optimisation step.", default=32)
    epochs: int = doc("Passes over the training data (upper bound with early stopping).", default=4)
    weight_decay: float = doc("AdamW weight decay (not applied to biases and norms).", default=0.01)
    dropout: float = doc("Dropout before the classification head.", default=0.1)
    warmup_ratio: float = doc("Fraction of steps with linear warm-up; linear decay after.", default=0.06)
    max_length: int = doc("Tokens kept per input (longer inputs are truncated).", default=128)
    early_stopping: int = doc("Stop after this many epochs without dev improvement (0: off).", default=0)
    metric: str = doc("Dev metric that picks the best epoch: accuracy or macro_f1.", default="accuracy")

    def __post_init__(self) -> None:
        checks = {
            "lr": self.lr > 0, "batch_size": self.batch_size >= 1, "epochs": self.epochs >= 1,
            "weight_decay": self.weight_decay >= 0, "dropout": 0 <= self.dropout < 1,
            "warmup_ratio": 0 <= self.warmup_ratio < 1, "max_length": self.max_length >= 8,
            "early_stopping": self.early_stopping >= 0, "metric": self.metric in ("accuracy", "macro_f1"),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"out of range: {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}")


class Predictor(ABC):
    """What adapting returns: predicts label ids for texts, saves and loads its artifact (never pickle)."""

    kind: ClassVar[str]

    def __init__(self, strategy: str, config: StrategyConfig, labels: list[str]):
        self.strategy = strategy
        self.config = config
        self.labels = labels

    @abstractmethod
    def predict_scores(self, texts: list[str]) -> np.ndarray:
        """Class scores, shape (n, n_labels); higher is more likely."""

    def predict(self, texts: list[str]) -> np.ndarray:
        """Predicted label ids."""
        return self.predict_scores(texts).argmax(axis=1)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"kind": self.kind, "strategy": self.strategy, "config": self.config.to_dict(), "labels": self.labels}
        self._save(directory)
        (directory / PREDICTOR_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")

    @abstractmethod
    def _save(self, directory: Path) -> None: ...

    @classmethod
    @abstractmethod
    def _load(cls, directory: Path, backend, strategy: str, config: StrategyConfig, labels: list[str]) -> Predictor: ...


class Strategy(ABC):
    """One way of adapting a model. Subclasses set ``name``, ``config_cls``, ``family``, ``requires``.

    Every strategy keeps the signature ``adapt(backend, task, *, train, dev) -> Predictor``.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type[StrategyConfig]]
    family: ClassVar[str]  # prompting | prompt_tuning | weight_tuning
    requires: ClassVar[tuple[str, ...]] = ()
    uses_train: ClassVar[bool] = True  # False: the result does not depend on train data or seed
    predictor_cls: ClassVar[type[Predictor]]

    def __init__(self, config: StrategyConfig, *, seed: int = 0, reporter: Reporter = NULL_REPORTER):
        self.config = config
        self.seed = seed
        self.reporter = reporter

    @classmethod
    def config_from_dict(cls, params: dict[str, Any]) -> StrategyConfig:
        """Validate YAML parameters into this strategy's config; errors name the field."""
        try:
            return TypeAdapter(cls.config_cls).validate_python(params or {})
        except ValidationError as exc:
            msgs = []
            for e in exc.errors():
                loc = ".".join(str(p) for p in e["loc"])
                if e["type"] == "unexpected_keyword_argument" or e["type"] == "extra_forbidden":
                    valid = ", ".join(f.name for f in dataclasses.fields(cls.config_cls))
                    msgs.append(f"unknown parameter '{loc}' (valid: {valid})")
                else:
                    msgs.append(f"{loc + ': ' if loc else ''}{e['msg']}")
            raise ConfigError("; ".join(msgs)) from None

    @classmethod
    def expand(cls, config: StrategyConfig) -> list[StrategyConfig]:
        """Configs to run as separate trials (e.g. one per zero-shot template). Default: the config itself."""
        return [config]

    def extra_positions(self) -> int:
        """Positions the strategy adds to each input (e.g. soft-prompt virtual tokens)."""
        return 0

    def check(self, backend) -> None:
        """Fail before any work if the backend lacks a capability or the inputs cannot fit the model."""
        backend.require(*self.requires, strategy=self.name)
        limit = getattr(backend, "max_positions", None)
        max_length = getattr(self.config, "max_length", None)
        # plain inputs are truncated to the model's limit by the backend; added positions must still fit
        if limit and max_length and self.extra_positions() and max_length + self.extra_positions() > limit:
            extra = f" + {self.extra_positions()} virtual tokens" if self.extra_positions() else ""
            raise ConfigError(f"strategy '{self.name}': max_length {max_length}{extra} exceeds the model's "
                              f"{limit} positions; lower max_length")

    def preflight(self, backend) -> None:
        """Everything :meth:`check` does plus checks that cost more (run once per study, before any trial)."""
        self.check(backend)

    @abstractmethod
    def adapt(self, backend, task, *, train, dev) -> Predictor:
        """Adapt ``backend``'s model to ``task`` using ``train`` (and ``dev`` for selection only)."""


class Registry:
    """Strategy name -> class: the one place where strategies are listed."""

    def __init__(self) -> None:
        self._items: dict[str, type[Strategy]] = {}

    def register(self, cls: type[Strategy]) -> type[Strategy]:
        if cls.name in self._items:
            raise ValueError(f"strategy '{cls.name}' registered twice")
        for attr in ("config_cls", "family", "predictor_cls"):
            if not hasattr(cls, attr):
                raise TypeError(f"strategy '{cls.name}' lacks {attr}")
        self._items[cls.name] = cls
        return cls

    def get(self, name: str) -> type[Strategy]:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown strategy '{name}'; known: {', '.join(self._items)}") from None

    def all(self) -> dict[str, type[Strategy]]:
        return dict(self._items)


registry = Registry()
register = registry.register


def load_predictor(directory: str | Path, backend) -> Predictor:
    """Load a saved predictor; ``backend`` must be the model it was adapted from."""
    directory = Path(directory)
    meta_path = directory / PREDICTOR_FILE
    if not meta_path.is_file():
        raise StoreError(f"{directory}: no saved predictor ({PREDICTOR_FILE} missing)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    cls = registry.get(meta["strategy"])
    config = cls.config_from_dict(meta["config"])
    return cls.predictor_cls._load(directory, backend, meta["strategy"], config, meta["labels"])
