"""Executors run planned trials and hand back results; the driver commits them.

An executor gets the pending specs and what every trial needs (the study config and the checked task data), asks
``claim(spec)`` just before it starts each one (another driver on the same store may hold it: then it is skipped)
and yields one :class:`Outcome` per trial it started, as it finishes. It never writes the store: the driver
(:class:`tunebench.runner.Study`) commits each result as it arrives, so a driver killed at any moment keeps every
trial already committed. :class:`LocalExecutor` runs them one after another in this process;
:class:`~tunebench.runner.ray_executor.RayExecutor` runs :func:`~tunebench.runner.execute.execute_staged` as Ray
tasks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol

from ..backends import Backend, load_backend
from ..config import StudyConfig
from ..data import TaskData
from ..errors import TunebenchError
from ..progress import StudyReporter
from .execute import Staging, TrialResult, execute_staged, peer_backends
from .spec import TrialSpec

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """One trial's end: a result to commit, or the error it failed with (the others go on)."""

    spec: TrialSpec
    result: TrialResult | None = None
    error: BaseException | None = None


Claim = Callable[[TrialSpec], bool]


class Executor(Protocol):
    """Runs trials. ``staging`` says where a trial's artifact is written before its commit; ``claim(spec)`` must be
    true before a trial starts."""

    def run(self, specs: list[TrialSpec], study: StudyConfig, data: TaskData, staging: Staging,
            claim: Claim) -> Iterator[Outcome]: ...


class LocalExecutor:
    """Trials one after another in this process; models load once and are shared by the trials that use them.

    ``backend`` (optional) serves every model of a single-model study (tests, the Python API).
    """

    def __init__(self, reporter: StudyReporter | None = None, backend: Backend | None = None):
        self.reporter = reporter or StudyReporter()
        self.backends: dict[str, Backend] = {}
        self.backend = backend

    def backend_for(self, study: StudyConfig, model: str) -> Backend:
        if self.backend is not None:
            return self.backend
        if model not in self.backends:
            self.backends[model] = load_backend({m.name: m for m in study.all_models()}[model])
        return self.backends[model]

    def preflight(self, specs: Iterable[TrialSpec], study: StudyConfig) -> None:
        """Load models and check capabilities, lengths and model preparation once per strategy and model: before
        any work, so a study that cannot run fails at once."""
        checked = set()
        for spec in specs:
            backend = self.backend_for(study, spec.model)
            if (spec.name, spec.model) not in checked:
                checked.add((spec.name, spec.model))
                peers = peer_backends(spec, study, lambda m: self.backend_for(study, m))
                spec.strategy_cls(spec.config, peers=peers, costs=study.costs).preflight(backend, study.task.type)

    def run(self, specs: list[TrialSpec], study: StudyConfig, data: TaskData, staging: Staging,
            claim: Claim = lambda spec: True) -> Iterator[Outcome]:
        self.preflight(specs, study)
        for i, spec in enumerate(specs, 1):
            if not claim(spec):
                log.info("trial %s is finished or running elsewhere; skipped", spec.name)
                continue
            self.reporter.trial_started(i, len(specs), spec.describe())
            try:
                judge = self.backend_for(study, spec.judge["config"]["model"]) if spec.judge else None
                result = execute_staged(spec, study, data, staging, backend=self.backend_for(study, spec.model),
                                        reporter=self.reporter, judge_backend=judge,
                                        backend_for=lambda m: self.backend_for(study, m))
            except (TunebenchError, KeyboardInterrupt):
                raise
            except Exception as exc:  # one broken trial must not lose the others
                log.exception("trial %s failed", spec.name)
                yield Outcome(spec, error=exc)
                continue
            yield Outcome(spec, result=result)
