"""Cost measurements: peak memory, latency percentiles, throughput, tokens per request."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
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


def latency_ms(predict, texts: list[str], n: int = 32, warmup: int = 2) -> tuple[float, float]:
    """p50 and p95 of single-example prediction latency over up to ``n`` examples, in milliseconds."""
    sample = texts[:n]
    for t in sample[:warmup]:
        predict([t])
    times = []
    for t in sample:
        t0 = time.perf_counter()
        predict([t])
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))
