"""The model manifest: what a served model directory holds and promises.

Torch-free on purpose: the offline exporter writes it and the service reads it with the same schema.
A model directory is `encoder.onnx`, `decoder.onnx` and `manifest.json` side by side; from schema version 2
on, also `latent_space.npz` (model/latent_space.py) when the exporter had data to describe the latent space.
Version-1 manifests still load: they simply name no latent-space file and no decoder logits.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

SCHEMA_VERSION: Literal[2] = 2
MANIFEST_FILENAME = "manifest.json"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default"


class ManifestError(Exception):
    """A model directory is unusable: missing files, an invalid manifest or a checksum mismatch."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageSpec(_Strict):
    """The images the encoder takes and the decoder returns: (N, channels, height, width) float32."""

    channels: Literal[1, 3]
    height: int = Field(ge=4, multiple_of=4)
    width: int = Field(ge=4, multiple_of=4)
    value_range: tuple[float, float] = (0.0, 1.0)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


class TensorNames(_Strict):
    """Names of the graph inputs and outputs in the two ONNX files."""

    encoder_input: str = "images"
    encoder_mean: str = "mean"
    encoder_log_var: str = "log_var"
    decoder_input: str = "latents"
    decoder_output: str = "images"
    # The decoder's pre-sigmoid logits, a second output for exact Bernoulli likelihoods (schema 2 on).
    decoder_logits: str | None = None


class TrainingData(_Strict):
    """Which data the model was trained on, and the sizes of the splits."""

    name: str
    train_size: int = Field(ge=0)
    validation_size: int = Field(ge=0)
    test_size: int = Field(ge=0)


class ModelFile(_Strict):
    """One file of the model (ONNX graph or latent-space description), relative to the model directory."""

    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("path")
    @classmethod
    def _plain_file_name(cls, value: str) -> str:
        if Path(value).name != value or value in {"", ".", ".."}:
            raise ValueError(f"must be a file name inside the model directory, got {value!r}")
        return value


class ModelFiles(_Strict):
    encoder: ModelFile
    decoder: ModelFile
    latent_space: ModelFile | None = None  # schema 2 on, when the exporter described the latent space
    score_reference: ModelFile | None = None  # schema 2 on: test-split score quantiles (model/scores.py)


class Manifest(_Strict):
    """Everything the service needs to know about a model, and what was measured when it was made."""

    schema_version: Literal[1, 2] = SCHEMA_VERSION
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    created_at: datetime
    image: ImageSpec
    latent_dim: int = Field(ge=1)
    likelihood: Literal["bernoulli", "gaussian"]
    # The fixed std of a gaussian likelihood's pixels (schema 2 on), so scores can be computed exactly.
    observation_std: float | None = Field(default=None, gt=0)
    tensors: TensorNames = TensorNames()
    training_data: TrainingData
    # Metrics on the held-out test split, e.g. negative_elbo (nats/image), reconstruction_mse, active_units.
    test_metrics: dict[str, float]
    opset: int = Field(ge=17)
    package_versions: dict[str, str]
    files: ModelFiles
    # How good samples from each prior are, as the exporter measured them (training/sample_quality.py).
    sample_quality: dict[str, Any] | None = None
    # The anomaly score's AUROC against synthetic out-of-distribution sets (training/anomaly.py).
    anomaly_detection: dict[str, Any] | None = None
    # The kind of encoder-decoder (vae-train --model): a VAE, a deterministic autoencoder, or PCA. The last
    # two encode an image to a point: their log_var is a constant floor, not a learned uncertainty.
    model_kind: Literal["vae", "ae", "pca"] = "vae"
    # Why vae-train judged the model weak (no active latent unit, no better than PCA). Such a model is only
    # exported with --allow-weak-model, and the service logs these when it loads it.
    quality_warnings: tuple[str, ...] = ()


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(model_dir: Path, manifest: Manifest) -> Path:
    """Write `manifest.json` into model_dir; returns its path."""
    path = model_dir / MANIFEST_FILENAME
    path.write_text(manifest.model_dump_json(indent=2) + "\n")
    return path


def read_manifest(model_dir: Path) -> Manifest:
    """Parse model_dir/manifest.json; raises ManifestError saying what is wrong."""
    path = model_dir / MANIFEST_FILENAME
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST_FILENAME} in model directory {model_dir}")
    try:
        return Manifest.model_validate(json.loads(path.read_text()))
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path} is not valid JSON: {error}") from error
    except ValidationError as error:
        raise ManifestError(f"{path} does not match the manifest schema: {error}") from error


def verify_files(model_dir: Path, manifest: Manifest) -> dict[str, Path]:
    """Check each file exists and matches its sha256; returns {"encoder": path, "decoder": path} and
    "latent_space" and "score_reference" when the manifest names them.
    """
    paths: dict[str, Path] = {}
    files = manifest.files
    entries = [("encoder", files.encoder), ("decoder", files.decoder)]
    if files.latent_space is not None:
        entries.append(("latent_space", files.latent_space))
    if files.score_reference is not None:
        entries.append(("score_reference", files.score_reference))
    for part, entry in entries:
        path = model_dir / entry.path
        if not path.is_file():
            raise ManifestError(f"{part} file {entry.path} named in the manifest is missing from {model_dir}")
        actual = sha256_of(path)
        if actual != entry.sha256:
            raise ManifestError(
                f"{part} file {entry.path} has sha256 {actual}, but the manifest says {entry.sha256}"
            )
        paths[part] = path
    return paths


def load_model_dir(model_dir: Path) -> tuple[Manifest, dict[str, Path]]:
    """Read and verify a model directory: the manifest and the checked paths of its files."""
    manifest = read_manifest(model_dir)
    return manifest, verify_files(model_dir, manifest)
