"""Schemathesis against the service's own OpenAPI schema: no 5xx, every response one the schema documents.

The app under test serves the small 1x28x28 model with a latent-space description (so /edit and labels
are fuzzed for real) and tight limits, so generated requests stay cheap on a shared machine. The bugs it
found are pinned below as regression tests.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from app.config import Settings
from app.main import create_app
from tests.app.test_parsers_properties import PNG_TRUNCATED_IHDR, TIFF_TEXT_STRIP_OFFSETS

EXAMPLES_PER_OPERATION = 30


@pytest.fixture(scope="module")
def api_schema(latent_model_dir: Path, make_settings: Callable[..., Settings]) -> schemathesis.BaseSchema:
    """The schema of a fresh app; schemathesis enters its lifespan (model loaded) once and keeps it."""
    app = create_app(
        make_settings(
            latent_model_dir,
            max_items_per_request=8,
            max_frames_per_request=32,
            max_sample_n=8,
            max_interpolation_steps=8,
            max_image_pixels=256 * 256,
            request_timeout_seconds=120.0,  # a loaded CI machine must not turn into 504s
        )
    )
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck), database=None
)
def test_no_server_error_and_every_response_matches_the_schema(case: schemathesis.Case) -> None:
    case.call_and_validate(
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ]
    )


def test_decode_non_utf8_json_body_is_a_documented_422(client: TestClient) -> None:
    response = client.post("/decode", content=b"\xff", headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json()["type"] == "urn:vae-service:problem:invalid-request"


@pytest.mark.parametrize(
    ("content_type", "data"),
    [("image/png", PNG_TRUNCATED_IHDR), ("image/tiff", TIFF_TEXT_STRIP_OFFSETS)],
    ids=["png-truncated-ihdr", "tiff-text-strip-offsets"],
)
def test_encode_answers_a_damaged_image_with_a_422_problem(
    client: TestClient, content_type: str, data: bytes
) -> None:
    response = client.post("/encode", content=data, headers={"Content-Type": content_type})
    assert response.status_code == 422
    assert response.json()["type"] == "urn:vae-service:problem:corrupt-image"


def test_every_documented_interpolate_example_is_accepted(client: TestClient) -> None:
    operation = client.app.openapi()["paths"]["/interpolate"]["post"]  # type: ignore[attr-defined]
    examples = operation["requestBody"]["content"]["application/json"]["schema"]["examples"]
    statuses = [client.post("/interpolate", json=example).status_code for example in examples]
    assert statuses == [200] * len(examples)
