"""PCA as an encoder-decoder: the best linear autoencoder, fitted in closed form, exported like a VAE.

The codes are whitened principal components, z = (x - centre) V^T / s, with s the components' standard
deviations, so the training codes have zero mean and unit variance and N(0, I) is their Gaussian fit (PCA's
samples are then probabilistic PCA's without the pixel noise). Decoding maps back, x = z s V + centre, and
clips to the pixel range; the decoder's logits are those of the clipped image, so `images = sigmoid(logits)`
holds as for the VAE. Like the autoencoder, the encoder reports a point: log_var is a constant floor.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from model.vae import VAE, VaeConfig

# Decoded pixels are clipped into [PIXEL_EPSILON, 1 - PIXEL_EPSILON], so their logits stay finite.
PIXEL_EPSILON = 1e-4


class PCA(nn.Module):
    """centre (P,), components (D, P) orthonormal rows, scales (D,) > 0; P = C * H * W pixels."""

    centre: Tensor
    components: Tensor
    scales: Tensor

    def __init__(self, config: VaeConfig, centre: Tensor, components: Tensor, scales: Tensor) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("centre", centre.float())
        self.register_buffer("components", components.float())
        self.register_buffer("scales", scales.float())

    @classmethod
    def fit(cls, images: np.ndarray, config: VaeConfig) -> PCA:
        """The top config.latent_dim principal components of images (N, C, H, W), by SVD in float64."""
        pixels = images.reshape(len(images), -1).astype(np.float64)
        centre = pixels.mean(axis=0)
        _, singular_values, right_vectors = np.linalg.svd(pixels - centre, full_matrices=False)
        dim = config.latent_dim
        rank = min(len(images) - 1, pixels.shape[1])  # centred data: at most N - 1 directions
        if dim > rank:
            raise ValueError(f"PCA with {dim} components needs more than {dim} images, got {len(images)}")
        scales = np.maximum(singular_values[:dim] / np.sqrt(max(len(images) - 1, 1)), 1e-8)
        return cls(
            config, torch.from_numpy(centre), torch.from_numpy(right_vectors[:dim]), torch.from_numpy(scales)
        )

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(N, C, H, W) in [0, 1] -> whitened codes and the constant log_var floor, both (N, latent_dim)."""
        mean = (images.flatten(1) - self.centre) @ self.components.T / self.scales
        return mean, torch.full_like(mean, self.config.log_var_min)

    def decode(self, latents: Tensor) -> Tensor:
        """(N, latent_dim) -> logits (N, C, H, W) of the clipped linear reconstruction."""
        pixels = (latents * self.scales) @ self.components + self.centre
        pixels = pixels.clamp(PIXEL_EPSILON, 1 - PIXEL_EPSILON)
        return (torch.log(pixels) - torch.log1p(-pixels)).view(-1, *self.config.image_shape)


# What vae-train fits and model/export.py exports: anything with config, encode and decode as above.
Autoencoder = VAE | PCA
