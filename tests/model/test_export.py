"""ONNX export: graph contract, parity with PyTorch, manifest integrity and failure modes."""

from __future__ import annotations

import functools
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import Tensor

import model.export
from model.export import ExportError, export_untrained
from model.latent_space import LATENT_SPACE_FILENAME, GaussianMixture, LatentSpace, load_latent_space
from model.manifest import (
    ManifestError,
    TrainingData,
    load_model_dir,
    read_manifest,
    sha256_of,
    verify_files,
    write_manifest,
)

if TYPE_CHECKING:  # conftest is not importable at runtime under --import-mode=importlib
    from conftest import ExportedModel

BATCH_SIZES = (1, 37)


@pytest.fixture(params=["rgb", "gray"])
def exported(request: pytest.FixtureRequest) -> ExportedModel:
    model: ExportedModel = request.getfixturevalue(f"{request.param}_model")
    return model


def _session(path: Path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _max_abs_diff(actual: np.ndarray, expected: Tensor) -> float:
    return float(np.max(np.abs(actual - expected.numpy())))


def _shape(value: onnx.ValueInfoProto) -> list[str | int]:
    return [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]


def test_graphs_have_the_contract_names_and_a_symbolic_batch_axis(exported: ExportedModel) -> None:
    channels, height, width = exported.vae.config.image_shape
    latent_dim = exported.vae.config.latent_dim
    encoder = onnx.load(str(exported.model_dir / "encoder.onnx"))
    decoder = onnx.load(str(exported.model_dir / "decoder.onnx"))
    assert [(v.name, _shape(v)) for v in encoder.graph.input] == [
        ("images", ["batch", channels, height, width])
    ]
    assert [(v.name, _shape(v)) for v in encoder.graph.output] == [
        ("mean", ["batch", latent_dim]),
        ("log_var", ["batch", latent_dim]),
    ]
    assert [(v.name, _shape(v)) for v in decoder.graph.input] == [("latents", ["batch", latent_dim])]
    assert [(v.name, _shape(v)) for v in decoder.graph.output] == [
        ("images", ["batch", channels, height, width]),
        ("logits", ["batch", channels, height, width]),
    ]
    # Weights are inline, sampling stays out of the graphs, the decoder ends in a sigmoid.
    assert sorted(path.name for path in exported.model_dir.iterdir()) == [
        "decoder.onnx",
        "encoder.onnx",
        "manifest.json",
    ]
    for graph in (encoder, decoder):
        assert not {"RandomNormal", "RandomNormalLike", "RandomUniform"} & {
            n.op_type for n in graph.graph.node
        }
        assert all(t.data_location == onnx.TensorProto.DEFAULT for t in graph.graph.initializer)
        assert graph.opset_import[0].version == 18
    images_producer = next(node for node in decoder.graph.node if "images" in node.output)
    assert images_producer.op_type == "Sigmoid"


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_onnxruntime_matches_pytorch(exported: ExportedModel, batch_size: int) -> None:
    generator = torch.Generator().manual_seed(batch_size)
    images = torch.rand((batch_size, *exported.vae.config.image_shape), generator=generator)
    latents = 3 * torch.randn((batch_size, exported.vae.config.latent_dim), generator=generator)
    with torch.no_grad():
        mean, log_var = exported.vae.encode(images)
        logits = exported.vae.decode(latents)
        decoded = torch.sigmoid(logits)
    onnx_mean, onnx_log_var = _session(exported.model_dir / "encoder.onnx").run(
        None, {"images": images.numpy()}
    )
    onnx_images, onnx_logits = _session(exported.model_dir / "decoder.onnx").run(
        None, {"latents": latents.numpy()}
    )
    assert onnx_mean.shape == onnx_log_var.shape == (batch_size, exported.vae.config.latent_dim)
    assert onnx_images.shape == (batch_size, *exported.vae.config.image_shape)
    assert onnx_images.dtype == np.float32
    assert _max_abs_diff(onnx_mean, mean) <= 1e-4
    assert _max_abs_diff(onnx_log_var, log_var) <= 1e-4
    assert _max_abs_diff(onnx_images, decoded) <= 1e-4
    # The logits are the decoder's own, not a logit of the rounded images: exact where sigmoid saturates.
    assert _max_abs_diff(onnx_logits, logits) <= 1e-4
    assert onnx_images.min() >= 0.0
    assert onnx_images.max() <= 1.0


def test_encoder_graph_clamps_log_var(gray_model: ExportedModel) -> None:
    config = gray_model.vae.config
    images = np.random.default_rng(0).random((5, *config.image_shape), dtype=np.float32)
    _, log_var = _session(gray_model.model_dir / "encoder.onnx").run(None, {"images": images})
    # The fixture sets the raw log_var biases of units 0 and 1 to +60 and -60.
    assert log_var[:, 0].tolist() == [config.log_var_max] * 5
    assert log_var[:, 1].tolist() == [config.log_var_min] * 5


def test_manifest_fields_and_round_trip(gray_model: ExportedModel, tmp_path: Path) -> None:
    manifest = gray_model.manifest
    assert read_manifest(gray_model.model_dir) == manifest
    assert (manifest.name, manifest.version, manifest.likelihood) == ("gray-test", "1.2.3", "gaussian")
    assert manifest.image.shape == (1, 28, 28)
    assert manifest.latent_dim == 4
    assert manifest.opset == 18
    assert (
        manifest.created_at.utcoffset() is not None and manifest.created_at.utcoffset().total_seconds() == 0
    )
    assert manifest.training_data == TrainingData(
        name="synthetic", train_size=10, validation_size=2, test_size=3
    )
    assert manifest.test_metrics == {"negative_elbo": 123.5, "active_units": 2.0}
    assert manifest.package_versions == {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }
    assert manifest.files.encoder.sha256 == sha256_of(gray_model.model_dir / "encoder.onnx")
    assert manifest.files.decoder.sha256 == sha256_of(gray_model.model_dir / "decoder.onnx")
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest


def test_flipped_byte_fails_the_checksum(rgb_model: ExportedModel, tmp_path: Path) -> None:
    model_dir = Path(shutil.copytree(rgb_model.model_dir, tmp_path / "model"))
    assert load_model_dir(model_dir)[0] == rgb_model.manifest
    encoder_path = model_dir / "encoder.onnx"
    data = bytearray(encoder_path.read_bytes())
    data[len(data) // 2] ^= 0x01
    encoder_path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"encoder file encoder\.onnx has sha256"):
        verify_files(model_dir, rgb_model.manifest)


def test_missing_decoder_fails(rgb_model: ExportedModel, tmp_path: Path) -> None:
    model_dir = Path(shutil.copytree(rgb_model.model_dir, tmp_path / "model"))
    (model_dir / "decoder.onnx").unlink()
    with pytest.raises(ManifestError, match=r"decoder file decoder\.onnx .* is missing"):
        verify_files(model_dir, rgb_model.manifest)


def test_parity_failure_raises_and_keeps_the_old_model(
    rgb_model: ExportedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A decoder graph that forgets the sigmoid exports and passes onnx.checker, but returns logits.
    monkeypatch.setattr(
        model.export._DecoderGraph, "forward", lambda self, latents: (self.vae.decode(latents),) * 2
    )
    model_dir = Path(shutil.copytree(rgb_model.model_dir, tmp_path / "model"))
    with pytest.raises(
        ExportError, match=r"onnxruntime images differs from PyTorch by max abs \d.* at batch 1"
    ):
        export_untrained(model_dir, rgb_model.vae.config, seed=1, name="broken")
    # The previous export is untouched and still verifies; no staging directory is left behind.
    assert load_model_dir(model_dir)[0] == rgb_model.manifest
    assert sorted(path.name for path in model_dir.iterdir()) == [
        "decoder.onnx",
        "encoder.onnx",
        "manifest.json",
    ]


def test_same_seed_exports_the_same_bytes(rgb_model: ExportedModel, tmp_path: Path) -> None:
    manifest = export_untrained(tmp_path, rgb_model.vae.config, seed=0)
    assert manifest.files == rgb_model.manifest.files
    for name in ("encoder.onnx", "decoder.onnx"):
        assert (tmp_path / name).read_bytes() == (rgb_model.model_dir / name).read_bytes()


def test_opset_below_17_is_refused(rgb_model: ExportedModel, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="opset must be >= 17, got 16"):
        model.export.export_model(
            rgb_model.vae,
            tmp_path,
            name="old",
            version="1",
            likelihood="bernoulli",
            training_data=TrainingData(name="none", train_size=0, validation_size=0, test_size=0),
            test_metrics={},
            opset=16,
        )
    assert list(tmp_path.iterdir()) == []


def test_the_latent_space_file_is_written_checksummed_and_replaced(
    rgb_model: ExportedModel, tmp_path: Path
) -> None:
    """Export with a description writes latent_space.npz and names it; an export without one removes it."""
    dim = rgb_model.vae.config.latent_dim
    description = LatentSpace(
        aggregate_mean=np.zeros(dim),
        aggregate_std=np.ones(dim),
        test_kl_per_dim=np.ones(dim),
        test_mean_variance=np.ones(dim),
        prior=GaussianMixture(np.ones(1), np.zeros((1, dim)), np.eye(dim)[None]),
    )
    export = functools.partial(
        model.export.export_model,
        rgb_model.vae,
        tmp_path,
        name="described",
        version="2",
        likelihood="bernoulli",
        training_data=TrainingData(name="none", train_size=0, validation_size=0, test_size=0),
        test_metrics={},
    )
    manifest = export(latent_space=description, sample_quality={"priors": {"gmm": {"confident_share": 0.5}}})
    assert manifest.schema_version == 2 and manifest.tensors.decoder_logits == "logits"
    assert manifest.files.latent_space is not None
    assert manifest.files.latent_space.sha256 == sha256_of(tmp_path / LATENT_SPACE_FILENAME)
    assert read_manifest(tmp_path).sample_quality == {"priors": {"gmm": {"confident_share": 0.5}}}
    assert load_model_dir(tmp_path)[1]["latent_space"] == tmp_path / LATENT_SPACE_FILENAME
    loaded = load_latent_space(tmp_path / LATENT_SPACE_FILENAME, dim)
    assert loaded.prior is not None and loaded.prior.components == 1
    assert export().files.latent_space is None
    assert not (tmp_path / LATENT_SPACE_FILENAME).exists()


def test_torchvision_notices_are_dropped_at_their_source(caplog: pytest.LogCaptureFixture) -> None:
    # torch.onnx's registry logs these once per process, on the first export, whoever triggers it.
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    registry.addHandler(caplog.handler)  # torch's loggers need not propagate to the root
    try:
        registry.warning("torchvision is not installed. Skipping %s", "torchvision::nms")
        registry.warning("some other registry warning")
    finally:
        registry.removeHandler(caplog.handler)
    assert [record.getMessage() for record in caplog.records] == ["some other registry warning"]
