"""Where a study's trials run: in this process (default) or as tasks on a Ray cluster, and what each asks for."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import _Strict


class Resources(_Strict):
    """What one trial asks the cluster for (Ray's ``num_cpus``, ``num_gpus``, ``memory``)."""

    cpu: float = Field(1.0, gt=0, le=4096, description="CPUs; the trial's torch threads follow this number.")
    gpu: float | None = Field(None, ge=0, le=1024, description="GPUs (fractions share one). Default: 1 for trials that "
                              "train when the cluster has GPUs, else 0.")
    memory_gb: float | None = Field(None, gt=0, le=1e6, description="Memory to reserve (Ray schedules on it; a task "
                                    "using far more is killed by Ray's memory monitor and reported as OOM).")


class ExecutionConfig(_Strict):
    """``execution:`` in a study (every field can also be given on the command line)."""

    executor: Literal["local", "ray"] = Field("local", description="local: trials one after another in this "
                                              "process; ray: each trial a Ray task on a cluster.")
    address: str | None = Field(None, description="Ray cluster: auto (the one `ray start` runs here), "
                                "ray://HOST:10001, or unset for a private local cluster.")
    max_concurrent: int | None = Field(None, ge=1, le=100_000, description="Trials in flight at once (default: as many as the "
                                       "cluster's CPUs allow).")
    max_retries: int = Field(2, ge=0, le=100, description="Times a trial whose worker or node died is run again before it "
                             "is recorded as failed (errors raised by the trial itself are not retried).")
    resources: dict[str, Resources] = Field(
        default_factory=dict, description="Per trial: keyed by strategy name (lora), family (prompting, "
        "prompt_tuning, weight_tuning) or default; the most specific key wins.")
    claim_ttl: float = Field(120.0, ge=2, le=7 * 86400, description="Seconds a claim on a running trial lasts without a heartbeat "
                             "(renewed every ttl/4): how long a dead driver's trials wait before another runs them.")
