"""Strategies: one module each, registered once in ``registry`` (the single list)."""

from . import cascade, distill, full, gradual_unfreeze, hybrid, linear_probe, lora, prompt_search, prompting, soft_prompt  # noqa: F401  (registration)
from .base import Predictor, Strategy, StrategyConfig, TrainConfig, load_predictor, registry

__all__ = ["Predictor", "Strategy", "StrategyConfig", "TrainConfig", "load_predictor", "registry"]
