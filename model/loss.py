"""The VAE objective: negative ELBO = reconstruction NLL + KL(q(z|x) || N(0, I)), in nats per image.

Training may weight the KL by beta and floor each latent dimension's KL at `free_bits` nats (Kingma et al.
2016, "Improved Variational Inference with Inverse Autoregressive Flow"); metrics always use the true -ELBO.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

Likelihood = Literal["bernoulli", "gaussian"]


class ElboTerms(NamedTuple):
    """Scalars are means over the batch, in nats per image."""

    loss: Tensor  # what training minimizes: reconstruction + beta * (KL with free-bits floor)
    negative_elbo: Tensor  # the true -ELBO: reconstruction + KL (beta = 1, no free bits)
    reconstruction: Tensor  # E_q[-log p(x|z)], single-sample estimate
    kl: Tensor  # KL(q(z|x) || N(0, I)), exact closed form
    kl_per_dim: Tensor  # (latent_dim,) mean over the batch


def gaussian_kl(mean: Tensor, log_var: Tensor) -> Tensor:
    """Closed-form KL(N(mean, exp(log_var)) || N(0, 1)) per dimension: (N, latent_dim) -> (N, latent_dim)."""
    return 0.5 * (mean.square() + log_var.exp() - 1.0 - log_var)


def reconstruction_nll(
    logits: Tensor, images: Tensor, likelihood: Likelihood = "bernoulli", gaussian_std: float = 0.1
) -> Tensor:
    """-log p(images | logits) summed over pixels: logits, images (N, C, H, W), images in [0, 1] -> (N,).

    bernoulli: binary cross-entropy with logits (continuous targets allowed). gaussian: mean sigmoid(logits),
    fixed std gaussian_std, including the 0.5 * log(2 pi) constant.
    """
    if logits.shape != images.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and images {tuple(images.shape)} must have the same shape"
        )
    if likelihood == "bernoulli":
        per_pixel = F.binary_cross_entropy_with_logits(logits, images, reduction="none")
    elif likelihood == "gaussian":
        if gaussian_std <= 0:
            raise ValueError(f"gaussian_std must be positive, got {gaussian_std}")
        residual = (images - torch.sigmoid(logits)) / gaussian_std
        per_pixel = 0.5 * residual.square() + math.log(gaussian_std) + 0.5 * math.log(2 * math.pi)
    else:
        raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian', got {likelihood!r}")
    return per_pixel.flatten(1).sum(dim=1)


def elbo_terms(
    logits: Tensor,
    images: Tensor,
    mean: Tensor,
    log_var: Tensor,
    *,
    beta: float = 1.0,
    free_bits: float = 0.0,
    likelihood: Likelihood = "bernoulli",
    gaussian_std: float = 0.1,
) -> ElboTerms:
    """All loss terms for one batch: logits, images (N, C, H, W); mean, log_var (N, latent_dim)."""
    reconstruction = reconstruction_nll(logits, images, likelihood, gaussian_std).mean()
    kl_per_dim = gaussian_kl(mean, log_var).mean(dim=0)
    kl = kl_per_dim.sum()
    floored_kl = torch.clamp(kl_per_dim, min=free_bits).sum()
    return ElboTerms(
        loss=reconstruction + beta * floored_kl,
        negative_elbo=reconstruction + kl,
        reconstruction=reconstruction,
        kl=kl,
        kl_per_dim=kl_per_dim,
    )
