"""``tracking:`` in a study: where finished trials are also reported (MLflow), besides the results store."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from .base import _Strict
from .files import path_field

_SCHEMES = ("http://", "https://", "file:", "sqlite:", "postgresql:", "postgresql+", "mysql:", "mysql+", "mssql:",
            "databricks")


def is_uri(value: str) -> bool:
    """True for a tracking URI with a scheme (a server, ``file:``, a database); False for a plain directory."""
    return value.startswith(_SCHEMES) or "://" in value


class MlflowTracking(_Strict):
    """Each finished trial becomes an MLflow run; the study is its experiment."""

    uri: str = Field(min_length=1, max_length=2000, description="MLflow tracking URI: a directory (./mlruns, relative "
                     "to the study file; an MLflow file store), http://HOST:5000 (a tracking server), or any URI "
                     "MLflow accepts (sqlite:///mlflow.db, databricks).")
    experiment: str | None = Field(None, min_length=1, max_length=500, description="MLflow experiment name "
                                   "(default: the study's name).")
    log_artifacts: bool = Field(False, description="Also copy each trial's artifact directory into its MLflow run "
                                "(default: only its path, as the tunebench.artifact tag).")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("give a directory (./mlruns) or a tracking server URL (http://HOST:5000)")
        return v if is_uri(v) else path_field(v)  # type: ignore[return-value]

    def resolved_uri(self, base_dir: str | Path = ".") -> str:
        """The URI with a plain directory made absolute, relative to ``base_dir`` (the study file's directory)."""
        return resolve_uri(self.uri, base_dir)


def resolve_uri(uri: str, base_dir: str | Path = ".") -> str:
    """A plain directory relative to ``base_dir``, as an absolute path; a URI with a scheme as it is."""
    if is_uri(uri):
        return uri
    path = Path(uri).expanduser()
    return str((path if path.is_absolute() else Path(base_dir) / path).resolve())


class TrackingConfig(_Strict):
    """``tracking:``: experiment trackers that receive each finished trial (the results store stays the record)."""

    mlflow: MlflowTracking | None = Field(None, description="Report each finished trial as an MLflow run: "
                                          "{uri: ./mlruns | http://HOST:5000, experiment: NAME}.")
