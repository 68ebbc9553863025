"""Latent-space arithmetic the routes need: validation, seeded sampling and interpolation. Pure numpy."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Literal

import numpy as np

from app.errors import InvalidLatents, InvalidRequest, NonFiniteValues
from model.latent_space import LatentSpace, sample_standard

InterpolationMethod = Literal["linear", "slerp"]
Prior = Literal["standard", "gmm"]
# Below this |sin(angle)| two latent vectors count as (anti)parallel and slerp falls back to linear.
PARALLEL_SINE_TOLERANCE = 1e-6
SEED_LIMIT = 2**63


def pick_seed() -> int:
    """A fresh seed for callers who gave none; returned to them so the call can be repeated."""
    return secrets.randbelow(2**32)


def latents_array(rows: Sequence[Sequence[float]], latent_dim: int, what: str = "latents") -> np.ndarray:
    """Validate latent vectors and return them as (N, L) float32; raises InvalidLatents or NonFiniteValues."""
    for index, row in enumerate(rows):
        if len(row) != latent_dim:
            raise InvalidLatents(
                f"{what}[{index}] has {len(row)} values; this model's latent vectors have {latent_dim}"
            )
    with np.errstate(over="ignore"):  # values beyond float32 become inf and are rejected just below
        latents = np.asarray(rows, dtype=np.float32).reshape(len(rows), latent_dim)
    if not np.isfinite(latents).all():
        raise NonFiniteValues(
            f"{what} contain NaN, infinity or values beyond the float32 range; send finite numbers"
        )
    return latents


def label_index(space: LatentSpace, label: str, what: str) -> int:
    """The index of one of the model's labels; InvalidRequest listing them for any other (`what` names the
    parameter)."""
    index = space.label_index(label)
    if index is None:
        raise InvalidRequest(f"{what} {label!r} is not one of this model's labels: {', '.join(space.labels)}")
    return index


def available_priors(space: LatentSpace | None) -> list[str]:
    """The priors a model offers, its best (the default) first: the fitted mixture when it has one."""
    return ["gmm", "standard"] if space is not None and space.prior is not None else ["standard"]


def draw_latents(
    space: LatentSpace | None,
    latent_dim: int,
    count: int,
    seed: int,
    temperature: float,
    prior: Prior | None = None,
    label: str | None = None,
) -> tuple[np.ndarray, str]:
    """(count, L) float32 latents from the requested prior (default: the model's best) or label density,
    and the name of the prior used ("standard", "gmm" or "label").

    Every density is sampled with default_rng(seed); temperature scales its spread: N(0, T^2 I) for standard,
    and for a mixture the chosen component's covariance times T^2 around its mean.
    """
    rng = np.random.default_rng(seed)
    if label is not None:
        if prior is not None:
            raise InvalidRequest("give prior or label, not both: label samples that label's own density")
        if space is None or not space.labels:
            raise InvalidRequest("this model was trained without labels, so label cannot be used")
        index = label_index(space, label, "label")
        return space.class_densities[index].sample(rng, count, temperature).astype(np.float32), "label"
    offered = available_priors(space)
    chosen = prior or offered[0]
    if chosen not in offered:
        raise InvalidRequest(f"prior {chosen!r} is not offered by this model; it offers {', '.join(offered)}")
    if chosen == "gmm":
        assert space is not None and space.prior is not None
        return space.prior.sample(rng, count, temperature).astype(np.float32), "gmm"
    return sample_standard(rng, count, latent_dim, temperature).astype(np.float32), "standard"


def reparameterize(mean: np.ndarray, log_var: np.ndarray, seed: int) -> np.ndarray:
    """z = mean + std * eps with eps = default_rng(seed).standard_normal(mean.shape) cast to float32."""
    eps = np.random.default_rng(seed).standard_normal(mean.shape).astype(np.float32)
    return mean + np.exp(np.float32(0.5) * log_var) * eps


def interpolate(start: np.ndarray, end: np.ndarray, steps: int, method: InterpolationMethod) -> np.ndarray:
    """`steps` frames (steps, L) float32 from start to end, both included exactly.

    slerp moves the direction along the great circle at constant angular speed while the norm changes
    linearly from |start| to |end|, so every frame's norm lies between the endpoints' norms. It falls back to
    linear when the vectors are (anti)parallel or zero, where the great circle is undefined.
    """
    a = start.astype(np.float64)
    b = end.astype(np.float64)
    t = np.linspace(0.0, 1.0, steps)[:, np.newaxis]
    if method == "slerp":
        norm_a, norm_b = np.linalg.norm(a), np.linalg.norm(b)
        if norm_a > 0 and norm_b > 0:
            unit_a, unit_b = a / norm_a, b / norm_b
            angle = np.arccos(np.clip(np.dot(unit_a, unit_b), -1.0, 1.0))
            sine = np.sin(angle)
            if sine > PARALLEL_SINE_TOLERANCE:
                directions = (np.sin((1 - t) * angle) * unit_a + np.sin(t * angle) * unit_b) / sine
                # Unit length in exact arithmetic; renormalising removes the rounding near antiparallel.
                directions /= np.linalg.norm(directions, axis=1, keepdims=True)
                frames = ((1 - t) * norm_a + t * norm_b) * directions
                return _pin_endpoints(frames.astype(np.float32), start, end)
    return _pin_endpoints(((1 - t) * a + t * b).astype(np.float32), start, end)


def _pin_endpoints(frames: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    # The formulas give the endpoints up to rounding; callers rely on getting exactly what they sent.
    frames[0] = start
    frames[-1] = end
    return frames
