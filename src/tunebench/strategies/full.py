"""Full fine-tuning: every weight of the encoder and the head trains."""

from __future__ import annotations

from dataclasses import dataclass

from .base import TrainConfig, doc, register
from .training import TuningStrategy


@dataclass
class FullConfig(TrainConfig):
    """Full fine-tuning."""

    lr: float = doc("Peak learning rate (AdamW).", default=1e-4)


@register
class Full(TuningStrategy):
    name = "full"
    config_cls = FullConfig
    family = "weight_tuning"

    @classmethod
    def weights_kind(cls, params: dict) -> str:
        return "full"
