"""The VAE endpoints: encode, decode, sample, reconstruct and interpolate. Each one parses, calls the engine,
formats; limits come from the app's Settings.

Every model endpoint serves the default model at its own path (`/encode`) and any model of the repository
under `/models/{model_name}` (`/models/mnist-ae/encode`): the same route, registered twice
(app/serving.py's `model_routes`); `serving` finds the model the path names.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from app.auth import MODEL_TAG
from app.config import Settings
from app.engine import Engine
from app.errors import LimitExceeded, NonFiniteValues
from app.images import RESAMPLING_FILTER
from app.inputs import images_to_array, read_decode_request, read_image_blobs, read_interpolation
from app.latents import (
    Prior,
    draw_latents,
    interpolate,
    latents_array,
    pick_seed,
    reparameterize,
)
from app.responses import ArrayJSONResponse, image_response
from app.routing import QueryRoute
from app.schemas import DecodeRequest, EncodeResponse, ImagesResponse, InterpolateRequest
from app.serving import (
    BODY_PROBLEMS,
    IMAGE_RESPONSES,
    IMAGE_UPLOAD_BODY,
    SAMPLE_RESPONSES,
    ColumnsQuery,
    FormatQuery,
    SeedQuery,
    serving,
    versioned,
)

# The endpoints that read the request themselves and take query parameters only: see app/routing.py.
query_router = APIRouter(route_class=QueryRoute)
# The queue each route's items always enter first; while it is full, the load shedder refuses the route
# with 503 before parsing (/interpolate's first queue depends on its body, so it is not listed).
FIRST_QUEUE_BY_ROUTE = {
    ("POST", "/encode"): "encoder",
    ("POST", "/reconstruct"): "encoder",
    ("POST", "/decode"): "decoder",
    ("GET", "/sample"): "decoder",
    ("POST", "/score"): "encoder",
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

_CONVERSION_NOTE = (
    "Images are converted to the model's channels and size: alpha is composited onto black, colour "
    "becomes grayscale (Pillow 'L') or RGB, and the image is stretched to the model's H x W with Pillow's "
    "antialiased "
    f"{RESAMPLING_FILTER.name.lower()} filter."
)


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
