"""Backends: how a model is reached. Each declares its capabilities."""

from .base import Backend, load_backend

__all__ = ["Backend", "load_backend"]
