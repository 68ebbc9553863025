"""Small exported models, built once per session, and apps serving them."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app

# Tiny widths keep export and inference fast on a shared 2-core machine; the shapes are what matter here.
MNIST_LIKE = {"image_shape": (1, 28, 28), "latent_dim": 16, "widths": (8, 16), "hidden_dim": 32}
RGB = {"image_shape": (3, 32, 32), "latent_dim": 8, "widths": (8, 16), "hidden_dim": 32}


def _export(out_dir: Path, config: dict[str, Any], name: str, seed: int = 0, version: str = "1") -> Path:
    import torch

    from model.export import export_untrained
    from model.vae import VaeConfig

    torch.set_num_threads(1)
    export_untrained(out_dir, VaeConfig(**config), seed=seed, name=name, version=version)
    return out_dir


@pytest.fixture(scope="session")
def mnist_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1x28x28, 16-latent untrained model directory."""
    return _export(tmp_path_factory.mktemp("mnist-model"), MNIST_LIKE, "mnist-test")


def _export_with_latent_space(out_dir: Path, config: dict[str, Any], name: str, seed: int = 0) -> Path:
    """An untrained model whose latent space is described from 600 real MNIST digits (labels 0..9)."""
    import torch

    from model.export import export_model
    from model.manifest import TrainingData
    from model.vae import VAE, VaeConfig
    from training.cli import numpy_functions
    from training.data import DataSplits, Split, load_mnist
    from training.latent_space import fit_latent_space

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    vae = VAE(VaeConfig(**config)).eval()
    digits = load_mnist()
    picked = np.concatenate([np.flatnonzero(digits.labels == label)[:60] for label in range(10)])
    order = np.random.default_rng(seed).permutation(picked)

    def split(index: np.ndarray) -> Split:
        assert digits.labels is not None
        return Split(digits.images[index], digits.labels[index])

    splits = DataSplits(
        "mnist-600", split(order[:400]), split(order[400:500]), split(order[500:]), 0, digits.label_names
    )
    encode, decode = numpy_functions(vae)
    export_model(
        vae,
        out_dir,
        name=name,
        version="1",
        likelihood="bernoulli",
        training_data=TrainingData(name="mnist-600", train_size=400, validation_size=100, test_size=100),
        test_metrics={},
        latent_space=fit_latent_space(encode, decode, splits, seed=seed),
    )
    return out_dir


@pytest.fixture(scope="session")
def latent_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1x28x28, 16-latent untrained model with a latent-space description: mixture prior, ten labels,
    grayscale attributes."""
    return _export_with_latent_space(tmp_path_factory.mktemp("latent-model"), MNIST_LIKE, "latent-test")


@pytest.fixture(scope="session")
def latent_client(latent_model_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(latent_model_dir)), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def mnist_model_v2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Version 2 of the mnist-test model: same shapes, other weights (seed 1), for reload tests."""
    return _export(tmp_path_factory.mktemp("mnist-model-v2"), MNIST_LIKE, "mnist-test", seed=1, version="2")


@pytest.fixture(scope="session")
def rgb_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3x32x32, 8-latent untrained model directory."""
    return _export(tmp_path_factory.mktemp("rgb-model"), RGB, "rgb-test")


@pytest.fixture(scope="session")
def model_repository(
    tmp_path_factory: pytest.TempPathFactory,
    mnist_model_dir: Path,
    mnist_model_v2_dir: Path,
    rgb_model_dir: Path,
) -> Path:
    """Three models by folder name: alpha and beta (1x28x28, other weights), gamma (3x32x32); and a file
    and a folder without a manifest, which are not models."""
    root = tmp_path_factory.mktemp("repository")
    for name, source in (("alpha", mnist_model_dir), ("beta", mnist_model_v2_dir), ("gamma", rgb_model_dir)):
        shutil.copytree(source, root / name)
    (root / "notes").mkdir()
    (root / "README.txt").write_text("not a model")
    return root


def rewrite_latent_space(
    model_dir: Path, change: Callable[[dict[str, np.ndarray]], None], *, checksum: bool = True
) -> None:
    """Apply `change` to the arrays of model_dir's latent_space.npz in place and write them back; with
    `checksum`, the manifest is updated to the new file's sha256 (otherwise it no longer matches)."""
    import json

    from model.latent_space import LATENT_SPACE_FILENAME
    from model.manifest import sha256_of

    path = model_dir / LATENT_SPACE_FILENAME
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files}
    change(arrays)
    np.savez(path, **arrays)
    if checksum:
        manifest = json.loads((model_dir / "manifest.json").read_text())
        manifest["files"]["latent_space"]["sha256"] = sha256_of(path)
        (model_dir / "manifest.json").write_text(json.dumps(manifest))


def settings_for(model_dir: Path, **overrides: Any) -> Settings:
    """Settings for tests: CPU, one onnxruntime thread, a small batch for quick warm-up."""
    values: dict[str, Any] = {
        "model_dir": model_dir,
        "execution_provider": "cpu",
        "intra_op_threads": 1,
        "max_batch_size": 16,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def make_settings() -> Callable[..., Settings]:
    """settings_for(model_dir, **overrides), for tests that build their own app."""
    return settings_for


@pytest.fixture(scope="session")
def client(mnist_model_dir: Path) -> Iterator[TestClient]:
    """One running app (lifespan entered) serving the 1x28x28 model, shared by the read-only API tests."""
    with TestClient(create_app(settings_for(mnist_model_dir)), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def rgb_client(rgb_model_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(rgb_model_dir)), raise_server_exceptions=False) as test_client:
        yield test_client


class DirectModel:
    """The model run straight through onnxruntime, one call per batch: the reference the API must match."""

    def __init__(self, model_dir: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        cpu = ["CPUExecutionProvider"]
        self.encoder = ort.InferenceSession(str(model_dir / "encoder.onnx"), options, providers=cpu)
        self.decoder = ort.InferenceSession(str(model_dir / "decoder.onnx"), options, providers=cpu)

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, log_var = self.encoder.run(["mean", "log_var"], {"images": images})
        return mean, log_var

    def decode(self, latents: np.ndarray) -> np.ndarray:
        (images,) = self.decoder.run(["images"], {"latents": latents.astype(np.float32)})
        return images


@pytest.fixture(scope="session")
def mnist_direct(mnist_model_dir: Path) -> DirectModel:
    return DirectModel(mnist_model_dir)


@pytest.fixture(scope="session")
def rgb_direct(rgb_model_dir: Path) -> DirectModel:
    return DirectModel(rgb_model_dir)
