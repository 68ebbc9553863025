"""API-key authentication (model, admin and operational endpoints) and CORS, through the app."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from app.auth import Access, ApiKeyPolicy, key_matches
from app.config import Settings
from app.main import create_app

KEY = "s3cret-key"
MODEL_REQUESTS = [
    ("GET", "/sample?n=1&seed=0", {}),
    ("GET", "/model", {}),
    ("POST", "/decode", {"json": {"latents": [[0.0] * 16]}}),
    ("POST", "/encode", {"content": b"", "headers": {"Content-Type": "image/png"}}),
    ("POST", "/reconstruct", {"content": b"", "headers": {"Content-Type": "image/png"}}),
    ("POST", "/interpolate", {"json": {"start": [0.0] * 16, "end": [1.0] * 16, "steps": 2}}),
    ("POST", "/traverse?dims=0&steps=2", {"json": {"latent": [0.0] * 16}}),
    ("POST", "/edit?attribute=ink", {"json": {"latent": [0.0] * 16}}),
    ("POST", "/score", {"content": b"", "headers": {"Content-Type": "image/png"}}),
]
OPS_PATHS = ["/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"]


@pytest.fixture(scope="module")
def make_client(
    make_settings: Callable[..., Settings], mnist_model_dir: Path
) -> Iterator[Callable[..., TestClient]]:
    """Running apps serving the mnist-test model with the given settings overrides, closed at module end."""
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        client = TestClient(
            create_app(make_settings(mnist_model_dir, **overrides)), raise_server_exceptions=False
        )
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture(scope="module")
def keyed(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(api_key=KEY)


def assert_problem(response: Any, status: int, detail_part: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert set(problem) == {"type", "title", "status", "detail"} and problem["status"] == status
    assert detail_part in problem["detail"]


@pytest.mark.parametrize(("method", "path", "options"), MODEL_REQUESTS)
def test_model_endpoints_need_the_key_when_one_is_set(
    keyed: TestClient, method: str, path: str, options: dict[str, Any]
) -> None:
    missing = keyed.request(method, path, **options)
    assert_problem(missing, 401, "needs the API key as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = keyed.request(
        method, path, **{**options, "headers": {**options.get("headers", {}), "X-API-Key": "x"}}
    )
    assert_problem(wrong, 401, "the API key is not valid")
    for header in ({"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}):
        answered = keyed.request(
            method, path, **{**options, "headers": {**options.get("headers", {}), **header}}
        )
        assert answered.status_code != 401, answered.text  # empty image bodies get 415/422, past the check


def test_authorized_responses_name_the_model_version(keyed: TestClient) -> None:
    response = keyed.get("/sample?n=1&seed=0", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200 and response.headers["x-model-version"] == "mnist-test/1"
    assert keyed.get("/model", headers={"X-API-Key": KEY}).json()["model"] == "mnist-test/1"


@pytest.mark.parametrize("path", OPS_PATHS)
def test_operational_endpoints_stay_open_by_default(keyed: TestClient, path: str) -> None:
    assert keyed.get(path).status_code == 200


def test_operational_endpoints_can_be_protected(make_client: Callable[..., TestClient]) -> None:
    client = make_client(api_key=KEY, protect_ops_endpoints=True)
    for path in OPS_PATHS:
        assert_problem(client.get(path), 401, "needs the API key")
        assert client.get(path, headers={"X-API-Key": KEY}).status_code == 200


def test_without_a_key_model_endpoints_are_open_and_admin_is_refused(client: TestClient) -> None:
    assert client.get("/sample?n=1&seed=0").status_code == 200
    refused = client.post("/admin/reload", headers={"Authorization": "Bearer anything"})
    assert_problem(refused, 403, "the admin endpoints are disabled because no API key is configured")


def test_admin_endpoints_always_need_the_key(keyed: TestClient) -> None:
    assert_problem(keyed.post("/admin/reload"), 401, "needs the API key")
    # With the key the request reaches the endpoint, which validates its body.
    assert_problem(keyed.post("/admin/reload", json={"bogus": 1}, headers={"X-API-Key": KEY}), 422, "bogus")


def test_openapi_documents_the_security_schemes(keyed: TestClient, client: TestClient) -> None:
    spec = keyed.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"] == {
        "BearerAuth": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"},
        "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    }
    either = [{"BearerAuth": []}, {"ApiKeyHeader": []}]
    assert spec["paths"]["/sample"]["get"]["security"] == either
    assert spec["paths"]["/admin/reload"]["post"]["security"] == either
    assert "security" not in spec["paths"]["/healthz"]["get"]
    open_spec = client.get("/openapi.json").json()
    assert "security" not in open_spec["paths"]["/sample"]["get"]
    assert open_spec["paths"]["/admin/reload"]["post"]["security"] == either


def test_keys_are_compared_whole() -> None:
    key = SecretStr(KEY)
    assert key_matches([KEY], key) and key_matches(["other", KEY], key)
    assert not key_matches([KEY[:-1]], key) and not key_matches([KEY + "x"], key) and not key_matches([], key)


PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}


def test_cors_is_off_by_default(client: TestClient) -> None:
    preflight = client.options("/decode", headers={"Origin": "https://app.example", **PREFLIGHT})
    assert "access-control-allow-origin" not in preflight.headers
    simple = client.get("/healthz", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in simple.headers


def test_cors_preflight_allowed_and_denied(make_client: Callable[..., TestClient]) -> None:
    client = make_client(api_key=KEY, cors_allow_origins="https://app.example, https://other.example")
    allowed = client.options("/decode", headers={"Origin": "https://app.example", **PREFLIGHT})
    assert allowed.status_code == 200  # preflights carry no credentials and are not refused for them
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    denied = client.options("/decode", headers={"Origin": "https://evil.example", **PREFLIGHT})
    assert denied.status_code == 400 and "access-control-allow-origin" not in denied.headers
    answered = client.get("/sample?n=1&seed=0", headers={"Origin": "https://other.example", "X-API-Key": KEY})
    assert answered.headers["access-control-allow-origin"] == "https://other.example"
    assert "x-model-version" in answered.headers["access-control-expose-headers"].lower()
    unauthorized = client.get("/sample", headers={"Origin": "https://other.example"})
    assert unauthorized.status_code == 401
    assert unauthorized.headers["access-control-allow-origin"] == "https://other.example"


def test_paths_with_parameters_take_the_strictest_template_they_match() -> None:
    access: dict[str, Access] = {
        "/v2/models/{model_name}/infer": "model",
        "/v2/models/{model_name}/stats": "ops",
        "/v2/health/ready": "ops",
    }
    policy = ApiKeyPolicy(SecretStr(KEY), protect_ops_endpoints=False, access=access)
    assert policy.required("/v2/models/mnist/infer")
    assert not policy.required("/v2/models/mnist/stats")  # a sibling template decides nothing for infer
    assert not policy.required("/v2/health/ready")
    assert not policy.required("/v2/models/mnist/unknown")  # no route: 404 for everyone
    assert policy.required("/admin/anything")
