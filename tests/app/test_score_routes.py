"""POST /score through the app: the scores against model/scores.py run directly, seeds, limits, errors."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.main import create_app
from model.manifest import sha256_of
from model.scores import SCORE_NAMES, ScoreReference, calibrated_reference, posterior_draws, score_images
from tests.app.conftest import DirectModel

LATENT_DIM = 16


def png(seed: int, size: int = 28) -> bytes:
    pixels = (np.random.default_rng(seed).random((size, size)) > 0.7).astype(np.uint8) * 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def as_array(blob: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(blob)), dtype=np.float32)[None, None] / 255


@pytest.fixture(scope="module")
def reference_model_dir(
    mnist_model_dir: Path, mnist_direct: DirectModel, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The mnist-test model with a score reference: its own scores of 200 random images like png()'s."""
    model_dir = Path(shutil.copytree(mnist_model_dir, tmp_path_factory.mktemp("scored") / "model"))
    images = np.concatenate([as_array(png(1000 + index)) for index in range(200)])
    scores = expected_scores(mnist_direct, images, k=16, seed=0)
    calibrated_reference(scores, samples=16).save(model_dir / "score_reference.npz")
    manifest = json.loads((model_dir / "manifest.json").read_text())
    manifest["files"]["score_reference"] = {
        "path": "score_reference.npz",
        "sha256": sha256_of(model_dir / "score_reference.npz"),
    }
    (model_dir / "manifest.json").write_text(json.dumps(manifest))
    return model_dir


@pytest.fixture(scope="module")
def scored(reference_model_dir: Path, make_settings: Callable[..., Settings]) -> TestClient:
    with TestClient(
        create_app(make_settings(reference_model_dir, max_score_samples=64, max_score_decodes=200)),
        raise_server_exceptions=False,
    ) as client:
        yield client  # type: ignore[misc]


def expected_scores(direct: DirectModel, images: np.ndarray, k: int, seed: int) -> dict[str, np.ndarray]:
    mean, log_var = direct.encode(images)
    eps = np.random.default_rng(seed).standard_normal((k, len(images), LATENT_DIM))
    draws = posterior_draws(mean, log_var, eps).astype(np.float32).reshape(-1, LATENT_DIM)
    (logits,) = direct.decoder.run(["logits"], {"latents": draws})
    return score_images(
        images,
        mean,
        log_var,
        eps,
        logits,
        direct.decode(mean),
        likelihood="bernoulli",
        draw_logits_given=True,
    )


def test_scores_are_the_models_own_for_the_same_draws(scored: TestClient, mnist_direct: DirectModel) -> None:
    blobs = [png(1), png(2)]
    response = scored.post(
        "/score?k=8&seed=5", files=[("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["k"], body["seed"], body["alpha"], body["score"]) == (8, 5, 0.01, "negative_elbo")
    expected = expected_scores(mnist_direct, np.concatenate([as_array(b) for b in blobs]), 8, 5)
    for index, item in enumerate(body["items"]):
        for name in SCORE_NAMES:
            assert item[name] == pytest.approx(float(expected[name][index]), rel=1e-6, abs=1e-6), name
        assert item["negative_elbo"] == pytest.approx(item["reconstruction_nll"] + item["kl"])


def test_same_seed_same_scores(scored: TestClient) -> None:
    upload = {"file": ("d.png", png(3), "image/png")}
    first = scored.post("/score?k=4&seed=9", files=upload).json()["items"]
    assert scored.post("/score?k=4&seed=9", files=upload).json()["items"] == first
    assert scored.post("/score?k=4&seed=10", files=upload).json()["items"] != first


def test_percentile_and_verdict_come_from_the_reference(
    scored: TestClient, reference_model_dir: Path
) -> None:
    reference = ScoreReference.load(reference_model_dir / "score_reference.npz")
    elbo, mse = (
        reference.values[reference.names.index(name)] for name in ("negative_elbo", "reconstruction_mse")
    )
    # An image like the reference's: inside its range, and not anomalous.
    like = scored.post("/score?k=16&seed=3", content=png(4), headers={"Content-Type": "image/png"}).json()
    scores = like["items"][0]
    expected = 100 * np.interp(scores["negative_elbo"], elbo, np.linspace(0, 1, len(elbo)))
    assert 0 < scores["percentile"] < 100 and scores["percentile"] == pytest.approx(expected)
    # No latent density in this model: negative_elbo two-sided and reconstruction_mse upper-tailed.
    assert scores["latent_nll"] is None and scores["latent_percentile"] is None
    n = len(elbo)
    lower = (1 + (elbo <= scores["negative_elbo"]).sum()) / (n + 1)
    upper = (1 + (elbo >= scores["negative_elbo"]).sum()) / (n + 1)
    tails = [min(1, 2 * min(lower, upper)), (1 + (mse >= scores["reconstruction_mse"]).sum()) / (n + 1)]
    assert scores["atypicality"] == pytest.approx(-2 * np.log(tails).sum(), rel=1e-9)
    assert scores["p_value"] > 0.01 and scores["anomalous"] is False
    wide = scored.post("/score?k=16&seed=3&alpha=0.99", content=png(4), headers={"Content-Type": "image/png"})
    assert wide.json()["items"][0]["anomalous"] == (scores["p_value"] < 0.99)


def test_scores_join_the_metrics(scored: TestClient) -> None:
    before = scored.get("/metrics").text
    scored.post("/score?k=1&seed=0", files={"file": ("d.png", png(5), "image/png")})
    after = scored.get("/metrics").text

    def count(text: str) -> float:
        line = next(line for line in text.splitlines() if line.startswith("vae_score_negative_elbo_count"))
        return float(line.split()[-1])

    assert count(after) == count(before) + 1
    assert "vae_anomalous_images_total" in after


@pytest.mark.parametrize(
    ("query", "files", "fragment"),
    [
        ("k=65", 1, "k is 65; the limit is 64"),
        ("k=0", 1, "k"),
        ("k=50", 4, "(k + 1) x the number of images (51 x 4) is 204; the limit is 200"),
        ("alpha=1", 1, "alpha"),
        ("alpha=0", 1, "alpha"),
        ("seed=-1", 1, "seed"),
    ],
)
def test_limits_and_bad_parameters_are_clear_422s(
    scored: TestClient, query: str, files: int, fragment: str
) -> None:
    uploads = [("files", (f"{i}.png", png(i), "image/png")) for i in range(files)]
    response = scored.post(f"/score?{query}", files=uploads)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert fragment in response.json()["detail"]


def test_no_image_is_a_clear_error(scored: TestClient) -> None:
    response = scored.post("/score", json={"latent": [0.0] * 16})
    assert response.status_code == 415 and "multipart/form-data" in response.json()["detail"]


def test_a_model_without_a_reference_says_so(client: TestClient) -> None:
    body = client.post("/score?k=2&seed=0", files={"file": ("d.png", png(6), "image/png")}).json()
    assert body["items"][0]["percentile"] is None and body["items"][0]["anomalous"] is None
    assert "no score reference" in body["note"]


@pytest.fixture(scope="module")
def gaussian_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from model.export import export_model
    from model.manifest import TrainingData
    from model.vae import VAE, VaeConfig

    torch.manual_seed(3)
    vae = VAE(VaeConfig(image_shape=(1, 28, 28), latent_dim=LATENT_DIM, widths=(8, 16), hidden_dim=32))
    model_dir = tmp_path_factory.mktemp("gaussian")
    export_model(
        vae,
        model_dir,
        name="gaussian-test",
        version="1",
        likelihood="gaussian",
        training_data=TrainingData(name="none", train_size=0, validation_size=0, test_size=0),
        test_metrics={},
        observation_std=0.1,
    )
    return model_dir


def test_a_gaussian_model_scores_with_its_observation_std(
    gaussian_model_dir: Path, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    direct = DirectModel(gaussian_model_dir)
    blob = png(7)
    with TestClient(create_app(make_settings(gaussian_model_dir)), raise_server_exceptions=False) as client:
        item = client.post("/score?k=4&seed=2", content=blob, headers={"Content-Type": "image/png"}).json()
    images = as_array(blob)
    mean, log_var = direct.encode(images)
    eps = np.random.default_rng(2).standard_normal((4, 1, LATENT_DIM))
    draws = posterior_draws(mean, log_var, eps).astype(np.float32).reshape(-1, LATENT_DIM)
    residual = (images.astype(np.float64) - direct.decode(draws).astype(np.float64)) / 0.1
    nll = (0.5 * residual**2 + np.log(0.1) + 0.5 * np.log(2 * np.pi)).reshape(4, -1).sum(axis=1)
    kl = 0.5 * (mean.astype(np.float64) ** 2 + np.exp(log_var) - 1 - log_var).sum()
    assert item["items"][0]["negative_elbo"] == pytest.approx(nll.mean() + kl, rel=1e-6)
    # A gaussian manifest without its std cannot be scored: a clear 422, not a guess.
    stale = Path(shutil.copytree(gaussian_model_dir, tmp_path / "stale"))
    manifest = json.loads((stale / "manifest.json").read_text())
    manifest["observation_std"] = None
    (stale / "manifest.json").write_text(json.dumps(manifest))
    with TestClient(create_app(make_settings(stale)), raise_server_exceptions=False) as client:
        refused = client.post("/score", content=blob, headers={"Content-Type": "image/png"})
    assert refused.status_code == 422 and "observation_std" in refused.json()["detail"]
