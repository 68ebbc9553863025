"""Replays the service image's build in a fresh venv, then serves the way the image's CMD does.

No Docker engine is needed: the Dockerfile is read, its COPY steps copy from the repository, and its RUN
steps that call pip run with the venv's python (absolute paths in them moved under a temporary root). So a
change to the Dockerfile's install steps changes what this test installs; the two cannot drift apart.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from model.manifest import Manifest, read_manifest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_DIR = REPO_ROOT / "model" / "default"
# An absolute path in a RUN command: "/wheels/*.whl", but not the "//" of a URL or a relative "a/b".
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/$-])/(?=[A-Za-z_])")


class ContainerRoot:
    """A temporary directory standing in for the image's filesystem root."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, container_path: str, workdir: str = "/") -> Path:
        joined = Path(workdir, container_path) if not container_path.startswith("/") else Path(container_path)
        return self.root / joined.relative_to("/")

    def rewrite(self, command: str) -> str:
        return ABSOLUTE_PATH.sub(str(self.root) + "/", command)


def dockerignore_patterns() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip().removeprefix("**/") for line in lines if line.strip() and not line.startswith("#")]


def copy_from_context(sources: list[str], destination: Path) -> None:
    """COPY from the build context (the repository), leaving out what .dockerignore excludes."""
    ignore = shutil.ignore_patterns(*dockerignore_patterns())
    for source in sources:
        source_path = REPO_ROOT / source
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in dockerignore_patterns()), source
        if source_path.is_dir():
            shutil.copytree(source_path, destination, ignore=ignore, dirs_exist_ok=True)
        else:
            destination.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source_path, destination / source_path.name)


def replay_build(deploy: Any, root: ContainerRoot, venv: Path) -> tuple[dict[str, str], list[str], list[str]]:
    """Run the Dockerfile's COPY and pip steps; returns the runtime ENV, CMD and the RUN steps skipped."""
    stages = deploy.parse_dockerfile(REPO_ROOT / "Dockerfile")
    build_environment = dict(os.environ, PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}")
    build_environment.pop("PYTHONPATH", None)
    skipped: list[str] = []
    for stage in stages:
        workdir = "/"
        for instruction in stage.instructions:
            if instruction.keyword == "WORKDIR":
                workdir = instruction.arguments
                root.path(workdir).mkdir(parents=True, exist_ok=True)
            elif instruction.keyword == "COPY":
                words = shlex.split(instruction.arguments)
                # All stages share one root, so COPY --from=<stage> finds its files where they already are.
                if words[0].startswith("--from="):
                    assert root.path(words[1]).exists(), instruction.arguments
                    continue
                *sources, destination = words
                copy_from_context(sources, root.path(destination, workdir))
            elif instruction.keyword == "RUN" and "pip" in instruction.arguments:
                command = root.rewrite(instruction.arguments)
                result = subprocess.run(
                    ["bash", "-euo", "pipefail", "-c", command],
                    cwd=root.path(workdir),
                    env=build_environment,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            elif instruction.keyword == "RUN":
                skipped.append(instruction.arguments)  # system setup (the user account), not Python packages
    runtime = stages[-1]
    return runtime.environment(), runtime.command(), skipped


@pytest.mark.slow
def test_image_install_serves_the_shipped_model_without_torch(
    deploy: Any, processes: Any, tmp_path: Path
) -> None:
    assert (DEFAULT_MODEL_DIR / "manifest.json").is_file(), "the shipped model (model/default) is missing"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    root = ContainerRoot(tmp_path / "root")
    image_environment, command, skipped = replay_build(deploy, root, venv)
    assert all("useradd" in run or "groupadd" in run for run in skipped), skipped

    # The shipped model came inside the wheel: the installed package, not the checkout, holds it.
    venv_python = str(venv / "bin" / "python")
    located = subprocess.run(
        [venv_python, "-c", "from model.manifest import DEFAULT_MODEL_DIR; print(DEFAULT_MODEL_DIR)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    packaged_model = Path(located.stdout.strip())
    assert packaged_model.is_relative_to(venv), packaged_model
    shipped_manifest = (DEFAULT_MODEL_DIR / "manifest.json").read_bytes()
    assert (packaged_model / "manifest.json").read_bytes() == shipped_manifest

    # torch (and the other training-only packages) must not be in the image.
    installed = subprocess.run(
        [venv_python, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True
    )
    packages = {entry["name"].lower() for entry in json.loads(installed.stdout)}
    assert "vae-service" in packages
    assert not packages & {"torch", "onnx", "onnxscript", "mlxtend", "matplotlib"}, sorted(packages)

    # Serve exactly as the image's CMD does, with the image's ENV, on 127.0.0.1 and a free port.
    port = deploy.free_port()
    environment = {
        "PATH": f"{venv / 'bin'}{os.pathsep}/usr/local/bin{os.pathsep}/usr/bin{os.pathsep}/bin",
        "HOME": str(tmp_path),
        **image_environment,
        "VAE_HOST": "127.0.0.1",
        "VAE_PORT": str(port),
    }
    assert image_environment["VAE_HOST"] == "0.0.0.0"
    executable = shutil.which(command[0], path=environment["PATH"])
    assert executable == str(venv / "bin" / command[0]), executable
    workdir = tmp_path / "workdir"  # not the repository, so nothing is imported from the checkout
    workdir.mkdir()
    server = processes.start([executable, *command[1:]], environment, workdir, "vae-serve")
    base_url = f"http://127.0.0.1:{port}"
    processes.wait_until_answering(server, f"{base_url}/readyz", timeout_seconds=60)

    with urllib.request.urlopen(f"{base_url}/model", timeout=5) as response:
        served = Manifest.model_validate(json.load(response)["manifest"])
    assert served == read_manifest(DEFAULT_MODEL_DIR)
