"""``Study``: a study's trials planned, the pending ones run by an executor, each result committed as it arrives.

    study.yaml → plan() → [TrialSpec] → claim → executor: execute(spec, data, staging) → TrialResult → commit(store)

Several drivers may run one study on one store at once (two terminals, two machines on a PostgreSQL store): each
claims a trial before running it, so they split the pending trials; a driver that finds the rest claimed by
others waits for them to finish, or for a dead driver's claims to expire and then runs those trials itself.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..backends import Backend
from ..config import StudyConfig
from ..data import TaskData, load_task
from ..progress import StudyReporter
from ..store import Store
from ..store.labels import LabelCache
from ..tracking import MlflowTracker, SyncSummary, tracker_for
from .claims import Claims
from .commit import commit
from .execute import Staging, is_main_process
from .executors import Executor, LocalExecutor, Outcome
from .plan import plan, reusable_key
from .spec import TrialSpec, train_subset

log = logging.getLogger(__name__)


class Study:
    """Runs a study's trials against a store; finished trials are skipped, so a rerun resumes.

    Example:
        >>> cfg, base = load_study("study.yaml")  # doctest: +SKIP
        >>> rows = Study(cfg, base_dir=base).run()
    """

    def __init__(self, config: StudyConfig, *, base_dir: str | Path = ".", store: Store | None = None,
                 reporter: StudyReporter | None = None, source: str | None = None,
                 tracker: MlflowTracker | None = None):
        self.config = config
        self.base_dir = Path(base_dir)
        self.store = store if store is not None else Store(config.store_path(self.base_dir),
                                                           artifacts=config.artifacts_path(self.base_dir))
        self.reporter = reporter or StudyReporter()
        self.source = source
        self._data: TaskData | None = None
        self.failures: list[tuple[str, BaseException]] = []
        self.unchecked_prompts: list[str] = []  # prompt references planned without a store (validate)
        # experiment tracking (``tracking:``): each committed trial is reported; None when the study asks for none
        self.tracker = tracker if tracker is not None else (
            tracker_for(config, self.store, base_dir=self.base_dir) if isinstance(self.store, Store) else None)
        self.tracking: SyncSummary | None = None  # what tracking did in this run

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

    def dry_run(self) -> dict:
        """What running the study would do, with nothing loaded, trained or spent: the pending trials and, for each
        one that pays per call (a distill teacher's labelling), its estimated calls, input tokens and dollars."""
        trials = self.plan()
        done = self.store.done_keys(self.config.name) if isinstance(self.store, Store) else set()
        pending = [t for t in trials if t.key not in done]
        spend, teachers = [], {}
        root = self.store.artifacts if isinstance(self.store, Store) else None
        for t in pending:
            train = train_subset(t, self.data.train)
            bought = None
            key = reusable_key(t.strategy_cls, t.config, self.config, self.data, t.model, t.seed, len(train))
            if key is not None:  # labels earlier trials with this teacher bought, or pending ones will buy
                bought = teachers.setdefault(key, Bought(None if root is None else LabelCache(root, key, "")))
            est = t.strategy_cls.spend_estimate(t.config, self.data, train, t.seed, self.config.costs, bought)
            if est is not None:
                spend.append({"trial": t.name, "seed": t.seed, "train_size": t.train_size, "key": t.key, **est})
        return {"trials": len(trials), "pending": len(pending), "finished": len(trials) - len(pending),
                "spend": spend}

    def executor(self, backend: Backend | None = None) -> Executor:
        """The executor the study's ``execution:`` names (local unless it says ray)."""
        if self.config.execution.executor == "ray":
            from .ray_executor import RayExecutor  # heavy: ray is imported only when asked for

            return RayExecutor(self.config.execution, self.reporter)
        return LocalExecutor(self.reporter, backend)

    def run(self, backend: Backend | None = None, executor: Executor | None = None) -> list[dict]:
        """Run pending trials; returns the stored rows of every trial in the plan.

        ``backend`` (optional) serves a single-model study; otherwise each model is loaded when first needed.
        ``executor`` (default: the study's ``execution:``) decides where trials run; results are committed here,
        one at a time as they arrive.
        """
        trials = self.plan()
        self.store.save_study(self.config.name, self.config.model_dump(), self.source, [t.key for t in trials])
        if self.data.test.groups and self.store.add_test_groups(self.data.fingerprints()["test"],
                                                                self.data.test.groups):
            log.info("study %s: test items' groups (%s) recorded with the stored test set", self.config.name,
                     ", ".join(self.data.test.groups))
        done = self.store.done_keys(self.config.name)
        relabelled = self.store.relabel(self.config.name, {t.key: t.name for t in trials if t.key in done})
        if relabelled:
            log.info("study %s: %d stored trials take their current label", self.config.name, relabelled)
        pending = [t for t in trials if t.key not in done]
        log.info("study %s: %d trials, %d already finished, %d to run", self.config.name, len(trials),
                 len(trials) - len(pending), len(pending))
        executor = executor or self.executor(backend)
        if pending and not is_main_process():  # under `accelerate launch` the other ranks follow rank 0, unclaimed
            for outcome in executor.run(pending, self.config, self.data, Staging(None, "rank"), lambda spec: True):
                if outcome.error is not None:
                    self.failures.append((outcome.spec.name, outcome.error))
            return self.store.trials(self.config.name, {t.key for t in trials})
        if pending:
            with Claims(self.store, self.config.name, ttl=self.config.execution.claim_ttl) as claims:
                self._run_claimed(trials, pending, executor, claims)
        rows = self.store.trials(self.config.name, {t.key for t in trials})
        if self.tracker is not None:  # trials finished earlier, by other drivers, or while the server was down
            handled = set() if self.tracking is None else self.tracking.keys()
            self._tracked(self.tracker.sync([r for r in rows if r["key"] not in handled], verify=False))
        return rows

    def _tracked(self, summary: SyncSummary) -> None:
        if self.tracking is None:
            self.tracking = summary
        else:
            self.tracking.add(summary)

    def _run_claimed(self, trials: list[TrialSpec], pending: list[TrialSpec], executor: Executor,
                     claims: Claims) -> None:
        """Run what this driver can claim; then wait for trials other drivers hold, and take over the ones whose
        claims expire, until every trial is finished or failed in this run."""
        staging = Staging(self.store.require_artifacts(), claims.owner)
        while pending:
            progressed = False
            for outcome in executor.run(pending, self.config, self.data, staging, claims.claim):
                progressed = True
                self._settle(outcome, claims)
            done = self.store.done_keys(self.config.name)
            failed = {f["key"] for f in self.store.failures(self.config.name, since=claims.started)}
            pending = [t for t in trials if t.key not in done and t.key not in failed]
            held = claims.held_elsewhere({t.key for t in pending})
            if held:
                self.reporter.waiting(len(held), sorted({c["owner"] for c in held}))
            if pending and not progressed:
                time.sleep(min(5.0, claims.ttl / 4))

    def _settle(self, outcome: Outcome, claims: Claims) -> None:
        if outcome.error is not None:
            self.failures.append((outcome.spec.name, outcome.error))
            claims.failed(outcome.spec, outcome.error)
            self.reporter.trial_failed(outcome.spec.name, outcome.error)
        elif commit(self.store, outcome.result, claims.owner):
            self.reporter.trial_finished(outcome.result.row)
            if self.tracker is not None:  # after the commit: tracking never holds up or loses a stored trial
                row = self.store.trial(outcome.spec.key)
                self._tracked(self.tracker.sync([row] if row is not None else []))
        else:
            log.warning("trial %s was stored by another driver meanwhile; this run's result is dropped",
                        outcome.spec.name)


class Bought:
    """For the dry run: how many inputs, from the first, a trial with one teacher will find labelled, by the
    stored labels or by the trials before it in the plan (which label theirs first when trials run in order)."""

    def __init__(self, cache: LabelCache | None):
        self.cache, self.planned = cache, set()

    def __call__(self, texts: list[str]) -> int:
        stored = self.cache.lookup(texts) if self.cache is not None else [None] * len(texts)
        n = 0
        for text, entry in zip(texts, stored):
            if entry is None and text not in self.planned:
                break
            n += 1
        self.planned.update(texts)
        return n
