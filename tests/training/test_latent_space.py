"""Fitting the latent-space description, and the image attributes it builds directions from.

A PCA encoder/decoder on real MNIST digits stands in for a trained VAE: its codes are structured (digits
cluster) and its decoder is linear, so every fitted piece has a checkable expected behaviour.
"""

from __future__ import annotations

import numpy as np
import pytest

from training.attributes import ink, slant, thickness, width
from training.data import DataSplits, Split, load_mnist
from training.latent_space import PRIOR_COMPONENTS, fit_latent_space, measure_edit_effect

LATENT_DIM = 8


@pytest.fixture(scope="module")
def splits() -> DataSplits:
    digits = load_mnist()
    assert digits.labels is not None
    picked = np.concatenate([np.flatnonzero(digits.labels == label)[:80] for label in range(10)])
    order = np.random.default_rng(0).permutation(picked)

    def split(index: np.ndarray) -> Split:
        assert digits.labels is not None
        return Split(digits.images[index], digits.labels[index])

    return DataSplits(
        "mnist-800", split(order[:560]), split(order[560:680]), split(order[680:]), 0, digits.label_names
    )


class Pca:
    """Encoder: the first LATENT_DIM principal components; decoder: back to pixels, clipped to [0, 1]."""

    def __init__(self, images: np.ndarray) -> None:
        flat = images.reshape(len(images), -1).astype(np.float64)
        self.centre = flat.mean(axis=0)
        self.basis = np.linalg.svd(flat - self.centre, full_matrices=False)[2][:LATENT_DIM]

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean = (images.reshape(len(images), -1) - self.centre) @ self.basis.T
        return mean.astype(np.float32), np.full_like(mean, -4.0, dtype=np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        pixels = np.clip(latents @ self.basis + self.centre, 0, 1)
        return pixels.reshape(len(latents), 1, 28, 28).astype(np.float32)


@pytest.fixture(scope="module")
def pca(splits: DataSplits) -> Pca:
    return Pca(splits.train.images)


@pytest.fixture(scope="module")
def fitted(splits: DataSplits, pca: Pca):  # type: ignore[no-untyped-def]
    return fit_latent_space(pca.encode, pca.decode, splits, seed=0)


def test_aggregate_statistics_and_diagnostics(fitted, splits: DataSplits, pca: Pca) -> None:  # type: ignore[no-untyped-def]
    train_means = pca.encode(splits.train.images)[0].astype(np.float64)
    np.testing.assert_allclose(fitted.aggregate_mean, train_means.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(fitted.aggregate_std, train_means.std(axis=0), rtol=1e-6)
    test_means = pca.encode(splits.test.images)[0].astype(np.float64)
    expected_kl = 0.5 * (test_means**2 + np.exp(-4.0) + 4.0 - 1).mean(axis=0)
    np.testing.assert_allclose(fitted.test_kl_per_dim, expected_kl, rtol=1e-5)
    # Every PCA component varies far more than the threshold; active dims come highest test KL first.
    assert fitted.active_dims == np.argsort(-expected_kl).tolist()


def test_the_prior_is_the_candidate_with_the_best_validation_likelihood(fitted) -> None:  # type: ignore[no-untyped-def]
    info = fitted.info["prior"]
    best = max(info["candidates"], key=lambda row: row["validation_log_likelihood"])
    assert (info["components"], info["covariance_type"]) == (best["components"], best["covariance_type"])
    assert fitted.prior.components == info["components"] and info["components"] in PRIOR_COMPONENTS
    assert len(info["candidates"]) == 2 * len(PRIOR_COMPONENTS)
    np.testing.assert_allclose(fitted.prior.weights.sum(), 1.0)


def test_class_densities_recognise_their_labels(fitted, splits: DataSplits, pca: Pca) -> None:  # type: ignore[no-untyped-def]
    assert fitted.labels == tuple(str(d) for d in range(10))
    assert len(fitted.class_densities) == 10 and fitted.class_centroids.shape == (10, LATENT_DIM)
    probabilities = fitted.classify(pca.encode(splits.test.images)[0].astype(np.float64))
    # Even an 8-component PCA separates most digits: far better than the 10% of chance.
    assert (probabilities.argmax(axis=1) == splits.test.labels).mean() > 0.6
    np.testing.assert_allclose(fitted.label_frequencies.sum(), 1.0)


def test_attribute_directions_move_their_attribute(fitted, splits: DataSplits, pca: Pca) -> None:  # type: ignore[no-untyped-def]
    assert fitted.attribute_names == ["ink", "thickness", "slant", "width"]
    ink_direction = fitted.attribute("ink")
    # Ink is linear in the pixels and the decoder linear up to its clipping to [0, 1], which absorbs part of
    # each edit: one unit moves ink by most of one std, never more, and always in the same direction.
    assert 0.6 < ink_direction.effect_per_unit <= 1.0 and ink_direction.monotonic_fraction > 0.95
    slope, monotonic = measure_edit_effect(
        pca.encode(splits.test.images)[0].astype(np.float64),
        ink_direction.direction,
        pca.decode,
        ink,
        ink_direction.std,
    )
    assert 0.6 < slope <= 1.0 and monotonic > 0.95


def test_projection_covers_the_test_split(fitted, splits: DataSplits) -> None:  # type: ignore[no-untyped-def]
    assert fitted.projection_points.shape == (len(splits.test), 2)
    np.testing.assert_array_equal(fitted.projection_labels, splits.test.labels)
    # PCA of PCA codes: the first axis carries the most variance.
    assert fitted.projection_points[:, 0].var() >= fitted.projection_points[:, 1].var()


def test_unlabelled_data_gets_no_labels_but_everything_else(splits: DataSplits, pca: Pca) -> None:
    unlabelled = DataSplits(
        "x",
        Split(splits.train.images, None),
        Split(splits.validation.images, None),
        Split(splits.test.images, None),
    )
    fitted = fit_latent_space(pca.encode, pca.decode, unlabelled, seed=0)
    assert fitted.labels == () and fitted.class_densities == () and fitted.prior is not None
    assert (fitted.projection_labels == -1).all() and len(fitted.attributes) == 4


def test_same_seed_same_fit(splits: DataSplits, pca: Pca, fitted) -> None:  # type: ignore[no-untyped-def]
    again = fit_latent_space(pca.encode, pca.decode, splits, seed=0)
    np.testing.assert_array_equal(again.prior.means, fitted.prior.means)
    np.testing.assert_array_equal(again.class_centroids, fitted.class_centroids)


# --- the attributes themselves


def stroke(x0: int, x1: int, y0: int, y1: int, size: int = 28) -> np.ndarray:
    image = np.zeros((1, 1, size, size))
    image[0, 0, y0:y1, x0:x1] = 1.0
    return image


def test_ink_and_thickness_of_bars() -> None:
    thin, thick = stroke(12, 14, 4, 24), stroke(10, 16, 4, 24)
    assert ink(thick)[0] == pytest.approx(3 * ink(thin)[0])
    # A w x l bar has ink w * l and total variation 2 * (w + l): thickness ~ w for long bars.
    assert thickness(thin)[0] == pytest.approx(2 * 40 / (2 * (2 + 20)))
    assert thickness(thick)[0] > 2 * thickness(thin)[0]


def test_slant_and_width() -> None:
    leaning_right = np.zeros((1, 1, 28, 28))
    for row in range(4, 24):
        leaning_right[0, 0, row, 14 + (14 - row) // 2] = 1.0  # x grows as y goes up
    assert slant(leaning_right)[0] == pytest.approx(0.5, abs=0.05)
    assert slant(leaning_right[:, :, :, ::-1])[0] == pytest.approx(-0.5, abs=0.05)
    assert slant(stroke(12, 14, 4, 24))[0] == pytest.approx(0.0, abs=1e-9)
    assert width(stroke(4, 24, 12, 14))[0] > 5 * width(stroke(12, 14, 4, 24))[0]
