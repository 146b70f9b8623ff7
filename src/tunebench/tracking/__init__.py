"""Experiment tracking: finished trials reported to MLflow, besides the results store (which stays the record).

``mlflow_runs`` turns a stored trial row into an MLflow run (one per trial, the study an experiment) and keeps
the run id in the store's ``tracked`` table, so a resumed study or a second ``tunebench track`` never makes a
second run of a trial. mlflow itself is imported only when a tracker talks to a server or file store.
"""

from .mlflow_runs import MlflowTracker, RunContent, SyncSummary, run_content, tracker_for

__all__ = ["MlflowTracker", "RunContent", "SyncSummary", "run_content", "tracker_for"]
