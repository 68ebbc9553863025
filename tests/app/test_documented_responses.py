"""Every operation documents exactly the error statuses it can give, and gives each one it documents.

The statuses are listed per operation below (with and without an API key, and with the ops endpoints
protected), then checked against the real app: a request without the key gets 401 exactly where 401 is
documented, an oversized body 413, a text/plain body 415, and an unknown query parameter 422.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app

KEY = "documented-responses-key"
BODY = (413, 415, 422, 503, 504)  # reads a body and queues model work
QUERY = (422, 503, 504)  # takes query parameters and queues model work
MODEL = "/v2/models/mnist-test-encoder"
# (method, path) -> the error statuses documented without an API key; the key adds 401 to model routes.
EXPECTED: dict[tuple[str, str], tuple[int, ...]] = {
    ("POST", "/encode"): BODY,
    ("POST", "/decode"): BODY,
    ("GET", "/sample"): QUERY,
    ("POST", "/reconstruct"): BODY,
    ("POST", "/interpolate"): BODY,
    ("POST", "/traverse"): BODY,
    ("POST", "/edit"): BODY,
    ("GET", "/latent-map"): (422, 503),
    ("POST", "/score"): BODY,
    ("GET", "/healthz"): (),
    ("GET", "/readyz"): (503,),
    ("GET", "/model"): (503,),
    ("GET", "/metrics"): (),
    ("GET", "/v2/health/live"): (),
    ("GET", "/v2/health/ready"): (503,),
    ("GET", "/v2"): (),
    ("GET", "/v2/models/{model_name}"): (404, 503),
    ("GET", "/v2/models/{model_name}/versions/{model_version}"): (404, 503),
    ("GET", "/v2/models/{model_name}/ready"): (404, 503),
    ("GET", "/v2/models/{model_name}/versions/{model_version}/ready"): (404, 503),
    ("POST", "/v2/models/{model_name}/infer"): (400, 404, 413, 503, 504),
    ("POST", "/v2/models/{model_name}/versions/{model_version}/infer"): (400, 404, 413, 503, 504),
    ("POST", "/v2/repository/index"): (413, 503),
    ("POST", "/v2/repository/models/{model_name}/load"): (403,),
    ("POST", "/v2/repository/models/{model_name}/unload"): (403,),
    ("POST", "/admin/reload"): (403,),
    ("GET", "/models"): (503,),
}
# Every model route once more under /models/{model_name}, where an unknown name adds 404.
MODEL_ROUTES = ("/encode", "/decode", "/sample", "/reconstruct", "/interpolate", "/traverse", "/edit")
MODEL_ROUTES += ("/latent-map", "/score")
EXPECTED.update(
    {
        (method, "/models/{model_name}" + route): tuple(sorted({*statuses, 404}))
        for (method, route), statuses in list(EXPECTED.items())
        if route in MODEL_ROUTES
    }
)
EXPECTED["GET", "/models/{model_name}"] = (404, 503)
ADMIN = {
    "/admin/reload",
    "/v2/repository/models/{model_name}/load",
    "/v2/repository/models/{model_name}/unload",
}
# What a route needs in its query string before it reads the body.
VALID_QUERY = {"/edit": "?to_label=1", "/models/{model_name}/edit": "?to_label=1"}
OPS = {"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready", "/v2"}
ADMIN_WITH_KEY = (401, 404, 409, 413, 415, 422, 504)
REPOSITORY_CONTROL_WITH_KEY = (400, 401, 404, 409, 413, 503, 504)


def documented(client: TestClient) -> dict[tuple[str, str], tuple[int, ...]]:
    spec = client.get("/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    return {
        (method.upper(), path): tuple(
            sorted(int(status) for status in operation["responses"] if status != "200")
        )
        for path, operations in spec["paths"].items()
        for method, operation in operations.items()
    }


def expected_with_key(protect_ops: bool) -> dict[tuple[str, str], tuple[int, ...]]:
    expected = {}
    for (method, path), statuses in EXPECTED.items():
        needs_key = path not in OPS or protect_ops
        expected[method, path] = tuple(sorted({*statuses, 401} if needs_key else set(statuses)))
    expected["POST", "/admin/reload"] = ADMIN_WITH_KEY
    for action in ("load", "unload"):
        expected["POST", f"/v2/repository/models/{{model_name}}/{action}"] = REPOSITORY_CONTROL_WITH_KEY
    return expected


@pytest.fixture(scope="module")
def clients(
    latent_model_dir: Path, make_settings: Callable[..., Settings]
) -> Iterator[dict[str, TestClient]]:
    variants = {
        "no key": make_settings(latent_model_dir),
        "key": make_settings(latent_model_dir, api_key=KEY),
        "key, ops protected": make_settings(latent_model_dir, api_key=KEY, protect_ops_endpoints=True),
    }
    opened = {name: TestClient(create_app(settings)) for name, settings in variants.items()}
    for client in opened.values():
        client.__enter__()
    yield opened
    for client in opened.values():
        client.__exit__(None, None, None)


def test_the_document_lists_exactly_these_statuses(clients: dict[str, TestClient]) -> None:
    assert documented(clients["no key"]) == EXPECTED
    assert documented(clients["key"]) == expected_with_key(protect_ops=False)
    assert documented(clients["key, ops protected"]) == expected_with_key(protect_ops=True)


def concrete(path: str) -> str:
    return (
        path.replace("/v2/models/{model_name}", MODEL)
        .replace("{model_version}", "1")
        .replace("/models/{model_name}", "/models/latent-test")
        .replace("{model_name}", "latent-test")
    )


def call(client: TestClient, method: str, path: str, **options: Any) -> int:
    return client.request(method, concrete(path), **options).status_code


@pytest.mark.parametrize("variant", ["key", "key, ops protected"])
def test_401_comes_exactly_where_it_is_documented(clients: dict[str, TestClient], variant: str) -> None:
    client = clients[variant]
    for (method, path), statuses in documented(client).items():
        assert (call(client, method, path) == 401) == (401 in statuses), (method, path)


def test_413_415_and_422_come_where_they_are_documented(clients: dict[str, TestClient]) -> None:
    client = clients["key"]
    key = {"Authorization": f"Bearer {KEY}"}
    limit = Settings().max_body_bytes
    for (method, path), statuses in documented(client).items():
        if method == "POST":
            too_large = call(client, method, path, content=b"x" * (limit + 1), headers=key)
            assert (too_large == 413) == (413 in statuses), (method, path, too_large)
            plain = {**key, "Content-Type": "text/plain"}
            text = call(client, method, path + VALID_QUERY.get(path, ""), content=b"x", headers=plain)
            assert (text == 415) == (415 in statuses), (method, path, text)
        unknown_parameter = call(client, method, path + "?not_a_parameter=1", headers=key)
        if path not in ADMIN:  # no query parameters: the admin routes' 422 is a bad body
            assert (unknown_parameter == 422) == (422 in statuses), (method, path, unknown_parameter)
    assert call(client, "POST", "/admin/reload", json={"model_dir": 5}, headers=key) == 422
