"""Hot reload: load a new model version next to the serving one, swap it in, retire the old one.

The new engine is read, verified (manifest, checksums, graphs) and warmed up in a worker thread, so the
event loop keeps serving. Requests already using the old engine finish on it; its batchers stop once they
are answered. One reload at a time: a second one while the first runs gets 409. A failed load changes
nothing.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from fastapi import FastAPI

from app.config import Settings
from app.engine import Engine, StartupError
from app.errors import ReloadFailed, ReloadInProgress
from app.metrics import Metrics
from model.manifest import DEFAULT_MODEL_DIR, ManifestError

logger = logging.getLogger(__name__)


class ModelReloader:
    """Serialises reloads of one app's engine and keeps the old engines' draining tasks alive."""

    def __init__(self, app: FastAPI, settings: Settings, metrics: Metrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self._lock = asyncio.Lock()
        self._retiring: dict[asyncio.Task[None], Engine] = {}
        self._signalled: set[asyncio.Task[None]] = set()

    async def reload(self, model_dir: Path | None = None) -> Engine:
        """Serve the model in `model_dir` (default: the configured one); raises ReloadFailed or
        ReloadInProgress and keeps the current model on any failure."""
        if self._lock.locked():
            raise ReloadInProgress()
        async with self._lock:
            target = model_dir or self.settings.model_dir or DEFAULT_MODEL_DIR
            settings = self.settings.model_copy(update={"model_dir": target})
            try:
                engine = await asyncio.to_thread(Engine.load, settings)
            except (ManifestError, StartupError, OSError) as error:  # OSError: unreadable files
                self.metrics.model_reloads.labels(result="failure").inc()
                logger.error(
                    "model reload from %s failed, the previous model keeps serving: %s", target, error
                )
                # The caller sees a directory only if they named it; the log keeps the server's paths.
                shown = str(model_dir) if model_dir is not None else "the configured model directory"
                raise ReloadFailed(shown, str(error).replace(str(target), shown)) from error
            engine.start(self.settings, self.metrics)
            previous: Engine | None = self.app.state.engine
            self.app.state.engine = engine
            manifest = engine.manifest
            self.metrics.set_model_info(manifest.name, manifest.version, engine.provider, manifest.latent_dim)
            self.metrics.model_reloads.labels(result="success").inc()
            logger.info(
                "reloaded: now serving %s from %s (was %s)",
                engine.version_label,
                target,
                previous.version_label if previous is not None else "nothing",
            )
            if previous is not None:
                task = asyncio.get_running_loop().create_task(previous.stop_when_idle())
                self._retiring[task] = previous
                task.add_done_callback(lambda done: self._retiring.pop(done, None))
            return engine

    def reload_on_signal(self) -> None:
        """SIGHUP handler (on the event loop): reload the configured model directory in a task."""
        logger.info("SIGHUP received: reloading the model")
        task = asyncio.get_running_loop().create_task(self._reload_logging_errors())
        self._signalled.add(task)
        task.add_done_callback(self._signalled.discard)

    async def _reload_logging_errors(self) -> None:
        try:
            await self.reload()
        except ReloadInProgress:
            logger.warning("SIGHUP ignored: a model reload is already in progress")
        except ReloadFailed:
            pass  # reload() logged why

    async def stop(self) -> None:
        """At shutdown: finish a signalled reload, then stop the old engines that are still draining."""
        await asyncio.gather(*self._signalled, return_exceptions=True)
        retiring = dict(self._retiring)
        for task in retiring:
            task.cancel()
        await asyncio.gather(*retiring, return_exceptions=True)
        for engine in retiring.values():
            await engine.stop()
