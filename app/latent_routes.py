"""The latent-space endpoints: POST /traverse, POST /edit and GET /latent-map. Parse -> model.latent_space
-> format.

Both start from one latent vector (JSON `{"latent": [...]}`) or one image (encoded to its posterior mean) and
decode a set of frames through the decoder batcher; their options come from the query string.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from app.auth import MODEL_TAG
from app.config import Settings
from app.engine import Engine
from app.errors import InvalidRequest, LimitExceeded, NonFiniteValues
from app.inputs import images_to_array, read_latent_or_image
from app.latents import label_index, latents_array
from app.responses import ArrayJSONResponse, image_response
from app.routing import QueryRoute
from app.schemas import FramesResponse, LatentMapResponse, LatentRequest
from app.serving import IMAGE_RESPONSES, FormatQuery, problems, serving, versioned
from model.latent_space import LatentSpace, edit, traversal

# Query parameters only (the body is read by the endpoint): see app/routing.py.
router = APIRouter(route_class=QueryRoute)

_SUBJECT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": LatentRequest.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "One image."}
                    },
                }
            },
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/webp": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
DEFAULT_ATTRIBUTE_AMOUNTS = (-2.0, -1.0, 0.0, 1.0, 2.0)
DEFAULT_LABEL_AMOUNTS = (0.0, 0.25, 0.5, 0.75, 1.0)


async def _subject_latent(request: Request, engine: Engine, settings: Settings) -> np.ndarray:
    """The request's latent vector (L,) float32: sent as JSON, or an uploaded image's posterior mean."""
    subject = await read_latent_or_image(request, settings)
    if isinstance(subject, bytes):
        images = await images_to_array([subject], engine.manifest.image.shape, settings)
        mean, _ = await engine.encode(images)
        return mean[0]
    return latents_array([subject], engine.manifest.latent_dim, "latent")[0]


def _number_list(text: str, what: str, *, integers: bool = False) -> list[float]:
    """'1,2.5,-3' -> numbers; InvalidRequest naming the parameter when a value is not a (finite) number."""
    values: list[float] = []
    for part in text.split(","):
        try:
            value = int(part) if integers else float(part)
        except ValueError:
            kind = "integers" if integers else "numbers"
            raise InvalidRequest(f"{what} is a comma-separated list of {kind}; got {text!r}") from None
        if not integers and not math.isfinite(value):
            raise NonFiniteValues(f"{what} contains {part.strip()}; send finite numbers")
        values.append(value)
    return values


def _traverse_dims(dims: str | None, space: LatentSpace | None, latent_dim: int, max_rows: int) -> list[int]:
    """The requested dims, or by default the active ones (highest KL first; all without a description),
    as many as fit in max_rows."""
    if dims is None:
        active = space.active_dims if space is not None else []
        return (active or list(range(latent_dim)))[: max(1, max_rows)]
    chosen = [int(d) for d in _number_list(dims, "dims", integers=True)]
    for dim in chosen:
        if not 0 <= dim < latent_dim:
            raise InvalidRequest(f"dims holds {dim}; this model's dimensions are 0 to {latent_dim - 1}")
    if len(set(chosen)) != len(chosen):
        raise InvalidRequest(f"dims lists a dimension twice: {dims}")
    return chosen


@router.post(
    "/traverse",
    tags=[MODEL_TAG],
    response_model=FramesResponse,
    responses=IMAGE_RESPONSES,
    openapi_extra=_SUBJECT_BODY,
    summary="Traverse latent dimensions one at a time around an image's or a latent vector's code",
    description="For each dimension in `dims`, `steps` frames move that one dimension from -span to +span "
    "aggregate-posterior standard deviations around the code (models without a latent-space description: "
    "prior standard deviations, 1), all other dimensions fixed. `dims` defaults to the active dimensions, "
    "highest KL first (as many as fit in the frame limit). `Accept: image/png` gives one grid with a row per "
    "dimension.",
)
async def traverse(
    request: Request,
    dims: Annotated[
        str | None, Query(description="Comma-separated latent dimensions, e.g. 0,3,5.", examples=["0,3,5"])
    ] = None,
    span: Annotated[float, Query(gt=0, description="Half-width in aggregate-posterior stds.")] = 3.0,
    steps: Annotated[int, Query(ge=2, description="Frames per dimension, both ends included.")] = 7,
    image_format: FormatQuery = "png",
) -> Response:
    with serving(request) as (engine, settings):
        if not math.isfinite(span):
            raise NonFiniteValues(f"span is {span}; send a finite number")
        if span > settings.max_traverse_span:
            raise LimitExceeded("span", span, settings.max_traverse_span)
        space = engine.latent_space
        chosen = _traverse_dims(dims, space, engine.manifest.latent_dim, settings.frame_limit // steps)
        if len(chosen) * steps > settings.frame_limit:
            raise LimitExceeded(
                f"the number of frames ({len(chosen)} dims x {steps} steps)",
                len(chosen) * steps,
                settings.frame_limit,
            )
        latent = await _subject_latent(request, engine, settings)
        std = space.aggregate_std if space is not None else np.ones(engine.manifest.latent_dim)
        frames = traversal(latent, chosen, span, steps, std).astype(np.float32)
        response = await image_response(
            request,
            await engine.decode(frames),
            image_format,
            columns=steps,
            latents=frames,
            dims=chosen,
            span=span,
            steps=steps,
        )
        return versioned(response, engine)


def _edit_direction(
    space: LatentSpace,
    latent: np.ndarray,
    attribute: str | None,
    to_label: str | None,
    from_label: str | None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The direction one amount moves along, and what the response reports about the edit."""
    if attribute is not None:
        found = space.attribute(attribute)
        if found is None:
            raise InvalidRequest(
                f"attribute {attribute!r} is not one of this model's attributes: "
                f"{', '.join(space.attribute_names) or '(none)'}"
            )
        return found.direction, {"attribute": attribute}
    assert to_label is not None
    target = label_index(space, to_label, "to_label")
    if from_label is None:
        probabilities = space.classify(latent[None].astype(np.float64))[0]
        source, inferred = int(probabilities.argmax()), True
    else:
        source, inferred = label_index(space, from_label, "from_label"), False
    direction = space.class_centroids[target] - space.class_centroids[source]
    details = {"to_label": to_label, "from_label": space.labels[source], "from_label_inferred": inferred}
    if inferred:
        details["from_label_probability"] = float(probabilities[source])
    return direction, details


@router.post(
    "/edit",
    tags=[MODEL_TAG],
    response_model=FramesResponse,
    responses=IMAGE_RESPONSES,
    openapi_extra=_SUBJECT_BODY,
    summary="Edit an image or a latent vector along an attribute direction or towards a label",
    description="With `attribute` (a name from GET /model), frame k is latent + amounts[k] * direction, "
    "where one unit moves the attribute by one standard deviation (default amounts -2,-1,0,1,2). With "
    "`to_label`, it is latent + amounts[k] * (centroid(to_label) - centroid(from_label)): 0 = unchanged, "
    "1 = the full centroid difference (default 0,0.25,0.5,0.75,1); without `from_label`, the most probable "
    "label under the class-conditional densities is used, and the response says which. `Accept: image/png` "
    "gives one row.",
)
async def edit_route(
    request: Request,
    attribute: Annotated[str | None, Query(description="An attribute name from GET /model.")] = None,
    to_label: Annotated[str | None, Query(description="The label to move towards.")] = None,
    from_label: Annotated[str | None, Query(description="The input's label (default: inferred).")] = None,
    amounts: Annotated[
        str | None, Query(description="Comma-separated amounts, e.g. -2,-1,0,1,2.", examples=["0,0.5,1"])
    ] = None,
    image_format: FormatQuery = "png",
) -> Response:
    with serving(request) as (engine, settings):
        space = engine.latent_space
        if space is None:
            raise InvalidRequest(
                "this model has no latent-space description (latent_space.npz), so it offers no attributes "
                "or labels to edit; export it again with vae-export"
            )
        if (attribute is None) == (to_label is None):
            raise InvalidRequest("give exactly one of attribute (an attribute name) or to_label (a label)")
        if from_label is not None and to_label is None:
            raise InvalidRequest("from_label goes with to_label")
        if to_label is not None and not space.labels:
            raise InvalidRequest("this model was trained without labels, so it has no labels to edit towards")
        default = DEFAULT_ATTRIBUTE_AMOUNTS if attribute is not None else DEFAULT_LABEL_AMOUNTS
        chosen = _number_list(amounts, "amounts") if amounts is not None else list(default)
        if len(chosen) > settings.frame_limit:
            raise LimitExceeded("the number of amounts", len(chosen), settings.frame_limit)
        largest = max(abs(amount) for amount in chosen)
        if largest > settings.max_edit_amount:
            raise LimitExceeded("an amount's magnitude", largest, settings.max_edit_amount)
        latent = await _subject_latent(request, engine, settings)
        direction, details = _edit_direction(space, latent, attribute, to_label, from_label)
        frames = edit(latent, direction, chosen).astype(np.float32)
        response = await image_response(
            request,
            await engine.decode(frames),
            image_format,
            columns=len(chosen),
            latents=frames,
            amounts=chosen,
            **details,
        )
        return versioned(response, engine)


@router.get(
    "/latent-map",
    tags=[MODEL_TAG],
    response_model=LatentMapResponse,
    responses=problems(422, 503),
    summary="A 2-D map of the test split's latent codes, with labels and the projection that made it",
    description="The test split's posterior means projected onto their first two principal components: "
    "point = components @ (code - mean). A code's place on the map is computed the same way; a point "
    "(x, y) back on the latent space is mean + x * components[0] + y * components[1].",
)
async def latent_map(request: Request) -> Response:
    with serving(request) as (engine, _):
        space = engine.latent_space
        if space is None or not len(space.projection_points):
            raise InvalidRequest(
                "this model ships no latent map (latent_space.npz with a projection); export it again with "
                "vae-export"
            )
        body = {
            "points": space.projection_points.astype(np.float32),
            "labels": space.projection_labels.astype(np.int64),
            "label_names": list(space.labels),
            "mean": space.projection_mean.astype(np.float32),
            "components": space.projection_components.astype(np.float32),
        }
        return versioned(ArrayJSONResponse(body), engine)
