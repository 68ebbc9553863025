"""Server processes under test: spawn on a free 127.0.0.1 port, time readiness, sample RSS, stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import httpx

READY_TIMEOUT_SECONDS = 60.0
_POLL_INTERVAL_SECONDS = 0.01
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _process_tree(pid: int) -> list[int]:
    """pid and all its descendants (uvicorn workers, if any), from /proc/<pid>/task/*/children."""
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                pending.extend(int(child) for child in (task / "children").read_text().split())
            except OSError:
                continue
    return tree


def rss_bytes(pid: int) -> int:
    """Resident set size of pid and its descendants, from /proc/<pid>/statm; 0 once the process is gone."""
    total = 0
    for member in _process_tree(pid):
        try:
            total += int(Path(f"/proc/{member}/statm").read_text().split()[1]) * _PAGE_BYTES
        except (OSError, IndexError):
            continue
    return total


class RssSampler:
    """Context manager that samples a process tree's RSS in a thread and keeps the peak (bytes)."""

    def __init__(self, pid: int, interval_seconds: float = 0.1) -> None:
        self.pid = pid
        self.interval_seconds = interval_seconds
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        while True:
            self.peak_bytes = max(self.peak_bytes, rss_bytes(self.pid))
            if self._stop.wait(self.interval_seconds):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()


class ServerProcess:
    """One server under test; `start()` returns the seconds from spawn to the first 200 on ready_path."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        port: int,
        env: dict[str, str] | None = None,
        ready_path: str = "/readyz",
        log_dir: Path | None = None,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, **(env or {})}
        self.ready_path = ready_path
        self.ready_seconds: float | None = None
        # stdout and stderr (with the access log, if on) go to log_dir/<name>.log; no log_dir: a temp dir.
        log_dir = log_dir if log_dir is not None else Path(tempfile.mkdtemp(prefix="vae-bench-logs-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self._log = (log_dir / f"{name}.log").open("wb")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError(f"server {self.name} is not running")
        return self._process.pid

    @property
    def log_path(self) -> str:
        return self._log.name

    def start(self) -> float:
        spawned = time.perf_counter()
        self._process = subprocess.Popen(
            self.command, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, cwd=_repo_root()
        )
        deadline = spawned + READY_TIMEOUT_SECONDS
        with httpx.Client(base_url=self.base_url, timeout=1.0) as client:
            while time.perf_counter() < deadline:
                if self._process.poll() is not None:
                    raise RuntimeError(f"server {self.name} exited during start-up; see {self.log_path}")
                try:
                    if client.get(self.ready_path).status_code == 200:
                        self.ready_seconds = time.perf_counter() - spawned
                        return self.ready_seconds
                except httpx.TransportError:
                    pass
                time.sleep(_POLL_INTERVAL_SECONDS)
        self.stop()
        raise RuntimeError(
            f"server {self.name} not ready within {READY_TIMEOUT_SECONDS} s; see {self.log_path}"
        )

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def python_command(*args: str) -> list[str]:
    """The current interpreter with args, so servers run in the same environment as the suite."""
    return [sys.executable, *args]
