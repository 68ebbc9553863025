"""Tiny exported models, built once per session: export takes a few seconds, the tests reuse it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from model.export import export_model, export_untrained
from model.manifest import Manifest, TrainingData
from model.vae import VAE, VaeConfig

# The machine is shared: tiny models on one thread keep the suite fast.
torch.set_num_threads(1)

TINY_RGB = VaeConfig(image_shape=(3, 32, 32), latent_dim=8, widths=(8, 16), hidden_dim=32)
TINY_GRAY = VaeConfig(image_shape=(1, 28, 28), latent_dim=4, widths=(8, 16), hidden_dim=32)
# Raw log_var biases of units 0 and 1, far outside [log_var_min, log_var_max]: exercises the exported clamp.
CLAMP_TEST_BIASES = (60.0, -60.0)


@dataclass(frozen=True)
class ExportedModel:
    vae: VAE  # the PyTorch model the directory was exported from, in eval mode
    model_dir: Path
    manifest: Manifest


@pytest.fixture(scope="session")
def rgb_model(tmp_path_factory: pytest.TempPathFactory) -> ExportedModel:
    """export_untrained of a 3x32x32 VAE with seed 0."""
    model_dir = tmp_path_factory.mktemp("rgb")
    manifest = export_untrained(model_dir, TINY_RGB, seed=0)
    torch.manual_seed(0)
    return ExportedModel(VAE(TINY_RGB).eval(), model_dir, manifest)


@pytest.fixture(scope="session")
def gray_model(tmp_path_factory: pytest.TempPathFactory) -> ExportedModel:
    """A 1x28x28 VAE, gaussian likelihood, whose first two log_var units saturate the clamp bounds."""
    torch.manual_seed(1)
    vae = VAE(TINY_GRAY)
    head = vae.encoder_head[-1]
    assert isinstance(head, torch.nn.Linear)
    with torch.no_grad():
        for offset, bias in enumerate(CLAMP_TEST_BIASES):
            head.bias[TINY_GRAY.latent_dim + offset] = bias
    model_dir = tmp_path_factory.mktemp("gray")
    manifest = export_model(
        vae,
        model_dir,
        name="gray-test",
        version="1.2.3",
        likelihood="gaussian",
        training_data=TrainingData(name="synthetic", train_size=10, validation_size=2, test_size=3),
        test_metrics={"negative_elbo": 123.5, "active_units": 2.0},
    )
    return ExportedModel(vae.eval(), model_dir, manifest)
