"""Every error is one problem JSON shape with an actionable message and no internals."""

from __future__ import annotations

import io
import itertools
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.main import create_app

PROBLEM_KEYS = {"type", "title", "status", "detail"}


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


GRAY_PNG = png(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG header claiming width x height, then an IDAT chunk cut off before its pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 1000) + b"IDAT" + zlib.compress(b"\0" * 10)[:5]


def assert_problem(response: Any, status: int, *detail_words: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem: dict[str, Any] = response.json()
    assert set(problem) == PROBLEM_KEYS and problem["status"] == status
    for word in detail_words:
        assert word in problem["detail"], problem["detail"]
    assert "Traceback" not in response.text and "/work/" not in response.text and ".py" not in response.text
    return problem


@pytest.fixture(scope="module")
def strict_client(mnist_model_dir: Path, make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    """An app with small limits."""
    settings = make_settings(
        mnist_model_dir,
        max_body_bytes=50_000,
        max_image_pixels=100 * 100,
        max_items_per_request=2,
        max_sample_n=4,
        max_interpolation_steps=6,
        max_temperature=2.0,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def test_not_an_image(client: TestClient) -> None:
    assert_problem(
        client.post("/encode", content=b"hello", headers={"Content-Type": "text/plain"}), 415, "image/png"
    )
    assert_problem(
        client.post("/encode", content=b"hello", headers={"Content-Type": "image/png"}), 415, "not an image"
    )
    files = {"file": ("a.txt", b"plain text", "text/plain")}
    assert_problem(client.post("/reconstruct", files=files), 415, "not an image")
    assert_problem(client.post("/encode", content=b"", headers={"Content-Type": "image/png"}), 422, "empty")
    assert_problem(
        client.post("/encode", data={"file": "not a file"}, files={"x": ("x", b"x")}), 422, "'file'"
    )


def test_corrupt_and_truncated_images(client: TestClient) -> None:
    truncated = GRAY_PNG[: len(GRAY_PNG) // 2]
    assert_problem(
        client.post("/encode", content=truncated, headers={"Content-Type": "image/png"}), 422, "truncated"
    )
    header_only = png_header_only(28, 28)
    assert_problem(client.post("/encode", content=header_only, headers={"Content-Type": "image/png"}), 422)
    signature_only = b"\x89PNG\r\n\x1a\n" + b"garbage"
    response = client.post("/encode", content=signature_only, headers={"Content-Type": "image/png"})
    assert_problem(response, 422, "PNG")


def test_too_large_body_and_image(strict_client: TestClient) -> None:
    big_body = b"\0" * 60_000
    assert_problem(
        strict_client.post("/encode", content=big_body, headers={"Content-Type": "image/png"}), 413, "50000"
    )
    assert_problem(
        strict_client.post("/decode", content=big_body, headers={"Content-Type": "application/json"}), 413
    )

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        for _ in range(6):
            yield b"\0" * 10_000

    assert_problem(
        strict_client.post("/encode", content=chunks(), headers={"Content-Type": "image/png"}), 413
    )
    form_start = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
    chunked_form = itertools.chain([form_start], chunks())
    multipart = {"Content-Type": "multipart/form-data; boundary=b"}
    assert_problem(strict_client.post("/encode", content=chunked_form, headers=multipart), 413, "50000")
    wide = png(np.zeros((10, 1001), np.uint8))
    assert_problem(
        strict_client.post("/encode", content=wide, headers={"Content-Type": "image/png"}), 413, "1001x10"
    )
    # A header claiming 100000 x 100000 pixels, without the data: rejected from the header, before decoding.
    bomb = png_header_only(100_000, 100_000)
    assert_problem(
        strict_client.post("/encode", content=bomb, headers={"Content-Type": "image/png"}), 413, "10000"
    )


def test_latent_errors(client: TestClient) -> None:
    assert_problem(
        client.post("/decode", json={"latents": [[0.0] * 16, [0.0] * 3]}), 422, "latents[1] has 3", "16"
    )
    for bad in ("NaN", "Infinity", "-Infinity", "1e39"):
        body = '{"latents": [[' + ", ".join([bad] + ["0"] * 15) + "]]}"
        response = client.post("/decode", content=body, headers={"Content-Type": "application/json"})
        assert_problem(response, 422, "finite")
    assert_problem(client.post("/decode", json={"latents": [[3e38] * 16]}), 422, "too large")
    assert_problem(client.post("/decode", json={"latents": []}), 422, "latents")
    assert_problem(client.post("/decode", json={"vectors": [[0.0] * 16]}), 422, "unknown field 'vectors'")
    assert_problem(
        client.post("/decode", content=b"{not json", headers={"Content-Type": "application/json"}),
        422,
        "JSON",
    )
    assert_problem(
        client.post("/interpolate", json={"start": [0.0] * 15, "end": [0.0] * 16}), 422, "start[0] has 15"
    )
    assert_problem(client.post("/interpolate", json={"start": "###", "end": [0.0] * 16}), 422, "base64")
    assert_problem(client.post("/interpolate", json={"start": [0.0] * 16}), 422, "body.end")
    assert_problem(
        client.post("/interpolate", json={"start": [0.0] * 16, "end": [0.0] * 16, "steps": 1}), 422, "steps"
    )
    bad_method = {"start": [0.0] * 16, "end": [0.0] * 16, "method": "cubic"}
    assert_problem(client.post("/interpolate", json=bad_method), 422, "method")


def test_limits(strict_client: TestClient) -> None:
    assert_problem(strict_client.get("/sample?n=5"), 422, "n is 5", "limit is 4")
    assert_problem(strict_client.get("/sample?n=0"), 422, "query.n")
    assert_problem(strict_client.get("/sample?n=1&temperature=2.5"), 422, "temperature")
    assert_problem(strict_client.get("/sample?n=1&temperature=nan"), 422, "temperature")
    assert_problem(strict_client.get("/sample?seed=-1"), 422, "seed")
    three = [("files", (f"{i}.png", GRAY_PNG, "image/png")) for i in range(3)]
    assert_problem(strict_client.post("/encode", files=three), 422, "files")
    assert_problem(
        strict_client.post("/decode", json={"latents": [[0.0] * 16] * 3}), 422, "latent vectors is 3"
    )
    steps = {"start": [0.0] * 16, "end": [0.0] * 16, "steps": 7}
    assert_problem(strict_client.post("/interpolate", json=steps), 422, "steps is 7", "limit is 6")


def test_unknown_paths_and_methods(client: TestClient) -> None:
    assert_problem(client.get("/nowhere"), 404, "/nowhere", "/docs")
    problem = assert_problem(client.get("/encode"), 405, "GET", "POST")
    assert problem["title"] == "Method Not Allowed"
    assert_problem(client.post("/interpolate", content=b"x", headers={"Content-Type": "text/csv"}), 415)


def test_unexpected_errors_are_500_problems_without_internals(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = client.app.state.models.default_engine()  # type: ignore[attr-defined]

    async def broken(latents: np.ndarray) -> np.ndarray:
        raise RuntimeError("secret internal state at /work/main/app/engine.py")

    monkeypatch.setattr(engine, "decode", broken)
    problem = assert_problem(client.get("/sample?n=1"), 500)
    assert "secret" not in problem["detail"]


def test_not_ready_before_the_model_is_loaded(
    mnist_model_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    app = create_app(make_settings(mnist_model_dir))
    client = TestClient(app, raise_server_exceptions=False)  # no `with`: the lifespan has not run
    assert client.get("/healthz").status_code == 200
    assert_problem(client.get("/readyz"), 503, "/readyz")
    assert_problem(client.get("/sample"), 503)
