"""Hybrid: a tuned model plus a prompt, e.g. LoRA trained on the few-shot prompt, then scored with it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import ConfigError
from .base import Predictor, Strategy, StrategyConfig, doc, register, registry
from .causal import CausalPredictor
from .training import TuningStrategy

PROMPTS = ("zero_shot", "few_shot")


def _tuning_names() -> list[str]:
    return [n for n, c in registry.all().items() if issubclass(c, TuningStrategy) and c.lm_objective]


@dataclass
class HybridConfig(StrategyConfig):
    """Hybrid (causal): a tuning strategy trained on a prompting strategy's prompts, then prompted the same way."""

    tune: str = doc("Tuning strategy: lora, full, soft_prompt or gradual_unfreeze.", default="lora")
    prompt: str = doc("Prompting strategy whose template and demonstrations are used: zero_shot or few_shot.",
                      default="few_shot")
    tune_params: dict[str, Any] = doc("Parameters of the tuning strategy (study-wide training keys apply).",
                                      default_factory=dict)
    prompt_params: dict[str, Any] = doc("Parameters of the prompting strategy.", default_factory=dict)

    def __post_init__(self) -> None:
        tunes = _tuning_names()
        if self.tune not in tunes:
            raise ValueError(f"tune must be one of {tunes}, not {self.tune!r}")
        if self.prompt not in PROMPTS:
            raise ValueError(f"prompt must be one of {list(PROMPTS)}, not {self.prompt!r}")
        for part, name, params in (("tune_params", self.tune, self.tune_params),
                                   ("prompt_params", self.prompt, self.prompt_params)):
            try:
                registry.get(name).config_from_dict(params)
            except ConfigError as exc:
                raise ValueError(f"{part}: {exc}") from None

    def parts(self):
        """The validated configs of the tuning and the prompting strategy."""
        prompt_cfg = registry.get(self.prompt).config_from_dict(self.prompt_params)
        tune_params = dict(self.tune_params)
        tune_params.setdefault("max_length", prompt_cfg.max_length)  # demonstrations make prompts long
        for key in ("template", "prompt", "predict"):
            tune_params[key] = getattr(prompt_cfg, key)
        return registry.get(self.tune).config_from_dict(tune_params), prompt_cfg


@register
class Hybrid(Strategy):
    """Train the tuning strategy on the templated input with the prompt's demonstrations; score the same way."""

    name = "hybrid"
    config_cls = HybridConfig
    family = "hybrid"
    requires = ("train", "score")
    backends = ("causal",)
    predictor_cls: ClassVar[type[Predictor]] = CausalPredictor
    config: HybridConfig

    @classmethod
    def weights_kind(cls, params: dict) -> str:
        """What its tuning strategy changed (``tune``: lora by default)."""
        params = params or {}
        try:
            return registry.get(params.get("tune", "lora")).weights_kind(params.get("tune_params") or {})
        except KeyError:
            return "full"

    @classmethod
    def merge_shared(cls, shared, params):
        params = dict(params or {})
        tune = registry.get(params.get("tune", "lora")) if params.get("tune", "lora") in _tuning_names() else None
        if tune is not None and isinstance(params.get("tune_params") or {}, dict):  # else the config names it
            params["tune_params"] = tune.merge_shared(shared, params.get("tune_params") or {})
        return params

    @classmethod
    def key_params(cls, params: dict, backend: str) -> dict:
        """The tuning strategy's key rules apply inside ``tune_params``: a hybrid's LoRA adapts the input
        embeddings too, so its key carries ``embeddings`` as a plain LoRA's does (trials that ran before
        the option trained without it, and rerun)."""
        tune = params.get("tune", "lora")
        if tune not in _tuning_names() or not isinstance(params.get("tune_params"), dict):
            return params
        tune_cls = registry.get(tune)
        full = tune_cls.config_from_dict(params["tune_params"]).to_dict()
        keyed = tune_cls.key_params(full, backend)
        tune_params = {k: v for k, v in params["tune_params"].items() if k != "embeddings"}
        if "embeddings" in keyed:
            tune_params["embeddings"] = keyed["embeddings"]
        return {**params, "tune_params": tune_params}

    @classmethod
    def expand(cls, config: HybridConfig) -> list[HybridConfig]:
        return [config]

    def _parts(self):
        tune_cfg, prompt_cfg = self.config.parts()
        tune = registry.get(self.config.tune)(tune_cfg, seed=self.seed, reporter=self.reporter)
        prompt = registry.get(self.config.prompt)(prompt_cfg, seed=self.seed, reporter=self.reporter)
        return tune, prompt

    def decode_config(self):
        return self.config.parts()[1]

    def build_lm(self, backend):
        return self._parts()[0].build_lm(backend)

    def check(self, backend, task_type: str = "classification") -> None:
        super().check(backend, task_type)
        tune, prompt = self._parts()
        tune.check(backend, task_type)
        prompt.check(backend, task_type)

    def preflight(self, backend, task_type: str = "classification") -> None:
        self.check(backend, task_type)
        tune, _ = self._parts()
        tune.preflight(backend, task_type)

    def adapt(self, backend, task, *, train, dev) -> Predictor:
        self.check(backend, task.type)
        tune, prompt = self._parts()
        builder, retrieval = prompt.build_prompt(backend, task, train)
        return tune.adapt_lm(backend, task, train=train, dev=dev, builder=builder, retrieval=retrieval,
                             name=self.name, config=self.config, decode=prompt.config, mode=prompt.mode())
