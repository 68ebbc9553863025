"""The batcher on its own: coalescing, splitting, queue bounds, cancellation, and parity with single runs."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.batcher import Batcher, Outputs
from app.errors import ModelNotReady, QueueFull
from app.metrics import Metrics


class FakeModel:
    """Doubles its input; records each run's batch (as a list of item values)."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.runs: list[list[float]] = []
        self.gate = gate
        self.started = threading.Event()

    def __call__(self, batch: np.ndarray) -> Outputs:
        self.started.set()
        if self.gate is not None:
            self.gate.wait(timeout=10)
        self.runs.append(batch.tolist())
        return (batch * 2, batch + 1)


def make_batcher(run: FakeModel, **overrides: float) -> Batcher:
    options: dict[str, float] = {"max_batch_size": 8, "max_wait_ms": 20, "max_queue_items": 32}
    options.update(overrides)
    return Batcher(run, part="encoder", **options)  # type: ignore[arg-type]


def items(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


@pytest.mark.asyncio
async def test_concurrent_requests_share_one_run() -> None:
    model = FakeModel()
    batcher = make_batcher(model)
    batcher.start()
    try:
        results = await asyncio.gather(*(batcher.submit(items(i, i + 0.5)) for i in range(4)))
    finally:
        await batcher.stop()
    assert len(model.runs) == 1
    assert model.runs[0] == [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5]
    for i, (doubled, plus_one) in enumerate(results):
        assert doubled.tolist() == [2 * i, 2 * i + 1]
        assert plus_one.tolist() == [i + 1, i + 1.5]


@pytest.mark.asyncio
async def test_large_request_spans_runs_and_is_reassembled_in_order() -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=4)
    batcher.start()
    try:
        small, large = await asyncio.gather(batcher.submit(items(100)), batcher.submit(items(*range(10))))
    finally:
        await batcher.stop()
    assert [len(run) for run in model.runs] == [4, 4, 3]
    assert model.runs[0] == [100, 0, 1, 2]
    assert small[0].tolist() == [200]
    assert large[0].tolist() == [2 * i for i in range(10)]


@pytest.mark.asyncio
async def test_full_batch_runs_without_waiting_for_max_wait() -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=2, max_wait_ms=60_000)
    batcher.start()
    try:
        (doubled, _) = await asyncio.wait_for(batcher.submit(items(1, 2)), timeout=5)
    finally:
        await batcher.stop()
    assert doubled.tolist() == [2, 4]


@pytest.mark.asyncio
async def test_full_queue_rejects_at_once_and_counts_it() -> None:
    gate = threading.Event()
    model = FakeModel(gate)
    metrics = Metrics()
    batcher = make_batcher(model, max_batch_size=2, max_wait_ms=0, max_queue_items=4)
    batcher = Batcher(
        model,
        part="encoder",
        max_batch_size=2,
        max_wait_ms=0,
        max_queue_items=4,
        metrics=metrics.for_part("m", "encoder"),
    )
    batcher.start()
    try:
        running = asyncio.ensure_future(batcher.submit(items(1, 2)))
        await asyncio.to_thread(model.started.wait, 5)  # that run is in progress and holds the thread
        queued = asyncio.ensure_future(batcher.submit(items(3, 4, 5, 6)))
        await asyncio.sleep(0)
        assert batcher.queued_items == 4
        with pytest.raises(QueueFull) as rejected:
            await batcher.submit(items(7))
        assert rejected.value.status == 503
        assert rejected.value.headers == {"Retry-After": "1"}
        gate.set()
        await asyncio.gather(running, queued)
    finally:
        gate.set()
        await batcher.stop()
    assert metrics.requests_rejected.labels(model="m", reason="queue_full")._value.get() == 1


@pytest.mark.asyncio
async def test_cancelled_request_leaves_no_work_behind() -> None:
    gate = threading.Event()
    model = FakeModel(gate)
    batcher = make_batcher(model, max_batch_size=2, max_wait_ms=0)
    batcher.start()
    try:
        running = asyncio.ensure_future(batcher.submit(items(1, 2)))
        await asyncio.to_thread(model.started.wait, 5)
        abandoned = asyncio.ensure_future(batcher.submit(items(10, 11, 12)))
        kept = asyncio.ensure_future(batcher.submit(items(20)))
        await asyncio.sleep(0)
        assert batcher.queued_items == 4
        abandoned.cancel()
        await asyncio.gather(abandoned, return_exceptions=True)
        assert batcher.queued_items == 1
        gate.set()
        await asyncio.gather(running, kept)
    finally:
        gate.set()
        await batcher.stop()
    assert model.runs == [[1, 2], [20]]


@pytest.mark.asyncio
async def test_timed_out_request_is_dropped_from_the_queue() -> None:
    gate = threading.Event()
    model = FakeModel(gate)
    batcher = make_batcher(model, max_batch_size=1, max_wait_ms=0)
    batcher.start()
    try:
        running = asyncio.ensure_future(batcher.submit(items(1)))
        await asyncio.to_thread(model.started.wait, 5)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(batcher.submit(items(2, 3)), timeout=0.01)
        assert batcher.queued_items == 0
        gate.set()
        await running
    finally:
        gate.set()
        await batcher.stop()
    assert model.runs == [[1]]


@pytest.mark.asyncio
async def test_stopping_cancels_queued_and_running_requests() -> None:
    gate = threading.Event()
    model = FakeModel(gate)
    batcher = make_batcher(model, max_batch_size=1, max_wait_ms=0)
    batcher.start()
    running = asyncio.ensure_future(batcher.submit(items(1)))
    await asyncio.to_thread(model.started.wait, 5)
    queued = asyncio.ensure_future(batcher.submit(items(2)))
    await asyncio.sleep(0)
    await batcher.stop()
    gate.set()
    results = await asyncio.gather(running, queued, return_exceptions=True)
    assert [type(result) for result in results] == [ModelNotReady, ModelNotReady]
    assert all(result.status == 503 for result in results)  # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_run_failure_reaches_every_request_in_the_batch() -> None:
    def broken(batch: np.ndarray) -> Outputs:
        raise RuntimeError("model exploded")

    batcher = Batcher(broken, part="decoder", max_batch_size=8, max_wait_ms=5, max_queue_items=8)
    batcher.start()
    try:
        results = await asyncio.gather(
            batcher.submit(items(1)), batcher.submit(items(2)), return_exceptions=True
        )
    finally:
        await batcher.stop()
    assert [str(result) for result in results] == ["model exploded", "model exploded"]


@pytest.mark.asyncio
async def test_metrics_record_batches() -> None:
    metrics = Metrics()
    model = FakeModel()
    batcher = Batcher(
        model,
        part="decoder",
        max_batch_size=8,
        max_wait_ms=20,
        max_queue_items=8,
        metrics=metrics.for_part("m", "decoder"),
    )
    batcher.start()
    try:
        await asyncio.gather(batcher.submit(items(1, 2)), batcher.submit(items(3)))
    finally:
        await batcher.stop()
    registry = metrics.registry
    assert registry.get_sample_value("vae_batch_size_count", {"model": "m", "part": "decoder"}) == 1
    assert registry.get_sample_value("vae_batch_size_sum", {"model": "m", "part": "decoder"}) == 3
    assert registry.get_sample_value("vae_items_processed_total", {"model": "m", "part": "decoder"}) == 3
    assert registry.get_sample_value("vae_queue_wait_seconds_count", {"model": "m", "part": "decoder"}) == 2
    assert (
        registry.get_sample_value("vae_inference_duration_seconds_count", {"model": "m", "part": "decoder"})
        == 1
    )
    assert registry.get_sample_value("vae_queue_depth", {"model": "m", "part": "decoder"}) == 0


@pytest.mark.asyncio
async def test_batched_onnxruntime_outputs_match_single_runs(mnist_model_dir: Path) -> None:
    """Batched and one-at-a-time onnxruntime outputs agree within 1e-6 (bit-identical on our CPUs)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        str(mnist_model_dir / "encoder.onnx"), options, providers=["CPUExecutionProvider"]
    )

    def run(batch: np.ndarray) -> Outputs:
        return tuple(session.run(["mean", "log_var"], {"images": batch}))

    images = np.random.default_rng(0).random((24, 1, 28, 28), dtype=np.float32)
    single = [run(images[i : i + 1]) for i in range(len(images))]
    batcher = Batcher(run, part="encoder", max_batch_size=16, max_wait_ms=20, max_queue_items=64)
    batcher.start()
    try:
        batched = await asyncio.gather(*(batcher.submit(images[i : i + 1]) for i in range(len(images))))
    finally:
        await batcher.stop()
    for index in range(len(images)):
        for output in range(2):
            np.testing.assert_allclose(batched[index][output], single[index][output], rtol=0, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=12),
    max_batch_size=st.integers(min_value=1, max_value=16),
)
def test_any_mix_of_requests_is_split_and_reassembled_in_order(sizes: list[int], max_batch_size: int) -> None:
    async def scenario() -> tuple[list[Outputs], FakeModel]:
        model = FakeModel()
        batcher = make_batcher(model, max_batch_size=max_batch_size, max_wait_ms=20, max_queue_items=240)
        batcher.start()
        try:
            requests = [np.arange(size, dtype=np.float32) + 100 * index for index, size in enumerate(sizes)]
            return await asyncio.gather(*(batcher.submit(request) for request in requests)), model
        finally:
            await batcher.stop()

    results, model = asyncio.run(scenario())
    for index, (size, (doubled, plus_one)) in enumerate(zip(sizes, results, strict=True)):
        expected = np.arange(size, dtype=np.float32) + 100 * index
        assert doubled.tolist() == (2 * expected).tolist() and plus_one.tolist() == (expected + 1).tolist()
    total = sum(sizes)
    assert [len(run) for run in model.runs] == [max_batch_size] * (total // max_batch_size) + (
        [total % max_batch_size] if total % max_batch_size else []
    )


@pytest.mark.asyncio
async def test_threads_run_batches_at_once_and_reassemble_out_of_order_runs() -> None:
    first_run_may_finish = threading.Event()
    second_run_done = threading.Event()
    calls: list[list[float]] = []

    def model(batch: np.ndarray) -> Outputs:
        calls.append(batch.tolist())
        if batch[0] == 1:  # the first batch finishes only after the second one has
            assert first_run_may_finish.wait(timeout=10)
        else:
            second_run_done.set()
        return (batch * 2,)

    batcher = Batcher(model, part="decoder", max_batch_size=2, max_wait_ms=0, max_queue_items=8, threads=2)
    batcher.start()
    try:
        result = asyncio.ensure_future(batcher.submit(items(1, 2, 3, 4)))
        assert await asyncio.to_thread(second_run_done.wait, 10)  # ran while the first run was still going
        assert not result.done()
        first_run_may_finish.set()
        (doubled,) = await result
    finally:
        first_run_may_finish.set()
        await batcher.stop()
    assert sorted(calls) == [[1, 2], [3, 4]]
    assert doubled.tolist() == [2, 4, 6, 8]


@pytest.mark.skipif(sys.platform != "linux", reason="only Linux gives each thread its own nice value")
@pytest.mark.asyncio
async def test_runs_happen_at_the_given_niceness_and_the_loop_keeps_its_own() -> None:
    loop_niceness = os.getpriority(os.PRIO_PROCESS, 0)  # on Linux: the calling thread's
    if loop_niceness + 3 > 19:
        pytest.skip(f"the tests already run at niceness {loop_niceness}: 3 more would be clamped to 19")
    run_niceness: list[int] = []

    def model(batch: np.ndarray) -> Outputs:
        run_niceness.append(os.getpriority(os.PRIO_PROCESS, 0))
        return (batch,)

    batcher = Batcher(model, part="decoder", max_batch_size=1, max_wait_ms=0, max_queue_items=8, niceness=3)
    batcher.start()
    try:
        await batcher.submit(items(1, 2))
    finally:
        await batcher.stop()
    assert run_niceness == [loop_niceness + 3] * 2
    assert os.getpriority(os.PRIO_PROCESS, 0) == loop_niceness


@pytest.mark.asyncio
async def test_runs_go_on_when_the_priority_cannot_be_lowered(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(increment: int) -> int:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "nice", refuse)
    batcher = make_batcher(FakeModel(), max_wait_ms=0, niceness=3)
    batcher.start()
    try:
        async with asyncio.timeout(10):  # a batcher thread that died on the refusal would never answer
            doubled, _ = await batcher.submit(items(1, 2))
    finally:
        await batcher.stop()
    assert doubled.tolist() == [2, 4]
    if sys.platform == "linux":
        assert "encoder-inference-0 keeps its priority: [Errno 1] Operation not permitted" in caplog.text
