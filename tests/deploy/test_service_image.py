"""The real `Dockerfile`, built on the stand-in base and run in a real Docker engine with host networking.

The container's answers are compared with the same model served in-process from the checkout, so "a PNG grid
of digits" means the very digits the shipped model decodes, not just some PNG.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.main import create_app
from model.manifest import DEFAULT_MODEL_DIR

pytestmark = [pytest.mark.slow, pytest.mark.containers]

REPO_ROOT = Path(__file__).resolve().parents[2]
UNPRIVILEGED_UID = 10001
# Measured: the stand-in base is 145 MB (Debian minbase with Python 3.11), the service's dependencies
# 226 MB (onnxruntime 78, numpy 73, pillow 22, pip 16, uvloop 14, ...), the wheel with the model 7 MB:
# 361 MiB. 600 MiB leaves room for dependency growth, yet fails at once if torch (754 MB for the CPU build
# alone) or a CUDA runtime slips into the image.
IMAGE_SIZE_BOUND_BYTES = 600 * 1024 * 1024
# Docker's default stop timeout: an idle service must be gone well before docker would SIGKILL it.
STOP_TIMEOUT_SECONDS = 10
IDLE_STOP_BOUND_SECONDS = 5


def training_only_packages() -> set[str]:
    """What the `train` extra adds to the service's dependencies (torch, onnx, mlxtend, ...), by name."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower() for requirement in requirements}

    return names(project["optional-dependencies"]["train"]) - names(project["dependencies"])


@pytest.fixture(scope="module")
def container(containers: ModuleType, docker_engine: Any, service_image: Any, deploy: Any) -> Iterator[Any]:
    """The image as `docker run` starts it: the shipped model, the image's own CMD and HEALTHCHECK."""
    started = containers.ServiceContainer(docker_engine, service_image.tag, deploy.free_port())
    try:
        started.wait_until_ready(deploy)
        yield started
    finally:
        started.remove()


@pytest.fixture(scope="module")
def in_process() -> Iterator[TestClient]:
    """The same shipped model served from the checkout, as the reference for the container's answers."""
    with TestClient(create_app(Settings(_env_file=None, model_dir=None))) as client:
        yield client


def png_pixels(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)).convert("L"), dtype=np.int16)


def test_image_builds_on_the_standin_and_stays_small(
    docker_engine: Any, service_image: Any, container_report: list[str]
) -> None:
    size_bytes = int(docker_engine.docker("image", "inspect", "--format={{.Size}}", service_image.tag).stdout)
    container_report.append(
        f"service image: {size_bytes / 2**20:.0f} MiB (bound {IMAGE_SIZE_BOUND_BYTES / 2**20:.0f} MiB), "
        f"built in {service_image.build_seconds:.0f} s"
    )
    assert size_bytes < IMAGE_SIZE_BOUND_BYTES


def test_container_serves_the_shipped_model(container: Any, in_process: TestClient) -> None:
    sample_url = "/sample?n=16&seed=3"
    png_headers = {"Accept": "image/png"}
    grid = httpx.get(container.base_url + sample_url, headers=png_headers, timeout=30)
    assert grid.status_code == 200 and grid.headers["content-type"] == "image/png"
    expected_grid = in_process.get(sample_url, headers=png_headers)
    pixels, expected_pixels = png_pixels(grid.content), png_pixels(expected_grid.content)
    assert pixels.shape == expected_pixels.shape and pixels.shape[0] > 4 * 28  # a 4x4 grid of 28x28 digits
    assert np.abs(pixels - expected_pixels).max() <= 2  # onnxruntime builds may differ in the last bits

    digit = in_process.get("/sample?n=1&seed=4", headers=png_headers).content
    upload = {"file": ("digit.png", digit, "image/png")}
    encoded = httpx.post(f"{container.base_url}/encode", files=upload, timeout=30)
    assert encoded.status_code == 200, encoded.text
    (posterior,) = encoded.json()["items"]
    (expected,) = in_process.post("/encode", files=upload).json()["items"]
    np.testing.assert_allclose(posterior["mean"], expected["mean"], atol=1e-4)
    np.testing.assert_allclose(posterior["std"], expected["std"], atol=1e-4)


def test_healthcheck_turns_healthy(container: Any, deploy: Any) -> None:
    # The HEALTHCHECK's first probe runs one interval (10 s) after the start.
    def healthy() -> bool | None:
        status = container.inspect("{{.State.Health.Status}}")
        if status == "unhealthy":
            pytest.fail(f"the HEALTHCHECK failed: {container.inspect('{{json .State.Health.Log}}')}")
        return status == "healthy" or None

    deploy.poll(healthy, 60, "a healthy container")
    probes = json.loads(container.inspect("{{json .State.Health.Log}}"))
    assert probes and probes[-1]["ExitCode"] == 0


def test_runs_unprivileged_without_torch(container: Any) -> None:
    assert container.exec("id", "-u").stdout.strip() == str(UNPRIVILEGED_UID)
    server_status = container.exec("cat", "/proc/1/status").stdout
    (uid_line,) = [line for line in server_status.splitlines() if line.startswith("Uid:")]
    assert set(uid_line.split()[1:]) == {str(UNPRIVILEGED_UID)}  # real, effective, saved, filesystem
    assert container.exec("cat", "/proc/1/cmdline").stdout.split("\0")[1].endswith("vae-serve")
    torch = container.exec("python", "-c", "import torch", check=False)
    assert torch.returncode != 0 and "No module named 'torch'" in torch.stderr
    listing = "import importlib.metadata as m; print('\\n'.join(d.name for d in m.distributions()))"
    packages = {name.lower() for name in container.exec("python", "-c", listing).stdout.split()}
    assert "vae-service" in packages and "onnxruntime" in packages
    training_only = training_only_packages()
    assert "torch" in training_only and not packages & training_only, sorted(packages & training_only)


def test_serves_a_read_only_mounted_model_and_stops_on_sigterm(
    containers: ModuleType, docker_engine: Any, service_image: Any, deploy: Any, tmp_path: Path
) -> None:
    model_dir = tmp_path / "mounted-model"
    shutil.copytree(DEFAULT_MODEL_DIR, model_dir)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    manifest["name"] = "mounted-vae"  # the checksums cover the model files, not the manifest's own name
    (model_dir / "manifest.json").write_text(json.dumps(manifest))
    model_dir.chmod(0o755)  # the container's user is not the file owner; the bind mount skips tmp_path's 0700
    mounted = containers.ServiceContainer(
        docker_engine,
        service_image.tag,
        deploy.free_port(),
        *containers.serve_model_dir(model_dir, "mounted"),
    )
    try:
        mounted.wait_until_ready(deploy)
        served = httpx.get(f"{mounted.base_url}/model", timeout=10).json()
        assert served["manifest"]["name"] == "mounted-vae"
        assert httpx.get(f"{mounted.base_url}/sample?n=2", timeout=10).status_code == 200
        write = mounted.exec("touch", "/models/mounted/written", check=False)
        assert write.returncode != 0 and "Read-only file system" in write.stderr

        started = time.monotonic()
        docker_engine.docker("stop", f"--time={STOP_TIMEOUT_SECONDS}", mounted.name, timeout_seconds=60)
        stopped_seconds = time.monotonic() - started
        # Exit 0 means the service itself exited on SIGTERM; a SIGKILL after the timeout would read 137.
        assert mounted.inspect("{{.State.ExitCode}}") == "0", mounted.logs()
        assert stopped_seconds < IDLE_STOP_BOUND_SECONDS
        assert "Application shutdown complete" in mounted.logs()
    finally:
        mounted.remove()
