"""What the service guarantees holds on /v2 too: shared batchers, load shedding, deadlines, body limits,
the API key, metrics by route, readiness and hot reload; through the ASGI app."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.main import create_app
from tests.app.test_concurrency import TWO_ITEM_QUEUE, fill_decoder_queue, gated_app, png, sample_value, serve

ENCODER_INFER, DECODER_INFER = "/v2/models/mnist-test-encoder/infer", "/v2/models/mnist-test-decoder/infer"


def latents_request(count: int = 1) -> dict[str, Any]:
    return {
        "inputs": [{"name": "latents", "shape": [count, 16], "datatype": "FP32", "data": [0.0] * 16 * count}]
    }


def assert_protocol_error(response: httpx.Response, status: int, message: str) -> None:
    """What tritonclient reads: the status and `error` from a JSON body."""
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert set(response.json()) == {"error"} and message in response.json()["error"]


@pytest.mark.asyncio
async def test_protocol_rows_batch_with_encode_uploads(
    mnist_model_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    app = create_app(make_settings(mnist_model_dir, max_wait_ms=300))
    pixels = np.asarray(Image.open(io.BytesIO(png(5))), np.float32) / 255
    body = {
        "inputs": [
            {"name": "images", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": pixels.ravel().tolist()}
        ]
    }
    async with serve(app) as client:
        runs_before = sample_value(app, "vae_batch_size_count", {"part": "encoder"})
        upload, protocol = await asyncio.gather(
            client.post("/encode", content=png(5), headers={"Content-Type": "image/png"}),
            client.post(ENCODER_INFER, json=body),
        )
        runs = sample_value(app, "vae_batch_size_count", {"part": "encoder"}) - runs_before
    assert upload.status_code == 200 and protocol.status_code == 200
    assert runs == 1  # one onnxruntime run answered both
    mean = {output["name"]: output["data"] for output in protocol.json()["outputs"]}["mean"]
    np.testing.assert_allclose(mean, upload.json()["items"][0]["mean"], rtol=1e-5, atol=1e-6)


@pytest.mark.asyncio
async def test_a_full_queue_sheds_protocol_requests_with_retry_after(
    mnist_model_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    async with gated_app(make_settings(mnist_model_dir, **TWO_ITEM_QUEUE)) as (app, client, gated):
        running, queued = await fill_decoder_queue(app, client, gated)
        shed = await client.post(DECODER_INFER, json=latents_request())
        shed_unparsed = await client.post(DECODER_INFER, content=b"not json")  # refused before parsing
        encoder_room = await client.post(ENCODER_INFER, content=b"not json")  # the encoder queue has room
        gated.gate.set()
        assert (await running).status_code == 200 and (await queued).status_code == 200
        served = await client.post(DECODER_INFER, json=latents_request())
    for response in (shed, shed_unparsed):
        assert_protocol_error(response, 503, "the decoder queue holds 2 of at most 2 items")
        assert response.headers["retry-after"] == "1"
    assert_protocol_error(encoder_room, 400, "not valid JSON")
    assert served.status_code == 200
    assert sample_value(app, "vae_requests_rejected_total", {"reason": "queue_full"}) == 2
    labels = {"endpoint": "/v2/models/{model_name}/infer", "method": "POST"}
    assert sample_value(app, "vae_requests_total", {**labels, "status": "503"}) == 2


@pytest.mark.asyncio
async def test_a_deadline_answers_504_on_the_protocol(
    mnist_model_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(mnist_model_dir, max_batch_size=2, max_wait_ms=0, request_timeout_seconds=0.3)
    async with gated_app(settings) as (app, client, gated):
        response = await client.post(DECODER_INFER, json=latents_request(2))
        gated.gate.set()
    assert_protocol_error(response, 504, "not answered within 0.3 s")
    assert sample_value(app, "vae_requests_rejected_total", {"reason": "timeout"}) == 1


def test_limits_key_and_unknown_routes_answer_in_the_protocols_shape(
    mnist_model_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(mnist_model_dir, api_key="k", max_body_bytes=4000)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        key = {"X-API-Key": "k"}
        assert_protocol_error(client.post(ENCODER_INFER, json=latents_request()), 401, "needs the API key")
        assert client.post(ENCODER_INFER).headers["www-authenticate"] == "Bearer"
        too_large = client.post(DECODER_INFER, content=b"{" + b" " * 4000 + b"}", headers=key)
        assert_protocol_error(too_large, 413, "larger than the limit of 4000 bytes")
        assert_protocol_error(client.put(DECODER_INFER, headers=key), 405, "allowed methods: POST")
        assert_protocol_error(
            client.get("/v2/models", headers=key), 404, "there is no endpoint at /v2/models"
        )
        assert client.get("/v2/health/live").json() == {"live": True}  # probes need no key
        assert client.get("/healthz").json() == {"status": "ok"}
        # Outside /v2, errors stay problem JSON.
        assert (
            client.post("/decode", json={}, headers=key).headers["content-type"] == "application/problem+json"
        )


def test_metrics_count_protocol_requests_by_route_template(
    mnist_model_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    with TestClient(create_app(make_settings(mnist_model_dir)), raise_server_exceptions=False) as client:
        assert client.post(DECODER_INFER, json=latents_request()).status_code == 200
        assert (
            client.post("/v2/models/mnist-test-decoder/versions/1/infer", json=latents_request()).status_code
            == 200
        )
        assert client.post("/v2/models/elsewhere/infer", json=latents_request()).status_code == 404
        assert client.get("/v2/models/mnist-test-encoder").status_code == 200
        assert client.get("/v2/no/such/path").status_code == 404
        metrics = client.get("/metrics").text
    for line in (
        'vae_requests_total{endpoint="/v2/models/{model_name}/infer",method="POST",model="mnist-test",'
        'status="200"} 1.0',
        'vae_requests_total{endpoint="/v2/models/{model_name}/infer",method="POST",model="",'
        'status="404"} 1.0',
        'vae_requests_total{endpoint="/v2/models/{model_name}/versions/{model_version}/infer",'
        'method="POST",model="mnist-test",status="200"} 1.0',
        'vae_requests_total{endpoint="/v2/models/{model_name}",method="GET",model="mnist-test",'
        'status="200"} 1.0',
        'vae_requests_total{endpoint="other",method="GET",model="",status="404"} 1.0',
        'vae_items_processed_total{model="mnist-test",part="decoder"}',
    ):
        assert line in metrics, line


def test_before_the_model_is_ready_the_protocol_says_so(
    mnist_model_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    client = TestClient(
        create_app(make_settings(mnist_model_dir)), raise_server_exceptions=False
    )  # no lifespan
    not_ready = client.get("/v2/health/ready")
    assert not_ready.status_code == 503 and not_ready.json()["ready"] is False
    assert client.get("/v2/health/live").json() == {"live": True}
    assert_protocol_error(client.get("/v2/models/mnist-test-encoder"), 503, "still loading")
    assert_protocol_error(client.post(ENCODER_INFER, json={}), 503, "still loading")


def test_a_reload_swaps_the_protocol_models(
    mnist_model_dir: Path, mnist_model_v2_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    key = {"X-API-Key": "k"}
    settings = make_settings(mnist_model_dir, api_key="k", max_wait_ms=0)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        before = client.post(DECODER_INFER, json=latents_request(), headers=key).json()
        assert client.get("/v2/models/mnist-test-decoder", headers=key).json()["versions"] == ["1"]
        reloaded = client.post("/admin/reload", json={"model_dir": str(mnist_model_v2_dir)}, headers=key)
        assert reloaded.status_code == 200, reloaded.text
        assert client.get("/v2/models/mnist-test-decoder", headers=key).json()["versions"] == ["2"]
        after = client.post(
            "/v2/models/mnist-test-decoder/versions/2/infer", json=latents_request(), headers=key
        )
        gone = client.post(
            "/v2/models/mnist-test-decoder/versions/1/infer", json=latents_request(), headers=key
        )
    assert before["model_version"] == "1" and after.json()["model_version"] == "2"
    assert after.headers["x-model-version"] == "mnist-test/2"
    assert before["outputs"][0]["data"] != after.json()["outputs"][0]["data"]
    assert_protocol_error(gone, 404, "has no version '1'; it serves version '2'")


def test_the_openapi_document_describes_the_protocol_routes(
    mnist_model_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    with TestClient(create_app(make_settings(mnist_model_dir, api_key="k"))) as client:
        schema = client.get("/openapi.json").json()
    infer = schema["paths"]["/v2/models/{model_name}/infer"]["post"]
    assert set(infer["requestBody"]["content"]) == {"application/json", "application/octet-stream"}
    assert set(infer["responses"]) == {"200", "400", "401", "404", "413", "503", "504"}
    for status in ("400", "401"):  # the protocol's error body, not problem JSON
        assert infer["responses"][status]["content"]["application/json"]["schema"]["required"] == ["error"]
    assert "security" in infer and "security" in schema["paths"]["/v2/repository/index"]["post"]
    assert "security" not in schema["paths"]["/v2/health/ready"]["get"]
    assert json.dumps(schema)  # serialisable as served


def test_not_ready_answers_carry_retry_after_and_the_protocols_probe(
    mnist_model_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    app = create_app(make_settings(mnist_model_dir))
    client = TestClient(app, raise_server_exceptions=False)  # lifespan not entered: no model
    response = client.get("/v2/models/mnist-test-decoder")
    assert_protocol_error(response, 503, "poll /v2/health/ready")
    assert response.headers["retry-after"] == "1"
    assert client.get("/sample").json()["detail"] == "the model is still loading; poll /readyz"


def test_browsers_may_send_and_read_binary_protocol_bodies(
    mnist_model_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(mnist_model_dir, cors_allow_origins="https://app.example")
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "inference-header-content-length, content-encoding",
    }
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        allowed = client.options(DECODER_INFER, headers=preflight)
        answered = client.post(
            DECODER_INFER, json=latents_request(), headers={"Origin": "https://app.example"}
        )
    assert allowed.status_code == 200
    assert "inference-header-content-length" in allowed.headers["access-control-allow-headers"].lower()
    assert "inference-header-content-length" in answered.headers["access-control-expose-headers"].lower()


def test_every_reference_in_the_openapi_document_resolves(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    references: list[str] = []

    def collect(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                references.append(node["$ref"])
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(schema)
    assert references and all(reference.startswith("#/components/schemas/") for reference in references)
    missing = {ref for ref in references if ref.rsplit("/", 1)[1] not in schema["components"]["schemas"]}
    assert not missing
