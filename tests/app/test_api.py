"""Every endpoint and output format through the app, checked against direct onnxruntime runs."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.images import decode_images


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def random_pixels(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def model_input(pixels: np.ndarray) -> np.ndarray:
    """What the model sees for a 28x28 grayscale upload: (1, 1, 28, 28) float32 = pixels / 255."""
    return (pixels.astype(np.float32) * np.float32(1 / 255))[np.newaxis, np.newaxis]


def png_pixels(encoded: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))))


def to_png_pixels(images: np.ndarray) -> np.ndarray:
    """The documented PNG encoding of model output: round(x * 255) as uint8."""
    return np.rint(images * 255).astype(np.uint8)


# --- /encode ---------------------------------------------------------------------------------------------


def test_encode_raw_body_matches_onnxruntime(client: TestClient, mnist_direct: Any) -> None:
    pixels = random_pixels((28, 28))
    response = client.post("/encode", content=png(pixels), headers={"Content-Type": "image/png"})
    assert response.status_code == 200
    body = response.json()
    assert body["latent_dim"] == 16 and body["seed"] is None
    [item] = body["items"]
    mean, log_var = mnist_direct.encode(model_input(pixels))
    np.testing.assert_allclose(item["mean"], mean[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(item["log_var"], log_var[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(item["std"], np.exp(0.5 * log_var[0]), rtol=1e-6)
    assert "z" not in item


def test_encode_several_files_keeps_upload_order(client: TestClient) -> None:
    uploads = [png(random_pixels((28, 28), seed)) for seed in range(3)]
    several = client.post(
        "/encode", files=[("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(uploads)]
    )
    singles = [
        client.post("/encode", files={"file": ("x.png", data, "image/png")}).json()["items"][0]
        for data in uploads
    ]
    assert several.status_code == 200
    assert several.json()["items"] == singles


def test_encode_sample_is_seeded_and_reproducible(client: TestClient) -> None:
    upload = png(random_pixels((28, 28)))
    first = client.post(
        "/encode?sample=true&seed=7", content=upload, headers={"Content-Type": "image/png"}
    ).json()
    again = client.post(
        "/encode?sample=true&seed=7", content=upload, headers={"Content-Type": "image/png"}
    ).json()
    assert first == again and first["seed"] == 7
    item = first["items"][0]
    mean, log_var = np.array([item["mean"]], np.float32), np.array([item["log_var"]], np.float32)
    eps = np.random.default_rng(7).standard_normal((1, 16)).astype(np.float32)
    np.testing.assert_allclose(
        item["z"], (mean + np.exp(np.float32(0.5) * log_var) * eps)[0], rtol=0, atol=1e-6
    )

    unseeded = client.post(
        "/encode?sample=true", content=upload, headers={"Content-Type": "image/png"}
    ).json()
    replay = client.post(
        f"/encode?sample=true&seed={unseeded['seed']}", content=upload, headers={"Content-Type": "image/png"}
    ).json()
    assert isinstance(unseeded["seed"], int) and replay == unseeded


def test_uploads_are_converted_to_the_model_format(client: TestClient) -> None:
    gray = random_pixels((28, 28))

    def encode(data: bytes) -> list[float]:
        response = client.post("/encode", content=data, headers={"Content-Type": "image/png"})
        assert response.status_code == 200, response.text
        mean: list[float] = response.json()["items"][0]["mean"]
        return mean

    # Fully transparent white composites onto black: same as a black image.
    transparent_white = np.zeros((28, 28, 4), np.uint8)
    transparent_white[..., :3] = 255
    assert encode(png(transparent_white)) == encode(png(np.zeros((28, 28), np.uint8)))
    # RGB becomes Pillow "L"; larger images are resized with the documented bilinear filter.
    rgb = random_pixels((28, 28, 3))
    assert encode(png(rgb)) == encode(png(np.asarray(Image.fromarray(rgb).convert("L"))))
    large = random_pixels((56, 70), seed=3)
    resized = np.asarray(Image.fromarray(large).resize((28, 28), Image.Resampling.BILINEAR))
    assert encode(png(large)) == encode(png(resized))
    huge = random_pixels((600, 640), seed=4)  # past the inline limit: converted in a worker thread
    resized = np.asarray(Image.fromarray(huge).resize((28, 28), Image.Resampling.BILINEAR))
    assert encode(png(huge)) == encode(png(resized))
    for image_format, media_type in (("JPEG", "image/jpeg"), ("GIF", "image/gif"), ("BMP", "image/bmp")):
        other = io.BytesIO()
        Image.fromarray(gray).save(other, format=image_format)
        response = client.post("/encode", content=other.getvalue(), headers={"Content-Type": media_type})
        assert response.status_code == 200, image_format
    lossless_webp = io.BytesIO()
    Image.fromarray(gray).save(lossless_webp, format="WEBP", lossless=True)
    assert encode(lossless_webp.getvalue()) == encode(png(gray))


# --- /decode ---------------------------------------------------------------------------------------------


def test_decode_png_and_array_formats_match_onnxruntime(client: TestClient, mnist_direct: Any) -> None:
    latents = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    expected = mnist_direct.decode(latents)
    as_png = client.post("/decode", json={"latents": latents.tolist()})
    assert as_png.status_code == 200
    body = as_png.json()
    assert body["format"] == "png" and body["shape"] == [1, 28, 28] and len(body["images"]) == 3
    for encoded, image in zip(body["images"], expected, strict=True):
        decoded = Image.open(io.BytesIO(base64.b64decode(encoded)))
        assert decoded.mode == "L" and decoded.size == (28, 28)
        assert np.array_equal(np.asarray(decoded), to_png_pixels(image[0]))
    as_array = client.post("/decode?format=array", json={"latents": latents.tolist()}).json()
    assert as_array["format"] == "array"
    np.testing.assert_allclose(np.array(as_array["images"], np.float32), expected, rtol=0, atol=1e-6)


def test_accept_png_returns_one_near_square_grid(client: TestClient, mnist_direct: Any) -> None:
    latents = np.random.default_rng(2).standard_normal((5, 16)).astype(np.float32)
    response = client.post("/decode", json={"latents": latents.tolist()}, headers={"Accept": "image/png"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    grid = np.asarray(Image.open(io.BytesIO(response.content)))
    assert grid.shape == (2 * 30 + 2, 3 * 30 + 2)  # 5 tiles -> 2 rows x 3 columns, 2 px padding
    expected = to_png_pixels(mnist_direct.decode(latents))
    assert np.array_equal(grid[2:30, 2:30], expected[0, 0])
    assert np.array_equal(grid[32:60, 32:60], expected[4, 0])
    assert grid[0:2].max() == 0 and grid[32:60, 62:90].max() == 0  # padding and the empty last tile are black


# --- /sample ---------------------------------------------------------------------------------------------


def test_sample_is_deterministic_per_seed(client: TestClient, mnist_direct: Any) -> None:
    first = client.get("/sample?n=4&seed=11&temperature=0.5&format=array").json()
    assert first == client.get("/sample?n=4&seed=11&temperature=0.5&format=array").json()
    assert first["seed"] == 11 and first["temperature"] == 0.5
    latents = np.random.default_rng(11).standard_normal((4, 16)) * 0.5
    np.testing.assert_allclose(
        np.array(first["images"], np.float32),
        mnist_direct.decode(latents.astype(np.float32)),
        rtol=0,
        atol=1e-6,
    )
    other = client.get("/sample?n=4&seed=12&temperature=0.5&format=array").json()
    assert other["images"] != first["images"]


def test_sample_defaults_and_png_grid(client: TestClient) -> None:
    body = client.get("/sample").json()
    assert len(body["images"]) == 16 and isinstance(body["seed"], int) and body["temperature"] == 1.0
    grid = client.get("/sample?n=16&seed=0", headers={"Accept": "image/png"})
    assert grid.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(grid.content)).size == (4 * 30 + 2, 4 * 30 + 2)


def test_temperature_zero_decodes_the_prior_mean(client: TestClient, mnist_direct: Any) -> None:
    body = client.get("/sample?n=2&seed=5&temperature=0").json()
    expected = to_png_pixels(mnist_direct.decode(np.zeros((1, 16), np.float32)))[0, 0]
    assert all(np.array_equal(png_pixels(image), expected) for image in body["images"])


# --- /reconstruct ----------------------------------------------------------------------------------------


def test_reconstruct_decodes_the_mean(client: TestClient, mnist_direct: Any) -> None:
    pixels = random_pixels((28, 28), seed=4)
    response = client.post(
        "/reconstruct?format=array", content=png(pixels), headers={"Content-Type": "image/png"}
    )
    mean, _ = mnist_direct.encode(model_input(pixels))
    np.testing.assert_allclose(
        np.array(response.json()["images"], np.float32), mnist_direct.decode(mean), atol=1e-6
    )
    assert "seed" not in response.json()


def test_reconstruct_sampled_is_seeded(client: TestClient, mnist_direct: Any) -> None:
    upload = png(random_pixels((28, 28), seed=4))
    url = "/reconstruct?sample=true&seed=3&format=array"
    first = client.post(url, files={"file": ("a.png", upload, "image/png")}).json()
    assert first == client.post(url, files={"file": ("a.png", upload, "image/png")}).json()
    mean, log_var = mnist_direct.encode(model_input(random_pixels((28, 28), seed=4)))
    z = mean + np.exp(np.float32(0.5) * log_var) * np.random.default_rng(3).standard_normal((1, 16)).astype(
        np.float32
    )
    np.testing.assert_allclose(np.array(first["images"], np.float32), mnist_direct.decode(z), atol=1e-6)
    assert first["seed"] == 3


# --- /interpolate ----------------------------------------------------------------------------------------


def test_interpolate_linear_between_latents(client: TestClient) -> None:
    start, end = np.zeros(16), np.linspace(-1, 1, 16)
    body = client.post(
        "/interpolate?format=array", json={"start": start.tolist(), "end": end.tolist(), "steps": 5}
    ).json()
    latents = np.array(body["latents"], np.float32)  # float32 values, written as their shortest exact text
    assert latents.shape == (5, 16) and len(body["images"]) == 5 and body["method"] == "linear"
    assert latents[0].tolist() == start.tolist() and latents[-1].tolist() == np.float32(end).tolist()
    np.testing.assert_allclose(latents[2], 0.5 * end, atol=1e-6)


def test_interpolate_slerp_and_its_parallel_fallback(client: TestClient) -> None:
    start, end = np.eye(16)[0] * 2, np.eye(16)[1] * 2
    body = client.post(
        "/interpolate", json={"start": start.tolist(), "end": end.tolist(), "steps": 3, "method": "slerp"}
    )
    middle = np.array(body.json()["latents"][1])
    np.testing.assert_allclose(
        middle[:2], [np.sqrt(2), np.sqrt(2)], atol=1e-6
    )  # stays on the radius-2 circle
    opposite = client.post(
        "/interpolate",
        json={"start": start.tolist(), "end": (-start).tolist(), "steps": 3, "method": "slerp"},
    )
    assert opposite.status_code == 200
    np.testing.assert_allclose(opposite.json()["latents"][1], np.zeros(16), atol=1e-7)  # linear fallback


def test_interpolate_between_images(client: TestClient, mnist_direct: Any) -> None:
    a, b = random_pixels((28, 28), seed=8), random_pixels((28, 28), seed=9)
    mean, _ = mnist_direct.encode(np.concatenate([model_input(a), model_input(b)]))
    as_json = client.post(
        "/interpolate",
        json={
            "start": base64.b64encode(png(a)).decode(),
            "end": "data:image/png;base64," + base64.b64encode(png(b)).decode(),
            "steps": 4,
        },
    ).json()
    np.testing.assert_allclose(as_json["latents"][0], mean[0], atol=1e-6)
    np.testing.assert_allclose(as_json["latents"][-1], mean[1], atol=1e-6)
    as_form = client.post(
        "/interpolate",
        files={"start": ("a.png", png(a), "image/png"), "end": ("b.png", png(b), "image/png")},
        data={"steps": "4", "method": "linear"},
    ).json()
    assert as_form["latents"] == as_json["latents"] and as_form["images"] == as_json["images"]
    mixed = client.post(
        "/interpolate", json={"start": base64.b64encode(png(a)).decode(), "end": [0.0] * 16}
    ).json()
    assert len(mixed["latents"]) == 8  # the default frame count


# --- service endpoints -----------------------------------------------------------------------------------


def test_health_ready_and_model(client: TestClient, mnist_model_dir: Any) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    info = client.get("/model").json()
    assert info["manifest"]["latent_dim"] == 16 and info["manifest"]["image"]["channels"] == 1
    assert info["provider"] == "CPUExecutionProvider"
    assert info["batching"] == {
        "max_batch_size": 16,
        "max_wait_ms": 0.0,
        "max_queue_items": 4096,
        "inference_threads": 2,
    }
    assert info["limits"]["max_sample_n"] == 64


def test_openapi_documents_bodies_and_examples(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/encode", "/decode", "/sample", "/reconstruct", "/interpolate", "/metrics"} <= set(spec["paths"])
    encode_body = spec["paths"]["/encode"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/png"} <= set(encode_body)
    assert "bilinear" in spec["paths"]["/encode"]["post"]["description"]
    decode_body = spec["paths"]["/decode"]["post"]["requestBody"]
    assert decode_body["required"] and decode_body["content"]["application/json"]["schema"]["examples"]
    assert client.get("/docs").status_code == 200


# --- the RGB model ---------------------------------------------------------------------------------------


def test_rgb_model_round_trip(rgb_client: TestClient, rgb_direct: Any) -> None:
    pixels = random_pixels((32, 32, 3), seed=5)
    encoded = rgb_client.post("/encode", content=png(pixels), headers={"Content-Type": "image/png"}).json()
    expected_input = decode_images([png(pixels)], (3, 32, 32), 10**6)
    assert np.array_equal(
        expected_input[0], pixels.transpose(2, 0, 1).astype(np.float32) * np.float32(1 / 255)
    )
    mean, _ = rgb_direct.encode(expected_input)
    np.testing.assert_allclose(encoded["items"][0]["mean"], mean[0], atol=1e-6)
    assert encoded["latent_dim"] == 8

    body = rgb_client.post("/reconstruct", content=png(pixels), headers={"Content-Type": "image/png"}).json()
    assert body["shape"] == [3, 32, 32]
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert image.mode == "RGB" and image.size == (32, 32)
    assert np.array_equal(np.asarray(image), to_png_pixels(rgb_direct.decode(mean))[0].transpose(1, 2, 0))

    grid = rgb_client.get("/sample?n=3&seed=1", headers={"Accept": "image/png"})
    assert Image.open(io.BytesIO(grid.content)).mode == "RGB"
    # 20 RGB images are encoded in a worker thread, 16 on the event loop: same pixels either way.
    many, few = (rgb_client.get(f"/sample?n={n}&seed=2").json()["images"] for n in (20, 16))
    assert many[:16] == few
    gray_upload = rgb_client.post(
        "/encode", content=png(random_pixels((20, 20))), headers={"Content-Type": "image/png"}
    )
    assert gray_upload.status_code == 200


@pytest.mark.parametrize("path", ["/decode", "/interpolate"])
def test_rgb_latent_length_is_the_models(rgb_client: TestClient, path: str) -> None:
    body = {"latents": [[0.0] * 16]} if path == "/decode" else {"start": [0.0] * 16, "end": [0.0] * 8}
    response = rgb_client.post(path, json=body)
    assert response.status_code == 422 and "8" in response.json()["detail"]


def test_decode_without_a_json_content_type_says_what_to_send(client: TestClient) -> None:
    body = json.dumps({"latents": [[0.0] * 16]}).encode()
    form = client.post("/decode", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415
    assert form.json()["detail"] == (
        "Content-Type 'application/x-www-form-urlencoded' is not accepted; send JSON with Content-Type: "
        'application/json, e.g. {"latents": [[0.1, -0.3, ...]]} (curl -d sends '
        "application/x-www-form-urlencoded: add -H 'Content-Type: application/json')"
    )
    for headers in ({}, {"Content-Type": "application/json"}, {"Content-Type": "application/vnd.x+json"}):
        assert client.post("/decode", content=body, headers=headers).status_code == 200, headers


def test_decode_of_one_flat_vector_gets_one_message(client: TestClient) -> None:
    flat = client.post("/decode", json={"latents": [0.0] * 16})
    assert flat.status_code == 422
    assert flat.json()["detail"] == (
        "latents is a list of vectors, e.g. [[...16 numbers...]]; to decode one vector, put it in a list of "
        "its own"
    )


def test_unknown_query_parameters_are_refused_with_the_accepted_ones(client: TestClient) -> None:
    refused = client.get("/sample?nn=4")
    assert refused.status_code == 422
    assert refused.json()["detail"] == (
        "unknown query parameter 'nn' for GET /sample; it takes n, seed, temperature, prior, label, format, "
        "columns"
    )
    refused = client.post("/decode?formt=array&colums=2", json={"latents": [[0.0] * 16]})
    assert refused.json()["detail"] == (
        "unknown query parameters 'colums', 'formt' for POST /decode; it takes format, columns"
    )
