"""`vae-compare` on a tiny subset: three runs, one table row each, pictures, shipped model directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from model.manifest import load_model_dir
from training.compare import KINDS, compare_main

TINY_RUN = [
    "--max-train-images=100",
    "--validation-size=40",
    "--latent-dim=4",
    "--widths=4,8",
    "--hidden-dim=16",
    "--epochs=1",
    "--judge-epochs=1",
    "--eval-samples=2",
    "--iwae-samples=4",
    "--num-threads=1",
    "--no-progress",
    "--allow-weak-model",  # one epoch of a tiny network; the guardrail has its own tests
]


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny vae-compare run: its out dir holds compare/, docs/ and ship/."""
    root = tmp_path_factory.mktemp("compare")
    arguments = ["--out-dir", str(root / "compare"), "--docs-dir", str(root / "docs")]
    assert compare_main([*arguments, "--ship-dir", str(root / "ship"), *TINY_RUN]) == 0
    return root


def test_compare_trains_measures_and_ships_the_three_kinds(compared: Path) -> None:
    out, docs, ship = compared / "compare", compared / "docs", compared / "ship"

    report = json.loads((out / "comparison.json").read_text())
    assert list(report["models"]) == list(KINDS)
    for kind, row in report["models"].items():
        assert row["model_kind"] == kind
        assert set(row["priors"]) == {"standard", "gmm"}
        for prior in row["priors"].values():
            assert 0 <= prior["confident_share"] <= 1 and prior["frechet_distance"] >= 0
            low, high = prior["class_share_range"]
            assert 0 <= low <= high <= 1
        assert 0 <= row["interpolation_confident_share"] <= 1
        assert row["standard_nearest_digit_rmse"] > 0
    # PCA is fitted in closed form: its reconstruction is the clipped optimum, at most PCA's own error.
    pca = report["models"]["pca"]
    assert pca["reconstruction_mse"] <= pca["pca_mse"] + 1e-6

    table = (docs / "comparison.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == ["PCA", "autoencoder", "VAE"]
    for kind in KINDS:
        with Image.open(docs / "images" / f"compare-{kind}.png") as picture:
            assert picture.size == (2 * 8 * 30, 2 * 4 * 30)  # 4 rows of 8 28x28 digits, 1-pixel borders
    for kind in ("pca", "ae"):
        manifest, _ = load_model_dir(ship / f"mnist-{kind}")
        assert manifest.model_kind == kind and manifest.name == f"mnist-{kind}"
    assert not (ship / "mnist-vae").exists()  # the VAE ships as model/default


def test_compare_can_measure_an_exported_vae_instead_of_training_it(compared: Path, tmp_path: Path) -> None:
    first, second = compared / "compare", tmp_path / "second"
    arguments = ["--out-dir", str(second), "--reuse-vae", str(first / "vae" / "model")]
    assert compare_main([*arguments, *TINY_RUN]) == 0
    assert not (second / "vae" / "checkpoint.pt").exists()  # measured, not trained
    rows = [json.loads((out / "comparison.json").read_text())["models"] for out in (first, second)]
    assert rows[0] == rows[1]  # the same three models measured the same way: deterministic
