"""A private Docker engine for the container tests, and the stand-in Python base image they build on.

No registry answers from CI, so `python:3.11-slim-bookworm` cannot be pulled. The stand-in is Debian
bookworm from `debootstrap` with Python 3.11 laid out as the official slim image lays it out: a venv at
/usr/local, so `python`, `python3`, `pip` and every console script pip installs are in /usr/local/bin on
PATH, and pip works without `--break-system-packages`. It carries the host's CA trust store (pip is pointed
at it in /etc/pip.conf): some networks intercept TLS, and pip inside `docker build` must still reach PyPI.

The engine is a `dockerd` of our own on a private socket, started with `--bridge=none --iptables=false`:
every container and build runs with host networking, and no bridge network or private-range address is
ever made. Its data root lives in the user's cache, so the stand-in (tagged by a hash of its recipe and the
CA store) and the build cache survive to the next run; the daemon is stopped by its pid when tests end.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import re
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.components import apt_install

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("python3", "python3-venv", "ca-certificates")
IMAGE_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# Run inside the debootstrapped tree (chroot): the official image's layout, pip's trust store, and no caches.
CUSTOMIZE = f"""
set -eu
python3 -m venv /usr/local
printf '[global]\\ncert = {IMAGE_CA_BUNDLE}\\n' > /etc/pip.conf
/usr/local/bin/python -m pip --version
apt-get clean
: > /etc/resolv.conf
: > /etc/hostname
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /usr/share/doc/* /usr/share/man/* /usr/share/locale/* /tmp/*
"""
IMAGE_CHANGES = (
    "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
)
DAEMON_START_SECONDS = 60


class EngineUnavailable(Exception):
    """Docker cannot run on this machine: the component that is missing, why, and what provides it."""

    def __init__(self, component: str, install: str, why: str) -> None:
        super().__init__(f"{component} is missing ({why}); install it with: {install}")
        self.component = component
        self.install = install
        self.why = why


def cache_dir() -> Path:
    """Where the engine's data root (images, build cache) persists between runs."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vae-service" / "container-tests"


@dataclass
class DockerEngine:
    """A running `dockerd` on a private socket, and the `docker` client that talks to it."""

    process: subprocess.Popen[bytes]
    state_dir: Path
    log_path: Path

    @property
    def host(self) -> str:
        """The DOCKER_HOST value of this engine's socket."""
        return f"unix://{self.state_dir / 'docker.sock'}"

    def environment(self, **extra: str) -> dict[str, str]:
        """The test process's environment pointed at this engine (for docker and docker-compose)."""
        return {**os.environ, "DOCKER_HOST": self.host, **extra}

    def docker(
        self, *arguments: str, timeout_seconds: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run the docker client; with check, a non-zero exit fails with its output."""
        result = subprocess.run(
            ["docker", *arguments],
            env=self.environment(),
            capture_output=True,
            text=True,
            timeout=timeout_seconds,
            check=False,
        )
        if check and result.returncode != 0:
            # The legacy builder prints a failed step's own output (pip's error, say) on stdout.
            raise AssertionError(
                f"docker {' '.join(arguments)} exited {result.returncode}:\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def log_tail(self, characters: int = 3000) -> str:
        """The end of dockerd's own log, for failure messages."""
        return self.log_path.read_text(errors="replace")[-characters:]

    def stop(self) -> None:
        """Stop the daemon we started, by its pid; it stops any container still running first."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # dockerd leaves its default network namespace mounted in the exec root.
        for mount_point in mounts_under(self.state_dir):
            subprocess.run(["umount", mount_point], capture_output=True, check=False)
        shutil.rmtree(self.state_dir, ignore_errors=True)


def mounts_under(directory: Path) -> list[str]:
    """Mount points below directory, deepest first."""
    mount_points = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    inside = [point for point in mount_points if point.startswith(f"{directory}/")]
    return sorted(inside, key=len, reverse=True)


def start_engine(data_root: Path) -> DockerEngine:
    """Start `dockerd` for host networking only; raise EngineUnavailable when this machine cannot run one."""
    if os.geteuid() != 0:
        raise EngineUnavailable(
            "root",
            "sudo .venv/bin/pytest -m containers",
            "the container tests start a dockerd of their own, and rootless Docker is not set up",
        )
    for program in ("dockerd", "docker"):
        if shutil.which(program) is None:
            raise EngineUnavailable(program, apt_install("docker.io"), f"{program} is not on PATH")
    data_root.mkdir(parents=True, exist_ok=True)
    # A short path of its own: unix socket paths are limited to about 100 characters.
    state_dir = Path(tempfile.mkdtemp(prefix="vae-dockerd-", dir="/tmp"))
    log_path = state_dir / "dockerd.log"
    # An empty config of its own: nothing from the host's /etc/docker/daemon.json applies.
    (state_dir / "daemon.json").write_text("{}\n")
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                "dockerd",
                f"--config-file={state_dir / 'daemon.json'}",
                "--bridge=none",
                "--iptables=false",
                "--ip-masq=false",
                # Private even where a system containerd runs (dockerd would share its namespace).
                "--containerd-namespace=vae-container-tests",
                "--containerd-plugins-namespace=vae-container-tests-plugins",
                f"--host=unix://{state_dir / 'docker.sock'}",
                f"--data-root={data_root}",
                f"--exec-root={state_dir / 'exec'}",
                f"--pidfile={state_dir / 'dockerd.pid'}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    engine = DockerEngine(process, state_dir, log_path)
    deadline = time.monotonic() + DAEMON_START_SECONDS
    try:
        while engine.docker("version", check=False, timeout_seconds=10).returncode != 0:
            if process.poll() is not None or time.monotonic() > deadline:
                raise EngineUnavailable(
                    "a working dockerd",
                    "a machine (or a privileged container) where root can start dockerd",
                    f"dockerd did not start (exit {process.poll()}):\n{engine.log_tail()}",
                )
            time.sleep(0.2)
    except BaseException:
        engine.stop()
        raise
    return engine


def host_ca_bundle() -> Path:
    """The CA store this machine trusts (with any TLS-intercepting proxy's CA in it)."""
    candidates = [os.environ.get("SSL_CERT_FILE"), ssl.get_default_verify_paths().cafile, IMAGE_CA_BUNDLE]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate).resolve()
    raise EngineUnavailable(
        "a CA bundle",
        "sudo apt-get install -y ca-certificates",
        "none at SSL_CERT_FILE, OpenSSL's default path or Debian's",
    )


def standin_python_image(engine: DockerEngine, work_dir: Path) -> str:
    """The tag of the stand-in for python:3.11-slim-bookworm, built unless the engine already has it."""
    ca_bundle = host_ca_bundle()
    recipe = repr((SUITE, MIRROR, PACKAGES, CUSTOMIZE, IMAGE_CHANGES)).encode()
    key = hashlib.sha256(recipe + ca_bundle.read_bytes()).hexdigest()[:12]
    tag = f"vae-standin-python:3.11-{SUITE}-{key}"
    if engine.docker("image", "inspect", tag, check=False).returncode == 0:
        return tag
    if shutil.which("debootstrap") is None:
        raise EngineUnavailable("debootstrap", apt_install("debootstrap"), "debootstrap is not on PATH")
    root = work_dir / "rootfs"
    try:
        bootstrap = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(root), MIRROR],
            capture_output=True,
            text=True,
            check=False,
            timeout=900,
        )
    finally:
        # debootstrap mounts /proc and /sys in the tree and unmounts them only when it exits normally.
        for mount_point in mounts_under(root):
            subprocess.run(["umount", "--lazy", mount_point], capture_output=True, check=False)
    if bootstrap.returncode != 0:
        output = f"{bootstrap.stdout[-2000:]}\n{bootstrap.stderr[-2000:]}"
        raise AssertionError(f"debootstrap failed ({bootstrap.returncode}):\n{output}")
    shutil.copyfile(ca_bundle, root / IMAGE_CA_BUNDLE.lstrip("/"))
    customized = subprocess.run(
        ["chroot", str(root), "/bin/sh", "-c", CUSTOMIZE],
        env={
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
        },  # none of the host's PIP_* or PYTHON*
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert customized.returncode == 0, f"customizing the stand-in failed:\n{customized.stderr[-3000:]}"
    changes = [flag for change in IMAGE_CHANGES for flag in ("--change", change)]
    tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run(
        ["docker", "import", *changes, "-", tag],
        stdin=tar.stdout,
        env=engine.environment(),
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert tar.stdout is not None
    tar.stdout.close()
    assert tar.wait() == 0 and imported.returncode == 0, imported.stderr
    shutil.rmtree(root, ignore_errors=True)
    listed = engine.docker("images", "--format={{.Repository}}:{{.Tag}}", "vae-standin-python")
    for old in listed.stdout.split():
        if old != tag:  # stand-ins of earlier recipes
            engine.docker("rmi", old, check=False)
    return tag


class ServiceContainer:
    """One `docker run -d --network host` of the service image, on 127.0.0.1 and a free port."""

    def __init__(self, engine: Any, image: str, port: int, *run_options: str) -> None:
        self.engine = engine
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.name = f"vae-container-test-{port}"
        started = engine.docker(
            "run",
            "--detach",
            "--network=host",
            f"--name={self.name}",
            "--env=VAE_HOST=127.0.0.1",
            f"--env=VAE_PORT={port}",
            *run_options,
            image,
            check=False,
        )
        if started.returncode != 0:
            self.remove()  # a container created but not started
            raise AssertionError(f"docker run {image} failed:\n{started.stderr}")

    def inspect(self, template: str) -> str:
        return str(self.engine.docker("inspect", f"--format={template}", self.name).stdout.strip())

    def logs(self) -> str:
        result = self.engine.docker("logs", self.name, check=False)
        return f"{result.stdout}{result.stderr}"[-4000:]

    def exec(self, *command: str, check: bool = True) -> Any:
        return self.engine.docker("exec", self.name, *command, check=check)

    def wait_until_ready(self, deploy: Any) -> None:
        """Poll /readyz; fail with the container's log if it exits first."""

        def ready() -> bool | None:
            if self.inspect("{{.State.Running}}") != "true":
                pytest.fail(f"container exited:\n{self.logs()}")
            return deploy.http_status(f"{self.base_url}/readyz") == 200 or None

        deploy.poll(ready, 90, f"{self.name} to answer /readyz")

    def remove(self) -> None:
        self.engine.docker("rm", "--force", self.name, check=False)


def serve_model_dir(model_dir: Path, name: str) -> tuple[str, str]:
    """`docker run` options that mount a model directory read-only at /models/<name> and serve it."""
    return f"--volume={model_dir}:/models/{name}:ro", f"--env=VAE_MODEL_DIR=/models/{name}"


class PackageIndex:
    """A PEP 503 simple index of a folder of wheels on 127.0.0.1, for `docker build --network host`.

    The training image installs torch from PyTorch's CPU-only index, which no machine here reaches; this
    index serves the CPU wheel that pip finds on the host instead, through the Dockerfile's TORCH_INDEX_URL.
    """

    def __init__(self, wheel_dir: Path, site_dir: Path, port: int) -> None:
        for wheel in sorted(wheel_dir.glob("*.whl")):
            project = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
            page = site_dir / "simple" / project
            page.mkdir(parents=True, exist_ok=True)
            link = f'<a href="/files/{wheel.name}">{wheel.name}</a><br>\n'
            with (page / "index.html").open("a") as index:
                index.write(link)
        (site_dir / "files").symlink_to(wheel_dir.resolve(), target_is_directory=True)
        handler = functools.partial(QuietHandler, directory=str(site_dir))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.url = f"http://127.0.0.1:{port}/simple"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files without a log line per request in the test output."""

    def log_message(self, format: str, *args: Any) -> None:
        pass
