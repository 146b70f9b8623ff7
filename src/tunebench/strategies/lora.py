"""LoRA through PEFT: low-rank updates on the encoder's linear layers; the head trains fully.

On a causal LM the input token embeddings get a low-rank update too (``embeddings``). Why: a task whose answer
depends on which tokens the input holds (a keyword, a product name) needs token identity at the answer position.
A pretrained LM's hidden states carry it, but where they do not (a small or random model, tokens the model has
barely seen) frozen embeddings leave the linear adapters nothing to read: on a 2-layer random Llama, a keyword ->
colour task stays at chance with all-linear LoRA (its loss flat) while full fine-tuning, which trains the
embeddings, reaches 1.0; adapting the embeddings (rank r, a few thousand parameters) brings LoRA to 1.0 as well.
``embeddings: false`` restores plain all-linear LoRA (what adapter-only servers expect).
"""

from __future__ import annotations

import re
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
    embeddings: bool = doc(
        "causal: also adapt the input token embeddings (a low-rank update of the embedding table); without it a "
        "task that hinges on which tokens the input holds may not be learnable when the LM's frozen features do "
        "not already separate them.", default=True)

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

    @classmethod
    def key_params(cls, params: dict, backend: str) -> dict:
        if backend != "causal" or not params.get("embeddings", True):  # what trials ran before the option existed
            params = {k: v for k, v in params.items() if k != "embeddings"}
        return params

    def _peft_config(self, targets=None, **kw):
        import peft  # heavy (imports transformers): only when a model is prepared

        return peft.LoraConfig(r=self.config.r, lora_alpha=self.config.alpha, lora_dropout=self.config.lora_dropout,
                               target_modules=targets or self.config.target_modules, bias="none", **kw)

    def prepare(self, model: nn.Module) -> None:
        import peft  # heavy (imports transformers): only when a model is prepared

        model.encoder = peft.get_peft_model(model.encoder, self._peft_config())

    def prepare_lm(self, lm: nn.Module) -> nn.Module:
        import peft  # heavy (imports transformers): only when a model is prepared

        # 'all-linear' on a causal LM adapts every linear layer except the output head
        targets = lm_targets(lm, self.config.target_modules, self.config.embeddings)
        return peft.get_peft_model(lm, self._peft_config(targets, task_type=peft.TaskType.CAUSAL_LM))


def lm_targets(lm: nn.Module, targets: Union[list[str], str], embeddings: bool) -> Union[list[str], str]:
    """What LoRA adapts in a causal LM: ``targets`` ('all-linear': every linear layer, GPT-2's Conv1D included, but
    the output head), plus the input embedding module when ``embeddings``."""
    if not embeddings:
        return targets
    from transformers.pytorch_utils import Conv1D  # heavy: only when a model is prepared

    head, emb = lm.get_output_embeddings(), lm.get_input_embeddings()
    names = {m: n for n, m in lm.named_modules()}
    if targets == "all-linear":
        targets = sorted({n.rsplit(".", 1)[-1] for m, n in names.items()
                          if isinstance(m, (nn.Linear, Conv1D)) and m is not head})
    elif isinstance(targets, str):  # a regular expression: PEFT matches it against full module names
        return f"(?:{targets})|(?:{re.escape(names[emb])})"
    return sorted({*targets, names[emb].rsplit(".", 1)[-1]})
