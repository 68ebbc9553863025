"""VaeClient and AsyncVaeClient against a real `vae-serve` on the shipped models: every method, a named model
under /models/<name>, the error types the service answers with, and `vae-client` on a small folder."""

from __future__ import annotations

import asyncio
import csv
import io
import subprocess
import sys
from collections.abc import Callable, Iterator
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
    ModelSummary,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    ServiceUnavailable,
    Unauthorized,
    UnknownModel,
    UnsupportedMediaType,
    VaeClient,
    to_pil,
)
from app.client.api import Call
from app.client.cli import models_table
from app.client.errors import raise_for_problem
from tests.app.test_server import serving, vae_serve

pytestmark = pytest.mark.slow

KEY = "client-key"
MAX_BODY_BYTES = 100_000
SHIPPED_MODELS = {"mnist-ae": "ae", "mnist-pca": "pca", "mnist-vae": "vae"}  # name -> kind


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


def test_models_lists_the_shipped_models(client: VaeClient) -> None:
    models = client.models()
    assert {model.name: model.kind for model in models} == SHIPPED_MODELS
    assert [model.name for model in models] == sorted(SHIPPED_MODELS)
    assert [model.name for model in models if model.default] == ["mnist-vae"]
    for model in models:
        assert (model.state, model.reason, model.version) == ("ready", "", "1.1.0")
        assert (model.latent_shape, model.image_shape) == ((16,), (1, 28, 28))
        assert model.memory_bytes is None or model.memory_bytes > 0
        assert client.for_model(model.name).model()["model"] == f"{model.name}/1.1.0"


class RecordingTransport(httpx.HTTPTransport):
    """Records each request's path and the X-Model-Version of its answer."""

    def __init__(self) -> None:
        super().__init__()
        self.exchanges: list[tuple[str, str | None]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.exchanges.append((request.url.path, response.headers.get("X-Model-Version")))
        return response


def test_a_named_model_answers_under_its_prefix(server: str) -> None:
    images = digits(3)
    transport = RecordingTransport()
    with VaeClient(server, api_key=KEY, transport=transport, model="mnist-ae") as autoencoder:
        assert autoencoder.model()["manifest"]["name"] == "mnist-ae"
        latents = autoencoder.encode(images).mean
        reconstructed = autoencoder.reconstruct(images)
        np.testing.assert_allclose(reconstructed, autoencoder.decode(latents), atol=1e-6)
        default_latents = autoencoder.for_model(None).encode(images).mean
    assert transport.exchanges == [
        ("/models/mnist-ae", "mnist-ae/1.1.0"),
        ("/models/mnist-ae/encode", "mnist-ae/1.1.0"),
        ("/models/mnist-ae/reconstruct", "mnist-ae/1.1.0"),
        ("/models/mnist-ae/decode", "mnist-ae/1.1.0"),
        ("/encode", "mnist-vae/1.1.0"),
    ]
    assert latents.shape == default_latents.shape == (3, 16)
    assert not np.allclose(latents, default_latents, atol=1e-3)

    async def encode_with_pca() -> np.ndarray:
        async with AsyncVaeClient(server, api_key=KEY, model="mnist-pca") as pca:
            return (await pca.encode(images)).mean

    with VaeClient(server, api_key=KEY, model="mnist-pca") as pca:
        np.testing.assert_allclose(asyncio.run(encode_with_pca()), pca.encode(images).mean, atol=1e-6)


def test_an_unknown_model_raises_unknown_model(client: VaeClient) -> None:
    stranger = client.for_model("no-such-model")
    with pytest.raises(UnknownModel) as unknown:
        stranger.encode(digits(1))
    assert isinstance(unknown.value, NotFound)
    assert (unknown.value.status, unknown.value.title) == (404, "Unknown model")
    assert "'no-such-model'" in unknown.value.detail and "'mnist-ae'" in unknown.value.detail
    with pytest.raises(UnknownModel):
        stranger.model()
    assert client.model()["model"] == "mnist-vae/1.1.0"  # the client it came from still calls the default


def test_a_missing_model_and_a_model_not_loaded_are_told_apart() -> None:
    def problem(status: int, title: str) -> httpx.Response:
        return httpx.Response(status, json={"type": "urn:x", "title": title, "status": status, "detail": "d"})

    with pytest.raises(UnknownModel):
        raise_for_problem(problem(404, "Unknown model"))
    with pytest.raises(NotFound) as other:
        raise_for_problem(problem(404, "Not Found"))
    assert type(other.value) is NotFound
    with pytest.raises(ServiceUnavailable, match="503 Model not loaded: d"):
        raise_for_problem(problem(503, "Model not loaded"))


# Every model endpoint the client calls (GET /model aside), by route.
MODEL_CALLS: list[tuple[str, Callable[[VaeClient], object]]] = [
    ("/encode", lambda client: client.encode(digits(1))),
    ("/decode", lambda client: client.decode([[0.0] * 16])),
    ("/sample", lambda client: client.sample(1)),
    ("/sample", lambda client: client.sample_grid(1)),
    ("/reconstruct", lambda client: client.reconstruct(digits(1))),
    ("/interpolate", lambda client: client.interpolate(digits(1)[0], digits(1)[0])),
    ("/interpolate", lambda client: client.interpolate([0.0] * 16, [1.0] * 16)),
    ("/traverse", lambda client: client.traverse([0.0] * 16)),
    ("/edit", lambda client: client.edit(digits(1)[0], to_label="8")),
    ("/score", lambda client: client.score(digits(1))),
    ("/latent-map", lambda client: client.latent_map()),
]


@pytest.mark.parametrize(
    ("model", "model_info", "prefix"),
    [(None, "/model", ""), ("mnist-ae", "/models/mnist-ae", "/models/mnist-ae")],
)
def test_every_model_call_goes_to_the_model_named(model: str | None, model_info: str, prefix: str) -> None:
    paths: list[str] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        return httpx.Response(418, text="recorded")

    with VaeClient(transport=httpx.MockTransport(refuse), model=model) as client:
        for call in (VaeClient.model, *(call for _, call in MODEL_CALLS), VaeClient.models):
            with pytest.raises(ServiceError, match="recorded"):
                call(client)
    assert paths == [model_info, *(prefix + route for route, _ in MODEL_CALLS), "/models"]

    async def call_async() -> None:
        async with AsyncVaeClient(transport=httpx.MockTransport(refuse)) as default:
            for call in (AsyncVaeClient.model, AsyncVaeClient.latent_map, AsyncVaeClient.models):
                with pytest.raises(ServiceError, match="recorded"):
                    await call(default.for_model(model))

    paths.clear()
    asyncio.run(call_async())
    assert paths == [model_info, prefix + "/latent-map", "/models"]


def test_the_latent_map(client: VaeClient) -> None:
    latent_map = client.for_model("mnist-ae").latent_map()
    assert latent_map.points.shape == (len(latent_map.labels), 2) and latent_map.components.shape == (2, 16)
    np.testing.assert_allclose(latent_map.components @ latent_map.components.T, np.eye(2), atol=1e-4)
    assert set(latent_map.labels) <= set(range(len(latent_map.label_names)))


def run_vae_client(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*vae_client(), *args], capture_output=True, text=True, timeout=120, check=False)


def test_vae_client_lists_the_models_and_calls_the_one_named(server: str, tmp_path: Path) -> None:
    common = ["--url", server, "--api-key", KEY]
    listing = run_vae_client(*common, "models")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "KIND", "STATE", "LATENT", "IMAGE", "MEMORY", "REASON"]
    assert [line.split()[:5] for line in lines[1:4]] == [
        ["mnist-ae", "1.1.0", "ae", "ready", "16"],
        ["mnist-pca", "1.1.0", "pca", "ready", "16"],
        ["mnist-vae", "*", "1.1.0", "vae", "ready"],
    ]
    assert lines[3].split()[5] == "16" and lines[3].split()[6] == "1x28x28"

    folder = tmp_path / "digits"
    folder.mkdir()
    for index, image in enumerate(digits(3)):
        to_pil(image).save(folder / f"{index:02d}.png")
    encoded = run_vae_client(
        *common, "--model", "mnist-pca", "encode", str(folder), "-o", str(tmp_path / "pca.npy")
    )
    assert encoded.returncode == 0, encoded.stderr
    with VaeClient(server, api_key=KEY, model="mnist-pca") as pca:
        np.testing.assert_allclose(np.load(tmp_path / "pca.npy"), pca.encode(digits(3)).mean, atol=1e-6)

    unknown = run_vae_client(*common, "--model", "no-such-model", "sample", "-o", str(tmp_path / "x.png"))
    assert unknown.returncode == 1 and "404 Unknown model" in unknown.stderr


def test_the_models_table_marks_the_default_and_what_is_unknown() -> None:
    models = [
        ModelSummary("a", True, "1.0.0", "vae", "ready", "", (16,), (1, 28, 28), 3 * 2**20),
        ModelSummary(
            "big-model", False, "2.0.0", "ae", "unavailable", "no encoder.onnx", (4, 8, 8), (3, 64, 64), None
        ),
    ]
    assert models_table(models).splitlines() == [
        "NAME       VERSION  KIND  STATE        LATENT  IMAGE    MEMORY   REASON",
        "a *        1.0.0    vae   ready        16      1x28x28  3.0 MiB",
        "big-model  2.0.0    ae    unavailable  4x8x8   3x64x64  -        no encoder.onnx",
        "* the default model (the unprefixed routes)",
    ]
