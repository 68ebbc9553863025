"""End to end through the vae-train / vae-export entry points on a tiny model and a small MNIST subset."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from model.latent_space import LATENT_SPACE_FILENAME, load_latent_space
from model.manifest import load_model_dir
from model.scores import SCORE_REFERENCE_FILENAME, ScoreReference
from training.cli import export_main, train_main
from training.config import TrainConfig
from training.data import load_dataset
from training.train import CHECKPOINT_FILENAME, STEPS_CSV, Trainer, load_checkpoint

RUN_FILES = [
    "checkpoint.pt",
    "config.json",
    "interpolation.png",
    "latents_pca.png",
    "loss_curves.png",
    "metrics.csv",
    "metrics.json",
    "prior_samples.png",
    "reconstructions.png",
    "steps.csv",
    "test_metrics.json",
]
METRIC_KEYS = [
    "active_units",
    "active_units_fraction",
    "iwae_bound",
    "kl",
    "negative_elbo",
    "pca_mse",
    "reconstruction_mse",
    "reconstruction_nll",
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, tiny_flags: Callable[..., list[str]]) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    assert train_main(["--run-dir", str(run_dir), *tiny_flags(epochs=1, model_version="0.1.0")]) == 0
    return run_dir


def _run_onnx_pair(model_dir: Path) -> None:
    manifest, paths = load_model_dir(model_dir)
    encoder = onnxruntime.InferenceSession(str(paths["encoder"]), providers=["CPUExecutionProvider"])
    decoder = onnxruntime.InferenceSession(str(paths["decoder"]), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    mean, log_var = encoder.run(["mean", "log_var"], {"images": images})
    assert mean.shape == log_var.shape == (3, manifest.latent_dim)
    (decoded,) = decoder.run(["images"], {"latents": mean})
    assert decoded.shape == (3, 1, 28, 28)
    assert decoded.min() >= 0.0 and decoded.max() <= 1.0


def test_train_writes_run_artefacts_and_a_loadable_onnx_pair(trained_run: Path) -> None:
    assert sorted(p.name for p in trained_run.iterdir() if p.is_file()) == RUN_FILES
    history = json.loads((trained_run / "metrics.json").read_text())
    assert [row["epoch"] for row in history] == [1]
    csv_lines = (trained_run / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].split(",")[:3] == ["epoch", "beta", "learning_rate"]
    assert len(csv_lines) == 2
    assert all(
        (trained_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        for name in RUN_FILES
        if name.endswith(".png")
    )

    manifest, _ = load_model_dir(trained_run / "model")
    assert (manifest.name, manifest.version, manifest.latent_dim) == ("mnist-vae", "0.1.0", 4)
    assert manifest.training_data.model_dump() == {
        "name": "mnist",
        "train_size": 48,
        "validation_size": 40,
        "test_size": 500,
    }
    assert sorted(manifest.test_metrics) == METRIC_KEYS
    assert manifest.test_metrics == json.loads((trained_run / "test_metrics.json").read_text())
    _run_onnx_pair(trained_run / "model")
    # The latent-space description and, MNIST being labelled, the sample-quality table.
    assert manifest.files.latent_space is not None
    space = load_latent_space(trained_run / "model" / LATENT_SPACE_FILENAME, 4)
    assert space.labels == tuple("0123456789") and space.prior is not None
    assert manifest.sample_quality is not None
    assert set(manifest.sample_quality["priors"]) == {"standard", "gmm"}
    assert set(manifest.sample_quality["label_accuracy"]["per_label"]) == set(space.labels)
    # The score reference and the anomaly report, calibrated with the latent-density test.
    reference = ScoreReference.load(trained_run / "model" / SCORE_REFERENCE_FILENAME)
    assert reference.size == 500 and "latent_nll" in reference.names
    assert manifest.anomaly_detection is not None and manifest.observation_std is None
    assert len(manifest.anomaly_detection["synthetic_sets"]) == 6


def test_no_latent_space_flag_exports_without_one(
    tmp_path: Path, tiny_flags: Callable[..., list[str]]
) -> None:
    flags = tiny_flags(epochs=1, latent_space=False)
    assert train_main(["--run-dir", str(tmp_path), *flags]) == 0
    manifest, paths = load_model_dir(tmp_path / "model")
    assert manifest.files.latent_space is None and manifest.sample_quality is None
    assert "latent_space" not in paths


def test_export_reevaluates_and_reproduces_the_metrics(trained_run: Path, tmp_path: Path) -> None:
    assert export_main([str(trained_run / CHECKPOINT_FILENAME), str(tmp_path), "--version", "9"]) == 0
    manifest, _ = load_model_dir(tmp_path)
    original, _ = load_model_dir(trained_run / "model")
    assert manifest.version == "9"
    assert manifest.test_metrics == original.test_metrics  # same seed, same weights, same test split
    _run_onnx_pair(tmp_path)


def test_export_reuses_stored_metrics_when_the_dataset_is_gone(trained_run: Path, tmp_path: Path) -> None:
    checkpoint = load_checkpoint(trained_run / CHECKPOINT_FILENAME)
    checkpoint["train_config"]["dataset"] = str(tmp_path / "missing.npz")
    torch.save(checkpoint, tmp_path / "moved.pt")
    assert export_main([str(tmp_path / "moved.pt"), str(tmp_path / "model")]) == 0
    manifest, _ = load_model_dir(tmp_path / "model")
    assert manifest.test_metrics == checkpoint["test_metrics"]


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in trainer.model.state_dict().items()}


def test_same_seed_same_result_and_resume_continues_exactly(tiny_config: TrainConfig, tmp_path: Path) -> None:
    splits = load_dataset(tiny_config)
    straight = Trainer(tiny_config, splits, tmp_path / "straight")
    (tmp_path / "straight").mkdir()
    straight.fit()
    repeat = Trainer(tiny_config, splits, tmp_path / "repeat")
    (tmp_path / "repeat").mkdir()
    repeat.fit()
    assert (
        straight.state.history[-1]["validation_negative_elbo"]
        == repeat.state.history[-1]["validation_negative_elbo"]
    )
    assert all(
        torch.equal(a, b) for a, b in zip(_weights(straight).values(), _weights(repeat).values(), strict=True)
    )

    (tmp_path / "chunked").mkdir()
    interrupted = Trainer(tiny_config, splits, tmp_path / "chunked")
    interrupted.fit(stop_after_epoch=1)
    assert interrupted.state.epochs_done == 1
    # As if it had crashed after epoch 2's updates, before their checkpoint: the resumed run redoes them.
    straight_steps = (tmp_path / "straight" / STEPS_CSV).read_text()
    (tmp_path / "chunked" / STEPS_CSV).write_text(straight_steps)
    resumed = Trainer(tiny_config, splits, tmp_path / "chunked")
    resumed.resume()
    assert resumed.state.epochs_done == 1
    resumed.fit()
    assert resumed.state.epochs_done == 2
    assert (tmp_path / "chunked" / STEPS_CSV).read_text() == straight_steps
    drop = ("seconds",)
    strip = [{k: v for k, v in row.items() if k not in drop} for row in resumed.state.history]
    expected = [{k: v for k, v in row.items() if k not in drop} for row in straight.state.history]
    assert strip == expected
    assert all(
        torch.equal(a, b)
        for a, b in zip(_weights(straight).values(), _weights(resumed).values(), strict=True)
    )


def test_cli_resume_of_a_finished_run_trains_no_further(trained_run: Path, tmp_path: Path) -> None:
    before = json.loads((trained_run / "metrics.json").read_text())
    export_dir = tmp_path / "again"
    assert (
        train_main(
            ["--run-dir", str(trained_run), "--resume", "--export-dir", str(export_dir), "--no-progress"]
        )
        == 0
    )
    assert json.loads((trained_run / "metrics.json").read_text()) == before
    assert load_model_dir(export_dir)[0].test_metrics == load_model_dir(trained_run / "model")[0].test_metrics


def test_cli_resume_refuses_a_changed_configuration(trained_run: Path) -> None:
    with pytest.raises(SystemExit):
        train_main(["--run-dir", str(trained_run), "--resume", "--latent-dim", "5"])
