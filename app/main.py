"""The app factory: `create_app(settings)` wires settings, metrics, engine, routes and error handling."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.telemetry import TelemetryConfig
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp

from app.admin import admin_router
from app.auth import ApiKeyMiddleware, ApiKeyPolicy, document_security, route_access
from app.config import Settings
from app.engine import Engine
from app.errors import install_error_handlers
from app.latent_routes import router as latent_router
from app.metrics import Metrics
from app.middleware import LoadShedder, MetricsMiddleware, RequestGuardMiddleware, RequestRecorder
from app.oip.codec import HEADER_LENGTH_HEADER
from app.oip.errors import ProtocolErrorMiddleware
from app.oip.routes import document_protocol, infer_queue
from app.oip.routes import router as protocol_router
from app.reload import ModelReloader
from app.routes import FIRST_QUEUE_BY_ROUTE, MODEL_VERSION_HEADER, query_router, router
from app.schemas import Problem
from app.score_routes import router as score_router
from app.web.routes import asset_mounts
from app.web.routes import router as web_router

DESCRIPTION = """\
Encode, decode, sample, reconstruct and interpolate with a variational autoencoder on onnxruntime.

Image results are JSON with one base64 PNG per image by default, `?format=array` for (C, H, W) float arrays in
[0, 1], or one PNG grid with `Accept: image/png`. Every error is `application/problem+json`:
`{"type", "title", "status", "detail"}`, except on the Open Inference Protocol's `/v2` routes, where it is
the protocol's `{"error"}`. Metrics at `/metrics` cover every worker process of the server.

With `VAE_API_KEY` set, the model endpoints need `Authorization: Bearer <key>` or `X-API-Key: <key>`; the
`/admin` endpoints always do. Model responses carry `X-Model-Version: name/version`.
"""

# FastAPI's own OpenTelemetry hooks are off: the service exports Prometheus metrics (app/metrics.py), and
# checking per request whether an OpenTelemetry provider is configured costs 4% of /encode.
FASTAPI_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}


class ServiceApp(FastAPI):
    """FastAPI with layers outside its own middleware stack, error handling included: `outer_middleware`,
    innermost first. The load shedder's refusals skip that stack there, and CORS covers every answer."""

    def __init__(self, **kwargs: Any) -> None:
        self.outer_middleware: list[Middleware] = []
        super().__init__(**kwargs)

    def build_middleware_stack(self) -> ASGIApp:
        app = super().build_middleware_stack()
        for cls, args, kwargs in self.outer_middleware:
            app = cls(app, *args, **kwargs)
        return app


def first_queue(method: str, path: str, engine: Engine) -> str | None:
    """The batcher queue a model request enters first ("encoder" or "decoder"), for the load shedder."""
    return FIRST_QUEUE_BY_ROUTE.get((method, path)) or infer_queue(method, path, engine)


# Makes the app's reloader: ModelReloader, or a worker group's (app/server/group.py).
ReloaderFactory = Callable[[FastAPI, Settings, Metrics], ModelReloader]


def create_app(
    settings: Settings | None = None,
    engine: Engine | None = None,
    reload_on_sighup: bool = False,
    reloader: ReloaderFactory = ModelReloader,
) -> FastAPI:
    """A FastAPI app serving one model; `engine` may be pre-loaded (the CLI does, to fail fast).

    `reload_on_sighup` installs a SIGHUP handler on the running loop (main thread only: the CLI sets it).
    """
    settings = settings if settings is not None else Settings()

    def served_model() -> dict[str, str] | None:
        serving: Engine | None = app.state.engine
        return serving.info_labels if serving is not None else None

    metrics = Metrics(served_model)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = engine if engine is not None else Engine.load(settings)
        loaded.start(settings, metrics)
        app.state.engine = loaded
        reloads = app.state.reloader = reloader(app, settings, metrics)
        await reloads.start()
        loop = asyncio.get_running_loop()
        if reload_on_sighup:
            loop.add_signal_handler(signal.SIGHUP, reloads.reload_on_signal)
        try:
            yield
        finally:
            if reload_on_sighup:
                loop.remove_signal_handler(signal.SIGHUP)
            await reloads.stop()
            serving: Engine | None = app.state.engine
            app.state.engine = None
            if serving is not None:
                await serving.stop()

    app = ServiceApp(
        title="VAE service",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        telemetry=FASTAPI_TELEMETRY,
        docs_url=None,  # app/web serves /docs and /redoc with local assets instead of a CDN's
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.engine = None
    install_error_handlers(app)
    routers = (query_router, latent_router, score_router, router, protocol_router, admin_router, web_router)
    for included in routers:
        # Into the app's own route list: include_router would add a lookup to every request (3% of /encode).
        app.router.routes.extend(included.routes)
    app.router.routes.extend(asset_mounts())
    routes = list(app.routes)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            document_security(
                schema,
                settings.api_key is not None,
                settings.protect_ops_endpoints,
                Problem.model_json_schema(),
            )
            document_protocol(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    api_keys = ApiKeyPolicy(settings.api_key, settings.protect_ops_endpoints, route_access(routes))
    recorder = RequestRecorder(metrics, routes)
    # Starlette runs the last-added middleware first: metrics, API key, request guard, routes.
    app.add_middleware(
        RequestGuardMiddleware,
        metrics=metrics,
        timeout_seconds=settings.request_timeout_seconds,
        max_body_bytes=settings.max_body_bytes,
    )
    app.add_middleware(ApiKeyMiddleware, policy=api_keys)
    app.add_middleware(MetricsMiddleware, recorder=recorder)
    # Outside FastAPI's own stack, innermost first: the load shedder, the protocol's error body on /v2, then
    # CORS around every answer.
    app.outer_middleware.append(
        Middleware(
            LoadShedder,
            recorder=recorder,
            api_keys=api_keys,
            serving_engine=lambda: app.state.engine,
            first_queue=first_queue,
        )
    )
    app.outer_middleware.append(Middleware(ProtocolErrorMiddleware))
    if settings.cors_allow_origins:
        app.outer_middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_allow_origins,
                allow_methods=["GET", "POST"],
                allow_headers=[
                    "Authorization",
                    "X-API-Key",
                    "Content-Type",
                    "Accept",
                    "Content-Encoding",
                    HEADER_LENGTH_HEADER,
                ],
                expose_headers=[MODEL_VERSION_HEADER, "Retry-After", HEADER_LENGTH_HEADER],
            )
        )
    return app
