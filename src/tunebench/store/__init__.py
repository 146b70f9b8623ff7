"""The store: finished trials with their per-item results (``results``) and the prompt registry (``prompts``).

``artifacts`` loads a stored trial back into a model and predictor (serve and export use it); it is not
imported here, so reading results never loads torch models.
"""

from .results import Store

__all__ = ["Store"]
