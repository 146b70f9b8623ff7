"""The backend interface: a model plus what it can do."""

from __future__ import annotations

import contextlib
import logging
from abc import ABC
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ..config import ModelConfig
from ..errors import CapabilityError, ConfigError, ModelLoadError

log = logging.getLogger(__name__)


class NoLogprobs(Exception):
    """The endpoint does not return prompt log-probabilities: predict by generation instead."""


@dataclass
class Generation:
    """One generated completion and its token counts."""

    text: str
    prompt_tokens: int
    completion_tokens: int


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matrix units (AMX or AVX512-BF16)."""
    try:
        flags = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return False
    return any(f in flags for f in ("amx_bf16", "avx512_bf16"))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        from accelerate import PartialState  # heavy import, GPU only; under `accelerate launch`: this process's GPU

        return PartialState().device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device: '{device}' asked for, but PyTorch sees no CUDA GPU here; use auto or cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None means plain fp32)."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
    else:
        ok = cpu_supports_bf16()
    if precision == "bf16" and not ok:
        log.warning("bf16 requested but %s has no native bf16 support; it will be slow", device)
        return torch.bfloat16
    return torch.bfloat16 if ok else None


def load_pretrained(path: str, model_cls, kind: str = "model"):
    """Tokenizer and model from a local directory or a hub id; failures become one-line ``ModelLoadError``s."""
    from transformers import AutoTokenizer  # heavy (seconds to import): only when a model is loaded

    local = Path(path).expanduser()
    src = str(local) if local.exists() else path
    if local.exists() and not (local / "config.json").is_file():
        raise ModelLoadError(f"{local}: not a Hugging Face model directory (no config.json)")
    try:
        return AutoTokenizer.from_pretrained(src), model_cls.from_pretrained(src)
    except (OSError, ValueError) as exc:
        hint = "" if local.exists() else " (not a local directory; as a hub id it needs network access)"
        raise ModelLoadError(f"{kind} '{path}' could not be loaded{hint}: {str(exc).splitlines()[0]}") from None


class Backend(ABC):
    """A model and its capabilities (``embed``, ``train``, ``generate``, ``score`` ...).

    This class declares everything a strategy may call on a backend; a method a backend cannot serve raises
    :class:`CapabilityError`. Strategies call :meth:`require` before any work so that a missing capability fails
    early and clearly. Concrete backends register themselves by ``name`` for :func:`load_backend`.
    """

    name: ClassVar[str]
    capabilities: ClassVar[frozenset[str]] = frozenset()
    lm: ClassVar[bool] = False  # reads prompts (causal LMs, remote endpoints)
    remote: ClassVar[bool] = False  # reached over HTTP: no local weights or tokenizer
    kinds: ClassVar[dict[str, type[Backend]]] = {}  # name -> concrete backend (what load_backend builds)
    chat: bool = False  # prompts are wrapped in a chat template (set by the backends that read prompts)
    max_positions: int | None = None  # longest input in tokens, where the model says

    def __init_subclass__(cls, **kw) -> None:
        super().__init_subclass__(**kw)
        if "name" in cls.__dict__:
            Backend.kinds[cls.name] = cls

    def __init__(self, config: ModelConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self.amp_dtype = resolve_precision(config.precision, self.device)
        self._retrievers: dict[str, Backend] = {}
        self.judged: dict = {}  # a judge on this model: its scores of the human-rated texts, reused by every trial

    def require(self, *caps: str, strategy: str = "") -> None:
        missing = [c for c in caps if c not in self.capabilities]
        if missing:
            raise CapabilityError(f"strategy '{strategy}' needs {missing}, which the '{self.name}' backend "
                                  f"({self.model_id}) does not provide; it provides {sorted(self.capabilities)}")

    def _unsupported(self, what: str) -> CapabilityError:
        return CapabilityError(f"the '{self.name}' backend ({self.model_id}) cannot {what}")

    # ---- model facts ---------------------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self.config.path

    @property
    def tokenizer(self):
        """The Hugging Face tokenizer (None where the model is remote)."""
        return self._tokenizer

    @property
    def hidden_size(self) -> int:
        return int(self._model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self._model.config.num_hidden_layers)

    def autocast(self):
        """bf16 autocast where enabled, a no-op otherwise."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def describe(self) -> dict:
        return {"backend": self.name, "model": self.model_id, "device": str(self.device),
                "precision": "bf16" if self.amp_dtype is not None else "fp32"}

    def retriever(self, path: str | None = None) -> Backend:
        """The encoder backend that embeds texts to retrieve demonstrations (``path``: local dir or hub id;
        default ``config.retriever``), loaded once per backend and kept with it."""
        path = path if path is not None else self.config.retriever
        if path not in self._retrievers:
            self._retrievers[path] = load_backend(ModelConfig(path=path))
        return self._retrievers[path]

    # ---- embedding (capability ``embed``) ------------------------------------------------------------------
    def embed(self, texts: list[str], *, batch_size: int = 128, max_length: int = 256,
              normalize: bool = True) -> torch.Tensor:
        """Pooled (and L2-normalised) embeddings of the frozen model, shape (n, hidden), in input order."""
        raise self._unsupported("embed texts")

    # ---- tokens (training and classifier heads) ------------------------------------------------------------
    def tokenize(self, texts: list[str], max_length: int) -> list[list[int]]:
        """Token ids of plain inputs, unpadded, truncated to ``max_length`` (and the model's limit)."""
        raise self._unsupported("tokenize (the model is remote)")

    def collate(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """A padded batch (``input_ids``, ``attention_mask``) on the backend's device."""
        raise self._unsupported("build token batches (the model is remote)")

    # ---- training (capability ``train``) -------------------------------------------------------------------
    def build_classifier(self, num_labels: int, dropout: float = 0.1) -> nn.Module:
        """A fresh trainable copy of the model with pooling and a ``num_labels`` linear head."""
        raise self._unsupported("build a classifier")

    def lm_copy(self) -> nn.Module:
        """A fresh trainable copy of the causal LM (the backend's own stays untouched)."""
        raise self._unsupported("copy a language model")

    # ---- prompts (backends that read prompts: ``lm``) ------------------------------------------------------
    def format_prompt(self, text: str) -> str:
        """The prompt as the model reads it (inside the chat template where one is used)."""
        raise self._unsupported("read prompts")

    def answer_text(self, answer: str) -> str:
        """How an answer follows its prompt (after a space in plain prompts)."""
        raise self._unsupported("read prompts")

    def prompt_ids(self, prompt: str, max_length: int | None = None) -> list[int]:
        """Token ids of a formatted prompt; a longer prompt than ``max_length`` keeps its end."""
        raise self._unsupported("tokenize prompts")

    def answer_ids(self, answer: str, eos: bool = False) -> list[int]:
        """Token ids of an answer as it follows a prompt (plus EOS with ``eos``)."""
        raise self._unsupported("tokenize answers")

    # ---- scoring (capability ``score``) --------------------------------------------------------------------
    def score(self, prompts: list[list[int]], continuations: list[list[list[int]]], *, model: nn.Module | None = None,
              batch_size: int = 16, cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Summed log-probability and token count of each tokenized continuation after its tokenized prompt;
        arrays of shape (n_prompts, n_continuations)."""
        raise self._unsupported("score token continuations")

    def score_texts(self, prompts: list[str],
                    continuations: list[str]) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
        """Summed log-probability and token count of every continuation after every prompt (texts), plus the
        (prompt, completion) tokens billed for each prompt's requests. Raises :class:`NoLogprobs` when the
        endpoint cannot do it."""
        raise self._unsupported("score texts")

    def score_texts_paired(self, prompts: list[str],
                           continuations: list[str]) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
        """As :meth:`score_texts` with one continuation per prompt; arrays of shape (n,)."""
        raise self._unsupported("score texts")

    # ---- generation (capability ``generate``) --------------------------------------------------------------
    def generate(self, prompts: list[str], *, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 stop: list[str] | None = None, seed: int = 0, model: nn.Module | None = None,
                 batch_size: int | None = 16, max_length: int | None = None) -> list[Generation]:
        """Complete formatted prompts: greedy when ``temperature`` is 0, sampled (seeded) otherwise."""
        raise self._unsupported("generate")


def load_backend(config: ModelConfig) -> Backend:
    """Build the backend named by ``config.backend`` (the package imports every backend, which registers it)."""
    try:
        cls = Backend.kinds[config.backend]
    except KeyError:
        raise CapabilityError(f"unknown backend '{config.backend}'") from None
    return cls(config)
