"""`docker-compose up` for real: the service and Prometheus in containers, the dashboard's queries answered.

Runs docker-compose.yml with tests/deploy/compose.standin.yml on top (host networking, local stand-in images,
no Grafana, whose image cannot be had here) in a private Docker engine, then `down -v` leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.components import apt_install, missing_component

pytestmark = [pytest.mark.slow, pytest.mark.containers]

REPO_ROOT = Path(__file__).resolve().parents[2]
OVERRIDE = Path(__file__).with_name("compose.standin.yml")
BUILT_IN_NETWORKS = {"host", "none"}  # all a dockerd with --bridge=none has


def compose_program() -> list[str]:
    """Debian's docker-compose 1.29, or the Compose v2 plugin where the machine has that; [] if neither."""
    legacy = shutil.which("docker-compose")
    if legacy is not None:
        return [legacy]
    if subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode == 0:
        return ["docker", "compose"]
    return []


def project_leftovers(engine: Any, project: str) -> dict[str, list[str]]:
    """Containers, volumes and networks that still carry the project's label."""
    label = f"--filter=label=com.docker.compose.project={project}"
    found = {
        "containers": engine.docker("ps", "--all", "--quiet", label).stdout.split(),
        "volumes": engine.docker("volume", "ls", "--quiet", label).stdout.split(),
        "networks": engine.docker("network", "ls", "--quiet", label).stdout.split(),
    }
    return {kind: names for kind, names in found.items() if names}


def remove_leftovers(engine: Any, leftovers: dict[str, list[str]]) -> None:
    """Remove by hand what a failed `down` left, so it does not outlive the test."""
    for container in leftovers.get("containers", []):
        engine.docker("rm", "--force", "--volumes", container, check=False)
    for volume in leftovers.get("volumes", []):
        engine.docker("volume", "rm", "--force", volume, check=False)
    for network in leftovers.get("networks", []):
        engine.docker("network", "rm", network, check=False)


def test_compose_stack_is_scraped_and_leaves_nothing(
    docker_engine: Any,
    standin_python_image: str,
    dashboard_checks: ModuleType,
    deploy: Any,
    tmp_path: Path,
    container_report: list[str],
) -> None:
    program = compose_program()
    if not program:
        missing_component(
            "docker-compose",
            apt_install("docker-compose"),
            "neither docker-compose nor `docker compose` runs",
        )
    vae_port, prometheus_port = deploy.free_ports(2)
    prometheus_config = dashboard_checks.prometheus_config_for_test(tmp_path, vae_port)
    prometheus_config.chmod(0o644)  # read by Prometheus's user (nobody) in its container
    project = f"vae-stack-test-{os.getpid()}"
    # Nothing from the developer's shell that compose or docker would read (COMPOSE_PROFILES, DOCKER_CONTEXT).
    environment = {
        key: value
        for key, value in docker_engine.environment().items()
        if not key.startswith(("VAE_", "COMPOSE_", "DOCKER_")) or key == "DOCKER_HOST"
    }
    environment.update(
        STANDIN_PYTHON_IMAGE=standin_python_image,
        VAE_PORT=str(vae_port),
        PROMETHEUS_PORT=str(prometheus_port),
        PROMETHEUS_CONFIG=str(prometheus_config),
        COMPOSE_PROJECT_NAME=project,
    )

    # Not the .env a user may keep next to docker-compose.yml.
    no_env_file = tmp_path / "empty.env"
    no_env_file.write_text("")

    def compose(
        *arguments: str, files: tuple[Path, ...], check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        options = [*(f"--file={file}" for file in files), f"--env-file={no_env_file}"]
        result = subprocess.run(
            [*program, *options, *arguments],
            cwd=REPO_ROOT,
            env=environment,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if check:
            output = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            assert result.returncode == 0, f"{' '.join(arguments)}:\n{output}"
        return result

    merged = yaml.safe_load(compose("config", files=(REPO_ROOT / "docker-compose.yml", OVERRIDE)).stdout)
    for name, service in merged["services"].items():
        assert service["network_mode"] == "host", name
        service.pop("ports", None)  # host networking publishes nothing; docker-compose 1.29 refuses both
    stack_file = tmp_path / "docker-compose.yml"
    stack_file.write_text(yaml.safe_dump(merged))
    stack = (stack_file,)

    base_url = f"http://127.0.0.1:{vae_port}"
    prometheus_url = f"http://127.0.0.1:{prometheus_port}"
    started = time.monotonic()
    try:
        compose("up", "--detach", "--build", files=stack)
        deploy.poll(lambda: deploy.http_status(f"{base_url}/readyz") == 200 or None, 90, "the service")
        deploy.poll(lambda: deploy.http_status(f"{prometheus_url}/-/ready") == 200 or None, 60, "Prometheus")
        container_report.append(f"compose stack: up --build and ready in {time.monotonic() - started:.0f} s")
        running = compose("ps", "--services", "--filter", "status=running", files=stack).stdout.split()
        assert set(running) == {"vae", "prometheus"}
        (vae_container,) = compose("ps", "--quiet", "vae", files=stack).stdout.split()

        def healthy() -> bool | None:
            status = docker_engine.docker("inspect", "--format={{.State.Health.Status}}", vae_container)
            return status.stdout.strip() == "healthy" or None

        deploy.poll(healthy, 60, "the service's container to turn healthy")
        dashboard_checks.assert_every_query_has_data(base_url, prometheus_url, deploy.poll)
        networks = set(docker_engine.docker("network", "ls", "--format={{.Name}}").stdout.split())
        assert networks == BUILT_IN_NETWORKS, f"compose created networks: {networks - BUILT_IN_NETWORKS}"
    finally:
        stopping = time.monotonic()
        down = compose("down", "--volumes", "--remove-orphans", files=stack, check=False)
        container_report.append(f"compose stack: down -v in {time.monotonic() - stopping:.0f} s")
        leftovers = project_leftovers(docker_engine, project)
        remove_leftovers(docker_engine, leftovers)
    assert down.returncode == 0, down.stderr[-3000:]
    assert leftovers == {}
