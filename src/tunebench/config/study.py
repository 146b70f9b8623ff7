"""The study: a task, models, the strategies to compare, seeds, train sizes, consistency and costs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from ..errors import ConfigError
from .base import INT_MAX, SEED_MAX, _Strict
from .costs import CostConfig
from .execution import ExecutionConfig
from .files import clip, path_field
from .judge import JudgeConfig, MetricEntry, metric_entries
from .renames import renamed_params
from .models import AnyModelConfig, EncoderModel, ModelConfig
from .pairs import checked_pairs
from .search import SearchConfig
from .task import TaskConfig
from .tracking import TrackingConfig

DEFAULT_STORE = "tunebench-runs"


class StrategyEntry(_Strict):
    """One rung of the ladder: a registered strategy name, its parameters and (optionally) the models it runs on."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    models: list[str] | None = Field(None, description="Names of the study's models to run on (default: every "
                                     "model whose backend the strategy supports).")
    search: SearchConfig | None = Field(None, description="Hyperparameter search over this strategy's parameters; "
                                        "the best configuration is refit and scored once on test.")


PERTURBATION_KINDS = ("case", "punctuation", "whitespace", "typo", "synonym")


class CounterfactualConfig(_Strict):
    """Counterfactual checks: terms swapped that should not change the answer. Per kind, over the first
    ``max_items`` test items the swap changes: the flip rate, accuracy before and after, McNemar's exact test."""

    names: bool = Field(False, description="Swap English first names from the shipped lists: with a name of "
                        "another gender from the same region (names_gender) and of the same gender from another "
                        "region (names_region).")
    pronouns: bool = Field(False, description="Swap English gendered pronouns: he/she, him/her, his/her, his/hers, "
                           "himself/herself (case kept: He -> She).")
    pairs_file: str | None = Field(None, description="Your own pairs: a CSV file with the columns original and "
                                   "replacement, swapped both ways, whole words, any case (relative to the study "
                                   "file).")
    pairs: list[tuple[str, str]] = Field(default_factory=list, description="Your own pairs written in the study "
                                         "([[original, replacement], ...]); filled from pairs_file when the study "
                                         "is read.")

    @field_validator("pairs_file")
    @classmethod
    def _pairs_file(cls, v: str | None) -> str | None:
        return path_field(v)  # type: ignore[return-value]

    @field_validator("pairs")
    @classmethod
    def _pairs(cls, v: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return checked_pairs((f"pairs[{i}]", a, b) for i, (a, b) in enumerate(v))

    @model_validator(mode="after")
    def _read(self) -> CounterfactualConfig:
        if self.pairs_file is not None and not self.pairs:
            raise ValueError("pairs_file is read when the study is read (load_study, parse_study); this config was "
                             "built without reading it")
        return self

    def kinds(self) -> list[str]:
        """The swaps asked for, in the order they are measured and reported."""
        return ((["names_gender", "names_region"] if self.names else []) + (["pronouns"] if self.pronouns else [])
                + (["pairs"] if self.pairs else []))


class ConsistencyConfig(_Strict):
    """How stable each trial's predictions are: under meaning-preserving edits, counterfactual swaps and across
    samples."""

    perturbations: list[Literal["case", "punctuation", "whitespace", "typo", "synonym"]] = Field(
        default_factory=lambda: list(PERTURBATION_KINDS),
        description="Edits applied to test inputs; the label-flip rate is measured for each ([] turns this off).")
    max_items: int = Field(200, ge=1, le=1_000_000, description="Test items perturbed (the first N; bounds the extra inference).")
    samples: int = Field(5, ge=2, le=1000, description="Samples per input for sampled generation (temperature > 0).")
    counterfactual: CounterfactualConfig = Field(
        default_factory=CounterfactualConfig, description="Swaps that should not change the answer: names: true, "
        "pronouns: true, pairs_file: swaps.csv (off by default).")


class StudyConfig(_Strict):
    """A study: a task, a model, the strategies to compare, seeds and train sizes."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$", max_length=128)
    task: TaskConfig
    model: AnyModelConfig = Field(default_factory=EncoderModel)
    models: list[AnyModelConfig] | None = Field(None, description="Several models compared in one study (instead of model).")
    strategies: list[StrategyEntry]
    training: dict[str, Any] = Field(default_factory=dict, description="Hyperparameters shared by every strategy.")
    tuning_defaults: Literal["scaled", "fixed"] = Field(
        "scaled", description="scaled: tuning strategies' unset learning rate, epochs, batch size and early stopping "
        "follow each trial's training-set size and number of classes (calibrated on SST-2 and BANKING77, "
        "docs/architecture.md); fixed: the strategies' fixed defaults (what stores written before scaled defaults ran: their trial keys).")
    seeds: list[Annotated[int, Field(ge=0, le=SEED_MAX)]] = Field(
        default_factory=lambda: [0], min_length=1, max_length=1000, description="Trial seeds (0 … 2^32 - 1).")
    train_sizes: list[Union[Annotated[int, Field(ge=1, le=INT_MAX)], Literal["all"]]] = Field(
        default_factory=lambda: ["all"], min_length=1, max_length=1000)
    store: str = Field(DEFAULT_STORE, description="The results store: a directory (SQLite and artifacts) or "
                       "postgresql://user@host:5432/db for a store a team shares.")
    artifacts: str | None = Field(None, description="Where trial artifacts go: a directory every worker and reader "
                                  "shares, or an fsspec URL (s3://bucket/prefix). Default: STORE/artifacts; a "
                                  "PostgreSQL store needs one (it remembers the first it is given).")
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    consistency: ConsistencyConfig = Field(default_factory=ConsistencyConfig)
    costs: CostConfig = Field(default_factory=CostConfig)
    cv: int | None = Field(None, ge=2, le=100, description="k-fold cross-validation over train + dev (stratified): each "
                           "trial also reports mean ± std over k folds; test is still scored once per final model.")
    metrics: list[MetricEntry] = Field(
        default_factory=list, max_length=1, description="Quality measures besides the metric table: an LLM judge of "
        "generated text, - judge: {model: grader, rubric: NAME@VERSION, criteria: [correct, tone], scale: 1-5, "
        "repeats: 3} (one judge per study).")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="Experiment tracking besides the "
                                     "results store: mlflow: {uri: ./mlruns | http://HOST:5000, experiment: NAME} "
                                     "makes each finished trial an MLflow run.")

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
        for i, item in enumerate(v):
            if isinstance(item, str):
                out.append({"name": item, "params": {}})
            elif isinstance(item, dict) and len(item) == 1:
                (name, params), = item.items()
                params = dict(params or {}) if isinstance(params, dict) else params
                if isinstance(name, str):
                    try:
                        params = renamed_params(name, params, f"strategies[{i}].{name}")
                    except ConfigError as exc:
                        raise ValueError(str(exc)) from None
                models = params.pop("models", None) if isinstance(params, dict) else None
                search = params.pop("search", None) if isinstance(params, dict) else None
                if isinstance(models, str):
                    models = [models]
                out.append({"name": name, "params": params if params is not None else {}, "models": models,
                            "search": search})
            else:
                out.append(item)
        return out

    @field_validator("metrics", mode="before")
    @classmethod
    def _metrics(cls, v: Any) -> Any:
        return metric_entries(v)

    @field_validator("train_sizes", mode="before")
    @classmethod
    def _sizes(cls, v: Any) -> Any:
        for s in v if isinstance(v, list) else []:
            if s != "all" and not (isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= INT_MAX):
                raise ValueError(f"train sizes are whole numbers from 1 to {INT_MAX:,} or 'all'; got {clip(s, 40)}")
        return v

    @field_validator("store", "artifacts")
    @classmethod
    def _location(cls, v: str | None) -> str | None:
        return v if v is None or "://" in v else path_field(v)  # type: ignore[return-value]

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, v: Any) -> Any:
        if v is None:
            return None
        if not isinstance(v, list) or not v:
            raise ValueError("give a non-empty list of models")
        return [{"path": m} if isinstance(m, str) else m for m in v]

    @classmethod
    def from_stored(cls, doc: dict) -> StudyConfig:
        """A study config as a store saved it (``model_dump()``): the dump carries ``model`` (its default) beside
        ``models``, which a written config may not; the default is dropped before validating."""
        if doc.get("models") is not None:
            doc = {k: v for k, v in doc.items() if k != "model"}
        return cls.model_validate(doc)

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
        self._check_judge(names)
        return self

    def _check_judge(self, names: list[str]) -> None:
        judge = self.judge
        if judge is None:
            if self.task.human_score:
                raise ValueError("task.human_score: human ratings are compared with a judge's scores, and this "
                                 "study has none; add metrics: [{judge: {model: NAME, ...}}] or drop human_score")
            return
        if self.task.type != "generation":
            raise ValueError("metrics[0].judge: a judge scores generated text; this task is classification (its "
                             "labels are scored exactly)")
        models = {m.name: m for m in self.all_models()}
        if judge.model not in models:
            raise ValueError(f"metrics[0].judge.model: no model named {clip(judge.model, 60)!r}; the study's models are "
                             f"{names} (declare the judge under models: with a name)")
        if models[judge.model].backend == "encoder":
            raise ValueError(f"metrics[0].judge.model: {judge.model!r} is an encoder, which cannot write an answer; "
                             "a judge is a causal or openai model")

    @property
    def judge(self) -> JudgeConfig | None:
        """The study's judge (``metrics: - judge: ...``), if it has one."""
        return self.metrics[0].judge if self.metrics else None

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

    def store_path(self, base_dir: str | Path = ".") -> Path | str:
        """The results store: a ``store`` written in the study is relative to the study file, the default
        (``./tunebench-runs``) to the current directory; a database URL is returned as it is."""
        if "://" in self.store:
            return self.store
        path = Path(self.store).expanduser()
        if "store" in self.model_fields_set and not path.is_absolute():
            return Path(base_dir) / path
        return path

    def artifacts_path(self, base_dir: str | Path = ".") -> str | None:
        """``artifacts`` with a relative directory made relative to the study file (URLs as they are)."""
        if self.artifacts is None or "://" in self.artifacts:
            return self.artifacts
        path = Path(self.artifacts).expanduser()
        return str(path if path.is_absolute() else Path(base_dir) / path)
