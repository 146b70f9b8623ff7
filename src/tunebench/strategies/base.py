"""The strategy interface, predictors, their artifacts and the registry (the single list of strategies)."""

from __future__ import annotations

import dataclasses
import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Optional, Union

import numpy as np
from pydantic import ConfigDict, TypeAdapter, ValidationError

from ..config.base import INT_MAX
from ..config.costs import CostConfig
from ..config.files import clip
from ..config.renames import renamed_params
from ..errors import CapabilityError, ConfigError, StoreError
from ..progress import NULL_REPORTER, Reporter
from ..prompts import PromptTemplate, parse_ref

log = logging.getLogger(__name__)

PREDICTOR_FILE = "predictor.json"


def doc(text: str, **kw: Any) -> Any:
    """A dataclass field with help text (shown by ``tunebench strategies`` and in docs)."""
    return field(metadata={"help": text}, **kw)


@dataclass
class StrategyConfig:
    """Base of every ``<Name>Config``: unknown keys are rejected, values are type-checked by pydantic."""

    __pydantic_config__ = ConfigDict(extra="forbid", allow_inf_nan=False)

    def check_numbers(self) -> None:
        """Every count a strategy takes fits in 32 bits: a huge value is a mistake, not a request."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            values = v if isinstance(v, list) else [v]
            if any(isinstance(x, int) and not isinstance(x, bool) and abs(x) > INT_MAX for x in values):
                raise ValueError(f"{f.name}: {clip(v, 40)} is out of range (at most {INT_MAX:,})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PromptConfig(StrategyConfig):
    """How a causal model is prompted and decoded (ignored by the encoder backend)."""

    template: Union[str, list[str], None] = doc(
        "causal: Jinja2 prompt template, inline or `template_file: path` in the YAML; a list runs one trial per "
        "template. Default: built in for the task type.", default=None)
    prompt: Optional[str] = doc(
        "causal: a registered template instead of `template`: NAME, NAME@VERSION, NAME@latest or NAME@#HASH "
        "(`tunebench prompts list`); resolved from the store when the study is planned.", default=None)
    predict: str = doc("causal classification: score (log-likelihood of each label; always a valid label) or "
                       "generate (generate and parse; unparseable answers count as format failures).",
                       default="score")
    max_new_tokens: int = doc("causal: most tokens generated per answer.", default=32)
    temperature: float = doc("causal: 0 decodes greedily; > 0 samples (seeded by the trial seed).", default=0.0)
    top_p: float = doc("causal: nucleus sampling threshold when temperature > 0.", default=1.0)
    stop: list[str] = doc("causal: generation stops at any of these strings.", default_factory=lambda: ["\n"])

    def __post_init__(self) -> None:
        if isinstance(self.template, list) and not self.template:
            raise ValueError("template: give a template or a non-empty list of templates")
        if self.prompt is not None:  # the syntax only; the store resolves it (Study.plan)
            try:
                parse_ref(self.prompt)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        if self.predict not in ("score", "generate"):
            raise ValueError(f"predict must be 'score' or 'generate', not {self.predict!r}")
        if not 1 <= self.max_new_tokens <= 100_000 or not 0 <= self.temperature <= 100 or not 0 < self.top_p <= 1:
            raise ValueError("need 1 <= max_new_tokens <= 100000, 0 <= temperature <= 100 and 0 < top_p <= 1")
        if self.template is not None:  # syntax errors surface at load time, with the template's line
            for i, t in enumerate(self.template if isinstance(self.template, list) else [self.template]):
                try:
                    PromptTemplate(t, "template" if isinstance(self.template, str) else f"template[{i}]")
                except ConfigError as exc:
                    raise ValueError(str(exc)) from None


@dataclass
class TrainConfig(PromptConfig):
    """Hyperparameters shared by every weight-changing strategy (same keys in the YAML)."""

    lr: float = doc("Peak learning rate (AdamW).", default=5e-5)
    batch_size: int = doc("Examples per optimisation step.", default=32)
    epochs: int = doc("Passes over the training data (upper bound with early stopping).", default=4)
    weight_decay: float = doc("AdamW weight decay (not applied to biases and norms).", default=0.01)
    dropout: float = doc("Dropout before the classification head.", default=0.1)
    warmup_ratio: float = doc("Fraction of steps with linear warm-up; linear decay after.", default=0.06)
    max_length: int = doc("Tokens kept per input (causal: per prompt and answer; a longer prompt keeps its end).",
                          default=128)
    early_stopping: int = doc("Stop after this many epochs without dev improvement (0: off).", default=0)
    metric: str = doc("Dev metric that picks the best epoch: accuracy or macro_f1 (generation tasks: dev loss).",
                      default="accuracy")

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = {
            "lr": 0 < self.lr <= 10, "batch_size": 1 <= self.batch_size <= 65_536, "epochs": 1 <= self.epochs <= 10_000,
            "weight_decay": 0 <= self.weight_decay <= 100, "dropout": 0 <= self.dropout < 1,
            "warmup_ratio": 0 <= self.warmup_ratio < 1, "max_length": 8 <= self.max_length <= 1_000_000,
            "early_stopping": 0 <= self.early_stopping <= 10_000, "metric": self.metric in ("accuracy", "macro_f1"),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"out of range: {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}")


Inputs = Union[list[str], list[dict]]


def as_texts(inputs: Inputs) -> list[str]:
    """Inputs as plain texts (records give their ``input``, the fields joined)."""
    return [x["input"] if isinstance(x, dict) else str(x) for x in inputs]


def as_records(inputs: Inputs) -> list[dict]:
    """Inputs as prompt records: a plain text becomes ``{"input": text}``."""
    return [x if isinstance(x, dict) else {"input": str(x)} for x in inputs]


@dataclass
class Output:
    """What a predictor returns for a batch: predictions and the tokens each request cost.

    ``predictions`` are label ids (classification; -1 = a generated answer that names no label) or texts
    (generation). ``generated`` holds the raw completions where the model generated text.
    """

    predictions: Any
    prompt_tokens: list[int]
    completion_tokens: list[int]
    generated: Optional[list[str]] = None
    scores: Optional[np.ndarray] = None  # class scores (n, n_labels) where the predictor computed them


def adapter_kind(model: Any) -> str | None:
    """``lora`` or ``soft_prompt`` for a PEFT-wrapped model, None for a plain one (or none)."""
    cfgs = getattr(model, "peft_config", None)
    if not cfgs:
        return None
    cfg = next(iter(cfgs.values()))
    return "soft_prompt" if getattr(cfg, "is_prompt_learning", False) else "lora"


@dataclass
class ExportParts:
    """What a predictor hands the exporter (``tunebench export``): plain parts, no strategy internals.

    ``kind`` says which parts are filled: ``classifier`` (an encoder or LM body, pooling and a linear head),
    ``causal`` (an LM read through a prompt; ``model`` None: the base model unchanged) or ``embedding``
    (class anchors for the unchanged base encoder).
    """

    kind: str
    labels: list[str]
    model: Any = None  # the torch module to save or merge (PEFT-wrapped or plain); None: the base is unchanged
    adapter: Optional[str] = None  # "lora" | "soft_prompt" when ``model`` is PEFT-wrapped
    tokenizer: Any = None  # saved beside the export; None for a remote endpoint
    max_length: int = 512  # tokens kept per input (a classifier's: capped at the model's positions)
    max_positions: Optional[int] = None  # the model's position limit, where it says
    head: Any = None  # classifier: the nn.Linear on the pooled features
    pooling: Optional[str] = None  # classifier: "mean" (encoders) or "last" (a causal LM's last real token)
    batch: Optional[Callable[[list[str], int], dict]] = None  # classifier: texts, max length -> padded tensors
    prompt: Optional[dict] = None  # causal: template, variables, labels, chat formatting, decoding, retrieval
    tensors: Optional[dict] = None  # embedding: anchors (and centre, label anchors) as tensors
    embedding: Optional[dict] = None  # embedding: labels, mode, k, tau, pooling, ... (embedding.json)


class Predictor(ABC):
    """What adapting returns: predicts for inputs (texts or field records), saves and loads its artifact.

    Artifacts are safetensors and JSON, never pickle.
    """

    kind: ClassVar[str]
    backend: Any = None
    kinds: ClassVar[dict[str, type]] = {}
    streams: bool = False  # whether run(inputs, stream=...) passes answers on while they are generated
    peered: ClassVar[bool] = False  # True: loads with other models' backends (``_load_peered``), a cascade's teacher

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "kind" in cls.__dict__:
            Predictor.kinds[cls.kind] = cls

    def __init__(self, strategy: str, config: StrategyConfig, labels: list[str]):
        self.strategy = strategy
        self.config = config
        self.labels = labels

    @abstractmethod
    def predict_scores(self, inputs: Inputs) -> np.ndarray:
        """Class scores, shape (n, n_labels); higher is more likely."""

    def predict(self, inputs: Inputs):
        """Predicted label ids (or texts, for generation tasks)."""
        return self.predict_scores(inputs).argmax(axis=1)

    def run(self, inputs: Inputs) -> Output:
        """Predictions plus token accounting (an encoder reads the input and generates nothing)."""
        texts = as_texts(inputs)
        max_length = getattr(self.config, "max_length", 512)
        tokens = [len(t) for t in self.backend.tokenize(texts, max_length)] if self.backend is not None else []
        scores = self.predict_scores(texts)
        return Output(scores.argmax(axis=1), tokens, [0] * len(texts), scores=scores)

    def prompt_info(self, record: dict | None = None) -> dict | None:
        """The exact template and one rendered example, for predictors that prompt (None otherwise)."""
        return None

    def request_tokens(self, inputs: Inputs) -> tuple[list[int], int] | None:
        """Before any call: the prompt tokens :meth:`run` will count for each input and the most completion tokens
        one may add (what bounds a paid call's price); upper bounds where only a remote endpoint counts (a causal
        predictor's), None where nothing bounds them."""
        if self.backend is None or getattr(self.backend, "remote", False):
            return None
        max_length = getattr(self.config, "max_length", 512)
        return [len(t) for t in self.backend.tokenize(as_texts(inputs), max_length)], 0

    def export_formats(self) -> tuple[str, ...]:
        """The ``tunebench export`` formats this predictor can be written in (none by default)."""
        return ()

    def export_parts(self) -> ExportParts:
        """The parts an export writes (see :class:`ExportParts`); only for a format in :meth:`export_formats`."""
        raise CapabilityError(f"strategy '{self.strategy}': its predictor ({type(self).__name__}) cannot be exported")

    def export_tokenizer(self) -> Any:
        """The backend's tokenizer, to save with an export (None for a remote endpoint)."""
        if self.backend is None or getattr(self.backend, "remote", False):
            return None
        return getattr(self.backend, "tokenizer", None)

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

    @classmethod
    def _load_peered(cls, directory: Path, backend, peers: dict[str, Any], labels: list[str]) -> Predictor:
        """Load a predictor that uses other models too (``peered``): ``peers`` maps their names to backends."""
        raise NotImplementedError(f"{cls.__name__} loads with _load")


class Strategy(ABC):
    """One way of adapting a model. Subclasses set ``name``, ``config_cls``, ``family``, ``requires``.

    Every strategy keeps the signature ``adapt(backend, task, *, train, dev) -> Predictor``.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type[StrategyConfig]]
    family: ClassVar[str]  # prompting | prompt_tuning | weight_tuning
    requires: ClassVar[tuple[str, ...]] = ()
    uses_train: ClassVar[bool] = True  # False: the result does not depend on train data or seed
    backends: ClassVar[tuple[str, ...]] = ("encoder", "causal")  # backend kinds it can run on
    predictor_cls: ClassVar[type[Predictor]]
    nested_runs: ClassVar[bool] = True  # False: not run inside a hyperparameter search or cross-validation

    def __init__(self, config: StrategyConfig, *, seed: int = 0, reporter: Reporter = NULL_REPORTER,
                 peers: Mapping[str, Any] | None = None, costs: CostConfig | None = None):
        self.config = config
        self.seed = seed
        self.reporter = reporter
        self.peers = dict(peers or {})  # backends of the other models :meth:`peer_models` names, by model name
        self.costs = costs  # the study's price table (a strategy that pays per call budgets with it)

    @classmethod
    def reusable_trial(cls, config: StrategyConfig) -> tuple[str, StrategyConfig, Optional[str]] | None:
        """A trial of the study whose adapted predictor this strategy may adopt instead of adapting its own (a
        distill teacher): ``(strategy, config, model or None for the trial's own)``; the runner looks its artifact
        up by the key that trial has and hands it to :meth:`adopt`. None by default."""
        return None

    def adopt(self, predictor: "Predictor", seconds: float, key: str) -> None:
        """Use ``predictor`` (the stored trial :meth:`reusable_trial` names, key ``key``, which took ``seconds`` to
        adapt) instead of adapting it again."""
        raise NotImplementedError(f"strategy '{self.name}' reuses no trial")

    def share_labels(self, cache) -> None:
        """Where the trial :meth:`reusable_trial` names keeps its answers across trials (a distill teacher's labels,
        :class:`tunebench.store.labels.LabelCache`); ignored by default."""

    @classmethod
    def peer_models(cls, config: StrategyConfig) -> dict[str, str]:
        """Models besides the trial's own that a trial of ``config`` uses, as ``{field: model name}`` (a distill
        teacher's). The runner hands their backends over as ``peers``; none by default."""
        return {}

    @classmethod
    def pinned_model(cls, config: StrategyConfig) -> tuple[str, str] | None:
        """``(field, model name)``: the one model a trial of ``config`` runs on, where the config names it (a
        distill student's); None: every model the entry runs on."""
        return None

    @classmethod
    def for_model(cls, config: StrategyConfig, model: str) -> StrategyConfig:
        """``config`` as it runs on the study model named ``model`` (a model left unnamed in it made concrete)."""
        return config

    @classmethod
    def spend_estimate(cls, config: StrategyConfig, data: Any, train: Any, seed: int,
                       costs: CostConfig | None, bought: Callable[[list[str]], int] | None = None
                       ) -> dict[str, Any] | None:
        """What a trial of ``config`` will spend on paid calls, estimated before anything loads (``tunebench run
        --dry-run``); None for strategies that make no such calls. ``bought`` (optional): how many of the inputs
        it is given, from the first, already have an answer it will reuse (earlier trials with the same teacher)."""
        return None

    @classmethod
    def ident_extra(cls, config: StrategyConfig, data: Any) -> dict[str, Any]:
        """What else enters the key of a trial of ``config`` on ``data`` (e.g. the fingerprint of data only this
        strategy reads); nothing by default, so other keys are unchanged."""
        return {}

    @classmethod
    def config_from_dict(cls, params: dict[str, Any]) -> StrategyConfig:
        """Validate YAML parameters into this strategy's config; errors name the field."""
        params = renamed_params(cls.name, params)  # keys renamed in the past (a study file warns when parsed)
        try:
            config = TypeAdapter(cls.config_cls).validate_python(params or {})
            config.check_numbers()
            return config
        except ValueError as exc:
            if not isinstance(exc, ValidationError):
                raise ConfigError(str(exc)) from None
            msgs = []
            for e in exc.errors():
                loc = ".".join(str(p) for p in e["loc"])
                if e["type"] == "unexpected_keyword_argument" or e["type"] == "extra_forbidden":
                    valid = ", ".join(f.name for f in dataclasses.fields(cls.config_cls))
                    msgs.append(f"unknown parameter '{loc}' (valid: {valid})")
                else:
                    msgs.append(f"{loc + ': ' if loc else ''}{clip(e['msg'].removeprefix('Value error, '), 300)}")
            raise ConfigError("; ".join(msgs[:8]) + (f"; … and {len(msgs) - 8} more" if len(msgs) > 8 else "")) from None

    @classmethod
    def weights_kind(cls, params: dict[str, Any]) -> str:
        """What a trial of this strategy changed: ``lora``, ``soft_prompt`` (an adapter), ``full`` (the model's own
        weights), ``head`` (a classification head only) or ``prompt`` (no weights). Default: from ``family``."""
        return "prompt" if cls.family == "prompting" else "full"

    @classmethod
    def key_params(cls, params: dict[str, Any], backend: str) -> dict[str, Any]:
        """The parameters that enter a trial's key on a ``backend`` model: a parameter added after stores were
        written is left out where it changes nothing (its value reproduces the old behaviour, or the backend
        ignores it), so the keys of those stores stay valid exactly when their trials would run the same."""
        return params

    @classmethod
    def expand(cls, config: StrategyConfig) -> list[StrategyConfig]:
        """Configs to run as separate trials: one per prompt template when ``template`` lists several."""
        templates = getattr(config, "template", None)
        if isinstance(templates, list):
            return [dataclasses.replace(config, template=t) for t in templates]
        return [config]

    @classmethod
    def merge_shared(cls, shared: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        """Parameters of one strategy entry with the study-wide ``training`` keys it takes merged under them."""
        known = {f.name for f in dataclasses.fields(cls.config_cls)}
        return {**{k: v for k, v in shared.items() if k in known}, **(params or {})}

    def decode_config(self) -> StrategyConfig:
        """The config holding prompt length and decoding options (a hybrid's prompt part)."""
        return self.config

    def extra_positions(self) -> int:
        """Positions the strategy adds to each input (e.g. soft-prompt virtual tokens)."""
        return 0

    def needs(self, backend) -> tuple[str, ...]:
        """Capabilities this strategy needs from ``backend`` (may depend on the backend's kind)."""
        return self.requires

    def check(self, backend, task_type: str = "classification") -> None:
        """Fail before any work if the backend lacks a capability or the inputs cannot fit the model."""
        backend.require(*self.needs(backend), strategy=self.name)
        if task_type == "generation" and "generate" not in backend.capabilities:
            raise CapabilityError(f"strategy '{self.name}': a generation task needs a backend that generates; the "
                                  f"'{backend.name}' backend does not (use model.backend: causal)")
        limit = getattr(backend, "max_positions", None)
        max_length = getattr(self.config, "max_length", None)
        # plain inputs are truncated to the model's limit by the backend; added positions must still fit
        if limit and max_length and self.extra_positions() and max_length + self.extra_positions() > limit:
            extra = f" + {self.extra_positions()} virtual tokens" if self.extra_positions() else ""
            raise ConfigError(f"strategy '{self.name}': max_length {max_length}{extra} exceeds the model's "
                              f"{limit} positions; lower max_length")

    def preflight(self, backend, task_type: str = "classification") -> None:
        """Everything :meth:`check` does plus checks that cost more (run once per study, before any trial)."""
        self.check(backend, task_type)

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


def load_predictor(directory: str | Path, backend, peers: Mapping[str, Any] | None = None) -> Predictor:
    """Load a saved predictor; ``backend`` must be the model it was adapted from, and ``peers`` (model name ->
    backend) the other models it uses (a cascade's teacher)."""
    directory = Path(directory)
    meta_path = directory / PREDICTOR_FILE
    if not meta_path.is_file():
        raise StoreError(f"{directory}: no saved predictor ({PREDICTOR_FILE} missing)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    cls = registry.get(meta["strategy"])
    predictor_cls = Predictor.kinds.get(meta.get("kind", ""), cls.predictor_cls)
    if predictor_cls.peered:
        return predictor_cls._load_peered(directory, backend, dict(peers or {}), meta["labels"])
    config = cls.config_from_dict(meta["config"])
    return predictor_cls._load(directory, backend, meta["strategy"], config, meta["labels"])
