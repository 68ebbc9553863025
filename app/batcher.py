"""Dynamic batching: items of concurrent requests coalesce into one model run.

One `Batcher` per model part. `submit` queues a request's items and awaits their outputs; a worker
task takes up to `max_batch_size` items in arrival order (a large request may span several runs and is
reassembled in order), waits at most `max_wait_ms` after the oldest queued item for the batch to fill, and
runs the model in a worker thread so the event loop stays free. Cancelling `submit` (deadline, client gone)
drops the request's items that have not started yet.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from app.errors import ModelNotReady, QueueFull
from app.metrics import PartMetrics

Outputs = tuple[np.ndarray, ...]
RunFunction = Callable[[np.ndarray], Outputs]


class _Request:
    """One submitted request: its items, how many runs have taken, and its finished output pieces."""

    __slots__ = ("enqueued_at", "future", "items", "pieces", "taken")

    def __init__(self, items: np.ndarray, future: asyncio.Future[Outputs], enqueued_at: float) -> None:
        self.items = items
        self.future = future
        self.enqueued_at = enqueued_at
        self.taken = 0
        self.pieces: list[Outputs] = []


class Batcher:
    """Coalesce `submit(items)` calls into runs of `run(batch) -> outputs`, each output batched on axis 0."""

    def __init__(
        self,
        run: RunFunction,
        *,
        part: str,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue_items: int,
        metrics: PartMetrics | None = None,
    ) -> None:
        self.part = part
        self._run = run
        self._max_batch_size = max_batch_size
        self._max_wait_seconds = max_wait_ms / 1000
        self._max_queue_items = max_queue_items
        self._metrics = metrics
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_items = 0
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{part}-inference")
        self._worker: asyncio.Task[None] | None = None

    @property
    def queued_items(self) -> int:
        """Items waiting that no run has taken yet."""
        return self._queued_items

    def start(self) -> None:
        """Start the worker task on the running event loop."""
        self._worker = asyncio.get_running_loop().create_task(self._work(), name=f"{self.part}-batcher")

    async def stop(self) -> None:
        """Stop the worker, cancel waiting requests and release the inference thread."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        for request in self._queue:
            self._abandon(request)
        self._queue.clear()
        self._set_queued_items(0)
        self._executor.shutdown(wait=False)  # a run in progress finishes in its thread; nobody awaits it

    async def submit(self, items: np.ndarray) -> Outputs:
        """Run the model on `items` (N, ...) and return its outputs, each (N, ...), in the items' order.

        Raises QueueFull at once when the queue cannot take N more items.
        """
        count = len(items)
        if count == 0:
            raise ValueError("submit needs at least one item")
        if self._queued_items + count > self._max_queue_items:
            if self._metrics is not None:
                self._metrics.rejected_queue_full.inc()
            raise QueueFull(self.part, self._queued_items, self._max_queue_items)
        loop = asyncio.get_running_loop()
        request = _Request(items, loop.create_future(), loop.time())
        was_empty = not self._queue
        self._queue.append(request)
        self._set_queued_items(self._queued_items + count)
        if was_empty or self._queued_items >= self._max_batch_size:
            self._wakeup.set()
        try:
            return await request.future
        except asyncio.CancelledError:
            self._drop(request)
            raise

    def _drop(self, request: _Request) -> None:
        """Remove a cancelled request's not-yet-started items from the queue."""
        request.future.cancel()
        if request.taken < len(request.items):
            try:
                self._queue.remove(request)
            except ValueError:
                return
            self._set_queued_items(self._queued_items - (len(request.items) - request.taken))

    def _set_queued_items(self, value: int) -> None:
        self._queued_items = value
        if self._metrics is not None:
            self._metrics.queue_depth.set(value)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                delay = self._queue[0].enqueued_at + self._max_wait_seconds - loop.time()
                if delay > 0 and self._queued_items < self._max_batch_size:
                    timer = loop.call_later(delay, self._wakeup.set)
                    await self._wakeup.wait()
                    self._wakeup.clear()
                    timer.cancel()
                    continue
                await self._run_one_batch(loop)

    def _take_batch(self, now: float) -> list[tuple[_Request, int, int]]:
        """Take up to max_batch_size items off the queue: [(request, start, stop), ...] in order."""
        slices: list[tuple[_Request, int, int]] = []
        room = self._max_batch_size
        while self._queue and room > 0:
            request = self._queue[0]
            start = request.taken
            stop = min(len(request.items), start + room)
            if start == 0 and self._metrics is not None:
                self._metrics.queue_wait_seconds.observe(now - request.enqueued_at)
            request.taken = stop
            room -= stop - start
            slices.append((request, start, stop))
            if stop == len(request.items):
                self._queue.popleft()
        self._set_queued_items(self._queued_items - (self._max_batch_size - room))
        return slices

    async def _run_one_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        slices = self._take_batch(loop.time())
        if len(slices) == 1 and slices[0][1] == 0 and slices[0][2] == len(slices[0][0].items):
            batch = slices[0][0].items  # one whole request: no copy
        else:
            batch = np.concatenate([request.items[start:stop] for request, start, stop in slices])
        started = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(self._executor, self._run, batch)
        except asyncio.CancelledError:  # the batcher is stopping: nobody will deliver these results
            for request, _, _ in slices:
                self._abandon(request)
            raise
        except Exception as error:  # the run failed: every request in this batch fails with it
            for request, _, _ in slices:
                self._fail(request, error)
            return
        finally:
            if self._metrics is not None:
                self._metrics.inference_duration_seconds.observe(time.perf_counter() - started)
                self._metrics.batch_size.observe(len(batch))
                self._metrics.items_processed.inc(len(batch))
        offset = 0
        for request, start, stop in slices:
            count = stop - start
            if not request.future.done():
                request.pieces.append(tuple(output[offset : offset + count] for output in outputs))
                if stop == len(request.items):
                    request.future.set_result(self._assemble(request.pieces))
            offset += count

    def _abandon(self, request: _Request) -> None:
        if not request.future.done():
            request.future.set_exception(ModelNotReady(f"the server is shutting down the {self.part}; retry"))

    def _fail(self, request: _Request, error: Exception) -> None:
        if not request.future.done():
            request.future.set_exception(error)
        if request.taken < len(request.items):
            self._drop(request)

    @staticmethod
    def _assemble(pieces: list[Outputs]) -> Outputs:
        if len(pieces) == 1:
            return pieces[0]
        return tuple(np.concatenate(parts) for parts in zip(*pieces, strict=True))
