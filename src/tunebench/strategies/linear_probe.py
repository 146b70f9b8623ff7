"""Linear probe: the encoder stays frozen, only the classification head trains."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import TrainConfig, doc, register
from .training import TuningStrategy


@dataclass
class LinearProbeConfig(TrainConfig):
    """Linear probe on pooled frozen features (encoder: mean pooling; causal LM: last token)."""

    lr: float = doc("Peak learning rate (AdamW).", default=3e-3)
    epochs: int = doc("Passes over the training data.", default=10)
    dropout: float = doc("Dropout before the head.", default=0.0)
    weight_decay: float = doc("AdamW weight decay.", default=0.0)


@register
class LinearProbe(TuningStrategy):
    name = "linear_probe"
    config_cls = LinearProbeConfig
    family = "weight_tuning"
    lm_objective = False  # on a causal LM: a head on the frozen LM's last-token state

    @classmethod
    def weights_kind(cls, params: dict) -> str:
        return "head"

    def prepare(self, model: nn.Module) -> None:
        model.encoder.requires_grad_(False)
