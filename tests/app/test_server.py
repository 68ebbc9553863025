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


def start_server(tmp_path: Path, *flags: str) -> tuple[subprocess.Popen[bytes], str, Path]:
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


@pytest.fixture(scope="module")
def server(mnist_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp_path = tmp_path_factory.mktemp("server")
    process, base_url, log = start_server(
        tmp_path, "--model-dir", str(mnist_model_dir), "--max-batch-size", "16", "--max-wait-ms", "50"
    )
    try:
        yield base_url
    finally:
        stop_server(process, log)


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
            'vae_requests_total{endpoint="/sample",method="GET",status="200"}' in client.get("/metrics").text
        )


def test_concurrent_requests_are_batched_over_http(server: str) -> None:
    def batch_count(metrics_text: str) -> float:
        line = next(
            line
            for line in metrics_text.splitlines()
            if line.startswith('vae_batch_size_count{part="decoder"}')
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
        ("not a directory", "does not exist"),
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
    process, base_url, log = start_server(tmp_path)
    try:
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
    finally:
        stop_server(process, log)
