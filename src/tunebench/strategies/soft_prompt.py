"""Soft prompt (prompt tuning) through PEFT: trained virtual tokens before the input; encoder frozen."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import TrainConfig, doc, register
from .training import TuningStrategy


@dataclass
class SoftPromptConfig(TrainConfig):
    """Prompt tuning (Lester et al. 2021) via ``peft``, plus a trained head."""

    lr: float = doc("Peak learning rate (AdamW).", default=1e-2)
    epochs: int = doc("Passes over the training data.", default=8)
    virtual_tokens: int = doc("Number of trained virtual tokens.", default=20)
    init_text: str = doc("Initialise the virtual tokens from this text ('' = from random vocabulary).", default="")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.virtual_tokens < 1:
            raise ValueError("virtual_tokens must be >= 1")


@register
class SoftPrompt(TuningStrategy):
    name = "soft_prompt"
    config_cls = SoftPromptConfig
    family = "prompt_tuning"
    config: SoftPromptConfig

    @classmethod
    def weights_kind(cls, params: dict) -> str:
        return "soft_prompt"

    def extra_positions(self) -> int:
        return self.config.virtual_tokens

    def _peft_config(self, task_type, name_or_path: str):
        import peft  # heavy (imports transformers): only when a model is prepared

        kwargs = {}
        if self.config.init_text:
            kwargs = {"prompt_tuning_init": peft.PromptTuningInit.TEXT, "prompt_tuning_init_text": self.config.init_text,
                      "tokenizer_name_or_path": name_or_path}
        return peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=self.config.virtual_tokens, **kwargs)

    def prepare(self, model: nn.Module) -> None:
        import peft  # heavy (imports transformers): only when a model is prepared

        cfg = self._peft_config(peft.TaskType.FEATURE_EXTRACTION, model.encoder.config._name_or_path)
        model.encoder = peft.get_peft_model(model.encoder, cfg)

    def prepare_lm(self, lm: nn.Module) -> nn.Module:
        import peft  # heavy (imports transformers): only when a model is prepared

        return peft.get_peft_model(lm, self._peft_config(peft.TaskType.CAUSAL_LM, lm.config._name_or_path))
