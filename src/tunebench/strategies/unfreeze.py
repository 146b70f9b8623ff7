"""Gradual unfreezing (Howard & Ruder 2018): head first, then one more top layer per epoch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

from .base import TrainConfig, doc, register
from .training import TuningStrategy


def encoder_units(encoder: nn.Module) -> list[nn.Module]:
    """The encoder's blocks from the top down, the embeddings last."""
    layers = None
    for module in encoder.modules():
        if isinstance(module, nn.ModuleList) and len(module) == encoder.config.num_hidden_layers:
            layers = list(module)
            break
    if layers is None:
        raise ValueError("could not find the encoder's layer list")
    units = layers[::-1]
    emb = encoder.get_input_embeddings()
    parent = next((m for m in encoder.modules() if any(c is emb for c in m.children())), None)
    units.append(parent if parent is not None else emb)
    return units


@dataclass
class GradualUnfreezeConfig(TrainConfig):
    """Gradual unfreezing with optional discriminative learning rates."""

    lr: float = doc("Peak learning rate of the head and top layer (AdamW).", default=1e-4)
    epochs: int = doc("Passes over the training data.", default=6)
    schedule: Optional[list[int]] = doc(
        "Encoder blocks (from the top, embeddings last) trainable in each epoch, e.g. [0, 1, 2, 4, 7]; "
        "default: 0, 1, 2, ... one more per epoch.", default=None)
    layer_lr_decay: float = doc("Discriminative LR: each block down gets lr x this factor (1.0 = off).",
                                default=1.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.schedule is not None and (any(s < 0 for s in self.schedule) or not self.schedule):
            raise ValueError("schedule: a non-empty list of block counts >= 0")
        if not 0 < self.layer_lr_decay <= 1:
            raise ValueError("layer_lr_decay must be in (0, 1]")


@register
class GradualUnfreeze(TuningStrategy):
    name = "gradual_unfreeze"
    config_cls = GradualUnfreezeConfig
    family = "weight_tuning"
    config: GradualUnfreezeConfig

    def prepare(self, model: nn.Module) -> None:
        model.encoder.requires_grad_(False)

    def param_groups(self, model: nn.Module) -> list[dict]:
        groups = [{"params": [(f"head.{n}", p) for n, p in model.head.named_parameters()], "lr": self.config.lr}]
        names = {id(p): n for n, p in model.named_parameters()}
        for depth, unit in enumerate(encoder_units(model.encoder)):
            lr = self.config.lr * self.config.layer_lr_decay ** depth
            groups.append({"params": [(names[id(p)], p) for p in unit.parameters()], "lr": lr})
        return groups

    def schedule(self, model: nn.Module) -> Callable[[int], None]:
        units = encoder_units(model.encoder)
        plan = self.config.schedule

        def apply(epoch: int) -> None:
            n = plan[min(epoch, len(plan) - 1)] if plan else epoch
            for depth, unit in enumerate(units):
                unit.requires_grad_(depth < n)

        return apply
