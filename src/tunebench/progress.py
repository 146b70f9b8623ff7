"""Progress reporting: the library reports through a ``Reporter`` it is given; the CLI draws Rich bars."""

from __future__ import annotations


class Reporter:
    """Receives progress from long work. The base class ignores everything."""

    def start(self, label: str, total: int) -> None:
        """A new unit of work of ``total`` steps begins."""

    def advance(self, n: int = 1) -> None:
        """``n`` steps of the current unit are done."""

    def stop(self) -> None:
        """The current unit is finished."""


NULL_REPORTER = Reporter()


class StudyReporter(Reporter):
    """A reporter that also hears about trials starting and finishing (the base ignores them)."""

    def trial_started(self, index: int, total: int, label: str) -> None:
        """Trial ``index`` (1-based) of ``total`` pending trials begins."""

    def trial_finished(self, row: dict) -> None:
        """A trial finished and was stored."""

    def trial_failed(self, label: str, error: BaseException) -> None:
        """A trial raised; the study goes on with the others."""

    def trials_status(self, queued: int, running: int, finished: int, failed: int) -> None:
        """Where the trials of a cluster run stand (the Ray executor calls this as they move)."""

    def waiting(self, trials: int, owners: list[str]) -> None:
        """``trials`` pending trials are claimed by other drivers (``owners``) on the same store; waiting for them
        to finish or for their claims to expire."""
