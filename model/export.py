"""Turn a trained VAE into a servable model directory: encoder.onnx, decoder.onnx, manifest.json and, when
the caller fitted one, latent_space.npz (training/latent_space.py).

Both graphs are checked with onnx.checker and compared against PyTorch on onnxruntime before the manifest is
written; a model directory with a manifest is therefore always one that passed the parity check. The decoder
returns the images and, as a second output, their pre-sigmoid logits (for exact Bernoulli likelihoods).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime
import torch
from torch import Tensor, nn

from model.latent_space import LATENT_SPACE_FILENAME, LatentSpace, save_latent_space
from model.manifest import (
    MANIFEST_FILENAME,
    ImageSpec,
    Manifest,
    ModelFile,
    ModelFiles,
    TensorNames,
    TrainingData,
    sha256_of,
    write_manifest,
)
from model.pca import Autoencoder
from model.scores import SCORE_REFERENCE_FILENAME, ScoreReference
from model.vae import VAE, VaeConfig

ENCODER_FILENAME = "encoder.onnx"
DECODER_FILENAME = "decoder.onnx"
# Largest allowed max-abs difference between onnxruntime and PyTorch, per output.
PARITY_TOLERANCE = 1e-4
# Batch sizes the parity check runs at; two sizes prove the batch axis is really symbolic.
PARITY_BATCH_SIZES = (1, 37)
DECODER_LOGITS = "logits"
_TENSORS = TensorNames(decoder_logits=DECODER_LOGITS)
_BATCH_DIM_NAME = "batch"


class _SkipTorchvisionNotice(logging.Filter):
    """torch.onnx's op registry logs one "torchvision is not installed" warning per torchvision op it skips;
    these models use no torchvision op, so the notices are noise in every export's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("torchvision is not installed")


logging.getLogger("torch.onnx._internal.exporter._registration").addFilter(_SkipTorchvisionNotice())


class ExportError(Exception):
    """The exported ONNX graphs are invalid or do not reproduce the PyTorch model."""


class _EncoderGraph(nn.Module):
    """What encoder.onnx computes: images (N, C, H, W) in [0, 1] -> mean, log_var (N, latent_dim)."""

    def __init__(self, vae: Autoencoder) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.vae.encode(images)


class _DecoderGraph(nn.Module):
    """What decoder.onnx computes: latents (N, latent_dim) -> images (N, C, H, W) in [0, 1] via sigmoid, and
    the logits they come from.
    """

    def __init__(self, vae: Autoencoder) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.vae.decode(latents)
        return torch.sigmoid(logits), logits


def _export_graph(
    module: nn.Module, example: Tensor, path: Path, input_name: str, output_names: list[str], opset: int
) -> None:
    """Export module with a symbolic batch axis on its input (and so its outputs), weights inline."""
    with warnings.catch_warnings():
        # torch.export's own pytree internals warn about a deprecation that is not ours to fix.
        warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        torch.onnx.export(
            module.eval(),
            (example,),
            str(path),
            input_names=[input_name],
            output_names=output_names,
            opset_version=opset,
            dynamo=True,
            dynamic_shapes={input_name: {0: torch.export.Dim(_BATCH_DIM_NAME)}},
            external_data=False,
            verbose=False,
        )
    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as error:
        raise ExportError(f"{path.name} fails onnx.checker: {error}") from error
    for value in [*model.graph.input, *model.graph.output]:
        batch_dim = value.type.tensor_type.shape.dim[0]
        if not batch_dim.dim_param:
            raise ExportError(f"{path.name}: {value.name!r} has a fixed batch axis ({batch_dim.dim_value})")


def _max_abs_diff(actual: np.ndarray, expected: Tensor) -> float:
    return float(np.max(np.abs(actual - expected.numpy())))


def check_parity(
    vae: Autoencoder, encoder_path: Path, decoder_path: Path, *, seed: int = 0
) -> dict[str, float]:
    """Run both graphs on onnxruntime and PyTorch at PARITY_BATCH_SIZES; returns the worst max-abs diffs.

    Raises ExportError naming the output and the measured diff when one exceeds PARITY_TOLERANCE.
    """
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    encoder = onnxruntime.InferenceSession(str(encoder_path), options, providers=providers)
    decoder = onnxruntime.InferenceSession(str(decoder_path), options, providers=providers)
    generator = torch.Generator().manual_seed(seed)
    worst = {"mean": 0.0, "log_var": 0.0, "images": 0.0, "logits": 0.0}
    for batch_size in PARITY_BATCH_SIZES:
        images = torch.rand((batch_size, *vae.config.image_shape), generator=generator)
        latents = torch.randn((batch_size, vae.config.latent_dim), generator=generator)
        with torch.no_grad():
            mean, log_var = vae.encode(images)
            logits = vae.decode(latents)
        onnx_mean, onnx_log_var = encoder.run(
            [_TENSORS.encoder_mean, _TENSORS.encoder_log_var], {_TENSORS.encoder_input: images.numpy()}
        )
        onnx_images, onnx_logits = decoder.run(
            [_TENSORS.decoder_output, DECODER_LOGITS], {_TENSORS.decoder_input: latents.numpy()}
        )
        for output, actual, expected in (
            ("mean", onnx_mean, mean),
            ("log_var", onnx_log_var, log_var),
            ("images", onnx_images, torch.sigmoid(logits)),
            ("logits", onnx_logits, logits),
        ):
            if actual.shape != tuple(expected.shape):
                raise ExportError(
                    f"onnxruntime {output} has shape {actual.shape} at batch {batch_size}, "
                    f"PyTorch has {tuple(expected.shape)}"
                )
            diff = _max_abs_diff(actual, expected)
            if not diff <= PARITY_TOLERANCE:  # also catches NaN
                raise ExportError(
                    f"onnxruntime {output} differs from PyTorch by max abs {diff:.3g} at batch {batch_size} "
                    f"(tolerance {PARITY_TOLERANCE:g})"
                )
            worst[output] = max(worst[output], diff)
    return worst


def export_model(
    vae: Autoencoder,
    out_dir: Path,
    *,
    name: str,
    version: str,
    likelihood: Literal["bernoulli", "gaussian"],
    training_data: TrainingData,
    test_metrics: dict[str, float],
    opset: int = 18,
    latent_space: LatentSpace | None = None,
    sample_quality: dict[str, Any] | None = None,
    score_reference: ScoreReference | None = None,
    anomaly_detection: dict[str, Any] | None = None,
    observation_std: float | None = None,
    model_kind: Literal["vae", "ae", "pca"] = "vae",
    quality_warnings: tuple[str, ...] = (),
) -> Manifest:
    """Write encoder.onnx, decoder.onnx, manifest.json (and latent_space.npz, score_reference.npz when given)
    to out_dir after a parity check; returns the manifest. observation_std: a gaussian likelihood's std.

    Everything is built and checked in a staging directory first; on any failure out_dir is left untouched.
    """
    if opset < 17:
        raise ExportError(f"opset must be >= 17, got {opset}")
    config = vae.config
    # A CPU eval-mode copy: the caller's module keeps its device and train/eval mode.
    vae = copy.deepcopy(vae).cpu().eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))
    try:
        encoder_path, decoder_path = staging / ENCODER_FILENAME, staging / DECODER_FILENAME
        example_images = torch.rand((2, *config.image_shape), generator=torch.Generator().manual_seed(0))
        example_latents = torch.zeros((2, config.latent_dim))
        tensors = _TENSORS
        _export_graph(
            _EncoderGraph(vae),
            example_images,
            encoder_path,
            tensors.encoder_input,
            [tensors.encoder_mean, tensors.encoder_log_var],
            opset,
        )
        _export_graph(
            _DecoderGraph(vae),
            example_latents,
            decoder_path,
            tensors.decoder_input,
            [tensors.decoder_output, DECODER_LOGITS],
            opset,
        )
        check_parity(vae, encoder_path, decoder_path)
        latent_space_file = None
        if latent_space is not None:
            save_latent_space(staging / LATENT_SPACE_FILENAME, latent_space)
            latent_space_file = ModelFile(
                path=LATENT_SPACE_FILENAME, sha256=sha256_of(staging / LATENT_SPACE_FILENAME)
            )
        reference_file = None
        if score_reference is not None:
            score_reference.save(staging / SCORE_REFERENCE_FILENAME)
            reference_file = ModelFile(
                path=SCORE_REFERENCE_FILENAME, sha256=sha256_of(staging / SCORE_REFERENCE_FILENAME)
            )
        manifest = Manifest(
            name=name,
            version=version,
            created_at=datetime.now(UTC),
            image=ImageSpec(
                channels=config.image_shape[0], height=config.image_shape[1], width=config.image_shape[2]
            ),
            latent_dim=config.latent_dim,
            likelihood=likelihood,
            observation_std=observation_std if likelihood == "gaussian" else None,
            tensors=tensors,
            training_data=training_data,
            test_metrics=test_metrics,
            opset=opset,
            package_versions={
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
                "numpy": np.__version__,
            },
            files=ModelFiles(
                encoder=ModelFile(path=ENCODER_FILENAME, sha256=sha256_of(encoder_path)),
                decoder=ModelFile(path=DECODER_FILENAME, sha256=sha256_of(decoder_path)),
                latent_space=latent_space_file,
                score_reference=reference_file,
            ),
            sample_quality=sample_quality,
            anomaly_detection=anomaly_detection,
            model_kind=model_kind,
            quality_warnings=quality_warnings,
        )
        # Drop any previous manifest first, so a crash mid-move never leaves one naming the wrong files.
        (out_dir / MANIFEST_FILENAME).unlink(missing_ok=True)
        (out_dir / LATENT_SPACE_FILENAME).unlink(missing_ok=True)
        (out_dir / SCORE_REFERENCE_FILENAME).unlink(missing_ok=True)
        os.replace(encoder_path, out_dir / ENCODER_FILENAME)
        os.replace(decoder_path, out_dir / DECODER_FILENAME)
        for named, filename in (
            (latent_space_file, LATENT_SPACE_FILENAME),
            (reference_file, SCORE_REFERENCE_FILENAME),
        ):
            if named is not None:
                os.replace(staging / filename, out_dir / filename)
        write_manifest(out_dir, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def export_untrained(
    out_dir: Path, config: VaeConfig, *, seed: int = 0, name: str = "untrained", version: str = "0"
) -> Manifest:
    """Export a randomly initialised VAE(config) (torch.manual_seed(seed)): tiny, valid models for tests."""
    torch.manual_seed(seed)
    vae = VAE(config)
    return export_model(
        vae,
        out_dir,
        name=name,
        version=version,
        likelihood="bernoulli",
        training_data=TrainingData(name="none", train_size=0, validation_size=0, test_size=0),
        test_metrics={},
        opset=18,
    )
