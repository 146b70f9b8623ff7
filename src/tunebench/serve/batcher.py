"""Micro-batching: requests that arrive close together run through the model as one batch.

The first waiting job opens a window of ``window_ms``; jobs arriving within it (up to ``max_batch`` inputs in
all) join the batch. While the model runs a batch, new jobs queue, so under load batches fill without waiting.
One worker thread runs the model; the event loop stays free to accept and answer requests.
"""

from __future__ import annotations

import asyncio
import logging
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
    """Queue jobs, run them in batches of at most ``max_batch`` inputs on one worker thread.

    ``max_batch=1`` serves one request at a time (the baseline micro-batching is measured against).
    """

    def __init__(self, run: Callable[[list[Job]], list], *, max_batch: int = 32, window_ms: float = 5.0,
                 max_queue: int = 1024, threads: int | None = None):
        self.run, self.max_batch, self.window = run, max(1, max_batch), max(0.0, window_ms) / 1000
        self.max_queue = max_queue
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunebench-model",
                                        initializer=_set_threads, initargs=(threads,))
        self._closing = False
        self._carry: tuple[Job, asyncio.Future] | None = None
        self.batches = 0
        self.inputs = 0

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def submit(self, job: Job):
        """The job's results (or raises what the engine raised for it)."""
        if self._closing or self._queue is None:
            raise Busy("the server is shutting down")
        if self._queue.qsize() >= self.max_queue:
            raise Busy(f"{self._queue.qsize()} requests are waiting; retry shortly")
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put((job, fut))
        result = await fut
        if isinstance(result, Exception):
            raise result
        return result

    async def _next(self, timeout: float | None):
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            return self._queue.get_nowait()  # raises QueueEmpty
        return await asyncio.wait_for(self._queue.get(), timeout)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await self._next(None)
            if item is None:
                break
            batch, n, stop = [item], item[0].size, False
            deadline = loop.time() + self.window
            while n < self.max_batch:
                try:
                    nxt = await self._next(deadline - loop.time())
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
                if nxt is None:
                    stop = True
                    break
                if n + nxt[0].size > self.max_batch:
                    self._carry = nxt
                    break
                batch.append(nxt)
                n += nxt[0].size
            await self._execute(loop, batch)
            if stop:
                break

    async def _execute(self, loop, batch) -> None:
        jobs = [j for j, _ in batch]
        try:
            results = await loop.run_in_executor(self._pool, self.run, jobs)
        except Exception as exc:  # the engine isolates failures per group; this is a last resort
            log.exception("batch failed")
            results = [exc] * len(jobs)
        self.batches += 1
        self.inputs += sum(j.size for j in jobs)
        for (_, fut), res in zip(batch, results):
            if not fut.done():
                fut.set_result(res)

    async def close(self) -> None:
        """Stop taking jobs, finish every queued one, stop the worker."""
        self._closing = True
        if self._queue is not None and self._task is not None:
            await self._queue.put(None)
            await self._task
            while self._carry is not None or not self._queue.empty():  # jobs queued behind the sentinel
                item = await self._next(0) if self._carry is None else self._carry
                self._carry = None
                if item is not None:
                    await self._execute(asyncio.get_running_loop(), [item])
        self._pool.shutdown(wait=True)
        log.info("batcher stopped after %d batches (%d inputs)", self.batches, self.inputs)
