"""`docker/Dockerfile.train` for real: build it, train one short epoch in it, serve what it exported.

The Dockerfile installs torch from PyTorch's CPU-only index (TORCH_INDEX_URL). No machine here reaches that
index, so the test mirrors the one package it is used for: the CPU wheel pip finds on the host, served as a
PEP 503 index on 127.0.0.1 and passed as TORCH_INDEX_URL. Everything else comes from PyPI, as in production.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from tests.components import missing_component

pytestmark = [pytest.mark.slow, pytest.mark.containers]

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile.train"
TRAINING_USER = "10001:10001"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"  # where pip finds torch==<version>+cpu
# One epoch of a tiny network on 256 MNIST digits: seconds of training; the rest is evaluation and export.
SHORT_RUN = [
    "--max-train-images=256",
    "--validation-size=64",
    "--latent-dim=4",
    "--widths=4,8",
    "--hidden-dim=16",
    "--batch-size=32",
    "--epochs=1",
    "--kl-warmup-epochs=1",
    "--num-threads=2",
    "--no-progress",
    "--eval-samples=2",
    "--iwae-samples=4",
    "--judge-epochs=1",
    "--model-name=container-trained",
    "--model-version=0.0.1",
    "--allow-weak-model",  # one epoch of a tiny network is weak on purpose
    "--run-dir=runs/container",
    "--export-dir=/models/container-trained",
]


def torch_version() -> str:
    found = re.search(r"^ARG TORCH_VERSION=(\S+)$", TRAIN_DOCKERFILE.read_text(), re.MULTILINE)
    assert found is not None, "docker/Dockerfile.train no longer has ARG TORCH_VERSION=..."
    return found.group(1)


def cpu_torch_wheels(containers: ModuleType) -> Path:
    """The CPU build of torch and its dependencies as wheels, from whatever index pip on this host has."""
    wheel_dir = containers.cache_dir() / "wheels" / f"torch-{torch_version()}-cpu-cp311"
    if wheel_dir.is_dir():
        return wheel_dir
    partial = wheel_dir.with_name(wheel_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    # For the image's Python (3.11), whatever the host's; `+cpu` pins the CPU build (PyPI's plain torch
    # would pull gigabytes of CUDA libraries).
    pip = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", f"--dest={partial}"]
    target = ["--python-version=3.11", "--implementation=cp", "--abi=cp311"]
    download = subprocess.run(
        [*pip, *target, f"torch=={torch_version()}+cpu"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if download.returncode != 0:
        missing_component(
            f"torch {torch_version()}+cpu wheels",
            f"PIP_EXTRA_INDEX_URL={TORCH_CPU_INDEX} .venv/bin/pytest tests/deploy/test_train_image.py",
            f"pip finds no CPU build of torch {torch_version()} here:\n{download.stderr[-1500:]}",
        )
    partial.rename(wheel_dir)  # complete downloads only
    return wheel_dir


@pytest.fixture(scope="module")
def train_image(
    containers: ModuleType,
    docker_engine: Any,
    standin_python_image: str,
    deploy: Any,
    tmp_path_factory: pytest.TempPathFactory,
    container_report: list[str],
) -> str:
    wheels = cpu_torch_wheels(containers)
    index = containers.PackageIndex(wheels, tmp_path_factory.mktemp("torch-index"), deploy.free_port())
    tag = "vae-service-train:container-tests"
    started = time.monotonic()
    try:
        docker_engine.docker(
            "build",
            "--network=host",
            f"--build-arg=PYTHON_IMAGE={standin_python_image}",
            f"--build-arg=TORCH_INDEX_URL={index.url}",
            f"--tag={tag}",
            f"--file={TRAIN_DOCKERFILE}",
            str(REPO_ROOT),
            timeout_seconds=1200,
        )
    finally:
        index.close()
    size_bytes = int(docker_engine.docker("image", "inspect", "--format={{.Size}}", tag).stdout)
    container_report.append(
        f"training image: {size_bytes / 2**20:.0f} MB, built in {time.monotonic() - started:.0f} s"
    )
    return tag


def test_training_image_trains_and_exports_a_model_the_service_image_serves(
    containers: ModuleType,
    train_image: str,
    service_image: Any,
    docker_engine: Any,
    deploy: Any,
    tmp_path: Path,
    container_report: list[str],
) -> None:
    assert (
        docker_engine.docker("inspect", "--format={{.Config.User}}", train_image).stdout.strip()
        == TRAINING_USER
    )
    version = docker_engine.docker(
        "run",
        "--rm",
        "--network=host",
        "--entrypoint=python",
        train_image,
        "-c",
        "import torch; print(torch.__version__)",
    )
    assert version.stdout.strip() == f"{torch_version()}+cpu"  # the CPU build, no CUDA libraries
    models = tmp_path / "models"
    models.mkdir()
    models.chmod(0o777)  # written by the image's unprivileged user
    started = time.monotonic()
    name = f"vae-container-test-training-{os.getpid()}"
    try:
        trained = docker_engine.docker(
            "run",
            f"--name={name}",
            "--network=host",
            f"--volume={models}:/models",
            train_image,
            *SHORT_RUN,
            timeout_seconds=900,
            check=False,
        )
    finally:
        docker_engine.docker("rm", "--force", name, check=False)  # also when the client timed out
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    container_report.append(
        f"training image: one short epoch, evaluated and exported in {time.monotonic() - started:.0f} s"
    )
    exported = models / "container-trained"
    manifest = json.loads((exported / "manifest.json").read_text())
    assert (manifest["name"], manifest["version"], manifest["latent_dim"]) == (
        "container-trained",
        "0.0.1",
        4,
    )
    assert manifest["training_data"]["train_size"] == 256
    assert {"encoder.onnx", "decoder.onnx", "latent_space.npz", "score_reference.npz"} <= {
        path.name for path in exported.iterdir()
    }

    # The model a training container wrote, served read-only by the service image: README's Docker workflow.
    served = containers.ServiceContainer(
        docker_engine,
        service_image.tag,
        deploy.free_port(),
        *containers.serve_model_dir(exported, "container-trained"),
    )
    try:
        served.wait_until_ready(deploy)
        model = httpx.get(f"{served.base_url}/model", timeout=10).json()
        assert (model["manifest"]["name"], model["manifest"]["latent_dim"]) == ("container-trained", 4)
        sampled = httpx.get(f"{served.base_url}/sample?n=4&seed=0&format=array", timeout=10)
        assert sampled.status_code == 200 and len(sampled.json()["images"]) == 4
    finally:
        served.remove()
