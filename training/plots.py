"""Pictures of a training run (matplotlib, Agg backend): loss curves, samples, reconstructions, latents."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from model.pca import Autoencoder
from training.evaluate import posterior_means


def _tile(images: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """(rows * columns, C, H, W) in [0, 1] -> one (rows * H, columns * W[, C]) picture for imshow."""
    _, channels, height, width = images.shape
    grid = images.reshape(rows, columns, channels, height, width).transpose(0, 3, 1, 4, 2)
    grid = grid.reshape(rows * height, columns * width, channels)
    return grid[:, :, 0] if channels == 1 else grid


def _save_picture(picture: np.ndarray, path: Path, title: str) -> None:
    figure, axes = plt.subplots(
        figsize=(picture.shape[1] / 28 * 0.6 + 0.5, picture.shape[0] / 28 * 0.6 + 0.6)
    )
    axes.imshow(picture, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    axes.set_title(title, fontsize=9)
    axes.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


@torch.no_grad()
def _decode(vae: Autoencoder, latents: torch.Tensor) -> np.ndarray:
    """(N, latent_dim) -> (N, C, H, W) pixel means in [0, 1]."""
    return torch.sigmoid(vae.decode(latents)).numpy()


def plot_loss_curves(history: Sequence[dict[str, float]], path: Path) -> None:
    """Train and validation negative ELBO, reconstruction and KL per epoch (nats/image)."""
    epochs = [row["epoch"] for row in history]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for axis, key in zip(axes, ("negative_elbo", "reconstruction", "kl"), strict=True):
        axis.plot(epochs, [row[f"train_{key}"] for row in history], label="train")
        axis.plot(epochs, [row[f"validation_{key}"] for row in history], label="validation")
        axis.set_xlabel("epoch")
        axis.set_ylabel("nats / image")
        axis.set_title(key.replace("_", " "))
        axis.legend()
    if len(history) > 3:  # the first epochs (KL warm-up) would squash the interesting range
        tail = [row["validation_negative_elbo"] for row in history[2:]]
        low, high = min(tail), max(tail)
        axes[0].set_ylim(low - 0.1 * (high - low + 1), high + 0.1 * (high - low + 1))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_prior_samples(vae: Autoencoder, path: Path, *, rows: int = 8, seed: int = 0) -> None:
    """A rows x rows grid of decoded z ~ N(0, I)."""
    latents = torch.randn((rows * rows, vae.config.latent_dim), generator=torch.Generator().manual_seed(seed))
    _save_picture(_tile(_decode(vae, latents), rows, rows), path, "samples from the prior")


def plot_reconstructions(vae: Autoencoder, images: np.ndarray, path: Path, *, count: int = 16) -> None:
    """Test images (odd rows) above their reconstructions from the posterior mean (even rows).

    The images are spread evenly over the split, so a class-sorted split shows every class.
    """
    count = min(count, len(images))
    originals = images[np.linspace(0, len(images) - 1, count).astype(int)]
    with torch.no_grad():
        reconstructed = _decode(vae, vae.encode(torch.from_numpy(originals))[0])
    columns = 8 if count >= 8 else count
    rows = count // columns
    originals, reconstructed = originals[: rows * columns], reconstructed[: rows * columns]
    pairs = np.stack(
        [
            originals.reshape(rows, columns, *originals.shape[1:]),
            reconstructed.reshape(rows, columns, *originals.shape[1:]),
        ],
        1,
    )
    picture = _tile(pairs.reshape(-1, *originals.shape[1:]), 2 * rows, columns)
    _save_picture(picture, path, "test images (odd rows) and reconstructions (even rows)")


def plot_interpolation(
    vae: Autoencoder, images: np.ndarray, path: Path, *, pairs: int = 4, steps: int = 10
) -> None:
    """Decoded straight lines between posterior means of pairs of test images, one strip per pair."""
    pairs = min(pairs, len(images) // 2)
    chosen = np.linspace(0, len(images) - 1, 2 * pairs).astype(int)  # different classes if sorted
    with torch.no_grad():
        means = vae.encode(torch.from_numpy(images[chosen]))[0]
    weights = torch.linspace(0.0, 1.0, steps)[:, None]
    strips = [_decode(vae, (1 - weights) * means[2 * i] + weights * means[2 * i + 1]) for i in range(pairs)]
    _save_picture(
        _tile(np.concatenate(strips), pairs, steps), path, "latent interpolation between test images"
    )


def plot_latent_projection(
    vae: Autoencoder, images: np.ndarray, labels: np.ndarray | None, path: Path
) -> None:
    """Test posterior means projected on their first two principal components, coloured by label."""
    means = posterior_means(vae, images).astype(np.float64)
    centred = means - means.mean(axis=0)
    _, _, right_vectors = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ right_vectors[:2].T
    figure, axes = plt.subplots(figsize=(6, 5))
    if labels is None:
        scatter = axes.scatter(projected[:, 0], projected[:, 1], c="tab:blue", s=8)
    else:
        scatter = axes.scatter(projected[:, 0], projected[:, 1], c=labels, cmap="tab10", s=8)
    if labels is not None:
        figure.colorbar(scatter, ax=axes, label="label")
    axes.set_xlabel("PC 1 of E[z|x]")
    axes.set_ylabel("PC 2 of E[z|x]")
    axes.set_title("test latents (PCA of posterior means)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def save_all_plots(
    vae: Autoencoder,
    history: Sequence[dict[str, float]],
    test_images: np.ndarray,
    test_labels: np.ndarray | None,
    run_dir: Path,
) -> list[Path]:
    """Write every picture of a run into run_dir; returns their paths."""
    vae = vae.eval()
    paths = [
        run_dir / name
        for name in (
            "loss_curves.png",
            "prior_samples.png",
            "reconstructions.png",
            "interpolation.png",
            "latents_pca.png",
        )
    ]
    plot_loss_curves(history, paths[0])
    plot_prior_samples(vae, paths[1])
    plot_reconstructions(vae, test_images, paths[2])
    plot_interpolation(vae, test_images, paths[3])
    plot_latent_projection(vae, test_images, test_labels, paths[4])
    return paths
