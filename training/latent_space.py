"""Fit a model's latent-space description (model/latent_space.py) from its encoder, decoder and data splits.

The encoder and decoder are plain numpy callables, so this works for any exported model (onnxruntime
sessions or a torch module behind a wrapper). Choices are made on the validation split, never the test split:
- the ex-post prior: scikit-learn Gaussian mixtures with full or diagonal covariances and a range of component
  counts, fitted to the training split's posterior means; the one with the highest mean log-likelihood of the
  validation split's means is kept (Ghosh et al. 2020 sample from such a density; so does Pythae's
  GaussianMixtureSampler);
- class-conditional densities (labelled data): per label, a full-covariance mixture of 1 to 6 components,
  the count shared by all labels and chosen the same way; each label's centroid is the mean of its most
  typical training codes (CENTROID_KEEP_FRACTION);
- attribute directions by least squares: the standardized attribute is regressed on the centred posterior
  means, w = argmin |Z w - a|; the direction w / |w|^2 moves the regression's prediction by exactly one
  standard deviation per unit. Its real effect is measured by editing and decoding validation images.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SklearnMixture

from model.latent_space import Attribute, GaussianMixture, LatentSpace, edit
from training.attributes import attributes_for
from training.data import DataSplits

logger = logging.getLogger(__name__)

EncodeFunction = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # images -> mean, log_var
DecodeFunction = Callable[[np.ndarray], np.ndarray]  # latents (N, D) -> images (N, C, H, W) in [0, 1]

PRIOR_COMPONENTS = (1, 2, 4, 8, 16, 24, 32, 48, 64)
PRIOR_COVARIANCE_TYPES = ("full", "diag")
CLASS_COMPONENTS = (1, 2, 3, 4, 6)
# A label's centroid is the mean of this share of its training codes, those most probable under the label's
# own mixture: robust to atypical and mislabelled digits. On the shipped model's validation split, label
# edits at amount 1 reached the target class for 84.8% of edits with 0.5, against 81.6% with the plain mean
# (1.0), 84.3% with 0.75 and 82.6% with 0.25 (judged by training/sample_quality.py's classifier).
CENTROID_KEEP_FRACTION = 0.5
# Added to every covariance's diagonal: keeps components fitted to a few points positive definite.
COVARIANCE_REGULARIZATION = 1e-4
EDIT_CHECK_AMOUNTS = (-2.0, -1.0, 0.0, 1.0, 2.0)
_BATCH_SIZE = 256


@dataclass(frozen=True)
class EncodedSplit:
    """Posterior means and log-variances (N, D) float64 of one split, and its labels (N,) or None."""

    mean: np.ndarray
    log_var: np.ndarray
    labels: np.ndarray | None


def encode_split(encode: EncodeFunction, images: np.ndarray, labels: np.ndarray | None) -> EncodedSplit:
    means, log_vars = [], []
    for start in range(0, len(images), _BATCH_SIZE):
        mean, log_var = encode(np.ascontiguousarray(images[start : start + _BATCH_SIZE], dtype=np.float32))
        means.append(mean)
        log_vars.append(log_var)
    return EncodedSplit(
        np.concatenate(means).astype(np.float64), np.concatenate(log_vars).astype(np.float64), labels
    )


def decode_all(decode: DecodeFunction, latents: np.ndarray) -> np.ndarray:
    """Decode (N, D) latents in batches; (N, C, H, W) float32."""
    return np.concatenate(
        [
            decode(np.ascontiguousarray(latents[start : start + _BATCH_SIZE], dtype=np.float32))
            for start in range(0, len(latents), _BATCH_SIZE)
        ]
    )


def _fit_mixture(codes: np.ndarray, components: int, covariance_type: str, seed: int) -> SklearnMixture:
    mixture = SklearnMixture(
        n_components=components,
        covariance_type=covariance_type,
        reg_covar=COVARIANCE_REGULARIZATION,
        max_iter=500,
        n_init=2,
        random_state=seed,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mixture.fit(codes)
    return mixture


def _as_full(mixture: SklearnMixture) -> GaussianMixture:
    """scikit-learn's mixture as the service's: covariances always (K, D, D)."""
    covariances = mixture.covariances_
    if mixture.covariance_type == "diag":
        covariances = np.stack([np.diag(row) for row in covariances])
    return GaussianMixture(
        weights=mixture.weights_ / mixture.weights_.sum(),
        means=mixture.means_.astype(np.float64),
        covariances=covariances.astype(np.float64),
    )


def fit_prior(train: np.ndarray, validation: np.ndarray, seed: int) -> tuple[GaussianMixture, dict[str, Any]]:
    """The mixture over posterior means with the best validation log-likelihood; and the selection table."""
    candidates = [
        (components, covariance_type)
        for covariance_type in PRIOR_COVARIANCE_TYPES
        for components in PRIOR_COMPONENTS
        if components < len(train)
    ]
    table = []
    best: tuple[float, SklearnMixture] | None = None
    for components, covariance_type in candidates:
        mixture = _fit_mixture(train, components, covariance_type, seed)
        score = float(mixture.score(validation))
        table.append(
            {"components": components, "covariance_type": covariance_type, "validation_log_likelihood": score}
        )
        if best is None or score > best[0]:
            best = (score, mixture)
    assert best is not None
    chosen = best[1]
    info = {
        "kind": "gaussian_mixture",
        "fitted_to": "posterior means of the training split",
        "chosen_by": "highest mean log-likelihood of the validation split's posterior means",
        "components": chosen.n_components,
        "covariance_type": chosen.covariance_type,
        "validation_log_likelihood": best[0],
        "candidates": table,
    }
    return _as_full(chosen), info


def fit_class_densities(
    train: EncodedSplit, validation: EncodedSplit, label_count: int, seed: int
) -> tuple[tuple[GaussianMixture, ...], dict[str, Any]]:
    """One full-covariance mixture per label; the component count shared by all, chosen on validation."""
    assert train.labels is not None and validation.labels is not None
    smallest = min(int((train.labels == label).sum()) for label in range(label_count))
    table, best = [], None
    for components in (c for c in CLASS_COMPONENTS if c < smallest):
        mixtures = [
            _fit_mixture(train.mean[train.labels == label], components, "full", seed)
            for label in range(label_count)
        ]
        held_out = [validation.mean[validation.labels == label] for label in range(label_count)]
        log_likelihood = sum(
            float(mixture.score_samples(codes).sum())
            for mixture, codes in zip(mixtures, held_out, strict=True)
            if len(codes)  # a small validation split may lack a label
        ) / max(1, len(validation.labels))
        table.append({"components": components, "validation_log_likelihood": log_likelihood})
        if best is None or log_likelihood > best[0]:
            best = (log_likelihood, mixtures)
    if best is None:
        raise ValueError(f"every label needs at least 2 training images; the rarest has {smallest}")
    info = {
        "kind": "gaussian_mixture per label",
        "covariance_type": "full",
        "components": best[1][0].n_components,
        "chosen_by": "highest mean log-likelihood of the validation split's means under their label's "
        "density",
        "candidates": table,
    }
    return tuple(_as_full(mixture) for mixture in best[1]), info


def typical_mean(codes: np.ndarray, density: GaussianMixture) -> np.ndarray:
    """The mean of the CENTROID_KEEP_FRACTION of codes (N, D) with the highest density; (D,)."""
    log_density = density.log_density(codes)
    keep = max(1, round(len(codes) * CENTROID_KEEP_FRACTION))
    return codes[np.argsort(-log_density, kind="stable")[:keep]].mean(axis=0)


def fit_attributes(
    images: dict[str, np.ndarray], encoded: dict[str, EncodedSplit], decode: DecodeFunction
) -> tuple[Attribute, ...]:
    """Regression directions for every attribute of the images' channel count; effects on validation."""
    channels = images["train"].shape[1]
    centre = encoded["train"].mean.mean(axis=0)
    attributes = []
    for name, (measure, description) in attributes_for(channels).items():
        values = measure(images["train"])
        mean, std = float(values.mean()), float(values.std())
        if not std > 0:
            logger.warning("attribute %s is constant on the training split; no direction for it", name)
            continue
        weights, *_ = np.linalg.lstsq(encoded["train"].mean - centre, (values - mean) / std, rcond=None)
        norm_squared = float(weights @ weights)
        if not norm_squared > 0:
            continue
        direction = weights / norm_squared
        effect, monotonic = measure_edit_effect(encoded["validation"].mean, direction, decode, measure, std)
        attributes.append(
            Attribute(
                name=name,
                description=description,
                direction=direction,
                mean=mean,
                std=std,
                effect_per_unit=effect,
                monotonic_fraction=monotonic,
            )
        )
    return tuple(attributes)


def measure_edit_effect(
    latents: np.ndarray,
    direction: np.ndarray,
    decode: DecodeFunction,
    measure: Callable[[np.ndarray], np.ndarray],
    std: float,
    amounts: tuple[float, ...] = EDIT_CHECK_AMOUNTS,
) -> tuple[float, float]:
    """Edit each latent (N, D) by `amounts` along direction, decode and measure: the mean slope in standard
    deviations per unit (least squares over the amounts), and the share whose measure rises monotonically.
    """
    frames = np.concatenate([edit(latent, direction, amounts) for latent in latents])
    measured = measure(decode_all(decode, frames)).reshape(len(latents), len(amounts)) / std
    centred_amounts = np.asarray(amounts) - np.mean(amounts)
    slopes = (
        (measured - measured.mean(axis=1, keepdims=True))
        @ centred_amounts
        / (centred_amounts @ centred_amounts)
    )
    monotonic = (np.diff(measured, axis=1) > 0).all(axis=1)
    return float(slopes.mean()), float(monotonic.mean())


def _projection(test: EncodedSplit) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """PCA of the test split's posterior means: mean (D,), components (2, D), points (T, 2), labels (T,)."""
    centre = test.mean.mean(axis=0)
    _, _, right_vectors = np.linalg.svd(test.mean - centre, full_matrices=False)
    components = right_vectors[:2]
    if len(components) < 2:  # a one-dimensional latent space projects onto its axis and zero
        components = np.vstack([components, np.zeros_like(components)])[:2]
    points = ((test.mean - centre) @ components.T).astype(np.float32)
    labels = test.labels if test.labels is not None else np.full(len(test.mean), -1)
    return centre, components, points, labels.astype(np.int64)


def fit_latent_space(
    encode: EncodeFunction,
    decode: DecodeFunction,
    splits: DataSplits,
    *,
    seed: int = 0,
) -> LatentSpace:
    """Encode every split and fit the whole description (see the module docstring)."""
    encoded = {
        name: encode_split(encode, split.images, split.labels)
        for name, split in (("train", splits.train), ("validation", splits.validation), ("test", splits.test))
    }
    train, validation, test = encoded["train"], encoded["validation"], encoded["test"]
    test_kl = 0.5 * (np.square(test.mean) + np.exp(test.log_var) - test.log_var - 1)
    prior, prior_info = fit_prior(train.mean, validation.mean, seed)
    info: dict[str, Any] = {"prior": prior_info}
    labels: tuple[str, ...] = ()
    frequencies, centroids = np.zeros(0), np.zeros((0, train.mean.shape[1]))
    class_densities: tuple[GaussianMixture, ...] = ()
    if splits.label_names and train.labels is not None and validation.labels is not None:
        try:
            class_densities, info["class_densities"] = fit_class_densities(
                train, validation, len(splits.label_names), seed
            )
        except ValueError as error:
            logger.warning("no class-conditional densities: %s", error)
            info["class_densities"] = {"skipped": str(error)}
    if class_densities:
        assert train.labels is not None
        info["class_centroids"] = {
            "method": f"mean of the {CENTROID_KEEP_FRACTION:.0%} of each label's training codes most "
            "probable under the label's own mixture"
        }
        labels = splits.label_names
        counts = np.bincount(train.labels, minlength=len(labels)).astype(np.float64)
        frequencies = counts / counts.sum()
        centroids = np.stack(
            [
                typical_mean(train.mean[train.labels == index], density)
                for index, density in enumerate(class_densities)
            ]
        )
    attributes = fit_attributes(
        {"train": splits.train.images, "validation": splits.validation.images}, encoded, decode
    )
    info["attributes"] = {
        "method": "least-squares regression of the standardized attribute on the centred posterior "
        "means; direction w / |w|^2 (one unit = one standard deviation of the attribute, as the regression "
        "predicts)",
        "effect_measured_on": "validation split, edits of -2..2 units decoded and measured",
    }
    projection_mean, projection_components, points, point_labels = _projection(test)
    return LatentSpace(
        aggregate_mean=train.mean.mean(axis=0),
        aggregate_std=train.mean.std(axis=0),
        test_kl_per_dim=test_kl.mean(axis=0),
        test_mean_variance=test.mean.var(axis=0),
        prior=prior,
        labels=labels,
        label_frequencies=frequencies,
        class_densities=class_densities,
        class_centroids=centroids,
        attributes=attributes,
        projection_mean=projection_mean,
        projection_components=projection_components,
        projection_points=points,
        projection_labels=point_labels,
        info=info,
    )
