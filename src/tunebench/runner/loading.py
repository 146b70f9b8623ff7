"""``load_study``: a study file read as config, then its strategy entries checked against the registry."""

from __future__ import annotations

from pathlib import Path

from ..config import StudyConfig, error_at, read_study
from ..errors import ConfigError
from ..strategies.resolve import resolve_entries


def load_study(path: str | Path) -> tuple[StudyConfig, Path]:
    """Read and validate a study YAML; returns the config and the directory paths are relative to.

    Every error names the file, the YAML line and the field.

    Example:
        >>> cfg, base = load_study("study.yaml")  # doctest: +SKIP
        >>> cfg.name
        'sst2-ladder'
    """
    cfg, base, root = read_study(path)
    try:
        resolve_entries(cfg)
    except ConfigError as exc:
        raise error_at(path, root, exc) from None
    return cfg, base
