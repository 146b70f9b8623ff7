"""Backends: how a model is reached. Each declares its capabilities."""

from . import causal, encoder, openai_api  # noqa: F401  (registration: load_backend builds them by name)
from .base import Backend, Generation, NoLogprobs, load_backend

__all__ = ["Backend", "Generation", "NoLogprobs", "load_backend"]
