"""Shared tiny settings: a small MNIST subset and a tiny network keep every training test to seconds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from training.config import TrainConfig

TINY: dict[str, Any] = {
    "max_train_images": 48,
    "validation_size": 40,
    "latent_dim": 4,
    "widths": (4, 8),
    "hidden_dim": 16,
    "batch_size": 16,
    "epochs": 2,
    "num_threads": 1,
    "progress": False,
    "eval_samples": 2,
    "iwae_samples": 4,
    "translate_pixels": 1,
    "kl_warmup_epochs": 1,
    "free_bits": 0.05,
    "judge_epochs": 1,
    # Two updates cannot beat PCA: these runs test the plumbing, the guardrail has its own tests.
    "allow_weak_model": True,
}


@pytest.fixture
def tiny_config() -> TrainConfig:
    return TrainConfig.from_dict(TINY)


def _tiny_flags(**changes: Any) -> list[str]:
    """TINY (plus changes) as vae-train command-line flags."""
    return as_flags({**TINY, **changes})


def as_flags(values: dict[str, Any]) -> list[str]:
    """Config values as vae-train command-line flags."""
    flags: list[str] = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, tuple):
            flags += [flag, ",".join(map(str, value))]
        else:
            flags += [flag, str(value)]
    return flags


@pytest.fixture(scope="session")
def tiny_flags() -> Callable[..., list[str]]:
    """tiny_flags(**changes) -> vae-train flags for TINY with changes applied."""
    return _tiny_flags
