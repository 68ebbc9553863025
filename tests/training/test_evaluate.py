"""Evaluation metrics on cases whose answers can be worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.vae import VAE, VaeConfig
from training.evaluate import active_units, evaluate, pca_mse


def test_active_units_counts_dimensions_whose_mean_varies() -> None:
    # Column variances (ddof=0): 1.0, 0.0, 0.00390625, 0.015625 (values exact in binary floating point).
    means = np.array([[1.0, 5.0, 0.0625, 0.125], [-1.0, 5.0, -0.0625, -0.125]])
    assert active_units(means) == (2, 0.5)
    assert active_units(means, threshold=0.0) == (3, 0.75)


def test_pca_mse_is_zero_inside_the_subspace_and_matches_svd() -> None:
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(2, 12))
    train = (rng.normal(size=(30, 2)) @ basis + 0.5).reshape(30, 1, 3, 4)
    inside = (rng.normal(size=(5, 2)) @ basis + 0.5).reshape(5, 1, 3, 4)
    assert pca_mse(train, inside, components=2) == pytest.approx(0.0, abs=1e-20)
    # One component: the error is the test data's energy outside the top principal direction.
    flat = train.reshape(30, -1)
    centre = flat.mean(axis=0)
    _, eigenvectors = np.linalg.eigh(np.cov(flat.T))
    top = eigenvectors[:, -1]
    residual = (inside.reshape(5, -1) - centre) - np.outer((inside.reshape(5, -1) - centre) @ top, top)
    assert pca_mse(train, inside, components=1) == pytest.approx(float(np.mean(residual**2)), rel=1e-9)


def test_pca_mse_of_mean_only_model_is_variance_around_train_mean() -> None:
    train = np.array([0.0, 1.0]).reshape(2, 1, 1, 1) * np.ones((1, 1, 2, 2))
    test = np.full((1, 1, 2, 2), 0.25)
    # Rank-1 train data spans the direction (1, 1, 1, 1); test minus the mean 0.5 lies on it: error 0.
    assert pca_mse(train, test, components=1) == pytest.approx(0.0, abs=1e-20)
    assert pca_mse(train, test, components=0) == pytest.approx(0.0625)


def test_evaluate_reports_every_key_and_iwae_is_tighter() -> None:
    torch.manual_seed(0)
    vae = VAE(VaeConfig(image_shape=(1, 8, 8), latent_dim=3, widths=(4,), hidden_dim=8))
    images = np.random.default_rng(0).random((20, 1, 8, 8), dtype=np.float32)
    metrics = evaluate(vae, images[:10], images[10:], samples=4, iwae_samples=8)
    assert sorted(metrics) == sorted(
        [
            "negative_elbo",
            "reconstruction_nll",
            "kl",
            "reconstruction_mse",
            "active_units",
            "active_units_fraction",
            "pca_mse",
            "iwae_bound",
        ]
    )
    assert metrics["negative_elbo"] == pytest.approx(metrics["reconstruction_nll"] + metrics["kl"])
    assert metrics["iwae_bound"] <= metrics["negative_elbo"] + 0.5
    assert metrics["active_units_fraction"] == metrics["active_units"] / 3
    assert math.isfinite(metrics["pca_mse"])
    assert "iwae_bound" not in evaluate(vae, images[:10], images[10:], samples=1, iwae_samples=0)
