"""The latent-space features through the app: priors and labels in /sample, /traverse, /edit, GET /model."""

from __future__ import annotations

import base64
import io
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.main import create_app
from model.latent_space import (
    LATENT_SPACE_FILENAME,
    LatentSpace,
    load_latent_space,
    sample_standard,
    traversal,
)
from tests.app.conftest import DirectModel, rewrite_latent_space

LATENT_DIM = 16


@pytest.fixture(scope="module")
def space(latent_model_dir: Path) -> LatentSpace:
    return load_latent_space(latent_model_dir / LATENT_SPACE_FILENAME, LATENT_DIM)


@pytest.fixture(scope="module")
def direct(latent_model_dir: Path) -> DirectModel:
    return DirectModel(latent_model_dir)


def digit_png(seed: int = 0) -> bytes:
    pixels = (np.random.default_rng(seed).random((28, 28)) > 0.8).astype(np.uint8) * 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def images_of(body: dict[str, Any]) -> np.ndarray:
    return np.asarray(body["images"], dtype=np.float32)


def assert_problem(response: Any, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    detail = response.json()["detail"]
    for fragment in fragments:
        assert fragment in detail, detail


# --- /sample


def test_sample_defaults_to_the_fitted_mixture_and_says_so(
    latent_client: TestClient, space: LatentSpace, direct: DirectModel
) -> None:
    body = latent_client.get("/sample?n=5&seed=11&format=array").json()
    assert body["prior"] == "gmm" and "label" not in body
    expected = direct.decode(space.prior.sample(np.random.default_rng(11), 5, 1.0).astype(np.float32))
    np.testing.assert_allclose(images_of(body), expected, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.0, 0.5, 1.0])
def test_standard_prior_is_n01_scaled_by_temperature(
    latent_client: TestClient, direct: DirectModel, temperature: float
) -> None:
    response = latent_client.get(f"/sample?n=3&seed=5&prior=standard&temperature={temperature}&format=array")
    assert response.json()["prior"] == "standard"
    latents = sample_standard(np.random.default_rng(5), 3, LATENT_DIM, temperature).astype(np.float32)
    np.testing.assert_allclose(images_of(response.json()), direct.decode(latents), atol=1e-6)


def test_mixture_temperature_zero_gives_component_means(
    latent_client: TestClient, space: LatentSpace, direct: DirectModel
) -> None:
    assert space.prior is not None
    response = latent_client.get("/sample?n=4&seed=2&prior=gmm&temperature=0&format=array")
    chosen = np.random.default_rng(2).choice(space.prior.components, size=4, p=space.prior.weights)
    expected = direct.decode(space.prior.means[chosen].astype(np.float32))
    np.testing.assert_allclose(images_of(response.json()), expected, atol=1e-6)


def test_label_samples_that_labels_density(
    latent_client: TestClient, space: LatentSpace, direct: DirectModel
) -> None:
    body = latent_client.get("/sample?n=4&seed=9&label=3&format=array").json()
    assert body["prior"] == "label" and body["label"] == "3"
    index = space.labels.index("3")
    latents = space.class_densities[index].sample(np.random.default_rng(9), 4, 1.0).astype(np.float32)
    np.testing.assert_allclose(images_of(body), direct.decode(latents), atol=1e-6)


def test_same_seed_same_images_for_every_prior(latent_client: TestClient) -> None:
    for query in ("prior=standard", "prior=gmm", "label=7", ""):
        first = latent_client.get(f"/sample?n=6&seed=123&{query}").json()["images"]
        assert latent_client.get(f"/sample?n=6&seed=123&{query}").json()["images"] == first


def test_sample_errors_list_what_is_allowed(latent_client: TestClient, client: TestClient) -> None:
    assert_problem(latent_client.get("/sample?label=x"), 422, "'x'", "0, 1, 2, 3, 4, 5, 6, 7, 8, 9")
    assert_problem(latent_client.get("/sample?label=3&prior=gmm"), 422, "prior or label, not both")
    assert_problem(latent_client.get("/sample?prior=flow"), 422, "prior")
    # A model without a latent-space description offers the standard prior only.
    assert_problem(client.get("/sample?prior=gmm"), 422, "offers standard")
    assert_problem(client.get("/sample?label=3"), 422, "without labels")
    assert client.get("/sample?n=2&seed=1").json()["prior"] == "standard"


def test_one_image_png_is_the_plain_image_and_columns_set_the_grid(latent_client: TestClient) -> None:
    single = Image.open(io.BytesIO(latent_client.get("/sample?n=1", headers={"Accept": "image/png"}).content))
    assert single.size == (28, 28)
    grid = latent_client.get("/sample?n=6&columns=3", headers={"Accept": "image/png"})
    assert Image.open(io.BytesIO(grid.content)).size == (2 + 3 * 30, 2 + 2 * 30)
    assert_problem(latent_client.get("/sample?columns=0"), 422, "columns")


# --- /traverse


def test_traverse_a_latent_moves_one_dimension_per_row(
    latent_client: TestClient, space: LatentSpace, direct: DirectModel
) -> None:
    latent = np.linspace(-1, 1, LATENT_DIM).astype(np.float32)
    response = latent_client.post(
        "/traverse?dims=2,5&span=2&steps=5&format=array", json={"latent": latent.tolist()}
    )
    body = response.json()
    assert response.status_code == 200 and body["dims"] == [2, 5] and body["steps"] == 5
    frames = np.asarray(body["latents"], dtype=np.float32)
    np.testing.assert_allclose(frames, traversal(latent, [2, 5], 2.0, 5, space.aggregate_std), rtol=1e-6)
    changed = np.flatnonzero(np.any(frames[:5] != latent, axis=0))
    assert changed.tolist() == [2] and np.flatnonzero(np.any(frames[5:] != latent, axis=0)).tolist() == [5]
    np.testing.assert_allclose(frames[2], latent)  # the middle frame is the input itself
    np.testing.assert_allclose(images_of(body), direct.decode(frames), atol=1e-6)


def test_traverse_an_image_starts_from_its_mean_and_grids_a_row_per_dim(
    latent_client: TestClient, space: LatentSpace, direct: DirectModel
) -> None:
    upload = digit_png()
    body = latent_client.post(
        "/traverse?dims=0,1,2&steps=4&format=array", files={"file": ("d.png", upload, "image/png")}
    ).json()
    image = np.asarray(Image.open(io.BytesIO(upload)), dtype=np.float32)[None, None] / 255
    mean, _ = direct.encode(image)
    np.testing.assert_allclose(
        body["latents"], traversal(mean[0], [0, 1, 2], 3.0, 4, space.aggregate_std), rtol=1e-5, atol=1e-6
    )
    grid = latent_client.post(
        "/traverse?dims=0,1,2&steps=4",
        content=upload,
        headers={"Content-Type": "image/png", "Accept": "image/png"},
    )
    assert Image.open(io.BytesIO(grid.content)).size == (2 + 4 * 30, 2 + 3 * 30)


def test_traverse_defaults_to_the_active_dims_highest_kl_first(
    latent_model_dir: Path, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """A description whose dims 9, 2 and 5 are active (KL 3 > 2 > 1): the default rows, in that order."""
    model_dir = Path(shutil.copytree(latent_model_dir, tmp_path / "model"))

    def three_active_dims(arrays: dict[str, np.ndarray]) -> None:
        arrays["test_mean_variance"] = np.zeros(LATENT_DIM)
        arrays["test_kl_per_dim"] = np.zeros(LATENT_DIM)
        for dim, kl in ((2, 2.0), (5, 1.0), (9, 3.0)):
            arrays["test_mean_variance"][dim], arrays["test_kl_per_dim"][dim] = 0.5, kl

    rewrite_latent_space(model_dir, three_active_dims)
    with TestClient(create_app(make_settings(model_dir)), raise_server_exceptions=False) as client:
        body = client.post("/traverse", json={"latent": [0.0] * LATENT_DIM}).json()
        assert body["dims"] == [9, 2, 5] and len(body["images"]) == 21
        assert client.get("/model").json()["latent_space"]["active_dims"] == [9, 2, 5]
    # Only as many rows as fit in the frame limit: two rows of 7 in 14 frames, the highest-KL dims.
    with TestClient(
        create_app(make_settings(model_dir, max_frames_per_request=14)), raise_server_exceptions=False
    ) as client:
        body = client.post("/traverse", json={"latent": [0.0] * LATENT_DIM}).json()
        assert body["dims"] == [9, 2] and len(body["images"]) == 14


def test_traverse_defaults_to_active_dims_or_all(
    latent_client: TestClient, client: TestClient, space: LatentSpace
) -> None:
    # The untrained test model has no active dimension: the default is every dimension.
    assert space.active_dims == []
    body = latent_client.post("/traverse", json={"latent": [0.0] * LATENT_DIM}).json()
    assert body["dims"] == list(range(LATENT_DIM)) and body["span"] == 3.0
    assert len(body["images"]) == 7 * LATENT_DIM
    # Without a description: every dimension, in prior standard deviations.
    plain = client.post("/traverse?steps=3&span=1", json={"latent": [0.0] * LATENT_DIM}).json()
    assert plain["dims"] == list(range(LATENT_DIM))
    assert plain["latents"][0][0] == -1.0 and plain["latents"][2][0] == 1.0


@pytest.mark.parametrize(
    ("query", "fragments"),
    [
        ("dims=16", ("16", "0 to 15")),
        ("dims=1,1", ("twice",)),
        ("dims=a", ("comma-separated list of integers",)),
        ("dims=", ("comma-separated list of integers",)),
        ("dims=1" + "0" * 400, ("0 to 15",)),
        ("dims=-1", ("-1", "0 to 15")),
        ("span=11", ("span is 11.0; the limit is 10.0",)),
        ("span=0", ("span",)),
        ("span=nan", ("span",)),
        ("steps=1", ("steps",)),
        ("steps=100&dims=0,1,2", ("300; the limit is 256",)),
    ],
)
def test_traverse_errors_say_what_is_allowed(
    latent_client: TestClient, query: str, fragments: tuple[str, ...]
) -> None:
    assert_problem(
        latent_client.post(f"/traverse?{query}", json={"latent": [0.0] * LATENT_DIM}), 422, *fragments
    )


def test_traverse_body_errors(latent_client: TestClient) -> None:
    assert_problem(latent_client.post("/traverse", json={"latent": [0.0] * 3}), 422, "has 3 values", "16")
    assert_problem(latent_client.post("/traverse", json={"latents": [[0.0] * 16]}), 422, "latent")
    assert_problem(
        latent_client.post("/traverse", content=b"x", headers={"Content-Type": "text/plain"}), 415, "latent"
    )
    two = [("files", ("a.png", digit_png(1), "image/png")), ("files", ("b.png", digit_png(2), "image/png"))]
    assert_problem(latent_client.post("/traverse", files=two), 422, "the limit is 1")


# --- /edit


def test_edit_along_an_attribute(latent_client: TestClient, space: LatentSpace, direct: DirectModel) -> None:
    latent = np.full(LATENT_DIM, 0.1, np.float32)
    body = latent_client.post("/edit?attribute=ink&format=array", json={"latent": latent.tolist()}).json()
    assert body["attribute"] == "ink" and body["amounts"] == [-2.0, -1.0, 0.0, 1.0, 2.0]
    direction = space.attribute("ink").direction
    expected = (latent[None] + np.array(body["amounts"])[:, None] * direction).astype(np.float32)
    np.testing.assert_allclose(body["latents"], expected, rtol=1e-6)
    np.testing.assert_allclose(body["latents"][2], latent)
    np.testing.assert_allclose(images_of(body), direct.decode(expected), atol=1e-6)


def test_edit_towards_a_label(latent_client: TestClient, space: LatentSpace) -> None:
    source, target = space.labels.index("1"), space.labels.index("7")
    latent = space.class_centroids[source].astype(np.float32)
    body = latent_client.post("/edit?to_label=7&amounts=0,1", json={"latent": latent.tolist()}).json()
    assert body["to_label"] == "7" and body["from_label_inferred"] is True
    inferred = int(space.classify(latent[None].astype(np.float64))[0].argmax())
    assert body["from_label"] == space.labels[inferred]
    expected = latent + (space.class_centroids[target] - space.class_centroids[inferred])
    np.testing.assert_allclose(body["latents"][1], expected, rtol=1e-5, atol=1e-6)
    assert 0 < body["from_label_probability"] <= 1
    given = latent_client.post(
        "/edit?to_label=7&from_label=1&amounts=1", json={"latent": latent.tolist()}
    ).json()
    assert given["from_label"] == "1" and given["from_label_inferred"] is False
    np.testing.assert_allclose(given["latents"][0], space.class_centroids[target], rtol=1e-5, atol=1e-5)


def test_edit_png_is_one_row(latent_client: TestClient) -> None:
    response = latent_client.post(
        "/edit?attribute=thickness&amounts=-1,0,1",
        files={"file": ("d.png", digit_png(), "image/png")},
        headers={"Accept": "image/png"},
    )
    assert Image.open(io.BytesIO(response.content)).size == (2 + 3 * 30, 2 + 30)


@pytest.mark.parametrize(
    ("query", "fragments"),
    [
        ("attribute=beauty", ("'beauty'", "ink, thickness, slant, width")),
        ("to_label=x", ("'x'", "0, 1, 2")),
        ("to_label=1&from_label=y", ("from_label 'y'",)),
        ("attribute=ink&to_label=1", ("exactly one",)),
        ("", ("exactly one",)),
        ("attribute=ink&from_label=1", ("from_label goes with to_label",)),
        ("attribute=ink&amounts=1,x", ("comma-separated list of numbers",)),
        ("attribute=ink&amounts=11", ("the limit is 10.0",)),
        ("attribute=ink&amounts=inf", ("finite",)),
        ("attribute=ink&amounts=,", ("comma-separated list of numbers",)),
        ("attribute=ink&amounts=1e400", ("finite",)),
    ],
)
def test_edit_errors_say_what_is_allowed(
    latent_client: TestClient, query: str, fragments: tuple[str, ...]
) -> None:
    assert_problem(latent_client.post(f"/edit?{query}", json={"latent": [0.0] * LATENT_DIM}), 422, *fragments)


def test_edit_needs_a_latent_space(client: TestClient) -> None:
    assert_problem(
        client.post("/edit?attribute=ink", json={"latent": [0.0] * LATENT_DIM}), 422, "no latent-space"
    )


# --- GET /model


def test_model_lists_priors_labels_attributes_and_diagnostics(
    latent_client: TestClient, space: LatentSpace
) -> None:
    summary = latent_client.get("/model").json()["latent_space"]
    assert summary["priors"] == ["gmm", "standard"] and summary["default_prior"] == "gmm"
    assert summary["labels"] == [str(d) for d in range(10)]
    assert [a["name"] for a in summary["attributes"]] == ["ink", "thickness", "slant", "width"]
    assert len(summary["dimensions"]) == LATENT_DIM and summary["active_dims"] == space.active_dims
    assert summary["dimensions"][3]["test_kl"] == pytest.approx(float(space.test_kl_per_dim[3]))
    assert summary["fitting"]["prior"]["components"] == space.prior.components


def test_model_without_latent_space_says_what_it_lacks(client: TestClient) -> None:
    summary = client.get("/model").json()["latent_space"]
    assert summary["priors"] == ["standard"] and "no latent-space description" in summary["note"]


def test_json_results_are_base64_pngs(latent_client: TestClient) -> None:
    body = latent_client.post("/traverse?dims=0&steps=2", json={"latent": [0.0] * LATENT_DIM}).json()
    assert Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).size == (28, 28)
