"""Several models in one server: the repository, /models and /models/{name}/..., model control (load,
unload, reload by name), states and reasons, per-model queues and metrics, and every bad input as a 4xx
that changes nothing."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.engine import StartupError
from app.main import create_app
from app.repository import RepositoryError
from tests.app.conftest import DirectModel, settings_for
from tests.app.test_concurrency import png, sample_value, serve

KEY = "models-key"
ADMIN = {"X-API-Key": KEY}
LATENT = [0.0] * 16


def repository_settings(root: Path, **overrides: Any) -> Settings:
    values = {"model_repository": root, "api_key": KEY, **overrides}
    return settings_for(None, **values)  # type: ignore[arg-type]


def keyed(settings: Settings) -> TestClient:
    """A client of an app on `settings` that sends the API key with every request."""
    return TestClient(create_app(settings), raise_server_exceptions=False, headers=ADMIN)


@pytest.fixture(scope="module")
def client(model_repository: Path) -> Iterator[TestClient]:
    with keyed(repository_settings(model_repository)) as client:
        yield client


def models_by_name(client: TestClient) -> dict[str, dict[str, Any]]:
    listing = client.get("/models").json()
    return {model["name"]: model for model in listing["models"]}


def test_the_repository_lists_every_model_folder_by_name(client: TestClient) -> None:
    listing = client.get("/models").json()
    assert listing["default_model"] == "alpha"  # the first name, none being configured
    assert [model["name"] for model in listing["models"]] == ["alpha", "beta", "gamma"]
    alpha, beta, gamma = listing["models"]
    assert {key: alpha[key] for key in ("default", "version", "kind", "state", "reason")} == {
        "default": True,
        "version": "1",
        "kind": "vae",
        "state": "ready",
        "reason": "",
    }
    assert (beta["default"], beta["version"]) == (False, "2")
    assert (gamma["latent_shape"], gamma["image_shape"]) == ([8], [3, 32, 32])
    assert all(model["memory_bytes"] > 0 for model in listing["models"])


def test_each_model_answers_under_its_name_and_the_default_unprefixed(
    client: TestClient, mnist_model_dir: Path, mnist_model_v2_dir: Path
) -> None:
    latents = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    for path, model_dir, version in (
        ("/decode", mnist_model_dir, "mnist-test/1"),
        ("/models/alpha/decode", mnist_model_dir, "mnist-test/1"),
        ("/models/beta/decode", mnist_model_v2_dir, "mnist-test/2"),
    ):
        response = client.post(path + "?format=array", json={"latents": latents.tolist()})
        assert response.status_code == 200 and response.headers["x-model-version"] == version
        expected = DirectModel(model_dir).decode(latents)
        np.testing.assert_allclose(np.array(response.json()["images"]), expected, atol=1e-5)
    rgb = client.get("/models/gamma/sample?n=2&seed=1&format=array")
    assert np.array(rgb.json()["images"]).shape == (2, 3, 32, 32)
    assert client.get("/models/gamma").json()["manifest"]["latent_dim"] == 8
    assert client.get("/model").json()["model"] == "mnist-test/1"
    for route in ("/encode", "/reconstruct", "/score"):
        upload = client.post(f"/models/beta{route}", content=png(3), headers={"Content-Type": "image/png"})
        assert upload.status_code == 200, (route, upload.text)
        assert upload.headers["x-model-version"] == "mnist-test/2"


def test_an_unknown_model_is_a_404_naming_the_models(client: TestClient) -> None:
    for method, path in (
        ("GET", "/models/delta"),
        ("GET", "/models/delta/sample"),
        ("POST", "/models/delta/decode"),
        ("GET", "/models/delta/latent-map"),
    ):
        response = client.request(method, path, json={"latents": [LATENT]})
        assert response.status_code == 404, path
        assert (
            response.json()["detail"]
            == "there is no model 'delta'; this server serves 'alpha', 'beta', 'gamma'"
        )
    assert client.get("/models/..%2Falpha/sample").status_code == 404  # one path segment, never a path
    reload = client.post("/admin/reload", json={"model": "../alpha"}, headers=ADMIN)
    assert reload.status_code == 404 and "there is no model '../alpha'" in reload.json()["detail"]


def test_a_json_field_the_route_does_not_take_is_refused_naming_those_it_takes(client: TestClient) -> None:
    traverse = client.post("/traverse", json={"latent": LATENT, "dims": "0,1"})
    assert traverse.status_code == 422
    assert traverse.json()["detail"] == (
        "unknown field 'dims' in the JSON body; it takes latent; the route's options are query parameters"
    )
    decode = client.post("/models/beta/decode", json={"latents": [LATENT], "format": "array"})
    assert decode.status_code == 422 and "unknown field 'format'" in decode.json()["detail"]
    reload = client.post("/admin/reload", json={"model": "beta", "dir": "/x"}, headers=ADMIN)
    assert reload.status_code == 422
    assert reload.json()["detail"] == (
        "unknown field 'dir' in the JSON body; it takes model, model_dir, allow_shape_change"
    )


def test_unload_and_load_change_one_model_and_say_so_everywhere(model_repository: Path) -> None:
    with keyed(repository_settings(model_repository)) as client:
        assert client.post("/v2/repository/models/beta/unload", headers=ADMIN).json() == {}
        beta = models_by_name(client)["beta"]
        assert (beta["state"], beta["reason"], beta["memory_bytes"]) == ("unavailable", "unloaded", None)
        refused = client.get("/models/beta/sample?n=1")
        assert refused.status_code == 503 and refused.json()["title"] == "Model not loaded"
        assert refused.json()["detail"] == (
            "model 'beta' is not loaded (unloaded); load it with POST /v2/repository/models/beta/load "
            "(API key required)"
        )
        assert client.post("/v2/models/beta-decoder/infer", json={}).status_code == 503
        index = client.post("/v2/repository/index").json()
        assert {entry["name"]: entry["state"] for entry in index} == {
            "alpha-encoder": "READY",
            "alpha-decoder": "READY",
            "beta-encoder": "UNAVAILABLE",
            "beta-decoder": "UNAVAILABLE",
            "gamma-encoder": "READY",
            "gamma-decoder": "READY",
        }
        assert client.get("/models/gamma/sample?n=1").status_code == 200, "the others keep serving"
        metrics = client.get("/metrics").text
        assert 'vae_model_memory_bytes{model="beta"} 0.0' in metrics
        assert 'vae_model_info{latent_dim="16",model="beta"' not in metrics
        assert 'vae_model_reloads_total{action="unload",model="beta",result="success"} 1.0' in metrics
        # Either part's name loads the whole model.
        assert client.post("/v2/repository/models/beta-encoder/load", headers=ADMIN).status_code == 200
        assert models_by_name(client)["beta"]["state"] == "ready"
        assert client.get("/models/beta/sample?n=1").headers["x-model-version"] == "mnist-test/2"


def test_bad_model_control_is_a_4xx_that_changes_nothing(model_repository: Path, tmp_path: Path) -> None:
    with keyed(repository_settings(model_repository)) as client:
        before = models_by_name(client)
        default = client.post("/v2/repository/models/alpha/unload", headers=ADMIN)
        assert default.status_code == 409 and "is the default model" in default.json()["error"]
        unknown = client.post("/v2/repository/models/delta/load", headers=ADMIN)
        assert unknown.status_code == 404
        assert (
            unknown.json()["error"]
            == "there is no model 'delta'; this server serves 'alpha', 'beta', 'gamma'"
        )
        keyless = client.post("/v2/repository/models/beta/unload", headers={"X-API-Key": ""})
        assert keyless.status_code == 401
        body = client.post("/v2/repository/models/beta/unload", content=b"{", headers=ADMIN)
        assert body.status_code == 400
        assert models_by_name(client) == before


def test_a_broken_model_is_listed_with_its_reason_and_the_others_serve(
    model_repository: Path, tmp_path: Path
) -> None:
    root = tmp_path / "repository"
    shutil.copytree(model_repository, root)
    (root / "beta" / "decoder.onnx").write_bytes(b"not a graph")
    with keyed(repository_settings(root)) as client:
        beta = models_by_name(client)["beta"]
        assert beta["state"] == "unavailable" and beta["reason"].startswith("load failed: ")
        assert "sha256" in beta["reason"] or "checksum" in beta["reason"]
        assert client.get("/models/gamma/sample?n=1").status_code == 200
        load = client.post("/v2/repository/models/beta/load", headers=ADMIN)
        assert load.status_code == 400
        assert load.json()["error"].startswith(
            "cannot load model 'beta': decoder file decoder.onnx has sha256"
        )
        assert load.json()["error"].endswith("; nothing changed")
        assert models_by_name(client)["beta"]["state"] == "unavailable"
    (root / "alpha" / "manifest.json").write_text("{}")
    with (
        pytest.raises(StartupError, match="the default model 'alpha' cannot be served"),
        TestClient(create_app(repository_settings(root))),
    ):
        pass


def test_explicit_control_loads_the_named_models_and_the_rest_on_request(
    model_repository: Path, tmp_path: Path, mnist_model_dir: Path
) -> None:
    root = tmp_path / "repository"
    shutil.copytree(model_repository, root)
    settings = repository_settings(
        root, model_control_mode="explicit", default_model="beta", load_models=["gamma"]
    )
    with keyed(settings) as client:
        states = {name: model["state"] for name, model in models_by_name(client).items()}
        assert states == {"alpha": "unavailable", "beta": "ready", "gamma": "ready"}
        assert models_by_name(client)["alpha"]["reason"] == "never loaded"
        assert client.get("/model").json()["model"] == "mnist-test/2"
        assert client.get("/models/alpha/sample?n=1").status_code == 503
        assert client.post("/v2/repository/models/alpha/load", headers=ADMIN).status_code == 200
        assert client.get("/models/alpha/sample?n=1").headers["x-model-version"] == "mnist-test/1"
        # A folder added to the repository after the start loads by its name.
        shutil.copytree(mnist_model_dir, root / "delta")
        assert client.get("/models/delta/sample?n=1").status_code == 404
        assert client.post("/v2/repository/models/delta/load", headers=ADMIN).status_code == 200
        assert client.get("/models/delta/sample?n=1").status_code == 200


def test_settings_that_name_no_usable_models_stop_the_start(model_repository: Path, tmp_path: Path) -> None:
    for settings, message in (
        (repository_settings(tmp_path), "has no models"),
        (repository_settings(tmp_path / "missing"), "does not exist"),
        (repository_settings(model_repository, default_model="delta"), "default model 'delta' is not served"),
        (repository_settings(model_repository, load_models=["delta"]), "load_models names 'delta'"),
        (settings_for(model_repository, model_repository=model_repository), "not both"),
    ):
        with pytest.raises(RepositoryError, match=message), TestClient(create_app(settings)):
            pass


def test_reload_takes_the_models_name(client: TestClient, mnist_model_v2_dir: Path) -> None:
    reloaded = client.post(
        "/admin/reload", json={"model": "gamma", "model_dir": str(mnist_model_v2_dir)}, headers=ADMIN
    )
    assert reloaded.status_code == 409 and "latent_dim 16 (served: 8)" in reloaded.json()["detail"]
    reloaded = client.post("/admin/reload", json={"model": "beta"}, headers=ADMIN)
    assert reloaded.status_code == 200
    assert {key: reloaded.json()[key] for key in ("name", "model", "workers")} == {
        "name": "beta",
        "model": "mnist-test/2",
        "workers": 1,
    }


@pytest.mark.asyncio
async def test_one_models_full_queue_never_refuses_another(model_repository: Path) -> None:
    """alpha's decoder is held while its queue fills; beta, sharing the process, keeps answering, and each
    model's metrics count only its own work."""
    settings = repository_settings(
        model_repository,
        api_key=None,
        max_batch_size=64,
        max_queue_items=64,
        max_wait_ms=0,
        inference_threads=1,
    )
    app = create_app(settings)
    async with serve(app) as client:
        alpha = app.state.models.get("alpha").engine
        held, release = threading.Event(), threading.Event()
        run = alpha._decoder_batcher._run  # type: ignore[union-attr]

        def holding(latents: np.ndarray) -> Any:
            held.set()
            release.wait(30)
            return run(latents)

        alpha._decoder_batcher._run = holding  # type: ignore[union-attr]
        try:
            first = asyncio.ensure_future(client.get("/models/alpha/sample?n=64&seed=0"))
            assert await asyncio.to_thread(held.wait, 10)
            queued = asyncio.ensure_future(client.get("/models/alpha/sample?n=64&seed=1"))
            await wait_for_queue(app, "alpha")
            refused = await client.get("/models/alpha/sample?n=1")
            served = await client.get("/models/beta/sample?n=64&seed=2")
        finally:
            release.set()
        assert (await first).status_code == 200 and (await queued).status_code == 200
    assert refused.status_code == 503 and refused.json()["title"] == "Server busy"
    assert served.status_code == 200
    assert sample_value(app, "vae_requests_rejected_total", {"model": "alpha", "reason": "queue_full"}) == 1
    assert sample_value(app, "vae_requests_rejected_total", {"model": "beta", "reason": "queue_full"}) == 0
    assert sample_value(app, "vae_items_processed_total", {"model": "beta", "part": "decoder"}) == 64
    assert sample_value(app, "vae_items_processed_total", {"model": "alpha", "part": "decoder"}) == 128
    counted = {"endpoint": "/models/{model_name}/sample", "method": "GET", "status": "200"}
    assert sample_value(app, "vae_requests_total", {**counted, "model": "alpha"}) == 2
    assert sample_value(app, "vae_requests_total", {**counted, "model": "beta"}) == 1


async def wait_for_queue(app: Any, model: str) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while sample_value(app, "vae_queue_depth", {"model": model, "part": "decoder"}) < 64:
        assert asyncio.get_running_loop().time() < deadline, "the second request never queued"
        await asyncio.sleep(0.005)


def test_the_openapi_document_describes_the_model_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    encode = paths["/models/{model_name}/encode"]["post"]
    assert encode["parameters"][0]["name"] == "model_name" and encode["parameters"][0]["in"] == "path"
    assert "404" in encode["responses"] and "404" not in paths["/encode"]["post"]["responses"]
    assert encode["operationId"] != paths["/encode"]["post"]["operationId"]


def test_the_shipped_models_serve_without_settings() -> None:
    settings = Settings(_env_file=None, execution_provider="cpu", intra_op_threads=1)  # type: ignore[call-arg]
    with TestClient(create_app(settings)) as client:
        listing = client.get("/models").json()
        assert listing["default_model"] == "mnist-vae"
        kinds = {model["name"]: (model["kind"], model["state"]) for model in listing["models"]}
        assert kinds == {
            "mnist-ae": ("ae", "ready"),
            "mnist-pca": ("pca", "ready"),
            "mnist-vae": ("vae", "ready"),
        }
        for name in kinds:
            response = client.post(
                f"/models/{name}/reconstruct", content=png(1), headers={"Content-Type": "image/png"}
            )
            assert response.status_code == 200 and response.headers["x-model-version"] == f"{name}/1.1.0"


def test_a_load_outliving_its_request_still_ends(model_repository: Path) -> None:
    """The request's deadline passes while the model loads: it gets 504, and the load still finishes
    (a load stopped half-way would leave the model `loading` for good)."""
    with keyed(repository_settings(model_repository, request_timeout_seconds=0.5)) as client:
        assert client.post("/v2/repository/models/beta/unload").status_code == 200
        registry = client.app.state.models  # type: ignore[attr-defined]
        load_engine = registry.load_engine

        def slow_load(*arguments: Any) -> Any:
            time.sleep(1.5)
            return load_engine(*arguments)

        registry.load_engine = slow_load
        assert client.post("/v2/repository/models/beta/load").status_code == 504
        assert models_by_name(client)["beta"]["state"] == "loading"
        deadline = time.monotonic() + 30
        while models_by_name(client)["beta"]["state"] == "loading":
            assert time.monotonic() < deadline, "the load never ended"
            time.sleep(0.05)  # poll interval
        assert models_by_name(client)["beta"]["state"] == "ready"
        assert client.get("/models/beta/sample?n=1").status_code == 200
