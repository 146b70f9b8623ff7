"""LoRA through PEFT: low-rank updates on the encoder's linear layers; the head trains fully."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from torch import nn

from .base import TrainConfig, doc, register
from .training import TuningStrategy


@dataclass
class LoraConfig(TrainConfig):
    """LoRA (Hu et al. 2021) via ``peft``."""

    lr: float = doc("Peak learning rate (AdamW).", default=1e-3)
    r: int = doc("Rank of the update matrices.", default=8)
    alpha: float = doc("Scaling numerator (update scaled by alpha / r).", default=16)
    lora_dropout: float = doc("Dropout on the LoRA branch.", default=0.1)
    target_modules: Union[list[str], str] = doc(
        "Module names (suffixes) to adapt, or 'all-linear'.", default="all-linear")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError("need r >= 1, alpha > 0 and 0 <= lora_dropout < 1")


@register
class Lora(TuningStrategy):
    name = "lora"
    config_cls = LoraConfig
    family = "weight_tuning"
    config: LoraConfig

    @classmethod
    def weights_kind(cls, params: dict) -> str:
        return "lora"

    def _peft_config(self, **kw):
        import peft  # heavy (imports transformers): only when a model is prepared

        return peft.LoraConfig(r=self.config.r, lora_alpha=self.config.alpha, lora_dropout=self.config.lora_dropout,
                               target_modules=self.config.target_modules, bias="none", **kw)

    def prepare(self, model: nn.Module) -> None:
        import peft  # heavy (imports transformers): only when a model is prepared

        model.encoder = peft.get_peft_model(model.encoder, self._peft_config())

    def prepare_lm(self, lm: nn.Module) -> nn.Module:
        import peft  # heavy (imports transformers): only when a model is prepared

        # 'all-linear' on a causal LM adapts every linear layer except the output head
        return peft.get_peft_model(lm, self._peft_config(task_type=peft.TaskType.CAUSAL_LM))
