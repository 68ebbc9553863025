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


class LatentMapResponse(BaseModel):
    """GET /latent-map: the test split's codes in 2-D, and the projection."""

    points: list[list[float]] = Field(description="(T, 2): each test image's code on the map.")
    labels: list[int] = Field(description="(T,): index into label_names; -1 without labels.")
    label_names: list[str]
    mean: list[float] = Field(description="(latent_dim,): the codes' mean, the map's origin.")
    components: list[list[float]] = Field(description="(2, latent_dim): the map's axes, orthonormal.")


class ImageScores(BaseModel):
    negative_elbo: float = Field(description="Reconstruction NLL (mean over k draws) + KL, nats.")
    reconstruction_nll: float = Field(description="-log p(x|z), averaged over the k draws, nats.")
    kl: float = Field(description="KL(q(z|x) || N(0, I)), exact, nats.")
    iwae: float = Field(description="k-sample importance-weighted bound on -log p(x), nats.")
    reconstruction_mse: float = Field(description="MSE per pixel of the mean's reconstruction.")
    latent_nll: float | None = Field(
        description="-log p(mean) under the mixture fitted to the training codes (null: no mixture)."
    )
    percentile: float | None = Field(
        description="Share (0-100) of the test split's negative_elbo below this one (null: no reference)."
    )
    latent_percentile: float | None = Field(
        description="Share (0-100) of the test split's latent_nll below this one."
    )
    atypicality: float | None = Field(
        description="Fisher's statistic of the tests (negative_elbo two-sided, reconstruction_mse and "
        "latent_nll upper-tailed): larger is more atypical."
    )
    p_value: float | None = Field(description="The share of the test split at least as atypical.")
    anomalous: bool | None = Field(description="p_value below alpha.")


class ScoreResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "k": 16,
                    "seed": 7,
                    "alpha": 0.01,
                    "score": "negative_elbo",
                    "items": [
                        {
                            "negative_elbo": 98.1,
                            "reconstruction_nll": 73.9,
                            "kl": 24.2,
                            "iwae": 95.0,
                            "reconstruction_mse": 0.0071,
                            "latent_nll": 15.2,
                            "percentile": 48.2,
                            "latent_percentile": 40.3,
                            "atypicality": 4.1,
                            "p_value": 0.43,
                            "anomalous": False,
                        }
                    ],
                }
            ]
        }
    )

    k: int
    seed: int
    alpha: float
    score: str = Field(description="The score `percentile` refers to.")
    items: list[ImageScores] = Field(description="One entry per uploaded image, in upload order.")
    note: str | None = Field(default=None, description="Why scores are approximate or lack a reference.")


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
