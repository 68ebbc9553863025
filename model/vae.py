"""The VAE network: a conv encoder to a diagonal Gaussian q(z|x) and a mirrored decoder to pixel logits.

Each downsampling stage is a stride-2 4x4 conv then a 3x3 conv (SiLU after both); the decoder mirrors it with
a 3x3 conv then a stride-2 4x4 transposed conv, the last one emitting logits. The 3x3 convs run at the reduced
resolution, keeping an MNIST epoch fast on CPU. No normalisation: train and eval compute the same function.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The manifest's ImageSpec requires heights and widths that are multiples of 4.
_MIN_SIDE_MULTIPLE = 4


@dataclass(frozen=True)
class VaeConfig:
    """Hyper-parameters that fix the network's shape; saved next to checkpoints and in training configs."""

    image_shape: tuple[int, int, int] = (1, 28, 28)  # (C, H, W); C in {1, 3}; H, W multiples of 4
    latent_dim: int = 16
    widths: tuple[int, ...] = (32, 64)  # conv channels per downsampling stage (each stage halves H, W)
    hidden_dim: int = 256  # fully-connected layer between the conv stack and the latents
    log_var_min: float = -12.0  # the encoder's log_var is smoothly clamped to [log_var_min, log_var_max]
    log_var_max: float = 8.0
    # A plain autoencoder: z is the encoder's mean, log_var is fixed at log_var_min (a point, std 0.0025).
    deterministic: bool = False

    def __post_init__(self) -> None:
        # Accept lists (from JSON/TOML) but store tuples so the config stays hashable and comparable.
        object.__setattr__(self, "image_shape", tuple(self.image_shape))
        object.__setattr__(self, "widths", tuple(self.widths))
        if len(self.image_shape) != 3:
            raise ValueError(f"image_shape must be (channels, height, width), got {self.image_shape}")
        channels, height, width = self.image_shape
        if channels not in (1, 3):
            raise ValueError(f"image_shape channels must be 1 or 3, got {channels}")
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(
                f"widths must be a non-empty tuple of positive channel counts, got {self.widths}"
            )
        multiple = max(_MIN_SIDE_MULTIPLE, 2 ** len(self.widths))
        if height < multiple or width < multiple or height % multiple or width % multiple:
            raise ValueError(
                f"image height and width must be positive multiples of {multiple} "
                f"(4 and 2**len(widths) = 2**{len(self.widths)}), got {height}x{width}"
            )
        if self.latent_dim < 1 or self.hidden_dim < 1:
            raise ValueError(
                f"latent_dim and hidden_dim must be >= 1, got {self.latent_dim} and {self.hidden_dim}"
            )
        if not self.log_var_min < self.log_var_max:
            raise ValueError(
                f"log_var_min must be below log_var_max, got [{self.log_var_min}, {self.log_var_max}]"
            )

    @property
    def bottleneck_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the feature map after the last downsampling stage."""
        _, height, width = self.image_shape
        factor = 2 ** len(self.widths)
        return (self.widths[-1], height // factor, width // factor)

    def to_dict(self) -> dict[str, Any]:
        """JSON/TOML-friendly dict (tuples become lists)."""
        return {
            key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VaeConfig:
        """Inverse of to_dict; missing keys take their defaults, unknown keys raise ValueError."""
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown VaeConfig keys {unknown}; allowed keys are {sorted(known)}")
        return cls(**data)


class VaeOutput(NamedTuple):
    """One forward pass: logits (N, C, H, W), mean and log_var (N, latent_dim), sampled z (N, latent_dim)."""

    logits: Tensor
    mean: Tensor
    log_var: Tensor
    z: Tensor


def reparameterize(mean: Tensor, log_var: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Sample z = mean + exp(0.5 log_var) * eps with eps ~ N(0, I); all (N, latent_dim)."""
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return mean + torch.exp(0.5 * log_var) * eps


def soft_clamp(values: Tensor, low: float, high: float) -> Tensor:
    """Clamp to [low, high] with softplus corners: identity well inside the range, never a zero gradient."""
    above_low = low + F.softplus(values - low)
    # The final hard clamp only removes float rounding beyond the bounds (at most ~exp(low - high)).
    return torch.clamp(high - F.softplus(high - above_low), low, high)


def _encoder_stage(in_channels: int, out_channels: int) -> nn.Sequential:
    """(N, in, H, W) -> (N, out, H/2, W/2): downsample first, so the 3x3 conv runs at half resolution."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1),
        nn.SiLU(),
        nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
        nn.SiLU(),
    )


def _decoder_stage(in_channels: int, out_channels: int, *, last: bool) -> nn.Sequential:
    """(N, in, H, W) -> (N, out, 2H, 2W); the mirror of _encoder_stage. The last stage emits raw logits."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1),
        nn.SiLU(),
        nn.ConvTranspose2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1),
    ]
    return nn.Sequential(*layers) if last else nn.Sequential(*layers, nn.SiLU())


class VAE(nn.Module):
    """Convolutional VAE with a diagonal Gaussian posterior and a per-pixel logit decoder."""

    def __init__(self, config: VaeConfig) -> None:
        super().__init__()
        self.config = config
        channels = config.image_shape[0]
        bottleneck_features = (
            config.bottleneck_shape[0] * config.bottleneck_shape[1] * config.bottleneck_shape[2]
        )

        stage_inputs = (channels, *config.widths[:-1])
        self.encoder_convs = nn.Sequential(
            *(_encoder_stage(c_in, c_out) for c_in, c_out in zip(stage_inputs, config.widths, strict=True))
        )
        self.encoder_head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(bottleneck_features, config.hidden_dim),
            nn.SiLU(),
            nn.Linear(config.hidden_dim, 2 * config.latent_dim),
        )

        self.decoder_head = nn.Sequential(
            nn.Linear(config.latent_dim, config.hidden_dim),
            nn.SiLU(),
            nn.Linear(config.hidden_dim, bottleneck_features),
            nn.SiLU(),
            nn.Unflatten(1, config.bottleneck_shape),
        )
        reversed_widths = config.widths[::-1]
        stage_outputs = (*reversed_widths[1:], channels)
        self.decoder_convs = nn.Sequential(
            *(
                _decoder_stage(c_in, c_out, last=index == len(config.widths) - 1)
                for index, (c_in, c_out) in enumerate(zip(reversed_widths, stage_outputs, strict=True))
            )
        )

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(N, C, H, W) float in [0, 1] -> mean, log_var (N, latent_dim); log_var within the config bounds."""
        if tuple(images.shape[1:]) != self.config.image_shape:
            raise ValueError(
                f"expected images of shape (N, {', '.join(map(str, self.config.image_shape))}), "
                f"got {tuple(images.shape)}"
            )
        mean, raw_log_var = self.encoder_head(self.encoder_convs(images)).chunk(2, dim=1)
        if self.config.deterministic:
            return mean, torch.full_like(mean, self.config.log_var_min)
        return mean, soft_clamp(raw_log_var, self.config.log_var_min, self.config.log_var_max)

    def decode(self, latents: Tensor) -> Tensor:
        """(N, latent_dim) -> pixel logits (N, C, H, W); sigmoid(logits) is the Bernoulli/Gaussian mean."""
        return self.decoder_convs(self.decoder_head(latents))

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> VaeOutput:
        """Encode, sample z with the reparameterization trick, decode: see VaeOutput for shapes."""
        mean, log_var = self.encode(images)
        z = mean if self.config.deterministic else reparameterize(mean, log_var, generator)
        return VaeOutput(logits=self.decode(z), mean=mean, log_var=log_var, z=z)
