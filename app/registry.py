"""The models one server holds, by name, and the state of each (Triton's READY, LOADING, UNLOADING,
UNAVAILABLE with a reason).

Routes ask the registry for the model named in their path, or the default one; nothing else in the service
looks models up. Each served model is an `Engine` with batchers of its own, so one model's queue never
holds another's items. The registry only swaps engines in and out; app/control.py decides when (load,
unload, reload, across worker processes too).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from app.config import Settings
from app.engine import Engine, StartupError
from app.errors import ModelNotLoaded, ModelNotReady, UnknownModel
from app.metrics import Metrics
from app.repository import (
    ModelSources,
    holds_manifest,
    is_model_name,
    model_sources,
    models_to_load_at_start,
    shown,
)
from model.manifest import Manifest, ManifestError, read_manifest

logger = logging.getLogger(__name__)

ModelState = Literal["ready", "loading", "unloading", "unavailable"]
# Where a request records the model it used (its name here), for the request metrics (app/middleware.py).
MODEL_SCOPE_KEY = "vae.model"
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    """This process's resident memory (RSS) now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_BYTES


def give_memory_back() -> None:
    """Return freed heap pages to the operating system. glibc keeps them for reuse otherwise, which is why
    RSS never falls after an unload in servers that skip this (Triton #3320, MLServer #986)."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    malloc_trim = getattr(ctypes.CDLL(libc_name), "malloc_trim", None)
    if malloc_trim is not None:  # glibc only; musl returns memory by itself
        malloc_trim(0)


@dataclass
class ServedModel:
    """One model of the repository: where it lives, its state, and the engine serving it (when ready)."""

    name: str
    model_dir: Path  # the repository's folder for it; a reload may serve another directory (served_dir)
    served_dir: Path
    state: ModelState = "unavailable"
    reason: str = "never loaded"
    engine: Engine | None = None
    memory_bytes: int | None = None
    _manifest_on_disk: Manifest | None = field(default=None, repr=False)

    @property
    def manifest(self) -> Manifest | None:
        """The served manifest, or the repository folder's when not loaded (None if unreadable)."""
        if self.engine is not None:
            return self.engine.manifest
        if self._manifest_on_disk is None:
            try:
                self._manifest_on_disk = read_manifest(self.model_dir)
            except (ManifestError, OSError):
                return None
        return self._manifest_on_disk

    def describe(self, default_name: str) -> dict[str, Any]:
        """This model as GET /models lists it."""
        manifest = self.manifest
        return {
            "name": self.name,
            "default": self.name == default_name,
            "version": manifest.version if manifest is not None else None,
            "kind": manifest.model_kind if manifest is not None else None,
            "state": self.state,
            "reason": self.reason,
            "latent_shape": [manifest.latent_dim] if manifest is not None else None,
            "image_shape": list(manifest.image.shape) if manifest is not None else None,
            "memory_bytes": self.memory_bytes,
        }


class ModelRegistry:
    """Every model of the server by name: the engines serving now, and the state of the others."""

    def __init__(self, sources: ModelSources, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.default_name = sources.default_name
        self.models = {
            name: ServedModel(name, model_dir, model_dir) for name, model_dir in sources.model_dirs.items()
        }

    def serve_at_start(self, started: StartModels) -> None:
        """Serve what the start loaded (on the running event loop), and list why the others are not."""
        for name, (engine, memory_bytes) in started.engines.items():
            self.serve(name, engine, memory_bytes)
        for name, reason in started.failures.items():
            self.mark(name, "unavailable", reason)

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self.models.values())

    def get(self, name: str) -> ServedModel:
        """The model called `name`; UnknownModel (404) listing the served names."""
        model = self.models.get(name)
        if model is None:
            raise UnknownModel(f"there is no model {name!r}; this server serves {shown(self.models)}")
        return model

    def discover(self, name: str) -> ServedModel:
        """The model `name`, looking for a folder added to the repository since the start when it is new
        (as Triton's explicit load of a new model does); UnknownModel otherwise."""
        repository = self.settings.model_repository
        if name not in self.models and repository is not None and is_model_name(name):
            folder = repository / name
            if holds_manifest(folder):
                self.models[name] = ServedModel(name, folder, folder)
                logger.info("found model %s in the repository %s", name, repository)
        return self.get(name)

    def ready_engine(self, name: str | None = None, readiness_path: str = "/readyz") -> Engine:
        """The engine of model `name` (the default model when None) once ready; 404 for an unknown name,
        503 while it loads or when it is not loaded (saying how to load it)."""
        model = self.get(self.default_name if name is None else name)
        engine = model.engine
        if engine is not None and engine.ready:
            return engine
        if model.state == "loading" or (engine is not None and model.state == "ready"):
            raise ModelNotReady(f"model {model.name!r} is still loading; poll {readiness_path}")
        raise ModelNotLoaded(
            f"model {model.name!r} is not loaded ({model.reason}); load it with "
            f"POST /v2/repository/models/{model.name}/load (API key required)"
        )

    def engine_if_ready(self, name: str) -> Engine | None:
        """The model's engine when it serves, else None; never raises (the load shedder asks)."""
        model = self.models.get(name)
        engine = model.engine if model is not None else None
        return engine if engine is not None and engine.ready else None

    def default_engine(self) -> Engine | None:
        return self.models[self.default_name].engine

    def ready_models(self) -> list[ServedModel]:
        return [model for model in self if model.engine is not None and model.engine.ready]

    def describe(self) -> dict[str, Any]:
        """GET /models: the default model's name and every model, sorted by name."""
        return {
            "default_model": self.default_name,
            "models": [self.models[name].describe(self.default_name) for name in sorted(self.models)],
        }

    def mark(self, name: str, state: ModelState, reason: str = "") -> None:
        model = self.get(name)
        model.state, model.reason = state, reason

    def load_engine(self, name: str, model_dir: Path | None = None) -> tuple[Engine, int]:
        """Load (blocking) model `name` from `model_dir` (default: where it is served from), and the RSS
        the load added. Raises ManifestError, StartupError or OSError."""
        model = self.get(name)
        before = resident_bytes()
        engine = Engine.load(self.settings.model_copy(update={"model_dir": model_dir or model.served_dir}))
        return engine, max(0, resident_bytes() - before)

    def serve(self, name: str, engine: Engine, memory_bytes: int | None) -> Engine | None:
        """Start `engine`'s batchers and serve it as model `name`; returns the engine it replaces."""
        model = self.get(name)
        engine.start(self.settings, self.metrics, name)
        previous, model.engine = model.engine, engine
        model.served_dir, model.memory_bytes = engine.model_dir, memory_bytes
        model.state, model.reason = "ready", ""
        return previous

    def take_out(self, name: str, reason: str) -> Engine | None:
        """Stop routing requests to model `name`; returns its engine, for the caller to drain and stop."""
        model = self.get(name)
        engine, model.engine = model.engine, None
        model.state, model.reason, model.memory_bytes = "unavailable", reason, None
        model.served_dir = model.model_dir
        model._manifest_on_disk = None  # the folder may have changed since it was read
        return engine

    def info_labels(self) -> list[dict[str, str]]:
        """vae_model_info's label sets: one per model serving now."""
        return [
            {"model": model.name, **model.engine.info_labels}
            for model in self
            if model.engine is not None and model.engine.ready
        ]

    def memory_by_model(self) -> dict[str, int]:
        """vae_model_memory_bytes: what each model's load added to the resident memory (0 when not loaded)."""
        return {model.name: model.memory_bytes or 0 for model in self}


@dataclass
class StartModels:
    """What a server start loaded: where every model lives, the engines loaded (with the memory each
    load added), and why the others failed."""

    sources: ModelSources
    engines: dict[str, tuple[Engine, int]]
    failures: dict[str, str]


def load_start_models(
    settings: Settings, served: dict[str, str] | None = None, given: dict[str, Engine] | None = None
) -> StartModels:
    """Load (blocking) the models a start serves: those the settings name, or `served` (name -> directory,
    a worker group's record). A model that fails is listed with its reason, unless it is the default:
    then StartupError (RepositoryError when the settings name no usable models)."""
    sources = model_sources(settings)
    if served is None:
        wanted = {name: sources.model_dirs[name] for name in models_to_load_at_start(settings, sources)}
    else:
        wanted = {name: Path(model_dir) for name, model_dir in served.items() if name in sources.model_dirs}
    engines: dict[str, tuple[Engine, int]] = {}
    failures: dict[str, str] = {}
    for name, model_dir in wanted.items():
        if given is not None and name in given:
            engines[name] = (given[name], 0)
            continue
        before = resident_bytes()
        try:
            engine = Engine.load(settings.model_copy(update={"model_dir": model_dir}))
        except (ManifestError, StartupError, OSError) as error:
            if name == sources.default_name:
                raise StartupError(f"the default model {name!r} cannot be served: {error}") from error
            logger.error("model %s cannot be served, the others will be: %s", name, error)
            failures[name] = f"load failed: {str(error).replace(str(model_dir), name)}"
            continue
        engines[name] = (engine, max(0, resident_bytes() - before))
    return StartModels(sources, engines, failures)
