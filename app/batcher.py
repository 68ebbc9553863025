"""Dynamic batching: items of concurrent requests coalesce into one model run.

One `Batcher` per model part. `submit` queues a request's items and awaits their outputs. Each of the
batcher's threads takes up to `max_batch_size` items in arrival order (a large request may span several
runs and is reassembled in order), waits at most `max_wait_ms` after the oldest queued item for the batch
to fill, runs the model, and hands the outputs back to the event loop. A thread takes the next batch as
soon as its run ends, so the model keeps running however busy the event loop is (answering a flood of
503s, say); with several threads, runs overlap. Cancelling `submit` (deadline, client gone) drops the
request's items that have not started yet.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

import numpy as np

from app.errors import ModelNotReady, QueueFull
from app.metrics import PartMetrics

logger = logging.getLogger(__name__)

Outputs = tuple[np.ndarray, ...]
RunFunction = Callable[[np.ndarray], Outputs]
Slices = list[tuple["_Request", int, int]]


def lower_thread_priority(niceness: int) -> None:
    """Add `niceness` to the calling thread's nice value; threads it starts later inherit the result.

    Linux keeps a nice value per thread. Elsewhere it belongs to the whole process, so this does nothing.
    """
    if niceness and sys.platform == "linux":
        try:
            os.nice(niceness)
        except OSError as error:  # a sandbox may refuse even this; the model still runs, just unprioritised
            logger.warning("thread %s keeps its priority: %s", threading.current_thread().name, error)


class _Request:
    """One submitted request: its items, how many runs have taken, and its finished output pieces by start."""

    __slots__ = ("done", "enqueued_at", "future", "items", "pieces", "taken")

    def __init__(self, items: np.ndarray, future: asyncio.Future[Outputs], enqueued_at: float) -> None:
        self.items = items
        self.future = future
        self.enqueued_at = enqueued_at
        self.taken = 0
        self.done = 0
        self.pieces: dict[int, Outputs] = {}  # runs on different threads may finish out of order


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
        threads: int = 1,
        niceness: int = 0,
        metrics: PartMetrics | None = None,
    ) -> None:
        self.part = part
        self._run = run
        self._max_batch_size = max_batch_size
        self._max_wait_seconds = max_wait_ms / 1000
        self._max_queue_items = max_queue_items
        self._metrics = metrics
        # Guards the queue, the item counts and each request's `taken`. Thread 0 waits for any work, the
        # other threads for a full batch.
        self._lock = threading.Lock()
        self._work_queued = threading.Condition(self._lock)
        self._full_batch_queued = threading.Condition(self._lock)
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_items = 0
        self._running: dict[int, Slices] = {}  # by worker thread
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads = threads
        self._niceness = niceness

    @property
    def queued_items(self) -> int:
        """Items waiting that no run has taken yet."""
        return self._queued_items

    def start(self) -> None:
        """Start the batcher's threads; results are delivered on the running event loop."""
        self._loop = asyncio.get_running_loop()
        for worker in range(self._threads):
            name = f"{self.part}-inference-{worker}"
            threading.Thread(target=self._work, args=(worker,), name=name, daemon=True).start()

    async def stop(self) -> None:
        """Fail waiting and running requests with ModelNotReady and let the threads end.

        Runs in progress finish in their threads; nobody receives their results.
        """
        with self._lock:
            self._stopping = True
            running = (request for slices in self._running.values() for request, _, _ in slices)
            abandoned = [*self._queue, *running]
            self._queue.clear()
            self._set_queued_items(0)
            self._work_queued.notify_all()
            self._full_batch_queued.notify_all()
        for request in abandoned:
            self._abandon(request)

    async def submit(self, items: np.ndarray) -> Outputs:
        """Run the model on `items` (N, ...) and return its outputs, each (N, ...), in the items' order.

        Raises QueueFull at once when the queue cannot take N more items.
        """
        count = len(items)
        if count == 0:
            raise ValueError("submit needs at least one item")
        if self._loop is None:
            raise RuntimeError("Batcher.start() was not called")
        request = _Request(items, self._loop.create_future(), time.monotonic())
        with self._lock:
            if self._stopping:
                raise ModelNotReady(f"the server is shutting down the {self.part}; retry")
            self.check_room(count)
            self._queue.append(request)
            self._set_queued_items(self._queued_items + count)
            self._notify_workers()
        try:
            return await request.future
        except asyncio.CancelledError:
            self._drop(request)
            raise

    def has_room(self, count: int = 1) -> bool:
        """Whether the queue can take `count` more items now (without the lock: the answer may be a moment
        old; `submit` checks again under it)."""
        return self._queued_items + count <= self._max_queue_items

    def check_room(self, count: int = 1) -> None:
        """Raise QueueFull (and count it) unless the queue can take `count` more items now."""
        if not self.has_room(count):
            if self._metrics is not None:
                self._metrics.rejected_queue_full.inc()
            raise QueueFull(self.part, self._queued_items, self._max_queue_items)

    def _drop(self, request: _Request) -> None:
        """Remove a cancelled request's not-yet-started items from the queue."""
        request.future.cancel()
        with self._lock:
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

    def _work(self, worker: int) -> None:
        """One batcher thread: wait for a batch, run it, hand the outputs to the loop; until stopped.

        Thread 0 runs whatever is queued; the others start only full batches, so under light load there
        are as few and as large runs as with one thread, and under a backlog the runs overlap.
        """
        lower_thread_priority(self._niceness)
        while True:
            with self._lock:
                while not self._batch_ready(worker):
                    if self._stopping:
                        return
                    if worker == 0 and self._queue:
                        delay = self._queue[0].enqueued_at + self._max_wait_seconds - time.monotonic()
                        self._work_queued.wait(delay)
                    else:
                        (self._work_queued if worker == 0 else self._full_batch_queued).wait()
                slices = self._running[worker] = self._take_batch(time.monotonic())
                self._notify_workers()
            result = self._run_batch(slices)
            with self._lock:
                del self._running[worker]
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(self._deliver, slices, result)
            except RuntimeError:  # the event loop has closed: nobody is waiting any more
                return

    def _batch_ready(self, worker: int) -> bool:
        """Whether `worker` should take a batch now (call with the lock held)."""
        if self._stopping or not self._queue:
            return False
        if self._queued_items >= self._max_batch_size:
            return True
        return worker == 0 and self._queue[0].enqueued_at + self._max_wait_seconds <= time.monotonic()

    def _notify_workers(self) -> None:
        """Wake thread 0 for any queued work, another thread for a full batch (call with the lock held)."""
        if self._queue:
            self._work_queued.notify()
        if self._queued_items >= self._max_batch_size:
            self._full_batch_queued.notify()

    def _take_batch(self, now: float) -> Slices:
        """Take up to max_batch_size items off the queue: [(request, start, stop), ...] in order."""
        slices: Slices = []
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

    def _run_batch(self, slices: Slices) -> Outputs | Exception:
        """Run the model on the slices' items, in the batcher's thread: its outputs, or what it raised."""
        started = time.perf_counter()
        count = sum(stop - start for _, start, stop in slices)
        try:
            if len(slices) == 1 and slices[0][1] == 0 and slices[0][2] == len(slices[0][0].items):
                batch = slices[0][0].items  # one whole request: no copy
            else:
                batch = np.concatenate([request.items[start:stop] for request, start, stop in slices])
            return self._run(batch)
        except Exception as error:  # the run failed: every request in this batch fails with it
            return error
        finally:
            if self._metrics is not None:
                self._metrics.inference_duration_seconds.observe(time.perf_counter() - started)
                self._metrics.batch_size.observe(count)
                self._metrics.items_processed.inc(count)

    def _deliver(self, slices: Slices, outputs: Outputs | Exception) -> None:
        """On the event loop: resolve the requests whose last items were in this run."""
        if isinstance(outputs, Exception):
            for request, _, _ in slices:
                self._fail(request, outputs)
            return
        offset = 0
        for request, start, stop in slices:
            count = stop - start
            if not request.future.done():
                request.pieces[start] = tuple(output[offset : offset + count] for output in outputs)
                request.done += count
                if request.done == len(request.items):
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
    def _assemble(pieces: dict[int, Outputs]) -> Outputs:
        if len(pieces) == 1:
            return next(iter(pieces.values()))
        in_order = [pieces[start] for start in sorted(pieces)]
        return tuple(np.concatenate(parts) for parts in zip(*in_order, strict=True))
