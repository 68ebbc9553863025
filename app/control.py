"""Model control: load, unload and reload the registry's models while the others keep serving.

Every change runs in two steps, `prepare` and `commit`. Preparing a load or a reload reads, verifies and
warms the model up in a worker thread, so the event loop keeps serving; a failure changes nothing.
Committing swaps the engine in (or takes it out): requests already using the old engine finish on it, its
batchers stop once they are answered, and its memory goes back to the operating system. One change at a time
per server: a second one while the first runs gets 409. With several worker processes, app/server/group.py
runs the same two steps on every worker: all switch or none does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from app.config import Settings
from app.engine import Engine, StartupError
from app.errors import LoadFailed, ReloadFailed, ReloadInProgress, ShapeChangeRefused, UnloadRefused
from app.metrics import Metrics
from app.registry import ModelRegistry, give_memory_back
from model.manifest import ManifestError

logger = logging.getLogger(__name__)

# Why a model directory cannot be served: a bad manifest or graph, or unreadable files.
LOAD_ERRORS = (ManifestError, StartupError, OSError)
Action = Literal["load", "unload", "reload"]


@dataclass(frozen=True)
class Change:
    """One change to one model. `model_dir` (load and reload) is where to load it from: None for the
    directory it is served from (reload) or its repository folder (load)."""

    action: Action
    model: str
    model_dir: Path | None = None
    allow_shape_change: bool = False


@dataclass
class Prepared:
    """A change ready to commit: the loaded engine (load and reload) and the memory its load added."""

    change: Change
    engine: Engine | None = None
    memory_bytes: int | None = None


@dataclass(frozen=True)
class Changed:
    """A committed change: the model's version now (None once unloaded), from where, and on how many
    workers."""

    change: Change
    version_label: str | None
    model_dir: Path | None
    workers: int
    workers_switched: int


def _log_unawaited_failure(task: asyncio.Task[Changed]) -> None:
    """A change whose requester is gone still ends; its failure goes to the log (the requester got 504)."""
    if not task.cancelled() and task.exception() is not None:
        logger.error("model change finished with an error after its request ended: %s", task.exception())


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


class ModelControl:
    """Serialises one server's model changes and keeps the retired engines' draining tasks alive."""

    def __init__(self, registry: ModelRegistry, settings: Settings, metrics: Metrics) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self._lock = asyncio.Lock()
        self._retiring: dict[asyncio.Task[None], Engine] = {}
        self._signalled: set[asyncio.Task[None]] = set()
        self._changes: set[asyncio.Task[Changed]] = set()

    async def start(self) -> None:
        """At startup, once the first models serve (the worker group opens its control socket here)."""

    def check(self, change: Change) -> None:
        """Refuse a change that can never be made, before anything runs: an unknown model (404), an unload
        of the default model (409). A load may name a folder added to the repository since the start."""
        if change.action == "load":
            self.registry.discover(change.model)
        else:
            self.registry.get(change.model)
        if change.action == "unload" and change.model == self.registry.default_name:
            raise UnloadRefused(
                f"model {change.model!r} is the default model, which the unprefixed routes serve; it cannot "
                "be unloaded (start the server with another --default-model to unload it)"
            )

    async def apply(self, change: Change) -> Changed:
        """Make `change`; raises ReloadFailed, ShapeChangeRefused, UnloadRefused, UnknownModel or
        ReloadInProgress, and keeps every model as it was on any failure.

        The change runs to its end even if the request that asked is cancelled (its deadline passed, its
        client left): a load stopped half-way would leave the model `loading` for good. GET /models shows
        how it ended."""
        self.check(change)
        if self._lock.locked():
            raise ReloadInProgress()
        release = self.exclusive()
        task = asyncio.get_running_loop().create_task(self._apply_locked(change, release))
        self._changes.add(task)
        task.add_done_callback(self._changes.discard)
        task.add_done_callback(_log_unawaited_failure)
        return await asyncio.shield(task)

    def exclusive(self) -> Callable[[], None]:
        """Hold what keeps other changes out beyond this process (nothing here; a worker group's lock), or
        raise ReloadInProgress; returns its release."""
        return lambda: None

    async def _apply_locked(self, change: Change, release: Callable[[], None]) -> Changed:
        try:
            async with self._lock:
                return await self._apply(change)
        finally:
            release()

    async def _apply(self, change: Change) -> Changed:
        prepared = await self.prepare(change)
        if isinstance(prepared, str):
            self._count(change, "failure")
            raise self.failure(change, prepared)
        self.refuse_shape_change(prepared)
        # Once prepared, the change happens even if the request that asked is cancelled meanwhile.
        return await asyncio.shield(self._commit_counted(prepared, workers=1))

    async def _commit_counted(self, prepared: Prepared, workers: int) -> Changed:
        await self.commit(prepared)
        self._count(prepared.change, "success")
        return self.changed(prepared.change, workers, workers)

    async def load(self, name: str) -> Changed:
        """Load model `name` from its repository folder (again, if it serves: Triton's semantics)."""
        return await self.apply(Change("load", name, allow_shape_change=True))

    async def unload(self, name: str) -> Changed:
        return await self.apply(Change("unload", name))

    async def reload(
        self, name: str | None = None, model_dir: Path | None = None, allow_shape_change: bool = False
    ) -> Changed:
        """Serve model `name` (default: the default model) from `model_dir` (default: the directory it is
        served from, read again)."""
        return await self.apply(
            Change("reload", name or self.registry.default_name, model_dir, allow_shape_change)
        )

    def failure(self, change: Change, reason: str) -> ReloadFailed:
        """The error for a load or reload that failed, with why, and what serves meanwhile."""
        if change.action == "load":
            return LoadFailed(change.model, reason, self.registry.get(change.model).engine is not None)
        return ReloadFailed(shown_directory(change.model_dir), reason)

    def _shown(self, change: Change) -> str:
        return shown_directory(change.model_dir) if change.action == "reload" else f"model {change.model!r}"

    def changed(self, change: Change, workers: int, workers_switched: int) -> Changed:
        engine = self.registry.get(change.model).engine
        return Changed(
            change,
            engine.version_label if engine is not None else None,
            engine.model_dir if engine is not None else None,
            workers,
            workers_switched,
        )

    def _count(self, change: Change, result: str) -> None:
        self.metrics.model_reloads.labels(model=change.model, action=change.action, result=result).inc()

    async def prepare(self, change: Change) -> Prepared | str:
        """Load what `change` needs, off the event loop; the reason it cannot be made otherwise."""
        if change.action == "unload":
            return Prepared(change)
        model = self.registry.discover(change.model)
        model_dir = change.model_dir or (model.model_dir if change.action == "load" else model.served_dir)
        was_serving = model.engine is not None
        if not was_serving:
            self.registry.mark(change.model, "loading")
        try:
            engine, memory_bytes = await asyncio.to_thread(self.registry.load_engine, change.model, model_dir)
        except LOAD_ERRORS as error:
            logger.error("cannot load model %s from %s: %s", change.model, model_dir, error)
            # The caller sees a path only if they named it: a repository folder is the model's name.
            shown = (
                str(change.model_dir)
                if change.model_dir is not None
                else (model.name if change.action == "load" else "the directory being served")
            )
            reason = str(error).replace(str(model_dir), shown)
            if not was_serving:
                self.registry.mark(change.model, "unavailable", f"load failed: {reason}")
            return reason
        return Prepared(change, engine, memory_bytes)

    def refuse_shape_change(self, prepared: Prepared) -> None:
        change, engine = prepared.change, prepared.engine
        if engine is None or change.allow_shape_change:
            return
        served = self.registry.get(change.model).engine
        difference = shape_change(served, engine)
        if difference is not None:
            self._count(change, "failure")
            logger.error("model reload refused: the model in %s %s", engine.model_dir, difference)
            self.discard(prepared)
            raise ShapeChangeRefused(self._shown(change), difference)

    def discard(self, prepared: Prepared) -> None:
        """Drop a prepared change that will not be committed (another worker failed)."""
        model = self.registry.get(prepared.change.model)
        if prepared.engine is not None and model.engine is None:
            self.registry.mark(model.name, "unavailable", "not loaded: another worker could not load it")
        prepared.engine = None
        give_memory_back()

    async def commit(self, prepared: Prepared) -> None:
        """Serve the prepared engine, or take the model out; the old engine drains in the background."""
        change = prepared.change
        if prepared.engine is not None:
            previous = self.registry.serve(change.model, prepared.engine, prepared.memory_bytes)
            logger.info(
                "%s: model %s is now serving %s from %s (was %s)",
                change.action,
                change.model,
                prepared.engine.version_label,
                prepared.engine.model_dir,
                previous.version_label if previous is not None else "nothing",
            )
            if previous is not None:
                self._retire(previous)
            return
        engine = self.registry.take_out(change.model, "unloaded")
        if engine is not None:
            self.registry.mark(change.model, "unloading", "finishing the requests in flight")
            await self._retire(engine)
            if self.registry.get(change.model).engine is None:  # no load came in meanwhile
                self.registry.mark(change.model, "unavailable", "unloaded")
        logger.info("unload: model %s no longer serves", change.model)

    def _retire(self, engine: Engine) -> asyncio.Task[None]:
        """Stop `engine` once the requests using it are answered, then give its memory back."""

        async def drain() -> None:
            await engine.stop_when_idle()
            engine.release()
            give_memory_back()

        task = asyncio.get_running_loop().create_task(drain())
        self._retiring[task] = engine
        task.add_done_callback(lambda done: self._retiring.pop(done, None))
        return task

    def reload_on_signal(self) -> None:
        """SIGHUP handler (on the event loop): reload the default model's directory in a task."""
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
        """At shutdown: finish the changes under way, then stop the old engines that are still draining."""
        await asyncio.gather(*self._signalled, *self._changes, return_exceptions=True)
        retiring = dict(self._retiring)
        for task in retiring:
            task.cancel()
        await asyncio.gather(*retiring, return_exceptions=True)
        for engine in retiring.values():
            await engine.stop()
