"""`vae-serve`: claim the port, load and check the models, then serve them with uvicorn.

Every Settings field is a flag (`--max-batch-size 32`) and a `VAE_` environment variable; flags win.
With `--workers N`, N worker processes share the port under uvicorn's supervisor (app/server).
SIGHUP reloads the default model's directory, on every worker; SIGTERM stops gracefully (within
--shutdown-grace-seconds) and exits 0.
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import socket
import sys
from collections.abc import Sequence
from types import FrameType

import uvicorn
from pydantic import ValidationError

from app.config import Settings
from app.engine import StartupError
from app.main import create_app
from app.registry import StartModels, load_start_models
from app.repository import RepositoryError
from app.server.process import configure_logging, tune_interpreter
from app.server.rundir import run_directory
from app.server.supervisor import serve_workers
from model.manifest import ManifestError

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vae-serve",
        description="Serve VAE models (a model repository, one model directory, or the shipped models) over "
        "HTTP. Each flag can also be set as VAE_<NAME>.",
    )
    for name, field in Settings.model_fields.items():
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=argparse.SUPPRESS,  # unset flags leave the environment and defaults in charge
            help=f"{field.description} (env VAE_{name.upper()}, default {field.default})",
        )
    return parser


def _settings_error(error: ValidationError) -> str:
    problems = []
    for item in error.errors(include_url=False):
        name = ".".join(str(part) for part in item["loc"]) or "settings"
        flag = f"--{name.replace('_', '-')} / VAE_{name.upper()}" if item["loc"] else name
        problems.append(f"{flag}: {item['msg']}")
    return "invalid settings: " + "; ".join(problems)


class PortUnavailable(Exception):
    pass


def bind(settings: Settings, reuse_port: bool = False) -> socket.socket:
    """A listening socket for the server, bound before the model loads, so a busy port fails in a moment;
    with `reuse_port`, one of several on the same port (one per worker)."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        listening.bind((settings.host, settings.port))
    except OSError as error:
        listening.close()
        in_use = error.errno == errno.EADDRINUSE
        reason = "is already in use" if in_use else f"cannot be bound ({error.strerror})"
        raise PortUnavailable(
            f"port {settings.port} on {settings.host} {reason}; serve on another port with "
            f"--port or VAE_PORT (e.g. VAE_PORT={settings.port + 1} make run), or bind another address "
            "with --host / VAE_HOST"
        ) from error
    listening.set_inheritable(True)  # the workers serve it too
    return listening


def main(argv: Sequence[str] | None = None) -> int:
    arguments = vars(build_parser().parse_args(argv))
    try:
        settings = Settings(**arguments)
    except ValidationError as error:
        print(f"vae-serve: error: {_settings_error(error)}", file=sys.stderr)
        return 2
    configure_logging(settings)
    reuse_port = settings.workers > 1
    try:
        listening = [bind(settings, reuse_port) for _ in range(settings.workers)]
    except PortUnavailable as error:
        print(f"vae-serve: error: {error}", file=sys.stderr)
        return 1
    try:
        started = load_start_models(settings)
    except (ManifestError, StartupError, RepositoryError) as error:
        print(f"vae-serve: error: cannot serve the model: {error}", file=sys.stderr)
        return 1
    names = ", ".join(started.engines)
    logger.info("models loaded: %s (default: %s)", names, started.sources.default_name)
    # uvicorn re-raises SIGTERM once its graceful shutdown is done; by then stopping is a success.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    plural = "es" if settings.workers > 1 else ""
    logger.info(
        "serving on http://%s:%d with %d worker process%s", host, settings.port, settings.workers, plural
    )
    if settings.workers > 1:
        del started  # checked; each worker loads its own
        with run_directory() as run:
            return serve_workers(settings, listening, run)
    return serve_one_process(settings, started, listening[0])


def serve_one_process(settings: Settings, started: StartModels, listening: socket.socket) -> int:
    app = create_app(settings, reload_on_sighup=True, started=started)
    tune_interpreter()
    config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=settings.shutdown_grace_seconds,
    )
    server = uvicorn.Server(config)
    server.run(sockets=[listening])
    return 0 if server.started else 1


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    sys.exit(main())
