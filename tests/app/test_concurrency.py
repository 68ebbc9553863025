"""Batching across concurrent HTTP requests, queue limits, deadlines and disconnects, through the ASGI app."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from PIL import Image

from app.config import Settings
from app.engine import Engine
from app.main import create_app


class GatedEngine(Engine):
    """The real engine, except that decoder runs wait for `gate` (open during warm-up)."""

    gate = threading.Event()
    running = threading.Event()

    def run_decoder(self, latents: np.ndarray) -> tuple[np.ndarray]:
        self.running.set()
        assert self.gate.wait(timeout=10), "test gate never opened"
        return super().run_decoder(latents)


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


@asynccontextmanager
async def gated_app(
    settings: Settings,
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient, type[GatedEngine]]]:
    gated = type("Gated", (GatedEngine,), {"gate": threading.Event(), "running": threading.Event()})
    # One inference thread: while the gated run holds it, later items wait in the queue.
    settings = settings.model_copy(update={"inference_threads": 1})
    gated.gate.set()
    engine = gated.load(settings)
    gated.gate.clear()
    gated.running.clear()  # set by the warm-up run; from now on it means a request's run has started
    app = create_app(settings, engine)
    try:
        async with serve(app) as client:
            yield app, client, gated
    finally:
        gated.gate.set()


def sample_value(app: FastAPI, name: str, labels: dict[str, str] | None = None) -> float:
    """The sum of the samples called `name` whose labels include `labels` (over every model, say)."""
    wanted = (labels or {}).items()
    return float(
        sum(
            sample.value
            for family in app.state.metrics.registry.collect()
            for sample in family.samples
            if sample.name == name and wanted <= sample.labels.items()
        )
    )


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


async def wait_until(condition: Callable[[], bool], timeout_seconds: float = 10) -> None:
    """Poll the event loop until condition() holds."""
    deadline = asyncio.get_running_loop().time() + timeout_seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.001)


@pytest.mark.asyncio
async def test_concurrent_requests_share_onnxruntime_runs(
    mnist_model_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    app = create_app(make_settings(mnist_model_dir, max_wait_ms=200))
    uploads = [png(seed) for seed in range(8)]
    async with serve(app) as client:
        alone = [
            (await client.post("/encode", content=data, headers={"Content-Type": "image/png"})).json()
            for data in uploads
        ]
        runs_before = sample_value(app, "vae_batch_size_count", {"part": "encoder"})
        together = await asyncio.gather(
            *(client.post("/encode", content=data, headers={"Content-Type": "image/png"}) for data in uploads)
        )
        runs = sample_value(app, "vae_batch_size_count", {"part": "encoder"}) - runs_before
    assert [response.json() for response in together] == alone
    assert runs < len(uploads)  # 8 requests, fewer runs: they were coalesced


# Limits small enough that two gated /sample?n=2 requests fill the decoder queue.
TWO_ITEM_QUEUE: dict[str, Any] = {
    "max_batch_size": 2, "max_wait_ms": 0, "max_queue_items": 2, "max_sample_n": 2,
    "max_items_per_request": 2, "max_interpolation_steps": 2,
}  # fmt: skip


async def fill_decoder_queue(
    app: FastAPI, client: httpx.AsyncClient, gated: type[GatedEngine], headers: dict[str, str] | None = None
) -> tuple[asyncio.Future[httpx.Response], asyncio.Future[httpx.Response]]:
    """Start one /sample whose run the gate holds and queue another behind it: the decoder queue is full."""
    running = asyncio.ensure_future(client.get("/sample?n=2&seed=1", headers=headers))
    assert await asyncio.to_thread(gated.running.wait, 10)
    queued = asyncio.ensure_future(client.get("/sample?n=2&seed=2", headers=headers))
    await wait_until(lambda: sample_value(app, "vae_queue_depth", {"part": "decoder"}) == 2)
    return running, queued


@pytest.mark.asyncio
async def test_full_queue_answers_503_with_retry_after(
    mnist_model_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    async with gated_app(make_settings(mnist_model_dir, **TWO_ITEM_QUEUE)) as (app, client, gated):
        running, queued = await fill_decoder_queue(app, client, gated)
        rejected = await client.get("/sample?n=1")
        # Refused before its parameters are parsed: a full queue is cheaper to check than a request.
        shed_unparsed = await client.get("/sample?n=not-a-number")
        gated.gate.set()
        assert (await running).status_code == 200 and (await queued).status_code == 200
        assert (await client.get("/sample?n=not-a-number")).status_code == 422  # room again: parsed
    for response in (rejected, shed_unparsed):
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.headers["content-type"] == "application/problem+json"
        assert "queue" in response.json()["detail"]
    assert sample_value(app, "vae_requests_rejected_total", {"reason": "queue_full"}) == 2


@pytest.mark.asyncio
async def test_full_queue_sheds_only_callers_with_the_key_and_with_cors_headers(
    mnist_model_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(
        mnist_model_dir, **TWO_ITEM_QUEUE, api_key="test-key", cors_allow_origins="https://app.example"
    )
    origin = {"Origin": "https://app.example"}
    async with gated_app(settings) as (app, client, gated):
        keyed = {"X-API-Key": "test-key", **origin}
        running, queued = await fill_decoder_queue(app, client, gated, keyed)
        without_key = await client.get("/sample?n=1", headers=origin)
        wrong_key = await client.get("/sample?n=1", headers={"X-API-Key": "wrong", **origin})
        shed = await client.get("/sample?n=1", headers=keyed)
        gated.gate.set()
        assert (await running).status_code == 200 and (await queued).status_code == 200
    # Callers without the key learn nothing about load; the refusal reaches the browser (CORS headers).
    assert without_key.status_code == 401 and wrong_key.status_code == 401
    assert shed.status_code == 503 and shed.headers["retry-after"] == "1"
    assert "queue" in shed.json()["detail"]
    for response in (without_key, shed):
        assert response.headers["access-control-allow-origin"] == "https://app.example"
    labels = {"endpoint": "/sample", "method": "GET"}
    assert sample_value(app, "vae_requests_total", {**labels, "status": "503"}) == 1
    assert sample_value(app, "vae_requests_total", {**labels, "status": "401"}) == 2
    assert sample_value(app, "vae_requests_rejected_total", {"reason": "queue_full"}) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "timeout_seconds", [0.3, 0.02]
)  # 0.02: before the guard would watch for a disconnect
async def test_deadline_answers_504_and_drops_queued_work(
    mnist_model_dir: Path, make_settings: Callable[..., Settings], timeout_seconds: float
) -> None:
    settings = make_settings(
        mnist_model_dir, max_batch_size=2, max_wait_ms=0, request_timeout_seconds=timeout_seconds
    )
    async with gated_app(settings) as (app, client, gated):
        running = asyncio.ensure_future(client.get("/sample?n=2&seed=1"))
        assert await asyncio.to_thread(gated.running.wait, 10)
        queued = await client.get("/sample?n=3&seed=2")
        assert sample_value(app, "vae_queue_depth", {"part": "decoder"}) == 0  # its items left the queue
        first = await running
        gated.gate.set()
        # The decoder works again, and only ran what had started (asked directly: no HTTP deadline).
        engine = app.state.models.default_engine()
        await engine.decode(np.zeros((1, engine.manifest.latent_dim), np.float32))
        processed = sample_value(app, "vae_items_processed_total", {"part": "decoder"})
    for response in (first, queued):
        assert response.status_code == 504 and response.headers["content-type"] == "application/problem+json"
        assert f"within {timeout_seconds} s" in response.json()["detail"]
    assert processed == 2 + 1
    assert sample_value(app, "vae_requests_rejected_total", {"reason": "timeout"}) == 2
    assert (
        sample_value(app, "vae_requests_total", {"endpoint": "/sample", "method": "GET", "status": "504"})
        == 2
    )


@pytest.mark.asyncio
async def test_client_disconnect_drops_queued_work(
    mnist_model_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(mnist_model_dir, max_batch_size=2, max_wait_ms=0)
    async with gated_app(settings) as (app, client, gated):
        running = asyncio.ensure_future(client.get("/sample?n=2&seed=1"))
        await asyncio.to_thread(gated.running.wait, 10)
        gone = asyncio.Event()
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/sample",
            "raw_path": b"/sample",
            "query_string": b"n=2&seed=2",
            "root_path": "",
            "headers": [(b"host", b"test")],
            "client": ("127.0.0.1", 1),
            "server": ("test", 80),
        }
        abandoned = asyncio.ensure_future(app(scope, receive, send))
        await wait_until(lambda: sample_value(app, "vae_queue_depth", {"part": "decoder"}) == 2)
        gone.set()
        await asyncio.wait_for(abandoned, timeout=10)
        assert sample_value(app, "vae_queue_depth", {"part": "decoder"}) == 0
        gated.gate.set()
        assert (await running).status_code == 200
    assert sent == []
    assert sample_value(app, "vae_items_processed_total", {"part": "decoder"}) == 2
    assert (
        sample_value(app, "vae_requests_total", {"endpoint": "/sample", "method": "GET", "status": "499"})
        == 1
    )
