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
from model.scores import SCORE_NAMES, calibrated_reference, posterior_draws, score_images
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
def reference_model_dir(mnist_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mnist-test model with a score reference whose negative_elbo quantiles are 100..200 nats."""
    model_dir = Path(shutil.copytree(mnist_model_dir, tmp_path_factory.mktemp("scored") / "model"))
    scores = {name: np.linspace(100, 200, 101) for name in SCORE_NAMES}
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


def test_percentile_and_verdict_come_from_the_reference(scored: TestClient) -> None:
    item = scored.post("/score?k=2&seed=1", content=png(4), headers={"Content-Type": "image/png"}).json()
    scores = item["items"][0]
    expected = float(np.clip(scores["negative_elbo"] - 100, 0, 100))  # the reference is 100..200 nats
    assert scores["percentile"] == pytest.approx(expected, abs=1e-6)
    # No latent density in this model: negative_elbo two-sided and reconstruction_mse upper-tailed.
    assert scores["latent_nll"] is None and scores["latent_percentile"] is None
    mse_tail = 1 - float(np.clip(scores["reconstruction_mse"] - 100, 0, 100)) / 100
    tails = np.clip([2 * min(expected, 100 - expected) / 100, mse_tail], 1e-4, 1)
    assert scores["atypicality"] == pytest.approx(-2 * np.log(tails).sum(), rel=1e-9)
    assert 0 <= scores["p_value"] <= 1 and scores["anomalous"] == (scores["p_value"] < 0.01)
    wide = scored.post("/score?k=2&seed=1&alpha=0.99", content=png(4), headers={"Content-Type": "image/png"})
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
