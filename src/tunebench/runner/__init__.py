"""Running a study: plan → execute → commit, through an executor."""

from .loading import load_study
from .study import Study

__all__ = ["Study", "load_study"]
