"""PCA as an exported encoder-decoder: the closed form agrees with numpy's SVD, the codes are whitened."""

from __future__ import annotations

import numpy as np
import torch

from model.pca import PCA, PIXEL_EPSILON
from model.vae import VaeConfig
from training.data import load_mnist


def test_pca_is_numpys_svd_with_whitened_codes() -> None:
    digits = load_mnist().images[:400].astype(np.float64)
    config = VaeConfig(latent_dim=12)
    pca = PCA.fit(digits.astype(np.float32), config)

    pixels = digits.reshape(len(digits), -1)
    centre = pixels.mean(axis=0)
    _, singular_values, right_vectors = np.linalg.svd(pixels - centre, full_matrices=False)
    basis = right_vectors[:12]
    expected = np.clip((pixels - centre) @ basis.T @ basis + centre, PIXEL_EPSILON, 1 - PIXEL_EPSILON)

    with torch.no_grad():
        codes, log_var = pca.encode(torch.from_numpy(digits.astype(np.float32)))
        reconstructed = torch.sigmoid(pca.decode(codes)).numpy().reshape(len(digits), -1)
    np.testing.assert_allclose(reconstructed, expected, atol=2e-4)
    # Whitened: zero mean, unit variance per component over the fitted images, uncorrelated.
    np.testing.assert_allclose(codes.numpy().mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.cov(codes.numpy(), rowvar=False), np.eye(12), atol=2e-3)
    np.testing.assert_allclose(pca.scales.numpy(), singular_values[:12] / np.sqrt(399), rtol=1e-5)
    assert torch.all(log_var == config.log_var_min)  # a point, not a distribution
