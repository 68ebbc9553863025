"""`vae-serve`: load and check the model, then serve it with uvicorn in one worker process.

Every Settings field is a flag (`--max-batch-size 32`) and a `VAE_` environment variable; flags win.
Metrics are per process, so run one process per container and scale with containers.
SIGHUP reloads the configured model directory; SIGTERM stops gracefully (within --shutdown-grace-seconds).
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
from collections.abc import Sequence
from types import FrameType

import uvicorn
from pydantic import ValidationError

from app.config import Settings
from app.engine import Engine, StartupError
from app.main import create_app
from model.manifest import ManifestError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vae-serve",
        description="Serve a VAE model directory over HTTP. Each flag can also be set as VAE_<NAME>.",
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


def main(argv: Sequence[str] | None = None) -> int:
    arguments = vars(build_parser().parse_args(argv))
    try:
        settings = Settings(**arguments)
    except ValidationError as error:
        print(f"vae-serve: error: {_settings_error(error)}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        engine = Engine.load(settings)
    except (ManifestError, StartupError) as error:
        print(f"vae-serve: error: cannot serve the model: {error}", file=sys.stderr)
        return 1
    app = create_app(settings, engine, reload_on_sighup=True)
    tune_interpreter()
    # uvicorn re-raises SIGTERM once its graceful shutdown is done; by then stopping is a success (status 0).
    signal.signal(signal.SIGTERM, _exit_cleanly)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        workers=1,
        timeout_graceful_shutdown=settings.shutdown_grace_seconds,
    )
    return 0


# Allocations between young-generation collections (CPython's default is 700). Requests in flight keep
# thousands of young objects alive, so at the default every few requests pay for a collection that frees
# little and promotes the survivors, which then cost older, slower collections: 13% of /encode's time.
YOUNG_GENERATION_THRESHOLD = 20_000
# How long a thread may hold the GIL while another waits (CPython's default is 5 ms). The inference threads
# need it briefly around each run; behind a busy event loop each such wait took up to 5 ms, which set
# /encode's p99 (67 ms at 64 connections; 44 ms at 0.5 ms).
GIL_SWITCH_INTERVAL_SECONDS = 0.0005


def tune_interpreter() -> None:
    """Freeze the start-up heap out of garbage collection, collect less often, and hand the GIL over sooner.

    Memory stays bounded: reference counting frees almost everything, the collector only finds cycles.
    """
    gc.collect()
    gc.freeze()
    _, *older = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, *older)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_SECONDS)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    sys.exit(main())
