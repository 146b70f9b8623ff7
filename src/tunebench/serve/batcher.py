"""Micro-batching: requests that arrive close together run through the model as one batch.

The first waiting job opens a window of ``window_ms``; jobs arriving within it join the batch, up to
``max_batch`` inputs and ``max_batch_tokens`` tokens in all (a single job over either bound runs alone). While
the model runs a batch, new jobs queue, so under load batches fill without waiting.

Jobs queue per caller (an API key, or a client address), and a batch takes them round-robin: one job from each
caller in turn. A caller that sends many large requests back to back fills its own queue, not everyone's wait.

One worker thread runs the model; the event loop stays free to accept and answer requests. A batch that fails
is run again one job at a time, so that one bad request never fails another's. A streamed request is a job like
any other: its text reaches its reader from the worker thread through the job's ``sink`` while the batch runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from .engine import Job

log = logging.getLogger(__name__)


def _set_threads(n: int | None) -> None:
    """Intra-op threads of the model thread (OpenMP settings are per thread, so set them in it)."""
    if n is not None:
        import torch

        torch.set_num_threads(n)


class Busy(Exception):
    """The queue is full (or the server is shutting down): the client should retry later."""


class MicroBatcher:
    """Queue jobs per caller, run them in batches of at most ``max_batch`` inputs (and ``max_batch_tokens``
    tokens) on one worker thread.

    ``max_batch=1`` serves one request at a time (the baseline micro-batching is measured against). At most
    ``max_queue`` jobs wait in all, and at most ``max_queue_per_caller`` from one caller.
    """

    def __init__(self, run: Callable[[list[Job]], list], *, max_batch: int = 32, max_batch_tokens: int | None = None,
                 window_ms: float = 5.0, max_queue: int = 1024, max_queue_per_caller: int | None = None,
                 threads: int | None = None):
        self.run, self.max_batch, self.window = run, max(1, max_batch), max(0.0, window_ms) / 1000
        self.max_tokens = max_batch_tokens if max_batch_tokens is not None else float("inf")
        self.max_queue = max_queue
        self.max_per_caller = max_queue_per_caller if max_queue_per_caller is not None else max_queue
        self._queues: dict[str, deque] = {}  # caller -> its waiting (job, future) pairs
        self._turns: deque[str] = deque()  # callers with waiting jobs, the next one to serve first
        self._waiting = self._inputs = self._tokens = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunebench-model",
                                        initializer=_set_threads, initargs=(threads,))
        self._closing = False
        self.batches = 0
        self.inputs = 0

    @property
    def waiting(self) -> int:
        """Jobs queued for the model (not counting the batch it is running)."""
        return self._waiting

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def submit(self, job: Job, caller: str = ""):
        """The job's results (or raises what the engine raised for it)."""
        if self._closing or self._task is None:
            raise Busy("the server is shutting down")
        if self._waiting >= self.max_queue:
            raise Busy(f"{self._waiting} requests are waiting; retry shortly")
        queue = self._queues.get(caller)
        if queue is not None and len(queue) >= self.max_per_caller:
            raise Busy(f"{len(queue)} of your requests are waiting; retry shortly")
        if queue is None:
            queue = self._queues[caller] = deque()
            self._turns.append(caller)
        fut = asyncio.get_running_loop().create_future()
        queue.append((job, fut))
        self._count(job, +1)
        self._wake.set()
        result = await fut
        if isinstance(result, Exception):
            raise result
        return result

    def _count(self, job: Job, sign: int) -> None:
        self._waiting += sign
        self._inputs += sign * job.size
        self._tokens += sign * job.tokens

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._waiting:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._fill(loop)
            batch = self._take()
            if batch:
                await self._execute(loop, batch)

    async def _fill(self, loop) -> None:
        """Wait up to the window for more jobs, unless a batch's worth is waiting (or the batcher is closing)."""
        deadline = loop.time() + self.window
        while not self._closing and self._inputs < self.max_batch and self._tokens < self.max_tokens:
            left = deadline - loop.time()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                return

    def _take(self) -> list[tuple[Job, asyncio.Future]]:
        """The next batch: one job per caller in turn, while the batch stays within its bounds."""
        batch: list[tuple[Job, asyncio.Future]] = []
        n = tokens = 0
        while self._turns:
            job, fut = self._queues[self._turns[0]][0]
            if fut.done():  # its client went away
                self._pop(rotate=False)
                continue
            if batch and (n + job.size > self.max_batch or tokens + job.tokens > self.max_tokens):
                break  # this caller's job opens the next batch
            batch.append(self._pop(rotate=True))
            n, tokens = n + job.size, tokens + job.tokens
        return batch

    def _pop(self, rotate: bool) -> tuple[Job, asyncio.Future]:
        caller = self._turns[0]
        queue = self._queues[caller]
        item = queue.popleft()
        self._count(item[0], -1)
        if not queue:
            del self._queues[caller]
            self._turns.popleft()
        elif rotate:
            self._turns.rotate(-1)
        return item

    async def _execute(self, loop, batch) -> None:
        jobs = [j for j, _ in batch]
        try:
            results = await loop.run_in_executor(self._pool, self.run, jobs)
            if len(results) != len(jobs):
                raise RuntimeError(f"{len(results)} results for {len(jobs)} jobs")
        except Exception as exc:  # the engine isolates failures itself; this is a last resort
            if len(batch) > 1:
                log.warning("a batch of %d requests failed (%s); running them one by one", len(batch), exc)
                for item in batch:
                    if item[0].sent:  # a streamed job that sent text: running it again would send it twice
                        if not item[1].done():
                            item[1].set_result(exc)
                    else:
                        await self._execute(loop, [item])
                return
            log.exception("a request failed")
            results = [exc]
        self.batches += 1
        self.inputs += sum(j.size for j in jobs)
        for (_, fut), res in zip(batch, results):
            if not fut.done():
                fut.set_result(res)

    async def close(self) -> None:
        """Stop taking jobs, finish every queued one (without waiting for windows), stop the worker."""
        self._closing = True
        if self._task is not None:
            self._wake.set()
            await self._task
        self._pool.shutdown(wait=True)
        log.info("batcher stopped after %d batches (%d inputs)", self.batches, self.inputs)
