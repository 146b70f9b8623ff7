"""``RayExecutor``: each pending trial a Ray task on a cluster; the driver commits results as they arrive.

- The driver loads and checks the task data once and puts it (and the study config) in Ray's object store:
  workers need no copy of the user's files. Models load on the worker, once per worker process.
- Each task asks for the resources its strategy is given in ``execution.resources`` (the strategy's name, then its
  family, then ``default``); trials on a local model get a GPU when the cluster has one, trials on an API model
  none. A worker's torch threads follow the CPUs its task holds.
- Artifacts are staged by the worker under the store's artifact root (a shared path or an fsspec URL), which the
  driver then promotes when it commits.
- A task whose worker process or node dies is run again by Ray up to ``max_retries`` times, then reported as
  failed with the reason (out-of-memory kills are named as such). An error the trial raises itself is not retried.
- Seeds, data order and everything in a trial's key do not depend on the executor: a trial gives the same metrics
  here as in :class:`~tunebench.runner.executors.LocalExecutor`.
"""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from typing import Iterator

import ray
from ray import exceptions as rex

from ..backends import Backend, load_backend
from ..config import ExecutionConfig, Resources, StudyConfig
from ..data import TaskData
from ..errors import ConfigError, TunebenchError
from ..progress import StudyReporter
from ..strategies import registry
from .execute import Staging, TrialResult, execute_staged
from .executors import Claim, Outcome
from .spec import TrialSpec

log = logging.getLogger(__name__)

FAMILIES = ("prompting", "prompt_tuning", "weight_tuning")
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "TUNEBENCH_CACHE")
_BACKENDS: dict[str, Backend] = {}  # in each worker process: models already loaded


def run_trial(spec: TrialSpec, study: StudyConfig, data: TaskData, staging: Staging) -> TrialResult:
    """The body of a trial's Ray task (module level, so workers import it by name)."""
    import torch  # heavy: only in worker processes

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))
    model = {m.name: m for m in study.all_models()}[spec.model]
    ident = json.dumps(model.model_dump(), sort_keys=True, default=str)
    if ident not in _BACKENDS:
        _BACKENDS[ident] = load_backend(model)
    return execute_staged(spec, study, data, staging, backend=_BACKENDS[ident])


class RayExecutor:
    """Trials as Ray tasks. ``execution`` gives the cluster address, concurrency, retries and resources.

    Example:
        >>> Study(cfg).run(executor=RayExecutor(cfg.execution))  # doctest: +SKIP
    """

    def __init__(self, execution: ExecutionConfig, reporter: StudyReporter | None = None):
        self.execution = execution
        self.reporter = reporter or StudyReporter()
        allowed = {"default", *FAMILIES, *registry.all()}
        unknown = sorted(set(execution.resources) - allowed)
        if unknown:
            raise ConfigError(f"execution.resources: unknown key(s) {unknown}; use a strategy name "
                              f"({', '.join(registry.all())}), a family ({', '.join(FAMILIES)}) or default")

    def connect(self) -> None:
        """Join the cluster at ``execution.address`` (``auto``: the one ``ray start`` runs on this machine), or
        start a private local one when no address is given."""
        if ray.is_initialized():  # joined already (tests, notebooks): that cluster is used as it is
            joined = ray.get_runtime_context().gcs_address
            if self.execution.address not in (None, "auto", joined):
                log.warning("Ray is already joined to %s in this process; execution.address %s is not used",
                            joined, self.execution.address)
            return
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        try:
            ray.init(address=self.execution.address, runtime_env={"env_vars": env} if env else None,
                     log_to_driver=False, include_dashboard=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = self.execution.address or "a new local cluster"
            raise TunebenchError(f"cannot reach the Ray cluster at {where}: {exc}. Start one with `ray start "
                                 "--head` (or join one with `ray start --address HEAD:6379`) and pass "
                                 "--address auto, or ray://HOST:10001 for a remote one") from None
        log.info("Ray cluster: %s", ray.cluster_resources())

    def resources(self, spec: TrialSpec, study: StudyConfig, cluster_gpus: float) -> dict:
        """Ray task options for ``spec``: CPUs, GPUs and memory from the most specific ``resources`` entry."""
        res = self.execution.resources
        family = spec.strategy_cls.family
        r = res.get(spec.strategy) or res.get(family) or res.get("default") or Resources()
        gpu = r.gpu
        if gpu is None:
            backend = {m.name: m for m in study.all_models()}[spec.model].backend
            gpu = 1.0 if cluster_gpus >= 1 and backend != "openai" else 0.0
        opts = {"num_cpus": r.cpu, "num_gpus": gpu}
        if r.memory_gb is not None:
            opts["memory"] = int(r.memory_gb * 2 ** 30)
        return opts

    def _check_feasible(self, specs: list[TrialSpec], opts: dict[str, dict]) -> None:
        """Refuse at once a trial no node could ever run (Ray would wait for it forever)."""
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        for spec in specs:
            o = opts[spec.key]
            fits = any(n.get("CPU", 0) >= o["num_cpus"] and n.get("GPU", 0) >= o["num_gpus"]
                       and n.get("memory", float("inf")) >= o.get("memory", 0) for n in nodes)
            if not fits:
                raise TunebenchError(f"trial {spec.name} asks for {o} but no node of the Ray cluster has that much "
                                     f"(nodes: {nodes}); lower execution.resources or add nodes")

    def run(self, specs: list[TrialSpec], study: StudyConfig, data: TaskData, staging: Staging,
            claim: Claim = lambda spec: True) -> Iterator[Outcome]:
        self.connect()
        gpus = ray.cluster_resources().get("GPU", 0.0)
        opts = {s.key: self.resources(s, study, gpus) for s in specs}
        self._check_feasible(specs, opts)
        smallest = min((o["num_cpus"] for o in opts.values()), default=1)
        task = ray.remote(run_trial)
        study_ref, data_ref = ray.put(study), ray.put(data)
        queue, in_flight = deque(specs), {}
        counts = {"finished": 0, "failed": 0}
        while queue or in_flight:
            # the cluster may grow (autoscaler, a node joining) or shrink while the study runs
            limit = self.execution.max_concurrent or max(1, int(ray.cluster_resources().get("CPU", 1) // smallest))
            while queue and len(in_flight) < limit:
                spec = queue.popleft()
                if not claim(spec):
                    continue
                ref = task.options(**opts[spec.key], max_retries=self.execution.max_retries, retry_exceptions=False,
                                   name=f"trial:{spec.name}").remote(spec, study_ref, data_ref, staging)
                in_flight[ref] = spec
            self.reporter.trials_status(len(queue), len(in_flight), counts["finished"], counts["failed"])
            if not in_flight:
                break
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=2.0)
            for ref in ready:
                outcome = self._outcome(in_flight.pop(ref), ref)
                counts["failed" if outcome.error else "finished"] += 1
                yield outcome
        self.reporter.trials_status(0, 0, counts["finished"], counts["failed"])

    def _outcome(self, spec: TrialSpec, ref) -> Outcome:
        try:
            return Outcome(spec, result=ray.get(ref))
        except rex.RayTaskError as exc:  # the trial raised: the original error, not retried
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            log.error("trial %s failed on a worker: %s", spec.name, cause)
            return Outcome(spec, error=cause)
        except rex.OutOfMemoryError as exc:
            return Outcome(spec, error=TrialLost(
                f"out of memory: Ray's memory monitor killed its worker ({_first_line(exc)}); give it more "
                "(execution.resources.*.memory_gb) or run fewer at once (--max-concurrent)"))
        except rex.RayError as exc:  # worker or node died: Ray already retried it max_retries times
            return Outcome(spec, error=TrialLost(
                f"its worker or node died {self.execution.max_retries + 1} time(s) "
                f"({type(exc).__name__}: {_first_line(exc)})"))


class TrialLost(RuntimeError):
    """A trial that never finished because the cluster lost it (after Ray's retries)."""


def _first_line(exc: BaseException) -> str:
    lines = [s for s in str(exc).strip().splitlines() if s.strip()]
    return lines[0][:300] if lines else type(exc).__name__
