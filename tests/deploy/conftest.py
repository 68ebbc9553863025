"""Helpers for the deployment checks: a Dockerfile reader, free ports, polling, real `vae-serve` processes.

Test modules use them through fixtures (pytest's importlib mode does not let tests import each other).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, TypeVar

import pytest

from tests.components import missing_component

REPO_ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


# --- Dockerfiles -------------------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    arguments: str  # continuation lines joined, as written


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def environment(self) -> dict[str, str]:
        """The stage's ENV variables (the `ENV KEY=VALUE ...` form, the one hadolint accepts)."""
        environment: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for assignment in shlex.split(instruction.arguments):
                key, _, value = assignment.partition("=")
                environment[key] = value
        return environment

    def command(self) -> list[str]:
        """The last CMD in exec (JSON) form."""
        return list(json.loads(self.all("CMD")[-1].arguments))


def parse_dockerfile(path: Path) -> list[Stage]:
    """Split a Dockerfile into stages of instructions; global ARGs are substituted into FROM lines."""
    logical: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for text in logical:
        keyword, _, arguments = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and not stages:
            name, _, default = arguments.partition("=")
            global_args[name] = default
        elif keyword == "FROM":
            words = arguments.split()
            base = words[0]
            for name, value in global_args.items():
                base = base.replace("${" + name + "}", value).replace("$" + name, value)
            stage_name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=base, name=stage_name))
        else:
            stages[-1].instructions.append(Instruction(keyword, arguments))
    return stages


def dockerfiles() -> list[Path]:
    """Every Dockerfile of the repository: the service's and the variants under docker/."""
    return [REPO_ROOT / "Dockerfile", *sorted((REPO_ROOT / "docker").glob("Dockerfile.*"))]


# --- Processes and polling ---------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """count distinct free ports on 127.0.0.1 (all held open while they are picked)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def poll(
    check: Callable[[], T | None], timeout_seconds: float, what: str, interval_seconds: float = 0.2
) -> T:
    """Call check() until it returns something other than None (or False); fail after the deadline."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_seconds} s waiting for {what}")
        time.sleep(interval_seconds)


def http_status(url: str) -> int | None:
    """The HTTP status of GET url, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


@dataclass
class RunningProcess:
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, characters: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-characters:]


class ProcessStarter:
    """Starts background processes whose output goes to a log file, and stops them at teardown."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: list[RunningProcess] = []

    def start(self, argv: list[str], env: dict[str, str], cwd: Path, name: str) -> RunningProcess:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        started = RunningProcess(process, log_path)
        self.running.append(started)
        return started

    def wait_until_answering(self, started: RunningProcess, url: str, timeout_seconds: float) -> None:
        """Poll url until it answers 200; fail early (with the log) if the process exits."""

        def ready() -> bool | None:
            if started.process.poll() is not None:
                pytest.fail(f"process exited with {started.process.returncode}:\n{started.log_tail()}")
            return http_status(url) == 200 or None

        try:
            poll(ready, timeout_seconds, f"{url} to answer 200")
        except pytest.fail.Exception:
            print(started.log_tail(), file=sys.stderr)
            raise

    def stop_all(self) -> None:
        for started in self.running:
            if started.process.poll() is None:
                started.process.terminate()
                try:
                    started.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    started.process.kill()
                    started.process.wait()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[ProcessStarter]:
    starter = ProcessStarter(tmp_path)
    yield starter
    starter.stop_all()


def service_environment(port: int, **extra: str) -> dict[str, str]:
    """The test process's environment without any VAE_ variable, plus host 127.0.0.1 and the given port."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("VAE_")}
    environment.update(VAE_HOST="127.0.0.1", VAE_PORT=str(port), **extra)
    return environment


def installed_script(name: str) -> str:
    """A console script of the environment running the tests (e.g. `vae-serve`)."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    pytest.fail(f"{name} is not installed next to {sys.executable}; run `pip install -e .` first")


# --- README tables -----------------------------------------------------------------------------------------


def load_sibling(name: str) -> ModuleType:
    """A helper module next to this file (e.g. readme_tables, which is also a script), loaded once."""
    module_name = f"tests_deploy_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def readme_tables() -> ModuleType:
    return load_sibling("readme_tables")


@pytest.fixture(scope="session")
def readme_examples() -> ModuleType:
    """tests/deploy/readme_examples.py: README's curl examples, their shown outputs and pictures."""
    return load_sibling("readme_examples")


@pytest.fixture(scope="session")
def dashboard_checks() -> ModuleType:
    """tests/deploy/dashboard.py: the Grafana dashboard's queries, checked against a real Prometheus."""
    return load_sibling("dashboard")


# --- Containers --------------------------------------------------------------------------------------------


CONTAINER_REPORT = pytest.StashKey[list[str]]()


@pytest.fixture(scope="session")
def container_report(request: pytest.FixtureRequest) -> list[str]:
    """Lines (image sizes, build times) printed in a `containers` section at the end of the run."""
    return request.config.stash.setdefault(CONTAINER_REPORT, [])


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    report = config.stash.get(CONTAINER_REPORT, [])
    if report:
        terminalreporter.section("containers")
        for line in report:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def containers() -> ModuleType:
    """tests/deploy/containers.py: the private engine, the stand-in base, ServiceContainer, PackageIndex."""
    return load_sibling("containers")


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[Any]:
    """A private dockerd for host networking only (tests/deploy/containers.py), stopped at the end."""
    containers = load_sibling("containers")
    try:
        engine = containers.start_engine(containers.cache_dir() / "docker")
    except containers.EngineUnavailable as missing:
        missing_component(missing.component, missing.install, missing.why)
    try:
        yield engine
        engine.docker("image", "prune", "--force", check=False)  # superseded builds, not the cache
    finally:
        engine.stop()


@pytest.fixture(scope="session")
def standin_python_image(
    docker_engine: Any, tmp_path_factory: pytest.TempPathFactory, container_report: list[str]
) -> str:
    """A local image in place of python:3.11-slim-bookworm, which no registry serves here."""
    containers = load_sibling("containers")
    started = time.monotonic()
    try:
        tag = str(containers.standin_python_image(docker_engine, tmp_path_factory.mktemp("standin")))
    except containers.EngineUnavailable as missing:
        missing_component(missing.component, missing.install, missing.why)
    container_report.append(f"stand-in base {tag}: ready in {time.monotonic() - started:.0f} s")
    return tag


@dataclass
class BuiltImage:
    tag: str
    build_seconds: float


@pytest.fixture(scope="session")
def service_image(docker_engine: Any, standin_python_image: str) -> BuiltImage:
    """The repository's own Dockerfile, built unchanged on the stand-in base."""
    tag = "vae-service:container-tests"
    started = time.monotonic()
    docker_engine.docker(
        "build",
        "--network=host",
        f"--build-arg=PYTHON_IMAGE={standin_python_image}",
        f"--tag={tag}",
        f"--file={REPO_ROOT / 'Dockerfile'}",
        str(REPO_ROOT),
        timeout_seconds=900,
    )
    return BuiltImage(tag, time.monotonic() - started)


@pytest.fixture(scope="session")
def deploy() -> Any:
    """The helpers above, for test modules: `deploy.parse_dockerfile(...)`, `deploy.poll(...)`, ..."""
    return SimpleNamespace(
        REPO_ROOT=REPO_ROOT,
        parse_dockerfile=parse_dockerfile,
        dockerfiles=dockerfiles,
        free_port=free_port,
        free_ports=free_ports,
        poll=poll,
        http_status=http_status,
        service_environment=service_environment,
        installed_script=installed_script,
    )
