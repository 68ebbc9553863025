"""A real `vae-serve` process: SIGHUP reloads the model directory, SIGTERM lets requests in flight finish."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.app.test_server import metric, start_server, stop_server, vae_serve

pytestmark = pytest.mark.slow

DEADLINE_SECONDS = 30


def test_sighup_reloads_the_model_directory(
    mnist_model_dir: Path, mnist_model_v2_dir: Path, tmp_path: Path
) -> None:
    model_dir = shutil.copytree(mnist_model_dir, tmp_path / "model")
    process, base_url, log = start_server(tmp_path, "--model-dir", str(model_dir), "--max-batch-size", "4")
    try:
        assert httpx.get(base_url + "/model", timeout=10).json()["model"] == "mnist-test/1"
        for name in ("encoder.onnx", "decoder.onnx", "manifest.json"):  # deploy version 2 in place
            shutil.copy(mnist_model_v2_dir / name, model_dir / name)
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + DEADLINE_SECONDS
        while httpx.get(base_url + "/model", timeout=10).json()["model"] != "mnist-test/2":
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"no reload after SIGHUP:\n{log.read_text()}"
            time.sleep(0.05)  # poll interval
        sample = httpx.get(base_url + "/sample?n=1&seed=0", timeout=10)
        assert sample.headers["x-model-version"] == "mnist-test/2"
        assert (
            metric(base_url, 'vae_model_reloads_total{action="reload",model="mnist-test",result="success"}')
            == 1
        )
    finally:
        stop_server(process, log)


def test_sigterm_finishes_requests_in_flight_and_exits_0(mnist_model_dir: Path, tmp_path: Path) -> None:
    # Lone requests wait 3 s in the batcher for company: long enough to be in flight when SIGTERM comes.
    process, base_url, log = start_server(
        tmp_path,
        "--model-dir",
        str(mnist_model_dir),
        "--max-wait-ms",
        "3000",
        "--shutdown-grace-seconds",
        "20",
    )

    async def requests_across_sigterm() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base_url, timeout=DEADLINE_SECONDS) as client:
            in_flight = [asyncio.ensure_future(client.get(f"/sample?n=1&seed={seed}")) for seed in range(3)]
            deadline = time.monotonic() + DEADLINE_SECONDS
            while metric(base_url, 'vae_queue_depth{model="mnist-test",part="decoder"}') != 3:
                assert time.monotonic() < deadline, "the requests never reached the batcher"
                await asyncio.sleep(0.01)  # poll interval
            process.terminate()
            return list(await asyncio.gather(*in_flight))

    try:
        responses = asyncio.run(requests_across_sigterm())
        assert [response.status_code for response in responses] == [200, 200, 200]
        assert process.wait(timeout=DEADLINE_SECONDS) == 0, log.read_text()
        assert "Application shutdown complete" in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_busy_port_is_reported_before_the_model_loads(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # A model directory that does not exist: the port check must come first to be seen at all.
        started = subprocess.run(
            [*vae_serve(), "--port", str(port), "--model-dir", str(tmp_path / "missing")],
            capture_output=True,
            text=True,
            timeout=DEADLINE_SECONDS,
        )
    assert started.returncode == 1
    assert started.stderr == (
        f"vae-serve: error: port {port} on 127.0.0.1 is already in use; serve on another port with --port "
        f"or VAE_PORT (e.g. VAE_PORT={port + 1} make run), or bind another address with --host / VAE_HOST\n"
    )
