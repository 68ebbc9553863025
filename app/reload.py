"""Hot reload: load a new model version next to the serving one, swap it in, retire the old one.

The new engine is read, verified (manifest, checksums, graphs) and warmed up in a worker thread, so the
event loop keeps serving. Requests already using the old engine finish on it; its batchers stop once they
are answered. One reload at a time: a second one while the first runs gets 409. A failed load changes
nothing. A reload without a directory (and SIGHUP) reloads the directory being served, which is the
configured one until a reload names another. With several worker processes, app/server/group.py runs the
same two steps, load and serve, on every worker.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI

from app.config import Settings
from app.engine import Engine, StartupError
from app.errors import ReloadFailed, ReloadInProgress, ShapeChangeRefused
from app.metrics import Metrics
from model.manifest import DEFAULT_MODEL_DIR, ManifestError

logger = logging.getLogger(__name__)

# Why a model directory cannot be served: a bad manifest or graph, or unreadable files.
LOAD_ERRORS = (ManifestError, StartupError, OSError)


@dataclass(frozen=True)
class Reloaded:
    """A finished reload: the model now served, from where, and on how many of the worker processes."""

    model: str
    model_dir: Path
    workers: int
    workers_switched: int


def shape_change(served: Engine | None, loaded: Engine) -> str | None:
    """How `loaded` differs from the served model in what clients size their requests by, or None."""
    if served is None:
        return None
    changes = []
    old, new = served.manifest, loaded.manifest
    if old.latent_dim != new.latent_dim:
        changes.append(f"latent_dim {new.latent_dim} (served: {old.latent_dim})")
    if old.image.shape != new.image.shape:
        shown = "x".join(map(str, new.image.shape))
        changes.append(f"images of {shown} (served: {'x'.join(map(str, old.image.shape))}, C x H x W)")
    return "has " + " and ".join(changes) if changes else None


def shown_directory(model_dir: Path | None) -> str:
    """How an error names the directory: the caller sees a path only if they named it."""
    return str(model_dir) if model_dir is not None else "the directory being served"


class ModelReloader:
    """Serialises reloads of one app's engine and keeps the old engines' draining tasks alive."""

    def __init__(self, app: FastAPI, settings: Settings, metrics: Metrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.served_dir: Path = settings.model_dir or DEFAULT_MODEL_DIR
        self._lock = asyncio.Lock()
        self._retiring: dict[asyncio.Task[None], Engine] = {}
        self._signalled: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """At startup, once the first engine serves (the worker group opens its control socket here)."""

    async def reload(self, model_dir: Path | None = None, allow_shape_change: bool = False) -> Reloaded:
        """Serve the model in `model_dir` (default: the one being served, read again); raises ReloadFailed,
        ShapeChangeRefused (a new latent_dim or image shape, unless allowed) or ReloadInProgress, and keeps
        the current model on any failure."""
        if self._lock.locked():
            raise ReloadInProgress()
        async with self._lock:
            target = model_dir or self.served_dir
            shown = shown_directory(model_dir)
            try:
                engine = await self.load(target)
            except LOAD_ERRORS as error:
                self.metrics.model_reloads.labels(result="failure").inc()
                raise ReloadFailed(shown, str(error).replace(str(target), shown)) from error
            self.refuse_shape_change(engine, shown, allow_shape_change)
            self.serve(engine)
            self.metrics.model_reloads.labels(result="success").inc()
            return Reloaded(engine.version_label, target, workers=1, workers_switched=1)

    async def load(self, model_dir: Path) -> Engine:
        """Read, verify and warm up the model in `model_dir` off the event loop; raises one of LOAD_ERRORS."""
        settings = self.settings.model_copy(update={"model_dir": model_dir})
        try:
            return await asyncio.to_thread(Engine.load, settings)
        except LOAD_ERRORS as error:
            logger.error("model reload from %s failed, the old model keeps serving: %s", model_dir, error)
            raise

    def refuse_shape_change(self, engine: Engine, shown: str, allowed: bool) -> None:
        change = shape_change(self.app.state.engine, engine)
        if change is not None and not allowed:
            self.metrics.model_reloads.labels(result="failure").inc()
            logger.error("model reload refused: the model in %s %s", engine.model_dir, change)
            raise ShapeChangeRefused(shown, change)

    def serve(self, engine: Engine) -> None:
        """Swap a loaded engine in; the previous one stops once its requests are answered."""
        engine.start(self.settings, self.metrics)
        previous: Engine | None = self.app.state.engine
        self.app.state.engine = engine
        self.served_dir = engine.model_dir
        logger.info(
            "reloaded: now serving %s from %s (was %s)",
            engine.version_label,
            engine.model_dir,
            previous.version_label if previous is not None else "nothing",
        )
        if previous is not None:
            task = asyncio.get_running_loop().create_task(previous.stop_when_idle())
            self._retiring[task] = previous
            task.add_done_callback(lambda done: self._retiring.pop(done, None))

    def reload_on_signal(self) -> None:
        """SIGHUP handler (on the event loop): reload the served model directory in a task."""
        logger.info("SIGHUP received: reloading the model")
        task = asyncio.get_running_loop().create_task(self._reload_logging_errors())
        self._signalled.add(task)
        task.add_done_callback(self._signalled.discard)

    async def _reload_logging_errors(self) -> None:
        try:
            await self.reload()
        except ReloadInProgress:
            logger.warning("SIGHUP ignored: a model reload is already in progress")
        except (ReloadFailed, ShapeChangeRefused) as error:
            logger.error("SIGHUP reload failed: %s", error.detail)

    async def stop(self) -> None:
        """At shutdown: finish a signalled reload, then stop the old engines that are still draining."""
        await asyncio.gather(*self._signalled, return_exceptions=True)
        retiring = dict(self._retiring)
        for task in retiring:
            task.cancel()
        await asyncio.gather(*retiring, return_exceptions=True)
        for engine in retiring.values():
            await engine.stop()
