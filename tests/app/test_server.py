"""A real `vae-serve` process on a free port: start-up, every endpoint over TCP, bad model directories."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from model.manifest import DEFAULT_MODEL_DIR

pytestmark = pytest.mark.slow

STARTUP_SECONDS = 60


def vae_serve() -> list[str]:
    """The installed console script, next to this interpreter when possible."""
    beside = Path(sys.executable).parent / "vae-serve"
    found = str(beside) if beside.exists() else shutil.which("vae-serve")
    assert found, "vae-serve is not installed (pip install -e .)"
    return [found]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start_server(
    tmp_path: Path, *flags: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    log = tmp_path / f"server-{port}.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                *vae_serve(),
                "--port",
                str(port),
                "--execution-provider",
                "cpu",
                "--intra-op-threads",
                "1",
                *flags,
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
        )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        assert process.poll() is None, f"vae-serve exited early:\n{log.read_text()}"
        assert time.monotonic() < deadline, (
            f"vae-serve not ready after {STARTUP_SECONDS} s:\n{log.read_text()}"
        )
        try:
            if httpx.get(base_url + "/readyz", timeout=1).status_code == 200:
                return process, base_url, log
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.05)  # poll interval while waiting for the port to open


def stop_server(process: subprocess.Popen[bytes], log: Path) -> None:
    """SIGTERM: uvicorn shuts down gracefully, then re-raises the signal (exit status -SIGTERM)."""
    process.terminate()
    assert process.wait(timeout=20) in (0, -signal.SIGTERM), log.read_text()
    assert "Application shutdown complete" in log.read_text()


@contextmanager
def serving(tmp_path: Path, *flags: str) -> Iterator[tuple[str, Path]]:
    """A running vae-serve's base URL and log file; stopped gracefully (and checked) on exit."""
    process, base_url, log = start_server(tmp_path, *flags)
    try:
        yield base_url, log
    finally:
        stop_server(process, log)


@pytest.fixture(scope="module")
def server(mnist_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serving(
        tmp_path_factory.mktemp("server"),
        *("--model-dir", str(mnist_model_dir), "--max-batch-size", "16", "--max-wait-ms", "50"),
        *("--max-body-bytes", "200000", "--max-image-pixels", "250000", "--max-sample-n", "32"),
    ) as (base_url, _):
        yield base_url


def png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_every_endpoint_over_http(server: str) -> None:
    with httpx.Client(base_url=server, timeout=30) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").status_code == 200
        assert client.get("/model").json()["manifest"]["latent_dim"] == 16
        encoded = client.post(
            "/encode?sample=true&seed=1", content=png(), headers={"Content-Type": "image/png"}
        )
        assert len(encoded.json()["items"][0]["z"]) == 16
        multipart = client.post("/encode", files={"file": ("a.png", png(), "image/png")}).json()
        assert multipart["items"][0]["mean"] == encoded.json()["items"][0]["mean"]
        decoded = client.post("/decode?format=array", json={"latents": [[0.0] * 16]}).json()
        assert np.array(decoded["images"]).shape == (1, 1, 28, 28)
        grid = client.get("/sample?n=16&seed=0", headers={"Accept": "image/png"})
        assert grid.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(grid.content)).size == (122, 122)
        assert client.get("/sample?n=3&seed=4").json() == client.get("/sample?n=3&seed=4").json()
        reconstruction = client.post("/reconstruct", files={"file": ("a.png", png(), "image/png")}).json()
        assert Image.open(io.BytesIO(base64.b64decode(reconstruction["images"][0]))).size == (28, 28)
        frames = client.post("/interpolate", json={"start": [0.0] * 16, "end": [1.0] * 16, "steps": 3}).json()
        assert len(frames["images"]) == 3
        missing = client.get("/missing")
        assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
        assert client.get("/docs").status_code == 200
        assert (
            'vae_requests_total{endpoint="/sample",method="GET",model="mnist-test",status="200"}'
            in client.get("/metrics").text
        )


def test_concurrent_requests_are_batched_over_http(server: str) -> None:
    def batch_count(metrics_text: str) -> float:
        line = next(
            line
            for line in metrics_text.splitlines()
            if line.startswith('vae_batch_size_count{model="mnist-test",part="decoder"}')
        )
        return float(line.split()[-1])

    async def burst() -> tuple[float, list[int]]:
        async with httpx.AsyncClient(base_url=server, timeout=30) as client:
            before = batch_count((await client.get("/metrics")).text)
            responses = await asyncio.gather(*(client.get(f"/sample?n=1&seed={i}") for i in range(8)))
            after = batch_count((await client.get("/metrics")).text)
        return after - before, [response.status_code for response in responses]

    runs, statuses = asyncio.run(burst())
    assert statuses == [200] * 8
    assert runs < 8


def blank_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


ERROR_CASES = [
    ("POST", "/encode", {"content": b"text", "headers": {"Content-Type": "text/plain"}}, 415),
    ("POST", "/encode", {"content": b"not an image", "headers": {"Content-Type": "image/png"}}, 415),
    ("POST", "/encode", {"content": b"\0" * 200_001, "headers": {"Content-Type": "image/png"}}, 413),
    ("POST", "/encode", {"content": blank_png(501, 500), "headers": {"Content-Type": "image/png"}}, 413),
    ("POST", "/encode", {"content": blank_png(28, 28)[:-30], "headers": {"Content-Type": "image/png"}}, 422),
    ("POST", "/decode", {"json": {"latents": [[0.0] * 15]}}, 422),
    (
        "POST",
        "/decode",
        {"content": b'{"latents": [[NaN]]}', "headers": {"Content-Type": "application/json"}},
        422,
    ),
    ("GET", "/sample?n=33", {}, 422),
    ("GET", "/sample?n=many", {}, 422),
    ("POST", "/interpolate", {"json": {"start": [0.0] * 16, "end": [0.0] * 16, "steps": 65}}, 422),
    ("GET", "/nothing-here", {}, 404),
    ("PUT", "/sample", {}, 405),
]


@pytest.mark.parametrize(("method", "path", "request_options", "status"), ERROR_CASES)
def test_error_paths_over_http(
    server: str, method: str, path: str, request_options: dict[str, object], status: int
) -> None:
    response = httpx.request(method, server + path, timeout=30, **request_options)  # type: ignore[arg-type]
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert set(problem) == {"type", "title", "status", "detail"} and problem["status"] == status
    assert "Traceback" not in response.text


def bad_model_dir(source: Path, target: Path, damage: str) -> Path:
    shutil.copytree(source, target)
    if damage == "missing file":
        (target / "decoder.onnx").unlink()
    elif damage == "checksum mismatch":
        with (target / "encoder.onnx").open("ab") as file:
            file.write(b"\0")
    elif damage == "manifest disagrees with the graph":
        manifest = json.loads((target / "manifest.json").read_text())
        manifest["latent_dim"] = 17
        (target / "manifest.json").write_text(json.dumps(manifest))
    elif damage == "not a directory":
        shutil.rmtree(target)
    return target


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing file", "decoder file decoder.onnx named in the manifest is missing"),
        ("checksum mismatch", "encoder file encoder.onnx has sha256"),
        ("manifest disagrees with the graph", "but the manifest implies ['N', 17]"),
        ("not a directory", "does not exist or is not a directory"),
    ],
)
def test_bad_model_directory_stops_with_one_clear_message(
    mnist_model_dir: Path, tmp_path: Path, damage: str, message: str
) -> None:
    model_dir = bad_model_dir(mnist_model_dir, tmp_path / "model", damage)
    result = subprocess.run(
        [*vae_serve(), "--model-dir", str(model_dir), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vae-serve: error: cannot serve the model: "), (
        result.stderr
    )
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def test_cuda_requested_without_cuda_stops_with_one_clear_message(mnist_model_dir: Path) -> None:
    result = subprocess.run(
        [*vae_serve(), "--model-dir", str(mnist_model_dir), "--execution-provider", "cuda"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "'cuda' was requested" in result.stderr


@pytest.mark.skipif(
    not (DEFAULT_MODEL_DIR / "manifest.json").exists(),
    reason="the shipped default model is not committed yet",
)
def test_serves_the_shipped_default_model(tmp_path: Path) -> None:
    with serving(tmp_path) as (base_url, log):
        info = httpx.get(base_url + "/model", timeout=10).json()
        assert info["manifest"]["image"] == {
            "channels": 1,
            "height": 28,
            "width": 28,
            "value_range": [0.0, 1.0],
        }
        assert info["manifest"]["latent_dim"] == 16
        sample = httpx.get(base_url + "/sample?n=4&seed=0", timeout=30)
        assert sample.status_code == 200 and len(sample.json()["images"]) == 4
    assert "GET /sample" not in log.read_text()  # no access log by default


def test_access_log_on_request(tmp_path: Path) -> None:
    with serving(tmp_path, "--access-log", "true") as (base_url, log):
        assert httpx.get(base_url + "/healthz", timeout=10).status_code == 200
    assert '"GET /healthz HTTP/1.1" 200' in log.read_text()


@pytest.fixture(scope="module")
def slow_batching_server(mnist_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server whose lone requests wait 2 s for a batch to fill, with a 1 s deadline and a 4-item queue."""
    limits = ("--max-queue-items", "4", "--max-sample-n", "4", "--max-items-per-request", "4")
    with serving(
        tmp_path_factory.mktemp("slow-server"),
        *("--model-dir", str(mnist_model_dir), "--max-wait-ms", "2000", "--request-timeout-seconds", "1"),
        *(*limits, "--max-interpolation-steps", "4"),
    ) as (base_url, _):
        yield base_url


def metric(base_url: str, line_start: str) -> float:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    return float(next(line for line in text.splitlines() if line.startswith(line_start)).split()[-1])


def wait_for_metric(base_url: str, line_start: str, expected: float, timeout_seconds: float = 5) -> None:
    deadline = time.monotonic() + timeout_seconds
    while metric(base_url, line_start) != expected:
        assert time.monotonic() < deadline, f"{line_start} never reached {expected}"
        time.sleep(0.01)  # poll interval


QUEUE_DEPTH = 'vae_queue_depth{model="mnist-test",part="decoder"}'


def test_deadline_and_full_queue_over_http(slow_batching_server: str) -> None:
    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=slow_batching_server, timeout=30) as client:
            waiting = asyncio.ensure_future(client.get("/sample?n=4&seed=0"))
            while metric(slow_batching_server, QUEUE_DEPTH) != 4:
                await asyncio.sleep(0.01)  # poll interval until the first request is queued
            rejected = await client.get("/sample?n=1")
            return await waiting, rejected

    timed_out, rejected = asyncio.run(scenario())
    assert rejected.status_code == 503 and rejected.headers["retry-after"] == "1"
    assert timed_out.status_code == 504 and timed_out.headers["content-type"] == "application/problem+json"
    assert metric(slow_batching_server, QUEUE_DEPTH) == 0
    assert (
        metric(slow_batching_server, 'vae_requests_rejected_total{model="mnist-test",reason="queue_full"}')
        == 1
    )
    assert (
        metric(slow_batching_server, 'vae_requests_rejected_total{model="mnist-test",reason="timeout"}') == 1
    )


def test_disconnected_client_leaves_no_work_behind(slow_batching_server: str) -> None:
    host, port = slow_batching_server.removeprefix("http://").split(":")
    timeouts_before = metric(
        slow_batching_server, 'vae_requests_rejected_total{model="mnist-test",reason="timeout"}'
    )
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(b"GET /sample?n=3&seed=0 HTTP/1.1\r\nHost: test\r\n\r\n")
        wait_for_metric(slow_batching_server, QUEUE_DEPTH, 3)
    # Gone well before both the 2 s batch wait and the 1 s deadline: the items leave the queue unrun.
    wait_for_metric(slow_batching_server, QUEUE_DEPTH, 0, timeout_seconds=0.8)
    assert (
        metric(
            slow_batching_server,
            'vae_requests_total{endpoint="/sample",method="GET",model="mnist-test",status="499"}',
        )
        == 1
    )
    assert (
        metric(slow_batching_server, 'vae_requests_rejected_total{model="mnist-test",reason="timeout"}')
        == timeouts_before
    )
    assert metric(slow_batching_server, 'vae_items_processed_total{model="mnist-test",part="decoder"}') == 0
