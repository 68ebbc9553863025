"""`docker compose config` (or docker-compose v1, which Debian ships) accepts the stack in every variant."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.config import Settings
from tests.components import apt_install, require_program

REPO_ROOT = Path(__file__).resolve().parents[2]
BASE = ["-f", "docker-compose.yml"]
GPU = [*BASE, "-f", "docker-compose.gpu.yml"]


def compose_command() -> list[str]:
    """`docker compose` if the plugin is there, else `docker-compose` (Debian package docker-compose)."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return [docker, "compose"]
    return [require_program("docker-compose", apt_install("docker-compose"))]  # without `docker compose`


def compose_config(files: list[str], profiles: tuple[str, ...] = ()) -> dict[str, Any]:
    """The merged, validated configuration as compose prints it, parsed."""
    profile_flags = [flag for profile in profiles for flag in ("--profile", profile)]
    unset = ("VAE_", "GRAFANA_")  # the variables the compose files read from the shell
    environment = {key: value for key, value in os.environ.items() if not key.startswith(unset)}
    result = subprocess.run(
        [*compose_command(), *files, *profile_flags, "config"],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert isinstance(config, dict)
    return config


def running_services(files: list[str], profiles: tuple[str, ...] = ()) -> set[str]:
    """The services `up` would start: compose v1 prints profiled services in `config`, so filter here."""
    services = compose_config(files, profiles)["services"]
    return {name for name, service in services.items() if set(service.get("profiles", [])) <= set(profiles)}


def test_default_stack() -> None:
    config = compose_config(BASE)
    assert running_services(BASE) == {"vae", "prometheus", "grafana"}
    service = config["services"]["vae"]
    assert service["build"]["dockerfile"] == "Dockerfile"
    assert service["restart"] == "unless-stopped"
    assert "healthcheck" not in service  # the image's HEALTHCHECK, which follows VAE_PORT, applies
    # Docker's SIGKILL comes after the service's own drain (VAE_SHUTDOWN_GRACE_SECONDS) has had its time.
    drain_seconds = Settings.model_fields["shutdown_grace_seconds"].default
    assert service["stop_grace_period"] == "35s" and drain_seconds < 35
    assert any(_named(volume, "models") for volume in service["volumes"])
    assert "models" in config["volumes"]
    # Unset in the shell means unset in the container: the shipped model is served.
    assert service.get("environment", {}).get("VAE_MODEL_DIR") is None
    assert "deploy" not in service


def test_train_profile() -> None:
    config = compose_config(BASE, ("train",))
    assert running_services(BASE, ("train",)) == {"vae", "prometheus", "grafana", "train"}
    train = config["services"]["train"]
    assert train["build"]["dockerfile"] == "docker/Dockerfile.train"
    assert any(_named(volume, "models") for volume in train["volumes"])


@pytest.mark.parametrize("profiles", [(), ("train",)], ids=["gpu", "gpu+train"])
def test_gpu_override(profiles: tuple[str, ...]) -> None:
    service = compose_config(GPU, profiles)["services"]["vae"]
    assert service["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    assert service["environment"]["VAE_EXECUTION_PROVIDER"] == "cuda"
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1


def test_mounted_config_files_exist() -> None:
    config = compose_config(BASE)
    for name in ("prometheus", "grafana"):
        for volume in config["services"][name]["volumes"]:
            source = volume["source"] if isinstance(volume, dict) else str(volume).split(":")[0]
            if source.startswith("/"):
                assert Path(source).exists(), f"{name} mounts {source}, which does not exist"


def _named(volume: Any, name: str) -> bool:
    """True when a volume entry (short string or long mapping form) mounts the named volume `name`."""
    if isinstance(volume, dict):
        return volume.get("type") == "volume" and volume.get("source") == name
    return str(volume).split(":")[0] == name
