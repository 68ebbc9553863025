"""POST /score on the shipped model and the real test digits: its figures agree with the manifest's, noise and
blank images are flagged, test digits mostly are not."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.main import create_app
from model.manifest import DEFAULT_MODEL_DIR, read_manifest
from training.config import TrainConfig
from training.data import load_dataset


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.rint(image[0] * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shipped() -> Iterator[TestClient]:
    with TestClient(create_app(Settings(execution_provider="cpu")), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def splits():  # type: ignore[no-untyped-def]
    return load_dataset(TrainConfig())


@pytest.fixture(scope="module")
def test_digits(splits) -> np.ndarray:  # type: ignore[no-untyped-def]
    return splits.test.images


def score_all(client: TestClient, images: np.ndarray, k: int, per_request: int) -> list[dict[str, float]]:
    items = []
    for start in range(0, len(images), per_request):
        uploads = [
            ("files", (f"{i}.png", png(image), "image/png"))
            for i, image in enumerate(images[start : start + per_request])
        ]
        response = client.post(f"/score?k={k}&seed={start}", files=uploads)
        assert response.status_code == 200, response.text
        items += response.json()["items"]
    return items


def test_model_shows_the_reference_quantiles_and_the_auroc_table(shipped: TestClient) -> None:
    body = shipped.get("/model").json()
    quantiles = body["scores"]["quantiles"]
    assert body["scores"]["reference_images"] == 500 and body["scores"]["reference_samples"] == 16
    assert (
        quantiles["negative_elbo"]["0"] < quantiles["negative_elbo"]["50"] < quantiles["negative_elbo"]["100"]
    )
    assert set(quantiles) >= {"negative_elbo", "iwae", "latent_nll", "atypicality"}
    sets = body["manifest"]["anomaly_detection"]["synthetic_sets"]
    assert all(row["auroc"] >= 0.95 for row in sets.values()) and sets["uniform_noise"]["auroc"] >= 0.99


def test_test_split_scores_match_the_manifest(shipped: TestClient, test_digits: np.ndarray) -> None:
    metrics = read_manifest(DEFAULT_MODEL_DIR).test_metrics
    elbo = np.mean([item["negative_elbo"] for item in score_all(shipped, test_digits, k=16, per_request=60)])
    assert abs(elbo - metrics["negative_elbo"]) < 1.0, (elbo, metrics["negative_elbo"])
    iwae = np.mean([item["iwae"] for item in score_all(shipped, test_digits, k=64, per_request=15)])
    # Within 0.3 nats: k=16's bound is 0.6 nats looser, so an ignored k would fail.
    assert abs(iwae - metrics["iwae_bound"]) < 0.3, (iwae, metrics["iwae_bound"])


def test_noise_and_blank_images_are_flagged_and_digits_mostly_not(shipped: TestClient, splits) -> None:  # type: ignore[no-untyped-def]
    # The validation digits never entered the calibration: at alpha 0.01, about 1% may be flagged.
    digits = score_all(shipped, splits.validation.images[:200], k=16, per_request=50)
    assert np.mean([item["anomalous"] for item in digits]) <= 0.03
    noise = np.random.default_rng(0).random((20, 1, 28, 28)).astype(np.float32)
    assert all(item["anomalous"] for item in score_all(shipped, noise, k=16, per_request=20))
    blank = score_all(shipped, np.zeros((1, 1, 28, 28), np.float32), k=16, per_request=1)[0]
    # Beyond every test digit's score (for this model far less likely, 630 nats), and flagged.
    assert blank["percentile"] in (0.0, 100.0) and blank["anomalous"] is True
    assert blank["p_value"] == pytest.approx(1 / 501)
