"""The parent of a multi-worker server: uvicorn's process supervisor, plus what serving a model needs.

uvicorn's `Multiprocess` (what `uvicorn --workers N` runs) starts N spawned workers, pings each every half
second, replaces one that dies or hangs, and on SIGTERM or SIGINT stops every worker (each drains its
requests, within --shutdown-grace-seconds) before it returns. On top of that the supervisor here:

- gives each worker a listening socket of its own on the port (SO_REUSEPORT), so the kernel spreads new
  connections evenly over the workers. On one shared socket every idle worker wakes for each connection and
  the first takes all that are waiting: 16 connections opened at once all went to one of two workers. A
  worker's socket stays open in the supervisor, so while it is replaced its connections wait in the
  backlog;

- counts and logs each worker that died, with its exit code, and marks it dead for prometheus_client, so
  the gauges summed over live workers forget it;
- turns SIGHUP into one reload on every worker (group.py) instead of uvicorn's restart of every worker,
  which would load the model once per worker with no way back if the files were broken;
- stops the server when a worker cannot start (uvicorn's rule), and says so in the exit status.

Why uvicorn's supervisor and not gunicorn's: it is already a dependency, it is the supervisor uvicorn's
own `--workers` uses, and the service needs none of gunicorn's worker types or config; gunicorn's SIGHUP
would need the same override.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass
from functools import partial

import uvicorn
from fastapi import FastAPI
from prometheus_client import multiprocess
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from app.config import Settings
from app.engine import StartupError
from app.main import create_app
from app.registry import load_start_models
from app.repository import RepositoryError
from app.server.group import GroupControl, ask_a_worker_to_reload
from app.server.process import configure_logging, stop_with_parent, tune_interpreter
from app.server.rundir import RunDirectory
from model.manifest import ManifestError

logger = logging.getLogger(__name__)

# How long a worker may take to answer the supervisor's ping before it is killed as hung. uvicorn's default
# is 5 s; a worker at full load answers within milliseconds (the ping has its own thread), so this only
# needs to catch a real hang without killing a slow start.
HEALTHCHECK_TIMEOUT_SECONDS = 10


@dataclass(frozen=True)
class WorkerApp:
    """The app factory each spawned worker calls: it loads the models the group serves and builds the app.

    Pickled into the worker by uvicorn, so it holds only settings and the run directory.
    """

    settings: Settings
    run: RunDirectory
    supervisor_pid: int

    def __call__(self) -> FastAPI:
        stop_with_parent(self.supervisor_pid)
        configure_logging(self.settings)
        start_lock = self.run.lock_for_start()
        try:
            started = load_start_models(self.settings, served=self.run.served_models())
        except (ManifestError, StartupError, RepositoryError, OSError) as error:
            logger.error("worker %d cannot serve the model: %s", os.getpid(), error)
            sys.exit(STARTUP_FAILURE)  # the supervisor then stops the server: every start would fail alike
        app = create_app(
            self.settings,
            reload_on_sighup=True,
            control=partial(GroupControl, run=self.run, start_lock=start_lock),
            started=started,
        )
        app.state.metrics.read_every_worker(self.run.metrics_dir, self.settings.workers, self.run.exit_count)
        tune_interpreter()
        return app


class Supervisor(Multiprocess):
    """uvicorn's supervisor, with a listening socket per worker, worker deaths counted, and SIGHUP reloading
    every worker."""

    def __init__(
        self, config: uvicorn.Config, listening: list[socket.socket], settings: Settings, run: RunDirectory
    ) -> None:
        super().__init__(config, sockets=[])
        self.listening = listening
        self.settings = settings
        self.run_directory = run
        self.worker_failed_to_start = False
        self._reloads: list[threading.Thread] = []

    def init_processes(self) -> None:
        self.processes = [self._start_worker(slot) for slot in range(self.processes_num)]

    def _start_worker(self, slot: int) -> Process:
        process = Process(self.config, [self.listening[slot]])
        process.start()
        return process

    def keep_subprocess_alive(self) -> None:
        """uvicorn's rules: a worker that does not answer the ping in time is killed as hung, one that
        could not start stops the server, any other that died is replaced, on the same socket."""
        if self.should_exit.is_set():
            return
        for slot, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()
            process.join()
            self._record_death(process)
            if process.exitcode == STARTUP_FAILURE:
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            self.processes[slot] = self._start_worker(slot)

    def _record_death(self, process: Process) -> None:
        pid, exit_code = process.pid, process.exitcode
        assert pid is not None
        multiprocess.mark_process_dead(pid, str(self.run_directory.metrics_dir))
        self.run_directory.record_exit(pid, exit_code)
        if exit_code == STARTUP_FAILURE:
            self.worker_failed_to_start = True
            logger.error("worker process %d could not start; stopping the server", pid)
        elif not self.should_exit.is_set():
            cause = f"signal {-exit_code}" if exit_code is not None and exit_code < 0 else f"exit {exit_code}"
            logger.error("worker process %d died (%s); a new worker replaces it", pid, cause)

    def handle_ttin(self) -> None:
        logger.warning("SIGTTIN ignored: the number of workers is fixed at start (--workers / VAE_WORKERS)")

    def handle_ttou(self) -> None:
        logger.warning("SIGTTOU ignored: the number of workers is fixed at start (--workers / VAE_WORKERS)")

    def handle_hup(self) -> None:
        logger.info("SIGHUP received: reloading the model on every worker")
        thread = threading.Thread(target=self._reload_every_worker, name="sighup-reload", daemon=True)
        thread.start()
        self._reloads = [*(alive for alive in self._reloads if alive.is_alive()), thread]

    def _reload_every_worker(self) -> None:
        answer = asyncio.run(ask_a_worker_to_reload(self.run_directory, self.settings))
        if answer["ok"]:
            switched, workers = answer["switched"], answer["workers"]
            logger.info("SIGHUP reload: %s on %d of %d workers", answer["model"], switched, workers)
        else:
            logger.error("SIGHUP reload failed, every worker keeps its model: %s", answer["error"])


def serve_workers(settings: Settings, listening: list[socket.socket], run: RunDirectory) -> int:
    """Run `settings.workers` workers, one per bound socket, until SIGTERM; the exit status (0, or 1 when
    a worker could not start)."""
    # Set before the workers are spawned: prometheus_client picks multiprocess mode when it is imported.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(run.metrics_dir)
    config = uvicorn.Config(
        WorkerApp(settings, run, os.getpid()),
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=settings.shutdown_grace_seconds,
        timeout_worker_healthcheck=HEALTHCHECK_TIMEOUT_SECONDS,
    )
    supervisor = Supervisor(config, listening, settings, run)
    supervisor.run()
    return 1 if supervisor.worker_failed_to_start else 0
