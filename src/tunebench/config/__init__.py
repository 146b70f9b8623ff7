"""Study configuration: pydantic data and YAML loading with line numbers. Imports no strategy and no backend.

Example:
    >>> cfg, base, _ = read_study("study.yaml")  # doctest: +SKIP
    >>> cfg.task.type
    'classification'
"""

from .base import _Strict
from .costs import ApiPrice, CostConfig
from .execution import ExecutionConfig, Resources
from .loading import error_at, parse_study, read_study
from .models import AnyModelConfig, CausalModel, EncoderModel, ModelConfig, OpenAIModel
from .search import SearchConfig
from .study import (DEFAULT_STORE, PERTURBATION_KINDS, ConsistencyConfig, CounterfactualConfig, StrategyEntry,
                    StudyConfig)
from .task import DataFiles, LabelSpec, SplitConfig, TaskConfig
from .tracking import MlflowTracking, TrackingConfig

__all__ = ["AnyModelConfig", "ApiPrice", "CausalModel", "EncoderModel", "OpenAIModel", "ConsistencyConfig", "CostConfig", "DEFAULT_STORE", "ExecutionConfig", "Resources", "DataFiles", "LabelSpec", "ModelConfig", "MlflowTracking", "TrackingConfig",
           "CounterfactualConfig", "PERTURBATION_KINDS", "SearchConfig", "SplitConfig", "StrategyEntry", "StudyConfig", "TaskConfig",
           "_Strict", "error_at", "parse_study", "read_study"]
