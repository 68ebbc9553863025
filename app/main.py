"""The app factory: `create_app(settings)` wires settings, metrics, engine, routes and error handling."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.config import Settings
from app.engine import Engine
from app.errors import install_error_handlers
from app.metrics import Metrics
from app.middleware import MetricsMiddleware, RequestGuardMiddleware
from app.routes import router

DESCRIPTION = """\
Encode, decode, sample, reconstruct and interpolate with a variational autoencoder on onnxruntime.

Image results are JSON with one base64 PNG per image by default, `?format=array` for (C, H, W) float arrays in
[0, 1], or one PNG grid with `Accept: image/png`. Every error is `application/problem+json`:
`{"type", "title", "status", "detail"}`. Metrics at `/metrics` are per process (one process per container).
"""


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """A FastAPI app serving one model; `engine` may be pre-loaded (the CLI does, to fail fast)."""
    settings = settings if settings is not None else Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = engine if engine is not None else Engine.load(settings)
        loaded.start(settings, metrics)
        manifest = loaded.manifest
        metrics.set_model_info(manifest.name, manifest.version, loaded.provider, manifest.latent_dim)
        app.state.engine = loaded
        try:
            yield
        finally:
            app.state.engine = None
            await loaded.stop()

    app = FastAPI(title="VAE service", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.engine = None
    install_error_handlers(app)
    app.include_router(router)
    route_paths = frozenset(
        path
        for route in (*app.routes, *router.routes)
        if isinstance(path := getattr(route, "path", None), str)
    )
    app.add_middleware(
        RequestGuardMiddleware,
        metrics=metrics,
        timeout_seconds=settings.request_timeout_seconds,
        max_body_bytes=settings.max_body_bytes,
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics, route_paths=route_paths)
    return app
