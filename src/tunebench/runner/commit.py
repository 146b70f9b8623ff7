"""``commit``: the one place that writes a finished trial into the store."""

from __future__ import annotations

from ..store import Store
from .execute import TrialResult


def commit(store: Store, result: TrialResult, owner: str | None = None) -> bool:
    """Store ``result``: in one transaction the claim of ``owner`` is checked, the artifact moved into place and
    its row, per-item results and test truth written (the row is the commit point: a trial killed before it is
    simply run again). False when it was already stored or its claim passed to another driver: never twice."""
    return store.add_trial(result.row, result.artifact_dir, result.items, result.test_set, owner=owner)
