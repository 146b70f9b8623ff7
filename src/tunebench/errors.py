"""Typed errors. Every error a user can cause says where (file, line, field) and what to do."""

from __future__ import annotations


class TunebenchError(Exception):
    """Base class for errors caused by input the user can fix (the CLI prints them without a traceback)."""

    exit_code = 2


class ConfigError(TunebenchError):
    """A study YAML or a strategy configuration is invalid."""


class DataError(TunebenchError):
    """A data file is missing, unreadable or inconsistent with the task."""


class CapabilityError(TunebenchError):
    """A strategy needs a capability (embed, train, generate, ...) that the backend does not have."""


class ModelLoadError(TunebenchError):
    """A model could not be loaded from a local path or the hub."""


class StoreError(TunebenchError):
    """The results store is missing, unreadable or does not hold what was asked for."""


class JudgeError(TunebenchError):
    """The judge could not give any usable answer (its endpoint down, or never valid JSON)."""
