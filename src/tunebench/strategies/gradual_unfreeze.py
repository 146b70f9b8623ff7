"""Gradual unfreezing (Howard & Ruder 2018): head first, then one more top layer per epoch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from .base import TrainConfig, doc, register
from .training import TuningStrategy


def encoder_units(encoder: nn.Module) -> list[nn.Module]:
    """The encoder's (or causal LM's) blocks from the top down, the embeddings last."""
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
    if parent is None or any(layers[0] is m for m in parent.modules()):
        # the embeddings sit beside the blocks (Llama, GPT-2): the unit is the embedding tables themselves
        parent = nn.ModuleList([m for m in (parent.children() if parent is not None else [emb])
                                if isinstance(m, nn.Embedding)] or [emb])
    units.append(parent)
    return units


def lm_top_extras(lm: nn.Module) -> list[nn.Module]:
    """The final norm and, when not tied to the input embeddings, the output head of a causal LM."""
    extras = []
    base = lm.base_model
    for name in ("norm", "ln_f", "final_layer_norm"):
        if isinstance(getattr(base, name, None), nn.Module):
            extras.append(getattr(base, name))
            break
    head = lm.get_output_embeddings()
    if head is not None and head.weight is not lm.get_input_embeddings().weight:
        extras.append(head)
    return extras


@dataclass
class GradualUnfreezeConfig(TrainConfig):
    """Gradual unfreezing with optional discriminative learning rates."""

    lr: float = doc("Peak learning rate of the head and top layer (AdamW).", default=1e-4)
    epochs: int = doc("Passes over the training data.", default=6)
    schedule: Optional[list[int]] = doc(
        "Blocks (from the top, embeddings last) trainable in each epoch, e.g. [0, 1, 2, 4, 7]; default: one "
        "more per epoch (encoder: 0, 1, 2 ... after the head; causal LM: 1, 2, 3 ..., the top block with the "
        "final norm).", default=None)
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

    @classmethod
    def weights_kind(cls, params: dict) -> str:
        return "full"  # every block may have trained by the last epoch

    def prepare(self, model: nn.Module) -> None:
        model.encoder.requires_grad_(False)

    def _units(self, model: nn.Module) -> list[nn.Module]:
        if hasattr(model, "head"):  # encoder classifier: the head always trains, blocks join by schedule
            return encoder_units(model.encoder)
        units = encoder_units(model)  # causal LM: the top block joins with the final norm and an untied head
        top = nn.ModuleList([units[0]] + [m for m in lm_top_extras(model)])
        return [top] + units[1:]

    def prepare_lm(self, lm: nn.Module) -> nn.Module:
        lm.requires_grad_(False)
        return lm

    def param_groups(self, model: nn.Module) -> list[dict]:
        names = {id(p): n for n, p in model.named_parameters()}
        groups = []
        if hasattr(model, "head"):
            groups.append({"params": [(f"head.{n}", p) for n, p in model.head.named_parameters()],
                           "lr": self.config.lr})
        seen: set[int] = set()
        for depth, unit in enumerate(self._units(model)):
            lr = self.config.lr * self.config.layer_lr_decay ** depth
            params = [(names[id(p)], p) for p in unit.parameters() if id(p) not in seen]
            seen.update(id(p) for _, p in params)
            if params:
                groups.append({"params": params, "lr": lr})
        return groups

    def schedule(self, model: nn.Module) -> Callable[[int], None]:
        units = self._units(model)
        plan = self.config.schedule
        causal = not hasattr(model, "head")

        def apply(epoch: int) -> None:
            # encoder: epoch 0 trains the head alone; causal LM (no separate head): the top block from epoch 0
            n = plan[min(epoch, len(plan) - 1)] if plan else epoch + int(causal)
            for depth, unit in enumerate(units):
                unit.requires_grad_(depth < n)

        return apply
