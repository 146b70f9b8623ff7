"""Study configuration: YAML in, validated pydantic models out, readable errors with line numbers."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .textfmt import placeholders

DEFAULT_STORE = "tunebench-runs"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LabelSpec(_Strict):
    """One class: the value found in the data files, a readable name and an optional description."""

    value: str
    name: str
    description: str | None = None


class DataFiles(_Strict):
    """Where the examples are. Missing dev/test splits are carved from train (see ``SplitConfig``)."""

    train: str
    dev: str | None = None
    test: str | None = None


class SplitConfig(_Strict):
    """How to carve missing splits out of the train file: fractions, stratified by label, seeded."""

    dev: float = Field(0.1, gt=0, lt=1, description="Fraction of train used as dev when no dev file is given.")
    test: float = Field(0.2, gt=0, lt=1, description="Fraction of train used as test when no test file is given.")
    seed: int = Field(0, description="Seed of the split (independent of the trial seeds).")


class TaskConfig(_Strict):
    """What to do: the task type, the fields and the labels."""

    type: Literal["classification", "generation"] = Field(
        "classification", description="classification: pick one of the labels; generation: write the target text.")
    data: DataFiles
    text: list[str] = Field(description="Text field, or a list of fields joined by text_template.")
    text_template: str | None = Field(None, description="How several text fields are joined, e.g. '{title}: {body}'.")
    label: str | None = Field(None, description="Label field (classification).")
    target: str | None = Field(None, description="Expected output field (generation).")
    labels: list[LabelSpec] | None = Field(None, description="Label values, names and descriptions (default: from train).")
    instruction: str | None = Field(None, description="What the task is, in words; prompt templates show it to causal models.")
    split: SplitConfig = Field(default_factory=SplitConfig)
    drop_leakage: bool = Field(False, description="Drop train rows whose text also appears in dev or test.")
    format: Literal["csv", "tsv", "jsonl", "json", "parquet"] | None = Field(
        None, description="File format (default: from the file extension)."
    )

    @field_validator("data", mode="before")
    @classmethod
    def _one_file(cls, v: Any) -> Any:
        return {"train": v} if isinstance(v, str) else v

    @field_validator("text", mode="before")
    @classmethod
    def _text_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, v: Any) -> Any:
        if v is None:
            return None
        items = list(v.items()) if isinstance(v, dict) else [(None, x) for x in v]
        out = []
        for value, spec in items:
            if isinstance(spec, dict):
                spec = dict(spec)
                if value is None:  # the stored (dumped) form lists {value, name, description}
                    value = spec.pop("value", None)
                name = spec.pop("name", None)
                desc = spec.pop("description", None)
                if spec:
                    raise ValueError(f"unknown key(s) {sorted(spec)} in a label; use 'name' and 'description'")
                if name is None:
                    name = value
            else:
                name, desc = spec, None
            if name is None:
                raise ValueError("each label needs a name")
            out.append({"value": str(name if value is None else value), "name": str(name), "description": desc})
        return out

    @model_validator(mode="after")
    def _check(self) -> TaskConfig:
        if self.type == "classification" and not self.label:
            raise ValueError("a classification task needs 'label': the field that holds each example's class")
        if self.type == "generation":
            if not self.target:
                raise ValueError("a generation task needs 'target': the field that holds the expected output")
            if self.label or self.labels:
                raise ValueError("a generation task has a 'target' field, not 'label'/'labels'")
        if not self.text:
            raise ValueError("'text' needs at least one field name")
        if len(self.text) > 1 or self.text_template:
            template = self.text_template or "\n".join("{%s}" % f for f in self.text)
            missing = [p for p in placeholders(template) if p not in self.text]
            if missing:
                raise ValueError(f"text_template uses {missing}, which are not in 'text' {self.text}")
            self.text_template = template
        if self.labels is not None:
            names = [lab.name for lab in self.labels]
            if len(set(names)) != len(names):
                raise ValueError(f"label names must be unique, got {names}")
        return self


class ModelConfig(_Strict):
    """Which model, and how it is reached."""

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.\-]+$",
                             description="Short name (with several models: trial labels end in @name).")
    backend: Literal["encoder", "causal", "openai"] = Field(
        "encoder", description="encoder: HF encoder (embeddings, heads); causal: HF causal LM (prompts, generation); "
        "openai: any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp, tunebench serve), prompting only.")
    path: str = Field("default", description="Local directory or hub id; 'default' is the embedded all-MiniLM-L6-v2.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast where the hardware supports it, fp32 otherwise."
    )
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu or cuda[:N].")
    chat_template: Literal["auto", "on", "off"] = Field(
        "auto", description="causal: wrap prompts in the tokenizer's chat template (auto: when it has one).")
    system_prompt: str | None = Field(None, description="causal: system message when a chat template is used.")
    retriever: str = Field("default", description="Encoder used to retrieve few-shot demonstrations for causal "
                           "models (local dir or hub id; 'default' is all-MiniLM-L6-v2).")
    base_url: str | None = Field(None, pattern=r"^https?://", description="openai: the endpoint's base URL, e.g. "
                                 "https://api.openai.com/v1 or http://127.0.0.1:8000/v1.")
    model: str | None = Field(None, description="openai: the model id the endpoint serves (its `model` field).")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="openai: environment variable holding the API key "
                                    "(null: the endpoint needs none).")
    api: Literal["chat", "completions"] = Field(
        "chat", description="openai: chat (/chat/completions: messages) or completions (/completions: raw prompt; "
        "also label log-probabilities via echo, where the endpoint supports it).")
    max_concurrency: int = Field(8, ge=1, le=256, description="openai: most requests in flight at once.")
    timeout_s: float = Field(60.0, gt=0, description="openai: seconds before a request is abandoned (and retried).")
    max_retries: int = Field(5, ge=0, le=20, description="openai: retries, with exponential backoff, on 429, 5xx, "
                             "timeouts and dropped connections.")
    tuned: str | None = Field(None, description="openai: the endpoint serves a model tuned elsewhere (e.g. a "
                              "tunebench trial id or an ft: model); prompting on it counts as a hybrid.")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.backend == "causal" and self.path == "default":
            raise ValueError("the causal backend needs 'path': a local model directory or a hub id "
                             "(the embedded default is an encoder)")
        if self.backend == "openai" and (not self.base_url or not self.model):
            raise ValueError("the openai backend needs 'base_url' (e.g. http://127.0.0.1:8000/v1) and 'model' "
                             "(the id the endpoint serves)")
        remote = [k for k in _REMOTE_KEYS if k != "api_key_env" and getattr(self, k) != type(self).model_fields[k].default]
        if self.backend != "openai" and remote:
            raise ValueError(f"{', '.join(remote)}: only for backend: openai")
        return self

    def identity(self) -> dict[str, Any]:
        """What identifies the model in trial keys (the remote keys only when remote, so older keys stay valid)."""
        d = self.model_dump(exclude={"name"})
        if self.backend != "openai":
            for k in _REMOTE_KEYS:
                d.pop(k, None)
        else:  # how it is reached (concurrency, timeouts, retries, key variable) does not change results
            for k in ("max_concurrency", "timeout_s", "max_retries", "api_key_env", "path"):
                d.pop(k, None)
        return d


_REMOTE_KEYS = ("base_url", "model", "api_key_env", "api", "max_concurrency", "timeout_s", "max_retries", "tuned")


SEARCH_KEYS = ("trials", "seconds", "metric", "pruning", "startup")
SEARCH_METRICS = {"classification": ("accuracy", "macro_f1"),
                  "generation": ("exact_match", "token_f1", "rouge_l", "bleu", "chrf")}


class SearchConfig(_Strict):
    """A hyperparameter search over one strategy's parameters (Optuna TPE, median pruning on dev per epoch).

    In the YAML every key other than the budget and options below is a parameter of the strategy: a list is a
    set of choices, ``{low, high, log, step}`` a range (integers when ``low`` and ``high`` are integers).
    """

    trials: int = Field(10, ge=1, description="Configurations tried (the budget; also bounded by seconds).")
    seconds: float | None = Field(None, gt=0, description="Wall-clock budget of the search in seconds.")
    metric: str | None = Field(None, description="Dev metric maximised (default: accuracy for classification, "
                               "token_f1 for generation).")
    pruning: Literal["median", "none"] = Field("median", description="median: stop a configuration whose dev "
                                               "score after an epoch is below the median of earlier ones.")
    startup: int = Field(3, ge=0, description="Configurations run in full before pruning starts.")
    space: dict[str, Any] = Field(description="Searched parameters: a list of choices or {low, high, log, step}.")

    @model_validator(mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            raise ValueError("give a mapping of parameters to search, e.g. {lr: {low: 1.0e-5, high: 5.0e-4, log: true}, "
                             "r: [4, 8, 16], trials: 12}")
        if isinstance(v.get("space"), dict):  # the stored (dumped) form
            return v
        out = {k: v[k] for k in SEARCH_KEYS if k in v}
        out["space"] = {k: x for k, x in v.items() if k not in SEARCH_KEYS}
        return out

    @field_validator("space")
    @classmethod
    def _nonempty(cls, v: dict) -> dict:
        if not v:
            raise ValueError("name at least one parameter to search, e.g. lr: {low: 1.0e-5, high: 5.0e-4, log: true}")
        return v

    def names(self) -> list[str]:
        return list(self.space)

    def check(self, strategy_cls, base: dict[str, Any], where: str, task_type: str) -> None:
        """Raise :class:`ConfigError` naming ``<where>.search.<key>`` for unknown parameters, bad ranges, or values
        the strategy rejects (every choice and both ends of every range are validated as its config)."""
        valid = [f.name for f in dataclasses.fields(strategy_cls.config_cls)]
        hints = typing.get_type_hints(strategy_cls.config_cls)
        metrics = SEARCH_METRICS[task_type]
        if self.metric is not None and self.metric not in metrics:
            raise ConfigError(f"{where}.search.metric: '{self.metric}' is not a {task_type} metric "
                              f"(use {', '.join(metrics)})")
        for key, spec in self.space.items():
            at = f"{where}.search.{key}"
            if key not in valid:
                raise ConfigError(f"{at}: unknown parameter '{key}' (valid: {', '.join(valid)}; search options: "
                                  f"{', '.join(SEARCH_KEYS)})")
            if isinstance(spec, list):
                if not spec:
                    raise ConfigError(f"{at}: give at least one choice")
                values = spec
            elif isinstance(spec, dict):
                values = _check_range(spec, at)
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


def _check_range(spec: dict, at: str) -> list:
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


class StrategyEntry(_Strict):
    """One rung of the ladder: a registered strategy name, its parameters and (optionally) the models it runs on."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    models: list[str] | None = Field(None, description="Names of the study's models to run on (default: every "
                                     "model whose backend the strategy supports).")
    search: SearchConfig | None = Field(None, description="Hyperparameter search over this strategy's parameters; "
                                        "the best configuration is refit and scored once on test.")


PERTURBATION_KINDS = ("case", "punctuation", "whitespace", "typo", "synonym")


class ConsistencyConfig(_Strict):
    """How stable each trial's predictions are: under meaning-preserving edits and across samples."""

    perturbations: list[Literal["case", "punctuation", "whitespace", "typo", "synonym"]] = Field(
        default_factory=lambda: list(PERTURBATION_KINDS),
        description="Edits applied to test inputs; the label-flip rate is measured for each ([] turns this off).")
    max_items: int = Field(200, ge=1, description="Test items perturbed (the first N; bounds the extra inference).")
    samples: int = Field(5, ge=2, description="Samples per input for sampled generation (temperature > 0).")


class ApiPrice(_Strict):
    """What a hosted model costs per million tokens."""

    input_per_1m: float = Field(ge=0, description="Price per 1M prompt (input) tokens.")
    output_per_1m: float = Field(0.0, ge=0, description="Price per 1M completion (output) tokens.")


class CostConfig(_Strict):
    """The price table: how training and serving are paid for, and how much traffic is expected."""

    train_per_hour: float = Field(1.0, ge=0, description="Hourly cost of the hardware that trains (self-hosted).")
    serve_per_hour: float = Field(1.0, ge=0, description="Hourly cost of the hardware that serves (self-hosted).")
    concurrency: int = Field(1, ge=1, description="Requests one serving machine handles at once at the measured "
                             "latency (self-hosted cost per request = latency x hourly rate / concurrency).")
    volume_per_day: float = Field(10000, ge=0, description="Expected requests per day.")
    horizon_days: float = Field(90, gt=0, description="Days over which total cost is counted.")
    api: dict[str, ApiPrice] = Field(default_factory=dict, description="Per model name: token prices of a hosted "
                                     "API; those models are priced by tokens instead of serving time.")
    currency: str = Field("$", max_length=4, description="Shown before amounts.")


class StudyConfig(_Strict):
    """A study: a task, a model, the strategies to compare, seeds and train sizes."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    task: TaskConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    models: list[ModelConfig] | None = Field(None, description="Several models compared in one study (instead of model).")
    strategies: list[StrategyEntry]
    training: dict[str, Any] = Field(default_factory=dict, description="Hyperparameters shared by every strategy.")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    train_sizes: list[Union[int, Literal["all"]]] = Field(default_factory=lambda: ["all"], min_length=1)
    store: str = Field(DEFAULT_STORE, description="Directory of the results store.")
    consistency: ConsistencyConfig = Field(default_factory=ConsistencyConfig)
    costs: CostConfig = Field(default_factory=CostConfig)
    cv: int | None = Field(None, ge=2, description="k-fold cross-validation over train + dev (stratified): each "
                           "trial also reports mean ± std over k folds; test is still scored once per final model.")

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, v: Any) -> Any:
        return {"path": v} if isinstance(v, str) else v

    @field_validator("strategies", mode="before")
    @classmethod
    def _strategies(cls, v: Any) -> Any:
        if not isinstance(v, list) or not v:
            raise ValueError("give a non-empty list such as [zero_shot: {}, lora: {r: 8}]")
        out = []
        for item in v:
            if isinstance(item, str):
                out.append({"name": item, "params": {}})
            elif isinstance(item, dict) and len(item) == 1:
                (name, params), = item.items()
                params = dict(params or {}) if isinstance(params, dict) else params
                models = params.pop("models", None) if isinstance(params, dict) else None
                search = params.pop("search", None) if isinstance(params, dict) else None
                if isinstance(models, str):
                    models = [models]
                out.append({"name": name, "params": params if params is not None else {}, "models": models,
                            "search": search})
            else:
                out.append(item)
        return out

    @field_validator("train_sizes")
    @classmethod
    def _sizes(cls, v: list) -> list:
        if any(isinstance(s, int) and s < 1 for s in v):
            raise ValueError("train sizes must be positive integers or 'all'")
        return v

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, v: Any) -> Any:
        if v is None:
            return None
        if not isinstance(v, list) or not v:
            raise ValueError("give a non-empty list of models")
        return [{"path": m} if isinstance(m, str) else m for m in v]

    @model_validator(mode="after")
    def _check_models(self) -> StudyConfig:
        if self.models is not None and "model" in self.model_fields_set:
            raise ValueError("give either 'model' or 'models', not both")
        names = [m.name for m in self.all_models()]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique; got {names} (set 'name' on each model)")
        for i, entry in enumerate(self.strategies):
            unknown = [m for m in entry.models or [] if m not in names]
            if unknown:
                raise ValueError(f"strategies[{i}] ({entry.name}): unknown model(s) {unknown}; the study's models "
                                 f"are {names}")
        unpriced = sorted(set(self.costs.api) - set(names))
        if unpriced:
            raise ValueError(f"costs.api: no model named {unpriced} in this study (its models are {names})")
        searched = [f"strategies[{i}] ({e.name})" for i, e in enumerate(self.strategies) if e.search is not None]
        if self.cv is not None and searched:
            raise ValueError(f"cv with a search ({', '.join(searched)}) would need nested cross-validation, which "
                             "tunebench does not run; drop cv or the search")
        return self

    def all_models(self) -> list[ModelConfig]:
        """The study's models, each with a name (default: from its path, or its backend)."""
        models = self.models if self.models is not None else [self.model]
        out = []
        for m in models:
            if m.name is None:
                if m.backend == "openai":
                    default = re.sub(r"[^A-Za-z0-9_.\-]+", "-", m.model or "openai").strip("-") or "openai"
                else:
                    default = "default" if m.path == "default" else Path(m.path.rstrip("/")).name or m.backend
                m = m.model_copy(update={"name": default})
            out.append(m)
        return out

    def store_path(self, base_dir: str | Path = ".") -> Path:
        """The results directory: a ``store`` written in the study is relative to the study file, the default
        (``./tunebench-runs``) to the current directory."""
        path = Path(self.store).expanduser()
        if "store" in self.model_fields_set and not path.is_absolute():
            return Path(base_dir) / path
        return path

    def shared_params(self, strategy_cls) -> dict[str, Any]:
        """The study-wide ``training`` keys that this strategy takes (its defaults in this study)."""
        return strategy_cls.merge_shared(self.training, {})

    def resolved_strategies(self) -> list[tuple[str, Any]]:
        """Each strategy entry as ``(name, <Name>Config)``, study-wide ``training`` merged under its params."""
        return [(name, cfg) for name, cfg, _ in self.resolved_entries()]

    def resolved_entries(self) -> list[tuple[str, Any, list[str] | None]]:
        """Each strategy entry as ``(name, <Name>Config, model names or None for all)``."""
        from .strategies import registry

        out = []
        for i, entry in enumerate(self.strategies):
            try:
                cls = registry.get(entry.name)
            except KeyError as exc:
                raise ConfigError(f"strategies[{i}]: {exc.args[0]}") from None
            unknown_shared = sorted(set(self.training) - _all_config_keys())
            if unknown_shared:
                raise ConfigError(f"training: unknown key(s) {unknown_shared}")
            merged = cls.merge_shared(self.training, entry.params)
            try:
                merged = _one_template_source(merged, entry.params, f"strategies[{i}].{entry.name}")
                config = cls.config_from_dict(merged)
            except ConfigError as exc:
                raise ConfigError(f"strategies[{i}].{entry.name}: {exc}") from None
            if entry.search is not None:
                entry.search.check(cls, merged, f"strategies[{i}].{entry.name}", self.task.type)
            kinds = {m.name: m.backend for m in self.all_models()}
            wrong = [m for m in entry.models or [] if kinds[m] not in cls.backends]
            if wrong:
                raise ConfigError(f"strategies[{i}].{entry.name}: runs on {' or '.join(cls.backends)} models, not on "
                                  f"{wrong} ({', '.join(kinds[m] for m in wrong)})")
            out.append((entry.name, config, entry.models))
        return out


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
    from .strategies import registry

    return {f.name for cls in registry.all().values() for f in dataclasses.fields(cls.config_cls)}


def _yaml_line(node: yaml.Node | None, loc: tuple) -> int | None:
    """Line (1-based) of the YAML node at pydantic location ``loc``, as deep as it can be followed."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if k.value == str(key)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            nxt = node.value[key]
        else:
            nxt = None
        if nxt is None:
            break
        node, line = nxt, nxt.start_mark.line + 1
    return line


def load_study(path: str | Path) -> tuple[StudyConfig, Path]:
    """Read and validate a study YAML; returns the config and the directory paths are relative to.

    Example:
        >>> cfg, base = load_study("study.yaml")  # doctest: +SKIP
        >>> cfg.name
        'sst2-ladder'
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: study file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 (byte {exc.start}); save the file as UTF-8") from None
    try:
        raw = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a study is a YAML mapping with name, task, model and strategies")
    _read_template_files(raw, path, root)
    cfg = parse_study(raw, source=str(path), root=root)
    try:
        cfg.resolved_strategies()
    except ConfigError as exc:
        msg = str(exc)
        idx = msg.split("]")[0].split("[")[-1] if msg.startswith("strategies[") else None
        line = _yaml_line(root, ("strategies", int(idx))) if idx and idx.isdigit() else None
        raise ConfigError(f"{path}{f' line {line}' if line else ''}: {msg}") from None
    return cfg, path.resolve().parent


def _read_template_files(raw: dict, path: Path, root: yaml.Node | None) -> None:
    """Replace each ``template_file: path`` (or a list of paths) by ``template:`` with the files' text.

    Paths are relative to the study file. The template text, not the file name, keys the trials.
    """
    def load(params: dict, loc: tuple) -> None:
        if not isinstance(params, dict) or "template_file" not in params:
            for key in ("tune_params", "prompt_params"):  # hybrids nest a strategy's parameters
                if isinstance(params, dict) and isinstance(params.get(key), dict):
                    load(params[key], loc + (key,))
            return
        line = _yaml_line(root, loc + ("template_file",)) if root is not None else None
        where = f"{path}{f' line {line}' if line else ''}"
        if "template" in params:
            raise ConfigError(f"{where}: give either template or template_file, not both")
        files = params.pop("template_file")
        texts = []
        for f in files if isinstance(files, list) else [files]:
            file = Path(f) if Path(str(f)).is_absolute() else path.parent / str(f)
            try:
                texts.append(file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{where}: template_file {file}: cannot read it ({exc.__class__.__name__}: "
                                  f"{exc}); the path is relative to the study file") from None
        params["template"] = texts if isinstance(files, list) else texts[0]

    if isinstance(raw.get("training"), dict):
        load(raw["training"], ("training",))
    for i, item in enumerate(raw.get("strategies") or []):
        if isinstance(item, dict) and len(item) == 1 and "name" not in item:
            (name, params), = item.items()
            load(params, ("strategies", i, name))
        elif isinstance(item, dict):
            load(item.get("params"), ("strategies", i, "params"))


def parse_study(raw: dict, *, source: str = "<study>", root: yaml.Node | None = None) -> StudyConfig:
    """Validate a study given as a dict (the Python API's entry point)."""
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            field = ".".join(str(p) for p in loc) or "(top level)"
            line = _yaml_line(root, loc) if root is not None else None
            where = f"{source} line {line}" if line else source
            lines.append(f"{where}: {field}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
