"""What every model route shares: finding the model a request names (the path's `/models/{model_name}`,
else the default model), the X-Model-Version header, the documented problem responses, the common query
parameters and upload body, and registering routes under `/models/{model_name}`.

Feature routers (app/routes.py, app/latent_routes.py, app/score_routes.py, app/models_routes.py, the
protocol's app/oip/routes.py) import from here; this module imports no router.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.routing import APIRoute
from starlette.responses import Response

from app.config import Settings
from app.engine import Engine
from app.errors import ModelNotReady
from app.latents import SEED_LIMIT
from app.registry import MODEL_SCOPE_KEY, ModelRegistry
from app.schemas import ImageFormat, Problem

OPS_TAG = "operations"
MODEL_VERSION_HEADER = "X-Model-Version"
MODELS_PREFIX = "/models/{model_name}"

IMAGE_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "One image."},
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "Several images, answered in upload order.",
                        },
                    },
                }
            },
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/webp": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}

_PROBLEM_SCHEMA = Problem.model_json_schema()
PROBLEM_DESCRIPTIONS = {
    404: "No model of that name; the detail lists the served names.",
    413: "Body or image too large.",
    415: "Not an image, or an unsupported Content-Type.",
    422: "Invalid query parameter or body: corrupt image, wrong latent length, non-finite numbers, an "
    "unknown parameter, or a limit exceeded.",
    503: "Queue full (see Retry-After), or the model is not ready or not loaded.",
    504: "Deadline exceeded.",
}


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The problem responses a route can give (401 is added where the API key applies, app/auth.py)."""
    return {
        status: {
            "content": {"application/problem+json": {"schema": _PROBLEM_SCHEMA}},
            "description": PROBLEM_DESCRIPTIONS[status],
        }
        for status in statuses
    }


# A route that reads a body, and one that takes query parameters only; both queue model work.
BODY_PROBLEMS = problems(413, 415, 422, 503, 504)
QUERY_PROBLEMS = problems(422, 503, 504)
_PNG_RESULT: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
        "description": "JSON by default; with `Accept: image/png`, one PNG grid of all images.",
    },
}
IMAGE_RESPONSES = {**BODY_PROBLEMS, **_PNG_RESULT}
SAMPLE_RESPONSES = {**QUERY_PROBLEMS, **_PNG_RESULT}

FormatQuery = Annotated[
    ImageFormat,
    Query(alias="format", description="png: base64 PNG per image; array: (C, H, W) floats in [0, 1]."),
]
SeedQuery = Annotated[int | None, Query(ge=0, lt=SEED_LIMIT, description="Seed for reproducible sampling.")]
ColumnsQuery = Annotated[
    int | None, Query(ge=1, description="Width of the PNG grid in images (default: near-square).")
]


def model_registry(request: Request, readiness_path: str = "/readyz") -> ModelRegistry:
    """The app's model registry; ModelNotReady (503) while the server starts, pointing at the probe."""
    registry: ModelRegistry | None = request.app.state.models
    if registry is None:
        raise ModelNotReady(f"the model is still loading; poll {readiness_path}")
    return registry


def ready_engine(request: Request, readiness_path: str = "/readyz", model: str | None = None) -> Engine:
    """The ready engine of `model` (default: the default model); 404 for an unknown model, 503 while it
    loads or when it is not loaded."""
    return model_registry(request, readiness_path).ready_engine(model, readiness_path)


@contextmanager
def serving(
    request: Request, readiness_path: str = "/readyz", model: str | None = None
) -> Iterator[tuple[Engine, Settings]]:
    """The ready engine of `model`, else of the model the path names (`/models/{model_name}/...`), else of
    the default model, held until the request is answered (a reload or unload waits for it); and the
    settings.

    A plain context manager: Depends costs ~20 us per request.
    """
    registry = model_registry(request, readiness_path)
    name = model if model is not None else request.path_params.get("model_name")
    with registry.ready_engine(name, readiness_path).in_use() as engine:
        request.scope[MODEL_SCOPE_KEY] = registry.default_name if name is None else name
        yield engine, request.app.state.settings


def versioned(response: Response, engine: Engine) -> Response:
    """Tell the caller which model version answered."""
    response.headers[MODEL_VERSION_HEADER] = engine.version_label
    return response


def model_routes(*routers: APIRouter) -> list[APIRoute]:
    """The routers' model endpoints once more under /models/{model_name}: same endpoints, same route
    classes, same documentation, each served by the model its path names (`serving`)."""
    return [
        type(route)(
            MODELS_PREFIX + route.path,
            route.endpoint,
            methods=route.methods,
            response_model=route.response_model,
            tags=route.tags,
            summary=route.summary,
            description=route.description,
            responses=route.responses,
            openapi_extra=route.openapi_extra,
            name=route.name,
            include_in_schema=route.include_in_schema,
        )
        for included in routers
        for route in included.routes
        if isinstance(route, APIRoute)
    ]


MODEL_NAME_PARAMETER = {
    "name": "model_name",
    "in": "path",
    "required": True,
    "description": "A model of the repository (GET /models lists them).",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]*$"},
}


def document_model_name(schema: dict[str, Any]) -> None:
    """Document the `model_name` path parameter of the /models/{model_name} routes, which the endpoints read
    from the path themselves (they also serve the unprefixed paths, where there is none)."""
    for path, operations in schema.get("paths", {}).items():
        if not path.startswith(MODELS_PREFIX):
            continue
        for operation in operations.values():
            parameters = operation.setdefault("parameters", [])
            if not any(parameter.get("name") == "model_name" for parameter in parameters):
                parameters.insert(0, MODEL_NAME_PARAMETER)
            operation.get("responses", {}).setdefault(
                "404",
                {
                    "description": PROBLEM_DESCRIPTIONS[404],
                    "content": {"application/problem+json": {"schema": _PROBLEM_SCHEMA}},
                },
            )
