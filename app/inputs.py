"""Reading requests: uploaded images (multipart or raw body), and interpolation endpoints."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from typing import Any, TypeVar

import numpy as np
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from app.config import Settings
from app.errors import InvalidRequest, LimitExceeded, UnsupportedMediaType, VaeError
from app.images import INLINE_DECODE_MAX_PIXELS, read_image_header, to_model_batch
from app.multipart import boundary_of, parse_form, text_value
from app.schemas import DecodeRequest, InterpolateOptions, InterpolateRequest, LatentRequest

IMAGE_FIELDS = ("file", "files")
MAX_FORM_FIELDS = 16
# A multipart body's values by field name: file uploads as bytes, text fields as str.
FormValues = dict[str, list[bytes | str]]


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def is_json(kind: str) -> bool:
    """JSON bodies may come without a Content-Type, as application/json, or as an +json type."""
    return kind in ("", "application/json") or kind.endswith("+json")


def curl_hint(kind: str) -> str:
    """What to do about the Content-Type `curl -d` sends when none is given."""
    if kind != "application/x-www-form-urlencoded":
        return ""
    return " (curl -d sends application/x-www-form-urlencoded: add -H 'Content-Type: application/json')"


def require_json(kind: str, example: str) -> None:
    if not is_json(kind):
        raise UnsupportedMediaType(
            f"Content-Type {kind!r} is not accepted; send JSON with Content-Type: application/json, e.g. "
            f"{example}{curl_hint(kind)}"
        )


def _is_one_vector(value: Any) -> bool:
    return isinstance(value, list) and any(
        isinstance(item, int | float) and not isinstance(item, bool) for item in value
    )


async def read_decode_request(request: Request, latent_dim: int) -> DecodeRequest:
    """/decode's body, `{"latents": [[...], ...]}`; one flat vector gets one message saying how to nest it."""
    require_json(media_type(request), '{"latents": [[0.1, -0.3, ...]]}')
    payload = await _json_body(request)
    if isinstance(payload, dict) and _is_one_vector(payload.get("latents")):
        raise InvalidRequest(
            f"latents is a list of vectors, e.g. [[...{latent_dim} numbers...]]; to decode one vector, "
            "put it in a list of its own"
        )
    return _validate(DecodeRequest, payload)


async def read_optional_json(request: Request, model: type[Model], example: str) -> Model | None:
    """A JSON body validated as `model`, or None when the body is empty."""
    body = await request.body()
    if not body:
        return None
    require_json(media_type(request), example)
    return _validate(model, _parse_json(body), query_options=False)


async def read_form(request: Request, max_files: int) -> FormValues:
    """A multipart body's values by field name, in order: uploads as bytes, text fields as str.

    Plain bodies are split by app.multipart in microseconds; any other goes through Starlette's parser,
    whose 400s (too many files, malformed body) become 422 problems.
    """
    boundary = boundary_of(request.headers.get("content-type", ""))
    parts = parse_form(await request.body(), boundary) if boundary is not None else None
    if parts is not None:
        files = sum(filename is not None for _, filename, _ in parts)
        if files <= max_files and len(parts) - files <= MAX_FORM_FIELDS:
            values: FormValues = {}
            for name, filename, content in parts:
                values.setdefault(name, []).append(content if filename is not None else text_value(content))
            return values
    try:
        form = await request.form(max_files=max_files, max_fields=MAX_FORM_FIELDS)
    except VaeError:  # e.g. RequestTooLarge while streaming the body: already the right answer
        raise
    except HTTPException as error:
        if "Too many files" in str(error.detail):
            raise LimitExceeded("the number of uploaded files", f"more than {max_files}", max_files) from None
        raise InvalidRequest(f"the multipart body cannot be parsed: {error.detail}") from None
    values = {}
    try:
        for name, value in form.multi_items():
            values.setdefault(name, []).append(await value.read() if isinstance(value, UploadFile) else value)
    finally:
        await form.close()
    return values


def upload_bytes(form: FormValues, field: str) -> list[bytes]:
    blobs = []
    for value in form.get(field, []):
        if not isinstance(value, bytes):
            raise InvalidRequest(f"multipart field {field!r} must be a file upload, not a text field")
        blobs.append(value)
    return blobs


def text_fields(form: FormValues, fields: tuple[str, ...]) -> dict[str, str]:
    """The last value of each of `fields` that the form has; they must be text, not file uploads."""
    values = {}
    for field in fields:
        if field in form:
            value = form[field][-1]
            if not isinstance(value, str):
                raise InvalidRequest(f"multipart field {field!r} must be a text field, not a file upload")
            values[field] = value
    return values


async def read_image_blobs(request: Request, settings: Settings) -> list[bytes]:
    """Uploaded image files: multipart fields `file` / `files`, or a raw body with an image Content-Type."""
    kind = media_type(request)
    limit = settings.max_items_per_request
    if kind == "multipart/form-data":
        form = await read_form(request, limit)
        blobs = [blob for field in IMAGE_FIELDS for blob in upload_bytes(form, field)]
        if not blobs:
            raise InvalidRequest(
                "the multipart body has no image; send it as field 'file' (several as 'files')"
            )
        if len(blobs) > limit:
            raise LimitExceeded("the number of images", len(blobs), limit)
        return blobs
    if kind.startswith("image/"):
        body = await request.body()
        if not body:
            raise InvalidRequest("the request body is empty; send the image bytes")
        return [body]
    raise UnsupportedMediaType(
        f"Content-Type {kind or '(none)'!r} is not accepted; send an image body (image/png, image/jpeg, "
        "image/webp, ...) or multipart/form-data with field 'file' (several as 'files')"
    )


async def images_to_array(blobs: list[bytes], shape: tuple[int, int, int], settings: Settings) -> np.ndarray:
    """Decode uploads to (N, C, H, W) float32 in [0, 1]; large images off the event loop."""
    images = []
    inline_pixels = INLINE_DECODE_MAX_PIXELS  # what the event loop may still decode for this request
    for blob in blobs:
        images.append(read_image_header(blob, settings.max_image_pixels, decode_max_pixels=inline_pixels))
        inline_pixels = max(0, inline_pixels - images[-1].width * images[-1].height)
    if sum(image.width * image.height for image in images) <= INLINE_DECODE_MAX_PIXELS:
        return to_model_batch(images, shape)
    return await asyncio.to_thread(to_model_batch, images, shape)


def _base64_image(value: str, field: str) -> bytes:
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(
            f"{field} is a string but not base64 image data; send a latent vector (list of numbers) "
            "or a base64-encoded image"
        ) from None


Endpoint = list[float] | bytes


async def read_interpolation(request: Request) -> tuple[Endpoint, Endpoint, InterpolateOptions]:
    """start, end (latent vector or image bytes) and options, from a JSON body or a multipart form."""
    kind = media_type(request)
    if kind == "multipart/form-data":
        form = await read_form(request, 2)
        endpoints: list[Endpoint] = []
        for field in ("start", "end"):
            blobs = upload_bytes(form, field)
            if len(blobs) != 1:
                raise InvalidRequest(f"the multipart body needs exactly one file in field {field!r}")
            endpoints.append(blobs[0])
        options = _validate(InterpolateOptions, text_fields(form, ("steps", "method")))
        return endpoints[0], endpoints[1], options
    if is_json(kind):
        parsed = _validate(InterpolateRequest, await _json_body(request))
        start = _base64_image(parsed.start, "start") if isinstance(parsed.start, str) else parsed.start
        end = _base64_image(parsed.end, "end") if isinstance(parsed.end, str) else parsed.end
        return start, end, InterpolateOptions(steps=parsed.steps, method=parsed.method)
    raise UnsupportedMediaType(
        f"Content-Type {kind!r} is not accepted; send application/json or multipart/form-data "
        f"with files 'start' and 'end'{curl_hint(kind)}"
    )


async def read_latent_or_image(request: Request, settings: Settings) -> list[float] | bytes:
    """What /traverse and /edit start from: JSON `{"latent": [...]}`, or one image (multipart field `file`,
    or a raw image body) to be encoded to its posterior mean.
    """
    kind = media_type(request)
    if is_json(kind):
        return _validate(LatentRequest, await _json_body(request)).latent
    if kind != "multipart/form-data" and not kind.startswith("image/"):
        raise UnsupportedMediaType(
            f"Content-Type {kind!r} is not accepted; send application/json with a latent vector "
            '({"latent": [...]}), an image body (image/png, ...) or multipart/form-data with field '
            f"'file'{curl_hint(kind)}"
        )
    blobs = await read_image_blobs(request, settings)
    if len(blobs) != 1:
        raise LimitExceeded("the number of images", len(blobs), 1)
    return blobs[0]


async def _json_body(request: Request) -> Any:
    return _parse_json(await request.body())


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidRequest(f"the body is not valid JSON ({error})") from None


Model = TypeVar("Model", bound=BaseModel)


def _validate(model: type[Model], payload: Any, query_options: bool = True) -> Model:
    """`payload` as `model`; a field the model does not take is refused with 422 naming those it takes
    (pydantic would ignore it: `{"latent": ..., "to_label": 3}` then failed for a missing to_label), and
    with `query_options`, saying the route's options go in the query string."""
    if isinstance(payload, dict):
        accepted = [field.alias or name for name, field in model.model_fields.items()]
        unknown = sorted(str(key) for key in payload if key not in accepted)
        if unknown:
            names, plural = ", ".join(repr(key) for key in unknown), "s" if len(unknown) > 1 else ""
            where = "; the route's options are query parameters" if query_options else ""
            raise InvalidRequest(
                f"unknown field{plural} {names} in the JSON body; it takes {', '.join(accepted)}{where}"
            )
    try:
        return model.model_validate(payload)
    except ValidationError as error:
        raise RequestValidationError(
            [{**item, "loc": ("body", *item["loc"])} for item in error.errors(include_url=False)]
        ) from None
