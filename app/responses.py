"""Writing image results: base64 PNGs or float arrays in JSON, or one PNG grid for `Accept: image/png`."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import orjson
from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from app.images import encode_base64_pngs, encode_png_grid
from app.schemas import ImageFormat

# Results up to this many values (64 MNIST digits) are encoded on the event loop; larger ones in a thread.
INLINE_ENCODE_MAX_VALUES = 64 * 28 * 28


class ArrayJSONResponse(JSONResponse):
    """JSON written by orjson, which takes numpy arrays as they are: float32 values come out as their
    shortest exact float32 text ("0.33333334"), several times faster than `tolist()` and `json.dumps`.
    """

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def wants_png(accept: str) -> bool:
    """True when the client prefers image/png (or image/*) over JSON in its Accept header."""
    png_quality = json_quality = 0.0
    for entry in accept.split(","):
        media_type, _, parameters = entry.partition(";")
        media_type = media_type.strip().lower()
        quality = 1.0
        for parameter in parameters.split(";"):
            name, _, value = parameter.partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if media_type in ("image/png", "image/*"):
            png_quality = max(png_quality, quality)
        elif media_type in ("application/json", "application/*"):
            json_quality = max(json_quality, quality)
    return png_quality > 0 and png_quality > json_quality


async def image_response(
    request: Request,
    images: np.ndarray,
    image_format: ImageFormat,
    columns: int | None = None,
    **extra: Any,
) -> Response:
    """(N, C, H, W) float32 in [0, 1] -> a PNG grid (`columns` wide, else near-square; one image: itself),
    or JSON `images` as base64 PNGs or nested lists, with the `extra` fields that are not None.
    """
    if images.size <= INLINE_ENCODE_MAX_VALUES:
        return _image_response(request, images, image_format, columns, extra)
    return await asyncio.to_thread(_image_response, request, images, image_format, columns, extra)


def _image_response(
    request: Request,
    images: np.ndarray,
    image_format: ImageFormat,
    columns: int | None,
    extra: dict[str, Any],
) -> Response:
    if wants_png(request.headers.get("accept", "")):
        return Response(encode_png_grid(images, columns), media_type="image/png")
    encoded = encode_base64_pngs(images) if image_format == "png" else np.ascontiguousarray(images)
    body = {"format": image_format, "shape": list(images.shape[1:]), "images": encoded}
    body.update((key, value) for key, value in extra.items() if value is not None)
    return ArrayJSONResponse(body)
