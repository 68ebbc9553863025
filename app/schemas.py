"""Request and response bodies as the OpenAPI docs show them (the routes build responses directly)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.latents import InterpolationMethod

ImageFormat = Literal["png", "array"]

# Real 28x28 PNGs in base64 for the docs' examples: a "1" and a "7".
_PNG_ONE_EXAMPLE = (
    "iVBORw0KGgoAAAANSUhEUgAAABwAAAAcCAAAAABXZoBIAAAAHElEQVR42mNgGGSAEZnzH02ACZ/OUcnhJTnoAADJzQEk0SCz"
    "1QAAAABJRU5ErkJggg=="
)
_PNG_SEVEN_EXAMPLE = (
    "iVBORw0KGgoAAAANSUhEUgAAABwAAAAcCAAAAABXZoBIAAAAO0lEQVR42mNgGGSAEUr/xybKhE8n+ZKMGCL/ybUTSSNpOpE1"
    "kqQTRSMpOlE1kqATTSPxOtE14tc56AAAsxYIIyduv6UAAAAASUVORK5CYII="
)
_LATENT_EXAMPLE: list[Any] = [
    0.12,
    -1.3,
    0.5,
    0.0,
    0.8,
    -0.2,
    1.1,
    -0.7,
    0.3,
    0.9,
    -0.4,
    0.05,
    -1.0,
    0.6,
    0.2,
    -0.3,
]


class DecodeRequest(BaseModel):
    """Latent vectors to decode, each exactly latent_dim long."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"latents": [_LATENT_EXAMPLE]}]})

    latents: list[list[float]] = Field(min_length=1, description="Latent vectors, shape (N, latent_dim).")


class LatentRequest(BaseModel):
    """One latent vector to traverse or edit (exactly latent_dim long)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"latent": _LATENT_EXAMPLE}]})

    latent: list[float] = Field(description="A latent vector, shape (latent_dim,).")


class InterpolateOptions(BaseModel):
    steps: int = Field(default=8, ge=2, description="Number of frames, both endpoints included.")
    method: InterpolationMethod = Field(
        default="linear",
        description="'linear', or 'slerp' (spherical; falls back to linear for (anti)parallel vectors).",
    )


class InterpolateRequest(InterpolateOptions):
    """Two endpoints, each a latent vector or a base64 (optionally data: URL) image, and the frame count."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "start": _LATENT_EXAMPLE,
                    "end": [-x for x in _LATENT_EXAMPLE],
                    "steps": 8,
                    "method": "slerp",
                },
                {
                    "start": _PNG_ONE_EXAMPLE,
                    "end": _PNG_SEVEN_EXAMPLE,
                    "steps": 5,
                    "method": "linear",
                },
            ]
        }
    )

    start: list[float] | str = Field(
        description="A latent vector, or an image as base64 (encoded to its mean)."
    )
    end: list[float] | str = Field(
        description="A latent vector, or an image as base64 (encoded to its mean)."
    )


class EncodedImage(BaseModel):
    mean: list[float]
    log_var: list[float]
    std: list[float] = Field(description="exp(0.5 * log_var).")
    z: list[float] | None = Field(default=None, description="mean + std * eps; only with sample=true.")


class EncodeResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "latent_dim": 2,
                    "seed": 42,
                    "items": [
                        {"mean": [0.1, -0.2], "log_var": [-2.0, -1.5], "std": [0.37, 0.47], "z": [0.3, -0.1]}
                    ],
                }
            ]
        }
    )

    latent_dim: int
    seed: int | None = Field(
        description="Seed of eps when sample=true (the given one or a fresh one), else null."
    )
    items: list[EncodedImage] = Field(description="One entry per uploaded image, in upload order.")


class ImagesResponse(BaseModel):
    """Images as base64 PNGs (format=png) or (C, H, W) nested lists of floats in [0, 1] (format=array)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"format": "png", "shape": [1, 28, 28], "images": ["iVBORw0KGgoAAAANSUhEUgAA..."]}]
        }
    )

    format: ImageFormat
    shape: list[int] = Field(description="(C, H, W) of every image.")
    images: list[str] | list[list[list[list[float]]]]
    seed: int | None = Field(
        default=None, description="Seed used (sample, and reconstruct with sample=true)."
    )
    temperature: float | None = Field(default=None, description="Sampling temperature (sample only).")
    latents: list[list[float]] | None = Field(
        default=None, description="The decoded latent vectors (interpolate only)."
    )
    method: InterpolationMethod | None = Field(
        default=None, description="Interpolation method (interpolate only)."
    )
    prior: str | None = Field(
        default=None,
        description="The prior the latents were drawn from (sample only): standard, gmm, or label.",
    )
    label: str | None = Field(default=None, description="The label whose density was sampled (sample only).")


class FramesResponse(ImagesResponse):
    """The frames of a traversal or an edit, with the latent vector of each frame."""

    latents: list[list[float]] | None = Field(default=None, description="Each frame's latent vector.")
    dims: list[int] | None = Field(
        default=None, description="The dimension each row moves (traverse; `steps` frames per row)."
    )
    span: float | None = Field(default=None, description="Half-width in aggregate-posterior stds (traverse).")
    steps: int | None = Field(default=None, description="Frames per row (traverse).")
    amounts: list[float] | None = Field(default=None, description="The amount of each frame (edit).")
    attribute: str | None = Field(default=None, description="The attribute edited (edit).")
    to_label: str | None = Field(default=None, description="The target label (edit).")
    from_label: str | None = Field(default=None, description="The input's label (edit).")
    from_label_inferred: bool | None = Field(
        default=None, description="True when from_label was inferred from the class-conditional densities."
    )
    from_label_probability: float | None = Field(
        default=None, description="The inferred from_label's probability under those densities."
    )


class Problem(BaseModel):
    """Every error: RFC 9457 problem JSON, media type application/problem+json."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "urn:vae-service:problem:invalid-latents",
                    "title": "Invalid latent vectors",
                    "status": 422,
                    "detail": "latents[0] has 3 values; this model's latent vectors have 16",
                }
            ]
        }
    )

    type: str
    title: str
    status: int
    detail: str
