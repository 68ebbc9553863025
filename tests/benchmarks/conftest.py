"""A tiny stand-in model for the benchmark smoke tests, exported once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.export import export_untrained
from model.vae import VaeConfig

# The default model's interface (1x28x28 images, 16 latents) with small layers, so the tests stay fast.
TINY_MNIST_SHAPED = VaeConfig(image_shape=(1, 28, 28), latent_dim=16, widths=(8, 16), hidden_dim=32)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("benchmark-model")
    export_untrained(directory, TINY_MNIST_SHAPED, seed=0)
    return directory
