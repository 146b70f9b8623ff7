"""Evaluation: the same code measures every strategy."""

from .metrics import classification_metrics

__all__ = ["classification_metrics"]
