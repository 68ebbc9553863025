"""The app factory: `create_app(settings)` wires settings, metrics, the model registry, routes and error
handling."""

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
from app.control import ModelControl
from app.engine import Engine
from app.errors import install_error_handlers
from app.latent_routes import router as latent_router
from app.metrics import Metrics
from app.middleware import LoadShedder, MetricsMiddleware, RequestGuardMiddleware, RequestRecorder
from app.models_routes import router as models_router
from app.oip.codec import HEADER_LENGTH_HEADER
from app.oip.errors import ProtocolErrorMiddleware
from app.oip.routes import document_protocol, infer_queue
from app.oip.routes import router as protocol_router
from app.ops_routes import router as ops_router
from app.registry import ModelRegistry, StartModels, load_start_models
from app.repository import model_sources
from app.routes import first_queue_of, query_router
from app.routing import PrefixedRoutes
from app.schemas import Problem
from app.score_routes import router as score_router
from app.serving import MODEL_VERSION_HEADER, MODELS_PREFIX, document_model_name, model_routes
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


def first_queue(method: str, path: str, registry: ModelRegistry) -> tuple[str, str] | None:
    """The model and the batcher queue ("encoder" or "decoder") a model request enters first, for the load
    shedder; None for other requests."""
    return first_queue_of(method, path, registry.default_name) or infer_queue(method, path, registry)


# Makes the app's model control: ModelControl, or a worker group's (app/server/group.py).
ControlFactory = Callable[[ModelRegistry, Settings, Metrics], ModelControl]


def create_app(
    settings: Settings | None = None,
    engine: Engine | None = None,
    reload_on_sighup: bool = False,
    control: ControlFactory = ModelControl,
    started: StartModels | None = None,
) -> FastAPI:
    """A FastAPI app serving the settings' models. `started` are the models loaded already (the CLI loads
    them first, to fail fast), or `engine` the default model's; otherwise they load at startup.

    `reload_on_sighup` installs a SIGHUP handler on the running loop (main thread only: the CLI sets it).
    """
    settings = settings if settings is not None else Settings()
    registry: ModelRegistry | None = None

    def served_models() -> list[dict[str, str]]:
        return registry.info_labels() if registry is not None else []

    def model_memory() -> dict[str, int]:
        return registry.memory_by_model() if registry is not None else {}

    metrics = Metrics(served_models, model_memory)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal registry
        if started is not None:
            loaded = started
        else:
            given = {model_sources(settings).default_name: engine} if engine is not None else None
            loaded = load_start_models(settings, given=given)
        registry = app.state.models = ModelRegistry(loaded.sources, settings, metrics)
        registry.serve_at_start(loaded)
        controls = app.state.control = control(registry, settings, metrics)
        await controls.start()
        loop = asyncio.get_running_loop()
        if reload_on_sighup:
            loop.add_signal_handler(signal.SIGHUP, controls.reload_on_signal)
        try:
            yield
        finally:
            if reload_on_sighup:
                loop.remove_signal_handler(signal.SIGHUP)
            await controls.stop()
            for model in registry:
                serving = registry.take_out(model.name, "the server stopped")
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
    app.state.models = None
    install_error_handlers(app)
    routers = (
        query_router,
        latent_router,
        score_router,
        models_router,
        ops_router,
        protocol_router,
        admin_router,
        web_router,
    )
    for included in routers:
        # Into the app's own route list: include_router would add a lookup to every request (3% of /encode).
        app.router.routes.extend(included.routes)
    # The same model routes once more under /models/{model_name}, after the others: /encode stays first.
    prefixed = model_routes(query_router, latent_router, score_router)
    app.router.routes.extend(prefixed)
    # ... and found first by the rest of their path (app/routing.py: 30 us of route matching saved).
    app.router.routes.insert(0, PrefixedRoutes(MODELS_PREFIX, prefixed))
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
            document_model_name(schema)
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
            registry=lambda: app.state.models,
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
