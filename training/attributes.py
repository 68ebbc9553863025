"""Attributes measured on images themselves, for attribute directions in the latent space (White 2016).

Each measure maps images (N, C, H, W) float in [0, 1] to (N,) float64. Grayscale images get ink, thickness,
slant and width; RGB images brightness, saturation and contrast. Ink-weighted moments treat pixel
intensity as mass, so they need no threshold.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Measure = Callable[[np.ndarray], np.ndarray]
_EPSILON = 1e-8


def ink(images: np.ndarray) -> np.ndarray:
    """Mean pixel intensity: how much ink the image holds."""
    return images.reshape(len(images), -1).mean(axis=1).astype(np.float64)


def thickness(images: np.ndarray) -> np.ndarray:
    """Stroke thickness in pixels: twice the ink area over the total variation (~ the stroke's perimeter).

    For a stroke of width w and length l, area ~ w * l and the summed absolute gradient ~ 2 * l, so the ratio
    2 * area / gradient ~ w, whatever the stroke's length.
    """
    gray = images.mean(axis=1).astype(np.float64)
    gradient = np.abs(np.diff(gray, axis=1)).sum(axis=(1, 2)) + np.abs(np.diff(gray, axis=2)).sum(axis=(1, 2))
    return 2 * gray.sum(axis=(1, 2)) / (gradient + _EPSILON)


def _moments(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ink-weighted variance of x, of y and their covariance, and the total mass; x right, y up."""
    gray = images.mean(axis=1).astype(np.float64)
    _, height, width = gray.shape
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    y = -y  # rows grow downwards; slant is measured with y pointing up
    mass = gray.sum(axis=(1, 2)) + _EPSILON
    mean_x = (gray * x).sum(axis=(1, 2)) / mass
    mean_y = (gray * y).sum(axis=(1, 2)) / mass
    dx = x[None] - mean_x[:, None, None]
    dy = y[None] - mean_y[:, None, None]
    var_x = (gray * dx * dx).sum(axis=(1, 2)) / mass
    var_y = (gray * dy * dy).sum(axis=(1, 2)) / mass
    cov_xy = (gray * dx * dy).sum(axis=(1, 2)) / mass
    return var_x, var_y, cov_xy, mass


def slant(images: np.ndarray) -> np.ndarray:
    """Shear of the ink: x moves by this much per unit of height; positive leans right (like italics)."""
    _, var_y, cov_xy, _ = _moments(images)
    return cov_xy / (var_y + _EPSILON)


def width(images: np.ndarray) -> np.ndarray:
    """Ink-weighted standard deviation of the horizontal position, in pixels."""
    var_x, _, _, _ = _moments(images)
    return np.sqrt(var_x)


def brightness(images: np.ndarray) -> np.ndarray:
    """Mean luminance (ITU-R BT.601 weights)."""
    return _luminance(images).reshape(len(images), -1).mean(axis=1)


def saturation(images: np.ndarray) -> np.ndarray:
    """Mean HSV saturation: (max - min) / max over the channels, 0 for black pixels."""
    peak = images.max(axis=1).astype(np.float64)
    spread = peak - images.min(axis=1)
    return (spread / np.maximum(peak, _EPSILON)).reshape(len(images), -1).mean(axis=1)


def contrast(images: np.ndarray) -> np.ndarray:
    """Standard deviation of the luminance over the image."""
    return _luminance(images).reshape(len(images), -1).std(axis=1)


def _luminance(images: np.ndarray) -> np.ndarray:
    weights = np.array([0.299, 0.587, 0.114])
    return np.einsum("nchw,c->nhw", images.astype(np.float64), weights)


GRAYSCALE_ATTRIBUTES: dict[str, tuple[Measure, str]] = {
    "ink": (ink, "mean pixel intensity: how much ink"),
    "thickness": (thickness, "stroke thickness in pixels (2 x ink / total variation)"),
    "slant": (slant, "horizontal shear of the ink per unit of height; positive leans right"),
    "width": (width, "ink-weighted standard deviation of the horizontal position, in pixels"),
}
RGB_ATTRIBUTES: dict[str, tuple[Measure, str]] = {
    "brightness": (brightness, "mean luminance"),
    "saturation": (saturation, "mean HSV saturation"),
    "contrast": (contrast, "standard deviation of the luminance"),
}


def attributes_for(channels: int) -> dict[str, tuple[Measure, str]]:
    """The attributes measured for images with this many channels (1 or 3)."""
    return GRAYSCALE_ATTRIBUTES if channels == 1 else RGB_ATTRIBUTES
