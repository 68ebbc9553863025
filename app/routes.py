"""HTTP endpoints. Each one parses, calls the engine, formats; limits come from the app's Settings.

Every model endpoint serves the default model at its own path (`/encode`) and any model of the repository
under `/models/{model_name}` (`/models/mnist-ae/encode`): the same route, registered twice (`model_routes`);
`serving` finds the model the path names.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from app.auth import MODEL_TAG
from app.config import Settings
from app.engine import Engine
from app.errors import LimitExceeded, ModelNotReady, NonFiniteValues
from app.images import RESAMPLING_FILTER
from app.inputs import images_to_array, read_decode_request, read_image_blobs, read_interpolation
from app.latents import (
    SEED_LIMIT,
    Prior,
    available_priors,
    draw_latents,
    interpolate,
    latents_array,
    pick_seed,
    reparameterize,
)
from app.metrics import Metrics
from app.registry import MODEL_SCOPE_KEY, ModelRegistry
from app.responses import ArrayJSONResponse, image_response
from app.routing import QueryRoute
from app.schemas import (
    DecodeRequest,
    EncodeResponse,
    ImageFormat,
    ImagesResponse,
    InterpolateRequest,
    Problem,
)
from model.latent_space import LatentSpace
from model.scores import ScoreReference

router = APIRouter()
# The endpoints that read the request themselves and take query parameters only: see app/routing.py.
query_router = APIRouter(route_class=QueryRoute)
OPS_TAG = "operations"
MODEL_VERSION_HEADER = "X-Model-Version"
MODELS_PREFIX = "/models/{model_name}"
# The queue each route's items always enter first; while it is full, the load shedder refuses the route
# with 503 before parsing (/interpolate's first queue depends on its body, so it is not listed).
FIRST_QUEUE_BY_ROUTE = {
    ("POST", "/encode"): "encoder",
    ("POST", "/reconstruct"): "encoder",
    ("POST", "/decode"): "decoder",
    ("GET", "/sample"): "decoder",
    ("POST", "/score"): "encoder",
}

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
_INTERPOLATE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": InterpolateRequest.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["start", "end"],
                    "properties": {
                        "start": {"type": "string", "format": "binary"},
                        "end": {"type": "string", "format": "binary"},
                        "steps": {"type": "integer", "default": 8, "minimum": 2},
                        "method": {"type": "string", "enum": ["linear", "slerp"], "default": "linear"},
                    },
                }
            },
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
_CONVERSION_NOTE = (
    "Images are converted to the model's channels and size: alpha is composited onto black, colour "
    "becomes grayscale (Pillow 'L') or RGB, and the image is stretched to the model's H x W with Pillow's "
    "antialiased "
    f"{RESAMPLING_FILTER.name.lower()} filter."
)

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


async def _encode_uploads(
    request: Request, engine: Engine, settings: Settings
) -> tuple[np.ndarray, np.ndarray]:
    blobs = await read_image_blobs(request, settings)
    images = await images_to_array(blobs, engine.manifest.image.shape, settings)
    return await engine.encode(images)


@query_router.post(
    "/encode",
    tags=[MODEL_TAG],
    response_model=EncodeResponse,
    responses=BODY_PROBLEMS,
    openapi_extra=IMAGE_UPLOAD_BODY,
    summary="Encode images to their latent distributions",
    description="Upload an image (multipart field `file`, several as `files`, or a raw image body). "
    + _CONVERSION_NOTE
    + " With `sample=true`, z = mean + std * eps where eps = numpy.random.default_rng(seed).standard_normal"
    "((N, latent_dim)) cast to float32; without a seed one is picked and returned.",
)
async def encode(
    request: Request,
    sample: Annotated[bool, Query(description="Also draw z from each posterior.")] = False,
    seed: SeedQuery = None,
) -> Response:
    with serving(request) as (engine, settings):
        mean, log_var = await _encode_uploads(request, engine, settings)
        std = np.exp(np.float32(0.5) * log_var)
        items: list[dict[str, np.ndarray]] = [
            {"mean": m, "log_var": v, "std": s} for m, v, s in zip(mean, log_var, std, strict=True)
        ]
        if sample:
            seed = pick_seed() if seed is None else seed
            for item, z in zip(items, reparameterize(mean, log_var, seed), strict=True):
                item["z"] = z
        response = ArrayJSONResponse(
            {"latent_dim": engine.manifest.latent_dim, "seed": seed if sample else None, "items": items}
        )
        return versioned(response, engine)


_DECODE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": DecodeRequest.model_json_schema()}},
    }
}


@query_router.post(
    "/decode",
    tags=[MODEL_TAG],
    response_model=ImagesResponse,
    responses=IMAGE_RESPONSES,
    summary="Decode latent vectors to images",
    openapi_extra=_DECODE_BODY,
)
async def decode(
    request: Request,
    image_format: FormatQuery = "png",
    columns: ColumnsQuery = None,
) -> Response:
    with serving(request) as (engine, settings):
        body = await read_decode_request(request, engine.manifest.latent_dim)
        if len(body.latents) > settings.max_items_per_request:
            raise LimitExceeded(
                "the number of latent vectors", len(body.latents), settings.max_items_per_request
            )
        latents = latents_array(body.latents, engine.manifest.latent_dim)
        images = await engine.decode(latents)
        return versioned(await image_response(request, images, image_format, columns), engine)


@query_router.get(
    "/sample",
    tags=[MODEL_TAG],
    response_model=ImagesResponse,
    responses=SAMPLE_RESPONSES,
    summary="Generate images from a prior, or from one label's density",
    description="Decodes n latents drawn with numpy.random.default_rng(seed): `prior=standard` is N(0, I) "
    "(rng.standard_normal((n, latent_dim)) * temperature); `prior=gmm` is the Gaussian mixture fitted to the "
    "training split's codes (components drawn by weight, then mean + temperature * chol(cov) @ eps); `label` "
    "samples that label's own mixture the same way. Without `prior` or `label`, the model's best prior is "
    "used (the mixture when it ships one; GET /model lists them), and the response says which. Temperature "
    "scales each density's spread around its means; the same seed gives the same images.",
)
async def sample(
    request: Request,
    n: Annotated[int, Query(ge=1, description="Number of images.")] = 16,
    seed: SeedQuery = None,
    temperature: Annotated[float, Query(ge=0, description="Scale of the prior's standard deviation.")] = 1.0,
    prior: Annotated[Prior | None, Query(description="standard or gmm (default: the model's best).")] = None,
    label: Annotated[str | None, Query(description="Sample this label's density (see GET /model).")] = None,
    image_format: FormatQuery = "png",
    columns: ColumnsQuery = None,
) -> Response:
    with serving(request) as (engine, settings):
        if n > settings.max_sample_n:
            raise LimitExceeded("n", n, settings.max_sample_n)
        if not np.isfinite(temperature):
            raise NonFiniteValues(f"temperature is {temperature}; send a finite number")
        if temperature > settings.max_temperature:
            raise LimitExceeded("temperature", temperature, settings.max_temperature)
        seed = pick_seed() if seed is None else seed
        latents, used = draw_latents(
            engine.latent_space, engine.manifest.latent_dim, n, seed, temperature, prior, label
        )
        response = await image_response(
            request,
            await engine.decode(latents),
            image_format,
            columns,
            seed=seed,
            temperature=temperature,
            prior=used,
            label=label,
        )
        return versioned(response, engine)


@query_router.post(
    "/reconstruct",
    tags=[MODEL_TAG],
    response_model=ImagesResponse,
    responses=IMAGE_RESPONSES,
    openapi_extra=IMAGE_UPLOAD_BODY,
    summary="Encode and decode images",
    description="Takes the same uploads as /encode and decodes each image's mean, or with `sample=true` a z "
    "sampled as in /encode. " + _CONVERSION_NOTE,
)
async def reconstruct(
    request: Request,
    sample: Annotated[bool, Query(description="Decode a sampled z instead of the mean.")] = False,
    seed: SeedQuery = None,
    image_format: FormatQuery = "png",
    columns: ColumnsQuery = None,
) -> Response:
    with serving(request) as (engine, settings):
        mean, log_var = await _encode_uploads(request, engine, settings)
        latents = mean
        if sample:
            seed = pick_seed() if seed is None else seed
            latents = reparameterize(mean, log_var, seed)
        response = await image_response(
            request, await engine.decode(latents), image_format, columns, seed=seed if sample else None
        )
        return versioned(response, engine)


@query_router.post(
    "/interpolate",
    tags=[MODEL_TAG],
    response_model=ImagesResponse,
    responses=IMAGE_RESPONSES,
    openapi_extra=_INTERPOLATE_BODY,
    summary="Interpolate between two latent vectors or images",
    description="`start` and `end` are latent vectors or images (base64 in JSON, or multipart files); images "
    "are encoded to their mean first. Returns `steps` frames, both endpoints included, and their latents. "
    + _CONVERSION_NOTE,
)
async def interpolate_route(
    request: Request, image_format: FormatQuery = "png", columns: ColumnsQuery = None
) -> Response:
    with serving(request) as (engine, settings):
        start, end, options = await read_interpolation(request)
        if options.steps > settings.max_interpolation_steps:
            raise LimitExceeded("steps", options.steps, settings.max_interpolation_steps)
        endpoints: dict[str, np.ndarray] = {}
        uploads: dict[str, bytes] = {}
        for name, value in (("start", start), ("end", end)):
            if isinstance(value, bytes):
                uploads[name] = value
            else:
                endpoints[name] = latents_array([value], engine.manifest.latent_dim, name)[0]
        if uploads:  # images are encoded to their posterior mean, in one batch
            images = await images_to_array(list(uploads.values()), engine.manifest.image.shape, settings)
            mean, _ = await engine.encode(images)
            endpoints.update(zip(uploads, mean, strict=True))
        frames = interpolate(endpoints["start"], endpoints["end"], options.steps, options.method)
        response = await image_response(
            request, await engine.decode(frames), image_format, columns, latents=frames, method=options.method
        )
        return versioned(response, engine)


@router.get("/healthz", tags=[OPS_TAG], summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz", tags=[OPS_TAG], summary="Readiness: the model is loaded and warmed up", responses=problems(503)
)
async def readyz(request: Request) -> dict[str, str]:
    ready_engine(request)
    return {"status": "ready"}


@router.get(
    "/models",
    tags=[MODEL_TAG],
    summary="Every model of the repository: name, version, kind, state, shapes and memory",
    description="`state` is `ready`, `loading`, `unloading` or `unavailable` (with its `reason`: not loaded, "
    "unloaded, or why its load failed). Models load and unload with POST /v2/repository/models/<name>/load "
    "and /unload; `default_model` is the one the unprefixed routes serve.",
    responses=problems(503),
)
async def list_models(request: Request) -> dict[str, Any]:
    return model_registry(request).describe()


_MODEL_INFO_DOCS: dict[str, Any] = {
    "tags": [MODEL_TAG],
    "summary": "A model's manifest, provider, batching and limits (GET /model: the default model's)",
    "responses": problems(503),  # and 404 under /models/{model_name} (document_model_name)
}


@router.get("/model", **_MODEL_INFO_DOCS)
@router.get(MODELS_PREFIX, **_MODEL_INFO_DOCS)
async def model_info(request: Request, response: Response) -> dict[str, Any]:
    with serving(request) as (engine, settings):
        versioned(response, engine)
        return {
            "model": engine.version_label,
            "manifest": engine.manifest.model_dump(mode="json"),
            "provider": engine.provider,
            "providers": engine.providers,
            "batching": settings.model_dump(
                include={"max_batch_size", "max_wait_ms", "max_queue_items", "inference_threads"}
            ),
            "limits": settings.model_dump(
                include={
                    "request_timeout_seconds",
                    "max_body_bytes",
                    "max_image_pixels",
                    "max_items_per_request",
                    "max_sample_n",
                    "max_interpolation_steps",
                    "max_temperature",
                    "max_frames_per_request",
                    "max_traverse_span",
                    "max_edit_amount",
                    "max_score_samples",
                    "max_score_decodes",
                    "anomaly_alpha",
                }
            ),
            "latent_space": describe_latent_space(engine.latent_space, engine.manifest.latent_dim),
            "scores": describe_score_reference(engine.score_reference),
        }


SHOWN_PERCENTILES = (0, 1, 5, 25, 50, 75, 95, 99, 100)


def describe_score_reference(reference: ScoreReference | None) -> dict[str, Any]:
    """What GET /model says about POST /score's reference: the test split's score quantiles."""
    if reference is None:
        return {"note": "this model ships no score reference: /score gives scores without a verdict"}
    return {
        "reference_images": reference.size,
        "reference_samples": reference.samples,
        "quantiles": {
            name: {
                str(level): float(np.percentile(reference.values[index], level))
                for level in SHOWN_PERCENTILES
            }
            for index, name in enumerate(reference.names)
        },
    }


def describe_latent_space(space: LatentSpace | None, latent_dim: int) -> dict[str, Any]:
    """What GET /model says about the latent space: priors, labels, attributes, per-dimension diagnostics."""
    summary: dict[str, Any] = {"priors": available_priors(space), "default_prior": available_priors(space)[0]}
    if space is None:
        summary["note"] = (
            "this model ships no latent-space description (latent_space.npz): only the standard prior; "
            "no labels, attributes or diagnostics; /traverse spans are in prior standard deviations"
        )
        return summary
    summary["labels"] = list(space.labels)
    summary["attributes"] = [
        {
            "name": attribute.name,
            "description": attribute.description,
            "std": attribute.std,
            "effect_per_unit": attribute.effect_per_unit,
            "monotonic_fraction": attribute.monotonic_fraction,
        }
        for attribute in space.attributes
    ]
    active = space.active_dims
    summary["active_dims"] = active
    summary["dimensions"] = [
        {
            "dim": dim,
            "aggregate_mean": float(space.aggregate_mean[dim]),
            "aggregate_std": float(space.aggregate_std[dim]),
            "test_kl": float(space.test_kl_per_dim[dim]),
            "test_mean_variance": float(space.test_mean_variance[dim]),
            "active": dim in active,
        }
        for dim in range(latent_dim)
    ]
    summary["fitting"] = space.info
    return summary


@router.get(
    "/metrics",
    tags=[OPS_TAG],
    summary="Prometheus metrics of the server, every worker process included",
    response_class=Response,
)
async def metrics(request: Request) -> Response:
    app_metrics: Metrics = request.app.state.metrics
    return Response(generate_latest(app_metrics.exposition), media_type=CONTENT_TYPE_LATEST)


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


def first_queue_of(method: str, path: str, default_model: str) -> tuple[str, str] | None:
    """The model and the queue ("encoder" or "decoder") a model route's items always enter first (None for
    other paths), for the load shedder."""
    part = FIRST_QUEUE_BY_ROUTE.get((method, path))
    if part is not None:
        return default_model, part
    if path.startswith("/models/"):
        name, _, route = path.removeprefix("/models/").partition("/")
        part = FIRST_QUEUE_BY_ROUTE.get((method, "/" + route))
        if part is not None:
            return name, part
    return None


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
