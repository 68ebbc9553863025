"""Calibrating the anomaly verdict at export: the test split's score distribution and the AUROC of the
verdict's p-value against synthetic out-of-distribution sets.

The verdict (model/scores.py) tests negative_elbo two-sided and reconstruction_mse and latent_nll
upper-tailed against the test split, combined by Fisher's method into the atypicality, whose own test-split
distribution gives the p-value; the AUROC ranks the atypicality. The AUROC of negative_elbo's two-sided test
alone is reported beside it. The scores come from model/scores.py, the code
the service runs, on the exporter's own copy of the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw
from sklearn.metrics import roc_auc_score

from model.latent_space import GaussianMixture
from model.scores import (
    ANOMALY_SCORE,
    LATENT_SCORE,
    UPPER_TAILED_SCORES,
    ScoreReference,
    anomaly_p_values,
    atypicality,
    posterior_draws,
    score_images,
    sigmoid,
)
from training.latent_space import EncodeFunction

LogitsFunction = Callable[[np.ndarray], np.ndarray]  # latents (N, D) -> decoder logits (N, C, H, W)
# The service's default k for POST /score, so the reference matches what callers get by default.
REFERENCE_SAMPLES = 16
DEFAULT_ALPHA = 0.01
_IMAGES_PER_BATCH = 64


def score_split(
    encode: EncodeFunction,
    decode_logits: LogitsFunction,
    images: np.ndarray,
    *,
    likelihood: Literal["bernoulli", "gaussian"],
    observation_std: float | None,
    prior: GaussianMixture | None = None,
    samples: int = REFERENCE_SAMPLES,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Every score of every image (N, C, H, W), in batches; eps from default_rng(seed), batch after batch;
    latent_nll too when the model's mixture prior is given."""
    rng = np.random.default_rng(seed)
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, len(images), _IMAGES_PER_BATCH):
        batch = np.ascontiguousarray(images[start : start + _IMAGES_PER_BATCH], dtype=np.float32)
        mean, log_var = encode(batch)
        eps = rng.standard_normal((samples, len(batch), mean.shape[1]))
        draws = posterior_draws(mean, log_var, eps).astype(np.float32).reshape(-1, mean.shape[1])
        logits = decode_logits(np.concatenate([draws, mean]))
        mean_images = sigmoid(logits[len(draws) :])
        scores = score_images(
            batch,
            mean,
            log_var,
            eps,
            logits[: len(draws)],
            mean_images,
            likelihood=likelihood,
            draw_logits_given=True,
            observation_std=observation_std,
        )
        if prior is not None:
            scores[LATENT_SCORE] = -prior.log_density(mean.astype(np.float64))
        parts.append(scores)
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def _strokes(count: int, shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Images of 1 to 4 random straight strokes, 1 to 3 pixels wide: ink like a digit's, no digit's shape."""
    channels, height, width = shape
    pictures = []
    for _ in range(count):
        picture = Image.new("L", (width, height))
        draw = ImageDraw.Draw(picture)
        for _ in range(int(rng.integers(1, 5))):
            points = rng.uniform(0.15, 0.85, 4) * np.array([width, height, width, height])
            draw.line([float(p) for p in points], fill=255, width=int(rng.integers(1, 4)))
        pictures.append(np.asarray(picture, dtype=np.float32) / 255)
    stack = np.stack(pictures)[:, None]
    return np.repeat(stack, channels, axis=1)


def synthetic_sets(test_images: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Out-of-distribution images as many as the test split, (N, C, H, W) float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    count, shape = len(test_images), test_images.shape[1:]
    levels = rng.uniform(0.0, 1.0, (count, 1, 1, 1))
    return {
        "uniform_noise": rng.random((count, *shape), dtype=np.float32),
        "blank": np.zeros((count, *shape), np.float32),
        "constant": np.broadcast_to(levels, (count, *shape)).astype(np.float32),
        "inverted": (1.0 - test_images).astype(np.float32),
        "rotated_90": np.ascontiguousarray(np.rot90(test_images, k=1, axes=(2, 3))),
        "random_strokes": _strokes(count, shape, rng),
    }


def _auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    truth = np.concatenate([np.zeros(len(negatives)), np.ones(len(positives))])
    return float(roc_auc_score(truth, np.concatenate([negatives, positives])))


def anomaly_report(
    reference: ScoreReference,
    test_scores: dict[str, np.ndarray],
    synthetic_scores: dict[str, dict[str, np.ndarray]],
    validation_scores: dict[str, np.ndarray],
    alpha: float = DEFAULT_ALPHA,
) -> dict[str, Any]:
    """Per synthetic set: the AUROC of the verdict's statistic (test images negative, the set positive), the
    AUROC of negative_elbo's two-sided test alone, the share flagged at alpha and the mean negative_elbo;
    and the share of the validation split (never part of the calibration) flagged: the false-positive rate
    on fresh data like the training data."""
    elbo_only = ScoreReference(
        (ANOMALY_SCORE,), reference.values[[reference.names.index(ANOMALY_SCORE)]], reference.samples
    )

    sets = {}
    for name, scores in synthetic_scores.items():
        p_values = anomaly_p_values(reference, atypicality(reference, scores))
        sets[name] = {
            "auroc": _auroc(atypicality(reference, test_scores), atypicality(reference, scores)),
            "auroc_negative_elbo_only": _auroc(
                atypicality(elbo_only, test_scores), atypicality(elbo_only, scores)
            ),
            "flagged_share": float((p_values < alpha).mean()),
            f"mean_{ANOMALY_SCORE}": float(scores[ANOMALY_SCORE].mean()),
        }
    test_p = anomaly_p_values(reference, atypicality(reference, test_scores))
    tested = [name for name in (ANOMALY_SCORE, *UPPER_TAILED_SCORES) if name in reference.names]
    return {
        "scores": tested,
        "verdict": "p-value below alpha: negative_elbo two-sided, reconstruction_mse and latent_nll "
        "upper-tailed, against the test split, combined by Fisher's statistic and calibrated on its "
        "test-split distribution",
        "alpha": alpha,
        "reference_samples": reference.samples,
        "test_flagged_share": float((test_p < alpha).mean()),
        "validation_flagged_share": float(
            (anomaly_p_values(reference, atypicality(reference, validation_scores)) < alpha).mean()
        ),
        "synthetic_sets": sets,
    }
