"""Data augmentation for training batches: random integer translations and a mild random affine warp.

With only a few thousand training images, generalisation is the bottleneck; small geometric jitter keeps the
digits' pixel statistics (integer shifts copy pixels exactly) while multiplying the effective data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Augmentation:
    """translate_pixels: max |shift| per axis; rotate_degrees: max |angle|; scale_range: max |scale - 1|.

    probability: the share of images that are augmented; the others pass through unchanged, so the model
    also sees the undistorted digits it is evaluated on.
    """

    translate_pixels: int = 0
    rotate_degrees: float = 0.0
    scale_range: float = 0.0
    probability: float = 1.0

    @property
    def enabled(self) -> bool:
        distorts = self.translate_pixels > 0 or self.rotate_degrees > 0 or self.scale_range > 0
        return distorts and self.probability > 0

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """(N, C, H, W) -> (N, C, H, W) augmented copies; draws all randomness from generator."""
        augmented = images
        if self.rotate_degrees > 0 or self.scale_range > 0:
            augmented = random_affine(augmented, self.rotate_degrees, self.scale_range, generator)
        if self.translate_pixels > 0:
            augmented = random_translate(augmented, self.translate_pixels, generator)
        if self.probability < 1.0:
            chosen = torch.rand(len(images), generator=generator) < self.probability
            augmented = torch.where(chosen.view(-1, 1, 1, 1), augmented, images)
        return augmented


def random_translate(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Shift each image by integers in [-max_shift, max_shift] per axis, filling with zeros: (N, C, H, W)."""
    count, _, height, width = images.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (2, count), generator=generator)
    padded = F.pad(images, (max_shift, max_shift, max_shift, max_shift))
    # Output pixel (r, c) of image n reads padded pixel (r + max_shift - dy, c + max_shift - dx).
    rows = torch.arange(height)[None, :] + max_shift - shifts[0][:, None]  # (N, H)
    cols = torch.arange(width)[None, :] + max_shift - shifts[1][:, None]  # (N, W)
    batch = torch.arange(count)[:, None, None]
    moved = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return moved.permute(0, 3, 1, 2).contiguous()


def random_affine(
    images: Tensor, max_degrees: float, scale_range: float, generator: torch.Generator
) -> Tensor:
    """Rotate by up to max_degrees and scale by 1 +- scale_range about the centre (bilinear): (N, C, H, W)."""
    count = images.shape[0]
    uniform = torch.rand((2, count), generator=generator) * 2.0 - 1.0  # in [-1, 1)
    angle = uniform[0] * math.radians(max_degrees)
    scale = 1.0 + uniform[1] * scale_range
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    zero = torch.zeros(count)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)  # (N, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
