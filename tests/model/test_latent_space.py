"""model/latent_space.py: the mixture's sampler against its own density, traversals, edits, the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from model.latent_space import (
    Attribute,
    GaussianMixture,
    LatentSpace,
    LatentSpaceError,
    edit,
    load_latent_space,
    logsumexp,
    sample_standard,
    save_latent_space,
    traversal,
)

DIM = 3


def mixture(seed: int = 0, components: int = 2) -> GaussianMixture:
    rng = np.random.default_rng(seed)
    factors = rng.normal(size=(components, DIM, DIM))
    covariances = factors @ factors.transpose(0, 2, 1) + 0.1 * np.eye(DIM)
    weights = rng.random(components) + 0.2
    return GaussianMixture(weights / weights.sum(), rng.normal(scale=3, size=(components, DIM)), covariances)


def space(with_labels: bool = True) -> LatentSpace:
    density = mixture()
    return LatentSpace(
        aggregate_mean=np.zeros(DIM),
        aggregate_std=np.array([1.0, 2.0, 0.5]),
        test_kl_per_dim=np.array([0.5, 3.0, 0.001]),
        test_mean_variance=np.array([0.5, 2.0, 0.001]),
        prior=density,
        labels=("cat", "dog") if with_labels else (),
        label_frequencies=np.array([0.25, 0.75]) if with_labels else np.zeros(0),
        class_densities=(mixture(1, 1), mixture(2, 2)) if with_labels else (),
        class_centroids=np.array([[1.0, 0, 0], [0, 1.0, 0]]) if with_labels else np.zeros((0, DIM)),
        attributes=(Attribute("ink", "how much ink", np.array([0.1, 0.2, 0.3]), 0.2, 0.05, 0.9, 0.99),),
        projection_mean=np.zeros(DIM),
        projection_components=np.eye(DIM)[:2],
        projection_points=np.ones((4, 2), np.float32),
        projection_labels=np.array([0, 1, 1, -1]),
        info={"prior": {"components": 2}},
    )


def test_log_density_matches_scipy() -> None:
    density = mixture()
    points = np.random.default_rng(3).normal(size=(20, DIM)) * 3
    expected = np.log(
        sum(
            weight * multivariate_normal(mean, covariance).pdf(points)
            for weight, mean, covariance in zip(
                density.weights, density.means, density.covariances, strict=True
            )
        )
    )
    np.testing.assert_allclose(density.log_density(points), expected, rtol=1e-10)


def test_sampler_draws_from_its_own_density() -> None:
    density = mixture()
    samples = density.sample(np.random.default_rng(0), 200_000, 1.0)
    mean = density.weights @ density.means
    second = sum(
        w * (c + np.outer(m, m))
        for w, m, c in zip(density.weights, density.means, density.covariances, strict=True)
    )
    np.testing.assert_allclose(samples.mean(axis=0), mean, atol=0.03)
    np.testing.assert_allclose(np.cov(samples, rowvar=False), second - np.outer(mean, mean), atol=0.1)
    # Samples are most likely where the density is high: their mean log-density beats shifted points'.
    assert density.log_density(samples[:1000]).mean() > density.log_density(samples[:1000] + 3).mean()


def test_temperature_scales_the_spread_around_the_chosen_component() -> None:
    density = mixture()
    at_zero = density.sample(np.random.default_rng(4), 50, 0.0)
    chosen = np.random.default_rng(4).choice(2, size=50, p=density.weights)
    np.testing.assert_array_equal(at_zero, density.means[chosen])
    unit, half = (density.sample(np.random.default_rng(4), 50, t) for t in (1.0, 0.5))
    np.testing.assert_allclose(half - at_zero, 0.5 * (unit - at_zero), atol=1e-12)


def test_standard_prior_is_the_documented_formula() -> None:
    expected = np.random.default_rng(7).standard_normal((5, DIM)) * 0.8
    np.testing.assert_array_equal(sample_standard(np.random.default_rng(7), 5, DIM, 0.8), expected)


def test_logsumexp_is_stable_for_thousands_of_nats() -> None:
    values = np.array([[-5000.0, -5000.0], [1000.0, 1000.0], [-np.inf, 0.0]])
    np.testing.assert_allclose(logsumexp(values, axis=1), [-5000 + np.log(2), 1000 + np.log(2), 0.0])


def test_classify_gives_probabilities_favouring_the_nearest_density() -> None:
    latent_space = space()
    far_in_dog = latent_space.class_densities[1].means[:1]
    probabilities = latent_space.classify(np.vstack([far_in_dog, latent_space.class_densities[0].means]))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    assert probabilities[0].argmax() == 1 and probabilities[1].argmax() == 0


def test_active_dims_are_sorted_by_kl() -> None:
    assert space().active_dims == [1, 0]


def test_traversal_moves_one_dimension_per_row_around_the_latent() -> None:
    latent = np.array([0.5, -1.0, 2.0])
    frames = traversal(latent, [2, 0], 3.0, 4, np.array([1.0, 2.0, 0.5]))
    assert frames.shape == (8, DIM)
    np.testing.assert_allclose(frames[:4, 2], 2.0 + np.array([-1.5, -0.5, 0.5, 1.5]))
    np.testing.assert_allclose(frames[4:, 0], 0.5 + np.array([-3.0, -1.0, 1.0, 3.0]))
    np.testing.assert_array_equal(frames[:4, :2], np.tile(latent[:2], (4, 1)))
    np.testing.assert_array_equal(frames[4:, 1:], np.tile(latent[1:], (4, 1)))


def test_edit_at_zero_is_the_latent_itself() -> None:
    latent, direction = np.array([1.0, 2.0, 3.0]), np.array([0.5, 0.0, -1.0])
    frames = edit(latent, direction, [0.0, 1.0, -2.0])
    np.testing.assert_array_equal(frames, [[1.0, 2.0, 3.0], [1.5, 2.0, 2.0], [0.0, 2.0, 5.0]])


@pytest.mark.parametrize("with_labels", [True, False])
def test_file_round_trip(tmp_path: Path, with_labels: bool) -> None:
    original = space(with_labels)
    save_latent_space(tmp_path / "space.npz", original)
    loaded = load_latent_space(tmp_path / "space.npz", DIM)
    assert loaded.labels == original.labels and loaded.info == original.info
    assert loaded.attributes[0].name == "ink" and loaded.attributes[0].effect_per_unit == 0.9
    assert loaded.prior is not None and original.prior is not None
    np.testing.assert_array_equal(loaded.prior.covariances, original.prior.covariances)
    np.testing.assert_array_equal(loaded.projection_labels, original.projection_labels)
    assert len(loaded.class_densities) == len(original.class_densities)
    with np.load(tmp_path / "space.npz", allow_pickle=False) as archive:  # plain arrays: no pickles inside
        assert all(archive[name].dtype != object for name in archive.files)


def test_a_file_for_another_latent_size_is_refused(tmp_path: Path) -> None:
    save_latent_space(tmp_path / "space.npz", space())
    with pytest.raises(LatentSpaceError, match="does not fit a model with 4 latents: aggregate_mean"):
        load_latent_space(tmp_path / "space.npz", 4)


def test_unreadable_or_incomplete_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(LatentSpaceError, match=r"cannot read junk\.npz"):
        load_latent_space(tmp_path / "junk.npz", DIM)
    np.savez(tmp_path / "partial.npz", aggregate_mean=np.zeros(DIM))
    with pytest.raises(LatentSpaceError, match="lacks the array"):
        load_latent_space(tmp_path / "partial.npz", DIM)


@pytest.mark.parametrize(
    ("weights", "means", "message"),
    [
        (np.array([0.5, 0.6]), np.zeros((2, 2)), "sum to 1"),
        (np.array([1.5, -0.5]), np.zeros((2, 2)), ">= 0"),
        (np.array([np.nan, 1.0]), np.zeros((2, 2)), "NaN or infinite"),
        (np.ones(0), np.zeros((0, 2)), "K >= 1"),
        (np.ones(1), np.zeros(2), "K >= 1"),
    ],
)
def test_a_malformed_mixture_is_refused(weights: np.ndarray, means: np.ndarray, message: str) -> None:
    covariances = np.broadcast_to(np.eye(2), (len(weights), 2, 2)).copy()
    with pytest.raises(LatentSpaceError, match=message):
        GaussianMixture(weights, means, covariances)


def test_a_file_whose_arrays_clash_is_refused_not_crashed_on(tmp_path: Path) -> None:
    save_latent_space(tmp_path / "space.npz", space())
    with np.load(tmp_path / "space.npz") as archive:
        arrays = {name: archive[name] for name in archive.files}
    arrays["attribute_mean"] = np.zeros(0)  # fewer values than attributes
    np.savez(tmp_path / "clash.npz", **arrays)
    with pytest.raises(LatentSpaceError, match="do not fit together"):
        load_latent_space(tmp_path / "clash.npz", DIM)
    (tmp_path / "truncated.npz").write_bytes((tmp_path / "space.npz").read_bytes()[:500])
    with pytest.raises(LatentSpaceError):
        load_latent_space(tmp_path / "truncated.npz", DIM)


def test_a_covariance_that_is_not_positive_definite_is_refused() -> None:
    with pytest.raises(LatentSpaceError, match="not positive definite"):
        GaussianMixture(np.ones(1), np.zeros((1, 2)), np.array([[[1.0, 2.0], [2.0, 1.0]]]))
