"""The exporter's anomaly calibration: synthetic sets, batched scoring, the AUROC report."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.latent_space import GaussianMixture
from model.scores import calibrated_reference
from model.vae import VAE, VaeConfig
from training.anomaly import anomaly_report, score_split, synthetic_sets
from training.cli import numpy_functions, numpy_logits


@pytest.fixture(scope="module")
def tiny_vae() -> VAE:
    torch.manual_seed(0)
    return VAE(VaeConfig(image_shape=(1, 28, 28), latent_dim=4, widths=(4, 8), hidden_dim=16)).eval()


def test_synthetic_sets_are_what_they_say() -> None:
    test = np.random.default_rng(0).random((7, 1, 28, 28)).astype(np.float32)
    sets = synthetic_sets(test, seed=0)
    assert set(sets) == {"uniform_noise", "blank", "constant", "inverted", "rotated_90", "random_strokes"}
    for images in sets.values():
        assert images.shape == test.shape and images.dtype == np.float32
        assert images.min() >= 0 and images.max() <= 1
    assert not sets["blank"].any()
    np.testing.assert_array_equal(sets["inverted"], 1 - test)
    np.testing.assert_array_equal(sets["rotated_90"], np.rot90(test, axes=(2, 3)))
    assert all(np.unique(image).size == 1 for image in sets["constant"])
    strokes = sets["random_strokes"]
    assert (strokes.reshape(7, -1).max(axis=1) == 1).all() and strokes.mean() < 0.3  # ink, mostly black


def test_score_split_batches_deterministically_and_adds_the_latent_density(tiny_vae: VAE) -> None:
    encode, _ = numpy_functions(tiny_vae)
    images = np.random.default_rng(1).random((70, 1, 28, 28)).astype(np.float32)  # two batches
    prior = GaussianMixture(np.ones(1), np.zeros((1, 4)), np.eye(4)[None])
    options = {"likelihood": "bernoulli", "observation_std": None, "samples": 3}
    first = score_split(encode, numpy_logits(tiny_vae), images, prior=prior, seed=5, **options)  # type: ignore[arg-type]
    again = score_split(encode, numpy_logits(tiny_vae), images, prior=prior, seed=5, **options)  # type: ignore[arg-type]
    assert set(first) == {
        "negative_elbo",
        "reconstruction_nll",
        "kl",
        "iwae",
        "reconstruction_mse",
        "latent_nll",
    }
    for name, values in first.items():
        assert values.shape == (70,) and np.isfinite(values).all()
        np.testing.assert_array_equal(values, again[name])
    mean, _ = encode(images)
    np.testing.assert_allclose(first["latent_nll"], -prior.log_density(mean.astype(np.float64)))


def test_report_separates_shifted_sets_and_measures_fresh_false_positives() -> None:
    rng = np.random.default_rng(2)
    names = ("negative_elbo", "reconstruction_mse", "latent_nll")

    def like_test(count: int, shift: float = 0.0) -> dict[str, np.ndarray]:
        return {name: rng.normal(size=count) + shift for name in names}

    # A large reference: conformal p-values are valid on average over references; one of 500 varies by a
    # factor of two or three around alpha at alpha = 0.01.
    test = like_test(2000)
    reference = calibrated_reference(test, samples=16)
    report = anomaly_report(
        reference, test, {"far": like_test(300, 6.0), "same": like_test(300)}, like_test(5000)
    )
    assert (
        report["synthetic_sets"]["far"]["auroc"] > 0.999
        and report["synthetic_sets"]["far"]["flagged_share"] > 0.9
    )
    assert 0.4 < report["synthetic_sets"]["same"]["auroc"] < 0.6
    assert report["validation_flagged_share"] <= 0.02 and report["test_flagged_share"] <= 0.02
    assert report["scores"] == list(names)
