"""What keeps a newcomer from serving a broken model: the weak-model check, truthful config.json, the
schedule scaled to the dataset, epoch logs, and the three model kinds (pca, ae, vae) served end to end."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.main import create_app
from model.manifest import load_model_dir
from training.cli import WEAK_MODEL_EXIT, train_main
from training.config import FIELD_HELP, TARGET_UPDATES, TrainConfig, resolve_schedule
from training.data import load_mnist


def test_a_collapsed_model_fails_with_advice_and_is_not_exported(
    tmp_path: Path, tiny_flags: Callable[..., list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    # One epoch of three updates at full KL weight from the start: collapsed, and far from PCA.
    flags = tiny_flags(epochs=1, kl_warmup_epochs=0, allow_weak_model=False, latent_space=False)
    assert train_main(["--run-dir", str(tmp_path / "run"), *flags]) == WEAK_MODEL_EXIT
    log = capsys.readouterr().err
    assert "WEAK MODEL: no active latent unit" in log and "WEAK MODEL: reconstruction MSE" in log
    assert "Not exported" in log and "--free-bits" in log
    assert not (tmp_path / "run" / "model").exists()


def test_allow_weak_model_exports_it_marked_and_the_service_warns(
    tmp_path: Path, tiny_flags: Callable[..., list[str]], caplog: pytest.LogCaptureFixture
) -> None:
    flags = tiny_flags(epochs=1, kl_warmup_epochs=0, latent_space=False)
    assert train_main(["--run-dir", str(tmp_path), *flags]) == 0
    manifest, _ = load_model_dir(tmp_path / "model")
    assert manifest.quality_warnings and "PCA" in manifest.quality_warnings[-1]
    app = create_app(Settings(model_dir=tmp_path / "model", _env_file=None))
    with caplog.at_level(logging.WARNING, logger="app.engine"), TestClient(app) as client:
        assert client.get("/readyz").status_code == 200
        assert client.get("/model").json()["manifest"]["quality_warnings"] == list(manifest.quality_warnings)
    assert any("is weak" in record.getMessage() for record in caplog.records)


def test_schedule_scales_to_the_dataset_and_config_json_records_what_ran(
    tmp_path: Path, tiny_flags: Callable[..., list[str]]
) -> None:
    # The shipped recipe's length, from the defaults alone: 4,000 digits in batches of 32 -> 100 epochs.
    recipe = resolve_schedule(TrainConfig(), 4000)
    assert (recipe.epochs, recipe.kl_warmup_epochs, recipe.early_stopping_patience) == (100, 5, 15)
    small = resolve_schedule(TrainConfig(), 240)  # a folder of 300 images: 8 updates per epoch
    assert small.epochs == math.ceil(TARGET_UPDATES / 8) and small.early_stopping_patience == 234
    assert resolve_schedule(TrainConfig(epochs=15), 240).kl_warmup_epochs == 1  # given epochs are kept

    folder = tmp_path / "digits"
    folder.mkdir()
    for index, digit in enumerate(load_mnist().images[:60]):
        Image.fromarray((digit[0] * 255).astype(np.uint8)).save(folder / f"{index}.png")
    flags = tiny_flags(epochs=1, validation_size=500, latent_space=False)
    assert train_main(["--run-dir", str(tmp_path / "run"), *flags, "--dataset", str(folder)]) == 0
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    manifest, _ = load_model_dir(tmp_path / "run" / "model")
    assert recorded["validation_size"] == manifest.training_data.validation_size == 6  # 10% of 60, not 500
    assert (recorded["epochs"], recorded["kl_warmup_epochs"], recorded["early_stopping_patience"]) == (
        1,
        1,
        3,
    )


def test_metrics_have_kl_per_dimension_and_a_log_gets_one_line_per_epoch(
    tmp_path: Path, tiny_flags: Callable[..., list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    flags = tiny_flags(epochs=2, progress=True, latent_space=False)
    assert train_main(["--run-dir", str(tmp_path), *flags]) == 0
    log = capsys.readouterr().err
    epoch_lines = [line for line in log.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2 and "\r" not in log  # pytest's stderr is no terminal: no redrawn bars
    assert "active " in epoch_lines[0] and "kl_per_dim " in epoch_lines[0]
    history = json.loads((tmp_path / "metrics.json").read_text())
    kl = [history[-1][f"validation_kl_dim_{dim}"] for dim in range(4)]
    assert sum(kl) == pytest.approx(
        history[-1]["validation_kl"], rel=1e-4
    )  # the per-image KL, split by dimension
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {f"validation_kl_dim_{dim}" for dim in range(4)} <= set(header)


def test_help_describes_every_flag_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        train_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, description in FIELD_HELP.items():
        flag = "--" + name.replace("_", "-")
        assert flag in text
        assert " ".join(description.split()) in text.replace("%%", "%"), name
    assert "(default: 32)" in text and "(default: vae)" in text  # batch size, model kind


@pytest.mark.parametrize("kind", ["pca", "ae"])
def test_pca_and_autoencoder_export_and_serve(
    kind: str, tmp_path: Path, tiny_flags: Callable[..., list[str]]
) -> None:
    flags = tiny_flags(epochs=1, model=kind, model_name=f"mnist-{kind}")
    assert train_main(["--run-dir", str(tmp_path), *flags]) == 0
    manifest, paths = load_model_dir(tmp_path / "model")
    assert manifest.model_kind == kind and "latent_space" in paths and "score_reference" in paths
    if kind == "pca":
        assert manifest.quality_warnings == ()  # PCA is its own baseline, and all its units are active
    digit = load_mnist().images[0]
    with TestClient(create_app(Settings(model_dir=tmp_path / "model", _env_file=None))) as client:
        posterior = client.post("/encode", files={"file": ("d.png", _png(digit))})
        assert posterior.status_code == 200, posterior.text
        (item,) = posterior.json()["items"]
        np.testing.assert_allclose(item["std"], math.exp(0.5 * -12.0), rtol=1e-4)  # the point floor
        for prior in ("standard", "gmm"):
            sampled = client.get(f"/sample?n=3&seed=0&prior={prior}&format=array")
            assert sampled.status_code == 200 and len(sampled.json()["images"]) == 3
        assert client.post("/reconstruct", files={"file": ("d.png", _png(digit))}).status_code == 200
        assert client.get("/model").json()["manifest"]["model_kind"] == kind


def _png(image: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray((image[0] * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
