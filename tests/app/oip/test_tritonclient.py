"""tritonclient.http against a real `vae-serve` on the shipped model: health, metadata, JSON and binary
inference equal to /encode and /decode, versioned paths, and every error as tritonclient reports it."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from model.manifest import DEFAULT_MODEL_DIR, load_model_dir
from tests.app.test_server import serving

pytestmark = pytest.mark.slow

KEY = "protocol-key"


def auth() -> dict[str, str]:
    """The key as a header, a new dict per call: tritonclient adds its own headers to the dict it gets."""
    return {"Authorization": f"Bearer {KEY}"}


MANIFEST, _ = load_model_dir(DEFAULT_MODEL_DIR)
ENCODER, DECODER = f"{MANIFEST.name}-encoder", f"{MANIFEST.name}-decoder"
VERSION = MANIFEST.version
MAX_BODY_BYTES = 150_000  # 47 images of 28x28 FP32: a binary batch of 48 is too large


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    flags = ("--max-batch-size", "16", "--max-wait-ms", "20", "--max-body-bytes", str(MAX_BODY_BYTES))
    with serving(tmp_path_factory.mktemp("oip-server"), *flags, "--api-key", KEY) as (base_url, _):
        yield base_url


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(server.removeprefix("http://"), network_timeout=30) as connection:
        yield connection


def digits(count: int, seed: int = 0) -> np.ndarray:
    """(count, 28, 28) uint8 grayscale images."""
    return np.random.default_rng(seed).integers(0, 256, (count, 28, 28), dtype=np.uint8)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def tensor(name: str, array: np.ndarray, binary: bool = True) -> triton.InferInput:
    entry = triton.InferInput(name, list(array.shape), triton.np_to_triton_dtype(array.dtype))
    entry.set_data_from_numpy(array, binary_data=binary)
    return entry


class ForgedInput(triton.InferInput):
    """An input whose JSON entry and binary data are given as they are: what a faulty client sends."""

    def __init__(self, entry: dict[str, Any], raw: bytes | None = None) -> None:
        super().__init__(entry["name"], entry["shape"], entry["datatype"])
        self.entry, self.raw = entry, raw

    def _get_tensor(self) -> dict[str, Any]:
        return self.entry

    def _get_binary_data(self) -> bytes | None:
        return self.raw


def test_health_server_metadata_and_readiness(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()  # probes need no key
    metadata = client.get_server_metadata()
    assert metadata["name"] == "vae-service" and "binary_tensor_data" in metadata["extensions"]
    for model in (ENCODER, DECODER):
        assert client.is_model_ready(model, headers=auth())
        assert client.is_model_ready(model, VERSION, headers=auth())
    assert not client.is_model_ready(ENCODER, "0.0.0", headers=auth())
    assert not client.is_model_ready("no-such-model", headers=auth())
    assert not client.is_model_ready(ENCODER)  # without the key


def test_model_metadata_and_repository_index(client: triton.InferenceServerClient) -> None:
    images, latents = [-1, *MANIFEST.image.shape], [-1, MANIFEST.latent_dim]
    encoder = client.get_model_metadata(ENCODER, headers=auth())
    assert encoder == {
        "name": ENCODER,
        "versions": [VERSION],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "images", "datatype": "FP32", "shape": images}],
        "outputs": [
            {"name": "mean", "datatype": "FP32", "shape": latents},
            {"name": "log_var", "datatype": "FP32", "shape": latents},
        ],
    }
    decoder = client.get_model_metadata(DECODER, VERSION, headers=auth())
    assert decoder["inputs"] == [{"name": "latents", "datatype": "FP32", "shape": latents}]
    assert [output["name"] for output in decoder["outputs"]] == ["images", "logits"]
    index = client.get_model_repository_index(headers=auth())
    assert [(entry["name"], entry["version"], entry["state"]) for entry in index] == [
        (f"{name}-{part}", VERSION, "READY")
        for name in ("mnist-ae", "mnist-pca", "mnist-vae")  # the shipped models, the VAE the default
        for part in ("encoder", "decoder")
    ]


def test_unload_and_load_a_model_as_tritons_users_do(client: triton.InferenceServerClient) -> None:
    latents = np.zeros((1, MANIFEST.latent_dim), np.float32)
    client.unload_model("mnist-ae", headers=auth())
    assert not client.is_model_ready("mnist-ae-decoder", headers=auth())
    states = {entry["name"]: entry for entry in client.get_model_repository_index(headers=auth())}
    assert states["mnist-ae-decoder"]["state"] == "UNAVAILABLE" and states["mnist-ae-decoder"]["reason"] == (
        "unloaded"
    )
    with pytest.raises(InferenceServerException) as refused:
        client.infer("mnist-ae-decoder", [tensor("latents", latents)], headers=auth())
    assert refused.value.status() == "503" and "POST /v2/repository/models/mnist-ae/load" in str(
        refused.value
    )
    assert client.is_model_ready(DECODER, headers=auth()), "the other models keep serving"
    client.load_model("mnist-ae-encoder", headers=auth())  # either part's name loads the model
    assert client.is_model_ready("mnist-ae-decoder", headers=auth())
    decoded = client.infer("mnist-ae-decoder", [tensor("latents", latents)], headers=auth())
    assert decoded.as_numpy("images").shape == (1, *MANIFEST.image.shape)


def test_repository_control_errors_as_tritons_users_see_them(client: triton.InferenceServerClient) -> None:
    for call, name, status, words in (
        (client.load_model, "no-such-model", "404", "this server serves 'mnist-ae', 'mnist-pca'"),
        (client.unload_model, "no-such-model", "404", "this server serves"),
        (client.unload_model, "mnist-vae", "409", "is the default model"),
    ):
        with pytest.raises(InferenceServerException) as refused:
            call(name, headers=auth())
        assert refused.value.status() == status and words in str(refused.value), refused.value
    with pytest.raises(InferenceServerException) as without_key:
        client.unload_model("mnist-pca")
    assert without_key.value.status() == "401"
    with pytest.raises(InferenceServerException) as configured:
        client.load_model("mnist-pca", headers=auth(), config=json.dumps({"max_batch_size": 4}))
    assert configured.value.status() == "400" and "configuration is its manifest" in str(configured.value)
    assert client.is_model_ready("mnist-pca-encoder", headers=auth()), "a refused control changes nothing"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_encoder_inference_equals_encode(
    client: triton.InferenceServerClient, server: str, binary: bool
) -> None:
    pixels = digits(5)
    files = [("files", (f"{i}.png", png(image), "image/png")) for i, image in enumerate(pixels)]
    encoded = httpx.post(server + "/encode", files=files, headers=auth(), timeout=30).json()["items"]
    images = (pixels.astype(np.float32) / 255)[:, None]
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("mean", "log_var")]
    result = client.infer(
        ENCODER, [tensor("images", images, binary)], outputs=outputs, request_id="r1", headers=auth()
    )
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == (ENCODER, VERSION, "r1")
    for name in ("mean", "log_var"):
        expected = np.array([item[name] for item in encoded], np.float32)
        np.testing.assert_allclose(result.as_numpy(name), expected, rtol=1e-5, atol=1e-5)


def test_decoder_inference_equals_decode_at_the_versioned_path(
    client: triton.InferenceServerClient, server: str
) -> None:
    latents = np.random.default_rng(4).standard_normal((6, MANIFEST.latent_dim)).astype(np.float32)
    decoded = httpx.post(
        server + "/decode?format=array", json={"latents": latents.tolist()}, headers=auth(), timeout=30
    ).json()
    result = client.infer(DECODER, [tensor("latents", latents)], model_version=VERSION, headers=auth())
    images = result.as_numpy("images")
    assert images.shape == (6, *MANIFEST.image.shape) and images.dtype == np.float32
    np.testing.assert_allclose(images, np.array(decoded["images"], np.float32), atol=1e-6)
    logits = result.as_numpy("logits")  # the decoder's second output: images are sigmoid(logits)
    np.testing.assert_allclose(images, 1 / (1 + np.exp(-logits)), atol=1e-5)


def test_a_plain_json_request_without_content_type_is_answered(server: str) -> None:
    body = {
        "inputs": [{"name": "latents", "shape": [1, 16], "datatype": "FP32", "data": [[0.0] * 16]}],
        "outputs": [{"name": "images"}],
    }
    response = httpx.post(
        f"{server}/v2/models/{DECODER}/infer", content=json.dumps(body), headers=auth(), timeout=30
    )
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    (output,) = response.json()["outputs"]
    assert output["shape"] == [1, 1, 28, 28] and len(output["data"]) == 784


IMAGES_ENTRY: dict[str, Any] = {"name": "images", "shape": [1, 1, 28, 28], "datatype": "FP32"}
ZEROS = np.zeros((1, 1, 28, 28), np.float32)

ERROR_CASES: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "wrong shape",
        {"inputs": [tensor("images", np.zeros((1, 1, 28, 27), np.float32))]},
        "400",
        "has shape [1, 1, 28, 27]; this model takes [-1, 1, 28, 28]",
    ),
    (
        "element count",
        {"inputs": [ForgedInput({**IMAGES_ENTRY, "data": [0.0] * 700})]},
        "400",
        "has 700 values, but its shape [1, 1, 28, 28] needs 784",
    ),
    (
        "wrong datatype",
        {"inputs": [tensor("images", ZEROS.astype(np.float64))]},
        "400",
        "has datatype FP64; this model takes FP32",
    ),
    (
        "unknown datatype",
        {"inputs": [ForgedInput({**IMAGES_ENTRY, "datatype": "FLOAT32", "data": [0.0] * 784})]},
        "400",
        "'FLOAT32', which is not one of the protocol's",
    ),
    (
        "unparseable JSON",
        {"inputs": [tensor("images", ZEROS)], "parameters": {"scale": float("nan")}},
        "400",
        "not valid JSON",
    ),
    (
        "binary size mismatch",
        {"inputs": [ForgedInput({**IMAGES_ENTRY, "parameters": {"binary_data_size": 3136}}, b"\0" * 3000)]},
        "400",
        "only 3000 follow the JSON header",
    ),
    (
        "unknown output",
        {"inputs": [tensor("images", ZEROS)], "outputs": [triton.InferRequestedOutput("z")]},
        "400",
        "unknown output 'z'",
    ),
    (
        "body over the limit",
        {"inputs": [tensor("images", np.zeros((48, 1, 28, 28), np.float32))]},
        "413",
        "larger than the limit of 150000 bytes",
    ),
    (
        "unknown model",
        {"model_name": "mnist-gan"},
        "404",
        f"there is no model 'mnist-gan'; this server serves 'mnist-ae-encoder', 'mnist-ae-decoder', "
        f"'mnist-pca-encoder', 'mnist-pca-decoder', '{ENCODER}', '{DECODER}'",
    ),
    ("unknown version", {"model_version": "9"}, "404", f"has no version '9'; it serves version '{VERSION}'"),
    ("no API key", {"headers": {}}, "401", "needs the API key"),
    ("wrong API key", {"headers": {"X-API-Key": "guess"}}, "401", "the API key is not valid"),
]


@pytest.mark.parametrize(
    ("call", "status", "message"), [case[1:] for case in ERROR_CASES], ids=[case[0] for case in ERROR_CASES]
)
def test_errors_reach_tritonclient_with_their_message(
    client: triton.InferenceServerClient, call: dict[str, Any], status: str, message: str
) -> None:
    arguments: dict[str, Any] = {
        "model_name": ENCODER,
        "inputs": [tensor("images", ZEROS)],
        "headers": auth(),
    }
    arguments.update(call)
    with pytest.raises(InferenceServerException) as raised:
        client.infer(**arguments)
    assert raised.value.status() == status
    assert message in raised.value.message()


def test_item_limit_is_a_400_naming_the_limit(client: triton.InferenceServerClient) -> None:
    latents = np.zeros((65, MANIFEST.latent_dim), np.float32)  # small enough for the body limit
    with pytest.raises(InferenceServerException) as raised:
        client.infer(DECODER, [tensor("latents", latents)], headers=auth())
    assert raised.value.status() == "400"
    assert "a batch of 65; one request may carry 1 to 64" in raised.value.message()


def test_metadata_errors_reach_tritonclient(client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as raised:
        client.get_model_metadata("mnist-gan", headers=auth())
    assert raised.value.status() == "404" and "there is no model 'mnist-gan'" in raised.value.message()
    with pytest.raises(InferenceServerException) as raised:
        client.get_model_metadata(ENCODER, "9", headers=auth())
    assert raised.value.status() == "404" and "has no version '9'" in raised.value.message()


def test_every_error_on_v2_is_json_with_an_error_field(server: str) -> None:
    with httpx.Client(base_url=server, headers=auth(), timeout=30) as http:
        for response, status in (
            (http.get(f"/v2/models/{ENCODER}/infer"), 405),
            (http.get("/v2/nothing-here"), 404),
            (http.post(f"/v2/models/{ENCODER}/infer", content=b"\xff\xfe"), 400),
            (
                http.post(f"/v2/models/{ENCODER}/infer", content=b"{}", headers={"Content-Encoding": "br"}),
                400,
            ),
        ):
            assert response.status_code == status
            assert response.headers["content-type"] == "application/json"
            assert set(response.json()) == {"error"} and response.json()["error"]
        assert http.get("/nothing-here").headers["content-type"] == "application/problem+json"


def test_readiness_and_metadata_paths_need_the_key_like_the_model_routes(server: str) -> None:
    with httpx.Client(base_url=server, timeout=30) as http:
        assert http.get("/v2/health/ready").json() == {"ready": True}
        assert http.get("/v2/health/live").json() == {"live": True}
        for path in (f"/v2/models/{ENCODER}", f"/v2/models/{ENCODER}/ready", "/v2/models/unknown/ready"):
            refused = http.get(path)
            assert refused.status_code == 401 and "error" in refused.json()
        assert http.post("/v2/repository/index").status_code == 401
