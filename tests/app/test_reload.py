"""Hot reload through POST /admin/reload: atomic swap, in-flight requests finish on the old model, bad
directories and concurrent reloads are refused while the old model keeps serving."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.engine import Engine
from app.main import create_app
from tests.app.conftest import DirectModel

KEY = "reload-key"
ADMIN = {"X-API-Key": KEY}
WAIT_SECONDS = 30  # upper bound for events that normally take milliseconds
RELOAD_SUCCEEDED = 'vae_model_reloads_total{action="reload",model="mnist-test",result="success"} 1.0'
RELOAD_FAILED = 'vae_model_reloads_total{action="reload",model="mnist-test",result="failure"} 1.0'


def metric_lines(client: TestClient, name: str) -> list[str]:
    return [line for line in client.get("/metrics").text.splitlines() if line.startswith(name)]


def sample_pixels(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array(response.json()["images"], dtype=np.float32)


def direct_sample(direct: Any, seed: int) -> np.ndarray:
    latents = np.random.default_rng(seed).standard_normal((1, 16)).astype(np.float32)
    return np.asarray(direct.decode(latents))


class PausedDecoder:
    """Wraps an engine's decoder run: the first run signals `entered` and waits for `release`."""

    def __init__(self, engine: Engine) -> None:
        self.run = engine.run_decoder
        self.entered = threading.Event()
        self.release = threading.Event()
        engine.run_decoder = self  # type: ignore[method-assign]  # the batcher takes it at start()

    def __call__(self, latents: np.ndarray) -> tuple[np.ndarray]:
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(WAIT_SECONDS), "the test never released the paused decoder"
        return self.run(latents)


@pytest.fixture
def v1_settings(make_settings: Callable[..., Settings], mnist_model_dir: Path) -> Settings:
    return make_settings(mnist_model_dir, api_key=KEY, max_wait_ms=0)


@pytest.fixture
def paused_app(v1_settings: Settings) -> Iterator[tuple[TestClient, Engine, PausedDecoder]]:
    engine = Engine.load(v1_settings)
    paused = PausedDecoder(engine)
    with TestClient(create_app(v1_settings, engine), raise_server_exceptions=False) as client:
        yield client, engine, paused
        paused.release.set()


def test_reload_swaps_models_while_a_request_is_in_flight(
    paused_app: tuple[TestClient, Engine, PausedDecoder],
    mnist_model_v2_dir: Path,
    mnist_direct: Any,
) -> None:
    client, old_engine, paused = paused_app
    v2_direct = DirectModel(mnist_model_v2_dir)
    in_flight: list[httpx.Response] = []
    request = threading.Thread(
        target=lambda: in_flight.append(client.get("/sample?n=1&seed=3&format=array", headers=ADMIN))
    )
    request.start()
    assert paused.entered.wait(WAIT_SECONDS)

    reloaded = client.post("/admin/reload", json={"model_dir": str(mnist_model_v2_dir)}, headers=ADMIN)
    assert reloaded.status_code == 200, reloaded.text
    assert reloaded.json() == {
        "status": "reloaded",
        "name": "mnist-test",
        "model": "mnist-test/2",
        "model_dir": str(mnist_model_v2_dir),
        "workers": 1,
        "workers_switched": 1,
    }
    after = client.get("/sample?n=1&seed=3&format=array", headers=ADMIN)
    assert after.headers["x-model-version"] == "mnist-test/2"
    np.testing.assert_allclose(sample_pixels(after), direct_sample(v2_direct, 3), atol=1e-6)
    assert client.get("/model", headers=ADMIN).json()["manifest"]["version"] == "2"
    assert old_engine.ready, "the old engine must keep its batchers while a request uses it"

    paused.release.set()
    request.join(WAIT_SECONDS)
    (before,) = in_flight
    assert before.headers["x-model-version"] == "mnist-test/1"
    np.testing.assert_allclose(sample_pixels(before), direct_sample(mnist_direct, 3), atol=1e-6)
    assert not np.allclose(sample_pixels(before), sample_pixels(after))

    deadline = time.monotonic() + WAIT_SECONDS
    while old_engine.ready:  # its batchers stop once the in-flight request is answered
        assert time.monotonic() < deadline, "the old engine was never stopped"
        time.sleep(0.01)  # poll interval
    assert metric_lines(client, "vae_model_info{") == [
        'vae_model_info{latent_dim="16",model="mnist-test",name="mnist-test",provider="CPUExecutionProvider",'
        'version="2"} 1.0'
    ]
    assert RELOAD_SUCCEEDED in metric_lines(client, "vae_model_reloads_total")


def test_corrupted_model_dir_is_refused_and_the_old_model_keeps_serving(
    client_with_key: TestClient, mnist_model_v2_dir: Path, tmp_path: Path
) -> None:
    corrupted = shutil.copytree(mnist_model_v2_dir, tmp_path / "corrupted")
    with (corrupted / "encoder.onnx").open("ab") as file:
        file.write(b"\0")
    refused = client_with_key.post("/admin/reload", json={"model_dir": str(corrupted)}, headers=ADMIN)
    assert refused.status_code == 422
    assert refused.headers["content-type"] == "application/problem+json"
    problem = refused.json()
    assert problem["title"] == "Model reload failed"
    assert "encoder file encoder.onnx has sha256" in problem["detail"]
    assert problem["detail"].endswith("the previous model keeps serving")
    served = client_with_key.get("/sample?n=1&seed=0", headers=ADMIN)
    assert served.status_code == 200 and served.headers["x-model-version"] == "mnist-test/1"
    assert RELOAD_FAILED in metric_lines(client_with_key, "vae_model_reloads_total")


def test_a_failed_reload_of_the_configured_dir_does_not_reveal_its_path(
    make_settings: Callable[..., Settings], mnist_model_dir: Path, tmp_path: Path
) -> None:
    served_dir = shutil.copytree(mnist_model_dir, tmp_path / "served")
    settings = make_settings(served_dir, api_key=KEY, max_wait_ms=0)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        (served_dir / "decoder.onnx").unlink()
        refused = client.post("/admin/reload", headers=ADMIN)
    assert refused.status_code == 422
    assert refused.json()["detail"] == (
        "cannot serve the model in the directory being served: decoder file decoder.onnx named in the "
        "manifest is missing from the directory being served; the previous model keeps serving"
    )
    assert str(tmp_path) not in refused.text


@pytest.fixture
def client_with_key(v1_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(v1_settings), raise_server_exceptions=False) as client:
        yield client


def test_a_second_reload_while_one_runs_gets_409(
    client_with_key: TestClient, mnist_model_v2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loading, finish = threading.Event(), threading.Event()
    load = Engine.load

    def slow_load(settings: Settings) -> Engine:
        loading.set()
        assert finish.wait(WAIT_SECONDS)
        return load(settings)

    monkeypatch.setattr(Engine, "load", staticmethod(slow_load))
    first: list[httpx.Response] = []
    body = {"model_dir": str(mnist_model_v2_dir)}
    reload = threading.Thread(
        target=lambda: first.append(client_with_key.post("/admin/reload", json=body, headers=ADMIN))
    )
    reload.start()
    try:
        assert loading.wait(WAIT_SECONDS)
        second = client_with_key.post("/admin/reload", json=body, headers=ADMIN)
        assert second.status_code == 409 and second.json()["title"] == "Reload in progress"
        # The first reload is still loading: the old model answers.
        assert client_with_key.get("/model", headers=ADMIN).json()["model"] == "mnist-test/1"
    finally:
        finish.set()
        reload.join(WAIT_SECONDS)
    assert first[0].status_code == 200 and first[0].json()["model"] == "mnist-test/2"


def test_reload_without_a_body_reloads_the_configured_directory(client_with_key: TestClient) -> None:
    reloaded = client_with_key.post("/admin/reload", headers=ADMIN)
    assert reloaded.status_code == 200
    assert reloaded.json()["model_dir"] == str(client_with_key.app.state.settings.model_dir)  # type: ignore[attr-defined]


def test_a_new_shape_is_refused_unless_allowed(v1_settings: Settings, rgb_model_dir: Path) -> None:
    with TestClient(create_app(v1_settings)) as client:
        refused = client.post("/admin/reload", json={"model_dir": str(rgb_model_dir)}, headers=ADMIN)
        assert refused.status_code == 409
        assert refused.json()["type"] == "urn:vae-service:problem:shape-change-refused"
        assert refused.json()["detail"] == (
            f"the model in {rgb_model_dir} has latent_dim 8 (served: 16) and images of 3x32x32 (served: "
            "1x28x28, C x H x W), so clients sized for the served model would break; send "
            '{"allow_shape_change": true} to switch anyway; the served model keeps serving'
        )
        assert client.get("/model", headers=ADMIN).json()["model"] == "mnist-test/1"
        allowed = client.post(
            "/admin/reload",
            json={"model_dir": str(rgb_model_dir), "allow_shape_change": True},
            headers=ADMIN,
        )
        assert allowed.status_code == 200 and allowed.json()["model"] == "rgb-test/1"
        assert RELOAD_FAILED in metric_lines(client, "vae_model_reloads_total")


def test_a_reload_without_a_directory_reads_the_served_one_again(
    v1_settings: Settings, mnist_model_v2_dir: Path
) -> None:
    with TestClient(create_app(v1_settings)) as client:
        client.post("/admin/reload", json={"model_dir": str(mnist_model_v2_dir)}, headers=ADMIN)
        again = client.post("/admin/reload", headers=ADMIN)
        assert again.json()["model_dir"] == str(mnist_model_v2_dir), "not back to VAE_MODEL_DIR"
        assert again.json()["model"] == "mnist-test/2"


def test_a_reload_body_must_be_json(v1_settings: Settings) -> None:
    with TestClient(create_app(v1_settings)) as client:
        form = client.post(
            "/admin/reload",
            content=b"model_dir=/models/v2",
            headers={**ADMIN, "Content-Type": "application/x-www-form-urlencoded"},
        )
    assert form.status_code == 415
    assert form.json()["detail"] == (
        "Content-Type 'application/x-www-form-urlencoded' is not accepted; send JSON with Content-Type: "
        'application/json, e.g. {"model_dir": "/models/v2"} (curl -d sends '
        "application/x-www-form-urlencoded: add -H 'Content-Type: application/json')"
    )
