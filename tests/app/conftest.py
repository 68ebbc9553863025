"""Small exported models, built once per session, and apps serving them."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.main import create_app

# Tiny widths keep export and inference fast on a shared 2-core machine; the shapes are what matter here.
MNIST_LIKE = {"image_shape": (1, 28, 28), "latent_dim": 16, "widths": (8, 16), "hidden_dim": 32}
RGB = {"image_shape": (3, 32, 32), "latent_dim": 8, "widths": (8, 16), "hidden_dim": 32}


def _export(out_dir: Path, config: dict[str, Any], name: str) -> Path:
    import torch

    from model.export import export_untrained
    from model.vae import VaeConfig

    torch.set_num_threads(1)
    export_untrained(out_dir, VaeConfig(**config), seed=0, name=name, version="1")
    return out_dir


@pytest.fixture(scope="session")
def mnist_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1x28x28, 16-latent untrained model directory."""
    return _export(tmp_path_factory.mktemp("mnist-model"), MNIST_LIKE, "mnist-test")


@pytest.fixture(scope="session")
def rgb_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3x32x32, 8-latent untrained model directory."""
    return _export(tmp_path_factory.mktemp("rgb-model"), RGB, "rgb-test")


def test_settings(model_dir: Path, **overrides: Any) -> Settings:
    """Settings for tests: CPU, one onnxruntime thread, a small batch for quick warm-up."""
    values: dict[str, Any] = {
        "model_dir": model_dir,
        "execution_provider": "cpu",
        "intra_op_threads": 1,
        "max_batch_size": 16,
    }
    values.update(overrides)
    return Settings(**values)


test_settings.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


@pytest.fixture(scope="session")
def client(mnist_model_dir: Path) -> Iterator[TestClient]:
    """One running app (lifespan entered) serving the 1x28x28 model, shared by the read-only API tests."""
    with TestClient(create_app(test_settings(mnist_model_dir)), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def rgb_client(rgb_model_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(test_settings(rgb_model_dir)), raise_server_exceptions=False) as test_client:
        yield test_client


def png_bytes(pixels: np.ndarray, mode: str | None = None) -> bytes:
    """uint8 (H, W) or (H, W, C) -> PNG bytes."""
    buffer = io.BytesIO()
    image = Image.fromarray(pixels) if mode is None else Image.fromarray(pixels).convert(mode)
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def random_png(height: int = 28, width: int = 28, channels: int = 1, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return png_bytes(pixels[:, :, 0] if channels == 1 else pixels)
