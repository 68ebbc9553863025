"""The Prometheus exposition: exact metric names, labels, and values that move as requests arrive."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings
from app.main import create_app

EXPECTED_FAMILIES = {
    "vae_requests": "counter",
    "vae_request_duration_seconds": "histogram",
    "vae_batch_size": "histogram",
    "vae_queue_wait_seconds": "histogram",
    "vae_inference_duration_seconds": "histogram",
    "vae_queue_depth": "gauge",
    "vae_requests_in_flight": "gauge",
    "vae_items_processed": "counter",
    "vae_requests_rejected": "counter",
    "vae_model_info": "gauge",
}


MODEL = "mnist-test"


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], metric: str, /, **labels: str
) -> float:
    return samples.get((metric, tuple(sorted(labels.items()))), 0.0)


def test_metric_families_names_and_types(
    mnist_model_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    with TestClient(create_app(make_settings(mnist_model_dir))) as client:
        families = {
            family.name: family.type for family in text_string_to_metric_families(client.get("/metrics").text)
        }
        samples = scrape(client)
    assert {name: families.get(name) for name in EXPECTED_FAMILIES} == EXPECTED_FAMILIES
    info = value(
        samples,
        "vae_model_info",
        model="mnist-test",
        name="mnist-test",
        version="1",
        provider="CPUExecutionProvider",
        latent_dim="16",
    )
    assert info == 1
    for part in ("encoder", "decoder"):
        assert ("vae_queue_depth", (("model", "mnist-test"), ("part", part))) in samples
    for reason in ("queue_full", "timeout"):
        assert ("vae_requests_rejected_total", (("model", "mnist-test"), ("reason", reason))) in samples
    buckets = {dict(labels)["le"] for name, labels in samples if name == "vae_batch_size_bucket"}
    assert buckets == {"1.0", "2.0", "4.0", "8.0", "16.0", "32.0", "64.0", "128.0", "+Inf"}


def test_metrics_move_with_requests(mnist_model_dir: Path, make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(mnist_model_dir))) as client:
        before = scrape(client)
        assert client.get("/sample?n=3&seed=1").status_code == 200
        assert client.post("/decode", json={"latents": [[0.0] * 16]}).status_code == 200
        assert client.post("/decode", json={"latents": [[0.0] * 2]}).status_code == 422
        assert client.get("/no/such/path").status_code == 404
        after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("vae_requests_total", endpoint="/sample", method="GET", status="200", model=MODEL) == 1
    assert delta("vae_requests_total", endpoint="/decode", method="POST", status="200", model=MODEL) == 1
    assert delta("vae_requests_total", endpoint="/decode", method="POST", status="422", model=MODEL) == 1
    assert delta("vae_requests_total", endpoint="other", method="GET", status="404", model="") == 1
    assert delta("vae_request_duration_seconds_count", endpoint="/decode", model=MODEL) == 2
    assert delta("vae_items_processed_total", model=MODEL, part="decoder") == 4
    assert delta("vae_batch_size_count", model=MODEL, part="decoder") == 2
    assert delta("vae_batch_size_sum", model=MODEL, part="decoder") == 4
    assert delta("vae_inference_duration_seconds_count", model=MODEL, part="decoder") == 2
    assert delta("vae_queue_wait_seconds_count", model=MODEL, part="decoder") == 2
    assert delta("vae_items_processed_total", model=MODEL, part="encoder") == 0
    assert value(after, "vae_requests_in_flight") == 1  # the scrape itself
    assert value(after, "vae_queue_depth", model=MODEL, part="decoder") == 0


def test_each_app_has_its_own_registry(mnist_model_dir: Path, make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(mnist_model_dir))) as first:
        first.get("/healthz")
        with TestClient(create_app(make_settings(mnist_model_dir))) as second:
            counts = scrape(second)
    assert value(counts, "vae_requests_total", endpoint="/healthz", method="GET", status="200") == 0
