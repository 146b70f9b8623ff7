"""Cost measurements: peak memory, latency percentiles, throughput, tokens per request."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
import time

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: lifetime peak is the best available
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak resident memory (CPU, sampled) or peak allocated memory (CUDA) inside a ``with`` block, in MB."""

    def __init__(self, device: torch.device, interval: float = 0.02):
        self.device = device
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._peak = _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.peak_mb = self._peak / 2**20


def latency_ms(predict, texts: list[str], n: int = 32, warmup: int = 2) -> list[float]:
    """Single-example prediction latency of up to ``n`` examples (after ``warmup`` calls), in milliseconds."""
    sample = texts[:n]
    for t in sample[:warmup]:
        predict([t])
    times = []
    for t in sample:
        t0 = time.perf_counter()
        predict([t])
        times.append((time.perf_counter() - t0) * 1000)
    return times


# ---- the cost model -------------------------------------------------------------------------------------------
HOURS = 3600.0


@dataclass
class Pricing:
    """What one approach costs: once (training compute) and per request (API tokens or serving time)."""

    upfront: float
    per_request: float
    basis: str  # "api tokens" | "serving time"

    def total(self, volume_per_day: float, days: float, trainings: int = 1) -> float:
        """Cost over ``days`` at ``volume_per_day`` requests, paying for ``trainings`` training runs."""
        return self.upfront * trainings + self.per_request * volume_per_day * days

    def to_dict(self) -> dict:
        return {"upfront": self.upfront, "per_request": self.per_request, "per_1k_requests": self.per_request * 1000,
                "basis": self.basis}


def price(cost: dict, model: str, table) -> Pricing:
    """Price a strategy from its measured costs (means over seeds) and the study's ``costs`` table.

    Upfront: training (or adaptation) seconds x the training hardware's hourly rate, plus money already spent on
    API calls (``upfront_dollars``: a distill teacher's labelling on a priced API). Per request: for a model in
    ``table.api``, mean prompt and completion tokens x the API's prices; otherwise mean single-request latency x
    the serving hardware's hourly rate / ``table.concurrency``, plus ``api_dollars_per_request`` where a trial
    measured API spend per request of its own (a cascade's teacher on the inputs that fell back).
    """
    upfront = cost.get("train_seconds", 0.0) / HOURS * table.train_per_hour + cost.get("upfront_dollars", 0.0)
    api = table.api.get(model)
    if api is not None:
        per = (cost.get("prompt_tokens_mean", 0.0) * api.input_per_1m
               + cost.get("completion_tokens_mean", 0.0) * api.output_per_1m) / 1e6
        return Pricing(upfront, per, "api tokens")
    latency_s = (cost.get("latency_ms_mean") or cost.get("latency_ms_p50") or 0.0) / 1000
    serving = latency_s / HOURS * table.serve_per_hour / table.concurrency
    if cost.get("api_dollars_per_request"):  # a cascade: its teacher's API tokens on the inputs that fell back
        return Pricing(upfront, serving + cost["api_dollars_per_request"], "serving time + api tokens")
    return Pricing(upfront, serving, "serving time")


def break_even(prompting: Pricing, tuning: Pricing) -> dict:
    """Where ``tuning`` starts (or stops) costing less in total than ``prompting``, in requests.

    ``status``: ``at`` (tuning is cheaper from ``requests`` on), ``always`` (cheaper from the first request),
    ``below`` (cheaper only below ``requests``: it costs less upfront but more per request), ``never`` or ``equal``.

    Example:
        >>> round(break_even(Pricing(0.0, 0.002, "api tokens"), Pricing(10.0, 0.0005, "serving time"))["requests"])
        6667
    """
    extra_upfront = tuning.upfront - prompting.upfront
    saving = prompting.per_request - tuning.per_request  # what tuning saves on each request
    if saving > 0:
        if extra_upfront <= 0:
            return {"requests": 0.0, "status": "always"}
        return {"requests": extra_upfront / saving, "status": "at"}
    if saving == 0:
        status = "always" if extra_upfront < 0 else "equal" if extra_upfront == 0 else "never"
        return {"requests": 0.0 if status != "never" else None, "status": status}
    if extra_upfront < 0:
        return {"requests": extra_upfront / saving, "status": "below"}
    return {"requests": None, "status": "never"}
