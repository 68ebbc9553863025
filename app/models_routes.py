"""The models the server holds: GET /models, and GET /model and /models/{model_name} (one model's manifest,
provider, batching, limits, latent space and score reference)."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from starlette.responses import Response

from app.auth import MODEL_TAG
from app.latents import available_priors
from app.serving import MODELS_PREFIX, model_registry, problems, serving, versioned
from model.latent_space import LatentSpace
from model.scores import ScoreReference

router = APIRouter()


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
