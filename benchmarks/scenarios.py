"""The requests the suite sends: one fixed request per scenario, the same bytes for every server and tool."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

MULTIPART_BOUNDARY = "vae-benchmark-boundary-7f3a9c"
SCORE_SAMPLES = 16  # POST /score's default k


@dataclass(frozen=True)
class HttpRequest:
    """One HTTP request, fully serialised so wrk (via Lua) and httpx send the same bytes."""

    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True)
class Scenario:
    """A named request and how many images one successful response stands for (for images/s)."""

    name: str
    description: str
    request: HttpRequest
    images_per_request: int
    naive: bool = True  # whether the naive baseline implements it (it has no latent-space features)


def digit_png(height: int = 28, width: int = 28) -> bytes:
    """A deterministic grayscale PNG that looks vaguely like a handwritten zero (a soft ring)."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    radius = np.hypot((rows - height / 2) / (height * 0.32), (cols - width / 2) / (width * 0.22))
    pixels = np.clip(1.0 - np.abs(radius - 1.0) * 4.0, 0.0, 1.0)
    buffer = io.BytesIO()
    Image.fromarray((pixels * 255).astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def multipart_file_body(field_name: str, file_name: str, content_type: str, content: bytes) -> bytes:
    """A multipart/form-data body with one file field, delimited by MULTIPART_BOUNDARY."""
    head = (
        f"--{MULTIPART_BOUNDARY}\r\n"
        f'Content-Disposition: form-data; name="{field_name}"; filename="{file_name}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode()
    return head + content + f"\r\n--{MULTIPART_BOUNDARY}--\r\n".encode()


def _json_request(path: str, payload: object) -> HttpRequest:
    return HttpRequest(
        method="POST",
        path=path,
        headers={"Content-Type": "application/json", "Accept": "application/json"},
        body=json.dumps(payload).encode(),
    )


PROTOCOL_BATCH = 64  # images per Open Inference Protocol request (issue 16)


def protocol_requests(model_name: str, image_shape: tuple[int, int, int]) -> tuple[HttpRequest, HttpRequest]:
    """One encoder inference of PROTOCOL_BATCH digits over the Open Inference Protocol, binary and JSON, as
    tritonclient sends them: binary tensors both ways with no Content-Type; or all JSON."""
    image = np.asarray(Image.open(io.BytesIO(digit_png(*image_shape[1:]))), np.float32) / 255
    # The same gray digit in every channel and every row of the batch.
    images = np.broadcast_to(image, (PROTOCOL_BATCH, *image_shape)).astype(np.float32)
    path = f"/v2/models/{model_name}-encoder/infer"
    entry = {"name": "images", "shape": list(images.shape), "datatype": "FP32"}
    header = json.dumps(
        {
            "inputs": [{**entry, "parameters": {"binary_data_size": images.nbytes}}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    binary = HttpRequest(
        "POST", path, {"Inference-Header-Content-Length": str(len(header))}, header + images.tobytes()
    )
    plain = {"inputs": [{**entry, "data": images.ravel().round(4).tolist()}]}
    return binary, _json_request(path, plain)


def build_scenarios(
    latent_dim: int = 16,
    image_height: int = 28,
    image_width: int = 28,
    model_name: str = "mnist-vae",
    image_channels: int = 1,
) -> dict[str, Scenario]:
    """Every scenario (issue 5; sample-gmm and traverse from issue 12, score from issue 13, the Open
    Inference Protocol from issue 16), keyed by name, in the order the suite runs them."""
    rng = np.random.default_rng(0)
    png = digit_png(image_height, image_width)
    image_shape = (image_channels, image_height, image_width)
    protocol_binary, protocol_json = protocol_requests(model_name, image_shape)
    start, end = (rng.standard_normal(latent_dim).round(4).tolist() for _ in range(2))
    latents = rng.standard_normal((64, latent_dim)).round(4).tolist()
    scenarios = [
        Scenario(
            name="encode",
            description=f"POST /encode, one {image_height}x{image_width} PNG as multipart field 'file'",
            request=HttpRequest(
                method="POST",
                path="/encode",
                headers={
                    "Content-Type": f"multipart/form-data; boundary={MULTIPART_BOUNDARY}",
                    "Accept": "application/json",
                },
                body=multipart_file_body("file", "digit.png", "image/png", png),
            ),
            images_per_request=1,
        ),
        Scenario(
            name="sample-json",
            description="GET /sample?n=16&prior=standard, Accept: application/json",
            request=HttpRequest("GET", "/sample?n=16&prior=standard", {"Accept": "application/json"}),
            images_per_request=16,
        ),
        Scenario(
            name="sample-png",
            description="GET /sample?n=16&prior=standard, Accept: image/png (one grid image)",
            request=HttpRequest("GET", "/sample?n=16&prior=standard", {"Accept": "image/png"}),
            images_per_request=16,
        ),
        Scenario(
            name="sample-gmm",
            description="GET /sample?n=16&prior=gmm (the fitted mixture), Accept: application/json",
            request=HttpRequest("GET", "/sample?n=16&prior=gmm", {"Accept": "application/json"}),
            images_per_request=16,
            naive=False,
        ),
        Scenario(
            name="traverse",
            description=f"POST /traverse, a {latent_dim}-float latent, dims 0-7, 7 steps, Accept: image/png",
            request=HttpRequest(
                "POST",
                f"/traverse?dims={','.join(map(str, range(min(8, latent_dim))))}&steps=7",
                {"Content-Type": "application/json", "Accept": "image/png"},
                json.dumps({"latent": start}).encode(),
            ),
            images_per_request=7 * min(8, latent_dim),
            naive=False,
        ),
        Scenario(
            name="score",
            description=f"POST /score?k={SCORE_SAMPLES}, one {image_height}x{image_width} PNG, multipart",
            request=HttpRequest(
                method="POST",
                path=f"/score?k={SCORE_SAMPLES}&seed=0",
                headers={
                    "Content-Type": f"multipart/form-data; boundary={MULTIPART_BOUNDARY}",
                    "Accept": "application/json",
                },
                body=multipart_file_body("file", "digit.png", "image/png", png),
            ),
            images_per_request=1,
            naive=False,
        ),
        Scenario(
            name="interpolate",
            description=f"POST /interpolate, start and end of {latent_dim} floats, steps 8",
            request=_json_request("/interpolate", {"start": start, "end": end, "steps": 8}),
            images_per_request=8,
        ),
        Scenario(
            name="decode",
            description=f"POST /decode, 64 latents of {latent_dim} floats",
            request=_json_request("/decode", {"latents": latents}),
            images_per_request=64,
        ),
        Scenario(
            name="oip-binary",
            description=f"POST /v2/models/{model_name}-encoder/infer, {PROTOCOL_BATCH} images, binary",
            request=protocol_binary,
            images_per_request=PROTOCOL_BATCH,
            naive=False,
        ),
        Scenario(
            name="oip-json",
            description=f"POST /v2/models/{model_name}-encoder/infer, {PROTOCOL_BATCH} images, JSON",
            request=protocol_json,
            images_per_request=PROTOCOL_BATCH,
            naive=False,
        ),
    ]
    return {scenario.name: scenario for scenario in scenarios}
