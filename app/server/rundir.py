"""The directory a multi-worker server shares among its processes, one per server start.

metrics/          prometheus_client's multiprocess files (PROMETHEUS_MULTIPROC_DIR)
control/<pid>     each live worker's control socket (group.py)
reload.lock       held exclusively by a reload, shared by a worker while it starts
models.json       the models every worker serves and the directory of each, once a change was made
exits             one line per worker process that died: "<pid> <exit code>"
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO


@dataclass(frozen=True)
class RunDirectory:
    root: Path

    @property
    def metrics_dir(self) -> Path:
        return self.root / "metrics"

    @property
    def control_dir(self) -> Path:
        return self.root / "control"

    @classmethod
    def create(cls, root: Path) -> RunDirectory:
        """Empty `root` (a previous start's files would add old workers' counts) and lay out its folders."""
        if root.exists():
            shutil.rmtree(root)
        run = cls(root)
        for folder in (run.metrics_dir, run.control_dir):
            folder.mkdir(parents=True)
        return run

    def control_socket(self, pid: int) -> Path:
        return self.control_dir / str(pid)

    def workers(self) -> dict[int, Path]:
        """The control sockets of the workers that have started, by pid."""
        return {int(path.name): path for path in self.control_dir.iterdir() if path.name.isdigit()}

    def served_models(self) -> dict[str, str] | None:
        """The models every worker serves since the last load, unload or reload (name -> directory), or
        None before any."""
        try:
            served = json.loads((self.root / "models.json").read_text())
        except FileNotFoundError:
            return None
        return {str(name): str(model_dir) for name, model_dir in served.items()}

    def set_served_models(self, served: dict[str, str]) -> None:
        """Record the models a change settles on, atomically, so a worker that starts later loads them."""
        staged = self.root / "models.json.new"
        staged.write_text(json.dumps(served))
        staged.replace(self.root / "models.json")

    def record_exit(self, pid: int, exit_code: int | None) -> None:
        with (self.root / "exits").open("a") as exits:
            exits.write(f"{pid} {exit_code}\n")
        with contextlib.suppress(FileNotFoundError):
            self.control_socket(pid).unlink()

    def exit_count(self) -> int:
        try:
            return len((self.root / "exits").read_text().splitlines())
        except FileNotFoundError:
            return 0

    def try_lock_for_reload(self) -> IO[bytes] | None:
        """The reload lock held exclusively (close the file to release it), or None while another reload
        or a worker's start holds it."""
        lock = (self.root / "reload.lock").open("ab")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            return None
        return lock

    def lock_for_start(self) -> IO[bytes]:
        """The reload lock held shared (close to release), waiting for a reload in progress to finish: a
        worker that starts loads the directory that reload settles on, and joins the next one."""
        lock = (self.root / "reload.lock").open("ab")
        fcntl.flock(lock, fcntl.LOCK_SH)
        return lock


@contextlib.contextmanager
def run_directory(root: Path | None = None) -> Iterator[RunDirectory]:
    """A fresh run directory (`root`, or a new temporary one), removed when the server stops."""
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="vae-serve-"))
    run = RunDirectory.create(root)
    try:
        yield run
    finally:
        shutil.rmtree(root, ignore_errors=True)
