"""``Study``: a study's trials planned, the pending ones run by an executor, each result committed as it arrives.

    study.yaml → plan() → [TrialSpec] → executor: execute(spec, data, artifact dir) → TrialResult → commit(store)
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..backends import Backend
from ..config import StudyConfig
from ..data import TaskData, load_task
from ..progress import StudyReporter
from ..store import Store
from .commit import commit
from .execute import is_main_process
from .executors import Executor, LocalExecutor
from .plan import plan
from .spec import TrialSpec

log = logging.getLogger(__name__)


class Study:
    """Runs a study's trials against a store; finished trials are skipped, so a rerun resumes.

    Example:
        >>> cfg, base = load_study("study.yaml")  # doctest: +SKIP
        >>> rows = Study(cfg, base_dir=base).run()
    """

    def __init__(self, config: StudyConfig, *, base_dir: str | Path = ".", store: Store | None = None,
                 reporter: StudyReporter | None = None, source: str | None = None):
        self.config = config
        self.base_dir = Path(base_dir)
        self.store = store if store is not None else Store(config.store_path(self.base_dir))
        self.reporter = reporter or StudyReporter()
        self.source = source
        self._data: TaskData | None = None
        self.failures: list[tuple[str, BaseException]] = []
        self.unchecked_prompts: list[str] = []  # prompt references planned without a store (validate)

    @property
    def data(self) -> TaskData:
        if self._data is None:
            self._data = load_task(self.config.task, self.base_dir)
        return self._data

    def plan(self) -> list[TrialSpec]:
        """Every trial of the study, in order, with a key that changes when anything that matters changes."""
        planned = plan(self.config, self.data, self.store if isinstance(self.store, Store) else None)
        self.unchecked_prompts = planned.unchecked_prompts
        return planned.trials

    def run(self, backend: Backend | None = None, executor: Executor | None = None) -> list[dict]:
        """Run pending trials; returns the stored rows of every trial in the plan.

        ``backend`` (optional) serves a single-model study; otherwise each model is loaded when first needed.
        ``executor`` (default: :class:`LocalExecutor`) decides where trials run; results are committed here.
        """
        trials = self.plan()
        self.store.save_study(self.config.name, self.config.model_dump(), self.source, [t.key for t in trials])
        done = self.store.done_keys(self.config.name)
        pending = [t for t in trials if t.key not in done]
        log.info("study %s: %d trials, %d already finished, %d to run", self.config.name, len(trials),
                 len(trials) - len(pending), len(pending))
        executor = executor or LocalExecutor(self.reporter, backend)
        main = is_main_process() if pending else True  # under `accelerate launch`, one process writes the store
        staging = self.store.staging_dir if main else (lambda key: None)
        for outcome in executor.run(pending, self.config, self.data, staging):
            if outcome.error is not None:
                self.failures.append((outcome.spec.name, outcome.error))
                self.reporter.trial_failed(outcome.spec.name, outcome.error)
                continue
            if main:
                commit(self.store, outcome.result)
            self.reporter.trial_finished(outcome.result.row)
        return self.store.trials(self.config.name, {t.key for t in trials})
