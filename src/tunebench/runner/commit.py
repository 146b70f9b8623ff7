"""``commit``: the one place that writes a finished trial into the store."""

from __future__ import annotations

from ..store import Store
from .execute import TrialResult


def commit(store: Store, result: TrialResult) -> None:
    """Store ``result``: its artifact moves into place, then its row, per-item results and test truth are committed
    in one transaction (the row is the commit point: a trial killed before it is simply run again)."""
    store.add_trial(result.row, result.artifact_dir, result.items, result.test_set)
