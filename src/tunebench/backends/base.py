"""The backend interface: a model plus what it can do."""

from __future__ import annotations

import contextlib
import logging
from abc import ABC
from typing import ClassVar

import torch

from ..config import ModelConfig
from ..errors import CapabilityError

log = logging.getLogger(__name__)


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
        from accelerate import PartialState  # under `accelerate launch`: this process's GPU

        return PartialState().device
    if device.startswith("cuda") and not torch.cuda.is_available():
        from ..errors import ConfigError

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
    from pathlib import Path

    from transformers import AutoTokenizer

    from ..errors import ModelLoadError

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
    """A model and its capabilities (``embed``, ``train``, ``generate`` ...).

    Strategies call :meth:`require` before any work so that a missing capability fails early and clearly.
    """

    name: ClassVar[str]
    capabilities: ClassVar[frozenset[str]] = frozenset()
    lm: ClassVar[bool] = False  # reads prompts (causal LMs, remote endpoints)
    remote: ClassVar[bool] = False  # reached over HTTP: no local weights or tokenizer

    def __init__(self, config: ModelConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self.amp_dtype = resolve_precision(config.precision, self.device)

    def require(self, *caps: str, strategy: str = "") -> None:
        missing = [c for c in caps if c not in self.capabilities]
        if missing:
            raise CapabilityError(f"strategy '{strategy}' needs {missing}, which the '{self.name}' backend "
                                  f"({self.model_id}) does not provide; it provides {sorted(self.capabilities)}")

    @property
    def model_id(self) -> str:
        return self.config.path

    @property
    def tokenizer(self):
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


def load_backend(config: ModelConfig) -> Backend:
    """Build the backend named by ``config.backend``."""
    if config.backend == "encoder":
        from .encoder import EncoderBackend

        return EncoderBackend(config)
    if config.backend == "causal":
        from .causal import CausalBackend

        return CausalBackend(config)
    if config.backend == "openai":
        from .openai_api import OpenAIBackend

        return OpenAIBackend(config)
    raise CapabilityError(f"unknown backend '{config.backend}'")
