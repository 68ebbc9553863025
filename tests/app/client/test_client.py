"""VaeClient and AsyncVaeClient against a real `vae-serve` on the shipped model: every method, the error
types the service answers with, and `vae-client` on a small folder."""

from __future__ import annotations

import asyncio
import csv
import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.client import (
    AsyncVaeClient,
    BadRequest,
    Conflict,
    DeadlineExceeded,
    Forbidden,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    ServiceUnavailable,
    Unauthorized,
    UnsupportedMediaType,
    VaeClient,
    to_pil,
)
from app.client.api import Call
from app.client.errors import raise_for_problem
from tests.app.test_server import serving, vae_serve

pytestmark = pytest.mark.slow

KEY = "client-key"
MAX_BODY_BYTES = 100_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # At most 4 images per request: vae-client's folder of 5 takes two batches.
    flags = ("--api-key", KEY, "--max-body-bytes", str(MAX_BODY_BYTES), "--max-items-per-request", "4")
    with serving(tmp_path_factory.mktemp("client-server"), *flags) as (base_url, _):
        yield base_url


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[VaeClient]:
    with VaeClient(server, api_key=KEY, timeout=30) as connection:
        yield connection


def digits(count: int) -> np.ndarray:
    """(count, 1, 28, 28) floats in [0, 1]: soft rings of different sizes, digit-like enough."""
    rows, cols = np.mgrid[0:28, 0:28].astype(np.float32)
    images = []
    for index in range(count):
        radius = np.hypot((rows - 14) / (6 + index), (cols - 14) / (4 + index / 2))
        images.append(np.clip(1 - np.abs(radius - 1) * 3, 0, 1))
    return np.stack(images)[:, None]


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_model_encode_decode_and_reconstruct(client: VaeClient, server: str) -> None:
    model = client.model()
    latent_dim = model["manifest"]["latent_dim"]
    images = digits(3)
    # Arrays, encoded bytes and PIL images are the same upload.
    encoding = client.encode(images)
    assert encoding.mean.shape == (3, latent_dim) and encoding.z is None
    assert np.allclose(client.encode([png(image) for image in images]).mean, encoding.mean, atol=1e-6)
    assert np.allclose(client.encode(to_pil(images[0])).mean[0], encoding.mean[0], atol=1e-6)
    np.testing.assert_allclose(encoding.std, np.exp(0.5 * encoding.log_var), rtol=1e-5)
    sampled = client.encode(images, sample=True, seed=7)
    assert sampled.seed == 7 and sampled.z is not None and sampled.z.shape == (3, latent_dim)
    # Against the raw HTTP answer.
    raw = httpx.post(
        server + "/encode", files={"file": ("a.png", png(images[0]), "image/png")},
        headers={"X-API-Key": KEY}, timeout=30,
    ).json()  # fmt: skip
    np.testing.assert_allclose(encoding.mean[0], raw["items"][0]["mean"], atol=1e-6)
    decoded = client.decode(encoding.mean)
    assert decoded.shape == (3, 1, 28, 28) and decoded.dtype == np.float32
    assert decoded.min() >= 0 and decoded.max() <= 1
    np.testing.assert_allclose(client.reconstruct(images), decoded, atol=1e-6)
    assert client.decode(encoding.mean[0]).shape == (1, 1, 28, 28)  # one vector


def test_sample_and_sample_grid(client: VaeClient) -> None:
    samples = client.sample(4, seed=3, temperature=0.8)
    assert samples.images.shape == (4, 1, 28, 28) and samples.seed == 3 and samples.temperature == 0.8
    assert samples.prior in ("standard", "gmm")
    np.testing.assert_array_equal(client.sample(4, seed=3, temperature=0.8).images, samples.images)
    sevens = client.sample(2, seed=1, label="7")
    assert sevens.label == "7"
    grid = client.sample_grid(16, seed=0, columns=8)
    assert isinstance(grid, Image.Image) and grid.size == (8 * 30 + 2, 2 * 30 + 2)


def test_interpolate_traverse_and_edit(client: VaeClient) -> None:
    images = digits(2)
    start, end = client.encode(images).mean
    frames = client.interpolate(start, end, steps=5, method="slerp")
    assert frames.images.shape == (5, 1, 28, 28) and frames.details["method"] == "slerp"
    np.testing.assert_allclose(frames.latents[0], start, atol=1e-5)
    from_images = client.interpolate(images[0], images[1], steps=3)
    np.testing.assert_allclose(from_images.latents[-1], end, atol=1e-5)
    traversal = client.traverse(start, dims=[0, 1], steps=4)
    assert traversal.images.shape == (8, 1, 28, 28) and traversal.details["dims"] == [0, 1]
    attributes = [a["name"] for a in client.model()["latent_space"]["attributes"]]
    edited = client.edit(images[0], attribute=attributes[0], amounts=[-1, 0, 1])
    assert edited.images.shape == (3, 1, 28, 28) and edited.details["amounts"] == [-1, 0, 1]
    to_eight = client.edit(start, to_label="8")
    assert to_eight.details["to_label"] == "8" and "from_label" in to_eight.details


def test_score(client: VaeClient) -> None:
    scores = client.score(digits(2), k=4, seed=0)
    assert (scores.k, scores.seed) == (4, 0) and len(scores.items) == 2
    assert {"negative_elbo", "iwae", "p_value", "anomalous"} <= set(scores.items[0])


def test_the_async_client_gives_the_same_answers(client: VaeClient, server: str) -> None:
    images = digits(2)

    async def run() -> tuple[np.ndarray, np.ndarray]:
        async with AsyncVaeClient(server, api_key=KEY) as connection:
            encoding, samples = await asyncio.gather(connection.encode(images), connection.sample(3, seed=5))
            return encoding.mean, samples.images

    mean, sampled = asyncio.run(run())
    np.testing.assert_allclose(mean, client.encode(images).mean, atol=1e-6)
    np.testing.assert_array_equal(sampled, client.sample(3, seed=5).images)


def test_service_errors_become_typed_exceptions(client: VaeClient, server: str) -> None:
    with VaeClient(server, api_key="wrong") as stranger, pytest.raises(Unauthorized) as unauthorized:
        stranger.sample(1)
    assert unauthorized.value.status == 401 and unauthorized.value.detail == "the API key is not valid"
    with pytest.raises(InvalidInput) as invalid:
        client.decode([[0.0] * 3])
    assert invalid.value.title == "Invalid latent vectors" and "has 3 values" in invalid.value.detail
    assert invalid.value.type == "urn:vae-service:problem:invalid-latents"
    with pytest.raises(UnsupportedMediaType, match="415"):
        client.encode(b"this is not an image")
    with pytest.raises(PayloadTooLarge) as too_large:
        client.encode(b"\0" * (MAX_BODY_BYTES + 1))
    assert f"limit of {MAX_BODY_BYTES} bytes" in too_large.value.detail
    with pytest.raises(NotFound):
        client.send(Call("GET", "/no-such-endpoint", lambda response: response))
    with pytest.raises(BadRequest) as bad:  # the Open Inference Protocol's {"error"} body
        client.send(Call("POST", "/v2/models/mnist-vae-encoder/infer", lambda r: r, json=[1]))
    assert "must be a JSON object" in bad.value.detail


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (403, Forbidden),
        (409, Conflict),
        (503, ServiceUnavailable),
        (504, DeadlineExceeded),
        (418, ServiceError),
    ],
)
def test_every_status_maps_to_its_exception(status: int, expected: type[ServiceError]) -> None:
    problem = {"type": "urn:x", "title": "T", "status": status, "detail": "what happened"}
    response = httpx.Response(status, json=problem, headers={"Retry-After": "2"})
    with pytest.raises(expected) as raised:
        raise_for_problem(response)
    assert type(raised.value) is expected
    assert (raised.value.status, raised.value.title, raised.value.detail) == (status, "T", "what happened")
    assert raised.value.retry_after == 2.0
    plain = httpx.Response(status, text="upstream proxy says no")
    with pytest.raises(expected, match="upstream proxy says no"):
        raise_for_problem(plain)


def test_the_client_imports_neither_fastapi_nor_onnxruntime() -> None:
    code = (
        "import sys, app.client, app.client.cli; "
        "loaded = {'fastapi', 'onnxruntime', 'starlette', 'torch'} & set(sys.modules); "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def vae_client() -> list[str]:
    return [str(Path(vae_serve()[0]).with_name("vae-client"))]


def test_vae_client_on_a_folder(server: str, tmp_path: Path) -> None:
    folder = tmp_path / "digits"
    folder.mkdir()
    for index, image in enumerate(digits(5)):
        to_pil(image).save(folder / f"{index:02d}.png")
    (folder / "notes.txt").write_text("not an image")
    common = [*vae_client(), "--url", server, "--api-key", KEY]

    def run(*args: str) -> str:
        result = subprocess.run([*common, *args], capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "wrote 16 samples" in run("sample", "-n", "16", "--seed", "0", "-o", str(tmp_path / "grid.png"))
    assert Image.open(tmp_path / "grid.png").size == (122, 122)
    run("encode", str(folder), "-o", str(tmp_path / "latents.npy"), "--names", str(tmp_path / "names.txt"))
    latents = np.load(tmp_path / "latents.npy")
    assert latents.shape == (5, 16)
    assert (tmp_path / "names.txt").read_text().split() == [f"{i:02d}.png" for i in range(5)]
    with VaeClient(server, api_key=KEY) as client:
        by_client = [client.encode(batch).mean for batch in (digits(5)[:4], digits(5)[4:])]
        np.testing.assert_allclose(latents, np.concatenate(by_client), atol=1e-6)
    assert "wrote scores of 5 images" in run("score", str(folder), "--csv", str(tmp_path / "scores.csv"))
    with (tmp_path / "scores.csv").open() as scores:
        rows = list(csv.DictReader(scores))
    assert [row["file"] for row in rows] == [f"{i:02d}.png" for i in range(5)]
    assert {"negative_elbo", "p_value", "anomalous"} <= set(rows[0])

    (folder / "05.png").write_bytes(b"not a PNG at all")
    broken = subprocess.run(
        [*common, "encode", str(folder), "-o", str(tmp_path / "x.npy")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert broken.returncode == 1 and "05.png" in broken.stderr and "415" in broken.stderr

    refused = subprocess.run(
        [*vae_client(), "--url", server, "sample", "-o", str(tmp_path / "x.png")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert refused.returncode == 1 and "401 Unauthorized" in refused.stderr
    unreachable = subprocess.run(
        [*vae_client(), "--url", "http://127.0.0.1:9", "sample", "-o", str(tmp_path / "x.png")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert unreachable.returncode == 1 and "cannot reach the service" in unreachable.stderr


def test_arrays_are_taken_as_one_image_or_refused_with_the_shapes_allowed() -> None:
    gray = np.random.default_rng(0).random((28, 28), dtype=np.float32)
    assert to_pil(gray).mode == "L" and to_pil(gray[None]).size == (28, 28)
    assert to_pil(np.stack([gray] * 3)).mode == "RGB"  # (C, H, W)
    assert to_pil((np.stack([gray] * 3, axis=-1) * 255).astype(np.uint8)).mode == "RGB"  # (H, W, C)
    with pytest.raises(ValueError, match=r"got shape \(5, 28, 28\) \(a batch of images is \(N, C, H, W\)\)"):
        to_pil(np.zeros((5, 28, 28)))
