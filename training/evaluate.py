"""Test-split evaluation of a trained VAE, with PCA as the linear baseline it must beat.

All likelihood numbers are nats per image, averaged over the test images, at beta = 1 without free bits.
The reconstruction term of the negative ELBO averages `samples` posterior samples per image (the KL term is
exact, closed form); `iwae_bound` is the k-sample importance-weighted bound (Burda et al. 2016), reported
with the same sign as negative_elbo: an upper bound on -log p(x) that is tighter (smaller) than it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from model.loss import Likelihood, gaussian_kl, reconstruction_nll
from model.pca import Autoencoder
from model.vae import reparameterize

ACTIVE_UNIT_THRESHOLD = 0.01
_BATCH_SIZE = 250


def _batches(images: np.ndarray, batch_size: int = _BATCH_SIZE) -> list[Tensor]:
    """(N, C, H, W) array -> list of tensors of at most batch_size images."""
    return [torch.from_numpy(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]


@torch.no_grad()
def posteriors(vae: Autoencoder, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """q(z | x)'s mean and log_var for each image: (N, C, H, W) -> two (N, latent_dim) float32 arrays."""
    encoded = [vae.encode(batch) for batch in _batches(images)]
    return torch.cat([mean for mean, _ in encoded]).numpy(), torch.cat([lv for _, lv in encoded]).numpy()


def posterior_means(vae: Autoencoder, images: np.ndarray) -> np.ndarray:
    """E_q[z | x] for each image: (N, C, H, W) -> (N, latent_dim) float32."""
    return posteriors(vae, images)[0]


@torch.no_grad()
def negative_elbo(
    vae: Autoencoder,
    images: np.ndarray,
    *,
    samples: int,
    likelihood: Likelihood,
    gaussian_std: float,
    generator: torch.Generator,
) -> dict[str, float]:
    """Mean negative ELBO and its parts over images (N, C, H, W): reconstruction averaged over samples."""
    reconstruction_total, kl_total = 0.0, 0.0
    for batch in _batches(images):
        mean, log_var = vae.encode(batch)
        kl_total += float(gaussian_kl(mean, log_var).sum())
        for _ in range(samples):
            z = reparameterize(mean, log_var, generator)
            nll = reconstruction_nll(vae.decode(z), batch, likelihood, gaussian_std)
            reconstruction_total += float(nll.sum()) / samples
    count = len(images)
    return {
        "negative_elbo": (reconstruction_total + kl_total) / count,
        "reconstruction_nll": reconstruction_total / count,
        "kl": kl_total / count,
    }


@torch.no_grad()
def iwae_negative_bound(
    vae: Autoencoder,
    images: np.ndarray,
    *,
    samples: int,
    likelihood: Likelihood,
    gaussian_std: float,
    generator: torch.Generator,
) -> float:
    """-(k-sample IWAE bound on log p(x)), mean over images (N, C, H, W); nats per image."""
    total = 0.0
    for batch in _batches(images, batch_size=max(1, 4000 // samples)):
        mean, log_var = vae.encode(batch)
        count, latent_dim = mean.shape
        eps = torch.randn((samples, count, latent_dim), generator=generator)
        z = mean + torch.exp(0.5 * log_var) * eps  # (k, N, D)
        logits = vae.decode(z.reshape(samples * count, latent_dim))
        targets = batch.expand(samples, *batch.shape).reshape(samples * count, *batch.shape[1:])
        log_likelihood = -reconstruction_nll(logits, targets, likelihood, gaussian_std).view(samples, count)
        log_prior = -0.5 * (z.square() + math.log(2 * math.pi)).sum(-1)
        log_posterior = -0.5 * (eps.square() + log_var + math.log(2 * math.pi)).sum(-1)
        log_weights = log_likelihood + log_prior - log_posterior  # (k, N)
        bound = torch.logsumexp(log_weights, dim=0) - math.log(samples)
        total -= float(bound.sum())
    return total / len(images)


@torch.no_grad()
def reconstruction_mse(vae: Autoencoder, images: np.ndarray) -> float:
    """MSE per pixel between images (N, C, H, W) and sigmoid(decode(posterior mean))."""
    squared_error = 0.0
    for batch in _batches(images):
        reconstructed = torch.sigmoid(vae.decode(vae.encode(batch)[0]))
        squared_error += float((reconstructed - batch).double().square().sum())
    return squared_error / images.size


def active_units(means: np.ndarray, threshold: float = ACTIVE_UNIT_THRESHOLD) -> tuple[int, float]:
    """Burda et al.: dimension d is active when Var_x(E_q[z_d | x]) > threshold; means (N, latent_dim).

    The variance is over the N images (population variance, ddof=0). Returns (count, fraction of dims).
    """
    variances = means.astype(np.float64).var(axis=0)
    count = int((variances > threshold).sum())
    return count, count / means.shape[1]


def pca_mse(train_images: np.ndarray, test_images: np.ndarray, components: int) -> float:
    """MSE per pixel of PCA with `components` components fit on train, reconstructing test: (N, C, H, W)."""
    train = train_images.reshape(len(train_images), -1).astype(np.float64)
    test = test_images.reshape(len(test_images), -1).astype(np.float64)
    centre = train.mean(axis=0)
    _, _, right_vectors = np.linalg.svd(train - centre, full_matrices=False)
    basis = right_vectors[:components]  # (components, pixels)
    reconstructed = (test - centre) @ basis.T @ basis + centre
    return float(np.mean((reconstructed - test) ** 2))


def evaluate(
    vae: Autoencoder,
    test_images: np.ndarray,
    train_images: np.ndarray,
    *,
    likelihood: Likelihood = "bernoulli",
    gaussian_std: float = 0.1,
    samples: int = 16,
    iwae_samples: int = 64,
    seed: int = 0,
) -> dict[str, float]:
    """The manifest's test_metrics: negative_elbo, reconstruction_nll, kl, reconstruction_mse, active_units,
    active_units_fraction, pca_mse, and iwae_bound when iwae_samples > 0. Images are (N, C, H, W) in [0, 1].
    """
    vae = vae.eval()
    generator = torch.Generator().manual_seed(seed)
    metrics = negative_elbo(
        vae,
        test_images,
        samples=samples,
        likelihood=likelihood,
        gaussian_std=gaussian_std,
        generator=generator,
    )
    metrics["reconstruction_mse"] = reconstruction_mse(vae, test_images)
    count, fraction = active_units(posterior_means(vae, test_images))
    metrics["active_units"] = float(count)
    metrics["active_units_fraction"] = fraction
    metrics["pca_mse"] = pca_mse(train_images, test_images, vae.config.latent_dim)
    if iwae_samples > 0:
        metrics["iwae_bound"] = iwae_negative_bound(
            vae,
            test_images,
            samples=iwae_samples,
            likelihood=likelihood,
            gaussian_std=gaussian_std,
            generator=generator,
        )
    return metrics


def weak_model_reasons(test_metrics: dict[str, float], model_kind: str) -> list[str]:
    """Why a trained model should not be served as it is: no active latent unit (posterior collapse, every
    image decodes to the same blob), or reconstructions no better than PCA's with as many components."""
    reasons = []
    if test_metrics["active_units"] == 0:
        collapse = (
            "the posterior collapsed onto the prior" if model_kind == "vae" else "every image gets one code"
        )
        reasons.append(f"no active latent unit: {collapse}")
    if model_kind != "pca" and test_metrics["reconstruction_mse"] >= test_metrics["pca_mse"]:
        reasons.append(
            f"reconstruction MSE {test_metrics['reconstruction_mse']:.4f} is not below PCA's "
            f"{test_metrics['pca_mse']:.4f} with as many components"
        )
    return reasons
