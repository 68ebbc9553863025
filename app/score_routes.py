"""POST /score: likelihood and anomaly scores of uploaded images. Parse -> model.scores -> format.

Each image is encoded once; its k posterior draws and its mean go through the decoder batcher with every
other request's items; the scores are model/scores.py's, the exporter's calibration uses the same code.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from app.auth import MODEL_TAG
from app.engine import Engine
from app.errors import InvalidRequest, LimitExceeded
from app.inputs import images_to_array, read_image_blobs
from app.latents import pick_seed
from app.metrics import Metrics
from app.registry import MODEL_SCOPE_KEY
from app.responses import INLINE_ENCODE_MAX_VALUES, ArrayJSONResponse
from app.routing import QueryRoute
from app.schemas import ScoreResponse
from app.serving import BODY_PROBLEMS, IMAGE_UPLOAD_BODY, SeedQuery, serving, versioned
from model.scores import (
    ANOMALY_SCORE,
    LATENT_SCORE,
    SCORE_NAMES,
    anomaly_p_values,
    atypicality,
    posterior_draws,
    score_images,
)

router = APIRouter(route_class=QueryRoute)


def _scores(
    engine: Engine,
    images: np.ndarray,
    mean: np.ndarray,
    log_var: np.ndarray,
    eps: np.ndarray,
    decoded: np.ndarray,
    logits: np.ndarray | None,
) -> dict[str, np.ndarray]:
    draws = eps.shape[0] * eps.shape[1]
    manifest = engine.manifest
    scores = score_images(
        images,
        mean,
        log_var,
        eps,
        (logits if logits is not None else decoded)[:draws],
        decoded[draws:],
        likelihood=manifest.likelihood,
        draw_logits_given=logits is not None,
        observation_std=manifest.observation_std,
    )
    space = engine.latent_space
    if space is not None and space.prior is not None:
        scores[LATENT_SCORE] = -space.prior.log_density(mean.astype(np.float64))
    return scores


def exactness_note(engine: Engine) -> str | None:
    """Why a model's scores are approximate, or None when they are exact."""
    manifest = engine.manifest
    if manifest.likelihood == "bernoulli" and manifest.tensors.decoder_logits is None:
        return (
            "this model's decoder has no logits output (manifest schema 1): reconstruction terms use its "
            "probabilities clipped to [1e-6, 1 - 1e-6], approximate where they round to 0 or 1"
        )
    return None


@router.post(
    "/score",
    tags=[MODEL_TAG],
    response_model=ScoreResponse,
    responses=BODY_PROBLEMS,
    openapi_extra=IMAGE_UPLOAD_BODY,
    summary="Likelihood and anomaly scores of images",
    description="Takes the same uploads as /encode. Per image, in nats: negative_elbo (reconstruction NLL "
    "averaged over k posterior draws, plus the exact KL to the prior) and its parts, iwae (the k-sample "
    "importance-weighted estimate of -log p(x), an upper bound in expectation, tighter as k grows), "
    "reconstruction_mse of the "
    "mean's reconstruction, latent_nll (-log p(mean) under the mixture fitted to the training codes), and "
    "where they fall among the model's test split: percentile and latent_percentile. The verdict tests "
    "negative_elbo two-sided (far too likely is atypical too), reconstruction_mse and latent_nll "
    "upper-tailed, and combines them by Fisher's method into atypicality; p_value is its conformal tail "
    "among the test images, (1 + #{at least as atypical}) / (n + 1), and anomalous means p_value < alpha. "
    "eps = numpy.random.default_rng(seed).standard_normal((k, N, latent_dim)); the same seed gives the same "
    "scores.",
)
async def score(
    request: Request,
    k: Annotated[int, Query(ge=1, description="Posterior samples per image.")] = 16,
    seed: SeedQuery = None,
    alpha: Annotated[
        float | None,
        Query(gt=0, lt=1, description="Anomalous when p_value < alpha (default VAE_ANOMALY_ALPHA)."),
    ] = None,
) -> Response:
    with serving(request) as (engine, settings):
        if k > settings.max_score_samples:
            raise LimitExceeded("k", k, settings.max_score_samples)
        if engine.manifest.likelihood == "gaussian" and engine.manifest.observation_std is None:
            raise InvalidRequest(
                "this gaussian model's manifest records no observation_std (it was exported before the "
                "exporter recorded it), so its likelihood cannot be computed; export it again with vae-export"
            )
        blobs = await read_image_blobs(request, settings)
        decodes = (k + 1) * len(blobs)
        if decodes > settings.score_decode_limit:
            raise LimitExceeded(
                f"(k + 1) x the number of images ({k + 1} x {len(blobs)})",
                decodes,
                settings.score_decode_limit,
            )
        images = await images_to_array(blobs, engine.manifest.image.shape, settings)
        mean, log_var = await engine.encode(images)
        seed = pick_seed() if seed is None else seed
        eps = np.random.default_rng(seed).standard_normal((k, len(images), engine.manifest.latent_dim))
        draws = posterior_draws(mean, log_var, eps).astype(np.float32).reshape(-1, mean.shape[1])
        decoded, logits = await engine.decode_with_logits(np.concatenate([draws, mean]))
        arguments = (engine, images, mean, log_var, eps, decoded, logits)
        if decoded.size <= INLINE_ENCODE_MAX_VALUES:
            scores = _scores(*arguments)
        else:  # large k x N: keep the float64 arithmetic off the event loop
            scores = await asyncio.to_thread(_scores, *arguments)
        alpha = settings.anomaly_alpha if alpha is None else alpha
        items = _items(engine, scores, alpha)
        _record(request.app.state.metrics, request.scope[MODEL_SCOPE_KEY], scores, items)
        body: dict[str, Any] = {"k": k, "seed": seed, "alpha": alpha, "score": ANOMALY_SCORE, "items": items}
        notes = [exactness_note(engine)]
        reference = engine.score_reference
        if reference is not None and k != reference.samples:
            notes.append(
                f"the test split's reference scores used k={reference.samples}; negative_elbo's spread "
                f"shrinks slightly as k grows, so percentiles at k={k} compare close but not like for like"
            )
        if reference is None:
            notes.append(
                "this model ships no score reference (score_reference.npz): percentile and anomalous are null"
            )
        if any(notes):
            body["note"] = "; ".join(note for note in notes if note)
        return versioned(ArrayJSONResponse(body), engine)


def _items(engine: Engine, scores: dict[str, np.ndarray], alpha: float) -> list[dict[str, Any]]:
    reference = engine.score_reference
    count = len(scores[ANOMALY_SCORE])
    judged: dict[str, list[Any]] = {
        key: [None] * count
        for key in ("percentile", "latent_percentile", "atypicality", "p_value", "anomalous")
    }
    if reference is not None:
        judged["percentile"] = reference.percentile(ANOMALY_SCORE, scores[ANOMALY_SCORE]).tolist()
        if LATENT_SCORE in scores and LATENT_SCORE in reference.names:
            judged["latent_percentile"] = reference.percentile(LATENT_SCORE, scores[LATENT_SCORE]).tolist()
        statistic = atypicality(reference, scores)
        p_values = anomaly_p_values(reference, statistic)
        judged["atypicality"] = statistic.tolist()
        judged["p_value"] = p_values.tolist()
        judged["anomalous"] = (p_values < alpha).tolist()
    latent = scores.get(LATENT_SCORE)
    return [
        {
            **{name: float(scores[name][index]) for name in SCORE_NAMES},
            LATENT_SCORE: None if latent is None else float(latent[index]),
            **{key: values[index] for key, values in judged.items()},
        }
        for index in range(count)
    ]


def _record(metrics: Metrics, model: str, scores: dict[str, np.ndarray], items: list[dict[str, Any]]) -> None:
    negative_elbo = metrics.score_negative_elbo.labels(model=model)
    for value in scores[ANOMALY_SCORE]:
        negative_elbo.observe(float(value))
    flagged = sum(1 for item in items if item["anomalous"])
    if flagged:
        metrics.anomalous_images.labels(model=model).inc(flagged)
